//! Dispatch along the decision's attempts: per attempt the breakers and
//! limits are checked again, retries follow the policy's status filter and
//! backoff (honouring `Retry-After`), timeouts bound the first token and the
//! whole answer, and a stream falls back only before its first token (the
//! first event with content, see [`super::relay`]): nothing reaches the
//! client before it. After that a failure ends the stream with an SSE error
//! event.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};

use super::breaker::Probes;
use super::engine::{Decision, RequestFeatures};
use super::error::{full, ApiError, Body};
use super::limits::Slot;
use super::providers::{AttemptError, ByteStream, ClientBody, Reply, UpstreamRequest, Usage};
use super::relay::Relay;
use super::{sse, Gateway, ModelRt, Runtime};
use crate::ir::{LimitKind, LimitScope, Micros, RetryOn};
use crate::metrics::{BreakerGauge, BreakerScope, RequestDone};

/// Everything one request carries through dispatch.
pub struct RequestCtx {
    pub rt: Arc<Runtime>,
    pub tenant: usize,
    pub features: RequestFeatures,
    pub decision: Decision,
    pub body: ClientBody,
    pub decision_id: String,
    pub started: Instant,
    /// Tenant and feature concurrency slots, held until the answer is complete.
    pub slots: Vec<Slot>,
    /// What each firing constraint removed, when the decision log wants it.
    pub removed: Vec<crate::decision_log::Removed>,
    /// The budget check and the current attempt's reservation; `None` when
    /// budgets are not enforced. Dropping it releases an unsettled reservation.
    pub budget: Option<crate::budget::RequestBudget>,
}

pub use crate::decision_log::{Attempt as AttemptRecord, DecisionRecord};

/// Attempts that reached an upstream; skipped ones (breaker open, limit) are only logged.
fn sent(attempts: &[AttemptRecord]) -> usize {
    const SKIPPED: [&str; 6] = [
        "breaker_open",
        "provider_breaker_open",
        "limited",
        "no_provider",
        "budget",
        "unsupported_parameter",
    ];
    attempts
        .iter()
        .filter(|a| !SKIPPED.contains(&a.outcome.as_str()))
        .count()
}

fn att(m: &ModelRt, outcome: String, retry: u32, ms: u64) -> AttemptRecord {
    AttemptRecord {
        model: m.name.clone(),
        provider: m.provider.clone(),
        outcome,
        retry,
        latency_ms: ms as f64,
        first_token_ms: None,
        error: None,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What one attempt produced before anything reached the client.
enum Started {
    Full {
        content_type: String,
        body: Bytes,
        usage: Option<Usage>,
    },
    Stream {
        /// The whole events the upstream sent up to its first token and
        /// with it (what came before it was held until then).
        first: Bytes,
        rest: ByteStream,
    },
}

/// A successful attempt, for [`respond`].
struct Answer {
    started: Started,
    /// The relay the stream's first events went through; it goes on with the rest.
    relay: Relay,
    /// When the attempt started.
    t0: Instant,
    /// The policy's total timeout.
    total: Option<Duration>,
    /// The breaker probes the attempt holds, until its outcome is recorded.
    probes: Probes,
}

fn retry_matches(e: &AttemptError, on: &[RetryOn]) -> bool {
    on.iter().any(|r| match (r, e) {
        (RetryOn::Status(s), AttemptError::Status { status, .. }) => s == status,
        (RetryOn::StatusClass(c), AttemptError::Status { status, .. }) => {
            status / 100 == *c || status / 100 == *c / 100
        }
        (RetryOn::Timeout, AttemptError::Timeout) => true,
        (RetryOn::Connect, AttemptError::Connect(_)) => true,
        (RetryOn::Reset, AttemptError::Reset(_) | AttemptError::Protocol(_)) => true,
        _ => false,
    })
}

/// The cost of an answer at the model's prices.
pub fn cost(rt: &Runtime, model: usize, usage: &Usage) -> Micros {
    let Some(m) = rt.policy.policy().models.get(model) else {
        return 0;
    };
    let p = &m.pricing;
    let input = u128::from(usage.prompt_tokens) * u128::from(p.input_per_mtok);
    let output = u128::from(usage.completion_tokens) * u128::from(p.output_per_mtok);
    u64::try_from((input + output) / 1_000_000).unwrap_or(u64::MAX)
}

struct Outcome {
    attempts: Vec<AttemptRecord>,
    last_error: Option<AttemptError>,
    /// Some attempt was refused by a model or provider limit.
    limited: Option<Duration>,
    /// Some attempt was skipped because a breaker was open.
    breaker_open: bool,
    /// What a provider's API could not carry, when that skipped a model: the
    /// client's 400 only when nothing else went wrong.
    untranslatable: Option<AttemptError>,
}

/// Take the model and provider limits for one attempt, or say how long until a retry could pass.
fn take_limits(
    gw: &Gateway,
    rt: &Runtime,
    m: &ModelRt,
    input_tokens: u64,
    now: Instant,
) -> Result<Vec<Slot>, Duration> {
    let mut slots = Vec::new();
    for limit in &rt.policy.policy().protect.limits {
        let key = match limit.scope {
            LimitScope::Model => format!("model:{}", m.name),
            LimitScope::Provider => format!("provider:{}", m.provider),
            LimitScope::Tenant | LimitScope::Feature => continue,
        };
        charge(gw, &limit.kind, &key, input_tokens, now, &mut slots)?;
    }
    Ok(slots)
}

/// Check one limit for `key`; concurrency slots are pushed to `slots`.
pub fn charge(
    gw: &Gateway,
    kind: &LimitKind,
    key: &str,
    input_tokens: u64,
    now: Instant,
    slots: &mut Vec<Slot>,
) -> Result<(), Duration> {
    let id = format!("{kind:?}|{key}");
    // A shared store (Redis) keeps rate windows for every replica at once.
    let shared = |amount: u64, limit: u64, window_ms: u64| {
        gw.budgets.as_ref().and_then(|b| {
            b.store
                .charge_rate(&id, amount, limit, window_ms, crate::state::now_ms())
        })
    };
    let shared = match kind {
        LimitKind::Concurrency(_) => None,
        LimitKind::Rate {
            requests,
            window_ms,
        } => shared(1, *requests, *window_ms),
        LimitKind::Tokens { tokens, window_ms } => shared(input_tokens, *tokens, *window_ms),
    };
    if let Some(r) = shared {
        return r.map_err(Duration::from_millis);
    }
    match kind {
        LimitKind::Concurrency(max) => match gw.limiters.acquire(&id, *max) {
            Some(s) => {
                slots.push(s);
                Ok(())
            }
            None => Err(Duration::from_secs(1)),
        },
        LimitKind::Rate {
            requests,
            window_ms,
        } => gw
            .limiters
            .charge(&id, 1, *requests, Duration::from_millis(*window_ms), now),
        LimitKind::Tokens { tokens, window_ms } => gw.limiters.charge(
            &id,
            input_tokens,
            *tokens,
            Duration::from_millis(*window_ms),
            now,
        ),
    }
}

/// Run the attempts; answer the client.
pub async fn run(gw: Arc<Gateway>, ctx: RequestCtx) -> Response<Body> {
    let rt = ctx.rt.clone();
    let protect = &rt.policy.policy().protect;
    let retry = protect.retry.clone();
    let first_token = protect.timeout.first_token_ms.map(Duration::from_millis);
    let total = protect.timeout.total_ms.map(Duration::from_millis);
    let stream = ctx.features.stream;
    // The gateway asks for a stream's usage for itself; the client gets the
    // usage-only chunk when it asked too.
    let usage_to_client = match &ctx.body {
        ClientBody::Json(b) => b.client_asked_usage(),
        ClientBody::Multipart { .. } => false,
    };
    let mut out = Outcome {
        attempts: Vec::new(),
        last_error: None,
        limited: None,
        breaker_open: false,
        untranslatable: None,
    };

    let mut previous: Option<&str> = None;
    'models: for &model_id in &ctx.decision.attempts {
        let Some(m) = rt.model(model_id) else {
            continue;
        };
        if let (Some(prev), Some(metrics)) = (previous, &gw.metrics) {
            metrics.fallback(prev, &m.name);
        }
        previous = Some(&m.name);
        let Some(upstream) = m.upstream.clone() else {
            out.attempts.push(att(m, "no_provider".into(), 0, 0));
            continue;
        };
        let mut req = UpstreamRequest {
            endpoint: ctx.features.endpoint,
            body: &ctx.body,
            model: &m.upstream_model,
            stream,
            translated: None,
        };
        // Before any breaker, limit or budget is touched: a request this
        // provider's API cannot carry is never sent, so it takes nothing.
        let translated = match upstream.translate(&req) {
            Ok(t) => t,
            Err(e) => {
                let mut a = att(m, e.code(), 0, 0);
                a.error = Some(crate::decision_log::redact(&e.to_string()));
                out.attempts.push(a);
                out.untranslatable.get_or_insert(e);
                continue;
            }
        };
        req.translated = translated.as_ref();
        let mut tries: u32 = 0;
        loop {
            let now = Instant::now();
            // Breakers are checked again for every attempt, retries included.
            // A probe is given back if this attempt ends without a verdict,
            // however it ends (the other breaker, a limit, the budget, a
            // client error, the client leaving): `probes` holds it.
            let mut probes = Probes::default();
            let Some(mp) = m.model_breaker.try_acquire(now) else {
                out.breaker_open = true;
                out.attempts.push(att(m, "breaker_open".into(), tries, 0));
                break;
            };
            probes.hold(mp, &m.model_breaker);
            let Some(pp) = m.provider_breaker.try_acquire(now) else {
                out.breaker_open = true;
                out.attempts
                    .push(att(m, "provider_breaker_open".into(), tries, 0));
                break;
            };
            probes.hold(pp, &m.provider_breaker);
            let slots = match take_limits(&gw, &rt, m, ctx.features.input_tokens, now) {
                Ok(s) => s,
                Err(wait) => {
                    out.limited = Some(out.limited.map_or(wait, |w| w.min(wait)));
                    out.attempts.push(att(m, "limited".into(), tries, 0));
                    break;
                }
            };
            // Every attempt reserves its own estimate, for the model it uses:
            // a retry, a fallback or a downgrade passes the budget again.
            if let Some(b) = &ctx.budget {
                let id = attempt_id(&ctx.decision_id, out.attempts.len());
                let default_cap = upstream.default_output_cap(req.endpoint);
                if let Err(refused) = b
                    .reserve(rt.policy.policy(), model_id, &id, default_cap)
                    .await
                {
                    drop(slots);
                    if refused.store_unavailable {
                        // The next model would ask the same store.
                        out.attempts
                            .push(att(m, "budget_unavailable".into(), tries, 0));
                        break 'models;
                    }
                    out.attempts.push(att(m, "budget".into(), tries, 0));
                    break;
                }
            }
            let t0 = Instant::now();
            let mut relay = Relay::new(ctx.budget.is_some(), usage_to_client);
            let res = attempt(&upstream, req, first_token, total, &mut relay).await;
            let elapsed = t0.elapsed();
            match res {
                Ok(started) => {
                    let record = att(m, "ok".into(), tries, ms(elapsed));
                    out.attempts.push(record);
                    let answer = Answer {
                        started,
                        relay,
                        t0,
                        total,
                        probes,
                    };
                    return respond(gw, ctx, model_id.index(), answer, out, slots).await;
                }
                Err(e) => {
                    if let Some(b) = &ctx.budget {
                        b.release();
                    }
                    if e.blames_the_request() {
                        // Refused for what the request asks, not because the
                        // upstream is unwell: neither the breakers nor the live
                        // success rate hear of it, or one client sending bad
                        // requests could open a breaker for every tenant. A
                        // probe is given back when `probes` goes.
                    } else {
                        record_result(&gw, &rt, m, false, None, None);
                    }
                    let mut a = att(m, e.code(), tries, ms(elapsed));
                    a.error = Some(crate::decision_log::redact(&e.to_string()));
                    out.attempts.push(a);
                    if let Some(metrics) = &gw.metrics {
                        metrics.attempt_failed(&m.name, &m.provider, &e.code());
                    }
                    drop(slots);
                    if e.is_client_error() {
                        let e = scrub(e, upstream.cfg.api_key.as_ref().map(|k| k.expose()));
                        return client_error(gw, ctx, e, out);
                    }
                    if matches!(e, AttemptError::Untranslatable { .. }) {
                        // The same request would be refused again: next model.
                        out.untranslatable.get_or_insert(e);
                        break;
                    }
                    let retry_now = retry
                        .as_ref()
                        .filter(|r| tries < r.count && retry_matches(&e, &r.on));
                    let wait = retry_now.and_then(|r| {
                        let backoff = Duration::from_millis(
                            r.backoff_min_ms
                                .saturating_mul(1u64 << tries.min(20))
                                .min(r.backoff_max_ms.max(r.backoff_min_ms)),
                        );
                        match &e {
                            // Waiting longer than the policy's backoff cap is pointless
                            // when a fallback may answer now.
                            AttemptError::Status {
                                retry_after: Some(ra),
                                ..
                            } if *ra > Duration::from_millis(r.backoff_max_ms) => None,
                            AttemptError::Status {
                                retry_after: Some(ra),
                                ..
                            } => Some((*ra).max(backoff)),
                            _ => Some(backoff),
                        }
                    });
                    out.last_error = Some(e);
                    match wait {
                        Some(w) => {
                            tries += 1;
                            if let Some(metrics) = &gw.metrics {
                                metrics.retry(&m.name, &m.provider);
                            }
                            tokio::time::sleep(w).await;
                        }
                        None => break,
                    }
                }
            }
        }
    }
    failed(gw, ctx, out)
}

fn gauge(s: super::engine::BreakerState) -> BreakerGauge {
    match s {
        super::engine::BreakerState::Closed => BreakerGauge::Closed,
        super::engine::BreakerState::HalfOpen => BreakerGauge::HalfOpen,
        super::engine::BreakerState::Open => BreakerGauge::Open,
    }
}

/// Feed one attempt's result to the live stats and the breakers; export breaker changes.
fn record_result(
    gw: &Gateway,
    rt: &Runtime,
    m: &ModelRt,
    ok: bool,
    latency: Option<Duration>,
    first_token: Option<Duration>,
) {
    let now = Instant::now();
    if ok {
        m.live.record_success(
            latency.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            first_token.map(|d| d.as_secs_f64() * 1000.0),
        );
    } else {
        m.live.record_failure();
    }
    let breakers = [
        (
            &rt.model_breaker,
            &m.model_breaker,
            BreakerScope::Model,
            &m.name,
        ),
        (
            &rt.provider_breaker,
            &m.provider_breaker,
            BreakerScope::Provider,
            &m.provider,
        ),
    ];
    for (cfg, breaker, scope, name) in breakers {
        let Some(cfg) = cfg else { continue };
        let before = breaker.state(now);
        breaker.record(cfg, ok, now);
        let after = breaker.state(now);
        if before != after {
            tracing::info!(scope = ?scope, name = %name, state = ?after, "circuit breaker changed");
            if let Some(metrics) = &gw.metrics {
                metrics.breaker_state(scope, name, gauge(after));
            }
        }
    }
}

/// `relay`: what a stream's bytes go through on their way to the client.
async fn attempt(
    upstream: &super::providers::Upstream,
    req: UpstreamRequest<'_>,
    first_token: Option<Duration>,
    total: Option<Duration>,
    relay: &mut Relay,
) -> Result<Started, AttemptError> {
    let stream = req.stream;
    let fut = async {
        match upstream.send(req).await? {
            Reply::Full {
                content_type,
                body,
                usage,
            } => Ok(Started::Full {
                content_type,
                body,
                usage,
            }),
            // Up to the first token (not a comment or an empty role chunk:
            // `Relay`), so a stall after a keep-alive still falls back.
            Reply::Stream(mut s) => loop {
                match s.next().await {
                    Some(Ok(chunk)) => {
                        let first = relay.push(chunk)?;
                        if relay.started() {
                            break Ok(Started::Stream { first, rest: s });
                        }
                    }
                    Some(Err(e)) => break Err(e),
                    None => {
                        break Err(AttemptError::Reset(
                            "the stream ended before its first token".into(),
                        ))
                    }
                }
            },
        }
    };
    // For a stream the first-token timeout bounds everything up to the first
    // token; for a full answer only the total timeout applies.
    let limit = match (stream, first_token, total) {
        (true, Some(f), Some(t)) => Some(f.min(t)),
        (true, Some(f), None) => Some(f),
        (_, _, t) => t,
    };
    match limit {
        Some(d) => tokio::time::timeout(d, fut)
            .await
            .unwrap_or(Err(AttemptError::Timeout)),
        None => fut.await,
    }
}

fn set_header<B>(r: &mut Response<B>, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

fn put_header<B>(r: &mut Response<B>, name: HeaderName, value: Option<&HeaderValue>) {
    if let Some(v) = value {
        r.headers_mut().insert(name, v.clone());
    }
}

const MODEL: HeaderName = HeaderName::from_static("x-routeplane-model");
const PROVIDER: HeaderName = HeaderName::from_static("x-routeplane-provider");
const INTENT: HeaderName = HeaderName::from_static("x-routeplane-intent");
const POLICY: HeaderName = HeaderName::from_static("x-routeplane-policy");
const ATTEMPTS: HeaderName = HeaderName::from_static("x-routeplane-attempts");
const DECISION: HeaderName = HeaderName::from_static("x-routeplane-decision");
const BUDGET_WARNING: HeaderName = HeaderName::from_static("x-routeplane-budget-warning");

/// The routing headers of every answer. The names and the version are header
/// values built with the runtime; only the decision id is new per request.
fn routing_headers<B>(
    r: &mut Response<B>,
    ctx: &RequestCtx,
    model: Option<&ModelRt>,
    attempts: usize,
) {
    // Room for all of them at once: the map grows once, not two or three times.
    r.headers_mut().reserve(7);
    if let Some(m) = model {
        put_header(r, MODEL, m.name_header.as_ref());
        put_header(r, PROVIDER, m.provider_header.as_ref());
    }
    if let Some(i) = ctx.decision.intent {
        put_header(
            r,
            INTENT,
            ctx.rt
                .intent_headers
                .get(i.index())
                .and_then(Option::as_ref),
        );
    }
    put_header(r, POLICY, ctx.rt.version_header.as_ref());
    r.headers_mut().insert(ATTEMPTS, attempts_value(attempts));
    set_header(r, DECISION, &ctx.decision_id);
    if let Some(w) = ctx.budget.as_ref().and_then(|b| b.warning()) {
        set_header(r, BUDGET_WARNING, w);
    }
}

fn attempts_value(n: usize) -> HeaderValue {
    const SMALL: [HeaderValue; 5] = [
        HeaderValue::from_static("0"),
        HeaderValue::from_static("1"),
        HeaderValue::from_static("2"),
        HeaderValue::from_static("3"),
        HeaderValue::from_static("4"),
    ];
    SMALL
        .get(n)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

/// How a dispatched request ended, before it becomes a log line and metrics.
struct Summary {
    model: Option<String>,
    status: u16,
    usage: Option<Usage>,
    actual_cost_micros: Option<Micros>,
    error: Option<String>,
    first_token_ms: Option<u64>,
    attempts: Vec<AttemptRecord>,
}

/// A summary of the request's attempts, the rest filled in by the caller.
fn base_record(attempts: Vec<AttemptRecord>) -> Summary {
    Summary {
        model: None,
        status: 0,
        usage: None,
        actual_cost_micros: None,
        error: None,
        first_token_ms: None,
        attempts,
    }
}

/// `format!("{decision_id}/{n}")`, without `format!`'s machinery: once an
/// attempt, on every budgeted request.
fn attempt_id(decision_id: &str, n: usize) -> String {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (rest % 10) as u8;
        }
        rest /= 10;
        if rest == 0 || at == 0 {
            break;
        }
    }
    let mut id = String::with_capacity(decision_id.len() + 1 + digits.len() - at);
    id.push_str(decision_id);
    id.push('/');
    id.extend(digits.iter().skip(at).map(|d| char::from(*d)));
    id
}

/// The one exit of every dispatched request: metrics and the decision log.
fn log(gw: &Gateway, ctx: &RequestCtx, mut s: Summary) {
    let p = ctx.rt.policy.policy();
    let tenant = ctx.rt.tenants.get(ctx.tenant).map_or("", |t| t.id.as_str());
    let intent = ctx
        .decision
        .intent
        .and_then(|i| p.intent(i))
        .map(|i| i.name.as_str());
    let provider = s
        .model
        .as_deref()
        .and_then(|m| s.attempts.iter().rev().find(|a| a.model == m))
        .map(|a| a.provider.clone());
    let total = ctx.started.elapsed();
    if let Some(metrics) = &gw.metrics {
        metrics.request_done(&RequestDone {
            tenant,
            feature: ctx.features.feature.as_deref(),
            intent,
            model: s
                .model
                .as_deref()
                .or(s.attempts.last().map(|a| a.model.as_str())),
            provider: provider
                .as_deref()
                .or(s.attempts.last().map(|a| a.provider.as_str())),
            status: s.status,
            total,
            first_token: s.first_token_ms.map(Duration::from_millis),
            input_tokens: s.usage.map_or(0, |u| u.prompt_tokens),
            output_tokens: s.usage.map_or(0, |u| u.completion_tokens),
            estimated_cost: ctx.decision.estimated_cost,
            actual_cost: s.actual_cost_micros.unwrap_or(0),
        });
    }
    let Some(sink) = &gw.decision_log else { return };
    if let (Some(err), Some(last)) = (&s.error, s.attempts.last_mut()) {
        if last.error.is_none() {
            last.error = Some(crate::decision_log::redact(err));
        }
    }
    sink.log(DecisionRecord {
        ts: String::new(),
        decision_id: ctx.decision_id.clone(),
        policy_version: ctx.rt.policy.version().to_string(),
        tenant: tenant.to_string(),
        feature: ctx.features.feature.clone(),
        endpoint: super::providers::endpoint_name(ctx.features.endpoint).to_string(),
        requested_model: ctx.features.model.clone(),
        stream: ctx.features.stream,
        intent: intent.map(str::to_string),
        route: ctx
            .decision
            .route
            .and_then(|r| p.routes.get(r.index()))
            .map(|r| {
                let intent = p.intent(r.intent).map_or("", |i| i.name.as_str());
                format!("{intent} ({})", ctx.rt.policy.location(r.span))
            }),
        removed: ctx.removed.clone(),
        plan: ctx
            .decision
            .attempts
            .iter()
            .filter_map(|m| p.model(*m))
            .map(|m| m.name.clone())
            .collect(),
        chosen_model: s.model,
        provider,
        attempts: s.attempts,
        status: s.status,
        denial: None,
        input_tokens: s
            .usage
            .map_or(ctx.features.input_tokens, |u| u.prompt_tokens),
        output_tokens: s.usage.map_or(0, |u| u.completion_tokens),
        estimated_cost_micros: ctx.decision.estimated_cost,
        actual_cost_micros: s.actual_cost_micros.unwrap_or(0),
        first_token_ms: s.first_token_ms.map(|m| m as f64),
        total_ms: total.as_secs_f64() * 1000.0,
    });
}

async fn respond(
    gw: Arc<Gateway>,
    ctx: RequestCtx,
    model: usize,
    answer: Answer,
    out: Outcome,
    slots: Vec<Slot>,
) -> Response<Body> {
    let Answer {
        started,
        relay,
        t0,
        total,
        probes,
    } = answer;
    let rt = ctx.rt.clone();
    let Some(m) = rt.models.get(model) else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "model vanished",
        )
        .into_response();
    };
    let attempts = sent(&out.attempts);
    match started {
        Started::Full {
            content_type,
            body,
            usage,
        } => {
            let elapsed = t0.elapsed();
            record_result(&gw, &rt, m, true, Some(elapsed), None);
            let body_bytes = if ctx.budget.is_some() && usage.is_none() {
                body.clone()
            } else {
                Bytes::new()
            };
            let mut r = Response::new(full(body));
            if let Ok(v) = HeaderValue::from_str(&content_type) {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            routing_headers(&mut r, &ctx, Some(m), attempts);
            let mut rec = base_record(out.attempts);
            rec.model = Some(m.name.clone());
            rec.status = 200;
            rec.usage = usage;
            rec.actual_cost_micros = usage.map(|u| cost(&rt, model, &u));
            if let Some(b) = &ctx.budget {
                let p = rt.policy.policy();
                let counted = match (usage, p.models.get(model)) {
                    (None, Some(pm)) => crate::estimate::response_output_tokens(
                        crate::estimate::Tokenizer::for_model(pm),
                        &body_bytes,
                    ),
                    _ => 0,
                };
                let u = usage.map(|u| (u.prompt_tokens, u.completion_tokens));
                if let Some(actual) = b.settle(p, u, counted).await {
                    rec.actual_cost_micros = Some(actual);
                }
            }
            log(&gw, &ctx, rec);
            r
        }
        Started::Stream { first, rest } => {
            let first_token = t0.elapsed();
            let mut head = Response::new(());
            let h = head.headers_mut();
            h.insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(
                hyper::header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache"),
            );
            routing_headers(&mut head, &ctx, Some(m), attempts);
            let body = Forward {
                first: Some(first),
                rest,
                deadline: total.map(|t| Box::pin(tokio::time::sleep_until((t0 + t).into()))),
                relay,
                settling: None,
                held: None,
                finish: Some(StreamEnd {
                    gw,
                    ctx,
                    model,
                    first_token,
                    t0,
                    out,
                    slots,
                    probes,
                }),
            };
            let (parts, ()) = head.into_parts();
            Response::from_parts(parts, BodyExt::boxed_unsync(body))
        }
    }
}

/// The body of a passed-through stream. It polls the upstream itself, so a
/// stream costs no task and no channel, and the client's pace is the
/// upstream's (backpressure). When the stream ends, fails or the client goes
/// away (hyper drops the body), the attempt is recorded exactly once.
struct Forward {
    first: Option<Bytes>,
    rest: ByteStream,
    /// The policy's total timeout, from the attempt's start.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Passes on whole events only, and reads the usage on the way.
    relay: Relay,
    /// The budget store's settle, started when the stream ended: the last
    /// bytes wait for it, so a client that saw the whole stream finds its
    /// spend recorded (the store call itself runs off the event loop).
    settling: Option<crate::budget::StoreCall>,
    /// The last bytes (the final chunk, or the error event), while they wait.
    held: Option<Bytes>,
    /// What is needed to record the outcome; taken by [`Forward::finish`].
    finish: Option<StreamEnd>,
}

struct StreamEnd {
    gw: Arc<Gateway>,
    ctx: RequestCtx,
    model: usize,
    first_token: Duration,
    t0: Instant,
    out: Outcome,
    /// Model and provider concurrency slots, held while the stream runs.
    slots: Vec<Slot>,
    /// The breaker probes, until the stream's outcome is recorded; a stream
    /// whose client left (no verdict) gives them back.
    probes: Probes,
}

impl Forward {
    /// Record how the stream ended: breakers and live stats, the budget
    /// (whatever reached the client was paid for, a cut stream included),
    /// metrics and the decision log. Once; later calls do nothing.
    fn finish(&mut self, error: Option<(String, String)>, client_gone: bool) {
        let Some(StreamEnd {
            gw,
            ctx,
            model,
            first_token,
            t0,
            out,
            slots,
            probes,
        }) = self.finish.take()
        else {
            return;
        };
        drop(slots);
        // Dropped when this returns, after the verdict (if any) is recorded.
        let _probes = probes;
        let rt = ctx.rt.clone();
        let Some(m) = rt.models.get(model) else {
            return;
        };
        let relay = &mut self.relay;
        if let Some((_, code)) = &error {
            record_result(&gw, &rt, m, false, None, None);
            // The client's status stays 200, which it got; the provider
            // failed all the same, and only this counter can say so.
            if let Some(metrics) = &gw.metrics {
                metrics.attempt_failed(&m.name, &m.provider, code);
            }
        } else if !client_gone {
            record_result(&gw, &rt, m, true, Some(t0.elapsed()), Some(first_token));
        }
        let mut rec = base_record(out.attempts);
        rec.model = Some(m.name.clone());
        rec.status = 200;
        rec.first_token_ms = Some(ms(first_token));
        let usage = relay.usage();
        rec.usage = usage;
        rec.actual_cost_micros = usage.map(|u| cost(&rt, model, &u));
        if let Some(b) = &ctx.budget {
            let p = rt.policy.policy();
            let counted = match (usage, p.models.get(model)) {
                (None, Some(pm)) => crate::estimate::Tokenizer::for_model(pm).count(relay.text()),
                _ => 0,
            };
            let u = usage.map(|u| (u.prompt_tokens, u.completion_tokens));
            if let Some((actual, call)) = b.settle_in_poll(p, u, counted) {
                rec.actual_cost_micros = Some(actual);
                self.settling = call;
            }
        }
        rec.error = match (&error, client_gone) {
            (Some((msg, _)), _) => Some(msg.clone()),
            (None, true) => Some("the client went away".into()),
            _ => None,
        };
        if let (Some((_, code)), Some(last)) = (&error, rec.attempts.last_mut()) {
            last.outcome = "stream_cut".into();
            last.error = Some(format!("failed mid-stream: {code}"));
        }
        log(&gw, &ctx, rec);
    }

    /// The stream failed after its first byte: record it, then send the error event.
    fn fail(&mut self, msg: String, code: String) -> Bytes {
        let event = sse::error_event(&msg, &code);
        self.finish(Some((msg, code)), false);
        event
    }
}

impl hyper::body::Body for Forward {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.settle_pending(cx) {
            return Poll::Pending;
        }
        if let Some(last) = this.held.take() {
            return Poll::Ready(Some(Ok(Frame::data(last))));
        }
        loop {
            let out = match this.first.take() {
                Some(first) => first,
                None => {
                    if this.finish.is_none() {
                        return if this.settle_pending(cx) {
                            Poll::Pending
                        } else {
                            Poll::Ready(None)
                        };
                    }
                    if this
                        .deadline
                        .as_mut()
                        .is_some_and(|d| d.as_mut().poll(cx).is_ready())
                    {
                        let e = AttemptError::Timeout;
                        let event =
                            this.fail(format!("the upstream failed mid-stream: {e}"), e.code());
                        return this.last(event, cx);
                    }
                    // A failure drops the relay's unfinished event: the
                    // client's next bytes are the error event.
                    let pushed = match this.rest.as_mut().poll_next(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Ok(b))) => this.relay.push(b),
                        Poll::Ready(Some(Err(e))) => Err(e),
                        Poll::Ready(None) => {
                            let event = this.fail(
                                "the upstream stream ended before completion".into(),
                                "reset".into(),
                            );
                            return this.last(event, cx);
                        }
                    };
                    match pushed {
                        Ok(out) => out,
                        Err(e) => {
                            let event =
                                this.fail(format!("the upstream failed mid-stream: {e}"), e.code());
                            return this.last(event, cx);
                        }
                    }
                }
            };
            if this.relay.done() {
                // `[DONE]`: nothing after it is read; the stream ends with this chunk.
                this.finish(None, false);
                if !out.is_empty() {
                    return this.last(out, cx);
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            // Nothing whole yet (or nothing left after `[DONE]`): read on.
        }
    }
}

impl Forward {
    /// Whether the settle started at the stream's end is still running.
    fn settle_pending(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let Some(call) = self.settling.as_mut() else {
            return false;
        };
        if call.as_mut().poll(cx).is_pending() {
            return true;
        }
        self.settling = None;
        false
    }

    /// The stream's last bytes, once its spend is recorded.
    fn last(
        &mut self,
        bytes: Bytes,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.settle_pending(cx) {
            self.held = Some(bytes);
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (or the server is stopping).
        self.finish(None, true);
        // Nobody polls a dropped stream: its settle runs on as a task of its
        // own (an unpolled one would never reach the store).
        if let (Some(call), Ok(rt)) = (self.settling.take(), tokio::runtime::Handle::try_current())
        {
            drop(rt.spawn(call));
        }
    }
}

/// An upstream error body goes back to the client only without the
/// provider's key in it (some APIs echo the key they were given).
fn scrub(e: AttemptError, key: Option<&str>) -> AttemptError {
    match (e, key) {
        (
            AttemptError::Status {
                status,
                retry_after,
                body,
            },
            Some(key),
        ) if !key.is_empty() => {
            let text = String::from_utf8_lossy(&body);
            if text.contains(key) {
                let body = Bytes::from(text.replace(key, "[redacted]"));
                AttemptError::Status {
                    status,
                    retry_after,
                    body,
                }
            } else {
                AttemptError::Status {
                    status,
                    retry_after,
                    body,
                }
            }
        }
        (e, _) => e,
    }
}

/// The upstream refused the request itself (400, 404, 422...): the client
/// gets the upstream's answer, since no other model would answer differently.
fn client_error(
    gw: Arc<Gateway>,
    ctx: RequestCtx,
    e: AttemptError,
    out: Outcome,
) -> Response<Body> {
    let AttemptError::Status { status, body, .. } = &e else {
        return failed(gw, ctx, out);
    };
    let code = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = Response::new(full(ApiError::upstream_body(code, body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let m = out
        .attempts
        .last()
        .and_then(|a| ctx.rt.models.iter().find(|m| m.name == a.model));
    routing_headers(&mut r, &ctx, m, sent(&out.attempts));
    let mut rec = base_record(out.attempts);
    rec.status = *status;
    rec.error = Some(format!("the upstream refused the request: {status}"));
    log(&gw, &ctx, rec);
    r
}

/// Whether every attempt ended rate limited: answered 429 upstream, or
/// refused by this gateway's own limits.
fn all_rate_limited(attempts: &[crate::decision_log::Attempt]) -> bool {
    !attempts.is_empty()
        && attempts
            .iter()
            .all(|a| a.outcome == "429" || a.outcome == "limited")
}

fn failed(gw: Arc<Gateway>, ctx: RequestCtx, out: Outcome) -> Response<Body> {
    let tried: Vec<String> = out
        .attempts
        .iter()
        .map(|a| format!("{} ({})", a.model, a.outcome))
        .collect();
    let summary = if tried.is_empty() {
        "no model could be tried".to_string()
    } else {
        format!("attempts: {}", tried.join(", "))
    };
    let budget_refused = ctx.budget.as_ref().and_then(|b| b.refused());
    let err = match (&out.last_error, out.limited) {
        (None, None) if budget_refused.as_ref().is_some_and(|r| r.store_unavailable) => {
            let msg = budget_refused.map(|r| r.message).unwrap_or_default();
            // Fail closed, as the check before dispatch does: a 503, not a
            // verdict on a budget nobody could read.
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "budget_unavailable",
                format!("{msg}; {summary}"),
            )
            .code("budget_unavailable")
        }
        (None, None) if budget_refused.is_some() => {
            let msg = budget_refused.map(|r| r.message).unwrap_or_default();
            ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "budget_exceeded",
                format!("{msg}; {summary}"),
            )
            .code("budget_blocked")
        }
        (None, Some(wait)) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            format!("every allowed model is at its limit; {summary}"),
        )
        .code("rate_limited")
        .retry_after(wait),
        (None, None) if out.breaker_open => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            format!("every allowed model is cooling down after failures (circuit open); {summary}"),
        )
        .code("circuit_open"),
        // What a provider could not carry is the answer only when nothing
        // failed, was limited or was cooling down: then another try may work.
        (None, None) => match &out.untranslatable {
            Some(AttemptError::Untranslatable { param, message }) => {
                ApiError::bad_request(format!("{message}; {summary}"))
                    .code("unsupported_parameter")
                    .param(param.clone())
            }
            _ => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_error",
                format!("no model is available for this request; {summary}"),
            )
            .code("no_model"),
        },
        (Some(AttemptError::Timeout), _) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            format!("the upstream timed out; {summary}"),
        )
        .code("timeout"),
        // Every model was rate limited, upstream (429) or here: the client
        // should slow down and come back, which a 429 with `Retry-After`
        // says and a 502 does not (it also reads as an outage to monitoring).
        (
            Some(AttemptError::Status {
                status: 429,
                retry_after,
                ..
            }),
            limited,
        ) if all_rate_limited(&out.attempts) => {
            let err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                format!("every allowed model is rate limited upstream; {summary}"),
            )
            .code("upstream_rate_limited");
            match [*retry_after, limited].into_iter().flatten().min() {
                Some(wait) => err.retry_after(wait),
                None => err,
            }
        }
        (Some(e), _) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("the upstream failed after retries and fallbacks: {e}; {summary}"),
        )
        .code(e.code()),
    };
    let attempts = sent(&out.attempts);
    let mut rec = base_record(out.attempts);
    rec.status = err.status.as_u16();
    rec.error = Some(err.message.clone());
    log(&gw, &ctx, rec);
    let mut r = err.into_response();
    routing_headers(&mut r, &ctx, None, attempts);
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn attempt_ids_are_written_as_format_would() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, usize::MAX] {
            assert_eq!(super::attempt_id("abc-01", n), format!("abc-01/{n}"));
        }
    }

    use super::*;

    #[test]
    fn retry_filters_match_statuses_classes_and_kinds() {
        let st = |s| AttemptError::Status {
            status: s,
            retry_after: None,
            body: Bytes::new(),
        };
        let on = [
            RetryOn::Status(429),
            RetryOn::StatusClass(5),
            RetryOn::Timeout,
        ];
        assert!(retry_matches(&st(429), &on));
        assert!(retry_matches(&st(503), &on));
        assert!(!retry_matches(&st(401), &on));
        assert!(retry_matches(&AttemptError::Timeout, &on));
        assert!(!retry_matches(&AttemptError::Reset("x".into()), &on));
        assert!(retry_matches(
            &AttemptError::Reset("x".into()),
            &[RetryOn::Reset]
        ));
    }
}
