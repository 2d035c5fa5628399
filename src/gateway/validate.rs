//! Shape checks on request bodies, for the fields the gateway itself reads.
//!
//! The gateway passes bodies through to the upstream, but it *decides* on some
//! of their fields (messages, max_tokens, response_format, tools, stream,
//! metadata, ...). A wrongly typed one would make the decision wrong (a
//! `max_tokens: "10"` skews the cost estimate, a `response_format: "json"`
//! skips the extraction route), so it is a 400 naming the field, never a
//! silent guess. Fields the gateway does not read are the upstream's business.

use serde_json::Value;

use crate::ir::Endpoint;

/// The largest output cap we accept; anything above is a client bug.
const MAX_TOKENS_LIMIT: u64 = 100_000_000;
/// The most images one generation may ask for (OpenAI's own limit is 10).
const MAX_IMAGES: u64 = 100;

/// Check a request body. The message says which field is wrong and how.
pub fn body(endpoint: Endpoint, v: &Value) -> Result<(), String> {
    let Value::Object(o) = v else {
        return Err("the body must be a JSON object".into());
    };
    if let Some(m) = o.get("model") {
        match m {
            Value::String(s) if s.trim().is_empty() => {
                return Err("`model` must not be empty: name a model, an intent, or `auto`".into())
            }
            Value::String(_) => {}
            _ => return Err("`model` must be a string: a model, an intent, or `auto`".into()),
        }
    }
    if let Some(s) = o.get("stream") {
        if !s.is_boolean() {
            return Err("`stream` must be true or false".into());
        }
    }
    if let Some(so) = o.get("stream_options") {
        match so {
            Value::Object(so) => {
                if so.get("include_usage").is_some_and(|u| !u.is_boolean()) {
                    return Err("`stream_options.include_usage` must be true or false".into());
                }
            }
            Value::Null => {}
            _ => return Err("`stream_options` must be an object".into()),
        }
    }
    if let Some(m) = o.get("metadata") {
        match m {
            Value::Object(m) => {
                if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_string()) {
                    return Err(format!("`metadata.{k}` must be a string"));
                }
            }
            Value::Null => {}
            _ => return Err("`metadata` must be an object of strings".into()),
        }
    }
    for key in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
        if let Some(n) = o.get(key) {
            match n.as_u64() {
                Some(n) if n <= MAX_TOKENS_LIMIT => {}
                Some(_) => return Err(format!("`{key}` is larger than {MAX_TOKENS_LIMIT}")),
                None if n.is_null() => {}
                None => {
                    return Err(format!(
                        "`{key}` must be a whole number of tokens, 0 or more"
                    ))
                }
            }
        }
    }
    match endpoint {
        Endpoint::Chat => chat(o),
        Endpoint::Embeddings => match o.get("input") {
            None => Err("missing `input`: a string or an array of strings or token arrays".into()),
            Some(Value::String(_)) => Ok(()),
            Some(Value::Array(items))
                if !items.is_empty() && items.iter().all(is_embedding_input) =>
            {
                Ok(())
            }
            Some(Value::Array(items)) if items.is_empty() => {
                Err("`input` must not be empty".into())
            }
            Some(_) => {
                Err("`input` must be a string or an array of strings or token arrays".into())
            }
        },
        Endpoint::Images => {
            // Each image is billed: the budget reserves `n` of them.
            if let Some(n) = o.get("n").filter(|n| !n.is_null()) {
                if !n.as_u64().is_some_and(|n| (1..=MAX_IMAGES).contains(&n)) {
                    return Err(format!(
                        "`n` must be a whole number of images from 1 to {MAX_IMAGES}"
                    ));
                }
            }
            match o.get("prompt") {
                Some(Value::String(s)) if !s.is_empty() => Ok(()),
                Some(Value::String(_)) => Err("`prompt` must not be empty".into()),
                Some(_) => Err("`prompt` must be a string".into()),
                None => Err("missing `prompt`".into()),
            }
        }
        Endpoint::AudioSpeech => match o.get("input") {
            Some(Value::String(_)) => Ok(()),
            Some(_) => Err("`input` must be a string (the text to speak)".into()),
            None => Err("missing `input`".into()),
        },
        Endpoint::AudioTranscription => Ok(()),
    }
}

fn is_embedding_input(v: &Value) -> bool {
    match v {
        Value::String(_) => true,
        Value::Number(n) => n.is_u64(),
        Value::Array(a) => a.iter().all(|n| n.is_u64()),
        _ => false,
    }
}

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];
const FORMATS: &[&str] = &["text", "json_object", "json_schema"];

fn chat(o: &serde_json::Map<String, Value>) -> Result<(), String> {
    // The output cap prices the request before it is sent; a cap the
    // estimate does not read, or two that disagree, would price it wrong.
    if o.get("max_output_tokens").is_some_and(|v| !v.is_null()) {
        return Err(
            "`max_output_tokens` is a field of the Responses API: Chat Completions takes `max_completion_tokens`".into(),
        );
    }
    if let (Some(a), Some(b)) = (
        o.get("max_completion_tokens").and_then(Value::as_u64),
        o.get("max_tokens").and_then(Value::as_u64),
    ) {
        if a != b {
            return Err(format!(
                "`max_completion_tokens` is {a} but `max_tokens` is {b}: send one cap (`max_completion_tokens`), or the same in both"
            ));
        }
    }
    let messages = match o.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err("`messages` must not be empty".into()),
        Some(_) => return Err("`messages` must be an array of messages".into()),
        None => return Err("missing `messages`".into()),
    };
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(format!(
                "`messages[{i}]` must be an object with `role` and `content`"
            ));
        };
        match m.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => {}
            Some(Value::String(r)) => {
                return Err(format!(
                    "`messages[{i}].role` is `{r}`: expected one of {}",
                    ROLES.join(", ")
                ))
            }
            Some(_) => return Err(format!("`messages[{i}].role` must be a string")),
            None => return Err(format!("`messages[{i}]` has no `role`")),
        }
        match m.get("content") {
            Some(Value::String(_)) | Some(Value::Null) => {}
            Some(Value::Array(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    let ok = p.get("type").is_some_and(Value::is_string);
                    if !ok {
                        return Err(format!(
                            "`messages[{i}].content[{j}]` must be an object with a `type`"
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(format!(
                    "`messages[{i}].content` must be a string or an array of parts"
                ))
            }
            // An assistant turn that only calls tools has no content.
            None if m.contains_key("tool_calls") || m.contains_key("function_call") => {}
            None => return Err(format!("`messages[{i}]` has no `content`")),
        }
    }
    if let Some(rf) = o.get("response_format") {
        match rf {
            Value::Object(rf) => match rf.get("type") {
                Some(Value::String(t)) if FORMATS.contains(&t.as_str()) => {}
                Some(Value::String(t)) => {
                    return Err(format!(
                        "`response_format.type` is `{t}`: expected one of {}",
                        FORMATS.join(", ")
                    ))
                }
                _ => return Err("`response_format` needs a `type`".into()),
            },
            Value::Null => {}
            _ => {
                return Err(
                    "`response_format` must be an object such as {\"type\": \"json_object\"}"
                        .into(),
                )
            }
        }
    }
    for key in ["tools", "functions"] {
        match o.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.iter().all(Value::is_object) => {}
            Some(_) => return Err(format!("`{key}` must be an array of objects")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat_err(v: Value) -> String {
        body(Endpoint::Chat, &v).unwrap_err()
    }

    #[test]
    fn good_bodies_pass() {
        let ok = [
            json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}),
            json!({"model": "auto", "messages": [{"role": "assistant", "tool_calls": []}, {"role": "tool", "content": "x"}], "tools": [{"type": "function"}]}),
            json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": true, "stream_options": {"include_usage": true}, "response_format": {"type": "json_schema"}, "metadata": {"a": "b"}}),
        ];
        for v in ok {
            assert_eq!(body(Endpoint::Chat, &v), Ok(()), "{v}");
        }
        assert_eq!(
            body(Endpoint::Embeddings, &json!({"input": ["a", "b"]})),
            Ok(())
        );
        assert_eq!(
            body(Endpoint::Embeddings, &json!({"input": [[1, 2], [3]]})),
            Ok(())
        );
        assert_eq!(body(Endpoint::Images, &json!({"prompt": "a cat"})), Ok(()));
        assert_eq!(
            body(Endpoint::AudioSpeech, &json!({"input": "hello"})),
            Ok(())
        );
    }

    #[test]
    fn each_wrong_field_is_named() {
        let cases = [
            (
                json!({"model": 1, "messages": []}),
                "`model` must be a string",
            ),
            (
                json!({"model": " ", "messages": []}),
                "`model` must not be empty",
            ),
            (json!({"messages": "hi"}), "`messages` must be an array"),
            (json!({"messages": [42]}), "`messages[0]` must be an object"),
            (
                json!({"messages": [{"content": "hi"}]}),
                "`messages[0]` has no `role`",
            ),
            (
                json!({"messages": [{"role": "wizard", "content": "hi"}]}),
                "`messages[0].role` is `wizard`",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "`messages[0]` has no `content`",
            ),
            (
                json!({"messages": [{"role": "user", "content": 4}]}),
                "`messages[0].content` must be",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{}]}]}),
                "`messages[0].content[0]`",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
                "`max_tokens` must be a whole number",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}),
                "`max_tokens` must be a whole number",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e30}),
                "`max_tokens` must be a whole number",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "response_format": "json"}),
                "`response_format` must be an object",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
                "`response_format.type` is `xml`",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": "all"}),
                "`tools` must be an array",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "metadata": "x"}),
                "`metadata` must be an object",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "metadata": {"a": 1}}),
                "`metadata.a` must be a string",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
                "`stream` must be true or false",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": "yes"}}),
                "include_usage",
            ),
        ];
        for (v, want) in cases {
            let got = chat_err(v.clone());
            assert!(got.contains(want), "{v}: got `{got}`, want `{want}`");
        }
        assert!(body(Endpoint::Embeddings, &json!({"input": 42}))
            .unwrap_err()
            .contains("`input` must be"));
        assert!(body(Endpoint::Embeddings, &json!({"input": {"a": 1}}))
            .unwrap_err()
            .contains("`input` must be"));
        assert!(body(Endpoint::Images, &json!({"prompt": 42}))
            .unwrap_err()
            .contains("`prompt` must be a string"));
        assert!(body(Endpoint::AudioSpeech, &json!({"input": ["x"]}))
            .unwrap_err()
            .contains("`input` must be a string"));
        assert!(body(Endpoint::Chat, &json!([1]))
            .unwrap_err()
            .contains("JSON object"));
    }
}
