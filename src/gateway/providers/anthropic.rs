//! The Anthropic Messages API, translated to and from chat completions,
//! streaming events included.
//!
//! # Request mapping
//!
//! Nothing the client asked for is dropped without a word: every chat
//! completions parameter is translated, refused with a 400 naming it
//! ([`Untranslatable`]), or listed below as a deliberate omission.
//!
//! Translated:
//! - `messages`: `system` and `developer` turns join the top-level `system`;
//!   `tool` turns become `tool_result` blocks; assistant `tool_calls` become
//!   `tool_use` blocks; consecutive turns of one role merge. Content parts:
//!   `text`, `refusal` (as text), `image_url` (data URLs as base64, others as
//!   URL sources) and `file` with a base64 PDF in `file_data` (a `document`).
//! - `max_completion_tokens`, else `max_tokens` (the first that is a whole
//!   number, as the budget estimate reads them), else 4096: Messages requires it.
//! - `temperature` (0 to 1), `top_p` as they are; `stop` as `stop_sequences`.
//! - `tools` (function tools) as `tools` with `input_schema`.
//! - `tool_choice`: `"auto"` -> `{"type":"auto"}`, `"required"` ->
//!   `{"type":"any"}`, `"none"` -> `{"type":"none"}`, a named function ->
//!   `{"type":"tool","name":...}`. Without tools, `"auto"` and `"none"` say
//!   nothing and are not sent.
//! - `parallel_tool_calls: false` -> `disable_parallel_tool_use: true` in
//!   `tool_choice` (an `auto` one when the client gave none).
//! - `user` -> `metadata.user_id`.
//! - `response_format`: Messages has no JSON mode, so `json_object` adds a
//!   system instruction to answer with a single JSON object and nothing else,
//!   and `json_schema` adds the same instruction with the schema (its name and
//!   description too). This asks the model; it is not the constrained decoding
//!   OpenAI's `strict` gives, so clients should still parse defensively.
//! - `stream` as it is.
//!
//! Refused (they would change what the answer means, so a silent drop would
//! be a wrong answer): `n` other than 1, a `temperature` above 1 (OpenAI's
//! range is 0 to 2, Messages' 0 to 1), `logprobs: true`, `top_logprobs`,
//! a non-empty `logit_bias`, the legacy `functions` / `function_call` and
//! `function` role (use `tools`), audio output (`audio`, `modalities` other
//! than text), `web_search_options`, tools other than functions, and content
//! parts the Messages API cannot carry (`input_audio`, a `file` by `file_id`
//! or of another type than PDF, unknown part types, non-text parts in system
//! and tool turns). Such a request is never sent to this model: dispatch
//! tries the decision's next model (an OpenAI-compatible one may carry it),
//! and when none does the client gets an OpenAI-style 400 with `param` set.
//! The breakers do not count it: the upstream was never asked.
//!
//! Dropped on purpose, since they only tune sampling or bookkeeping and the
//! answer stays a faithful one: `seed`, `presence_penalty`,
//! `frequency_penalty`, `reasoning_effort`, `verbosity`, `prediction`,
//! `service_tier`, `store`, `metadata` (the gateway reads it for routing),
//! `stream_options` (the translated stream always ends with a usage chunk,
//! which the gateway reads and passes on only when the client asked for it
//! with `include_usage`: `gateway::relay`), a message's `name`, an
//! image's `detail` and a function's `strict`.

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
pub(super) const DEFAULT_MAX_TOKENS: u64 = 4096;
/// The system instruction standing in for `response_format: json_object`.
const JSON_INSTRUCTION: &str =
    "Respond with a single JSON object and nothing else: no prose before or after it, no code fences.";

/// A chat completions request the Messages API cannot carry as asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Untranslatable {
    /// The request parameter at fault, as OpenAI's `error.param`.
    pub param: String,
    pub message: String,
}

impl Untranslatable {
    fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Untranslatable {
            param: param.into(),
            message: message.into(),
        }
    }

    /// Dispatch tries the next model; a 400 naming `param` when none serves.
    pub fn into_attempt_error(self) -> AttemptError {
        AttemptError::Untranslatable {
            param: self.param,
            message: self.message,
        }
    }
}

pub async fn send(up: &Upstream, req: UpstreamRequest<'_>) -> Result<Reply, AttemptError> {
    let (Endpoint::Chat, ClientBody::Json(body)) = (req.endpoint, req.body) else {
        return Err(AttemptError::Unsupported(super::endpoint_name(
            req.endpoint,
        )));
    };
    let translated = match req.translated {
        Some(b) => b.clone(),
        None => Bytes::from(
            to_messages(body.value(), req.model, req.stream)
                .map_err(Untranslatable::into_attempt_error)?
                .to_string(),
        ),
    };
    let resp = up.post(MESSAGES_PATH, None, translated).await?;
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

/// Chat completions request -> Messages request; see the module docs for
/// what is translated, refused and dropped.
pub fn to_messages(body: &Value, model: &str, stream: bool) -> Result<Value, Untranslatable> {
    refuse_unsupported(body)?;
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let turns = body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for (i, m) in turns.enumerate() {
        let at = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        match role {
            "system" | "developer" => system.push(text_of(m.get("content"), &at)?),
            "tool" => {
                let block = json!({ "type": "tool_result",
                    "tool_use_id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
                    "content": text_of(m.get("content"), &at)? });
                push(&mut messages, "user", vec![block]);
            }
            "function" => {
                return Err(Untranslatable::new(
                    format!("{at}.role"),
                    format!("`{at}.role` is `function`, the legacy function calling, which anthropic models are not sent: use `tools` and `tool` turns"),
                ))
            }
            "assistant" => {
                if m.get("function_call").is_some_and(|f| !f.is_null()) {
                    return Err(Untranslatable::new(
                        format!("{at}.function_call"),
                        format!("`{at}.function_call` is the legacy function calling, which anthropic models are not sent: use `tool_calls`"),
                    ));
                }
                let mut blocks = content_blocks(m.get("content"), &at)?;
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
            _ => push(
                &mut messages,
                "user",
                content_blocks(m.get("content"), &at)?,
            ),
        }
    }
    if let Some(instruction) = json_instruction(body.get("response_format"))? {
        system.push(instruction);
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    // The first cap that is a number, in the order the budget estimate reads
    // them (`RequestFeatures::from_openai_json`): a present-but-null
    // `max_completion_tokens` must not hide `max_tokens`.
    let max = ["max_completion_tokens", "max_tokens"]
        .into_iter()
        .find_map(|k| body.get(k).and_then(Value::as_u64))
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
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
    let tools = tools(body.get("tools"))?;
    let has_tools = !tools.is_empty();
    if has_tools {
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = tool_choice(body, has_tools)? {
        out.insert("tool_choice".into(), choice);
    }
    match body.get("user") {
        None | Some(Value::Null) => {}
        Some(Value::String(u)) if u.is_empty() => {}
        Some(Value::String(u)) => {
            out.insert("metadata".into(), json!({ "user_id": u }));
        }
        Some(_) => return Err(Untranslatable::new("user", "`user` must be a string")),
    }
    if stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

/// The parameters that would change what the answer means and have no
/// Messages equivalent.
fn refuse_unsupported(body: &Value) -> Result<(), Untranslatable> {
    let given = |k: &str| body.get(k).filter(|v| !v.is_null());
    let refuse = |param: &str, why: String| Err(Untranslatable::new(param, why));
    if let Some(n) = given("n") {
        if n.as_u64() != Some(1) {
            return refuse(
                "n",
                format!("`n` is `{n}`: anthropic models return one choice per request, so `n` must be 1 (send separate requests for more)"),
            );
        }
    }
    if given("logprobs").is_some_and(|l| l != &Value::Bool(false)) {
        return refuse(
            "logprobs",
            "`logprobs` is not supported by anthropic models: they do not return token log probabilities".into(),
        );
    }
    if given("top_logprobs").is_some_and(|t| t.as_u64() != Some(0)) {
        return refuse(
            "top_logprobs",
            "`top_logprobs` is not supported by anthropic models: they do not return token log probabilities".into(),
        );
    }
    if given("logit_bias").is_some_and(|b| b.as_object().is_none_or(|b| !b.is_empty())) {
        return refuse(
            "logit_bias",
            "`logit_bias` is not supported by anthropic models: token biases cannot be applied"
                .into(),
        );
    }
    // Sent as it is, the upstream would answer a 400 that reaches the client
    // as its own fault, with no fallback, although an OpenAI-compatible model
    // takes it; rescaled or capped, it would be another temperature.
    if let Some(t) = given("temperature")
        .and_then(Value::as_f64)
        .filter(|t| *t > 1.0)
    {
        return refuse(
            "temperature",
            format!(
                "`temperature` is `{t}`: anthropic models take 0 to 1 (OpenAI's range is 0 to 2)"
            ),
        );
    }
    for (param, instead) in [("functions", "tools"), ("function_call", "tool_choice")] {
        if given(param).is_some() {
            return refuse(
                param,
                format!("`{param}` is the legacy function calling, which anthropic models are not sent: use `{instead}`"),
            );
        }
    }
    if given("audio").is_some() {
        return refuse(
            "audio",
            "`audio` output is not supported by anthropic models: they answer in text only".into(),
        );
    }
    if let Some(m) = given("modalities") {
        let text_only = m
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x.as_str() == Some("text")));
        if !text_only {
            return refuse(
                "modalities",
                format!("`modalities` is `{m}`: anthropic models answer in text only"),
            );
        }
    }
    if given("web_search_options").is_some() {
        return refuse(
            "web_search_options",
            "`web_search_options` is not supported by anthropic models through this gateway".into(),
        );
    }
    Ok(())
}

/// Function tools -> Messages tools; other kinds of tool are refused.
fn tools(tools: Option<&Value>) -> Result<Vec<Value>, Untranslatable> {
    let mut out = Vec::new();
    for (i, t) in tools
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
        let name = t
            .get("function")
            .and_then(|f| f.get("name"))
            .filter(|n| n.is_string());
        let (Some(f), Some(name), "function") = (t.get("function"), name, kind) else {
            return Err(Untranslatable::new(
                format!("tools[{i}]"),
                format!("`tools[{i}]` is not a function tool with a `function.name`: anthropic models are only sent function tools"),
            ));
        };
        out.push(json!({ "name": name,
            "description": f.get("description").cloned().unwrap_or(json!("")),
            "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})) }));
    }
    Ok(out)
}

/// `tool_choice` and `parallel_tool_calls` -> the Messages `tool_choice`.
fn tool_choice(body: &Value, has_tools: bool) -> Result<Option<Value>, Untranslatable> {
    let bad = |c: &Value| {
        Untranslatable::new(
            "tool_choice",
            format!("`tool_choice` is `{c}`: expected `auto`, `required`, `none` or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
        )
    };
    let mut choice = match body.get("tool_choice") {
        None | Some(Value::Null) => None,
        // Without tools these ask for what happens anyway.
        Some(Value::String(s)) if !has_tools && (s == "auto" || s == "none") => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({ "type": "auto" })),
            "required" => Some(json!({ "type": "any" })),
            "none" => Some(json!({ "type": "none" })),
            _ => return Err(bad(&Value::String(s.clone()))),
        },
        Some(c) => {
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (c.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => Some(json!({ "type": "tool", "name": name })),
                _ => return Err(bad(c)),
            }
        }
    };
    match body.get("parallel_tool_calls") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            if choice.is_none() && has_tools {
                choice = Some(json!({ "type": "auto" }));
            }
            // `none` calls no tool, so it takes no parallelism flag.
            if let Some(c) = choice.as_mut().and_then(Value::as_object_mut) {
                if c.get("type").and_then(Value::as_str) != Some("none") {
                    c.insert("disable_parallel_tool_use".into(), json!(true));
                }
            }
        }
        Some(_) => {
            return Err(Untranslatable::new(
                "parallel_tool_calls",
                "`parallel_tool_calls` must be true or false",
            ))
        }
    }
    Ok(choice)
}

/// The system instruction standing in for `response_format`, if any.
fn json_instruction(format: Option<&Value>) -> Result<Option<String>, Untranslatable> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(JSON_INSTRUCTION.into())),
        Some("json_schema") => {
            let spec = format.get("json_schema");
            let field = |k: &str| spec.and_then(|s| s.get(k)).filter(|v| !v.is_null());
            let mut text = JSON_INSTRUCTION.to_string();
            if let Some(name) = field("name").and_then(Value::as_str) {
                text.push_str(&format!(" The object is a `{name}`"));
                match field("description").and_then(Value::as_str) {
                    Some(d) => text.push_str(&format!(": {d}")),
                    None => text.push('.'),
                }
            }
            if let Some(schema) = field("schema") {
                text.push_str(&format!(
                    "\nIt must conform to this JSON Schema:\n{schema}"
                ));
            }
            Ok(Some(text))
        }
        _ => Err(Untranslatable::new(
            "response_format",
            format!("`response_format` is `{format}`: expected a `type` of `text`, `json_object` or `json_schema`"),
        )),
    }
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

/// The text of a system or tool turn, which may only hold text parts.
fn text_of(content: Option<&Value>, at: &str) -> Result<String, Untranslatable> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(Untranslatable::new(
                            format!("{at}.content[{j}]"),
                            format!("`{at}.content[{j}]` is a `{}` part: this turn may only hold text parts", kind.unwrap_or("untyped")),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Ok(String::new()),
    }
}

fn content_blocks(content: Option<&Value>, at: &str) -> Result<Vec<Value>, Untranslatable> {
    match content {
        Some(Value::String(s)) if !s.is_empty() => Ok(vec![json!({ "type": "text", "text": s })]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| content_block(p, &format!("{at}.content[{j}]")))
            .collect(),
        _ => Ok(Vec::new()),
    }
}

/// One content part -> one Messages block, or the reason it cannot be one.
fn content_block(p: &Value, at: &str) -> Result<Value, Untranslatable> {
    let cannot = |why: String| Err(Untranslatable::new(at, format!("`{at}` {why}")));
    match p.get("type").and_then(Value::as_str) {
        Some("text") => {
            Ok(json!({ "type": "text", "text": p.get("text").cloned().unwrap_or(json!("")) }))
        }
        Some("refusal") => {
            Ok(json!({ "type": "text", "text": p.get("refusal").cloned().unwrap_or(json!("")) }))
        }
        Some("image_url") => {
            let url = p
                .get("image_url")
                .and_then(|i| i.get("url"))
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty());
            match url {
                Some(url) => Ok(image_block(url)),
                None => cannot("is an `image_url` part without an `image_url.url`".into()),
            }
        }
        Some("file") => {
            let data = p
                .get("file")
                .and_then(|f| f.get("file_data"))
                .and_then(Value::as_str)
                .and_then(|d| d.strip_prefix("data:application/pdf;base64,"));
            match data {
                Some(data) => Ok(
                    json!({ "type": "document", "source": { "type": "base64", "media_type": "application/pdf", "data": data } }),
                ),
                None => cannot("is a `file` part anthropic models cannot be sent: only a PDF given inline as `file.file_data` (`data:application/pdf;base64,...`) is carried, not a `file_id` or another type".into()),
            }
        }
        Some("input_audio") => {
            cannot("is an `input_audio` part: anthropic models do not take audio input".into())
        }
        Some(other) => cannot(format!(
            "is a `{other}` part, which anthropic models cannot be sent"
        )),
        None => cannot("has no `type`".into()),
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
        // The model declined: OpenAI clients check for this, not `stop`.
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Seconds since the Unix epoch, for a translated answer's `created`
/// (Messages has no such field; clients sort and display by it).
fn created_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
        "id": v.get("id").cloned().unwrap_or(json!("msg")), "object": "chat.completion", "created": created_now(), "model": model,
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
    /// `created` of every chunk: one time for the whole stream, as OpenAI's.
    created: u64,
    usage: Usage,
    /// Tool call index by content block index.
    tool_index: Vec<(u64, usize)>,
    done: bool,
}

impl StreamState {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        sse::data(
            &json!({ "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
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
                out.extend_from_slice(&sse::data(&json!({ "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [],
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
        created: created_now(),
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
        let out = to_messages(&body, "claude-x", true).unwrap();
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

    /// A one-turn request with `extra` merged into its top level.
    fn translate(extra: Value) -> Result<Value, Untranslatable> {
        let mut body =
            json!({ "model": "auto", "messages": [{ "role": "user", "content": "hi" }] });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        to_messages(&body, "claude-x", false)
    }

    const TOOLS: &str = r#"[{ "type": "function", "function": { "name": "f", "parameters": { "type": "object" } } }]"#;

    fn with_tools(mut extra: Value) -> Value {
        extra["tools"] = serde_json::from_str(TOOLS).unwrap();
        extra
    }

    #[test]
    fn max_tokens_skips_a_null_max_completion_tokens() {
        let cases = [
            (
                json!({ "max_completion_tokens": null, "max_tokens": 10 }),
                10,
            ),
            (json!({ "max_completion_tokens": 7, "max_tokens": 10 }), 7),
            (json!({ "max_tokens": null }), DEFAULT_MAX_TOKENS),
            (json!({}), DEFAULT_MAX_TOKENS),
        ];
        for (extra, want) in cases {
            assert_eq!(
                translate(extra.clone()).unwrap()["max_tokens"],
                want,
                "{extra}"
            );
        }
    }

    #[test]
    fn tool_choice_maps_to_its_messages_form() {
        let cases = [
            (json!("auto"), json!({ "type": "auto" })),
            (json!("required"), json!({ "type": "any" })),
            (json!("none"), json!({ "type": "none" })),
            (
                json!({ "type": "function", "function": { "name": "f" } }),
                json!({ "type": "tool", "name": "f" }),
            ),
        ];
        for (choice, want) in cases {
            let out = translate(with_tools(json!({ "tool_choice": choice }))).unwrap();
            assert_eq!(out["tool_choice"], want, "{choice}");
        }
        assert!(translate(with_tools(json!({})))
            .unwrap()
            .get("tool_choice")
            .is_none());
        // without tools, `auto` and `none` ask for nothing
        assert!(translate(json!({ "tool_choice": "none" }))
            .unwrap()
            .get("tool_choice")
            .is_none());
    }

    #[test]
    fn parallel_tool_calls_false_disables_parallel_tool_use() {
        let cases = [
            (
                json!({}),
                json!({ "type": "auto", "disable_parallel_tool_use": true }),
            ),
            (
                json!({ "tool_choice": "required" }),
                json!({ "type": "any", "disable_parallel_tool_use": true }),
            ),
            (
                json!({ "tool_choice": { "type": "function", "function": { "name": "f" } } }),
                json!({ "type": "tool", "name": "f", "disable_parallel_tool_use": true }),
            ),
            (json!({ "tool_choice": "none" }), json!({ "type": "none" })),
        ];
        for (mut extra, want) in cases {
            extra["parallel_tool_calls"] = json!(false);
            let out = translate(with_tools(extra.clone())).unwrap();
            assert_eq!(out["tool_choice"], want, "{extra}");
        }
        let out = translate(with_tools(json!({ "parallel_tool_calls": true }))).unwrap();
        assert!(out.get("tool_choice").is_none());
    }

    #[test]
    fn user_becomes_metadata_user_id() {
        let out = translate(json!({ "user": "u-42" })).unwrap();
        assert_eq!(out["metadata"], json!({ "user_id": "u-42" }));
        assert!(translate(json!({})).unwrap().get("metadata").is_none());
    }

    #[test]
    fn response_format_becomes_a_system_instruction() {
        let out = translate(json!({ "response_format": { "type": "json_object" } })).unwrap();
        assert_eq!(out["system"], JSON_INSTRUCTION);

        let body = json!({ "model": "auto", "messages": [
                { "role": "system", "content": "be brief" }, { "role": "user", "content": "hi" }],
            "response_format": { "type": "json_schema", "json_schema": { "name": "answer",
                "schema": { "type": "object", "properties": { "a": { "type": "integer" } }, "required": ["a"] } } } });
        let out = to_messages(&body, "claude-x", false).unwrap();
        let system = out["system"].as_str().unwrap();
        assert!(system.starts_with("be brief\n\n"), "{system}");
        assert!(system.contains(JSON_INSTRUCTION), "{system}");
        assert!(system.contains("`answer`"), "{system}");
        assert!(
            system.contains(
                r#"{"properties":{"a":{"type":"integer"}},"required":["a"],"type":"object"}"#
            ),
            "{system}"
        );

        let out = translate(json!({ "response_format": { "type": "text" } })).unwrap();
        assert!(out.get("system").is_none());
    }

    #[test]
    fn sampling_hints_without_an_equivalent_are_dropped() {
        let out = translate(
            json!({ "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.5,
            "n": 1, "logprobs": false, "logit_bias": {} }),
        )
        .unwrap();
        for key in [
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "n",
            "logprobs",
            "logit_bias",
        ] {
            assert!(out.get(key).is_none(), "{key} was sent");
        }
    }

    #[test]
    fn answer_changing_parameters_are_refused_by_name() {
        let cases = [
            (json!({ "n": 2 }), "n"),
            (json!({ "n": 0 }), "n"),
            (json!({ "logprobs": true }), "logprobs"),
            (json!({ "top_logprobs": 3 }), "top_logprobs"),
            (json!({ "logit_bias": { "50256": -100 } }), "logit_bias"),
            (json!({ "temperature": 1.2 }), "temperature"),
            (json!({ "functions": [{ "name": "f" }] }), "functions"),
            (json!({ "function_call": "auto" }), "function_call"),
            (json!({ "modalities": ["text", "audio"] }), "modalities"),
            (
                json!({ "audio": { "voice": "alloy", "format": "wav" } }),
                "audio",
            ),
            (json!({ "web_search_options": {} }), "web_search_options"),
            (json!({ "tool_choice": "sometimes" }), "tool_choice"),
            (
                with_tools(json!({ "tool_choice": { "type": "function" } })),
                "tool_choice",
            ),
            (
                json!({ "tools": [{ "type": "custom", "custom": { "name": "c" } }] }),
                "tools[0]",
            ),
            (
                json!({ "parallel_tool_calls": "no" }),
                "parallel_tool_calls",
            ),
            (json!({ "user": 42 }), "user"),
            (
                json!({ "response_format": { "type": "xml" } }),
                "response_format",
            ),
        ];
        for (extra, param) in cases {
            let err = translate(extra.clone()).unwrap_err();
            assert_eq!(err.param, param, "{extra}");
            assert!(
                err.message.contains(&format!("`{param}`")),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn stop_reasons_and_creation_time_read_as_openai_clients_expect() {
        for (stop, want) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            let (answer, _) = from_message(
                &json!({ "content": [{ "type": "text", "text": "x" }], "stop_reason": stop }),
                "m",
            );
            assert_eq!(answer["choices"][0]["finish_reason"], want, "{stop}");
            // A real time, not 0 (1970), which clients show and sort by.
            assert!(answer["created"].as_u64().unwrap() > 1_700_000_000);
        }
    }

    #[test]
    fn temperatures_anthropic_takes_are_carried_as_they_are() {
        for t in [json!(0), json!(0.7), json!(1), json!(1.0)] {
            let out = translate(json!({ "temperature": t.clone() })).unwrap();
            assert_eq!(out["temperature"], t);
        }
    }

    #[test]
    fn content_parts_are_carried_or_refused() {
        let turn = |part: Value| json!({ "messages": [{ "role": "user", "content": [{ "type": "text", "text": "see" }, part] }] });
        let out = translate(turn(json!({ "type": "file", "file": { "filename": "a.pdf",
            "file_data": "data:application/pdf;base64,JVBE" } })))
        .unwrap();
        assert_eq!(
            out["messages"][0]["content"][1],
            json!({ "type": "document", "source": { "type": "base64", "media_type": "application/pdf", "data": "JVBE" } })
        );
        let refused = [
            json!({ "type": "input_audio", "input_audio": { "data": "AAA", "format": "wav" } }),
            json!({ "type": "file", "file": { "file_id": "file-1" } }),
            json!({ "type": "file", "file": { "file_data": "data:text/csv;base64,YQ==" } }),
            json!({ "type": "image_url", "image_url": {} }),
            json!({ "type": "video_url", "video_url": { "url": "https://x" } }),
        ];
        for part in refused {
            let err = translate(turn(part.clone())).unwrap_err();
            assert_eq!(err.param, "messages[0].content[1]", "{part}");
        }
        let system_image = json!({ "messages": [
            { "role": "system", "content": [{ "type": "image_url", "image_url": { "url": "https://x" } }] },
            { "role": "user", "content": "hi" }] });
        assert_eq!(
            translate(system_image).unwrap_err().param,
            "messages[0].content[0]"
        );
        let assistant_refusal = json!({ "messages": [{ "role": "user", "content": "hi" },
            { "role": "assistant", "content": [{ "type": "refusal", "refusal": "no" }] }] });
        assert_eq!(
            translate(assistant_refusal).unwrap()["messages"][1]["content"][0],
            json!({ "type": "text", "text": "no" })
        );
        let legacy = json!({ "messages": [{ "role": "function", "name": "f", "content": "1" }] });
        assert_eq!(translate(legacy).unwrap_err().param, "messages[0].role");
    }

    #[test]
    fn refusals_name_the_param_and_let_another_model_try() {
        let e = Untranslatable::new("n", "`n` is `2`").into_attempt_error();
        assert!(!e.is_client_error(), "another provider may serve it");
        let AttemptError::Untranslatable { param, message } = e else {
            panic!("not untranslatable: {e:?}");
        };
        assert_eq!((param.as_str(), message.as_str()), ("n", "`n` is `2`"));
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
