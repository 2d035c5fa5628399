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
