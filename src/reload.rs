//! Hot reload: the gateway's current policy behind an [`ArcSwap`], replaced
//! only by a policy that compiled without errors.
//!
//! The request path calls [`PolicyStore::current`] once per request and keeps
//! the returned `Arc` for the whole request, so no decision mixes two versions
//! and requests in flight are unaffected by a swap.
//!
//! Reloads come from three places, all ending in [`PolicyStore::reload`]:
//! the file watcher ([`PolicyStore::watch`], debounced so that a `git checkout`
//! of ten files is one reload), SIGHUP ([`PolicyStore::on_sighup`], wired by
//! [`PolicyStore::listen_sighup`]) and tests. Reading and compiling run on the
//! blocking pool, never on the request path. Reloads are serialised so an
//! older build can never be swapped in after a newer one.
//!
//! What is built from the files is the caller's business (`T`): the gateway
//! builds the compiled policy plus the tenants resolved from its config; the
//! store only knows how to read inputs, keep the last good value and report.
//!
//! How `serve` wires it:
//!
//! ```ignore
//! let config = Arc::new(Config::load(path)?);
//! let metrics = Arc::new(Metrics::new());
//! let paths = Paths { policy: config.policy.clone(), config: Some(config.path.clone()) };
//! let store = PolicyStore::load(paths, served_builder(config.clone()), Some(metrics.clone()))?;
//! let _watch = store.watch(Debounce::default())?;   // keep alive while serving
//! let _hup = store.listen_sighup()?;
//! // per request, once: let served = store.current(); // Arc<Loaded<Served>>
//! // GET /admin/policy: store.admin_policy_json()
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::analysis::{self, Analysis};
use crate::compile::{self, CompiledPolicy, TenantView};
use crate::config::Config;
use crate::diag::Diagnostic;
use crate::load::{self, PolicyDir};
use crate::metrics::Metrics;
use crate::source::Sources;

/// Where the inputs of a build are read from.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The policy directory (or a single `.route` file).
    pub policy: PathBuf,
    /// The gateway's config file, if any; watched and re-read with the policy.
    pub config: Option<PathBuf>,
}

/// The config file as read for one build.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub text: String,
}

/// Everything a build reads, gathered before building so the build is pure.
#[derive(Debug)]
pub struct Inputs {
    pub policy: PolicyDir,
    pub config: Option<ConfigFile>,
}

/// What a successful build hands to the store.
#[derive(Debug)]
pub struct Built<T> {
    pub value: T,
    /// The policy version (`CompiledPolicy::version`, or [`sources_version`]).
    pub version: String,
    /// Rendered warnings, shown at `GET /admin/policy`.
    pub warnings: Vec<String>,
}

/// Why a build or reload failed: a one-line summary, each error on one line,
/// and the full report as `routeplane check` prints it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    pub summary: String,
    pub diagnostics: Vec<String>,
    /// The errors rendered with source snippets (no colour); empty when the
    /// failure has no location (an unreadable directory).
    pub rendered: String,
}

impl Failure {
    pub fn new(summary: impl Into<String>) -> Self {
        Failure {
            summary: summary.into(),
            diagnostics: Vec::new(),
            rendered: String::new(),
        }
    }

    /// A failure made of the errors among `diagnostics` (warnings are left out).
    pub fn from_diagnostics(sources: &Sources, diagnostics: &[Diagnostic]) -> Self {
        let errors: Vec<&Diagnostic> = diagnostics.iter().filter(|d| d.is_error()).collect();
        let summary = match errors.len() {
            1 => "the policy has 1 error".to_string(),
            n => format!("the policy has {n} errors"),
        };
        let human = crate::render::Human::new(false);
        // Each drawn report reads its whole file: draw the first few, list
        // the rest on one line each (the time grew with the square of the
        // count: 5,000 broken items took 13 s, 20,000 about 3 minutes).
        let mut rendered: String = errors
            .iter()
            .take(MAX_RENDERED)
            .map(|d| human.diagnostic(sources, d))
            .collect();
        if errors.len() > MAX_RENDERED {
            rendered.push_str(&format!(
                "... and {} more errors:\n",
                errors.len() - MAX_RENDERED
            ));
            for d in errors.iter().skip(MAX_RENDERED) {
                rendered.push_str(&render_one(sources, d));
                rendered.push('\n');
            }
        }
        Failure {
            summary,
            diagnostics: errors.into_iter().map(|d| render_one(sources, d)).collect(),
            rendered,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary)?;
        for d in &self.diagnostics {
            write!(f, "\n{d}")?;
        }
        Ok(())
    }
}

/// How many errors of a failed build are drawn with their source lines.
const MAX_RENDERED: usize = 20;

/// The function that turns inputs into the value the gateway serves.
pub type Builder<T> = dyn Fn(&Inputs) -> Result<Built<T>, Failure> + Send + Sync;

/// One loaded, valid policy as the request path sees it.
#[derive(Debug)]
pub struct Loaded<T> {
    pub value: T,
    pub version: String,
    pub loaded_at: SystemTime,
    /// The source files, in load order.
    pub files: Vec<String>,
    pub warnings: Vec<String>,
}

/// Why a reload ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Start,
    Watch,
    Sighup,
    /// `POST /admin/reload`.
    Admin,
    Manual,
}

/// The result of the last reload, for the admin endpoint.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReloadRecord {
    pub ok: bool,
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
    pub trigger: Trigger,
    /// The version now serving after this reload.
    pub version: String,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
}

/// Counters and the last outcomes, kept for `GET /admin/policy` and metrics.
#[derive(Clone, Debug, Default)]
pub struct ReloadStatus {
    pub succeeded: u64,
    pub failed: u64,
    pub last: Option<ReloadRecord>,
    /// The last failed reload, kept after later successes so it can still be read.
    pub last_failure: Option<ReloadRecord>,
}

/// The policy store: the current policy and how to replace it.
pub struct PolicyStore<T> {
    current: ArcSwap<Loaded<T>>,
    paths: Paths,
    builder: Arc<Builder<T>>,
    status: Mutex<ReloadStatus>,
    /// Serialises reloads (watcher, SIGHUP and manual may overlap).
    reloading: tokio::sync::Mutex<()>,
    metrics: Option<Arc<Metrics>>,
    /// The file watcher while a [`WatchHandle`] keeps it alive; every reload
    /// moves its watches to where the paths lead now.
    watching: Mutex<Weak<Watching>>,
    /// Run after each swap, before the reload reports success.
    after_swap: Mutex<Vec<Arc<dyn Fn() + Send + Sync>>>,
}

impl<T: Send + Sync + 'static> PolicyStore<T> {
    /// Read and build the initial policy; the gateway refuses to start without one.
    pub fn load(
        paths: Paths,
        builder: impl Fn(&Inputs) -> Result<Built<T>, Failure> + Send + Sync + 'static,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Arc<Self>, Failure> {
        let builder: Arc<Builder<T>> = Arc::new(builder);
        let started = Instant::now();
        let loaded = build_from_disk(&paths, &*builder)?;
        let record = ReloadRecord {
            ok: true,
            at: loaded.loaded_at,
            trigger: Trigger::Start,
            version: loaded.version.clone(),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            error: None,
        };
        if let Some(m) = &metrics {
            m.policy_loaded(&loaded.version, true);
        }
        let status = ReloadStatus {
            succeeded: 1,
            failed: 0,
            last: Some(record),
            last_failure: None,
        };
        Ok(Arc::new(PolicyStore {
            current: ArcSwap::from_pointee(loaded),
            paths,
            builder,
            status: Mutex::new(status),
            reloading: tokio::sync::Mutex::new(()),
            metrics,
            watching: Mutex::new(Weak::new()),
            after_swap: Mutex::new(Vec::new()),
        }))
    }

    /// The policy for one request: load once, keep the `Arc` until the response is done.
    pub fn current(&self) -> Arc<Loaded<T>> {
        self.current.load_full()
    }

    /// Run `hook` after every successful swap (and its record), on the
    /// blocking pool, before the reload reports success (the gateway builds
    /// its runtime there, so no request has to). Each gateway on this store
    /// adds its own.
    pub fn on_swap(&self, hook: Box<dyn Fn() + Send + Sync>) {
        if let Ok(mut hooks) = self.after_swap.lock() {
            hooks.push(Arc::from(hook));
        }
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Re-read and rebuild; swap only when the build succeeds, else keep the
    /// last good policy, log the diagnostics and record the failure.
    pub async fn reload(&self, trigger: Trigger) -> Result<String, Failure> {
        let _one_at_a_time = self.reloading.lock().await;
        let started = Instant::now();
        let paths = self.paths.clone();
        let builder = Arc::clone(&self.builder);
        let watching = self.watching.lock().ok().and_then(|w| w.upgrade());
        let built = tokio::task::spawn_blocking(move || {
            // Before reading, not after: an edit made after the watches
            // moved wakes the watcher again, one made before is read now.
            if let Some(watching) = watching {
                watching.refresh(&paths);
            }
            build_from_disk(&paths, &*builder)
        })
        .await
        .unwrap_or_else(|e| Err(Failure::new(format!("the policy build crashed: {e}"))));
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        match built {
            Ok(loaded) => {
                let version = loaded.version.clone();
                let warnings = loaded.warnings.len();
                let before = self.current.swap(Arc::new(loaded));
                tracing::info!(version = %version, ?trigger, duration_ms, warnings, "policy reloaded");
                // Said at every reload, not only at start, that an edit that
                // brought a warning is visible in the log too; the ones the
                // last version had already are counted, not repeated (a
                // reload a minute would log the same lines all day).
                let now = self.current();
                let new = fresh_warnings(&before.warnings, &now.warnings);
                for warning in &new {
                    tracing::warn!(version = %version, "{warning}");
                }
                if new.len() < now.warnings.len() {
                    tracing::info!(
                        version = %version,
                        "{} warning(s) of the last version still hold (GET /admin/policy lists them)",
                        now.warnings.len() - new.len()
                    );
                }
                self.record(ReloadRecord {
                    ok: true,
                    at: SystemTime::now(),
                    trigger,
                    version: version.clone(),
                    duration_ms,
                    error: None,
                });
                // After the record, with no await between it and the swap:
                // a reload dropped while the runtime builds is still recorded.
                let hooks = self
                    .after_swap
                    .lock()
                    .map(|h| h.clone())
                    .unwrap_or_default();
                if !hooks.is_empty() {
                    let ran = tokio::task::spawn_blocking(move || hooks.iter().for_each(|h| h()));
                    if let Err(e) = ran.await {
                        tracing::error!("building the runtime of the new policy crashed: {e}");
                    }
                }
                Ok(version)
            }
            Err(failure) => {
                let serving = self.current().version.clone();
                let report = if failure.rendered.is_empty() {
                    failure.to_string()
                } else {
                    format!("{}\n{}", failure.summary, failure.rendered)
                };
                tracing::error!(
                    serving = %serving,
                    ?trigger,
                    "policy reload refused, the last good policy keeps serving: {report}"
                );
                self.record(ReloadRecord {
                    ok: false,
                    at: SystemTime::now(),
                    trigger,
                    version: serving,
                    duration_ms,
                    error: Some(failure.clone()),
                });
                Err(failure)
            }
        }
    }

    /// What a SIGHUP does; the signal listener calls this, and so can tests.
    pub async fn on_sighup(self: &Arc<Self>) -> Result<String, Failure> {
        self.reload(Trigger::Sighup).await
    }

    /// Reload on every SIGHUP until the returned task is aborted.
    pub fn listen_sighup(self: &Arc<Self>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered before returning, so a SIGHUP sent right after is not lost
        // (and does not kill the process with the default action).
        let mut hup = signal(SignalKind::hangup())?;
        let store = Arc::clone(self);
        Ok(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // The outcome is logged and recorded by `reload`.
                let _ = store.on_sighup().await;
            }
        }))
    }

    /// Watch the policy directory and the config file; reload after a quiet period.
    ///
    /// Directories are watched, not files: editors that save by writing a
    /// temporary file and renaming it over the original replace the file's
    /// inode, which a watch on the file itself would lose. Every reload,
    /// whatever triggered it, resolves the paths again and moves the watches
    /// to where they lead now ([`Watching::refresh`]): a symlink swap
    /// (`current -> rel/v2`, a Kubernetes ConfigMap's `..data`) must not
    /// leave the watch on the old target.
    pub fn watch(self: &Arc<Self>, debounce: Debounce) -> Result<WatchHandle, notify::Error> {
        use notify::Watcher;
        let targets = Targets::new(&self.paths);
        let wake = Arc::new(tokio::sync::Notify::new());
        let wake_tx = Arc::clone(&wake);
        let current_targets = Arc::new(ArcSwap::from_pointee(targets.clone()));
        let filter = Arc::clone(&current_targets);
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if should_reload(&filter.load(), &res) {
                    wake_tx.notify_one();
                }
            })?;
        let dirs = targets.dirs();
        let essential = targets.essential_dirs();
        watch_each(&dirs, &essential, |dir| {
            watcher.watch(dir, notify::RecursiveMode::NonRecursive)
        })?;
        let watching = Arc::new(Watching {
            watcher: Mutex::new(watcher),
            targets: current_targets,
            dirs: Mutex::new(dirs),
        });
        if let Ok(mut w) = self.watching.lock() {
            *w = Arc::downgrade(&watching);
        }
        let store = Arc::clone(self);
        let task = tokio::spawn(async move {
            loop {
                wake.notified().await;
                debounce.settle(&wake).await;
                // The outcome is logged and recorded by `reload`.
                let _ = store.reload(Trigger::Watch).await;
            }
        });
        Ok(WatchHandle {
            _watching: watching,
            task,
        })
    }

    fn record(&self, record: ReloadRecord) {
        if let Some(m) = &self.metrics {
            m.policy_loaded(&record.version, record.ok);
        }
        if let Ok(mut s) = self.status.lock() {
            if record.ok {
                s.succeeded = s.succeeded.saturating_add(1);
            } else {
                s.failed = s.failed.saturating_add(1);
                s.last_failure = Some(record.clone());
            }
            s.last = Some(record);
        }
    }

    /// The body of `GET /admin/policy`.
    pub fn admin_policy_json(&self) -> serde_json::Value {
        let loaded = self.current();
        let status = self.status();
        serde_json::json!({
            "version": loaded.version,
            "loaded_at": rfc3339(loaded.loaded_at),
            "policy_path": self.paths.policy.display().to_string(),
            "config_path": self.paths.config.as_ref().map(|p| p.display().to_string()),
            "files": loaded.files,
            "warnings": loaded.warnings,
            "reloads": { "succeeded": status.succeeded, "failed": status.failed },
            "last_reload": status.last,
            "last_failure": status.last_failure,
        })
    }
}

/// How long the files must stay quiet before a reload, and the longest wait
/// under a continuous stream of changes.
#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_wait: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(150),
            max_wait: Duration::from_secs(2),
        }
    }
}

impl Debounce {
    /// Return once no change has arrived for `quiet`, or `max_wait` has passed.
    async fn settle(&self, wake: &tokio::sync::Notify) {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        loop {
            let quiet_until = (tokio::time::Instant::now() + self.quiet).min(deadline);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(quiet_until) => return,
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
    }
}

/// Keeps the watcher alive; dropping it stops watching.
pub struct WatchHandle {
    _watching: Arc<Watching>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The file watcher and what it watches now.
struct Watching {
    watcher: Mutex<notify::RecommendedWatcher>,
    /// Read by the watcher's callback for every event.
    targets: Arc<ArcSwap<Targets>>,
    /// The directories watched now.
    dirs: Mutex<Vec<PathBuf>>,
}

impl Watching {
    /// Resolve the paths again and watch where they lead now; stop watching
    /// directories no longer on the way (a ConfigMap's deleted `..v1`, the
    /// release a `current` symlink left).
    fn refresh(&self, paths: &Paths) {
        use notify::Watcher;
        let targets = Targets::new(paths);
        let wanted = targets.dirs();
        // First, so the events of newly watched directories are judged
        // against the targets they were watched for.
        self.targets.store(Arc::new(targets));
        let (Ok(mut watcher), Ok(mut dirs)) = (self.watcher.lock(), self.dirs.lock()) else {
            return;
        };
        for gone in dirs.iter().filter(|d| !wanted.contains(d)) {
            // Fails when the directory was deleted: its watch went with it.
            let _ = watcher.unwatch(gone);
        }
        // Every wanted directory again, not only new ones: a directory
        // deleted and created again (`rm -r` and a copy, a checkout) lost
        // its watch under the same path; watching a watched one is harmless.
        for dir in &wanted {
            if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                // A missing directory: the reload that follows says so, and
                // its re-creation is seen from its parent.
                tracing::debug!("cannot watch `{}`: {e}", dir.display());
            }
        }
        *dirs = wanted;
    }
}

/// Which paths matter to a reload, for one resolution of the configured
/// paths. Paths are canonical where they exist (every symlink followed),
/// matching what the watcher reports for the canonical directories it
/// watches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Targets {
    /// Where the policy path leads.
    policy: PathBuf,
    /// Whether that is one `.route` file rather than a directory of them.
    policy_is_file: bool,
    /// Where the config path leads.
    config: Option<PathBuf>,
    /// Every symlink met on the way to the policy or the config, in its
    /// canonical directory (`cm/gw.yaml`, `cm/..data`, `current`): replacing
    /// one moves a target, so an event on it is relevant and its directory
    /// is watched.
    links: Vec<PathBuf>,
}

impl Targets {
    fn new(paths: &Paths) -> Self {
        let (policy, mut links) = resolve(&paths.policy);
        let config = paths.config.as_deref().map(|c| {
            let (config, config_links) = resolve(c);
            links.extend(config_links);
            config
        });
        Targets {
            policy_is_file: policy.is_file(),
            policy,
            config,
            links,
        }
    }

    /// The policy directory and its parent (to see it deleted and created
    /// again), or a policy file's directory; the config file's directory;
    /// the directory of every symlink on the way; each once.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if !self.policy_is_file {
            dirs.push(self.policy.clone());
        }
        let parents = std::iter::once(&self.policy)
            .chain(&self.config)
            .chain(&self.links)
            .filter_map(|p| p.parent());
        for dir in parents {
            if !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_path_buf());
            }
        }
        dirs
    }

    /// The directories without whose events an edit would go unseen: the
    /// policy directory (or a policy file's), the config file's. The others
    /// in [`Targets::dirs`] (the policy directory's parent, the directories
    /// of symlinks on the way) only catch rarer changes: a deleted and
    /// re-created directory, a swapped link.
    fn essential_dirs(&self) -> Vec<PathBuf> {
        let policy_dir = if self.policy_is_file {
            self.policy.parent().map(Path::to_path_buf)
        } else {
            Some(self.policy.clone())
        };
        let config_dir = self
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        policy_dir.into_iter().chain(config_dir).collect()
    }

    fn is_relevant(&self, event: &notify::Event) -> bool {
        use notify::event::{AccessKind, AccessMode, EventKind};
        // The kernel's queue overflowed (inotify's `IN_Q_OVERFLOW`): events
        // were dropped and any of them may have been an edit. An event
        // without paths cannot be ruled out either.
        if event.need_rescan() || event.paths.is_empty() {
            return true;
        }
        match event.kind {
            // Our own reads of the files must not trigger another reload.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return false,
            _ => {}
        }
        event.paths.iter().any(|p| self.is_relevant_path(p))
    }

    fn is_relevant_path(&self, path: &Path) -> bool {
        if path == self.policy
            || self.config.as_deref() == Some(path)
            || self.links.iter().any(|l| l == path)
        {
            return true;
        }
        if self.policy_is_file || path.parent() != Some(self.policy.as_path()) {
            return false;
        }
        // Editor swap and backup files (`.x.route.swp`, `x.route~`) do not end in `.route`.
        // Kubernetes updates a ConfigMap mounted as the policy directory by
        // swapping its `..data` symlink.
        path.extension().is_some_and(|e| e == "route")
            || path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".."))
    }
}

/// Watch every directory in `dirs`. Only a failure on an `essential` one
/// fails the whole watch (the caller then says so and relies on SIGHUP);
/// any other is logged and skipped, so a directory on a symlink's way that
/// cannot be watched (no read permission, the inotify watch limit) does not
/// turn the watching of the policy and config off.
fn watch_each<E: std::fmt::Display>(
    dirs: &[PathBuf],
    essential: &[PathBuf],
    mut watch: impl FnMut(&Path) -> Result<(), E>,
) -> Result<(), E> {
    for dir in dirs {
        if let Err(e) = watch(dir) {
            if essential.contains(dir) {
                return Err(e);
            }
            tracing::warn!(
                "cannot watch `{}` ({e}): edits of the policy and config files are still seen, but a symlink swapped or a directory re-created there is not, until a reload (SIGHUP)",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Linux's limit on symlinks followed in one lookup (`MAXSYMLINKS`).
const MAX_SYMLINK_HOPS: usize = 40;

/// Where `path` leads, following every symlink on the way as the kernel
/// does, and the symlinks met, each in its (canonical) directory. Never
/// fails: from a component that does not exist on, the rest is joined as
/// written, so a target deleted and created again is still recognised; a
/// symlink loop stops after [`MAX_SYMLINK_HOPS`].
fn resolve(path: &Path) -> (PathBuf, Vec<PathBuf>) {
    use std::path::Component;
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(here) => here.join(path),
            Err(_) => return (path.to_path_buf(), Vec::new()),
        }
    };
    /// One step of the walk.
    enum Step {
        Root,
        Up,
        Into(OsString),
    }
    /// Push the steps of `path` so that the first is popped first.
    fn push_steps(rest: &mut Vec<Step>, path: &Path) {
        let steps: Vec<Step> = path
            .components()
            .filter_map(|c| match c {
                Component::Prefix(_) | Component::RootDir => Some(Step::Root),
                Component::CurDir => None,
                Component::ParentDir => Some(Step::Up),
                Component::Normal(name) => Some(Step::Into(name.to_os_string())),
            })
            .collect();
        rest.extend(steps.into_iter().rev());
    }
    let root = PathBuf::from(Component::RootDir.as_os_str());
    let mut rest = Vec::new();
    push_steps(&mut rest, &absolute);
    let mut real = root.clone();
    let mut links = Vec::new();
    while let Some(step) = rest.pop() {
        match step {
            Step::Root => real.clone_from(&root),
            Step::Up => {
                real.pop();
            }
            Step::Into(name) => {
                let next = real.join(name);
                match std::fs::read_link(&next) {
                    Ok(target) if links.len() < MAX_SYMLINK_HOPS => {
                        push_steps(&mut rest, &target);
                        links.push(next);
                    }
                    // Not a symlink, missing, or a loop: take it as it is.
                    _ => real = next,
                }
            }
        }
    }
    (real, links)
}

/// The watcher's decision for one notification: reload or not. When events
/// may have been lost (a queue overflow, an error from the watcher), reload:
/// a reload that finds nothing changed costs a build, a missed edit leaves an
/// old policy serving with nothing to say so.
fn should_reload(targets: &Targets, res: &notify::Result<notify::Event>) -> bool {
    match res {
        Ok(event) if event.need_rescan() => {
            tracing::warn!(
                "the file watcher lost events (its queue overflowed); reloading in case a policy or config file changed"
            );
            true
        }
        Ok(event) => targets.is_relevant(event),
        Err(e) => {
            tracing::warn!("file watcher error, reloading in case a change was missed: {e}");
            true
        }
    }
}

/// Read the inputs and build; the caller decides whether to swap.
fn build_from_disk<T>(paths: &Paths, builder: &Builder<T>) -> Result<Loaded<T>, Failure> {
    let policy = load::read_policy(&paths.policy).map_err(|e| Failure::new(e.to_string()))?;
    let config = match &paths.config {
        Some(path) => {
            let text = crate::config::read_text(path)
                .map_err(|e| Failure::new(format!("cannot read `{}`: {e}", path.display())))?;
            Some(ConfigFile {
                path: path.clone(),
                text,
            })
        }
        None => None,
    };
    let files = policy.sources.iter().map(|(_, f)| f.name.clone()).collect();
    let inputs = Inputs { policy, config };
    let built = builder(&inputs)?;
    Ok(Loaded {
        value: built.value,
        version: built.version,
        loaded_at: SystemTime::now(),
        files,
        warnings: built.warnings,
    })
}

/// A builder that only analyses the policy; used until the gateway plugs in
/// `compile` and its tenants, and by tests.
pub fn analysis_builder(inputs: &Inputs) -> Result<Built<Analysis>, Failure> {
    let sources = &inputs.policy.sources;
    let analysis = analysis::analyze(sources);
    if analysis.has_errors() {
        return Err(Failure::from_diagnostics(sources, &analysis.diagnostics));
    }
    let warnings = analysis
        .warnings()
        .map(|d| render_one(sources, d))
        .collect();
    Ok(Built {
        value: analysis,
        version: sources_version(sources),
        warnings,
    })
}

/// A builder for the real thing: the compiled policy, without the tenants.
pub fn compiled_builder(inputs: &Inputs) -> Result<Built<Arc<CompiledPolicy>>, Failure> {
    let sources = &inputs.policy.sources;
    // `compile` itself, split in two to keep the warnings for the admin endpoint.
    let analysis = analysis::analyze(sources);
    if analysis.has_errors() {
        return Err(Failure::from_diagnostics(sources, &analysis.diagnostics));
    }
    let warnings = analysis
        .warnings()
        .map(|d| render_one(sources, d))
        .collect();
    let compiled = compile::compile_policy(analysis.policy, sources.clone());
    Ok(Built {
        version: compiled.version().to_string(),
        value: Arc::new(compiled),
        warnings,
    })
}

/// The warnings of `now` that `before` did not have, in order.
fn fresh_warnings<'a>(before: &[String], now: &'a [String]) -> Vec<&'a String> {
    let seen: std::collections::HashSet<&str> = before.iter().map(String::as_str).collect();
    now.iter().filter(|w| !seen.contains(w.as_str())).collect()
}

/// What `routeplane serve` serves: one policy and one config, loaded and
/// checked together, so a reload never pairs a policy with tenants it rejects.
#[derive(Debug)]
pub struct Served {
    pub policy: Arc<CompiledPolicy>,
    pub config: Arc<Config>,
    /// Every configured tenant resolved against this policy, in config order.
    pub tenants: Arc<[TenantView]>,
}

/// A builder for [`Served`]: compiles the policy, parses the config file
/// (environment variables resolved now, so an unset one fails the reload,
/// not a request) and checks every tenant's attributes against the policy's
/// tenant schema. `started` is the config the process started with: fields
/// that need a restart (`listen`, `policy`, `state`, `decision_log`) must not
/// change.
pub fn served_builder(
    started: Arc<Config>,
) -> impl Fn(&Inputs) -> Result<Built<Served>, Failure> + Send + Sync + 'static {
    // The last config that built, kept so an unchanged file is not parsed
    // and checked again: a policy edit then costs no YAML (seconds for a
    // config of 100,000 tenants). The same text gives the same config: its
    // environment variables are the process's, which do not change.
    let last_config: Mutex<Arc<Config>> = Mutex::new(Arc::clone(&started));
    move |inputs: &Inputs| {
        let compiled = compiled_builder(inputs)?;
        let unchanged = |file: &ConfigFile| {
            last_config
                .lock()
                .ok()
                .filter(|c| c.path == file.path && c.text() == file.text)
                .map(|c| Arc::clone(&c))
        };
        let config = match &inputs.config {
            None => Arc::clone(&started),
            Some(file) => match unchanged(file) {
                Some(config) => config,
                None => {
                    let parsed = Arc::new(parse_config(file, &started)?);
                    if let Ok(mut last) = last_config.lock() {
                        *last = Arc::clone(&parsed);
                    }
                    parsed
                }
            },
        };
        let mut tenants = Vec::with_capacity(config.tenants.len());
        let mut problems = Vec::new();
        for t in &config.tenants {
            match compiled.value.tenant(&t.id, &t.attrs) {
                Ok(view) => tenants.push(view),
                Err(errs) => problems.extend(errs.into_iter().map(|e| {
                    config
                        // The engine's message already names the tenant.
                        .error_at(t.line, e)
                        .to_string()
                })),
            }
        }
        // Checked here, not only when the gateway builds its runtime: a
        // reload that cannot serve must fail as a reload (recorded, counted,
        // answered 422 by `POST /admin/reload`), not pass and then be
        // quietly ignored.
        let missing: Vec<String> = compiled
            .value
            .policy()
            .providers
            .iter()
            .filter(|p| !config.providers.iter().any(|c| c.name == p.name))
            .map(|p| {
                config
                    .error_at(
                        None,
                        format!(
                            "the policy's provider `{}` has no entry under `providers:`",
                            p.name
                        ),
                    )
                    .to_string()
            })
            .collect();
        let unmapped = unknown_model_ids(compiled.value.policy(), &config);
        if !unmapped.is_empty() {
            return Err(Failure {
                summary: "the config maps models the policy does not have".to_string(),
                rendered: unmapped.join("\n"),
                diagnostics: unmapped,
            });
        }
        if !missing.is_empty() {
            return Err(Failure {
                summary: "the policy names providers the config does not have".to_string(),
                rendered: missing.join("\n"),
                diagnostics: missing,
            });
        }
        if !problems.is_empty() {
            return Err(Failure {
                summary: "the tenants do not fit the policy's tenant schema".to_string(),
                rendered: problems.join("\n"),
                diagnostics: problems,
            });
        }
        // Before the swap, so no budgeted request waits for an encoding to load.
        crate::estimate::warm_up_for(compiled.value.policy());
        // The config's own warnings (a plain `key`) with the policy's, so a
        // reload shows and logs them as it does the policy's, in the same
        // form (`file:line: warning: ...`).
        let mut warnings: Vec<String> = config
            .warnings
            .iter()
            .cloned()
            .chain(unused_providers(compiled.value.policy(), &config))
            .collect();
        warnings.extend(compiled.warnings);
        Ok(Built {
            value: Served {
                policy: compiled.value,
                config,
                tenants: tenants.into(),
            },
            version: compiled.version,
            warnings,
        })
    }
}

/// Parse a config file for a reload (environment variables resolved now, so
/// an unset one fails the reload, not a request), refusing changes to what
/// only a restart can change.
fn parse_config(file: &ConfigFile, started: &Config) -> Result<Config, Failure> {
    let base = file
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let name = file.path.display().to_string();
    let parsed =
        Config::parse(&name, &file.text, &base, &|v| std::env::var(v).ok()).map_err(|e| {
            Failure {
                summary: format!("the config file `{name}` has errors"),
                diagnostics: e.0.iter().map(ToString::to_string).collect(),
                rendered: e.to_string(),
            }
        })?;
    // What `serve` opens once at start (the listener, the
    // policy path the store reads, the budget store, the
    // decision log) cannot follow a reload: accepting a change
    // to it would report "reloaded" while requests kept using
    // the old one. Everything else (providers, tenants, `admin`,
    // `max_body`) is read per request from the reloaded config.
    let mut restart = Vec::new();
    let mut needs_restart = |key: &str| {
        restart.push(parsed.error_at(
            parsed.line_of_key(key),
            format!("changing `{key}` needs a restart"),
        ));
    };
    if parsed.listen != started.listen {
        needs_restart("listen");
    }
    if !same_place(&parsed.policy, &started.policy) {
        needs_restart("policy");
    }
    // The retention is read once, by the thread that trims the ledger.
    if !same_state(&parsed.state, &started.state)
        || parsed.ledger_retention != started.ledger_retention
    {
        needs_restart("state");
    }
    if !same_sink(
        parsed.decision_log.as_deref(),
        started.decision_log.as_deref(),
    ) {
        needs_restart("decision_log");
    }
    if !restart.is_empty() {
        let errors = crate::config::ConfigErrors(restart);
        return Err(Failure {
            summary: format!("the config file `{name}` changed what only a restart can change"),
            diagnostics: errors.0.iter().map(ToString::to_string).collect(),
            rendered: errors.to_string(),
        });
    }
    Ok(parsed)
}

/// Whether two paths from the config name the same place: equal as
/// written, or once their directories are resolved (`../pol` from a config
/// read through a relative path, and the absolute path of that directory).
/// The last component is compared as written, not followed: a symlink there
/// is how deploys switch versions (`current -> rel/v2`), and the store goes
/// on reading the path it started with, so `current` rewritten as `rel/v2`
/// is a change.
fn same_place(a: &Path, b: &Path) -> bool {
    a == b || resolved_parent(a).is_some_and(|a| resolved_parent(b).is_some_and(|b| a == b))
}

/// `path` with its directory made canonical; `None` when that directory
/// does not exist (then only the text can be compared).
fn resolved_parent(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(dir).ok()?.join(name))
}

fn same_state(a: &crate::state::Backend, b: &crate::state::Backend) -> bool {
    use crate::state::Backend;
    match (a, b) {
        (Backend::Sqlite(a), Backend::Sqlite(b)) => same_place(a, b),
        _ => a == b,
    }
}

/// Whether two `decision_log:` values write to the same sink.
fn same_sink(a: Option<&Path>, b: Option<&Path>) -> bool {
    use crate::decision_log::Sink;
    match (Sink::from_config(a), Sink::from_config(b)) {
        (Sink::File(a), Sink::File(b)) => same_place(&a, &b),
        (a, b) => a == b,
    }
}

/// Entries of `providers:` that no model of the policy uses: a misspelt
/// name (`mistrall`) or a leftover would otherwise sit there unnoticed,
/// looking as if it mattered.
fn unused_providers(policy: &crate::ir::Policy, config: &Config) -> Vec<String> {
    let used: Vec<&str> = policy
        .models
        .iter()
        .filter_map(|m| policy.provider(m.provider))
        .map(|p| p.name.as_str())
        .collect();
    // A provider the policy declares without models must have its entry
    // (see `missing` above), and the policy's `unused-provider` lint
    // already says it has no models: no "delete it" here.
    let declared = |name: &str| policy.providers.iter().any(|p| p.name == name);
    config
        .providers
        .iter()
        .filter(|c| !used.contains(&c.name.as_str()) && !declared(&c.name))
        .map(|c| {
            let hint = match crate::diag::did_you_mean(&c.name, used.iter().copied()) {
                Some(m) => format!("did you mean `{m}`?"),
                None => "delete it if it is left over".to_string(),
            };
            config
                .error_at(
                    c.line,
                    format!(
                        "provider `{}` is not used by any model of the policy: {hint}",
                        c.name
                    ),
                )
                .as_warning()
        })
        .collect()
}

/// Entries of a provider's `models:` map that name no model of that provider
/// in the policy: a misspelt key would otherwise send the policy's name
/// upstream, untranslated, without a word.
fn unknown_model_ids(policy: &crate::ir::Policy, config: &Config) -> Vec<String> {
    let mut errors = Vec::new();
    for c in &config.providers {
        let ours: Vec<&str> = policy
            .models
            .iter()
            .filter(|m| {
                policy
                    .provider(m.provider)
                    .is_some_and(|p| p.name == c.name)
            })
            .map(|m| m.name.as_str())
            .collect();
        for key in c.model_ids.keys() {
            if ours.contains(&key.as_str()) {
                continue;
            }
            let hint = match crate::diag::did_you_mean(key, ours.iter().copied()) {
                Some(m) => format!("did you mean `{m}`?"),
                None if ours.is_empty() => "the policy has no model on this provider".to_string(),
                None => format!(
                    "its models are {}",
                    ours.iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            // The key's own line, else the provider's.
            let line = config.line_in_entry(c.line, key);
            errors.push(
                config
                    .error_at(
                        line.or(c.line),
                        format!(
                            "provider `{}` maps `{key}` under `models:`, but the policy has no model `{key}` on this provider: {hint}",
                            c.name
                        ),
                    )
                    .to_string(),
            );
        }
    }
    errors
}

/// A short hex hash of the file names and texts.
pub fn sources_version(sources: &Sources) -> String {
    let mut h = Sha256::new();
    for (_, f) in sources.iter() {
        h.update(f.name.as_bytes());
        h.update([0]);
        h.update(f.text.as_bytes());
        h.update([0]);
    }
    let digest = hex::encode(h.finalize());
    digest.chars().take(12).collect()
}

/// One diagnostic on one line: `file:line:col: error[route::code]: message (help: ...)`.
pub fn render_one(sources: &Sources, d: &Diagnostic) -> String {
    let severity = if d.is_error() { "error" } else { "warning" };
    let location = d
        .span()
        .map(|s| format!("{}: ", sources.location(s)))
        .unwrap_or_default();
    let mut out = format!("{location}{severity}[{}]: {}", d.code, d.message);
    if let Some(label) = d.labels.iter().find(|l| l.primary && !l.message.is_empty()) {
        out.push_str(&format!(" ({})", label.message));
    }
    if let Some(help) = &d.help {
        out.push_str(&format!("; help: {help}"));
    }
    out
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// `2026-11-25T20:43:04.123Z`, without pulling in a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reload_logs_only_the_warnings_its_last_version_did_not_have() {
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let before = w(&["a", "b"]);
        let now = w(&["b", "c", "a", "d"]);
        assert_eq!(super::fresh_warnings(&before, &now), [&now[1], &now[3]]);
        assert!(super::fresh_warnings(&now, &before).is_empty());
    }

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_failure_draws_the_first_errors_and_lists_the_rest() {
        // 20,000 broken items drew 20,000 reports, each reading the whole file.
        let mut sources = Sources::new();
        let file = sources.add("many.route", "model {\n}\n".repeat(2_000));
        let diagnostics: Vec<Diagnostic> = (0..2_000)
            .map(|i| {
                Diagnostic::error("syntax", format!("broken item {i}"))
                    .with_label(crate::source::Span::new(file, i * 10, i * 10 + 5), "here")
            })
            .collect();
        let f = Failure::from_diagnostics(&sources, &diagnostics);
        assert_eq!(f.summary, "the policy has 2000 errors");
        assert_eq!(f.diagnostics.len(), 2_000);
        assert_eq!(f.rendered.matches("error[route::syntax]").count(), 2_000);
        assert_eq!(f.rendered.matches("╭─[").count(), MAX_RENDERED);
        assert!(f.rendered.contains("... and 1980 more errors:\n"));
        assert!(f
            .rendered
            .contains("many.route:3999:1: error[route::syntax]: broken item 1999"));
    }

    /// A policy file is "valid" unless it contains `BROKEN`; the value is the text.
    fn fake_builder(
        calls: Arc<AtomicUsize>,
    ) -> impl Fn(&Inputs) -> Result<Built<String>, Failure> + Send + Sync {
        move |inputs: &Inputs| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut all = String::new();
            for (_, f) in inputs.policy.sources.iter() {
                all.push_str(&f.text);
            }
            if let Some(c) = &inputs.config {
                all.push_str(&c.text);
            }
            if all.contains("BROKEN") {
                return Err(Failure {
                    summary: "the policy has 1 error".into(),
                    diagnostics: vec!["a.route:1:1: error[route::syntax]: broken".into()],
                    rendered: String::new(),
                });
            }
            Ok(Built {
                value: all,
                version: sources_version(&inputs.policy.sources),
                warnings: vec![],
            })
        }
    }

    fn setup(files: &[(&str, &str)]) -> (tempfile::TempDir, Paths) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("policy");
        std::fs::create_dir(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let config = tmp.path().join("gateway.yaml");
        std::fs::write(&config, "tenants: []\n").unwrap();
        (
            tmp,
            Paths {
                policy: dir,
                config: Some(config),
            },
        )
    }

    #[tokio::test]
    async fn a_valid_policy_is_swapped_in() {
        let (_tmp, paths) = setup(&[("a.route", "one")]);
        let store = PolicyStore::load(paths.clone(), fake_builder(Arc::default()), None).unwrap();
        let before = store.current();
        std::fs::write(paths.policy.join("a.route"), "two").unwrap();
        let version = store.reload(Trigger::Manual).await.unwrap();
        let after = store.current();
        assert_ne!(before.version, after.version);
        assert_eq!(after.version, version);
        assert!(after.value.starts_with("two"));
        // A request that loaded before the swap still sees its own version.
        assert!(before.value.starts_with("one"));
        assert_eq!(store.status().succeeded, 2);
    }

    #[tokio::test]
    async fn an_invalid_policy_keeps_the_old_one_and_records_the_error() {
        let (_tmp, paths) = setup(&[("a.route", "one")]);
        let metrics = Arc::new(Metrics::new());
        let store = PolicyStore::load(
            paths.clone(),
            fake_builder(Arc::default()),
            Some(Arc::clone(&metrics)),
        )
        .unwrap();
        let good = store.current().version.clone();
        std::fs::write(paths.policy.join("a.route"), "BROKEN").unwrap();
        let err = store.reload(Trigger::Manual).await.unwrap_err();
        assert_eq!(err.diagnostics.len(), 1);
        assert_eq!(store.current().version, good);
        let status = store.status();
        assert_eq!((status.succeeded, status.failed), (1, 1));
        let admin = store.admin_policy_json();
        assert_eq!(admin["version"], good.as_str());
        assert_eq!(admin["last_reload"]["ok"], false);
        assert_eq!(
            admin["last_reload"]["error"]["diagnostics"][0],
            "a.route:1:1: error[route::syntax]: broken"
        );
        assert_eq!(admin["reloads"]["failed"], 1);
        let text = metrics.encode();
        assert!(
            text.contains("routeplane_policy_reloads_total{result=\"error\"} 1"),
            "{text}"
        );
        // A broken config file is refused the same way, and a missing directory too.
        std::fs::write(paths.policy.join("a.route"), "one").unwrap();
        std::fs::write(paths.config.as_ref().unwrap(), "BROKEN").unwrap();
        assert!(store.reload(Trigger::Manual).await.is_err());
        std::fs::remove_dir_all(&paths.policy).unwrap();
        let err = store.reload(Trigger::Manual).await.unwrap_err();
        assert!(err.summary.starts_with("cannot read"), "{err}");
        assert_eq!(store.current().version, good);
    }

    #[tokio::test]
    async fn the_initial_load_must_succeed() {
        let (_tmp, paths) = setup(&[("a.route", "BROKEN")]);
        assert!(PolicyStore::load(paths, fake_builder(Arc::default()), None).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_ten_writes_is_one_reload() {
        let (_tmp, paths) = setup(&[("a.route", "one")]);
        let calls = Arc::new(AtomicUsize::new(0));
        let store =
            PolicyStore::load(paths.clone(), fake_builder(Arc::clone(&calls)), None).unwrap();
        let _watch = store
            .watch(Debounce {
                quiet: Duration::from_millis(200),
                max_wait: Duration::from_secs(5),
            })
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Like a `git checkout`: ten files change at once, some replaced by rename.
        for i in 0..10 {
            let target = paths.policy.join(format!("f{i}.route"));
            if i % 2 == 0 {
                std::fs::write(&target, format!("file {i}")).unwrap();
            } else {
                let tmp = paths.policy.join(format!(".f{i}.route.tmp"));
                std::fs::write(&tmp, format!("file {i}")).unwrap();
                std::fs::rename(&tmp, &target).unwrap();
            }
        }
        wait_for(|| store.status().succeeded == 2).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "exactly one reload after the initial load"
        );
        assert_eq!(store.current().files.len(), 11);
        assert_eq!(store.status().last.unwrap().trigger, Trigger::Watch);

        // Files that are not `.route` (editor swap files, notes) do not reload.
        std::fs::write(paths.policy.join(".a.route.swp"), "x").unwrap();
        std::fs::write(paths.policy.join("notes.txt"), "x").unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // The config file is watched too, including a save by rename.
        let config = paths.config.clone().unwrap();
        let tmp = config.with_extension("yaml.tmp");
        std::fs::write(&tmp, "tenants: [x]\n").unwrap();
        std::fs::rename(&tmp, &config).unwrap();
        wait_for(|| store.status().succeeded == 3).await;
        assert!(store.current().value.ends_with("tenants: [x]\n"));
    }

    #[test]
    fn only_an_unwatchable_policy_or_config_directory_turns_the_watch_off() {
        let targets = Targets {
            policy: PathBuf::from("/srv/releases/v2/policy"),
            policy_is_file: false,
            config: Some(PathBuf::from("/etc/gw/gw.yaml")),
            links: vec![PathBuf::from("/srv/current")],
        };
        let dirs = targets.dirs();
        let essential = targets.essential_dirs();
        assert_eq!(
            essential,
            [
                PathBuf::from("/srv/releases/v2/policy"),
                PathBuf::from("/etc/gw")
            ]
        );
        let failing = |bad: &'static [&'static str]| {
            move |d: &Path| -> Result<(), String> {
                if bad.iter().any(|b| d == Path::new(b)) {
                    Err(format!("cannot watch {}", d.display()))
                } else {
                    Ok(())
                }
            }
        };
        // The link's directory and the policy's parent fail: the rest is still watched.
        let mut watched = Vec::new();
        let fail_others = failing(&["/srv", "/srv/releases/v2"]);
        watch_each(&dirs, &essential, |d| {
            watched.push(d.to_path_buf());
            fail_others(d)
        })
        .unwrap();
        assert_eq!(watched, dirs, "every directory is tried");
        let err = watch_each(&dirs, &essential, failing(&["/etc/gw"])).unwrap_err();
        assert_eq!(err, "cannot watch /etc/gw");
        let err = watch_each(&dirs, &essential, failing(&["/srv/releases/v2/policy"])).unwrap_err();
        assert_eq!(err, "cannot watch /srv/releases/v2/policy");
        // A policy file: its directory is the essential one.
        let file = Targets {
            policy: PathBuf::from("/srv/policy.route"),
            policy_is_file: true,
            config: None,
            links: Vec::new(),
        };
        assert_eq!(file.essential_dirs(), [PathBuf::from("/srv")]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_policy_directory_deleted_and_created_again_is_still_watched() {
        let (_tmp, paths) = setup(&[("a.route", "one")]);
        let store = PolicyStore::load(paths.clone(), fake_builder(Arc::default()), None).unwrap();
        let _watch = store.watch(Debounce::default()).unwrap();
        std::fs::remove_dir_all(&paths.policy).unwrap();
        wait_for(|| store.status().failed == 1).await;
        assert!(
            store.current().value.starts_with("one"),
            "the last good policy keeps serving"
        );
        std::fs::create_dir(&paths.policy).unwrap();
        std::fs::write(paths.policy.join("a.route"), "two").unwrap();
        wait_for(|| store.current().value.starts_with("two")).await;
        // And the new directory's files are watched.
        std::fs::write(paths.policy.join("a.route"), "three").unwrap();
        wait_for(|| store.current().value.starts_with("three")).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sighup_reloads() {
        let (_tmp, paths) = setup(&[("a.route", "one")]);
        let store = PolicyStore::load(paths.clone(), fake_builder(Arc::default()), None).unwrap();
        std::fs::write(paths.policy.join("a.route"), "two").unwrap();
        store.on_sighup().await.unwrap();
        assert!(store.current().value.starts_with("two"));
        assert_eq!(store.status().last.unwrap().trigger, Trigger::Sighup);

        // The real signal, sent to this test process.
        let _listener = store.listen_sighup().unwrap();
        std::fs::write(paths.policy.join("a.route"), "three").unwrap();
        let status = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(std::process::id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        wait_for(|| store.current().value.starts_with("three")).await;
    }

    async fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn the_analysis_builder_refuses_syntax_errors() {
        let mut sources = Sources::new();
        sources.add("a.route", "model {{{ nonsense");
        let inputs = Inputs {
            policy: PolicyDir {
                root: PathBuf::from("."),
                sources,
            },
            config: None,
        };
        let err = analysis_builder(&inputs).unwrap_err();
        assert!(!err.diagnostics.is_empty());
        assert!(err.rendered.contains("a.route"), "{}", err.rendered);
        assert!(err.diagnostics[0].starts_with("a.route:1:"), "{err}");
    }

    /// The SaaS example policy with a config whose tenant attributes it checks.
    fn saas(dir: &Path, plan: &str, listen: &str) {
        let policy = dir.join("policy");
        std::fs::create_dir_all(&policy).unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/saas");
        for entry in std::fs::read_dir(example).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, policy.join(path.file_name().unwrap())).unwrap();
        }
        let providers: String = ["openai", "anthropic", "mistral", "google", "deepseek"]
            .iter()
            .map(|p| format!("  - {{ name: {p}, kind: mock }}\n"))
            .collect();
        std::fs::write(
            dir.join("gateway.yaml"),
            format!(
                "listen: {listen}\npolicy: policy\nproviders:\n{providers}tenants:\n  - id: t1\n    key: sk-t1\n    attrs: {{ plan: {plan} }}\n"
            ),
        )
        .unwrap();
    }

    #[test]
    fn a_provider_the_policy_declares_without_models_is_not_called_unused_in_the_config() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("policy")).unwrap();
        std::fs::write(
            dir.join("policy/main.route"),
            "provider mock { region us }\nprovider spare { region us }\nmodel m { provider mock kind chat }\nclassify { chat otherwise }\nroute chat { candidates [m] }\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("gateway.yaml"),
            "listen: 127.0.0.1:0\npolicy: policy\nproviders:\n  - { name: mock, kind: mock }\n  - { name: spare, kind: mock }\n  - { name: extra, kind: mock }\n",
        )
        .unwrap();
        let config = Arc::new(Config::load(&dir.join("gateway.yaml")).unwrap());
        let paths = Paths {
            policy: config.policy.clone(),
            config: Some(config.path.clone()),
        };
        let store = match PolicyStore::load(paths, served_builder(Arc::clone(&config)), None) {
            Ok(s) => s,
            Err(e) => panic!("{e}\n{}", e.rendered),
        };
        let warnings = store.current().warnings.join("\n");
        // The config must have `spare` (without it the build fails), so it
        // is not called unused; the policy's lint speaks for it.
        assert!(
            warnings.contains("provider `spare` has no models"),
            "{warnings}"
        );
        assert!(
            !warnings.contains("provider `spare` is not used"),
            "{warnings}"
        );
        assert!(
            warnings.contains("provider `extra` is not used"),
            "{warnings}"
        );
    }

    /// The store `serve` makes for [`saas`] with the `pro` plan.
    fn saas_store(dir: &Path) -> (Arc<Config>, Arc<PolicyStore<Served>>) {
        saas(dir, "pro", "127.0.0.1:9999");
        let config = Arc::new(Config::load(&dir.join("gateway.yaml")).unwrap());
        let paths = Paths {
            policy: config.policy.clone(),
            config: Some(config.path.clone()),
        };
        match PolicyStore::load(paths, served_builder(Arc::clone(&config)), None) {
            Ok(s) => (config, s),
            Err(e) => panic!("{e}\n{}", e.rendered),
        }
    }

    #[tokio::test]
    async fn an_unchanged_config_is_not_parsed_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (config, store) = saas_store(tmp.path());
        // At start: the config `serve` parsed already.
        assert!(Arc::ptr_eq(&store.current().value.config, &config));
        // A policy edit: the same config.
        let policy = tmp.path().join("policy/extra.route");
        std::fs::write(&policy, "// an edit\n").unwrap();
        store.reload(Trigger::Manual).await.unwrap();
        assert!(Arc::ptr_eq(&store.current().value.config, &config));
        // A config edit is read; then it is the one kept.
        let file = tmp.path().join("gateway.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{text}# an edit\n")).unwrap();
        store.reload(Trigger::Manual).await.unwrap();
        let edited = store.current().value.config.clone();
        assert!(!Arc::ptr_eq(&edited, &config));
        assert!(edited.text().ends_with("# an edit\n"));
        std::fs::write(&policy, "// another edit\n").unwrap();
        store.reload(Trigger::Manual).await.unwrap();
        assert!(Arc::ptr_eq(&store.current().value.config, &edited));
    }

    #[tokio::test]
    async fn the_served_builder_checks_policy_config_and_tenants_together() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, store) = saas_store(tmp.path());
        let first = store.current();
        assert_eq!(first.value.tenants.len(), 1);
        assert_eq!(first.version, first.value.policy.version());

        // A plan the tenant schema does not know: refused, located in the config.
        saas(tmp.path(), "platinum", "127.0.0.1:9999");
        let err = store.reload(Trigger::Manual).await.unwrap_err();
        assert!(
            err.diagnostics
                .iter()
                .any(|d| d.contains("gateway.yaml:") && d.contains("tenant `t1`")),
            "{err}"
        );
        // Moving the listener needs a restart.
        saas(tmp.path(), "pro", "127.0.0.1:9998");
        let err = store.reload(Trigger::Manual).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("gateway.yaml:1: changing `listen` needs a restart"),
            "{err}"
        );
        // A broken policy file: refused with the rendered report.
        saas(tmp.path(), "pro", "127.0.0.1:9999");
        std::fs::write(
            tmp.path().join("policy/zz.route"),
            "route chat { candidates [nope] }\n",
        )
        .unwrap();
        let err = store.reload(Trigger::Manual).await.unwrap_err();
        assert!(!err.rendered.is_empty(), "{err}");
        assert!(Arc::ptr_eq(&store.current(), &first));
        // Fixed: swapped.
        std::fs::remove_file(tmp.path().join("policy/zz.route")).unwrap();
        std::fs::write(
            tmp.path().join("policy/zz.route"),
            "// a comment changes the version\n",
        )
        .unwrap();
        let v = store.reload(Trigger::Manual).await.unwrap();
        assert_ne!(v, first.version);
        // A misspelt key under a provider's `models:` would send the policy's
        // name upstream untranslated: refused, at its line, with the fix.
        let yaml = tmp.path().join("gateway.yaml");
        let text = std::fs::read_to_string(&yaml).unwrap().replace(
            "  - { name: openai, kind: mock }\n",
            "  - name: openai\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n    models:\n      gpt-4o-mini: mini-deployment\n      gpt-4o-minni: my-deployment\n",
        );
        std::fs::write(&yaml, &text).unwrap();
        let err = store.reload(Trigger::Manual).await.unwrap_err();
        let line = text
            .lines()
            .position(|l| l.contains("gpt-4o-minni"))
            .unwrap()
            + 1;
        assert_eq!(
            err.diagnostics,
            [format!("{}:{line}: provider `openai` maps `gpt-4o-minni` under `models:`, but the policy has no model `gpt-4o-minni` on this provider: did you mean `gpt-4o-mini`?", yaml.display())],
            "{err}"
        );
        assert_eq!(store.current().version, v);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_never_see_a_broken_or_torn_policy_through_50_reloads() {
        let (_tmp, paths) = setup(&[("a.route", "v0")]);
        let store = PolicyStore::load(paths.clone(), fake_builder(Arc::default()), None).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for _ in 0..4 {
            let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
            readers.push(tokio::spawn(async move {
                let mut seen = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let p = store.current();
                    // One load per request: value and version always belong together.
                    assert!(!p.value.contains("BROKEN"));
                    assert_eq!(p.files.len(), 1);
                    seen += 1;
                    tokio::task::yield_now().await;
                }
                seen
            }));
        }
        let (mut ok, mut refused) = (0, 0);
        for i in 1..=50 {
            let text = if i % 3 == 0 {
                format!("BROKEN {i}")
            } else {
                format!("v{i}")
            };
            std::fs::write(paths.policy.join("a.route"), &text).unwrap();
            match store.reload(Trigger::Manual).await {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.await.unwrap() > 0);
        }
        assert_eq!((ok, refused), (34, 16));
        assert_eq!(store.status().failed, 16);
        assert!(store.current().value.starts_with("v50"));
    }

    #[test]
    fn which_paths_trigger_a_reload() {
        let targets = Targets {
            policy: PathBuf::from("/p"),
            policy_is_file: false,
            config: Some(PathBuf::from("/etc/rp/..v1/gateway.yaml")),
            links: vec![
                PathBuf::from("/etc/rp/gateway.yaml"),
                PathBuf::from("/etc/rp/..data"),
            ],
        };
        for (path, expect) in [
            ("/p/a.route", true),
            ("/p", true),
            ("/p/..data", true),
            ("/p/..2026_11_25_21_00_00.123", true),
            ("/p/.a.route.swp", false),
            ("/p/a.route~", false),
            ("/p/4913", false),
            ("/p/notes.md", false),
            ("/p/sub/a.route", false),
            ("/etc/rp/..v1/gateway.yaml", true),
            ("/etc/rp/..v1/other.yaml", false),
            // A symlink on the way to the config: replaced, the config moves.
            ("/etc/rp/gateway.yaml", true),
            ("/etc/rp/..data", true),
            ("/etc/rp/..data_tmp", false),
            ("/etc/rp/other.yaml", false),
            ("/elsewhere/a.route", false),
        ] {
            assert_eq!(targets.is_relevant_path(Path::new(path)), expect, "{path}");
        }
        let single = Targets {
            policy: PathBuf::from("/p/main.route"),
            policy_is_file: true,
            ..Targets::default()
        };
        assert!(single.is_relevant_path(Path::new("/p/main.route")));
        assert!(!single.is_relevant_path(Path::new("/p/other.route")));
    }

    #[test]
    fn targets_follow_every_symlink_on_the_way_and_watch_their_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        // A mounted ConfigMap: `cm/gw.yaml -> ..data/gw.yaml`, `..data -> ..v1`.
        std::fs::create_dir_all(root.join("cm/..v1")).unwrap();
        std::fs::write(root.join("cm/..v1/gw.yaml"), "").unwrap();
        std::os::unix::fs::symlink("..v1", root.join("cm/..data")).unwrap();
        std::os::unix::fs::symlink("..data/gw.yaml", root.join("cm/gw.yaml")).unwrap();
        // A release symlink: `current -> rel/v1`.
        std::fs::create_dir_all(root.join("rel/v1")).unwrap();
        std::os::unix::fs::symlink("rel/v1", root.join("current")).unwrap();
        let paths = Paths {
            policy: root.join("cm/../current"),
            config: Some(root.join("cm/gw.yaml")),
        };
        let targets = Targets::new(&paths);
        assert_eq!(
            targets,
            Targets {
                policy: root.join("rel/v1"),
                policy_is_file: false,
                config: Some(root.join("cm/..v1/gw.yaml")),
                links: vec![
                    root.join("current"),
                    root.join("cm/gw.yaml"),
                    root.join("cm/..data"),
                ],
            }
        );
        assert_eq!(
            targets.dirs(),
            [
                root.join("rel/v1"),
                root.join("rel"),
                root.join("cm/..v1"),
                root.clone(),
                root.join("cm"),
            ]
        );
        // A missing path is joined as written; a loop stops.
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(resolve(&root.join("gone/../x/y")).0, root.join("x/y"));
        let (looped, links) = resolve(&root.join("loop"));
        assert_eq!(looped, root.join("loop"));
        assert_eq!(links.len(), MAX_SYMLINK_HOPS);
    }

    #[test]
    fn config_paths_are_the_same_place_when_their_directories_resolve_alike() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        for dir in ["conf", "pol", "rel/v1", "rel/v2"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::os::unix::fs::symlink("rel/v1", root.join("current")).unwrap();
        std::os::unix::fs::symlink("conf", root.join("conf-link")).unwrap();
        for (a, b, same) in [
            // `../pol` from the config's directory, and the absolute path.
            (root.join("conf/../pol"), root.join("pol"), true),
            (root.join("conf-link/../pol"), root.join("pol"), true),
            (
                root.join("conf-link/state.db"),
                root.join("conf/state.db"),
                true,
            ),
            (root.join("pol"), root.join("conf"), false),
            // The last component is not followed: the store reads `current`.
            (root.join("current"), root.join("rel/v1"), false),
            (root.join("current"), root.join("current"), true),
            // A directory that does not exist: only the text can tell.
            (root.join("gone/x"), root.join("gone/x"), true),
            (root.join("gone/x"), root.join("gone/../gone/x"), false),
        ] {
            assert_eq!(same_place(&a, &b), same, "{} {}", a.display(), b.display());
        }
        // A relative path against the working directory.
        let here = std::env::current_dir().unwrap();
        assert!(same_place(
            Path::new("Cargo.toml"),
            &here.join("Cargo.toml")
        ));
        assert!(same_sink(
            Some(&root.join("-")),
            Some(Path::new("/elsewhere/-"))
        ));
        assert!(!same_sink(Some(&root.join("-")), None));
        assert!(!same_sink(
            Some(&root.join("a.jsonl")),
            Some(&root.join("b.jsonl"))
        ));
    }

    #[test]
    fn lost_events_and_watcher_errors_reload() {
        use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, Flag};
        use notify::Event;
        let targets = Targets {
            policy: PathBuf::from("/p"),
            ..Targets::default()
        };
        let at = |kind: EventKind, path: &str| Event::new(kind).add_path(PathBuf::from(path));
        for (what, event, expect) in [
            // inotify's queue overflow: no paths, the rescan flag.
            (
                "overflow",
                Event::new(EventKind::Other).set_flag(Flag::Rescan),
                true,
            ),
            ("no paths", Event::new(EventKind::Any), true),
            (
                "a policy file",
                at(EventKind::Create(CreateKind::File), "/p/a.route"),
                true,
            ),
            (
                "another file",
                at(EventKind::Create(CreateKind::File), "/p/a.txt"),
                false,
            ),
            (
                "our own read",
                at(
                    EventKind::Access(AccessKind::Open(AccessMode::Any)),
                    "/p/a.route",
                ),
                false,
            ),
        ] {
            assert_eq!(targets.is_relevant(&event), expect, "{what}");
            assert_eq!(should_reload(&targets, &Ok(event)), expect, "{what}");
        }
        let error = notify::Error::generic("inotify read failed");
        assert!(should_reload(&targets, &Err(error)));
    }

    #[test]
    fn rfc3339_formats_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_639_384_123);
        assert_eq!(rfc3339(t), "2026-11-25T20:43:04.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
