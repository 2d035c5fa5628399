//! The built-in mock provider: deterministic answers with configurable
//! latency, first-token delay, error rate and usage, answered in-process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use serde_json::json;

use super::{AttemptError, ClientBody, Reply, UpstreamRequest, Usage};
use crate::config::MockSettings;
use crate::gateway::engine::Endpoint;
use crate::gateway::sse;

/// Whether request number `n` (0-based) fails: exactly `round(k * rate)` of
/// the first `k` requests do, spread evenly.
fn fails(n: u64, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
}

fn prompt_tokens(m: &MockSettings, body: &ClientBody) -> u64 {
    m.prompt_tokens.unwrap_or_else(|| match body {
        // About four characters a token, like the estimators do for unknown tokenizers.
        ClientBody::Json(b) => (b.raw().len() as u64 / 4).max(1),
        ClientBody::Multipart { body, .. } => (body.len() as u64 / 4).max(1),
    })
}

/// Sleep for `d`; no time at all for zero. tokio's timer rounds a zero
/// sleep up to its next millisecond tick, which made a mock configured
/// without latency answer in about 1 ms.
async fn wait(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

pub async fn send(
    m: &MockSettings,
    seq: &AtomicU64,
    req: UpstreamRequest<'_>,
) -> Result<Reply, AttemptError> {
    let n = seq.fetch_add(1, Ordering::Relaxed);
    if fails(n, m.error_rate) {
        wait(m.first_token).await;
        let body = json!({ "error": { "message": "mock upstream error", "type": "server_error" } });
        return Err(AttemptError::Status {
            status: m.error_status,
            retry_after: None,
            body: Bytes::from(body.to_string()),
        });
    }
    let usage = Usage {
        prompt_tokens: prompt_tokens(m, req.body),
        completion_tokens: m.completion_tokens,
    };
    let words = reply_words(m.completion_tokens);
    if req.stream && req.endpoint == Endpoint::Chat {
        return Ok(Reply::Stream(stream_reply(
            m,
            req.model.to_string(),
            n,
            words,
            usage,
        )));
    }
    wait(m.latency).await;
    let id = format!("mock-{n}");
    let model = req.model;
    let (content_type, body) = match req.endpoint {
        Endpoint::Chat => (
            "application/json",
            json!({
                "id": id, "object": "chat.completion", "created": 0, "model": model,
                "choices": [{ "index": 0, "message": { "role": "assistant", "content": words.join("") }, "finish_reason": "stop" }],
                "usage": { "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                           "total_tokens": usage.prompt_tokens + usage.completion_tokens },
            })
            .to_string(),
        ),
        Endpoint::Embeddings => {
            let inputs = match req.body {
                ClientBody::Json(b) => b.value().get("input").and_then(|i| i.as_array()).map_or(1, Vec::len),
                ClientBody::Multipart { .. } => 1,
            };
            let data: Vec<_> = (0..inputs)
                .map(|i| json!({ "object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4] }))
                .collect();
            (
                "application/json",
                json!({ "object": "list", "model": model, "data": data,
                        "usage": { "prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens } })
                .to_string(),
            )
        }
        Endpoint::Images => (
            "application/json",
            json!({ "created": 0, "data": [{ "url": "https://example.invalid/mock.png", "revised_prompt": "a mock image" }] }).to_string(),
        ),
        Endpoint::AudioTranscription => ("application/json", json!({ "text": "mock transcription" }).to_string()),
        Endpoint::AudioSpeech => return Ok(Reply::Full { content_type: "audio/mpeg".into(), body: Bytes::from_static(b"ID3mock-audio"), usage: None }),
    };
    Ok(Reply::Full {
        content_type: content_type.into(),
        body: Bytes::from(body),
        usage: Some(usage),
    })
}

fn reply_words(tokens: u64) -> Vec<String> {
    const WORDS: [&str; 8] = [
        "This ",
        "is ",
        "a ",
        "mock ",
        "answer ",
        "from ",
        "routeplane",
        ". ",
    ];
    (0..tokens.max(1))
        .map(|i| {
            WORDS
                .get(i as usize % WORDS.len())
                .copied()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn stream_reply(
    m: &MockSettings,
    model: String,
    n: u64,
    words: Vec<String>,
    usage: Usage,
) -> super::ByteStream {
    let chunks = m.chunks.max(1) as usize;
    let per_chunk = words.len().div_ceil(chunks).max(1);
    let groups: Vec<String> = words.chunks(per_chunk).map(|c| c.concat()).collect();
    let gap =
        m.latency.saturating_sub(m.first_token) / u32::try_from(groups.len().max(1)).unwrap_or(1);
    let id = format!("mock-{n}");
    let chunk = move |delta: serde_json::Value, finish: Option<&str>| {
        sse::data(
            &json!({ "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] }),
        )
    };
    let mut events: Vec<(Duration, Bytes)> = Vec::new();
    events.push((
        m.first_token,
        chunk(json!({ "role": "assistant", "content": "" }), None),
    ));
    for g in groups {
        events.push((gap, chunk(json!({ "content": g }), None)));
    }
    events.push((Duration::ZERO, chunk(json!({}), Some("stop"))));
    let usage_chunk = json!({ "id": format!("mock-{n}"), "object": "chat.completion.chunk", "created": 0, "choices": [],
        "usage": { "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                   "total_tokens": usage.prompt_tokens + usage.completion_tokens } });
    events.push((Duration::ZERO, sse::data(&usage_chunk)));
    events.push((Duration::ZERO, sse::done()));
    Box::pin(stream::unfold(events.into_iter(), |mut it| async move {
        let (delay, bytes) = it.next()?;
        wait(delay).await;
        Some((Ok(bytes), it))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_rate_is_exact_and_spread() {
        let failed: Vec<u64> = (0..10).filter(|n| fails(*n, 0.3)).collect();
        assert_eq!(failed.len(), 3);
        assert_eq!((0..100).filter(|n| fails(*n, 0.02)).count(), 2);
        assert_eq!((0..100).filter(|n| fails(*n, 0.0)).count(), 0);
        assert_eq!((0..100).filter(|n| fails(*n, 1.0)).count(), 100);
    }
}
