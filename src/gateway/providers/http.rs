//! The HTTP client the providers send with: hyper's pooled client over
//! rustls, one per worker thread.
//!
//! Why not one client for the process: the gateway runs one single-threaded
//! runtime per core (see `server::serve_workers`), and a pooled connection is
//! driven by a task on the runtime that opened it. With a client per thread a
//! request and its upstream connection always live on the same thread, so
//! proxying costs no cross-thread wake-up. Each thread keeps its own pool of
//! keep-alive connections; with two cores that is two pools per upstream.
//!
//! Upstream addresses are parsed once, when a policy's runtime is built
//! ([`Endpoints`]), never per request, and only ever come from the config.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{AttemptError, ByteStream};

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
type HttpClient = Client<Connector, Full<Bytes>>;

/// How long connecting to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle keep-alive connection stays in the pool.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The TLS settings, made once: Mozilla's roots through `webpki-roots`.
fn tls() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// This thread's client; `Err` when TLS could not be set up (never seen in
/// practice: the ring provider supports every safe protocol version).
fn new_client() -> Result<HttpClient, String> {
    static TLS: OnceLock<Result<rustls::ClientConfig, String>> = OnceLock::new();
    let cfg = TLS
        .get_or_init(|| tls().map_err(|e| format!("cannot set up TLS: {e}")))
        .clone()?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .build(connector))
}

thread_local! {
    static CLIENT: Result<HttpClient, String> = new_client();
}

/// The parsed upstream URLs of one provider, one per path it is sent to.
#[derive(Clone, Debug)]
pub struct Endpoints {
    base: String,
    uris: Vec<(&'static str, Uri)>,
}

impl Endpoints {
    /// `base` joined with each of `paths`; a path whose URL does not parse is
    /// left out and fails at send time with the reason.
    pub fn new(base: &str, paths: &[&'static str]) -> Endpoints {
        let base = base.trim_end_matches('/').to_string();
        let uris = paths
            .iter()
            .filter_map(|p| format!("{base}{p}").parse::<Uri>().ok().map(|u| (*p, u)))
            .collect();
        Endpoints { base, uris }
    }

    pub fn get(&self, path: &str) -> Result<Uri, AttemptError> {
        self.uris
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, u)| u.clone())
            .ok_or_else(|| {
                AttemptError::Connect(format!(
                    "the provider's base_url `{}` does not make a valid URL with `{path}`",
                    self.base
                ))
            })
    }
}

/// A header value that holds a secret: never printed, never logged by hyper.
pub fn secret_header(value: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// POST `body` to `uri` with `headers`; the answer's head, its body still to read.
pub async fn post(
    uri: Uri,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Result<Response<Incoming>, AttemptError> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    let h = req.headers_mut();
    for (name, value) in headers {
        h.insert(name.clone(), value.clone());
    }
    let fut = CLIENT.with(|c| c.as_ref().map(|c| c.request(req)).map_err(Clone::clone));
    fut.map_err(AttemptError::Connect)?.await.map_err(|e| {
        let msg = innermost(&e);
        if e.is_connect() {
            AttemptError::Connect(msg)
        } else {
            AttemptError::Reset(msg)
        }
    })
}

/// The message of an error with its innermost cause ("connection reset by
/// peer"), which is the useful part. Upstream URLs carry no secrets (keys go
/// in headers), so the message is safe to show.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let top = e.to_string();
    let mut src = e.source();
    let mut last = None;
    while let Some(s) = src {
        last = Some(s.to_string());
        src = s.source();
    }
    match last {
        Some(l) if !top.contains(&l) => format!("{top}: {l}"),
        _ => top,
    }
}

/// The most of an upstream answer that is read into memory. Legitimate
/// answers stay far below it (the largest are embeddings of a full batch
/// as JSON floats, about 125 MB); without a limit an upstream that never
/// stops sending (a broken proxy, a misconfigured URL serving a file) would
/// have the gateway buffer until memory ran out.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;

/// The whole body, up to [`MAX_ANSWER_BYTES`].
pub async fn read_body(resp: Response<Incoming>) -> Result<Bytes, AttemptError> {
    read_body_limited(resp.into_body(), MAX_ANSWER_BYTES).await
}

async fn read_body_limited<B>(body: B, limit: usize) -> Result<Bytes, AttemptError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(AttemptError::Protocol(format!(
                "the upstream's answer is larger than {} MiB",
                limit / (1024 * 1024)
            )))
        }
        Err(e) => Err(AttemptError::Reset(innermost(&*e))),
    }
}

/// The body as it arrives.
pub fn body_stream(resp: Response<Incoming>) -> ByteStream {
    Box::pin(
        BodyDataStream::new(resp.into_body())
            .map(|r| r.map_err(|e| AttemptError::Reset(innermost(&e)))),
    )
}

/// A header's value as text.
pub fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    #[tokio::test]
    async fn an_answer_past_the_limit_is_refused_not_buffered() {
        let whole = read_body_limited(Full::new(Bytes::from_static(b"0123456789")), 10).await;
        assert_eq!(whole.unwrap(), Bytes::from_static(b"0123456789"));
        let too_long = read_body_limited(Full::new(Bytes::from_static(b"0123456789x")), 10).await;
        match too_long {
            Err(AttemptError::Protocol(m)) => assert!(m.contains("larger than"), "{m}"),
            other => panic!("{other:?}"),
        }
        // An endless body stops being read at the limit.
        let endless = futures_util::stream::repeat_with(|| {
            Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(&[b'a'; 1024])))
        });
        let r = read_body_limited(StreamBody::new(endless), 1024 * 1024).await;
        assert!(matches!(r, Err(AttemptError::Protocol(_))), "{r:?}");
    }
}
