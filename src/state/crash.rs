//! `kill -9` in the middle of a load: the SQLite ledger keeps every entry
//! that was acknowledged, counts none twice, and the counters agree with it.
//!
//! The test binary runs itself as the child (`ROUTEPLANE_CRASH_CHILD` set):
//! four threads reserve and settle as fast as they can and print `ack <id>`
//! after each settle returned. The parent kills it after a few hundred acks,
//! twice (the second run replays the same ids, as a restarted gateway
//! retrying its work would), then checks the file.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use super::sqlite::SqliteStore;
use super::*;

const ENV: &str = "ROUTEPLANE_CRASH_CHILD";
const ACTUAL: Micros = 7;

fn charges() -> Vec<Charge> {
    vec![
        Charge {
            counter: Counter {
                key: "monthly|tenant|t".into(),
                period_start: 0,
            },
            limit: u64::MAX / 4,
        },
        Charge {
            counter: Counter {
                key: "monthly|feature|f".into(),
                period_start: 0,
            },
            limit: u64::MAX / 4,
        },
    ]
}

#[test]
fn crash_child() {
    let Ok(path) = std::env::var(ENV) else {
        return; // Only does something when run as the child.
    };
    let store = std::sync::Arc::new(SqliteStore::open(std::path::Path::new(&path)).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    let id = format!("{t}-{i}");
                    let r = store.reserve(&id, &charges(), 10, 0, 60_000).unwrap();
                    let e = LedgerEntry {
                        id: id.clone(),
                        ts_ms: 1,
                        tenant: "t".into(),
                        feature: Some("f".into()),
                        model: "m".into(),
                        input_tokens: 1,
                        output_tokens: 1,
                        estimated: 10,
                        actual: ACTUAL,
                    };
                    store.settle(&r, &e).unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {id}").unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Run the child until `acks` acknowledgements, kill -9 it, return every id it acknowledged.
fn run_and_kill(path: &std::path::Path, acks: usize) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "state::crash::crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    while acked.len() < acks {
        let line = lines.next().expect("the child stopped early").unwrap();
        if let Some(id) = line.strip_prefix("ack ") {
            acked.push(id.to_string());
        }
    }
    child.kill().unwrap(); // SIGKILL
                           // Whatever it acknowledged before dying is still in the pipe.
    for line in lines.map_while(Result::ok) {
        if let Some(id) = line.strip_prefix("ack ") {
            acked.push(id.to_string());
        }
    }
    child.wait().unwrap();
    acked
}

#[test]
fn sqlite_ledger_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let mut acked: HashSet<String> = run_and_kill(&path, 300).into_iter().collect();
    acked.extend(run_and_kill(&path, 600));

    let store = SqliteStore::open(&path).unwrap();
    let ledger = store.ledger(None).unwrap();
    let ids: HashSet<&str> = ledger.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), ledger.len(), "an entry is recorded twice");
    for id in &acked {
        assert!(
            ids.contains(id.as_str()),
            "acknowledged entry `{id}` was lost"
        );
    }
    // The counters agree with the ledger: nothing counted twice, nothing missing.
    for c in charges() {
        let b = store.balance(&c.counter, 0).unwrap();
        assert_eq!(b.spent, ACTUAL * ledger.len() as u64, "{}", c.counter.key);
        // Reservations the killed child left behind expire by themselves.
        assert_eq!(store.balance(&c.counter, 60_000).unwrap().reserved, 0);
    }
    // The second run replayed the first run's ids: they are in the ledger once.
    assert!(acked.len() >= 600, "{} acknowledged", acked.len());
}

const SPOOL_ENV: &str = "ROUTEPLANE_SPOOL_CRASH_CHILD";

/// The child of `spooled_entries_survive_kill_9`: requests no budget applies
/// to, settled through [`crate::budget::Budgets`] (so through the spool and
/// its background writer), `ack <id>` after each settle returned.
#[test]
fn spool_crash_child() {
    let Ok(path) = std::env::var(SPOOL_ENV) else {
        return;
    };
    let store = std::sync::Arc::new(SqliteStore::open(std::path::Path::new(&path)).unwrap());
    let budgets = std::sync::Arc::new(crate::budget::Budgets::new(store));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let budgets = budgets.clone();
            std::thread::spawn(move || {
                let none = crate::budget::Check::default();
                for i in 0.. {
                    let r = budgets
                        .reserve(&none, &format!("{t}-{i}/0"), 10, 1)
                        .unwrap()
                        .unwrap();
                    assert!(r.counters.is_empty());
                    let e = LedgerEntry {
                        id: r.id.clone(),
                        ts_ms: 1,
                        tenant: "free".into(),
                        feature: None,
                        model: "m".into(),
                        input_tokens: 1,
                        output_tokens: 1,
                        estimated: 10,
                        actual: ACTUAL,
                    };
                    budgets.settle(&r, e).unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {}", r.id).unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn run_spool_child_and_kill(path: &std::path::Path, acks: usize) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "state::crash::spool_crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SPOOL_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    while acked.len() < acks {
        let line = lines.next().expect("the child stopped early").unwrap();
        if let Some(id) = line.strip_prefix("ack ") {
            acked.push(id.to_string());
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no final commit
    for line in lines.map_while(Result::ok) {
        if let Some(id) = line.strip_prefix("ack ") {
            acked.push(id.to_string());
        }
    }
    child.wait().unwrap();
    acked
}

#[test]
fn spooled_entries_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut acked: HashSet<String> = run_spool_child_and_kill(&path, 2_000).into_iter().collect();
    let spool_dir = sqlite::spool_dir_of(&path);
    // The writer runs behind the appends: the kill left entries only in the spool.
    let leftover: usize = std::fs::read_dir(&spool_dir)
        .unwrap()
        .flatten()
        .filter(|d| d.file_name().to_string_lossy().ends_with(".spool"))
        .map(|d| d.metadata().unwrap().len() as usize)
        .sum();
    // A second run replays the first run's leftovers at start, then is killed too.
    acked.extend(run_spool_child_and_kill(&path, 2_000));

    let store = std::sync::Arc::new(SqliteStore::open(&path).unwrap());
    // What a restarted gateway does before serving.
    let budgets = crate::budget::Budgets::new(store.clone());
    let ledger = store.ledger(None).unwrap();
    let ids: HashSet<&str> = ledger.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), ledger.len(), "an entry is recorded twice");
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged entries lost: {lost:?}",
        lost.len()
    );
    assert!(acked.len() >= 4_000, "{} acknowledged", acked.len());
    drop(budgets);
    // Everything was moved into the store: the spool holds nothing more.
    assert_eq!(
        crate::state::spool::recover(&spool_dir, &*store)
            .unwrap()
            .entries,
        0
    );
    eprintln!(
        "{} acknowledged, {} in the ledger, {leftover} bytes left in the spool by the first kill",
        acked.len(),
        ledger.len()
    );
}
