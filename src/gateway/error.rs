//! OpenAI-style JSON errors: `{"error": {"message", "type", "code", "param"}}`
//! with the right HTTP status.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How much of a non-JSON upstream error body is quoted back to the client.
const UPSTREAM_MESSAGE_CHARS: usize = 500;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<String>,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// The request field at fault, as OpenAI's `error.param`.
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: None,
            message: message.into(),
            retry_after: None,
            param: None,
        }
    }
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }
    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message).code("invalid_api_key")
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "message": self.message, "type": self.kind, "code": self.code, "param": self.param } })
    }

    /// An upstream's refusal as an OpenAI-style error body. A body already in
    /// that shape passes through byte for byte; anything else (Anthropic's
    /// `{"type":"error",...}`, a proxy's HTML page, plain text) is rewrapped
    /// so clients written for OpenAI can always read `error.message`.
    pub fn upstream_body(status: StatusCode, body: &[u8]) -> Bytes {
        let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let error = parsed.as_ref().and_then(|v| v.get("error"));
        let top_type = parsed.as_ref().and_then(|v| v.get("type"));
        let message = error
            .and_then(|e| e.get("message"))
            .and_then(|m| m.as_str());
        if message.is_some() && top_type.is_none() {
            return Bytes::copy_from_slice(body);
        }
        let text = || {
            let raw = String::from_utf8_lossy(body);
            let trimmed = raw.trim();
            let cut: String = trimmed.chars().take(UPSTREAM_MESSAGE_CHARS).collect();
            if cut.is_empty() {
                format!("the upstream answered {status} with an empty body")
            } else {
                cut
            }
        };
        let message = message
            .or_else(|| {
                parsed
                    .as_ref()
                    .and_then(|v| v.get("message"))
                    .and_then(|m| m.as_str())
            })
            .or_else(|| error.and_then(|e| e.as_str()))
            .map_or_else(text, str::to_string);
        let kind = error
            .and_then(|e| e.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or(if status.is_server_error() {
                "api_error"
            } else {
                "invalid_request_error"
            });
        let code = error.and_then(|e| e.get("code")).cloned();
        Bytes::from(
            serde_json::json!({ "error": { "message": message, "type": kind, "code": code, "param": null } })
                .to_string(),
        )
    }

    pub fn into_response(self) -> Response<Body> {
        let mut r = Response::new(full(self.body().to_string()));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        if let Some(d) = self.retry_after {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            if let Ok(v) = hyper::header::HeaderValue::from_str(&secs.max(1).to_string()) {
                h.insert(hyper::header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn rewrapped(status: u16, body: &str) -> Value {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        serde_json::from_slice(&ApiError::upstream_body(status, body.as_bytes()))
            .unwrap_or(Value::Null)
    }

    #[test]
    fn openai_errors_pass_through_untouched() {
        let body =
            r#"{"error":{"message":"bad","type":"invalid_request_error","param":"x","code":"c"}}"#;
        let out = ApiError::upstream_body(StatusCode::BAD_REQUEST, body.as_bytes());
        assert_eq!(out, body.as_bytes());
    }

    #[test]
    fn anthropic_errors_become_openai_errors() {
        let v = rewrapped(
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too large"}}"#,
        );
        assert_eq!(v["error"]["message"], "max_tokens: too large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v.get("type").is_none());
    }

    #[test]
    fn non_json_bodies_are_quoted_and_bounded() {
        let v = rewrapped(404, "<html>not found</html>");
        assert_eq!(v["error"]["message"], "<html>not found</html>");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let long = "x".repeat(10_000);
        let v = rewrapped(422, &long);
        assert_eq!(
            v["error"]["message"].as_str().map(str::len),
            Some(UPSTREAM_MESSAGE_CHARS)
        );
        let v = rewrapped(400, "");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("empty body")));
    }

    #[test]
    fn other_json_shapes_keep_their_message() {
        let v = rewrapped(400, r#"{"message":"nope","code":7}"#);
        assert_eq!(v["error"]["message"], "nope");
        let v = rewrapped(400, r#"{"error":"plain string"}"#);
        assert_eq!(v["error"]["message"], "plain string");
    }
}
