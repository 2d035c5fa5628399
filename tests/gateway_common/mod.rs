//! Shared harness for the gateway integration tests: misbehaving upstreams
//! (raw TCP, so they can cut, reset and stall at will) and a real gateway on
//! an ephemeral port.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use routeplane::config::Config;
use routeplane::gateway::engine::CompiledPolicy;
use routeplane::gateway::{FixedPolicy, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What an upstream does with one request.
#[derive(Clone, Debug)]
pub enum Act {
    /// 200 with a chat completion (or an SSE stream when the request streams).
    Ok,
    /// This status, with an optional `Retry-After` in seconds.
    Status(u16, Option<u64>),
    /// Wait, then answer `Ok`.
    Slow(Duration),
    /// Read the request, then close the connection with a TCP reset.
    Reset,
    /// Stream the head and `n` chunks, then close without `[DONE]`.
    CutAfter(usize),
    /// Stream with a pause of this long before the first chunk.
    SlowFirstChunk(Duration),
}

pub struct Upstream {
    pub url: String,
    pub hits: Arc<AtomicUsize>,
    /// The JSON bodies received.
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The same bodies, as the bytes received.
    pub raw_bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Upstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An upstream that acts as `script(n)` says for its n-th request (0-based).
pub async fn upstream(
    name: &'static str,
    script: impl Fn(usize) -> Act + Send + Sync + 'static,
) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let raw_bodies = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(script);
    let (h, b, rb) = (hits.clone(), bodies.clone(), raw_bodies.clone());
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (h, b, rb, script) = (h.clone(), b.clone(), rb.clone(), script.clone());
            tokio::spawn(async move { serve_conn(name, sock, h, (b, rb), script).await });
        }
    });
    Upstream {
        url,
        hits,
        bodies,
        raw_bodies,
    }
}

async fn read_request(sock: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = sock.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            return Some((head, buf[end + 4..end + 4 + len].to_vec()));
        }
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn completion(name: &str, model: &str) -> String {
    serde_json::json!({
        "id": "x", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": format!("hello from {name}") }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15 }
    })
    .to_string()
}

fn chunk(text: &str) -> String {
    let c = serde_json::json!({ "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{ "index": 0, "delta": { "content": text }, "finish_reason": null }] });
    format!("data: {c}\n\n")
}

fn chunked(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

type Bodies = (Arc<Mutex<Vec<serde_json::Value>>>, Arc<Mutex<Vec<Vec<u8>>>>);

async fn serve_conn(
    name: &'static str,
    mut sock: TcpStream,
    hits: Arc<AtomicUsize>,
    (bodies, raw_bodies): Bodies,
    script: Arc<dyn Fn(usize) -> Act + Send + Sync>,
) {
    while let Some((_head, body)) = read_request(&mut sock).await {
        let n = hits.fetch_add(1, Ordering::SeqCst);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let stream = json["stream"].as_bool().unwrap_or(false);
        let model = json["model"].as_str().unwrap_or("").to_string();
        bodies.lock().unwrap().push(json);
        raw_bodies.lock().unwrap().push(body.to_vec());
        let mut act = script(n);
        if let Act::Slow(d) = act {
            tokio::time::sleep(d).await;
            act = Act::Ok;
        }
        match act {
            Act::Ok | Act::Slow(_) if !stream => {
                let b = completion(name, &model);
                let r = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len());
                if sock.write_all(r.as_bytes()).await.is_err() {
                    return;
                }
            }
            Act::Ok | Act::Slow(_) | Act::SlowFirstChunk(_) | Act::CutAfter(_) => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                if let Act::SlowFirstChunk(d) = act {
                    tokio::time::sleep(d).await;
                }
                let words = ["hello ", "from ", name, "!"];
                for (i, w) in words.iter().enumerate() {
                    if let Act::CutAfter(k) = act {
                        if i == k {
                            let _ = sock.flush().await;
                            // Give the gateway time to forward what it has, then vanish.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            return;
                        }
                    }
                    if sock.write_all(chunked(&chunk(w)).as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = sock.flush().await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let done = format!("{}0\r\n\r\n", chunked("data: [DONE]\n\n"));
                if sock.write_all(done.as_bytes()).await.is_err() {
                    return;
                }
            }
            Act::Status(code, retry_after) => {
                let b = serde_json::json!({ "error": { "message": format!("{name} says {code}"), "type": "upstream" } }).to_string();
                let ra = retry_after
                    .map(|s| format!("retry-after: {s}\r\n"))
                    .unwrap_or_default();
                let r = format!("HTTP/1.1 {code} Oops\r\ncontent-type: application/json\r\n{ra}content-length: {}\r\n\r\n{b}", b.len());
                if sock.write_all(r.as_bytes()).await.is_err() {
                    return;
                }
            }
            Act::Reset => {
                #[allow(deprecated)]
                let _ = sock.set_linger(Some(Duration::ZERO));
                return;
            }
        }
    }
}

pub struct Gw {
    pub url: String,
    pub gw: Arc<Gateway>,
    pub client: reqwest::Client,
}

/// Start a gateway with this config text (its `policy:` is ignored) and policy.
/// The usual pair: `model-a` on provider `pa` (upstream `a`) first,
/// `model-b` on `pb` (upstream `b`) second, plus `extra` policy text.
pub async fn two_models(a: &Upstream, b: &Upstream, extra: &str) -> Gw {
    gateway(
        &config(&[("pa", &a.url), ("pb", &b.url)]),
        policy(&[("model-a", "pa"), ("model-b", "pb")], extra),
    )
    .await
}

pub async fn gateway(config: &str, policy: CompiledPolicy) -> Gw {
    let cfg = Config::parse("test.yaml", config, Path::new("."), &|_| {
        Some("test-key".into())
    })
    .unwrap();
    let gw = Gateway::new(cfg, Arc::new(FixedPolicy::new(policy)), Default::default()).unwrap();
    serve_gateway(gw).await
}

/// Serve an already built gateway on an ephemeral port.
pub async fn serve_gateway(gw: Arc<Gateway>) -> Gw {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(routeplane::gateway::server::serve(
        listener,
        gw.clone(),
        std::future::pending(),
    ));
    Gw {
        url,
        gw,
        client: reqwest::Client::new(),
    }
}

impl Gw {
    pub fn chat(&self, key: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .json(&body)
    }

    /// A chat request with this exact body, byte for byte.
    pub fn chat_raw(&self, key: &str, body: &'static str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
    }
}

pub fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// A policy: chat models `(name, provider)` as the candidates of the one
/// route, in order, plus `extra` (a `protect { }` block, constraints...).
pub fn policy(models: &[(&str, &str)], extra: &str) -> CompiledPolicy {
    let mut src = String::from("tenant { plan: enum(free, pro) = pro }\n");
    let mut providers: Vec<&str> = Vec::new();
    for (_, p) in models {
        if !providers.contains(p) {
            providers.push(p);
        }
    }
    for p in providers {
        src.push_str(&format!("provider {p} {{ region us }}\n"));
    }
    for (m, p) in models {
        src.push_str(&format!("model {m} {{ provider {p} kind chat context 128k price in $1 out $2 per 1M quality 0.5 }}\n"));
    }
    let names: Vec<&str> = models.iter().map(|(m, _)| *m).collect();
    src.push_str(&format!("classify {{ chat otherwise }}\nroute chat {{ candidates [{}] score 1 * quality }}\n{extra}\n", names.join(", ")));
    let mut sources = routeplane::source::Sources::new();
    sources.add("test.route", src.clone());
    match routeplane::gateway::engine::compile(&sources) {
        Ok(p) => p,
        Err(a) => panic!(
            "{src}\n{:#?}",
            a.errors().map(|d| d.message.clone()).collect::<Vec<_>>()
        ),
    }
}

/// A config with one `openai`-kind provider per upstream and tenant `demo` (key `sk-demo`).
pub fn config(providers: &[(&str, &str)]) -> String {
    let mut s = String::from("policy: unused\ntenants:\n  - id: demo\n    key: sk-demo\n  - id: other\n    key: sk-other\nproviders:\n");
    for (name, url) in providers {
        s.push_str(&format!(
            "  - name: {name}\n    kind: openai\n    base_url: {url}\n    api_key_env: KEY\n"
        ));
    }
    s
}

/// An upstream that answers every request with `respond(request_body)`: a
/// complete raw HTTP response (status line, headers, body).
pub async fn raw_upstream(
    respond: impl Fn(&serde_json::Value) -> String + Send + Sync + 'static,
) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let raw_bodies = Arc::new(Mutex::new(Vec::new()));
    let respond = Arc::new(respond);
    let (h, b, rb) = (hits.clone(), bodies.clone(), raw_bodies.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (h, b, rb, respond) = (h.clone(), b.clone(), rb.clone(), respond.clone());
            tokio::spawn(async move {
                while let Some((_head, body)) = read_request(&mut sock).await {
                    h.fetch_add(1, Ordering::SeqCst);
                    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let out = respond(&json);
                    b.lock().unwrap().push(json);
                    rb.lock().unwrap().push(body.to_vec());
                    if sock.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Upstream {
        url,
        hits,
        bodies,
        raw_bodies,
    }
}

pub fn http_json(status: u16, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

pub fn http_sse(events: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{events}",
        events.len()
    )
}

/// An upstream that reads one request (head and body, by content-length),
/// then runs `act` on the socket: for faults no scripted [`Act`] covers.
pub async fn socket_upstream<F, Fut>(act: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let act = Arc::new(act);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let act = act.clone();
            tokio::spawn(async move {
                // Read the head and the body (by content-length) before acting.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text
                            .get(..head_end)
                            .unwrap_or("")
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= head_end + 4 + len {
                            break;
                        }
                    }
                }
                act(sock).await;
            });
        }
    });
    url
}
