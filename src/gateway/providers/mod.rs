//! Upstream providers. Every provider answers in OpenAI's format: a full
//! JSON (or audio) body, or a stream of OpenAI chat-completion SSE bytes
//! ending in `data: [DONE]`, so dispatch treats them all alike.

pub mod anthropic;
pub mod body;
pub mod http;
pub mod mock;
pub mod openai;

use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use hyper::header::{HeaderName, HeaderValue};

use super::engine::Endpoint;
use crate::config::{ProviderConfig, ProviderKind};

/// A stream of OpenAI-format SSE bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, AttemptError>> + Send>>;

/// The request body as the client sent it.
#[derive(Clone, Debug)]
pub enum ClientBody {
    Json(body::JsonBody),
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
    /// The body in this provider's own format, from [`Upstream::translate`]:
    /// made once per model, not once per try.
    pub translated: Option<&'a Bytes>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// The `usage` of an OpenAI-format JSON answer, read without building the
    /// answer's tree (everything else is only checked to be JSON). `Err`: the
    /// bytes are not JSON; `Ok(None)`: JSON without a usage object.
    pub fn from_openai_bytes(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
        Self::from_openai_chunk(body).map(|(usage, _)| usage)
    }

    /// [`Usage::from_openai_bytes`], and whether the answer has choices (a
    /// stream's usage-only chunk has none: `choices` missing, `null` or
    /// `[]`), in the one pass.
    pub fn from_openai_chunk(body: &[u8]) -> Result<(Option<Usage>, bool), serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            usage: Option<Counts>,
            /// How many; a `choices` of another type counts as none.
            #[serde(default, deserialize_with = "lenient_len")]
            choices: usize,
        }
        #[derive(serde::Deserialize)]
        struct Counts {
            #[serde(default, deserialize_with = "lenient_count")]
            prompt_tokens: u64,
            #[serde(default, deserialize_with = "lenient_count")]
            completion_tokens: u64,
        }
        /// A count of the wrong type is 0.
        fn lenient_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            let v = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
            Ok(v.as_u64().unwrap_or(0))
        }
        /// The length of an array, walked without keeping its items; 0 for
        /// anything else.
        fn lenient_len<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
            use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
            struct Len;
            impl<'de> Visitor<'de> for Len {
                type Value = usize;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
                    let mut n = 0;
                    while seq.next_element::<IgnoredAny>()?.is_some() {
                        n += 1;
                    }
                    Ok(n)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(0)
                }
                fn visit_bool<E>(self, _: bool) -> Result<usize, E> {
                    Ok(0)
                }
                fn visit_i64<E>(self, _: i64) -> Result<usize, E> {
                    Ok(0)
                }
                fn visit_u64<E>(self, _: u64) -> Result<usize, E> {
                    Ok(0)
                }
                fn visit_f64<E>(self, _: f64) -> Result<usize, E> {
                    Ok(0)
                }
                fn visit_str<E>(self, _: &str) -> Result<usize, E> {
                    Ok(0)
                }
                fn visit_unit<E>(self) -> Result<usize, E> {
                    Ok(0)
                }
            }
            d.deserialize_any(Len)
        }
        match serde_json::from_slice::<Answer>(body) {
            Ok(a) => Ok((
                a.usage.map(|c| Usage {
                    prompt_tokens: c.prompt_tokens,
                    completion_tokens: c.completion_tokens,
                }),
                a.choices > 0,
            )),
            // Valid JSON of another shape (an array, a usage that is not an
            // object) has no usage; only invalid JSON is an error.
            Err(e) if e.is_data() => {
                serde_json::from_slice::<serde::de::IgnoredAny>(body).map(|_| (None, false))
            }
            Err(e) => Err(e),
        }
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
    /// The request asks for something this provider's API cannot carry
    /// (`n: 2` for Anthropic): never sent. Another model may serve it, so
    /// dispatch falls back; when none does, the client gets a 400 naming
    /// `param`.
    #[error("{message}")]
    Untranslatable { param: String, message: String },
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
            AttemptError::Untranslatable { .. } => "unsupported_parameter".into(),
        }
    }

    /// The request, not the upstream, is at fault: the upstream answered that
    /// the request is malformed or too large, or this provider's API cannot
    /// carry it. Breakers and success rates do not count these. A 404 is not
    /// among them: a retired or misnamed model answers 404 to everything, and
    /// its breaker must open so later requests go elsewhere.
    pub fn blames_the_request(&self) -> bool {
        matches!(
            self,
            AttemptError::Status {
                status: 400 | 413 | 415 | 422,
                ..
            } | AttemptError::Untranslatable { .. }
        )
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

/// `Retry-After` in seconds or as an HTTP date, both of which RFC 9110
/// allows (a date comes from proxies and CDNs in front of an API; ignored,
/// it made the gateway retry after its own short backoff instead of
/// waiting, or moving on at once when the wait is longer than the backoff
/// cap). A date in the past is no wait. At most an hour.
pub(crate) fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    retry_after_at(headers, std::time::SystemTime::now())
}

fn retry_after_at(headers: &hyper::HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    const MAX: Duration = Duration::from_secs(3600);
    let v = headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(MAX.as_secs_f64())));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(MAX))
}

/// One configured provider, ready to send: its URLs parsed and its
/// headers (the key among them) made once, not per request.
pub struct Upstream {
    pub cfg: ProviderConfig,
    endpoints: http::Endpoints,
    /// Sent with every request: the content type, the key, the API version.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Requests served, for the mock's deterministic error rate.
    mock_seq: AtomicU64,
}

impl Upstream {
    pub fn new(cfg: ProviderConfig) -> Self {
        let key = cfg.api_key.as_ref().map(|k| k.expose());
        let (paths, headers): (&[&'static str], Vec<(HeaderName, Option<HeaderValue>)>) =
            match cfg.kind {
                ProviderKind::Openai => (
                    &ENDPOINT_PATHS,
                    vec![(
                        hyper::header::AUTHORIZATION,
                        key.and_then(|k| http::secret_header(&format!("Bearer {k}"))),
                    )],
                ),
                ProviderKind::Anthropic => (
                    &[anthropic::MESSAGES_PATH],
                    vec![
                        (
                            HeaderName::from_static("anthropic-version"),
                            Some(HeaderValue::from_static(anthropic::VERSION)),
                        ),
                        (
                            hyper::header::CONTENT_TYPE,
                            Some(HeaderValue::from_static("application/json")),
                        ),
                        (
                            HeaderName::from_static("x-api-key"),
                            key.and_then(http::secret_header),
                        ),
                    ],
                ),
                ProviderKind::Mock => (&[], Vec::new()),
            };
        let mut headers: Vec<(HeaderName, HeaderValue)> = headers
            .into_iter()
            .filter_map(|(n, v)| v.map(|v| (n, v)))
            .collect();
        if cfg.kind != ProviderKind::Mock {
            if let Some(host) = host_header(&cfg.base_url) {
                headers.push((hyper::header::HOST, host));
            }
        }
        Upstream {
            endpoints: http::Endpoints::new(&cfg.base_url, paths),
            headers,
            cfg,
            mock_seq: AtomicU64::new(0),
        }
    }

    /// The request in this provider's own format, when it has one (the
    /// Anthropic Messages body), or why its API cannot carry the request.
    /// Dispatch calls it before anything is taken for an attempt, so a
    /// request that is never sent spends no rate-limit token or breaker probe,
    /// and passes the result to every try as [`UpstreamRequest::translated`].
    pub fn translate(&self, req: &UpstreamRequest<'_>) -> Result<Option<Bytes>, AttemptError> {
        match (self.cfg.kind, req.endpoint, req.body) {
            (ProviderKind::Anthropic, Endpoint::Chat, ClientBody::Json(body)) => {
                anthropic::to_messages(body.value(), req.model, req.stream)
                    .map(|v| Some(Bytes::from(v.to_string())))
                    .map_err(anthropic::Untranslatable::into_attempt_error)
            }
            _ => Ok(None),
        }
    }

    /// The output cap this provider is sent for `endpoint` when the request
    /// sets none: Messages requires `max_tokens`, so the translation adds
    /// one, and a budget must reserve for it rather than for the estimate's
    /// smaller default. `None`: the provider's own (no cap is added).
    pub fn default_output_cap(&self, endpoint: Endpoint) -> Option<u64> {
        match (self.cfg.kind, endpoint) {
            (ProviderKind::Anthropic, Endpoint::Chat) => Some(anthropic::DEFAULT_MAX_TOKENS),
            _ => None,
        }
    }

    pub async fn send(&self, req: UpstreamRequest<'_>) -> Result<Reply, AttemptError> {
        match self.cfg.kind {
            ProviderKind::Openai => openai::send(self, req).await,
            ProviderKind::Anthropic => anthropic::send(self, req).await,
            ProviderKind::Mock => mock::send(&self.cfg.mock, &self.mock_seq, req).await,
        }
    }

    /// POST to one of this provider's paths with its headers (and `extra`).
    async fn post(
        &self,
        path: &'static str,
        extra: Option<(HeaderName, HeaderValue)>,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AttemptError> {
        let uri = self.endpoints.get(path)?;
        match extra {
            None => http::post(uri, &self.headers, body).await,
            Some(h) => {
                let mut headers = self.headers.clone();
                headers.push(h);
                http::post(uri, &headers, body).await
            }
        }
    }
}

/// The `Host` header for a base URL, as hyper's client would write it (the
/// port only when it is not the scheme's default). Made once per provider:
/// the client formats and validates it on every request otherwise.
fn host_header(base_url: &str) -> Option<HeaderValue> {
    let uri: hyper::Uri = base_url.parse().ok()?;
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16() {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host.to_string(),
    };
    HeaderValue::from_str(&value).ok()
}

/// Every path an OpenAI-compatible provider is sent to.
const ENDPOINT_PATHS: [&str; 5] = [
    endpoint_path(Endpoint::Chat),
    endpoint_path(Endpoint::Embeddings),
    endpoint_path(Endpoint::Images),
    endpoint_path(Endpoint::AudioTranscription),
    endpoint_path(Endpoint::AudioSpeech),
];

pub const fn endpoint_path(e: Endpoint) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_in_seconds_and_as_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let date = |d: Duration| httpdate::fmt_http_date(now + d);
        let cases = [
            ("7".to_string(), Some(Duration::from_secs(7))),
            ("1.5".to_string(), Some(Duration::from_millis(1500))),
            ("99999".to_string(), Some(Duration::from_secs(3600))),
            ("-1".to_string(), None),
            ("soon".to_string(), None),
            (date(Duration::from_secs(30)), Some(Duration::from_secs(30))),
            (
                date(Duration::from_secs(86_400)),
                Some(Duration::from_secs(3600)),
            ),
            (
                httpdate::fmt_http_date(now - Duration::from_secs(5)),
                Some(Duration::ZERO),
            ),
        ];
        for (value, want) in cases {
            let mut h = hyper::HeaderMap::new();
            h.insert(
                hyper::header::RETRY_AFTER,
                HeaderValue::from_str(&value).unwrap(),
            );
            assert_eq!(retry_after_at(&h, now), want, "{value}");
        }
    }

    #[test]
    fn a_chunk_says_its_usage_and_whether_it_has_choices() {
        let usage = r#""usage":{"prompt_tokens":3,"completion_tokens":4}"#;
        let counts = Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
        });
        for (choices, has) in [
            ("", false),
            (r#""choices":[],"#, false),
            (r#""choices":null,"#, false),
            (r#""choices":"odd","#, false),
            (r#""choices":{"a":[1]},"#, false),
            (r#""choices":[{"delta":{"content":"x"}}],"#, true),
        ] {
            let chunk = format!("{{{choices}{usage}}}");
            assert_eq!(
                Usage::from_openai_chunk(chunk.as_bytes()).unwrap(),
                (counts, has),
                "{chunk}"
            );
        }
        assert!(Usage::from_openai_chunk(b"{\"choices\":[").is_err());
    }

    #[test]
    fn the_host_header_is_what_the_client_would_send() {
        for (url, want) in [
            ("http://127.0.0.1:18181/v1", Some("127.0.0.1:18181")),
            ("https://api.openai.com/v1", Some("api.openai.com")),
            ("https://api.example.com:443/v1", Some("api.example.com")),
            ("http://example.com:80", Some("example.com")),
            ("https://example.com:8443/v1", Some("example.com:8443")),
            ("http://user:pw@host:81/v1", Some("host:81")),
            ("http://[::1]:9000/v1", Some("[::1]:9000")),
            ("not a url", None),
        ] {
            let got = host_header(url);
            assert_eq!(got.as_ref().and_then(|v| v.to_str().ok()), want, "{url}");
        }
    }

    #[test]
    fn usage_is_read_from_the_bytes() {
        let usage = |p, c| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
            })
        };
        let cases = [
            (
                r#"{"id":"x","choices":[{"message":{"content":"{\"usage\":1}"}}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#,
                usage(12, 7),
            ),
            (
                r#"{"usage":{"prompt_tokens":"12","completion_tokens":7}}"#,
                usage(0, 7),
            ),
            (r#"{"usage":{}}"#, usage(0, 0)),
            (r#"{"usage":null,"choices":[]}"#, None),
            (r#"{"data":[{"embedding":[0.1,0.2]}]}"#, None),
            (r#"[1,2]"#, None),
        ];
        for (body, want) in cases {
            assert_eq!(
                Usage::from_openai_bytes(body.as_bytes()).unwrap(),
                want,
                "{body}"
            );
        }
        assert!(Usage::from_openai_bytes(br#"{"usage":{"prompt_tokens":1}"#).is_err());
        assert!(Usage::from_openai_bytes(b"<html>").is_err());
    }
}
