//! The gateway driven by the official `openai` Python SDK, streaming and not,
//! including a denial and a stream cut halfway. Needs `.venv` with `openai`
//! (scripts/install-test-deps.sh); it fails, with that instruction, when it is missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod gateway_common;

use std::path::PathBuf;

use gateway_common::*;
use tokio::io::AsyncWriteExt;

const SCRIPT: &str = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="sk-demo", max_retries=0)
out = {}
r = c.chat.completions.create(model="model-a", messages=[{"role": "user", "content": "hi"}])
out["plain"] = r.choices[0].message.content
out["usage"] = r.usage.completion_tokens
raw = c.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": "hi"}])
out["header_model"] = raw.headers.get("x-routeplane-model")
s = c.chat.completions.create(model="model-a", stream=True, messages=[{"role": "user", "content": "hi"}])
out["stream"] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
try:
    c.chat.completions.create(model="model-c", messages=[{"role": "user", "content": "hi"}])
except openai.PermissionDeniedError as e:
    out["denied"] = e.message
try:
    s = c.chat.completions.create(model="model-b", stream=True, messages=[{"role": "user", "content": "hi"}])
    got = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
    out["cut"] = "no error, got " + got
except openai.APIError as e:
    out["cut"] = "error: " + e.message
try:
    s = c.chat.completions.create(model="model-d", stream=True, messages=[{"role": "user", "content": "hi"}])
    got = "".join(ch.choices[0].delta.content or "" for ch in s)
    out["cut_mid_event"] = "no error, got " + got
except openai.APIError as e:
    out["cut_mid_event"] = "error: " + e.message
except Exception as e:
    out["cut_mid_event"] = "not an APIError: " + repr(e)
print(json.dumps(out))
"#;

fn python() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = std::process::Command::new(&p)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(p)
}

#[tokio::test]
async fn the_official_openai_sdk_works_through_the_gateway() {
    // Never a silent skip: the suite's own script installs the SDK.
    let Some(py) = python() else {
        panic!("no .venv with the openai SDK: run `scripts/install-test-deps.sh` (scripts/test.sh does)");
    };
    let a = upstream("a", |_| Act::Ok).await;
    let b = upstream("b", |_| Act::CutAfter(2)).await;
    // Two whole chunks, then half an event and gone.
    let d = socket_upstream(|mut sock| async move {
        let chunk = r#"data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{chunk}\n\n{chunk}\n\ndata: {{\"trunc"
        );
        let _ = sock.write_all(answer.as_bytes()).await;
        // Dropping the socket closes it in the middle of the event.
    })
    .await;
    let p = policy(
        &[
            ("model-a", "pa"),
            ("model-b", "pb"),
            ("model-c", "pa"),
            ("model-d", "pd"),
        ],
        "constraints { no_c: deny [model-c] when tenant.plan == pro }",
    );
    let gw = gateway(&config(&[("pa", &a.url), ("pb", &b.url), ("pd", &d)]), p).await;
    let base = format!("{}/v1", gw.url);
    let out = tokio::process::Command::new(py)
        .args(["-c", SCRIPT, &base])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plain"], "hello from a");
    assert_eq!(v["usage"], 5);
    assert_eq!(v["header_model"], "model-a");
    assert_eq!(v["stream"], "hello from a!");
    assert!(
        v["denied"]
            .as_str()
            .unwrap()
            .contains("denied by rule `no_c`"),
        "{v}"
    );
    let cut = v["cut"].as_str().unwrap();
    let explained = cut.contains("before completion") || cut.contains("mid-stream");
    assert!(cut.starts_with("error: ") && explained, "{cut}");
    // Cut in the middle of an event: the SDK raises the gateway's error, not
    // a JSONDecodeError on half an event glued to it.
    let cut = v["cut_mid_event"].as_str().unwrap();
    let explained = cut.contains("before completion") || cut.contains("mid-stream");
    assert!(cut.starts_with("error: ") && explained, "{cut}");
}
