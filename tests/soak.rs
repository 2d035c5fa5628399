//! A bounded soak: the real binary with its file watcher on, steady
//! concurrent load, a policy rewritten twice a second (valid and invalid in
//! turn), and a provider that fails one request in ten. Zero requests may
//! fail, invalid policies must be refused while the last good one serves, and
//! memory must stay flat.
//!
//! `ROUTEPLANE_SOAK_SECONDS` sets the length (default 30; run longer by hand).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/binary.rs"]
mod binary;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CATALOGUE: &str = "tenant {\n  plan: enum(free, pro) = pro\n}\n\n\
provider flaky {\n  region us\n}\n\nprovider steady {\n  region us\n}\n\n\
model flaky-a {\n  provider flaky\n  kind chat\n  price in $1 out $2 per 1M\n  quality 0.9\n}\n\n\
model steady-b {\n  provider steady\n  kind chat\n  price in $2 out $4 per 1M\n  quality 0.6\n}\n\n\
model steady-c {\n  provider steady\n  kind chat\n  price in $3 out $6 per 1M\n  quality 0.5\n}\n";

fn routing(weight: u32) -> String {
    format!(
        "classify {{\n  chat otherwise\n}}\n\nroute chat {{\n  candidates [flaky-a, steady-b, steady-c]\n  score 0.{weight} * quality + 0.1 * price\n  fallback [steady-c]\n}}\n\n\
         protect {{\n  retry 1 on [5xx] backoff 1ms..5ms\n  timeout total 10s\n}}\n"
    )
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn chat(addr: &str) -> u16 {
    let body = r#"{"model":"auto","messages":[{"role":"user","content":"soak"}]}"#;
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer sk-soak\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn steady_load_through_reloads_and_faults_fails_nothing() {
    let seconds: u64 = std::env::var("ROUTEPLANE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir(&policy).unwrap();
    std::fs::write(policy.join("catalogue.route"), CATALOGUE).unwrap();
    std::fs::write(policy.join("routing.route"), routing(5)).unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        "listen: 127.0.0.1:0\npolicy: policy\nproviders:\n\
         \x20 - name: flaky\n    kind: mock\n    mock: { latency: 2ms, error_rate: 0.1 }\n\
         \x20 - name: steady\n    kind: mock\n    mock: { latency: 2ms }\n\
         tenants:\n  - id: soak\n    key: sk-soak\n",
    )
    .unwrap();
    let server = binary::Server::start(dir.path(), &dir.path().join("gateway.yaml"), &[], &[]);
    let pid = server.child.id();
    let addr = server.addr.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (stop, statuses, done, addr) =
                (stop.clone(), statuses.clone(), done.clone(), addr.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let code = chat(&addr);
                    *statuses.lock().unwrap().entry(code).or_default() += 1;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // Let it warm up, then take the baseline memory.
    std::thread::sleep(Duration::from_secs(3));
    let rss_start = rss_kb(pid);
    let start = Instant::now();
    let mut edits = 0u32;
    let mut valid_edits = 0u32;
    while start.elapsed() < Duration::from_secs(seconds) {
        edits += 1;
        let text = if edits % 2 == 0 {
            valid_edits += 1;
            routing(1 + edits % 9)
        } else {
            // A broken save: it must be refused while the last good policy serves.
            format!("{}\nroute broken {{", routing(5))
        };
        std::fs::write(policy.join("routing.route"), text).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    // End on a valid policy.
    std::fs::write(policy.join("routing.route"), routing(7)).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let rss_end = rss_kb(pid);
    let statuses = statuses.lock().unwrap().clone();
    let total = done.load(Ordering::SeqCst);
    let log = server.log();
    let reloaded = log.matches("policy reloaded").count();
    let refused = log.matches("reload refused").count();
    eprintln!(
        "soak: {seconds}s, {total} requests, statuses {statuses:?}, {edits} edits ({valid_edits} valid), \
         {reloaded} reloads, {refused} refused, RSS {rss_start} kB -> {rss_end} kB"
    );
    assert!(total > 100, "too few requests went through: {total}");
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [200],
        "requests failed: {statuses:?}\n{log}"
    );
    assert!(
        reloaded >= 3,
        "valid edits were not loaded ({reloaded} reloads):\n{log}"
    );
    assert!(
        refused >= 3,
        "invalid edits were not refused ({refused}):\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        rss_end < rss_start * 2 + 20_000,
        "memory grew from {rss_start} kB to {rss_end} kB"
    );
}
