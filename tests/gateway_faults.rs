//! The upstream faults of the reliability issue that `gateway_dispatch.rs`
//! does not already cover: connection refused, malformed JSON, a response
//! that never ends, a body trickled byte by byte, and a breaker recovering
//! through a half-open probe. For each: no request outlives its timeout, and
//! the client gets the fallback model or a clear error.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod gateway_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

fn hello() -> Value {
    json!({ "model": "auto", "messages": [{ "role": "user", "content": "hi" }] })
}

const CHAT_OK: &str = r#"{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"from fault"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

async fn a_then_healthy_b(url_a: &str, protect: &str) -> (Gw, Upstream) {
    let b = upstream("b", |_| Act::Ok).await;
    let gw = gateway(
        &config(&[("pa", url_a), ("pb", &b.url)]),
        policy(&[("model-a", "pa"), ("model-b", "pb")], protect),
    )
    .await;
    (gw, b)
}

#[tokio::test]
async fn connection_refused_falls_back_at_once() {
    // Bind then drop: nothing listens on this port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (gw, b) = a_then_healthy_b(
        &format!("http://127.0.0.1:{port}/v1"),
        "protect { retry 1 on [connect] backoff 10ms..20ms }",
    )
    .await;
    let start = Instant::now();
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert_eq!(b.hits(), 1);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn connection_refused_everywhere_is_a_clear_502() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let gw = gateway(&config(&[("pa", &url)]), policy(&[("model-a", "pa")], "")).await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert!(matches!(r.status().as_u16(), 502 | 503), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("model-a"),
        "the error should list the attempt: {msg}"
    );
}

#[tokio::test]
async fn malformed_json_from_the_upstream_is_not_passed_off_as_an_answer() {
    let url = socket_upstream(|mut s| async move {
        let body = "{\"choices\": [ this is not json";
        let _ = s
            .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
            .await;
    })
    .await;
    let (gw, b) = a_then_healthy_b(&url, "").await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-routeplane-model"),
        "model-b",
        "a broken answer must fall back"
    );
    assert_eq!(b.hits(), 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "hello from b");
}

/// A proxy in front of the upstream answering its HTML error page with a
/// 200: chat completions are JSON whatever the content type says.
#[tokio::test]
async fn an_html_page_with_a_200_is_not_passed_off_as_an_answer() {
    let url = socket_upstream(|mut s| async move {
        let body = "<html><body>Bad Gateway</body></html>";
        let _ = s
            .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
            .await;
    })
    .await;
    let (gw, b) = a_then_healthy_b(&url, "").await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert_eq!(b.hits(), 1);
}

/// Some OpenAI-compatible servers and proxies report an overload or a
/// content error as an `error` object with a 200. It is not an answer: the
/// client got it with a 200 (and the breakers heard of a success) before.
#[tokio::test]
async fn an_error_object_with_a_200_is_not_passed_off_as_an_answer() {
    let url = socket_upstream(|mut s| async move {
        let body = r#"{"error": {"message": "The server is overloaded", "type": "server_error", "code": null}}"#;
        let _ = s
            .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
            .await;
    })
    .await;
    let (gw, b) = a_then_healthy_b(&url, "").await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-routeplane-model"),
        "model-b",
        "an error with a 200 must fall back"
    );
    assert_eq!(b.hits(), 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "hello from b");
}

/// The same page behind an event-stream header, to a streaming request:
/// nothing reached the client yet, so the next model answers.
#[tokio::test]
async fn a_stream_of_no_json_events_is_not_passed_off_as_an_answer() {
    stream_falls_back_from(
        "data: <html><body>Bad Gateway</body></html>\n\n",
        "Bad Gateway",
    )
    .await;
}

/// A streaming request to a model whose upstream sends `body` as a 200
/// event stream, then to a healthy one: the healthy one answers, and
/// nothing of `body` (`shows`) reaches the client.
async fn stream_falls_back_from(body: &'static str, shows: &str) {
    let url = socket_upstream(move |mut s| async move {
        let _ = s
            .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
            .await;
    })
    .await;
    let (gw, b) = a_then_healthy_b(&url, "").await;
    let mut streaming = hello();
    streaming["stream"] = Value::Bool(true);
    let r = gw.chat("sk-demo", streaming).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    let text = r.text().await.unwrap();
    assert!(!text.contains(shows), "{text}");
    assert!(text.contains("[DONE]"), "{text}");
    assert_eq!(b.hits(), 1);
}

/// A stream that opens with an error event (OpenAI-compatible servers and
/// routers report an overload so, with a 200): nothing reached the client
/// yet, so the next model answers. Before, the client got a 200 stream
/// holding only the upstream's error and then the gateway's.
#[tokio::test]
async fn a_stream_that_begins_with_an_error_event_falls_back() {
    stream_falls_back_from(
        "data: {\"error\":{\"message\":\"The server is overloaded\",\"type\":\"server_error\"}}\n\n",
        "overloaded",
    )
    .await;
}

#[tokio::test]
async fn a_response_that_never_ends_times_out_and_falls_back() {
    let url = socket_upstream(|mut s| async move {
        // Promise a body and never finish it.
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"choices\":").await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
    })
    .await;
    let (gw, b) = a_then_healthy_b(&url, "protect { timeout total 1s }").await;
    let start = Instant::now();
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    let took = start.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert_eq!(b.hits(), 1);
    assert!(
        took < Duration::from_secs(4),
        "the hung upstream held the request for {took:?}"
    );
}

#[tokio::test]
async fn a_body_trickled_byte_by_byte_hits_the_total_timeout() {
    let url = socket_upstream(|mut s| async move {
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
    .await;
    let (gw, b) = a_then_healthy_b(&url, "protect { timeout total 1s }").await;
    let start = Instant::now();
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    let took = start.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert_eq!(b.hits(), 1);
    assert!(
        took < Duration::from_secs(4),
        "a trickling upstream held the request for {took:?}"
    );
}

#[tokio::test]
async fn a_slow_total_everywhere_is_a_504_within_the_timeout() {
    let url = socket_upstream(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{")
            .await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
    })
    .await;
    let gw = gateway(
        &config(&[("pa", &url)]),
        policy(&[("model-a", "pa")], "protect { timeout total 500ms }"),
    )
    .await;
    let start = Instant::now();
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    let v: Value = r.json().await.unwrap();
    assert!(!v["error"]["message"].as_str().unwrap().is_empty());
}

/// An upstream's 400 is about the request, not the upstream: however many a
/// client provokes, the breaker stays closed for everyone else.
#[tokio::test]
async fn client_errors_do_not_open_a_breaker() {
    let a = upstream("a", |n| {
        if n < 5 {
            Act::Status(400, None)
        } else {
            Act::Ok
        }
    })
    .await;
    let b = upstream("b", |_| Act::Ok).await;
    let protect = "protect { breaker per model open after 2 failures within 10s, probe after 10s }";
    let gw = two_models(&a, &b, protect).await;
    for _ in 0..5 {
        let r = gw.chat("sk-demo", hello()).send().await.unwrap();
        assert_eq!(r.status(), 400);
    }
    assert_eq!(
        a.hits(),
        5,
        "each bad request reached model-a and came back 400"
    );
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(
        header(&r, "x-routeplane-model"),
        "model-a",
        "the breaker opened"
    );
    let states = gw.gw.breaker_states();
    assert!(
        states
            .iter()
            .all(|(_, s)| *s == routeplane::gateway::engine::BreakerState::Closed),
        "{states:?}"
    );
}

/// A 404 is the upstream's: a retired or misnamed model answers it to every
/// request, so its breaker opens and later requests go to the next model.
#[tokio::test]
async fn a_model_that_answers_404_is_cooled_down() {
    let a = upstream("a", |_| Act::Status(404, None)).await;
    let b = upstream("b", |_| Act::Ok).await;
    let protect = "protect { breaker per model open after 2 failures within 10s, probe after 10s }";
    let gw = two_models(&a, &b, protect).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(
                gw.chat("sk-demo", hello())
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16(),
            );
        }
        v
    };
    assert_eq!(statuses, [404, 404, 200, 200]);
    assert_eq!(a.hits(), 2);
}

#[tokio::test]
async fn a_breaker_recovers_through_a_half_open_probe() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let a = upstream("a", move |_| {
        if h.load(Ordering::SeqCst) {
            Act::Ok
        } else {
            Act::Status(500, None)
        }
    })
    .await;
    let b = upstream("b", |_| Act::Ok).await;
    let protect =
        "protect { breaker per model open after 2 failures within 10s, probe after 300ms }";
    let gw = two_models(&a, &b, protect).await;
    for _ in 0..3 {
        let r = gw.chat("sk-demo", hello()).send().await.unwrap();
        assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    }
    assert_eq!(a.hits(), 2, "the breaker opened after two failures");
    // The upstream heals; after the cool-down one probe goes through and closes the breaker.
    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(
        header(&r, "x-routeplane-model"),
        "model-a",
        "the half-open probe should go to model-a"
    );
    let states = gw.gw.breaker_states();
    assert!(
        states.iter().any(|(k, s)| k == "model:model-a"
            && *s == routeplane::gateway::engine::BreakerState::Closed),
        "{states:?}"
    );
    for _ in 0..3 {
        let r = gw.chat("sk-demo", hello()).send().await.unwrap();
        assert_eq!(header(&r, "x-routeplane-model"), "model-a");
    }
}
