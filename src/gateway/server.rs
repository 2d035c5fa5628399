//! The HTTP front: routing, authentication, body limits, feature
//! extraction, the decision, and OpenAI-style errors.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use super::dispatch::{self, RequestCtx};
use super::engine::{decide, Denial, Endpoint, RequestFeatures, TenantView};
use super::error::{full, ApiError, Body};
use super::providers::{body::JsonBody, openai::multipart_field, ClientBody};
use super::{Gateway, LiveStats, Runtime};
use crate::config::sha256;
use crate::ir::{LimitScope, ModelKind};

/// How long a client may take to send its headers, and then its body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Listening sockets for [`serve_workers`]: one per worker, all on `addr`
/// (`SO_REUSEPORT`, so the kernel spreads connections over the workers).
///
/// A plain bind comes first: it fails when anything already listens on
/// `addr`, so a second gateway started on the same port is an error instead
/// of silently sharing the port with the first.
pub fn bind_workers(
    addr: std::net::SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |reuse_port: bool, addr: std::net::SocketAddr| {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        #[cfg(unix)]
        s.set_reuse_port(reuse_port)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok::<_, std::io::Error>(s)
    };
    let mut addr = addr;
    if addr.port() != 0 {
        drop(open(false, addr)?);
    }
    let mut out = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let s = open(cfg!(unix) && workers > 1, addr)?;
        s.listen(1024)?;
        let l: std::net::TcpListener = s.into();
        // An ephemeral port: the other workers join the one the first got.
        addr = l.local_addr()?;
        out.push(l);
        if !cfg!(unix) {
            break;
        }
    }
    Ok(out)
}

/// What the process tells its serving workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Keep serving.
    No,
    /// Stop accepting, let the requests in flight finish (streams included)
    /// and close each connection after its last answer; connections still
    /// busy after this long are closed.
    Drain(std::time::Duration),
    /// Close every connection now (a second signal during a drain).
    Now,
}

/// Serve on one thread per listener, each with its own single-threaded
/// runtime, until `stop` leaves [`Stop::No`] (or its sender is dropped,
/// which stops at once): then drain as it says ([`serve`]) and return.
///
/// Why threads of their own, like nginx's workers, and not one work-stealing
/// runtime: a request, the upstream connection it uses (the HTTP client is
/// per thread) and the stream it forwards all run on the thread that
/// accepted the connection, so proxying costs no cross-thread wake-ups.
pub fn serve_workers(
    listeners: Vec<std::net::TcpListener>,
    gw: Arc<Gateway>,
    stop: tokio::sync::watch::Receiver<Stop>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let gw = gw.clone();
        let stop = stop.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let t = std::thread::Builder::new()
            .name(format!("routeplane-worker-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(keep_a_timer_near());
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("worker {i} cannot listen: {e}");
                            return;
                        }
                    };
                    let mut asked = stop.clone();
                    let draining = async move {
                        let _ = asked.wait_for(|s| *s != Stop::No).await;
                    };
                    tokio::select! {
                        () = serve(listener, gw, draining) => {}
                        () = give_up(stop) => {
                            tracing::warn!(
                                "worker {i}: closed the connections still busy at the end of the drain"
                            );
                        }
                    }
                });
                // Dropping the runtime here ends every task still running:
                // the connections `give_up` left behind.
            })?;
        threads.push(t);
    }
    Ok(threads)
}

/// Resolves when the draining must end: [`Stop::Now`], the sender gone, or
/// a [`Stop::Drain`]'s time over.
async fn give_up(mut stop: tokio::sync::watch::Receiver<Stop>) {
    let limit = match stop.wait_for(|s| *s != Stop::No).await.map(|s| *s) {
        Ok(Stop::Drain(limit)) => limit,
        _ => return,
    };
    tokio::select! {
        () = tokio::time::sleep(limit) => {}
        _ = stop.wait_for(|s| *s == Stop::Now) => {}
    }
}

/// Every request arms timers that lie far ahead (hyper's header timeout, the
/// policy's timeouts), and tokio wakes its driver through an eventfd whenever
/// a new timer is the earliest one. With a nearer timer always armed that
/// never happens: it saves a `write` and an extra `epoll_wait` per request.
async fn keep_a_timer_near() {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Accept connections until `shutdown` resolves; then stop accepting, let
/// each connection finish the request it is serving (an idle keep-alive
/// connection closes at once, a busy one after its answer, a stream after
/// its last event), and return when all are closed. A caller that cannot
/// wait that long drops this future and the runtime the connections run on.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        let svc = service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(gw, req).await) }
        });
        // A client that never finishes its headers does not hold a task forever.
        let conn = http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(BODY_TIMEOUT)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = connections.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    // New connections are refused from here: a load balancer moves on.
    drop(listener);
    connections.shutdown().await;
}

/// One request, start to finish.
pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let endpoint = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/v1/models") => return models(&gw, &req),
        (&Method::GET, "/metrics") => return metrics(&gw),
        (&Method::GET, "/admin/policy") => return admin_policy(&gw, &req),
        (&Method::POST, "/admin/reload") => return admin_reload(&gw, &req).await,
        (&Method::POST, "/v1/chat/completions") => Endpoint::Chat,
        (&Method::POST, "/v1/embeddings") => Endpoint::Embeddings,
        (&Method::POST, "/v1/images/generations") => Endpoint::Images,
        (&Method::POST, "/v1/audio/transcriptions") => Endpoint::AudioTranscription,
        (&Method::POST, "/v1/audio/speech") => Endpoint::AudioSpeech,
        (_, path) => {
            let known = [
                "/v1/chat/completions",
                "/v1/embeddings",
                "/v1/images/generations",
                "/v1/audio/transcriptions",
                "/v1/audio/speech",
                "/v1/models",
                "/healthz",
                "/metrics",
                "/admin/policy",
                "/admin/reload",
            ];
            return if known.contains(&path) {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "invalid_request_error",
                    format!("method `{}` is not allowed on `{path}`", req.method()),
                )
                .into_response()
            } else {
                ApiError::not_found(format!(
                    "unknown endpoint `{}`",
                    path.chars().take(200).collect::<String>()
                ))
                .into_response()
            };
        }
    };
    match proxy(gw, req, endpoint).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    r
}

/// The tenant whose key this is, found by the key's SHA-256.
///
/// One hash lookup whatever the number of tenants (comparing the digest with
/// every tenant's took most of the gateway's CPU with 10,000 tenants). Keys
/// are never compared as text: the time a lookup takes depends only on the
/// digest of the key sent, which tells a caller nothing about any valid key.
fn authenticate<'a>(
    rt: &'a Runtime,
    req: &Request<Incoming>,
) -> Result<(usize, &'a TenantView), ApiError> {
    let Some(auth) = req.headers().get(hyper::header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "missing API key: send `Authorization: Bearer <key>`",
        ));
    };
    let Some(key) = bearer_token(auth) else {
        return Err(ApiError::unauthorized(
            "malformed Authorization header: expected `Bearer <key>`",
        ));
    };
    let hash = sha256(key);
    rt.tenant_by_key
        .get(&hash)
        .and_then(|&i| rt.tenants.get(i).map(|t| (i, t)))
        .ok_or_else(|| ApiError::unauthorized("invalid API key"))
}

/// The token of an `Authorization: Bearer <token>` header, for tenants and
/// the admin alike: one reading, so a header one of them accepts is not
/// refused by the other (the admin check once took only `Bearer`, while
/// tenants could send `bearer`, as clients that lowercase the scheme do).
fn bearer_token(auth: &HeaderValue) -> Option<&str> {
    let v = auth.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

async fn read_body(
    rt: &Runtime,
    req: Request<Incoming>,
) -> Result<(hyper::http::request::Parts, Bytes), ApiError> {
    let limit = rt.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await;
    let Ok(read) = read else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {}s",
                BODY_TIMEOUT.as_secs()
            ),
        ));
    };
    match read {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

fn header_str<'a>(parts: &'a hyper::http::request::Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Parse the body and extract the request features.
fn features(
    endpoint: Endpoint,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) -> Result<(RequestFeatures, ClientBody), ApiError> {
    let (mut f, body) = if endpoint == Endpoint::AudioTranscription {
        let content_type = header_str(parts, "content-type")
            .unwrap_or_default()
            .to_string();
        if !content_type.starts_with("multipart/form-data") {
            return Err(ApiError::bad_request(
                "audio transcription expects a `multipart/form-data` body",
            ));
        }
        let model = multipart_field(&body, "model");
        let v = serde_json::json!({ "model": model });
        (
            RequestFeatures::from_openai_json(endpoint, &v),
            ClientBody::Multipart { content_type, body },
        )
    } else {
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        check_shape(endpoint, &v)?;
        let features = RequestFeatures::from_openai_json(endpoint, &v);
        let body = JsonBody::new(body, v).map_err(ApiError::bad_request)?;
        (features, ClientBody::Json(body))
    };
    for name in parts.headers.keys() {
        let Some(ours) = name.as_str().strip_prefix("x-routeplane-") else {
            continue;
        };
        if ours == "meta-feature" {
            return Err(ApiError::bad_request(
                "the feature tag is sent as `x-routeplane-feature`, not `x-routeplane-meta-feature`",
            ));
        }
        if let Some(meta) = ours.strip_prefix("meta-") {
            // An empty header says nothing, as for `x-routeplane-feature`.
            let Some(v) = routing_header(parts, name)? else {
                continue;
            };
            let in_body = f
                .meta
                .iter()
                .find(|(k, _)| k == meta)
                .map(|(_, v)| v.as_str());
            agree(meta, in_body, v)?;
            f.meta.retain(|(k, _)| k != meta);
            f.meta.push((meta.to_string(), v.to_string()));
        } else if !(ours == "feature" || ours == "confirm") {
            let hint = crate::diag::did_you_mean(ours, ["feature", "confirm"])
                .map(|m| format!(" (did you mean `x-routeplane-{m}`?)"))
                .unwrap_or_default();
            return Err(ApiError::bad_request(format!(
                "unknown header `{name}`{hint}: routeplane reads `x-routeplane-feature`, `x-routeplane-confirm` and `x-routeplane-meta-<attribute>`"
            )));
        }
    }
    if let Some(feature) = routing_header(parts, &FEATURE_HEADER)? {
        agree("feature", f.feature.as_deref(), feature)?;
        f.feature = Some(feature.to_string());
    }
    if let Some(feature) = &f.feature {
        if feature.len() > MAX_FEATURE_BYTES {
            return Err(ApiError::bad_request(format!(
                "the feature tag is {} bytes long: a feature tag names a part of your product in at most {MAX_FEATURE_BYTES} bytes",
                feature.len()
            )));
        }
    }
    if let Some(c) = routing_header(parts, &CONFIRM_HEADER)? {
        f.confirmed = match c.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`x-routeplane-confirm` is `{c}`: send `true` to confirm premium spend, or leave the header out"
                )))
            }
        };
    }
    Ok((f, body))
}

/// An attribute sent both as a header and in the body's `metadata` must say
/// the same thing in both; otherwise which one routing used would be a guess.
fn agree(name: &str, in_body: Option<&str>, in_header: &str) -> Result<(), ApiError> {
    match in_body {
        Some(b) if b != in_header => {
            let header = if name == "feature" {
                "x-routeplane-feature".to_string()
            } else {
                format!("x-routeplane-meta-{name}")
            };
            Err(ApiError::bad_request(format!(
                "`{name}` is `{in_header}` in the header `{header}` but `{b}` in `metadata.{name}`: send one of them, or the same value in both"
            )))
        }
        _ => Ok(()),
    }
}

/// A routing header naming a request attribute the policy does not declare
/// is most likely a misspelling (`x-routeplane-meta-priorty`); routing would
/// go on as if it had not been sent. Attributes in the body's `metadata` are
/// OpenAI's field and may carry anything.
fn undeclared_meta_header(
    parts: &hyper::http::request::Parts,
    rt: &Runtime,
) -> Result<(), ApiError> {
    let declared = &rt.policy.policy().request_attrs;
    for name in parts.headers.keys() {
        let Some(meta) = name.as_str().strip_prefix("x-routeplane-meta-") else {
            continue;
        };
        if declared.iter().any(|a| a.name == meta) {
            continue;
        }
        let names = declared.iter().map(|a| a.name.as_str());
        let hint = match crate::diag::did_you_mean(meta, names) {
            Some(m) => format!("did you mean `x-routeplane-meta-{m}`?"),
            None if declared.is_empty() => "the policy declares no request attributes".into(),
            None => format!(
                "it declares {}",
                declared
                    .iter()
                    .map(|a| format!("`{}`", a.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        return Err(ApiError::bad_request(format!(
            "`{name}` names the request attribute `{meta}`, which the policy does not declare: {hint}"
        )));
    }
    Ok(())
}

// Made once: looking a header up by `&str` parses and checks the name each time.
const FEATURE_HEADER: HeaderName = HeaderName::from_static("x-routeplane-feature");
const CONFIRM_HEADER: HeaderName = HeaderName::from_static("x-routeplane-confirm");

/// The longest feature tag accepted. Tags key budgets, ledger rows and
/// decision log lines, so an unbounded one would grow all three per request.
const MAX_FEATURE_BYTES: usize = 128;

/// A routing header, trimmed; `None` when absent or empty. A value that is
/// not visible ASCII is refused rather than ignored: ignoring it would route
/// the request as if the client had not asked.
fn routing_header<'a>(
    parts: &'a hyper::http::request::Parts,
    name: &HeaderName,
) -> Result<Option<&'a str>, ApiError> {
    let mut values = parts.headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(format!(
            "the header `{name}` is sent more than once: send it once, with one value"
        )));
    }
    let v = v.to_str().map_err(|_| {
        ApiError::bad_request(format!(
            "the header `{name}` is not plain ASCII text: send visible ASCII characters only"
        ))
    })?;
    Ok(Some(v.trim()).filter(|v| !v.is_empty()))
}

/// Shape checks on the fields the gateway reads (see `validate`): a wrong type
/// is our own clear 400 instead of a wrong decision or an upstream's 400.
fn check_shape(endpoint: Endpoint, v: &serde_json::Value) -> Result<(), ApiError> {
    super::validate::body(endpoint, v).map_err(ApiError::bad_request)
}

/// Tenant and feature limits, taken before the decision.
fn request_limits(
    gw: &Gateway,
    rt: &Runtime,
    tenant: &str,
    f: &RequestFeatures,
    now: Instant,
) -> Result<Vec<super::limits::Slot>, ApiError> {
    let mut slots = Vec::new();
    for limit in &rt.policy.policy().protect.limits {
        let key = match (limit.scope, &f.feature) {
            (LimitScope::Tenant, _) => format!("tenant:{tenant}"),
            (LimitScope::Feature, Some(feat)) => format!("feature:{feat}"),
            _ => continue,
        };
        if let Err(wait) = dispatch::charge(gw, &limit.kind, &key, f.input_tokens, now, &mut slots)
        {
            let what = match limit.kind {
                crate::ir::LimitKind::Concurrency(n) => format!("at most {n} concurrent requests"),
                crate::ir::LimitKind::Rate {
                    requests,
                    window_ms,
                } => format!("{requests} requests per {}", window(window_ms)),
                crate::ir::LimitKind::Tokens { tokens, window_ms } => {
                    format!("{tokens} tokens per {}", window(window_ms))
                }
            };
            let scope = if limit.scope == LimitScope::Tenant {
                "tenant"
            } else {
                "feature"
            };
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                format!("rate limited: the policy allows {what} per {scope} (`{key}`)"),
            )
            .code("rate_limited")
            .retry_after(wait));
        }
    }
    Ok(slots)
}

fn window(ms: u64) -> String {
    match ms {
        1000 => "second".into(),
        60_000 => "minute".into(),
        3_600_000 => "hour".into(),
        86_400_000 => "day".into(),
        _ => format!("{ms}ms"),
    }
}

/// A denial as an OpenAI error; the engine's message names the rule and where it is.
fn denial(rt: &Runtime, tenant: &str, d: &Denial) -> ApiError {
    let p = &rt.policy;
    let msg = d.message(p);
    let code = d.code().replace('-', "_");
    match d {
        Denial::ModelDenied { .. } | Denial::NoModelAvailable { .. } => ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!("tenant `{tenant}`: {msg}"),
        )
        .code(code),
        Denial::ModelDisabled { .. } => ApiError::not_found(msg).code(code),
        Denial::ModelCannotServe { .. } => ApiError::bad_request(msg).code(code),
        Denial::UnknownModel(name) => {
            let pol = p.policy();
            let names = pol
                .models
                .iter()
                .map(|m| m.name.as_str())
                .chain(pol.intents.iter().map(|i| i.name.as_str()));
            let hint = crate::diag::did_you_mean(name, names)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            ApiError::not_found(format!("{msg}{hint}")).code("model_not_found")
        }
        Denial::BudgetBlocked | Denial::ConfirmationRequired => ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "budget_exceeded",
            format!("tenant `{tenant}`: {msg}"),
        )
        .code(code),
    }
}

async fn proxy(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    endpoint: Endpoint,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    // The policy is loaded once; the whole request uses this version.
    let rt = gw.runtime();
    let (tenant_idx, tenant) = authenticate(&rt, &req)?;
    let feature_header = req
        .headers()
        .get("x-routeplane-feature")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let prepared = prepare(&gw, &rt, tenant, req, endpoint, started).await;
    let (features, body, slots, decision, removed, budget) = match prepared {
        Ok(p) => p,
        Err((e, denial_message)) => {
            let logged = refused(
                &gw,
                &rt,
                &tenant.id,
                feature_header.as_deref(),
                &e,
                denial_message,
                started,
            );
            let mut r = e.into_response();
            if let Ok(v) = HeaderValue::from_str(rt.policy.version()) {
                r.headers_mut().insert("x-routeplane-policy", v);
            }
            // A denial has its line in the decision log like any request.
            if let Some(v) = logged.and_then(|id| HeaderValue::from_str(&id).ok()) {
                r.headers_mut().insert("x-routeplane-decision", v);
            }
            return Ok(r);
        }
    };
    let ctx = RequestCtx {
        rt: rt.clone(),
        tenant: tenant_idx,
        features,
        decision,
        body,
        decision_id: gw.next_decision_id(),
        started,
        slots,
        removed,
        budget,
    };
    Ok(dispatch::run(gw, ctx).await)
}

type Prepared = (
    RequestFeatures,
    ClientBody,
    Vec<super::limits::Slot>,
    super::engine::Decision,
    Vec<crate::decision_log::Removed>,
    Option<crate::budget::RequestBudget>,
);

/// Everything between authentication and dispatch; an error carries the
/// denial message when the policy refused the request.
async fn prepare(
    gw: &Gateway,
    rt: &Runtime,
    tenant: &TenantView,
    req: Request<Incoming>,
    endpoint: Endpoint,
    started: Instant,
) -> Result<Prepared, (ApiError, Option<String>)> {
    let (parts, body) = read_body(rt, req).await.map_err(|e| (e, None))?;
    let (features, mut body) = features(endpoint, &parts, body).map_err(|e| (e, None))?;
    undeclared_meta_header(&parts, rt).map_err(|e| (e, None))?;
    features
        .check_declared(&rt.policy)
        .map_err(|m| (ApiError::bad_request(m), None))?;
    let slots = request_limits(gw, rt, &tenant.id, &features, started).map_err(|e| (e, None))?;
    // Budgets: where they stand now decides the threshold action for `decide`.
    let check = match &gw.budgets {
        Some(b) => Some(
            b.check_off_loop(
                rt.policy.policy(),
                tenant,
                features.feature.as_deref(),
                crate::state::now_ms(),
            )
            .await
            .map_err(|e| {
                let msg = format!("the budget store is unavailable: {e}");
                tracing::error!(tenant = %tenant.id, "{msg}");
                (
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "budget_unavailable", msg)
                        .code("budget_unavailable"),
                    None,
                )
            })?,
        ),
        None => None,
    };
    if let Some(c) = &check {
        if let (Some(action), Some(msg)) = (c.action, &c.message) {
            tracing::warn!(tenant = %tenant.id, action = ?action, "budget threshold reached: {msg}");
            if let Some(m) = &gw.metrics {
                m.budget_action(&tenant.id, action);
            }
        }
        if let Some(m) = &gw.metrics {
            for (a, b) in &c.budgets {
                m.budget_balance(&a.charge.counter.key, a.charge.limit, b.spent, b.reserved);
            }
        }
    }
    // Streams report their usage in a final chunk only when asked; settling needs it.
    if let (Some(_), true, Endpoint::Chat, ClientBody::Json(b)) =
        (&check, features.stream, endpoint, &mut body)
    {
        b.ask_stream_usage();
    }
    let live = LiveStats { rt, now: started };
    let stats = crate::budget::BudgetStats {
        inner: &live,
        action: check.as_ref().and_then(|c| c.action),
        confirm_premium: check.as_ref().is_some_and(|c| c.confirm_premium),
    };
    // The decision log wants what each constraint removed: `explain` runs the
    // same evaluation with a recorder; without a log the plain path is used.
    let (decision, removed) = if gw.decision_log.is_some() {
        let trace = super::engine::explain(&rt.policy, tenant, &features, &stats);
        let removed = trace
            .constraints
            .iter()
            .map(|c| crate::decision_log::Removed {
                constraint: c.name.clone(),
                models: c.removed.clone(),
            })
            .collect();
        (trace.decision, removed)
    } else {
        (decide(&rt.policy, tenant, &features, &stats), Vec::new())
    };
    if let Err(d) = &decision.outcome {
        let mut e = denial(rt, &tenant.id, d);
        if let (Denial::BudgetBlocked | Denial::ConfirmationRequired, Some(msg)) =
            (d, check.as_ref().and_then(|c| c.message.as_ref()))
        {
            e.message = format!("{}; {msg}", e.message);
        }
        return Err((e, Some(d.message(&rt.policy))));
    }
    let budget = match (check, &gw.budgets) {
        (Some(c), Some(b)) => Some(crate::budget::RequestBudget::new(
            b.clone(),
            c,
            rt.policy.policy(),
            &tenant.id,
            features.feature.as_deref(),
            endpoint,
            features.max_tokens,
            features.input_tokens,
            match &body {
                ClientBody::Json(b) => Some(b.value()),
                ClientBody::Multipart { .. } => None,
            },
            &decision.attempts,
        )),
        _ => None,
    };
    Ok((features, body, slots, decision, removed, budget))
}

/// A request refused before dispatch still counts, and a policy denial is
/// logged: its decision id, for the response's `x-routeplane-decision`.
fn refused(
    gw: &Gateway,
    rt: &Runtime,
    tenant: &str,
    feature: Option<&str>,
    e: &ApiError,
    denial: Option<String>,
    started: Instant,
) -> Option<String> {
    if let Some(metrics) = &gw.metrics {
        metrics.request_done(&crate::metrics::RequestDone {
            tenant,
            feature,
            status: e.status.as_u16(),
            total: started.elapsed(),
            ..Default::default()
        });
    }
    let (Some(sink), Some(denial)) = (&gw.decision_log, denial) else {
        return None;
    };
    let decision_id = gw.next_decision_id();
    sink.log(crate::decision_log::DecisionRecord {
        decision_id: decision_id.clone(),
        policy_version: rt.policy.version().to_string(),
        tenant: tenant.to_string(),
        feature: feature.map(str::to_string),
        status: e.status.as_u16(),
        denial: Some(denial),
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
        ..Default::default()
    });
    Some(decision_id)
}

fn kind_endpoint(k: ModelKind) -> Option<Endpoint> {
    match k {
        ModelKind::Chat => Some(Endpoint::Chat),
        ModelKind::Embeddings => Some(Endpoint::Embeddings),
        ModelKind::Image => Some(Endpoint::Images),
        ModelKind::Audio => Some(Endpoint::AudioSpeech),
        ModelKind::Video => None,
    }
}

/// `GET /v1/models`: the models this tenant may use, each asked of `decide`
/// by name, so the list can never disagree with what a request would get.
fn models(gw: &Gateway, req: &Request<Incoming>) -> Response<Body> {
    let rt = gw.runtime();
    let (_, tenant) = match authenticate(&rt, req) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let p = rt.policy.policy();
    let stats = LiveStats {
        rt: &rt,
        now: Instant::now(),
    };
    let mut data = Vec::new();
    for m in &p.models {
        let Some(endpoint) = kind_endpoint(m.kind) else {
            continue;
        };
        if !m.enabled {
            continue;
        }
        let body = serde_json::json!({ "model": m.name, "messages": [{ "role": "user", "content": "" }], "input": "", "prompt": "" });
        let f = RequestFeatures::from_openai_json(endpoint, &body);
        let d = decide(&rt.policy, tenant, &f, &stats);
        if d.outcome.is_ok() && !d.attempts.is_empty() {
            let provider = p.provider(m.provider).map_or("", |pr| pr.name.as_str());
            data.push(serde_json::json!({ "id": m.name, "object": "model", "created": 0, "owned_by": provider }));
        }
    }
    let mut r = Response::new(full(
        serde_json::json!({ "object": "list", "data": data }).to_string(),
    ));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(rt.policy.version()) {
        r.headers_mut().insert("x-routeplane-policy", v);
    }
    r
}

/// `GET /metrics`: Prometheus text. Breaker gauges are refreshed at scrape
/// time, since an open breaker turns half-open by the clock alone.
fn metrics(gw: &Gateway) -> Response<Body> {
    let Some(m) = &gw.metrics else {
        return ApiError::not_found("metrics are disabled").into_response();
    };
    for (key, state) in gw.breaker_states() {
        let (scope, name) = match key.split_once(':') {
            Some(("model", n)) => (crate::metrics::BreakerScope::Model, n),
            Some(("provider", n)) => (crate::metrics::BreakerScope::Provider, n),
            _ => continue,
        };
        let gauge = match state {
            super::engine::BreakerState::Closed => crate::metrics::BreakerGauge::Closed,
            super::engine::BreakerState::HalfOpen => crate::metrics::BreakerGauge::HalfOpen,
            super::engine::BreakerState::Open => crate::metrics::BreakerGauge::Open,
        };
        m.breaker_state(scope, name, gauge);
    }
    let mut r = Response::new(full(m.encode()));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    r
}

/// The admin token check every admin endpoint starts with.
fn admin_auth(rt: &Runtime, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(expected) = rt.config.admin_token_sha256 else {
        return Err(ApiError::not_found(
            "admin endpoints are disabled: set `admin:` in the gateway config",
        ));
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(bearer_token)
        .map(sha256);
    if given.is_some_and(|h| bool::from(h.ct_eq(&expected))) {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "the admin endpoints need `Authorization: Bearer <admin token>`",
        ))
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `POST /admin/reload`: rebuild the policy (and config) from disk now, as a
/// SIGHUP does, and answer with the outcome: 200 and the version serving, or
/// 422 with the diagnostics while the last good version keeps serving. For
/// deploys that cannot send signals and want to know the edit took.
async fn admin_reload(gw: &Gateway, req: &Request<Incoming>) -> Response<Body> {
    if let Err(e) = admin_auth(&gw.runtime(), req) {
        return e.into_response();
    }
    // Its own task: a client that hangs up mid-build does not cancel a
    // reload halfway (built but neither swapped in nor recorded).
    let policies = Arc::clone(&gw.policies);
    let task = tokio::spawn(async move {
        match policies.reload_now() {
            Some(reload) => Some(reload.await),
            None => None,
        }
    });
    let failed = |summary: String, diagnostics: Vec<String>, rendered: String| {
        json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &serde_json::json!({
                "ok": false,
                "serving": gw.runtime().policy.version(),
                "error": {
                    "type": "policy_invalid",
                    "code": "policy_invalid",
                    "message": format!("{summary}; the last good policy keeps serving"),
                    "diagnostics": diagnostics,
                    "rendered": rendered,
                },
            }),
        )
    };
    match task.await {
        Ok(None) => {
            ApiError::not_found("this gateway's policy is not loaded from files").into_response()
        }
        // Built and swapped in; the runtime is the last check (it logs why not).
        Ok(Some(Ok(version))) if gw.runtime().policy.version() != version => failed(
            format!("version {version} built but the gateway could not serve it (see its log)"),
            Vec::new(),
            String::new(),
        ),
        Ok(Some(Ok(version))) => json_response(
            StatusCode::OK,
            &serde_json::json!({ "ok": true, "serving": version }),
        ),
        Ok(Some(Err(f))) => failed(f.summary, f.diagnostics, f.rendered),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("the reload did not finish: {e}"),
        )
        .into_response(),
    }
}

/// `GET /admin/policy`: the serving version, reload history and the last
/// failure's diagnostics. Needs the admin token.
fn admin_policy(gw: &Gateway, req: &Request<Incoming>) -> Response<Body> {
    let rt = gw.runtime();
    if let Err(e) = admin_auth(&rt, req) {
        return e.into_response();
    }
    let mut body = gw
        .policies
        .admin_json()
        .unwrap_or_else(|| serde_json::json!({ "version": rt.policy.version() }));
    if let Some(obj) = body.as_object_mut() {
        let breakers: serde_json::Map<String, serde_json::Value> = gw
            .breaker_states()
            .into_iter()
            .map(|(k, s)| (k, serde_json::to_value(s).unwrap_or_default()))
            .collect();
        obj.insert("breakers".into(), serde_json::Value::Object(breakers));
        obj.insert("serving".into(), serde_json::json!(rt.policy.version()));
    }
    json_response(StatusCode::OK, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> hyper::http::request::Parts {
        let mut b = Request::builder()
            .method("POST")
            .uri("/v1/chat/completions");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// `(endpoint, body)` -> `Ok(())` or the start of the 400 message.
    fn check(endpoint: Endpoint, body: &str, expect: Result<(), &str>) {
        let got = features(endpoint, &parts(&[]), Bytes::from(body.to_string()))
            .map(|_| ())
            .map_err(|e| e.message);
        match (&got, expect) {
            (Ok(()), Ok(())) => {}
            (Err(msg), Err(want)) => assert!(
                msg.starts_with(want),
                "{body}: got `{msg}`, want `{want}...`"
            ),
            _ => panic!("{body}: got {got:?}, want {expect:?}"),
        }
    }

    #[test]
    fn bearer_tokens_are_read_alike_for_tenants_and_the_admin() {
        for (header, want) in [
            ("Bearer sk-1", Some("sk-1")),
            ("bearer sk-1", Some("sk-1")),
            ("Bearer  sk-1 ", Some("sk-1")),
            ("Bearer ", None),
            ("Basic sk-1", None),
            ("sk-1", None),
        ] {
            let v = HeaderValue::from_str(header).unwrap();
            assert_eq!(bearer_token(&v), want, "{header:?}");
        }
    }

    #[test]
    fn request_shapes() {
        use Endpoint::*;
        check(
            Chat,
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            Ok(()),
        );
        check(
            Chat,
            r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
            Ok(()),
        );
        check(Chat, "", Err("the body is not valid JSON"));
        check(Chat, "{", Err("the body is not valid JSON"));
        check(Chat, "[1]", Err("the body must be a JSON object"));
        check(Chat, "null", Err("the body must be a JSON object"));
        check(Chat, "{}", Err("missing `messages`"));
        check(
            Chat,
            r#"{"messages":[]}"#,
            Err("`messages` must not be empty"),
        );
        check(
            Chat,
            r#"{"messages":"hi"}"#,
            Err("`messages` must be an array"),
        );
        check(
            Chat,
            r#"{"model":5,"messages":[{}]}"#,
            Err("`model` must be a string"),
        );
        check(
            Chat,
            r#"{"stream":"yes","messages":[{}]}"#,
            Err("`stream` must be true or false"),
        );
        check(Embeddings, r#"{"input":"x"}"#, Ok(()));
        check(Embeddings, "{}", Err("missing `input`"));
        check(Images, r#"{"prompt":"a cat"}"#, Ok(()));
        check(Images, "{}", Err("missing `prompt`"));
        check(AudioSpeech, "{}", Err("missing `input`"));
        check(
            AudioTranscription,
            "{}",
            Err("audio transcription expects a `multipart/form-data` body"),
        );
    }

    #[test]
    fn headers_set_feature_confirmation_and_metadata() {
        let p = parts(&[
            ("x-routeplane-feature", "code-review"),
            ("x-routeplane-confirm", "true"),
            ("x-routeplane-meta-priority", "low"),
        ]);
        let body = Bytes::from_static(br#"{"messages":[{"role":"user","content":"hi"}]}"#);
        let (f, _) = features(Endpoint::Chat, &p, body).unwrap();
        assert_eq!(f.feature.as_deref(), Some("code-review"));
        assert!(f.confirmed);
        assert!(f
            .meta
            .contains(&("priority".to_string(), "low".to_string())));
    }

    #[test]
    fn routing_headers_that_would_be_guessed_at_are_refused() {
        let hi = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let refused = |headers: &[(&str, &str)], body: &str| {
            features(
                Endpoint::Chat,
                &parts(headers),
                Bytes::from(body.to_string()),
            )
            .map(|_| ())
            .unwrap_err()
            .message
        };
        let m = refused(&[("x-routeplane-featur", "search")], hi);
        assert!(
            m.starts_with(
                "unknown header `x-routeplane-featur` (did you mean `x-routeplane-feature`?)"
            ),
            "{m}"
        );
        let m = refused(&[("x-routeplane-meta-feature", "search")], hi);
        assert!(m.contains("sent as `x-routeplane-feature`"), "{m}");
        let m = refused(
            &[("x-routeplane-feature", "a"), ("x-routeplane-feature", "b")],
            hi,
        );
        assert!(m.contains("sent more than once"), "{m}");
        let m = refused(
            &[
                ("x-routeplane-meta-priority", "low"),
                ("x-routeplane-meta-priority", "high"),
            ],
            hi,
        );
        assert!(
            m.contains("`x-routeplane-meta-priority` is sent more than once"),
            "{m}"
        );
        let with_meta = r#"{"metadata":{"feature":"code-review","priority":"high"},"messages":[{"role":"user","content":"hi"}]}"#;
        let m = refused(&[("x-routeplane-feature", "search")], with_meta);
        assert_eq!(
            m,
            "`feature` is `search` in the header `x-routeplane-feature` but `code-review` in `metadata.feature`: send one of them, or the same value in both"
        );
        let m = refused(&[("x-routeplane-meta-priority", "low")], with_meta);
        assert!(
            m.starts_with(
                "`priority` is `low` in the header `x-routeplane-meta-priority` but `high`"
            ),
            "{m}"
        );
        // An empty header says nothing, and so does not conflict either.
        let empty = parts(&[("x-routeplane-meta-priority", "")]);
        let (f, _) = features(Endpoint::Chat, &empty, Bytes::from(with_meta)).unwrap();
        assert!(f
            .meta
            .contains(&("priority".to_string(), "high".to_string())));
        // The same value in both places is one request, not a conflict.
        let same = parts(&[
            ("x-routeplane-feature", "code-review"),
            ("x-routeplane-meta-priority", "high"),
        ]);
        assert!(features(Endpoint::Chat, &same, Bytes::from(with_meta)).is_ok());
    }

    #[test]
    fn output_caps_must_be_read_and_agree() {
        use Endpoint::Chat;
        check(
            Chat,
            r#"{"max_output_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
            Err("`max_output_tokens` is a field of the Responses API"),
        );
        check(
            Chat,
            r#"{"max_tokens":10,"max_completion_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#,
            Err("`max_completion_tokens` is 20 but `max_tokens` is 10"),
        );
        check(
            Chat,
            r#"{"max_tokens":10,"max_completion_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
            Ok(()),
        );
    }
}
