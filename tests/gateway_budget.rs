//! Budgets through the real gateway on 127.0.0.1 with the built-in mock
//! provider: reservations under concurrency never overspend, thresholds warn
//! and block with a message that says why and until when, a block survives a
//! restart (SQLite), fallbacks reserve again for the model actually used,
//! and streams settle from the upstream's usage chunk.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::sync::Arc;

use routeplane::budget::Budgets;
use routeplane::config::Config;
use routeplane::gateway::{FixedPolicy, Gateway, Options};
use routeplane::source::Sources;
use routeplane::state::{self, BudgetStore};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// `cheap`: $1 in, $10 out per 1M tokens (o200k); `dear`: ten times that.
/// The mock answers 8 completion tokens.
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
model dear {
  provider mock
  kind chat
  context 8k
  price in $10 out $100 per 1M
  tokenizer o200k
}
classify {
  chat otherwise
}
route chat {
  candidates [dear, cheap]
  score 1.0 * price
}
protect {
  budget monthly per tenant tenant.budget {
    warn at 50%
    block at 100%
  }
}
"#;

fn config(state: &str, latency_ms: u64) -> String {
    format!(
        r#"
policy: unused
state: {state}
providers:
  - name: mock
    kind: mock
    mock: {{ latency: {latency_ms}ms, first_token: 1ms, usage: {{ completion_tokens: 8 }}, chunks: 2 }}
tenants:
  - id: capped
    key: sk-capped
    attrs: {{ budget: 0.001 }}
  - id: rich
    key: sk-rich
    attrs: {{ budget: 1000 }}
"#
    )
}

struct Gw {
    url: String,
    store: Arc<dyn BudgetStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(config_text: &str, policy: &str) -> Gw {
    let cfg = Config::parse("budget.yaml", config_text, Path::new("."), &|_| None).unwrap();
    let store = state::open(&cfg.state).unwrap();
    let mut sources = Sources::new();
    sources.add("p.route", policy);
    let compiled =
        routeplane::compile::compile(&sources).unwrap_or_else(|a| panic!("{:?}", a.diagnostics));
    let opts = Options {
        budgets: Some(Arc::new(Budgets::new(store.clone()))),
        ..Options::default()
    };
    let gw = Gateway::new(cfg, Arc::new(FixedPolicy::new(compiled)), opts).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(routeplane::gateway::server::serve(listener, gw, async {
        let _ = rx.await;
    }));
    Gw {
        url,
        store,
        stop: Some(tx),
    }
}

fn body(max_tokens: u64) -> Value {
    json!({ "model": "auto", "max_tokens": max_tokens,
            "messages": [{ "role": "user", "content": "hello there" }] })
}

async fn chat(gw: &Gw, key: &str, b: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(b)
        .send()
        .await
        .unwrap()
}

fn spent(gw: &Gw, tenant: &str) -> (u64, u64) {
    let now = state::now_ms();
    let (start, _) = state::period::bounds(routeplane::ir::BudgetPeriod::Monthly, now);
    let b = gw
        .store
        .balance(
            &state::Counter {
                key: format!("monthly|tenant|{tenant}"),
                period_start: start,
            },
            now,
        )
        .unwrap();
    (b.spent, b.reserved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_overspend() {
    let dir = tempfile::tempdir().unwrap();
    let state = format!(
        "{{ backend: sqlite, path: {} }}",
        dir.path().join("s.db").display()
    );
    let gw = Arc::new(start(&config(&state, 50), POLICY).await);
    // $0.001 = 1000 micros; each request reserves about 100 and spends about 90.
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let r = chat(&gw, "sk-capped", &body(10)).await;
                let status = r.status().as_u16();
                let text = r.text().await.unwrap();
                (status, text)
            })
        })
        .collect();
    let mut ok = 0;
    let mut blocked = 0;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        match status {
            200 => ok += 1,
            402 => {
                blocked += 1;
                assert!(text.contains("monthly budget of tenant `capped`"), "{text}");
            }
            s => panic!("{s}: {text}"),
        }
    }
    let (spent, reserved) = spent(&gw, "capped");
    assert_eq!(reserved, 0);
    assert!(spent <= 1000, "spent {spent} of 1000");
    assert!(ok > 0 && blocked > 0, "{ok} ok, {blocked} blocked");
    let ledger = gw.store.ledger(None).unwrap();
    assert_eq!(ledger.len(), ok, "one ledger entry per answered request");
    assert_eq!(ledger.iter().map(|e| e.actual).sum::<u64>(), spent);
    assert!(ledger
        .iter()
        .all(|e| e.model == "cheap" && e.output_tokens == 8));
}

#[tokio::test]
async fn the_capped_tenant_is_warned_then_blocked_and_stays_blocked_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = format!(
        "{{ backend: sqlite, path: {} }}",
        dir.path().join("s.db").display()
    );
    let cfg = config(&state, 1);
    let mut warned = false;
    {
        let gw = start(&cfg, POLICY).await;
        let mut n = 0;
        loop {
            let r = chat(&gw, "sk-capped", &body(10)).await;
            n += 1;
            assert!(n < 50, "never blocked");
            let warning = r
                .headers()
                .get("x-routeplane-budget-warning")
                .map(|v| v.to_str().unwrap().to_string());
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            if status == 402 {
                let msg = v["error"]["message"].as_str().unwrap();
                for part in [
                    "monthly budget of tenant `capped`",
                    "$0.001",
                    "spent",
                    "reserved",
                    "resets at",
                    "UTC",
                ] {
                    assert!(msg.contains(part), "`{part}` missing from: {msg}");
                }
                assert_eq!(v["error"]["type"], "budget_exceeded");
                break;
            }
            assert_eq!(status, 200, "{v}");
            if let Some(w) = warning {
                assert!(w.contains("monthly budget of tenant `capped`"), "{w}");
                warned = true;
            }
        }
        assert!(n > 3, "blocked after {n} requests");
    }
    assert!(warned, "no warning before the block");
    // A new gateway process on the same file: still blocked.
    let gw = start(&cfg, POLICY).await;
    let r = chat(&gw, "sk-capped", &body(10)).await;
    assert_eq!(r.status(), 402);
    // Other tenants are unaffected.
    let r = chat(&gw, "sk-rich", &body(10)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn every_attempt_reserves_for_the_model_actually_used() {
    // The first candidate by score is the cheap one; ask for the dear one by
    // name with a big output cap: its estimate does not fit, so it is skipped
    // and the request is refused rather than run unchecked.
    let gw = start(&config("{ backend: memory }", 1), POLICY).await;
    let r = chat(
        &gw,
        "sk-capped",
        &json!({ "model": "dear", "max_tokens": 100,
                 "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(r.status(), 402);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("dear (budget)"), "{msg}");
    assert_eq!(spent(&gw, "capped"), (0, 0));
    // The cheap model fits the same request.
    let r = chat(
        &gw,
        "sk-capped",
        &json!({ "model": "auto", "max_tokens": 50,
                 "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-routeplane-model"], "cheap");
}

#[tokio::test]
async fn streams_settle_from_the_usage_chunk() {
    let gw = start(&config("{ backend: memory }", 1), POLICY).await;
    let r = chat(
        &gw,
        "sk-rich",
        &json!({ "model": "auto", "stream": true,
                 "messages": [{ "role": "user", "content": "hello there" }] }),
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("[DONE]"));
    // The ledger is written once the stream ends.
    let mut ledger = Vec::new();
    for _ in 0..100 {
        ledger = gw.store.ledger(None).unwrap();
        if !ledger.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].output_tokens, 8);
    assert_eq!(spent(&gw, "rich"), (ledger[0].actual, 0));
    assert!(ledger[0].actual < ledger[0].estimated);
}

/// A throwaway `redis-server` on 127.0.0.1 (installed by scripts/install-test-deps.sh).
struct Redis {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): run scripts/install-test-deps.sh")
            });
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed().as_secs() < 10, "redis-server did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Redis {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
            _dir: dir,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_redis_never_overspend_together() {
    let redis = Redis::start();
    let cfg = config(&format!("{{ backend: redis, url: \"{}\" }}", redis.url), 50);
    let a = Arc::new(start(&cfg, POLICY).await);
    let b = Arc::new(start(&cfg, POLICY).await);
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let gw = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { chat(&gw, "sk-capped", &body(10)).await.status().as_u16() })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            402 => {}
            s => panic!("status {s}"),
        }
    }
    let (spent, reserved) = spent(&a, "capped");
    assert_eq!(reserved, 0);
    assert!(spent <= 1000, "spent {spent} of 1000");
    assert!(ok > 0 && ok < 40, "{ok} answered");
    assert_eq!(b.store.ledger(None).unwrap().len(), ok);
}

#[tokio::test]
async fn a_rate_limit_holds_across_two_gateways_on_one_redis() {
    let redis = Redis::start();
    let cfg = config(&format!("{{ backend: redis, url: \"{}\" }}", redis.url), 1);
    let policy = POLICY.replace("protect {", "protect {\n  limit rate 5/h per tenant");
    let a = start(&cfg, &policy).await;
    let b = start(&cfg, &policy).await;
    let mut ok = 0;
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = chat(gw, "sk-rich", &body(10)).await;
        match r.status().as_u16() {
            200 => ok += 1,
            429 => assert!(r.headers().contains_key("retry-after")),
            s => panic!("status {s}"),
        }
    }
    assert_eq!(ok, 5, "the two gateways together allow 5 an hour");
}

#[tokio::test]
async fn requests_without_a_budget_are_still_in_the_ledger() {
    let policy = POLICY.replace(
        "budget monthly per tenant tenant.budget",
        "budget daily per feature $5",
    );
    let gw = start(&config("{ backend: memory }", 1), &policy).await;
    // No feature: no budget applies; the entry is written in the background.
    let r = chat(&gw, "sk-rich", &body(10)).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-routeplane-budget-warning").is_none());
    let mut ledger = Vec::new();
    for _ in 0..100 {
        ledger = gw.store.ledger(None).unwrap();
        if !ledger.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].tenant, "rich");
    assert_eq!(ledger[0].output_tokens, 8);
}

/// `POLICY` plus an embeddings model and an image model on the mock, both
/// routed by endpoint.
fn policy_with_embeddings_and_images() -> String {
    POLICY.replace(
        "classify {\n  chat otherwise\n}",
        r#"model embed {
  provider mock
  kind embeddings
  context 8k
  price in $1 out $0 per 1M
  tokenizer o200k
}
model draw {
  provider mock
  kind image
  context 1k
  price $0.04 per image
}
classify {
  embed when request.endpoint == embeddings
  draw when request.endpoint == images
  chat otherwise
}
route embed {
  candidates [embed]
}
route draw {
  candidates [draw]
}"#,
    )
}

async fn post(gw: &Gw, key: &str, path: &str, b: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", gw.url))
        .bearer_auth(key)
        .json(b)
        .send()
        .await
        .unwrap()
}

/// Token ids are tokens: 8,000 of them at $1 per 1M are $0.008, eight
/// times the capped tenant's $0.001. They were estimated at no tokens at
/// all, so the request reserved nothing and went through.
#[tokio::test]
async fn embeddings_given_as_token_ids_are_reserved_like_text() {
    let gw = start(
        &config("{ backend: memory }", 1),
        &policy_with_embeddings_and_images(),
    )
    .await;
    let ids: Vec<u64> = (1000..9000).collect();
    for input in [json!(ids), json!([ids])] {
        let r = post(
            &gw,
            "sk-capped",
            "/v1/embeddings",
            &json!({ "model": "auto", "input": input }),
        )
        .await;
        let status = r.status().as_u16();
        assert_eq!(status, 402, "{}", r.text().await.unwrap());
    }
    let text = "word ".repeat(10);
    let r = post(
        &gw,
        "sk-capped",
        "/v1/embeddings",
        &json!({ "model": "auto", "input": [[1, 2, 3], text] }),
    )
    .await;
    assert_eq!(r.status(), 200, "a small request still fits");
}

/// Every image asked for is billed: `n: 3` at $0.04 each reserves and
/// settles $0.12. Only one was counted before, so a tenant could spend
/// `n` times its budget.
#[tokio::test]
async fn every_image_asked_for_is_reserved_and_paid() {
    let gw = start(
        &config("{ backend: memory }", 1).replace("budget: 0.001", "budget: 0.1"),
        &policy_with_embeddings_and_images(),
    )
    .await;
    let draw = |n: u64| json!({ "model": "auto", "prompt": "a lighthouse", "n": n });
    // Three images are $0.12, more than the $0.10 budget.
    let r = post(&gw, "sk-capped", "/v1/images/generations", &draw(3)).await;
    let status = r.status().as_u16();
    assert_eq!(status, 402, "{}", r.text().await.unwrap());
    let r = post(&gw, "sk-rich", "/v1/images/generations", &draw(3)).await;
    assert_eq!(r.status(), 200);
    let ledger = gw.store.ledger(None).unwrap();
    let entry = ledger.iter().find(|e| e.tenant == "rich").unwrap();
    assert_eq!((entry.estimated, entry.actual), (120_000, 120_000));
    for bad in [json!(0), json!("2"), json!(2.5)] {
        let r = post(
            &gw,
            "sk-rich",
            "/v1/images/generations",
            &json!({ "model": "auto", "prompt": "x", "n": bad }),
        )
        .await;
        assert_eq!(r.status(), 400, "n: {bad}");
    }
}
