//! Budget reservations around every upstream fault: after the request has
//! finished, no reservation is left open in the store and what the budget
//! counter spent equals the sum of the ledger. Each fault runs against the
//! memory and the SQLite store, once with a healthy fallback model and once
//! (where it makes sense) with the faulty model alone.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod gateway_common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_common::*;
use routeplane::budget::Budgets;
use routeplane::config::Config;
use routeplane::gateway::{FixedPolicy, Gateway, Options};
use routeplane::state::{self, BudgetStore};
use serde_json::json;
use tokio::io::AsyncWriteExt;

const CHAT_OK: &str = r#"{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"from fault"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

/// Retries on everything retryable, short backoff and timeout, and a
/// budget on every tenant so that every attempt reserves.
const PROTECT: &str = "protect {
  retry 1 on [429, 5xx, timeout, reset, connect] backoff 5ms..1500ms
  timeout total 700ms
  budget monthly per tenant $100 {
    block at 100%
  }
}";

#[derive(Clone, Copy, Debug)]
enum Fault {
    Status500,
    TooManyWithRetryAfter,
    Refused,
    Reset,
    StreamCut,
    MalformedJson,
    NeverEnds,
    Trickled,
    Timeout,
}

const FAULTS: [Fault; 9] = [
    Fault::Status500,
    Fault::TooManyWithRetryAfter,
    Fault::Refused,
    Fault::Reset,
    Fault::StreamCut,
    Fault::MalformedJson,
    Fault::NeverEnds,
    Fault::Trickled,
    Fault::Timeout,
];

/// The faulty upstream's URL.
async fn faulty(f: Fault) -> String {
    match f {
        Fault::Status500 => upstream("a", |_| Act::Status(500, None)).await.url,
        Fault::TooManyWithRetryAfter => upstream("a", |_| Act::Status(429, Some(1))).await.url,
        Fault::Refused => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("http://127.0.0.1:{port}/v1")
        }
        Fault::Reset => upstream("a", |_| Act::Reset).await.url,
        Fault::StreamCut => upstream("a", |_| Act::CutAfter(2)).await.url,
        Fault::MalformedJson => {
            raw_upstream(|_| http_json(200, "{\"choices\": [ this is not json"))
                .await
                .url
        }
        Fault::NeverEnds => {
            socket_upstream(|mut s| async move {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"choices\":").await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            })
            .await
        }
        Fault::Trickled => {
            socket_upstream(|mut s| async move {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    CHAT_OK.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                for b in CHAT_OK.bytes() {
                    if s.write_all(&[b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
        }
        Fault::Timeout => upstream("a", |_| Act::Slow(Duration::from_secs(5))).await.url,
    }
}

fn stream(f: Fault) -> bool {
    matches!(f, Fault::StreamCut)
}

async fn start(config_text: &str, store: Arc<dyn BudgetStore>, models: &[(&str, &str)]) -> Gw {
    let cfg = Config::parse("faults.yaml", config_text, Path::new("."), &|_| {
        Some("test-key".into())
    })
    .unwrap();
    let opts = Options {
        budgets: Some(Arc::new(Budgets::new(store))),
        ..Options::default()
    };
    let gw = Gateway::new(
        cfg,
        Arc::new(FixedPolicy::new(policy(models, PROTECT))),
        opts,
    )
    .unwrap();
    serve_gateway(gw).await
}

fn spent(store: &dyn BudgetStore) -> u64 {
    let now = state::now_ms();
    let (start, _) = state::period::bounds(routeplane::ir::BudgetPeriod::Monthly, now);
    store
        .balance(
            &state::Counter {
                key: "monthly|tenant|demo".into(),
                period_start: start,
            },
            now,
        )
        .unwrap()
        .spent
}

/// One request through `fault` (with a healthy fallback when `fallback`),
/// read to the end; then every reservation must be gone and the counter
/// must equal the ledger. Returns the status and what the ledger holds.
async fn run(fault: Fault, store: Arc<dyn BudgetStore>, fallback: bool) -> (u16, usize) {
    let a = faulty(fault).await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = if fallback {
        start(
            &config(&[("pa", &a), ("pb", &b.url)]),
            store.clone(),
            &[("model-a", "pa"), ("model-b", "pb")],
        )
        .await
    } else {
        start(&config(&[("pa", &a)]), store.clone(), &[("model-a", "pa")]).await
    };
    let body = json!({ "model": "auto", "max_tokens": 20, "stream": stream(fault),
                       "messages": [{ "role": "user", "content": "hi" }] });
    let t0 = Instant::now();
    let r = gw.chat("sk-demo", body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "{fault:?}: took {:?}",
        t0.elapsed()
    );
    // Settling a stream and releasing after an error happen as the request
    // ends, which may be a moment after the client saw the last byte; a
    // leaked reservation stays for its 15 minutes.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let open = store.open_reservations(state::now_ms()).unwrap();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{fault:?} (fallback: {fallback}): {open} reservation(s) left open after a {status}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ledger = store.ledger(None).unwrap();
    let sum: u64 = ledger.iter().map(|e| e.actual).sum();
    assert_eq!(
        spent(&*store),
        sum,
        "{fault:?} (fallback: {fallback}): the counter disagrees with the ledger {ledger:?}"
    );
    (status, ledger.len())
}

fn stores() -> Vec<(
    &'static str,
    Arc<dyn BudgetStore>,
    Option<tempfile::TempDir>,
)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = state::open(&state::Backend::Sqlite(dir.path().join("f.db"))).unwrap();
    vec![
        (
            "memory",
            state::open(&state::Backend::Memory).unwrap(),
            None,
        ),
        ("sqlite", sqlite, Some(dir)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fault_with_a_fallback_leaves_no_reservation_and_the_ledger_agrees() {
    let mut tasks = Vec::new();
    for fault in FAULTS {
        for (name, store, dir) in stores() {
            tasks.push(tokio::spawn(async move {
                let (status, entries) = run(fault, store, true).await;
                drop(dir);
                (fault, name, status, entries)
            }));
        }
    }
    for t in tasks {
        let (fault, name, status, entries) = t.await.unwrap();
        assert_eq!(status, 200, "{fault:?} on {name}");
        // The fallback's answer is settled; a cut stream reached the client
        // in part (so there was no fallback) and is paid for as well.
        assert_eq!(entries, 1, "{fault:?} on {name}: {entries} ledger entries");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fault_without_a_fallback_leaves_no_reservation_and_the_ledger_agrees() {
    let mut tasks = Vec::new();
    for fault in FAULTS {
        for (name, store, dir) in stores() {
            tasks.push(tokio::spawn(async move {
                let (status, entries) = run(fault, store, false).await;
                drop(dir);
                (fault, name, status, entries)
            }));
        }
    }
    for t in tasks {
        let (fault, name, status, entries) = t.await.unwrap();
        if stream(fault) {
            // The head went out before the cut: 200 with an error event, paid.
            assert_eq!(status, 200, "{fault:?} on {name}");
            assert_eq!(entries, 1, "{fault:?} on {name}");
        } else {
            assert!(
                matches!(status, 502..=504 | 429),
                "{fault:?} on {name}: {status}"
            );
            assert_eq!(entries, 0, "{fault:?} on {name}: nothing was answered");
        }
    }
}

/// A store whose `reserve` goes through `hook` first: it fails (a locked
/// or unreachable database) or takes its time (SQLite waiting for a lock
/// another process holds); balances and the rest are the inner store's, so
/// the check before dispatch passes.
struct OnReserve<F>(Arc<dyn BudgetStore>, F);

impl<F> BudgetStore for OnReserve<F>
where
    F: Fn() -> Result<(), state::StateError> + Send + Sync,
{
    fn reserve(
        &self,
        id: &str,
        charges: &[state::Charge],
        amount: u64,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<state::Reservation, state::StateError> {
        (self.1)()?;
        self.0.reserve(id, charges, amount, now_ms, ttl_ms)
    }
    fn settle(
        &self,
        r: &state::Reservation,
        e: &state::LedgerEntry,
    ) -> Result<bool, state::StateError> {
        self.0.settle(r, e)
    }
    fn release(&self, r: &state::Reservation) -> Result<(), state::StateError> {
        self.0.release(r)
    }
    fn trim_ledger(&self, before_ms: i64, batch: usize) -> Result<usize, state::StateError> {
        self.0.trim_ledger(before_ms, batch)
    }
    fn balance(
        &self,
        c: &state::Counter,
        now_ms: i64,
    ) -> Result<state::Balance, state::StateError> {
        self.0.balance(c, now_ms)
    }
    fn ledger(&self, since_ms: Option<i64>) -> Result<Vec<state::LedgerEntry>, state::StateError> {
        self.0.ledger(since_ms)
    }
    fn open_reservations(&self, now_ms: i64) -> Result<usize, state::StateError> {
        self.0.open_reservations(now_ms)
    }
}

/// A store error at reservation fails closed with the documented 503, and
/// no other model is tried: it would ask the same store.
#[tokio::test]
async fn a_store_error_when_reserving_is_a_503_and_no_fallback() {
    let a = upstream("a", |_| Act::Ok).await;
    let b = upstream("b", |_| Act::Ok).await;
    let store = Arc::new(OnReserve(
        state::open(&state::Backend::Memory).unwrap(),
        || Err(state::StateError::Backend("database is locked".into())),
    ));
    let gw = start(
        &config(&[("pa", &a.url), ("pb", &b.url)]),
        store,
        &[("model-a", "pa"), ("model-b", "pb")],
    )
    .await;
    let body = json!({ "model": "auto", "max_tokens": 20,
                       "messages": [{ "role": "user", "content": "hi" }] });
    let r = gw.chat("sk-demo", body).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "budget_unavailable", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("database is locked"),
        "{v}"
    );
    assert!(a.bodies.lock().unwrap().is_empty());
    assert!(b.bodies.lock().unwrap().is_empty());
}

/// A store that waits does not stall the worker: other requests, and the
/// health check, are answered meanwhile. (The test runs on one thread, as a
/// gateway worker does: a store call on the event loop would hold both.)
#[tokio::test(flavor = "current_thread")]
async fn a_slow_store_stalls_only_its_own_request() {
    let a = upstream("a", |_| Act::Ok).await;
    let store = Arc::new(OnReserve(
        state::open(&state::Backend::Memory).unwrap(),
        || {
            std::thread::sleep(Duration::from_millis(1500));
            Ok(())
        },
    ));
    let gw = start(
        &config(&[("pa", &a.url)]),
        store.clone(),
        &[("model-a", "pa")],
    )
    .await;
    let body = json!({ "model": "auto", "max_tokens": 20,
                       "messages": [{ "role": "user", "content": "hi" }] });
    let slow = tokio::spawn(gw.chat("sk-demo", body).send());
    // Timed from before the wait: a blocked loop would also hold this timer.
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let health = gw
        .client
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "the health check waited {:?} for another request's store call",
        t0.elapsed()
    );
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    // Its spend is recorded and nothing stays reserved.
    assert_eq!(store.ledger(None).unwrap().len(), 1);
    assert_eq!(store.open_reservations(state::now_ms()).unwrap(), 0);
}
