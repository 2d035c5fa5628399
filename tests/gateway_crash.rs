//! `kill -9` of the real gateway under HTTP load, then a restart on the same
//! SQLite state file: every request that got a complete 200 has exactly one
//! ledger entry, no entry is counted twice, each budget counter equals the sum
//! of its ledger entries, and the restarted gateway serves and still enforces
//! the budget.
//!
//! Three tenants: `metered` (a large budget), `tiny` (a budget a handful of
//! requests exhaust) and `free`. The budget is per tenant and feature, and
//! only `metered` and `tiny` send a feature, so no budget applies to `free`:
//! its ledger entries go through the write-ahead spool (`src/state/spool.rs`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/binary.rs"]
mod binary;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const POLICY: &str = r#"
tenant {
  budget: number = 1000
}
provider mock {
  region us
}
model cheap {
  provider mock
  kind chat
  context 8k
  price in $1 out $10 per 1M
  tokenizer o200k
}
classify {
  chat otherwise
}
route chat {
  candidates [cheap]
  score 1.0 * price
}
protect {
  budget monthly per tenant and feature tenant.budget {
    warn at 50%
    block at 100%
  }
}
"#;

const CONFIG: &str = "listen: 127.0.0.1:0
policy: policy
state: { backend: sqlite, path: state/state.db }
providers:
  - name: mock
    kind: mock
    mock: { latency: 2ms, first_token: 1ms, usage: { completion_tokens: 8 }, chunks: 2 }
tenants:
  - id: metered
    key: sk-metered
    attrs: { budget: 1000 }
  - id: tiny
    key: sk-tiny
    attrs: { budget: 0.0005 }
  - id: free
    key: sk-free
";

const TENANTS: [&str; 4] = ["free", "metered", "free", "tiny"];

/// One request over a fresh connection: the status and the decision id when
/// the whole answer arrived (headers and the full `Content-Length` body, or
/// for a stream every chunk through `[DONE]` and the last chunk).
fn chat(addr: &str, tenant: &str, stream: bool) -> Option<(u16, String, String)> {
    let body = format!(
        r#"{{"model":"auto","max_tokens":10,"stream":{stream},"messages":[{{"role":"user","content":"crash"}}]}}"#
    );
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let feature = if tenant == "free" {
        ""
    } else {
        "x-routeplane-feature: paid\r\n"
    };
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer sk-{tenant}\r\n{feature}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8(out).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    // Anything cut off by the kill is not an answer.
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        if !(body.ends_with("0\r\n\r\n") && body.contains("data: [DONE]")) {
            return None;
        }
    } else {
        let len: usize = header("content-length")?.parse().ok()?;
        if body.len() != len {
            return None;
        }
    }
    Some((
        status,
        header("x-routeplane-decision").unwrap_or_default(),
        body.to_string(),
    ))
}

struct Ledger {
    /// Decision id -> (tenant, actual) of each of its entries.
    by_decision: HashMap<String, Vec<(String, u64)>>,
    rows: usize,
    /// Counter key -> spent.
    counters: BTreeMap<String, u64>,
}

fn read_ledger(db: &std::path::Path) -> Ledger {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut by_decision: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    let mut rows = 0;
    let mut stmt = conn
        .prepare("SELECT id, tenant, actual FROM ledger")
        .unwrap();
    let it = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .unwrap();
    for row in it {
        let (id, tenant, actual) = row.unwrap();
        rows += 1;
        // `<instance>/<decision id>/<attempt>`
        let parts: Vec<&str> = id.split('/').collect();
        assert_eq!(parts.len(), 3, "ledger id `{id}`");
        by_decision
            .entry(parts[1].to_string())
            .or_default()
            .push((tenant, actual as u64));
    }
    let mut counters = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT key, spent FROM counters").unwrap();
    let it = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .unwrap();
    for row in it {
        let (k, v) = row.unwrap();
        *counters.entry(k).or_default() += v as u64;
    }
    Ledger {
        by_decision,
        rows,
        counters,
    }
}

/// Every completed request has exactly one entry, of its tenant; each
/// counter equals the sum of its tenant's entries.
fn check_consistent(ledger: &Ledger, completed: &[(String, String)]) {
    for (tenant, decision) in completed {
        let entries = ledger.by_decision.get(decision).map_or(&[][..], |v| v);
        assert_eq!(
            entries.len(),
            1,
            "request `{decision}` of `{tenant}` answered 200 and has {} ledger entries",
            entries.len()
        );
        assert_eq!(&entries[0].0, tenant);
    }
    for (decision, entries) in &ledger.by_decision {
        assert_eq!(entries.len(), 1, "`{decision}` is in the ledger twice");
    }
    for tenant in ["metered", "tiny"] {
        let sum: u64 = ledger
            .by_decision
            .values()
            .flatten()
            .filter(|(t, _)| t == tenant)
            .map(|(_, a)| a)
            .sum();
        let spent: u64 = ledger
            .counters
            .iter()
            .filter(|(k, _)| k.ends_with(&format!("|tenant-feature|{tenant}/paid")))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(
            spent, sum,
            "the counter of `{tenant}` disagrees with its ledger"
        );
    }
    assert!(
        !ledger.counters.keys().any(|k| k.contains("free")),
        "no budget applies to `free`: {:?}",
        ledger.counters
    );
}

/// What the clients saw before the kill.
struct Load {
    /// (tenant, decision id) of every complete 200.
    completed: Vec<(String, String)>,
    statuses: BTreeMap<u16, usize>,
}

/// Load `server` from 8 clients until `answers` complete 200s, then SIGKILL it.
fn load_and_kill(server: &mut binary::Server, answers: usize, t0: Instant) -> Load {
    let addr = server.addr.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (stop, completed, statuses, ok, addr) = (
                stop.clone(),
                completed.clone(),
                statuses.clone(),
                ok.clone(),
                addr.clone(),
            );
            std::thread::spawn(move || {
                let mut i = w;
                while !stop.load(Ordering::SeqCst) {
                    let tenant = TENANTS[i % TENANTS.len()];
                    // One request in three streams: a stream is settled
                    // before its last chunk goes out.
                    let stream = i % 3 == 0;
                    i += 1;
                    let Some((status, decision, body)) = chat(&addr, tenant, stream) else {
                        continue;
                    };
                    *statuses.lock().unwrap().entry(status).or_default() += 1;
                    match status {
                        200 => {
                            assert!(!decision.is_empty(), "a 200 without a decision id");
                            completed
                                .lock()
                                .unwrap()
                                .push((tenant.to_string(), decision));
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        402 => assert_eq!(tenant, "tiny", "{body}"),
                        s => panic!("{tenant}: {s} {body}"),
                    }
                }
            })
        })
        .collect();
    // Mid-load: the spool's writer commits every 20 ms, so entries are
    // waiting in it at any moment.
    let base = ok.load(Ordering::SeqCst);
    while ok.load(Ordering::SeqCst) < base + answers {
        assert!(
            t0.elapsed() < Duration::from_secs(50),
            "too slow: {} answers\n{}",
            ok.load(Ordering::SeqCst),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    server.child.kill().unwrap(); // SIGKILL
    let status = server.child.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    let completed = completed.lock().unwrap().clone();
    let statuses = statuses.lock().unwrap().clone();
    Load {
        completed,
        statuses,
    }
}

/// Bytes waiting in the spool files (not the locks); a spool directory the
/// last process removed on its way out holds none.
fn spooled(dir: &std::path::Path) -> u64 {
    let db = std::path::absolute(dir.join("state/state.db")).unwrap();
    let Ok(files) = std::fs::read_dir(routeplane::state::sqlite::spool_dir_of(&db)) else {
        return 0;
    };
    files
        .flatten()
        .filter(|d| !d.file_name().to_string_lossy().ends_with(".lock"))
        .map(|d| d.metadata().unwrap().len())
        .sum()
}

#[test]
fn kill_9_under_load_then_restart_keeps_the_ledger_exact() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policy")).unwrap();
    std::fs::write(dir.path().join("policy/p.route"), POLICY).unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let db = dir.path().join("state/state.db");

    // 1. Killed under load, restarted: the restart replays the spool.
    let mut server = binary::Server::start(dir.path(), &config, &["--no-watch"], &[]);
    let first = load_and_kill(&mut server, 600, t0);
    drop(server);
    let spool1 = spooled(dir.path());
    let before = read_ledger(&db);
    let killed_at = t0.elapsed();
    let mut server = binary::Server::start(dir.path(), &config, &["--no-watch"], &[]);
    let restarted_at = t0.elapsed();
    let after = read_ledger(&db);
    check_consistent(&after, &first.completed);
    assert!(after.rows >= first.completed.len());
    assert!(after.rows >= before.rows);
    for tenant in ["free", "metered", "tiny"] {
        assert!(
            first.completed.iter().any(|(t, _)| t == tenant),
            "no answer for `{tenant}` before the kill: {:?}",
            first.statuses
        );
    }
    assert!(first.statuses.contains_key(&402), "`tiny` never ran out");
    let replayed = server
        .log()
        .lines()
        .filter(|l| l.contains("replayed"))
        .collect::<Vec<_>>()
        .join(" | ");

    // It serves again, and the budget still holds.
    let addr = server.addr.clone();
    let mut all = first.completed.clone();
    for tenant in ["free", "metered"] {
        let (status, decision, body) = chat(&addr, tenant, false).unwrap();
        assert_eq!(status, 200, "{body}");
        all.push((tenant.to_string(), decision));
    }
    let (status, _, body) = chat(&addr, "tiny", false).unwrap();
    assert_eq!(status, 402, "{body}");
    assert!(
        body.contains("the monthly budget of tenant `tiny` for feature `paid`"),
        "{body}"
    );

    // 2. Killed again; this time `routeplane usage` runs before any restart
    //    and must count what only the spool had.
    let second = load_and_kill(&mut server, 300, t0);
    drop(server);
    all.extend(second.completed.iter().cloned());
    let spool2 = spooled(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_routeplane"))
        .args(["usage", "--config", "gateway.yaml", "--format", "json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let usage: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let counted: u64 = usage["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["requests"].as_u64().unwrap())
        .sum();
    let last = read_ledger(&db);
    check_consistent(&last, &all);
    assert_eq!(counted, last.rows as u64, "usage: {usage}");
    assert_eq!(spooled(dir.path()), 0, "usage left the spool behind");

    // 3. And the gateway starts again on it.
    let server = binary::Server::start(dir.path(), &config, &["--no-watch"], &[]);
    let (status, _, body) = chat(&server.addr, "free", true).unwrap();
    assert_eq!(status, 200, "{body}");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    eprintln!(
        "gateway_crash: kill 1: {} answered ({:?}), {} ledger rows at the kill, {} after the restart, \
         {spool1} bytes in the spool; killed at {killed_at:?}, serving again at {restarted_at:?} ({replayed}); \
         kill 2: {} answered, {spool2} bytes in the spool, usage counted {counted} ({}); done at {:?}",
        first.completed.len(),
        first.statuses,
        before.rows,
        after.rows,
        second.completed.len(),
        stderr.trim(),
        t0.elapsed(),
    );
}
