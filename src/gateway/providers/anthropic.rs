//! The Anthropic Messages API, translated to and from chat completions,
//! streaming events included.

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use serde_json::{json, Map, Value};

use super::{
    http, retry_after, AttemptError, ByteStream, ClientBody, Reply, Upstream, UpstreamRequest,
    Usage,
};
use crate::gateway::engine::Endpoint;
use crate::gateway::sse;

/// The `anthropic-version` header sent with every request.
pub const VERSION: &str = "2023-06-01";
/// Where chat completions go, under the provider's `base_url`.
pub const MESSAGES_PATH: &str = "/messages";
/// Messages requires `max_tokens`; chat completions does not.
const DEFAULT_MAX_TOKENS: u64 = 4096;

pub async fn send(up: &Upstream, req: UpstreamRequest<'_>) -> Result<Reply, AttemptError> {
    let (Endpoint::Chat, ClientBody::Json(body)) = (req.endpoint, req.body) else {
        return Err(AttemptError::Unsupported(super::endpoint_name(
            req.endpoint,
        )));
    };
    let translated = to_messages(body.value(), req.model, req.stream);
    let resp = up
        .post(MESSAGES_PATH, None, Bytes::from(translated.to_string()))
        .await?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        let ra = retry_after(resp.headers());
        let body = http::read_body(resp).await.unwrap_or_default();
        return Err(AttemptError::Status {
            status,
            retry_after: ra,
            body,
        });
    }
    if req.stream {
        return Ok(Reply::Stream(translate_stream(
            http::body_stream(resp),
            req.model.to_string(),
        )));
    }
    let raw = http::read_body(resp).await?;
    let v: Value = serde_json::from_slice(&raw)
        .map_err(|e| AttemptError::Protocol(format!("invalid JSON from anthropic: {e}")))?;
    let (out, usage) = from_message(&v, req.model);
    Ok(Reply::Full {
        content_type: "application/json".into(),
        body: Bytes::from(out.to_string()),
        usage: Some(usage),
    })
}

/// Chat completions request -> Messages request.
pub fn to_messages(body: &Value, model: &str, stream: bool) -> Value {
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        match role {
            "system" | "developer" => system.push(text_of(m.get("content"))),
            "tool" => {
                let block = json!({ "type": "tool_result",
                    "tool_use_id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
                    "content": text_of(m.get("content")) });
                push(&mut messages, "user", vec![block]);
            }
            "assistant" => {
                let mut blocks = content_blocks(m.get("content"));
                for call in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let f = call.get("function");
                    let args = f
                        .and_then(|f| f.get("arguments"))
                        .and_then(Value::as_str)
                        .unwrap_or("{}");
                    blocks.push(json!({ "type": "tool_use", "id": call.get("id").cloned().unwrap_or(Value::Null),
                        "name": f.and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null),
                        "input": serde_json::from_str::<Value>(args).unwrap_or_else(|_| json!({})) }));
                }
                push(&mut messages, "assistant", blocks);
            }
            _ => push(&mut messages, "user", content_blocks(m.get("content"))),
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    let max = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = body.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function"))
            .map(|f| json!({ "name": f.get("name").cloned().unwrap_or(Value::Null),
                             "description": f.get("description").cloned().unwrap_or(json!("")),
                             "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})) }))
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    if stream {
        out.insert("stream".into(), json!(true));
    }
    Value::Object(out)
}

/// Consecutive messages of one role are merged: Messages requires alternation.
fn push(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if let Some(last) = messages.last_mut() {
        if last.get("role").and_then(Value::as_str) == Some(role) {
            if let Some(c) = last.get_mut("content").and_then(Value::as_array_mut) {
                c.extend(blocks);
                return;
            }
        }
    }
    messages.push(json!({ "role": role, "content": blocks }));
}

fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

fn content_blocks(content: Option<&Value>) -> Vec<Value> {
    match content {
        Some(Value::String(s)) if !s.is_empty() => vec![json!({ "type": "text", "text": s })],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => Some(
                    json!({ "type": "text", "text": p.get("text").cloned().unwrap_or(json!("")) }),
                ),
                Some("image_url") => {
                    let url = p
                        .get("image_url")
                        .and_then(|i| i.get("url"))
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    Some(image_block(url))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn image_block(url: &str) -> Value {
    // data:image/png;base64,....
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((media, data)) = rest.split_once(";base64,") {
            return json!({ "type": "image", "source": { "type": "base64", "media_type": media, "data": data } });
        }
    }
    json!({ "type": "image", "source": { "type": "url", "url": url } })
}

fn finish_reason(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        _ => "stop",
    }
}

/// Messages response -> chat completion.
pub fn from_message(v: &Value, model: &str) -> (Value, Usage) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in v
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or_default()),
            Some("tool_use") => calls.push(json!({ "id": block.get("id").cloned().unwrap_or(Value::Null), "type": "function",
                "function": { "name": block.get("name").cloned().unwrap_or(Value::Null),
                              "arguments": block.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into()) } })),
            _ => {}
        }
    }
    let u = v.get("usage");
    let usage = Usage {
        prompt_tokens: u
            .and_then(|u| u.get("input_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
        completion_tokens: u
            .and_then(|u| u.get("output_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
    };
    let mut message = json!({ "role": "assistant", "content": text });
    if !calls.is_empty() {
        if let Some(m) = message.as_object_mut() {
            m.insert("tool_calls".into(), Value::Array(calls));
        }
    }
    let out = json!({
        "id": v.get("id").cloned().unwrap_or(json!("msg")), "object": "chat.completion", "created": 0, "model": model,
        "choices": [{ "index": 0, "message": message, "finish_reason": finish_reason(v.get("stop_reason").and_then(Value::as_str)) }],
        "usage": { "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                   "total_tokens": usage.prompt_tokens + usage.completion_tokens },
    });
    (out, usage)
}

/// Translation state for one stream.
struct StreamState {
    parser: sse::Parser,
    id: String,
    model: String,
    usage: Usage,
    /// Tool call index by content block index.
    tool_index: Vec<(u64, usize)>,
    done: bool,
}

impl StreamState {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        sse::data(
            &json!({ "id": self.id, "object": "chat.completion.chunk", "created": 0, "model": self.model,
                            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] }),
        )
    }

    /// One Anthropic event -> zero or more OpenAI chunks.
    fn event(&mut self, e: &sse::Event, out: &mut Vec<u8>) -> Result<(), AttemptError> {
        let Ok(v) = serde_json::from_str::<Value>(&String::from_utf8_lossy(&e.data)) else {
            return Ok(());
        };
        let ty = v
            .get("type")
            .and_then(Value::as_str)
            .or(e.event.as_deref())
            .unwrap_or_default();
        match ty {
            "message_start" => {
                let m = v.get("message");
                if let Some(id) = m.and_then(|m| m.get("id")).and_then(Value::as_str) {
                    self.id = id.to_string();
                }
                self.usage.prompt_tokens = m
                    .and_then(|m| m.get("usage"))
                    .and_then(|u| u.get("input_tokens"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                out.extend_from_slice(
                    &self.chunk(json!({ "role": "assistant", "content": "" }), None),
                );
            }
            "content_block_start" => {
                let block = v.get("content_block");
                if block.and_then(|b| b.get("type")).and_then(Value::as_str) == Some("tool_use") {
                    let idx = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let n = self.tool_index.len();
                    self.tool_index.push((idx, n));
                    let call = json!({ "index": n, "id": block.and_then(|b| b.get("id")).cloned().unwrap_or(Value::Null), "type": "function",
                        "function": { "name": block.and_then(|b| b.get("name")).cloned().unwrap_or(Value::Null), "arguments": "" } });
                    out.extend_from_slice(&self.chunk(json!({ "tool_calls": [call] }), None));
                }
            }
            "content_block_delta" => {
                let d = v.get("delta");
                match d.and_then(|d| d.get("type")).and_then(Value::as_str) {
                    Some("text_delta") => {
                        let t = d.and_then(|d| d.get("text")).cloned().unwrap_or(json!(""));
                        out.extend_from_slice(&self.chunk(json!({ "content": t }), None));
                    }
                    Some("input_json_delta") => {
                        let idx = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let n = self
                            .tool_index
                            .iter()
                            .find(|(i, _)| *i == idx)
                            .map_or(0, |(_, n)| *n);
                        let part = d
                            .and_then(|d| d.get("partial_json"))
                            .cloned()
                            .unwrap_or(json!(""));
                        out.extend_from_slice(&self.chunk(json!({ "tool_calls": [{ "index": n, "function": { "arguments": part } }] }), None));
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(o) = v
                    .get("usage")
                    .and_then(|u| u.get("output_tokens"))
                    .and_then(Value::as_u64)
                {
                    self.usage.completion_tokens = o;
                }
                let stop = v
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str);
                out.extend_from_slice(&self.chunk(json!({}), Some(finish_reason(stop))));
            }
            "message_stop" => {
                let u = self.usage;
                out.extend_from_slice(&sse::data(&json!({ "id": self.id, "object": "chat.completion.chunk", "created": 0, "model": self.model, "choices": [],
                    "usage": { "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.prompt_tokens + u.completion_tokens } })));
                out.extend_from_slice(&sse::done());
                self.done = true;
            }
            "error" => {
                let msg = v
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("anthropic stream error");
                return Err(AttemptError::Protocol(msg.to_string()));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Anthropic SSE bytes -> OpenAI chunk SSE bytes. A stream that ends without
/// `message_stop` simply ends: dispatch sees no `[DONE]` and reports the cut.
pub fn translate_stream(upstream: ByteStream, model: String) -> ByteStream {
    let state = StreamState {
        parser: sse::Parser::new(),
        id: "msg".into(),
        model,
        usage: Usage::default(),
        tool_index: Vec::new(),
        done: false,
    };
    Box::pin(stream::unfold(
        (upstream, state),
        |(mut up, mut st)| async move {
            loop {
                if st.done {
                    return None;
                }
                let chunk = match up.next().await? {
                    Ok(c) => c,
                    Err(e) => return Some((Err(e), (up, st))),
                };
                let mut out = Vec::new();
                for e in st.parser.feed(&chunk) {
                    if let Err(err) = st.event(&e, &mut out) {
                        st.done = true;
                        return Some((Err(err), (up, st)));
                    }
                }
                if !out.is_empty() {
                    return Some((Ok(Bytes::from(out)), (up, st)));
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_translate_system_tools_and_images() {
        let body = json!({ "model": "auto", "max_tokens": 50, "stop": "END", "temperature": 0.2,
            "messages": [
                { "role": "system", "content": "be brief" },
                { "role": "user", "content": [{ "type": "text", "text": "what is" }, { "type": "image_url", "image_url": { "url": "data:image/png;base64,AAA" } }] },
                { "role": "assistant", "content": null, "tool_calls": [{ "id": "c1", "type": "function", "function": { "name": "f", "arguments": "{\"x\":1}" } }] },
                { "role": "tool", "tool_call_id": "c1", "content": "42" },
                { "role": "user", "content": "thanks" }
            ],
            "tools": [{ "type": "function", "function": { "name": "f", "parameters": { "type": "object" } } }] });
        let out = to_messages(&body, "claude-x", true);
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["system"], "be brief");
        assert_eq!(out["max_tokens"], 50);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["stream"], true);
        assert_eq!(
            out["messages"][0]["content"][1]["source"]["media_type"],
            "image/png"
        );
        assert_eq!(out["messages"][1]["content"][0]["input"], json!({ "x": 1 }));
        // the tool result and the next user message merge into one user turn
        assert_eq!(out["messages"][2]["content"][0]["type"], "tool_result");
        assert_eq!(out["messages"][2]["content"][1]["text"], "thanks");
        assert_eq!(out["tools"][0]["input_schema"], json!({ "type": "object" }));
    }

    #[test]
    fn responses_translate_back() {
        let v = json!({ "id": "msg_1", "content": [{ "type": "text", "text": "hi" }, { "type": "tool_use", "id": "t", "name": "f", "input": { "a": 1 } }],
                        "stop_reason": "tool_use", "usage": { "input_tokens": 5, "output_tokens": 7 } });
        let (out, usage) = from_message(&v, "claude-x");
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 5,
                completion_tokens: 7
            }
        );
        assert_eq!(out["choices"][0]["message"]["content"], "hi");
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
    }

    #[tokio::test]
    async fn streams_translate_to_chunks_and_done() {
        let events = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m1\",\"usage\":{\"input_tokens\":3}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let chunks: Vec<Result<Bytes, AttemptError>> = events
            .as_bytes()
            .chunks(7)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let out: Vec<_> = translate_stream(Box::pin(stream::iter(chunks)), "claude-x".into())
            .collect()
            .await;
        let text: String = out
            .into_iter()
            .map(|r| String::from_utf8(r.unwrap().to_vec()).unwrap())
            .collect();
        let mut p = sse::Parser::new();
        let evs = p.feed(text.as_bytes());
        let content: String = evs
            .iter()
            .filter_map(|e| serde_json::from_slice::<Value>(&e.data).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(content, "Hello");
        assert_eq!(evs.last().unwrap().data, b"[DONE]");
        assert!(text.contains("\"completion_tokens\":2"));
    }
}
