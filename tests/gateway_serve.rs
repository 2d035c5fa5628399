//! `routeplane serve` as a process: its worker threads share one port, a
//! second gateway on a busy port is refused, and SIGTERM stops it cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/binary.rs"]
mod binary;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use binary::Server;

fn write_gateway(dir: &Path) {
    std::fs::write(
        dir.join("policy.route"),
        "provider local {\n  region us\n}\n\nmodel chat-a {\n  provider local\n  kind chat\n  price in $1 out $2 per 1M\n}\n\n\
         model chat-b {\n  provider local\n  kind chat\n  price in $1 out $2 per 1M\n}\n\n\
         classify {\n  chat otherwise\n}\n\nroute chat {\n  candidates [chat-a, chat-b]\n}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("gateway.yaml"),
        "listen: 127.0.0.1:0\npolicy: .\nproviders:\n  - name: local\n    kind: mock\n\
         tenants:\n  - id: t\n    key: sk-t\nstate: { backend: memory }\n",
    )
    .unwrap();
}

/// One request on a new connection; the status code.
fn status_on_new_connection(addr: &str) -> u16 {
    let body = r#"{"model":"auto","messages":[{"role":"user","content":"hi"}]}"#;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-t\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn workers_share_one_port_and_a_second_gateway_on_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_gateway(dir.path());
    let config = dir.path().join("gateway.yaml");
    let server = Server::start(dir.path(), &config, &["--no-watch", "--workers", "3"], &[]);
    // New connections land on whichever worker the kernel picks; all answer.
    for _ in 0..30 {
        assert_eq!(status_on_new_connection(&server.addr), 200);
    }
    let mut second = Command::new(env!("CARGO_BIN_EXE_routeplane"))
        .args(["serve", "--no-watch", "--listen", &server.addr, "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for_exit(&mut second, "the second gateway (sharing the port?)");
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on `{}`", server.addr)),
        "{stderr}"
    );
    // The first gateway was not disturbed.
    assert_eq!(status_on_new_connection(&server.addr), 200);
}

#[test]
#[cfg(unix)]
fn sigterm_stops_the_gateway_cleanly_and_leaves_no_ledger_spool() {
    let dir = tempfile::tempdir().unwrap();
    write_gateway(dir.path());
    // The default state: SQLite, with its ledger spool in /dev/shm.
    let yaml = std::fs::read_to_string(dir.path().join("gateway.yaml")).unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        yaml.replace(
            "state: { backend: memory }",
            "state: { backend: sqlite, path: state/state.db }",
        ),
    )
    .unwrap();
    let db = std::path::absolute(dir.path().join("state/state.db")).unwrap();
    let spool = routeplane::state::sqlite::spool_dir_of(&db);
    let mut server = Server::start(
        dir.path(),
        &dir.path().join("gateway.yaml"),
        &["--no-watch"],
        &[],
    );
    assert_eq!(status_on_new_connection(&server.addr), 200);
    assert!(spool.is_dir(), "no ledger spool at `{}`", spool.display());
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_for_exit(&mut server.child, "the gateway after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    // The log reader may be a moment behind the exit.
    let started = Instant::now();
    while !server.log().contains("shutting down") && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.log().contains("shutting down"), "{}", server.log());
    // The last entry went into the store and the spool was removed.
    assert!(
        !spool.exists(),
        "`{}` outlived a clean stop",
        spool.display()
    );
    let ledger = routeplane::state::sqlite::SqliteStore::open(&db).unwrap();
    let rows = routeplane::state::BudgetStore::ledger(&ledger, None).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
}

/// Wait up to 10 s for `child` to exit; kill it and fail if it does not.
fn wait_for_exit(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} was still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test gateway with a mock provider that takes `latency` to answer,
/// started with `--no-watch` and `extra`.
fn start_slow(dir: &Path, latency: &str, extra: &[&str]) -> Server {
    write_slow_gateway(dir, latency);
    let args: Vec<&str> = ["--no-watch"].iter().chain(extra).copied().collect();
    Server::start(dir, &dir.join("gateway.yaml"), &args, &[])
}

/// The test gateway with a mock provider that takes `latency` to answer.
fn write_slow_gateway(dir: &Path, latency: &str) {
    write_gateway(dir);
    let yaml = std::fs::read_to_string(dir.join("gateway.yaml")).unwrap();
    std::fs::write(
        dir.join("gateway.yaml"),
        yaml.replace(
            "kind: mock\n",
            &format!("kind: mock\n    mock: {{ latency: {latency}, first_token: 100ms }}\n"),
        ),
    )
    .unwrap();
}

/// Send a chat request on a new connection and read until the server closes
/// it; the raw response (empty when the connection was closed first).
fn request_in_background(addr: &str, stream: bool) -> std::thread::JoinHandle<String> {
    let addr = addr.to_string();
    let body = format!(
        r#"{{"model":"auto","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

fn sigterm(child: &std::process::Child) {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Wait until a connection to `addr` is refused; false after 5 s.
fn refused_soon(addr: &str) -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if TcpStream::connect(addr).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
#[cfg(unix)]
fn sigterm_lets_the_requests_in_flight_finish_and_refuses_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_slow(dir.path(), "1500ms", &[]);
    // An idle keep-alive connection must not hold the drain up.
    let mut idle = TcpStream::connect(&server.addr).unwrap();
    let plain = request_in_background(&server.addr, false);
    let streamed = request_in_background(&server.addr, true);
    std::thread::sleep(Duration::from_millis(400));
    let signalled = Instant::now();
    sigterm(&server.child);
    assert!(
        refused_soon(&server.addr),
        "new connections still accepted while draining"
    );
    let plain = plain.join().unwrap();
    let streamed = streamed.join().unwrap();
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    assert!(plain.contains("\"usage\""), "the answer was cut: {plain}");
    assert!(streamed.starts_with("HTTP/1.1 200"), "{streamed}");
    assert!(
        streamed.contains("data: [DONE]"),
        "the stream was cut: {streamed}"
    );
    let status = wait_for_exit(&mut server.child, "the draining gateway");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "the drain waited for more than the requests in flight: {:?}",
        signalled.elapsed()
    );
    // The idle connection was closed, not left to the end of the drain.
    let mut rest = Vec::new();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(idle.read_to_end(&mut rest).unwrap(), 0);
    let log = server.log();
    assert!(log.contains("may take 30s to finish"), "{log}");
    assert!(!log.contains("still busy"), "{log}");
}

#[test]
#[cfg(unix)]
fn a_drain_that_runs_out_closes_the_connections_still_busy() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_slow(dir.path(), "20s", &["--drain-timeout", "300ms"]);
    let slow = request_in_background(&server.addr, false);
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    sigterm(&server.child);
    let status = wait_for_exit(&mut server.child, "the gateway past its drain timeout");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    // The client is told by the connection closing, not left waiting.
    assert_eq!(slow.join().unwrap(), "");
    let started = Instant::now();
    while !server.log().contains("still busy") && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        server.log().contains("closed the connections still busy"),
        "{}",
        server.log()
    );
}

#[test]
#[cfg(unix)]
fn a_second_signal_stops_without_waiting_for_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_slow(dir.path(), "20s", &[]);
    let slow = request_in_background(&server.addr, true);
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&server.child);
    assert!(refused_soon(&server.addr));
    let second = Instant::now();
    sigterm(&server.child);
    let status = wait_for_exit(&mut server.child, "the gateway after a second SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "{:?}",
        second.elapsed()
    );
    // The stream had begun (headers sent) and was cut by the close.
    let cut = slow.join().unwrap();
    assert!(!cut.contains("data: [DONE]"), "{cut}");
    let started = Instant::now();
    while !server.log().contains("stopping now") && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.log().contains("stopping now"), "{}", server.log());
}

#[test]
fn a_drain_timeout_without_a_unit_is_refused() {
    for (arg, says) in [
        ("30", "has no unit: write e.g. `30s`"),
        ("2weeks", "invalid duration unit"),
        ("2d", "longer than the 24h"),
        ("25h", "longer than the 24h"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_routeplane"))
            .args([
                "serve",
                "--drain-timeout",
                arg,
                "--config",
                "/nonexistent.yaml",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{arg}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{arg}: {err}");
    }
}
