//! Any OpenAI-compatible API: the client's body goes through untouched
//! except the `model` field (see [`super::body`]).

use bytes::Bytes;
use hyper::header::HeaderValue;

use crate::ir::Endpoint;

use super::{
    endpoint_path, http, retry_after, AttemptError, ClientBody, Reply, Upstream, UpstreamRequest,
    Usage,
};

pub async fn send(up: &Upstream, req: UpstreamRequest<'_>) -> Result<Reply, AttemptError> {
    let path = endpoint_path(req.endpoint);
    let (content_type, body) = match req.body {
        ClientBody::Json(b) => (
            HeaderValue::from_static("application/json"),
            b.with_model(req.model),
        ),
        ClientBody::Multipart { content_type, body } => (
            HeaderValue::from_str(content_type).map_err(|_| {
                AttemptError::Protocol("the request's content type is not a valid header".into())
            })?,
            replace_multipart_model(body, req.model),
        ),
    };
    let resp = up
        .post(
            path,
            Some((hyper::header::CONTENT_TYPE, content_type)),
            body,
        )
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
    let content_type = http::header(resp.headers(), &hyper::header::CONTENT_TYPE)
        .unwrap_or("application/json")
        .to_string();
    if req.stream && content_type.starts_with("text/event-stream") {
        return Ok(Reply::Stream(http::body_stream(resp)));
    }
    let body = http::read_body(resp).await?;
    // A 2xx that is not JSON where the API only answers JSON (a proxy's HTML
    // error page with a 200, a truncated body) is a broken answer, not an
    // answer: fail the attempt so the next model is tried, instead of handing
    // the client garbage with a 200. Audio answers are audio, or text when
    // the client asked for it, so only their JSON is checked.
    let answers_json = matches!(
        req.endpoint,
        Endpoint::Chat | Endpoint::Embeddings | Endpoint::Images
    );
    let usage = if answers_json || content_type.starts_with("application/json") {
        match Usage::from_openai_bytes(&body) {
            Ok(u) => u,
            Err(e) => {
                return Err(AttemptError::Protocol(format!(
                    "the upstream answered {status} ({content_type}) with a body that is not valid JSON ({e})"
                )))
            }
        }
    } else {
        None
    };
    if answers_json {
        if let Some(message) = error_instead_of_answer(&body) {
            return Err(AttemptError::Protocol(format!(
                "the upstream answered {status} with an error instead of an answer: {message}"
            )));
        }
    }
    Ok(Reply::Full {
        content_type,
        body,
        usage,
    })
}

/// The message of an `error` object sent with a 2xx in place of an answer
/// (no `choices`, no `data`), as some OpenAI-compatible servers and proxies
/// report an overload: passed on, the client got an error with a 200 and
/// the breakers heard of a success. Only a body that names `"error"` is
/// parsed a second time.
fn error_instead_of_answer(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(default)]
        error: Option<serde_json::Value>,
        #[serde(default)]
        choices: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        data: Option<serde::de::IgnoredAny>,
    }
    memchr::memmem::find(body, b"\"error\"")?;
    let reply: Reply = serde_json::from_slice(body).ok()?;
    let error = reply.error.filter(|e| !e.is_null())?;
    if reply.choices.is_some() || reply.data.is_some() {
        return None;
    }
    let message = error
        .get("message")
        .and_then(serde_json::Value::as_str)
        .map_or_else(|| error.to_string(), str::to_string);
    Some(crate::decision_log::redact(
        &message.chars().take(200).collect::<String>(),
    ))
}

/// Replace the value of the `model` form field in a multipart body; the rest
/// (the audio file) is passed through byte for byte.
pub fn replace_multipart_model(body: &Bytes, model: &str) -> Bytes {
    const NEEDLE: &[u8] = b"name=\"model\"";
    let Some(at) = find(body, NEEDLE) else {
        return body.clone();
    };
    let Some(rel) = body.get(at..).and_then(|rest| find(rest, b"\r\n\r\n")) else {
        return body.clone();
    };
    let start = at + rel + 4;
    let Some(len) = body.get(start..).and_then(|rest| find(rest, b"\r\n")) else {
        return body.clone();
    };
    let mut out = Vec::with_capacity(body.len() + model.len());
    out.extend_from_slice(body.get(..start).unwrap_or_default());
    out.extend_from_slice(model.as_bytes());
    out.extend_from_slice(body.get(start + len..).unwrap_or_default());
    Bytes::from(out)
}

/// The value of a simple multipart text field.
pub fn multipart_field(body: &[u8], name: &str) -> Option<String> {
    let needle = format!("name=\"{name}\"");
    let at = find(body, needle.as_bytes())?;
    let start = at + find(body.get(at..)?, b"\r\n\r\n")? + 4;
    let len = find(body.get(start..)?, b"\r\n")?;
    String::from_utf8(body.get(start..start + len)?.to_vec()).ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &str = "--X\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--X\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nauto\r\n--X--\r\n";

    #[test]
    fn an_error_object_is_not_an_answer() {
        let cases = [
            (
                r#"{"error": {"message": "overloaded", "type": "server_error"}}"#,
                Some("overloaded"),
            ),
            (r#"{"error": "quota exceeded"}"#, Some("\"quota exceeded\"")),
            // Answers, whatever else they carry.
            (r#"{"choices": [], "error": {"message": "x"}}"#, None),
            (
                r#"{"object": "list", "data": [], "error": {"message": "x"}}"#,
                None,
            ),
            (
                r#"{"choices": [{"message": {"content": "the \"error\" key"}}], "error": null}"#,
                None,
            ),
            (r#"{"choices": []}"#, None),
        ];
        for (body, want) in cases {
            assert_eq!(
                error_instead_of_answer(body.as_bytes()).as_deref(),
                want,
                "{body}"
            );
        }
    }

    #[test]
    fn multipart_model_is_read_and_replaced() {
        assert_eq!(
            multipart_field(FORM.as_bytes(), "model").as_deref(),
            Some("auto")
        );
        let out = replace_multipart_model(&Bytes::from(FORM), "whisper-1");
        assert_eq!(multipart_field(&out, "model").as_deref(), Some("whisper-1"));
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            FORM.replace("auto", "whisper-1")
        );
    }
}
