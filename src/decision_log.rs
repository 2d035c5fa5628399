//! The decision log: one JSON line per request, saying why it went where it went.
//!
//! The request path hands a [`DecisionRecord`] to [`DecisionLog::log`], which
//! never blocks: records go through a bounded channel to a writer thread, and
//! when the writer falls behind the record is dropped and counted (in
//! [`DecisionLog::dropped`] and the `routeplane_decision_log_dropped_total`
//! metric) rather than slowing requests down.
//!
//! INVARIANT: no secret is ever written. The record has no field for headers,
//! keys or prompts; the only free text (upstream error messages, which some
//! providers fill with the key they were given) passes through [`redact`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::ir::Micros;
use crate::metrics::Metrics;
use crate::reload::rfc3339;

/// What one constraint removed from the candidate models.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Removed {
    /// The constraint's label, or `constraints[N]`.
    pub constraint: String,
    pub models: Vec<String>,
}

/// One upstream attempt and how it ended.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Attempt {
    pub model: String,
    pub provider: String,
    /// `ok`, an HTTP status (`429`), or `timeout` (first token or total),
    /// `connect`, `reset`, `protocol`, `unsupported_parameter`, `budget`,
    /// `budget_unavailable`, `limited`, `breaker_open`, `stream_cut`.
    pub outcome: String,
    /// 0 for the first try of this model, then 1, 2, .. for retries.
    pub retry: u32,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_token_ms: Option<f64>,
    /// The upstream's error message, redacted; absent on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One line of the decision log.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DecisionRecord {
    /// When the request arrived (RFC 3339, UTC); filled by [`DecisionLog::log`] if empty.
    pub ts: String,
    /// Also returned to the client in `x-routeplane-decision`.
    pub decision_id: String,
    pub policy_version: String,
    pub tenant: String,
    pub feature: Option<String>,
    /// `chat`, `embeddings`, `images`, `audio_transcription`, `audio_speech`.
    pub endpoint: String,
    /// What the client asked for in `model` (a model, an intent or `auto`).
    pub requested_model: Option<String>,
    pub stream: bool,
    pub intent: Option<String>,
    pub route: Option<String>,
    /// What each constraint that fired removed.
    pub removed: Vec<Removed>,
    /// The ordered models the decision allowed (attempts are taken from it).
    pub plan: Vec<String>,
    /// The model that answered, if any.
    pub chosen_model: Option<String>,
    pub provider: Option<String>,
    pub attempts: Vec<Attempt>,
    /// The HTTP status returned to the client.
    pub status: u16,
    /// Why the request was refused (a denial message naming the rule), if it was.
    pub denial: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub estimated_cost_micros: Micros,
    pub actual_cost_micros: Micros,
    pub first_token_ms: Option<f64>,
    pub total_ms: f64,
}

/// Where the log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Off,
    Stdout,
    File(PathBuf),
}

impl Sink {
    /// From the config's `decision_log`: absent = off, `-` = stdout, else a file (appended to).
    pub fn from_config(path: Option<&Path>) -> Sink {
        match path {
            None => Sink::Off,
            // The config resolves paths against its directory, so `-` may arrive as `dir/-`.
            Some(p) if p.file_name().is_some_and(|n| n == "-") => Sink::Stdout,
            Some(p) => Sink::File(p.to_path_buf()),
        }
    }
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct DecisionLog {
    tx: Option<SyncSender<DecisionRecord>>,
    counters: Arc<Counters>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

/// The writer thread; [`WriterHandle::join`] waits until every
/// [`DecisionLog`] clone is dropped and the last line is flushed.
#[derive(Debug)]
pub struct WriterHandle {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriterHandle {
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The default channel size: a few seconds of traffic at thousands of requests per second.
pub const DEFAULT_CAPACITY: usize = 8192;

impl DecisionLog {
    /// Open the sink and start the writer thread.
    pub fn start(
        sink: Sink,
        capacity: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> std::io::Result<(DecisionLog, WriterHandle)> {
        let out: Box<dyn Write + Send> = match sink {
            Sink::Off => {
                let log = DecisionLog {
                    tx: None,
                    counters: Arc::default(),
                    metrics,
                };
                return Ok((log, WriterHandle { thread: None }));
            }
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                Box::new(LogFile::open(path, REOPEN_CHECK)?)
            }
        };
        Self::start_with(out, capacity, metrics)
    }

    /// Start the writer on any `Write` (tests use a buffer).
    pub fn start_with(
        out: Box<dyn Write + Send>,
        capacity: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> std::io::Result<(DecisionLog, WriterHandle)> {
        let (tx, rx) = mpsc::sync_channel::<DecisionRecord>(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || write_loop(&rx, out, &thread_counters))?;
        Ok((
            DecisionLog {
                tx: Some(tx),
                counters,
                metrics,
            },
            WriterHandle {
                thread: Some(thread),
            },
        ))
    }

    /// Queue one record; drops it (and counts) when the writer is behind.
    pub fn log(&self, mut record: DecisionRecord) {
        let Some(tx) = &self.tx else { return };
        if record.ts.is_empty() {
            record.ts = rfc3339(SystemTime::now());
        }
        match tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.decision_log_dropped();
                }
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Records dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Lines that could not be written (disk full, closed stdout).
    pub fn write_errors(&self) -> u64 {
        self.counters.write_errors.load(Ordering::Relaxed)
    }
}

/// How often the log file's path is looked at again (see [`LogFile`]).
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// The decision log's file, following its path: when the path no longer
/// leads to the file being written (logrotate moved it away and, with
/// `create`, put a new one there; someone deleted it), the next write opens
/// the path again, creating it. Without this, a rotated log went on growing
/// under its old name, or in a deleted file that filled the disk unseen.
/// The path is looked at once per `check` at most, before a write.
/// `copytruncate` rotation needs nothing: the file is opened to append.
struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    /// The open file's identity, to compare with what the path leads to.
    id: Option<FileId>,
    check: Duration,
    checked: Instant,
    /// A failed reopen is logged once, until one succeeds.
    reopen_failing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    #[cfg(unix)]
    fn of(m: &std::fs::Metadata) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    #[cfg(not(unix))]
    fn of(_: &std::fs::Metadata) -> Option<FileId> {
        None
    }
}

impl LogFile {
    fn open(path: PathBuf, check: Duration) -> std::io::Result<LogFile> {
        let file = Self::open_path(&path)?;
        let id = file.metadata().ok().as_ref().and_then(FileId::of);
        Ok(LogFile {
            path,
            file,
            id,
            check,
            checked: Instant::now(),
            reopen_failing: false,
        })
    }

    fn open_path(path: &Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    /// Whether the path still leads to the open file.
    fn path_is_ours(&self) -> bool {
        match std::fs::metadata(&self.path) {
            Ok(m) => self.id.is_none() || FileId::of(&m) == self.id,
            Err(_) => false,
        }
    }

    fn follow_the_path(&mut self) {
        if self.checked.elapsed() < self.check {
            return;
        }
        self.checked = Instant::now();
        if self.path_is_ours() {
            return;
        }
        match LogFile::open(self.path.clone(), self.check) {
            Ok(fresh) => {
                if self.reopen_failing {
                    tracing::info!(
                        "the decision log `{}` is written again",
                        self.path.display()
                    );
                }
                *self = fresh;
            }
            Err(e) => {
                if !self.reopen_failing {
                    tracing::error!(
                        "the decision log `{}` was moved or deleted and cannot be created again ({e}); writing on to the old file",
                        self.path.display()
                    );
                    self.reopen_failing = true;
                }
            }
        }
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.follow_the_path();
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn write_loop(
    rx: &mpsc::Receiver<DecisionRecord>,
    out: Box<dyn Write + Send>,
    counters: &Counters,
) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(1024);
    let mut warned = false;
    // Block for one record, drain what else is queued, flush once per batch:
    // lines reach the file promptly without a syscall per line under load.
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(mut record) = next.take() {
            scrub(&mut record);
            line.clear();
            let written = serde_json::to_writer(&mut line, &record)
                .map_err(std::io::Error::other)
                .and_then(|()| {
                    line.push(b'\n');
                    out.write_all(&line)
                });
            if let Err(e) = written {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
                if !warned {
                    tracing::error!("cannot write the decision log: {e}");
                    warned = true;
                }
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Redact the free-text fields; done on the writer thread, off the request path.
fn scrub(record: &mut DecisionRecord) {
    for a in &mut record.attempts {
        if let Some(e) = &mut a.error {
            *e = redact(e);
        }
    }
    if let Some(d) = &mut record.denial {
        *d = redact(d);
    }
}

/// Replace anything that looks like a credential with `[redacted]`: words
/// after `Bearer`, `sk-`/`sk_`/`key-`/`AIza`-style keys, and long opaque tokens.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut after_bearer = false;
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let core = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_');
        let secret = !core.is_empty() && (after_bearer || looks_like_key(core));
        after_bearer = core.eq_ignore_ascii_case("bearer");
        if secret {
            out.push_str(&word.replace(core, "[redacted]"));
        } else {
            out.push_str(word);
        }
    }
    out
}

fn looks_like_key(word: &str) -> bool {
    const PREFIXES: [&str; 7] = ["sk-", "sk_", "pk-", "rk-", "key-", "AIza", "xai-"];
    if PREFIXES.iter().any(|p| word.starts_with(p)) && word.len() > 8 {
        return true;
    }
    // A long run of mixed letters and digits, like most API keys and tokens;
    // model names (`claude-3-5-sonnet-20241022`) are made of short runs.
    word.split(['-', '_']).any(|run| {
        run.len() >= 20
            && run.chars().all(|c| c.is_ascii_alphanumeric())
            && run.chars().any(|c| c.is_ascii_digit())
            && run.chars().any(|c| c.is_ascii_alphabetic())
    })
}

/// A new decision id: 12 hex digits of milliseconds then 8 random, so ids sort by time.
pub fn new_decision_id() -> String {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let r: u32 = rand::random();
    format!("{:012x}{r:08x}", ms & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer that blocks until released, to fill the channel; `entered`
    /// tells the test the writer thread is stuck in it.
    #[derive(Default)]
    struct Gate {
        state: Mutex<(bool, bool)>, // (entered, open)
        cv: std::sync::Condvar,
    }
    struct GatedWriter(Arc<Gate>, Shared);
    impl Write for GatedWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut s = self.0.state.lock().unwrap();
            s.0 = true;
            self.0.cv.notify_all();
            while !s.1 {
                s = self.0.cv.wait(s).unwrap();
            }
            drop(s);
            self.1.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(i: u32) -> DecisionRecord {
        DecisionRecord {
            decision_id: format!("d{i}"),
            policy_version: "abc123".into(),
            tenant: "acme".into(),
            feature: Some("support".into()),
            endpoint: "chat".into(),
            requested_model: Some("auto".into()),
            intent: Some("chat".into()),
            route: Some("chat".into()),
            removed: vec![Removed { constraint: "eu_only".into(), models: vec!["gpt-4o".into()] }],
            plan: vec!["mistral-large".into(), "claude-sonnet".into()],
            chosen_model: Some("claude-sonnet".into()),
            provider: Some("anthropic".into()),
            attempts: vec![
                Attempt {
                    model: "mistral-large".into(),
                    provider: "mistral".into(),
                    outcome: "401".into(),
                    retry: 0,
                    latency_ms: 12.5,
                    first_token_ms: None,
                    error: Some("Incorrect API key provided: sk-proj-abcdef1234567890. Check Bearer abc.def".into()),
                },
                Attempt {
                    model: "claude-sonnet".into(),
                    provider: "anthropic".into(),
                    outcome: "ok".into(),
                    retry: 0,
                    latency_ms: 300.0,
                    first_token_ms: Some(90.0),
                    error: None,
                },
            ],
            status: 200,
            input_tokens: 100,
            output_tokens: 20,
            estimated_cost_micros: 900,
            actual_cost_micros: 600,
            first_token_ms: Some(102.0),
            total_ms: 320.0,
            ..Default::default()
        }
    }

    #[test]
    fn one_json_line_per_request_without_secrets() {
        let buf = Shared::default();
        let (log, writer) = DecisionLog::start_with(Box::new(buf.clone()), 16, None).unwrap();
        log.log(record(1));
        log.log(record(2));
        drop(log);
        writer.join();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let l = &lines[0];
        assert_eq!(l["decision_id"], "d1");
        assert_eq!(l["removed"][0]["constraint"], "eu_only");
        assert_eq!(l["attempts"][1]["outcome"], "ok");
        assert!(!l["ts"].as_str().unwrap().is_empty());
        assert!(!text.contains("sk-proj"), "{text}");
        assert!(!text.contains("abc.def"), "{text}");
        assert!(
            text.contains("Incorrect API key provided: [redacted]. Check Bearer [redacted]"),
            "{text}"
        );
        // The record's fields are an allow-list: a new field must be added here
        // on purpose, after checking it cannot carry a secret or a prompt.
        let mut keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "actual_cost_micros",
                "attempts",
                "chosen_model",
                "decision_id",
                "denial",
                "endpoint",
                "estimated_cost_micros",
                "feature",
                "first_token_ms",
                "input_tokens",
                "intent",
                "output_tokens",
                "plan",
                "policy_version",
                "provider",
                "removed",
                "requested_model",
                "route",
                "status",
                "stream",
                "tenant",
                "total_ms",
                "ts"
            ]
        );
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let gate = Arc::new(Gate::default());
        let buf = Shared::default();
        let metrics = Arc::new(Metrics::new());
        let (log, writer) = DecisionLog::start_with(
            Box::new(GatedWriter(Arc::clone(&gate), buf.clone())),
            4,
            Some(Arc::clone(&metrics)),
        )
        .unwrap();
        // The first record gets the writer stuck in a slow write (a full disk, a slow pipe).
        log.log(record(0));
        let mut s = gate.state.lock().unwrap();
        while !s.0 {
            s = gate.cv.wait(s).unwrap();
        }
        drop(s);
        let started = std::time::Instant::now();
        for i in 1..=100 {
            log.log(record(i));
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "logging blocked"
        );
        // The channel holds 4; the rest are dropped and counted.
        assert_eq!(log.dropped(), 96);
        assert!(metrics
            .encode()
            .contains("routeplane_decision_log_dropped_total 96"));
        gate.state.lock().unwrap().1 = true;
        gate.cv.notify_all();
        drop(log);
        writer.join();
        let written = String::from_utf8(buf.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .count();
        assert_eq!(written, 5);
    }

    #[test]
    fn sinks_from_config() {
        assert_eq!(Sink::from_config(None), Sink::Off);
        assert_eq!(Sink::from_config(Some(Path::new("-"))), Sink::Stdout);
        assert_eq!(
            Sink::from_config(Some(Path::new("/etc/routeplane/-"))),
            Sink::Stdout
        );
        assert_eq!(
            Sink::from_config(Some(Path::new("d.jsonl"))),
            Sink::File("d.jsonl".into())
        );
        let (off, w) = DecisionLog::start(Sink::Off, 4, None).unwrap();
        off.log(record(1));
        assert!(!off.is_enabled());
        assert_eq!(off.dropped(), 0);
        w.join();
    }

    #[test]
    fn a_file_sink_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("logs/decisions.jsonl");
        for i in 0..2 {
            let (log, w) = DecisionLog::start(Sink::File(path.clone()), 4, None).unwrap();
            log.log(record(i));
            drop(log);
            w.join();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }

    /// Wait until `path` holds `lines` lines.
    fn wait_for_lines(path: &Path, lines: usize) {
        let started = Instant::now();
        while std::fs::read_to_string(path).map_or(0, |t| t.lines().count()) < lines {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "`{}` never had {lines} lines",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_rotated_or_deleted_log_file_is_created_again() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("decisions.jsonl");
        let check = Duration::from_millis(50);
        let file = LogFile::open(path.clone(), check).unwrap();
        let (log, w) = DecisionLog::start_with(Box::new(file), 16, None).unwrap();
        log.log(record(0));
        wait_for_lines(&path, 1);
        // logrotate: move the file away; the next lines go to a new file.
        let rotated = tmp.path().join("decisions.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        std::thread::sleep(check * 2);
        log.log(record(1));
        wait_for_lines(&path, 1);
        // Deleted: created again.
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(check * 2);
        log.log(record(2));
        wait_for_lines(&path, 1);
        // Truncated in place (`copytruncate`): appended to, from the start.
        std::fs::write(&path, "").unwrap();
        log.log(record(3));
        wait_for_lines(&path, 1);
        drop(log);
        w.join();
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            1
        );
        let now = std::fs::read_to_string(&path).unwrap();
        assert_eq!(now.lines().count(), 1, "{now}");
        assert!(now.starts_with('{'), "{now:?}");
    }

    #[test]
    fn redaction() {
        for (input, expect) in [
            ("plain error message", "plain error message"),
            ("invalid key sk-abc123def456ghi", "invalid key [redacted]"),
            (
                "Authorization: Bearer xyz",
                "Authorization: Bearer [redacted]",
            ),
            (
                "token `AIzaSyA1234567890abcdef` rejected",
                "token `[redacted]` rejected",
            ),
            (
                "rate limit 429 on model gpt-4o",
                "rate limit 429 on model gpt-4o",
            ),
            ("id 0123456789abcdef0123456789abcdef", "id [redacted]"),
            (
                "model claude-3-5-sonnet-20241022 overloaded",
                "model claude-3-5-sonnet-20241022 overloaded",
            ),
        ] {
            assert_eq!(redact(input), expect, "{input}");
        }
    }

    #[test]
    fn decision_ids_are_unique_and_sortable() {
        let a = new_decision_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_decision_id();
        assert_eq!(a.len(), 20);
        assert!(a < b);
    }
}
