//! Upstream providers. Every provider answers in OpenAI's format: a full
//! JSON (or audio) body, or a stream of OpenAI chat-completion SSE bytes
//! ending in `data: [DONE]`, so dispatch treats them all alike.

pub mod anthropic;
pub mod mock;
pub mod openai;

use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

use super::engine::Endpoint;
use crate::config::{ProviderConfig, ProviderKind};

/// A stream of OpenAI-format SSE bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, AttemptError>> + Send>>;

/// The request body as the client sent it.
#[derive(Clone, Debug)]
pub enum ClientBody {
    Json(serde_json::Value),
    /// `multipart/form-data` (audio transcription), passed through.
    Multipart {
        content_type: String,
        body: Bytes,
    },
}

/// One attempt's request to one provider.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamRequest<'a> {
    pub endpoint: Endpoint,
    pub body: &'a ClientBody,
    /// The model id the upstream knows.
    pub model: &'a str,
    pub stream: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// From an OpenAI-format response or chunk (`usage.prompt_tokens`, ...).
    pub fn from_openai(v: &serde_json::Value) -> Option<Usage> {
        let u = v.get("usage")?;
        Some(Usage {
            prompt_tokens: u
                .get("prompt_tokens")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            completion_tokens: u
                .get("completion_tokens")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
        })
    }
}

pub enum Reply {
    Full {
        content_type: String,
        body: Bytes,
        usage: Option<Usage>,
    },
    Stream(ByteStream),
}

/// Why an attempt failed; what `retry ... on [...]` matches against.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("upstream answered {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: Bytes,
    },
    #[error("upstream timed out")]
    Timeout,
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    #[error("the upstream connection was reset: {0}")]
    Reset(String),
    #[error("the upstream sent an invalid response: {0}")]
    Protocol(String),
    #[error("the provider does not serve `{0}` requests")]
    Unsupported(&'static str),
}

impl AttemptError {
    /// The short code used in headers, logs and the SSE error event.
    pub fn code(&self) -> String {
        match self {
            AttemptError::Status { status, .. } => status.to_string(),
            AttemptError::Timeout => "timeout".into(),
            AttemptError::Connect(_) => "connect".into(),
            AttemptError::Reset(_) => "reset".into(),
            AttemptError::Protocol(_) => "protocol".into(),
            AttemptError::Unsupported(_) => "unsupported".into(),
        }
    }

    /// A client error the client must fix, which no other model would answer
    /// differently: passed back as-is instead of falling back.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            AttemptError::Status {
                status: 400 | 404 | 413 | 415 | 422,
                ..
            }
        )
    }
}

pub(crate) fn from_reqwest(e: &reqwest::Error) -> AttemptError {
    // Provider keys live in headers, never in URLs, so the message is safe to show.
    let msg = e.without_url_ref();
    if e.is_timeout() {
        AttemptError::Timeout
    } else if e.is_connect() {
        AttemptError::Connect(msg)
    } else {
        AttemptError::Reset(msg)
    }
}

trait WithoutUrl {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let mut s = self.to_string();
        if let Some(url) = self.url() {
            s = s.replace(url.as_str(), "upstream");
        }
        // The innermost cause is the useful part ("connection reset by peer").
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(self);
        let mut last = None;
        while let Some(e) = src {
            last = Some(e.to_string());
            src = e.source();
        }
        match last {
            Some(l) if !s.contains(&l) => format!("{s}: {l}"),
            _ => s,
        }
    }
}

/// `Retry-After` in seconds (HTTP dates are rare from APIs and ignored).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

/// One configured provider, ready to send.
pub struct Upstream {
    pub cfg: ProviderConfig,
    client: reqwest::Client,
    /// Requests served, for the mock's deterministic error rate.
    mock_seq: AtomicU64,
}

impl Upstream {
    pub fn new(cfg: ProviderConfig, client: reqwest::Client) -> Self {
        Upstream {
            cfg,
            client,
            mock_seq: AtomicU64::new(0),
        }
    }

    pub async fn send(&self, req: UpstreamRequest<'_>) -> Result<Reply, AttemptError> {
        match self.cfg.kind {
            ProviderKind::Openai => openai::send(&self.client, &self.cfg, req).await,
            ProviderKind::Anthropic => anthropic::send(&self.client, &self.cfg, req).await,
            ProviderKind::Mock => mock::send(&self.cfg.mock, &self.mock_seq, req).await,
        }
    }
}

pub fn endpoint_path(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "/chat/completions",
        Endpoint::Embeddings => "/embeddings",
        Endpoint::Images => "/images/generations",
        Endpoint::AudioTranscription => "/audio/transcriptions",
        Endpoint::AudioSpeech => "/audio/speech",
    }
}

pub fn endpoint_name(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "chat",
        Endpoint::Embeddings => "embeddings",
        Endpoint::Images => "images",
        Endpoint::AudioTranscription => "audio_transcription",
        Endpoint::AudioSpeech => "audio_speech",
    }
}
