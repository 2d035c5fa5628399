//! Start the real `routeplane serve` binary on an ephemeral port and keep its
//! log, for tests that treat the gateway as a black box.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Server {
    pub child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// Everything the gateway wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// `routeplane serve --config CONFIG EXTRA...` with `envs`, from `dir`;
    /// waits until it says where it listens.
    pub fn start(dir: &Path, config: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_routeplane"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .args(extra)
            .current_dir(dir)
            .env("NO_COLOR", "1");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("on http://").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(e) => {
                // Say why: the exit status and what the gateway wrote.
                let status = child.try_wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "the gateway did not start within 60s ({e}); exit: {status:?}; its log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server { child, addr, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Server {
    /// Stop the gateway as a service manager would (SIGTERM) and wait up to
    /// `patience` for it to exit; `None` when it did not (it is then killed).
    pub fn stop(&mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        #[cfg(unix)]
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let started = std::time::Instant::now();
            while started.elapsed() < patience {
                match self.child.try_wait() {
                    Ok(Some(status)) => return Some(status),
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => break,
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Server {
    /// A clean stop first: the gateway then removes its ledger spool from
    /// /dev/shm instead of leaving one per test behind. Tests about crashes
    /// send SIGKILL themselves.
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// A one-model policy on the built-in mock provider, with a tenant schema.
pub const POLICY: &str = "tenant {
  plan: enum(free, pro) = pro
}

provider mock {
  region us
}

model small {
  provider mock
  kind chat
  context 8k
  price in $1 out $2 per 1M
  quality 0.5
}

classify {
  chat otherwise
}

route chat {
  candidates [small]
  score 1.0 * quality
}
";

/// One request on a fresh connection: the status, the `x-routeplane-policy`
/// version that answered, and the body.
pub fn http(addr: &str, method: &str, path: &str, auth: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let policy = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-routeplane-policy:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, policy, body.to_string())
}

/// `GET /admin/policy` with the admin `token`.
pub fn admin_policy(addr: &str, token: &str) -> serde_json::Value {
    let (status, _, body) = http(addr, "GET", "/admin/policy", token, "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}
