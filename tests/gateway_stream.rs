//! Streams through the real gateway on 127.0.0.1, against upstreams that
//! send their SSE bytes exactly as each test says: cut in the middle of an
//! event, usage the client did not ask for, keep-alives and role-only chunks
//! before a stall.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod gateway_common;

use std::time::Duration;

use gateway_common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn hello_stream() -> Value {
    json!({ "model": "auto", "stream": true, "messages": [{ "role": "user", "content": "hi" }] })
}

fn content_chunk(text: &str) -> String {
    let c = json!({ "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{ "index": 0, "delta": { "content": text }, "finish_reason": null }] });
    format!("data: {c}\n\n")
}

/// Each piece as one HTTP chunk, flushed, with a short pause between them
/// so the gateway reads them one by one.
async fn send_pieces(sock: &mut TcpStream, pieces: &[String]) {
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    sock.write_all(head.as_bytes()).await.unwrap();
    for p in pieces {
        let chunk = format!("{:x}\r\n{p}\r\n", p.len());
        if sock.write_all(chunk.as_bytes()).await.is_err() {
            return;
        }
        let _ = sock.flush().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The events of an SSE body, split at blank lines; the body must end with one.
fn whole_events(body: &str) -> Vec<&str> {
    assert!(
        body.ends_with("\n\n"),
        "the body ends inside an event: {body:?}"
    );
    body.trim_end_matches('\n').split("\n\n").collect()
}

#[tokio::test]
async fn a_cut_in_the_middle_of_an_event_drops_the_half_event_before_the_error_event() {
    let url = socket_upstream(|mut sock| async move {
        let pieces = [
            content_chunk("hello "),
            content_chunk("from "),
            "data: {\"trunc".to_string(),
        ];
        send_pieces(&mut sock, &pieces).await;
        // Vanish without the terminating chunk.
    })
    .await;
    let gw = gateway(&config(&[("pa", &url)]), policy(&[("model-a", "pa")], "")).await;
    let r = gw.chat("sk-demo", hello_stream()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let events = whole_events(&body);
    assert_eq!(events.len(), 3, "{body}");
    for e in &events {
        let data = e.strip_prefix("data: ").unwrap();
        let _: Value = serde_json::from_str(data).unwrap_or_else(|_| panic!("{e:?} in {body}"));
    }
    let last: Value = serde_json::from_str(events[2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "reset", "{last}");
    assert!(!body.contains("trunc"), "{body}");
}
