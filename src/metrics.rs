//! Prometheus metrics for `GET /metrics`.
//!
//! The gateway calls one method per event ([`Metrics::request_done`],
//! [`Metrics::attempt_failed`], ...) and never touches the metric types, so
//! names, labels and units are decided here once. Money is counted in
//! dollars (the IR's micro-dollars divided by 1e6) because Prometheus wants
//! base units; latencies are in seconds.
//!
//! prometheus-client writes OpenMetrics; [`Metrics::encode`] turns that into
//! the classic Prometheus text format (counter families named `..._total`, no
//! `# UNIT`/`# EOF`), which every scraper reads and `promtool check metrics`
//! validates (see the test at the end).

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::ir::Micros;

/// The `Content-Type` of [`Metrics::encode`]'s output (Prometheus text format).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of [`Metrics::encode_openmetrics`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The label value for an absent feature, intent, model or provider.
pub const NONE: &str = "none";
/// The `feature` label of features past [`MAX_FEATURE_LABELS`].
pub const OTHER_FEATURE: &str = "other";
/// Distinct `feature` label values exported. Features are tags the clients
/// choose (`x-routeplane-feature`), so without a bound a client could grow
/// the exposition, and every scraper's database, one series at a time.
pub const MAX_FEATURE_LABELS: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    tenant: String,
    feature: String,
    intent: String,
    model: String,
    provider: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    tenant: String,
    model: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    tenant: String,
    feature: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    model: String,
    provider: String,
    /// An HTTP status (`429`, `503`) or `timeout` (first token or total), `connect`, `reset`, `protocol`.
    /// A stream that fails after its first token reached the client counts
    /// here with its code too, while `requests` has the 200 the client got.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    scope: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    budget: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetActionLabels {
    tenant: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The label values of one finished request, borrowed: the key
/// [`Metrics::request_done`] looks its [`Series`] up with. Hashes like
/// [`SeriesKey`] (same fields, `&str` and `Box<str>` hash alike).
#[derive(Hash)]
struct SeriesRef<'a> {
    tenant: &'a str,
    feature: &'a str,
    intent: &'a str,
    model: &'a str,
    provider: &'a str,
    status: u16,
}

/// [`SeriesRef`], owned: the key a thread's cache keeps.
#[derive(Hash, PartialEq, Eq)]
struct SeriesKey {
    tenant: Box<str>,
    feature: Box<str>,
    intent: Box<str>,
    model: Box<str>,
    provider: Box<str>,
    status: u16,
}

impl hashbrown::Equivalent<SeriesKey> for SeriesRef<'_> {
    fn equivalent(&self, k: &SeriesKey) -> bool {
        self.status == k.status
            && self.tenant == &*k.tenant
            && self.feature == &*k.feature
            && self.intent == &*k.intent
            && self.model == &*k.model
            && self.provider == &*k.provider
    }
}

impl From<&SeriesRef<'_>> for SeriesKey {
    fn from(r: &SeriesRef<'_>) -> SeriesKey {
        SeriesKey {
            tenant: r.tenant.into(),
            feature: r.feature.into(),
            intent: r.intent.into(),
            model: r.model.into(),
            provider: r.provider.into(),
            status: r.status,
        }
    }
}

impl SeriesRef<'_> {
    fn model_labels(&self) -> ModelLabels {
        ModelLabels {
            model: self.model.to_string(),
            provider: self.provider.to_string(),
        }
    }
}

/// The metrics one finished request updates, resolved from the families once
/// per label set and thread. Going to the families every time meant twelve
/// `String`s allocated, six label sets hashed with SipHash and six read locks
/// shared by every worker thread, per request (callgrind: 5.4k of the
/// gateway's ~120k instructions a request). The handles share their values
/// with the families (the metric types are `Arc`s inside), and the families'
/// series are never removed, so a cached handle never goes stale. Series a
/// request may not touch (first-token latency, tokens, cost) are created when
/// first needed, so `/metrics` shows the same series as without the cache.
struct Series {
    /// The `feature` label these series carry (see [`Metrics::feature_label`]).
    feature: String,
    requests: Counter,
    duration: Histogram,
    first_token: Option<Histogram>,
    tokens: Option<(Counter, Counter)>,
    cost: Option<(Counter<f64, AtomicU64>, Counter<f64, AtomicU64>)>,
}

impl Series {
    fn new(m: &Metrics, key: &SeriesRef<'_>) -> Series {
        let feature = m.feature_label(key.feature);
        let requests = m
            .requests
            .get_or_create(&RequestLabels {
                tenant: key.tenant.to_string(),
                feature: feature.clone(),
                intent: key.intent.to_string(),
                model: key.model.to_string(),
                provider: key.provider.to_string(),
                status: key.status.to_string(),
            })
            .clone();
        let duration = m.duration.get_or_create(&key.model_labels()).clone();
        Series {
            feature,
            requests,
            duration,
            first_token: None,
            tokens: None,
            cost: None,
        }
    }
}

/// Label sets a thread's cache holds before it starts over.
const SERIES_CACHE_MAX: usize = 4096;

/// Latency buckets from 1 ms to about 65 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

/// What the gateway knows when a request is finished.
#[derive(Clone, Debug, Default)]
pub struct RequestDone<'a> {
    pub tenant: &'a str,
    pub feature: Option<&'a str>,
    pub intent: Option<&'a str>,
    /// The model that answered (or the last one tried).
    pub model: Option<&'a str>,
    pub provider: Option<&'a str>,
    /// The HTTP status returned to the client.
    pub status: u16,
    pub total: Duration,
    pub first_token: Option<Duration>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub estimated_cost: Micros,
    pub actual_cost: Micros,
}

/// A circuit breaker's state as exported: 0 closed, 1 half-open, 2 open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerGauge {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// What a breaker protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerScope {
    Model,
    Provider,
}

impl BreakerScope {
    fn as_str(self) -> &'static str {
        match self {
            BreakerScope::Model => "model",
            BreakerScope::Provider => "provider",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Each thread's [`Series`] by label set.
    series: thread_local::ThreadLocal<std::cell::RefCell<hashbrown::HashMap<SeriesKey, Series>>>,
    /// The feature label values exported so far (see [`MAX_FEATURE_LABELS`]);
    /// looked at only when a thread meets a label set it has not cached.
    features: std::sync::Mutex<std::collections::HashSet<String>>,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<ModelLabels>,
    first_token: HistogramFamily<ModelLabels>,
    input_tokens: Family<TokenLabels, Counter>,
    output_tokens: Family<TokenLabels, Counter>,
    provider_errors: Family<ErrorLabels, Counter>,
    retries: Family<ModelLabels, Counter>,
    fallbacks: Family<FallbackLabels, Counter>,
    estimated_cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    actual_cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    breakers: Family<BreakerLabels, Gauge>,
    policy_info: Family<VersionLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    last_reload: Gauge<f64, AtomicU64>,
    decision_log_dropped: Counter,
    budget_spent: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    budget_utilisation: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    budget_actions: Family<BudgetActionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("routeplane");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests answered, by tenant, feature, intent, model, provider and HTTP status",
            requests.clone(),
        );
        let duration: HistogramFamily<ModelLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Total request latency as seen by the gateway",
            Unit::Seconds,
            duration.clone(),
        );
        let first_token: HistogramFamily<ModelLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "first_token",
            "Latency until the first token of the answer (a stream's first event with content)",
            Unit::Seconds,
            first_token.clone(),
        );
        let input_tokens = Family::default();
        registry.register(
            "input_tokens",
            "Input (prompt) tokens reported by providers",
            input_tokens.clone(),
        );
        let output_tokens = Family::default();
        registry.register(
            "output_tokens",
            "Output (completion) tokens reported by providers",
            output_tokens.clone(),
        );
        let provider_errors = Family::default();
        registry.register(
            "provider_errors",
            "Failed upstream attempts by HTTP status or failure kind, streams that failed after their first token included",
            provider_errors.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Retries of the same model after a failed attempt",
            retries.clone(),
        );
        let fallbacks = Family::default();
        registry.register(
            "fallbacks",
            "Moves to the next model of the decision after a failure",
            fallbacks.clone(),
        );
        let estimated_cost = Family::default();
        registry.register_with_unit(
            "estimated_cost",
            "Cost estimated before dispatch",
            Unit::Other("dollars".into()),
            estimated_cost.clone(),
        );
        let actual_cost = Family::default();
        registry.register_with_unit(
            "actual_cost",
            "Cost computed from the usage providers reported",
            Unit::Other("dollars".into()),
            actual_cost.clone(),
        );
        let breakers = Family::default();
        registry.register(
            "breaker_state",
            "Circuit breaker state per model or provider: 0 closed, 1 half-open, 2 open",
            breakers.clone(),
        );
        let policy_info = Family::default();
        registry.register(
            "policy_info",
            "The policy version serving (value 1)",
            policy_info.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "policy_reloads",
            "Policy loads by result (ok or error)",
            reloads.clone(),
        );
        let last_reload = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "policy_last_reload_success_timestamp_seconds",
            "Unix time of the last successful policy load",
            last_reload.clone(),
        );
        let decision_log_dropped = Counter::default();
        registry.register(
            "decision_log_dropped",
            "Decision log lines dropped because the writer fell behind",
            decision_log_dropped.clone(),
        );
        let budget_spent = Family::default();
        registry.register_with_unit(
            "budget_spent",
            "Spend in the current period per budget (period|scope|tenant or feature), as of the last request",
            Unit::Other("dollars".into()),
            budget_spent.clone(),
        );
        let budget_utilisation = Family::default();
        registry.register(
            "budget_utilisation_ratio",
            "Spent plus reserved over the budget's amount, as of the last request",
            budget_utilisation.clone(),
        );
        let budget_actions = Family::default();
        registry.register(
            "budget_threshold",
            "Requests that found a budget threshold reached, by tenant and action",
            budget_actions.clone(),
        );
        Metrics {
            series: thread_local::ThreadLocal::new(),
            features: std::sync::Mutex::new(std::collections::HashSet::new()),
            budget_spent,
            budget_utilisation,
            budget_actions,
            registry,
            requests,
            duration,
            first_token,
            input_tokens,
            output_tokens,
            provider_errors,
            retries,
            fallbacks,
            estimated_cost,
            actual_cost,
            breakers,
            policy_info,
            reloads,
            last_reload,
            decision_log_dropped,
        }
    }

    /// One finished request, whatever its outcome.
    ///
    /// The series it updates are looked up in this thread's cache first (see
    /// [`Series`]); only a label set the thread has not seen yet goes to the
    /// families.
    pub fn request_done(&self, r: &RequestDone<'_>) {
        let key = SeriesRef {
            tenant: r.tenant,
            feature: r.feature.unwrap_or(NONE),
            intent: r.intent.unwrap_or(NONE),
            model: r.model.unwrap_or(NONE),
            provider: r.provider.unwrap_or(NONE),
            status: r.status,
        };
        let mut cache = self.series.get_or_default().borrow_mut();
        if let Some(series) = cache.get_mut(&key) {
            self.record(series, &key, r);
            return;
        }
        if cache.len() >= SERIES_CACHE_MAX {
            // Many distinct label sets (features are client-chosen): start
            // over rather than grow; the families keep every series.
            cache.clear();
        }
        let series = cache
            .entry(SeriesKey::from(&key))
            .or_insert_with(|| Series::new(self, &key));
        self.record(series, &key, r);
    }

    /// `feature` as a label value: itself while fewer than
    /// [`MAX_FEATURE_LABELS`] distinct ones were exported, else `other`.
    fn feature_label(&self, feature: &str) -> String {
        if feature == NONE {
            // Requests without a feature never turn into `other`.
            return NONE.to_string();
        }
        let mut seen = self
            .features
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(feature) {
            return feature.to_string();
        }
        if seen.len() < MAX_FEATURE_LABELS {
            seen.insert(feature.to_string());
            return feature.to_string();
        }
        OTHER_FEATURE.to_string()
    }

    fn record(&self, series: &mut Series, key: &SeriesRef<'_>, r: &RequestDone<'_>) {
        series.requests.inc();
        series.duration.observe(r.total.as_secs_f64());
        if let Some(ft) = r.first_token {
            series
                .first_token
                .get_or_insert_with(|| self.first_token.get_or_create(&key.model_labels()).clone())
                .observe(ft.as_secs_f64());
        }
        if r.input_tokens > 0 || r.output_tokens > 0 {
            let (input, output) = series.tokens.get_or_insert_with(|| {
                let tl = TokenLabels {
                    tenant: key.tenant.to_string(),
                    model: key.model.to_string(),
                    provider: key.provider.to_string(),
                };
                (
                    self.input_tokens.get_or_create(&tl).clone(),
                    self.output_tokens.get_or_create(&tl).clone(),
                )
            });
            input.inc_by(r.input_tokens);
            output.inc_by(r.output_tokens);
        }
        if r.estimated_cost > 0 || r.actual_cost > 0 {
            let feature = &series.feature;
            let (estimated, actual) = series.cost.get_or_insert_with(|| {
                let cl = CostLabels {
                    tenant: key.tenant.to_string(),
                    feature: feature.clone(),
                    model: key.model.to_string(),
                };
                (
                    self.estimated_cost.get_or_create(&cl).clone(),
                    self.actual_cost.get_or_create(&cl).clone(),
                )
            });
            estimated.inc_by(dollars(r.estimated_cost));
            actual.inc_by(dollars(r.actual_cost));
        }
    }

    /// An upstream attempt failed; `code` is the HTTP status or the failure kind.
    pub fn attempt_failed(&self, model: &str, provider: &str, code: &str) {
        self.provider_errors
            .get_or_create(&ErrorLabels {
                model: model.to_string(),
                provider: provider.to_string(),
                code: code.to_string(),
            })
            .inc();
    }

    pub fn retry(&self, model: &str, provider: &str) {
        self.retries
            .get_or_create(&ModelLabels {
                model: model.to_string(),
                provider: provider.to_string(),
            })
            .inc();
    }

    pub fn fallback(&self, from: &str, to: &str) {
        self.fallbacks
            .get_or_create(&FallbackLabels {
                from: from.to_string(),
                to: to.to_string(),
            })
            .inc();
    }

    pub fn breaker_state(&self, scope: BreakerScope, name: &str, state: BreakerGauge) {
        self.breakers
            .get_or_create(&BreakerLabels {
                scope: scope.as_str().to_string(),
                name: name.to_string(),
            })
            .set(state as i64);
    }

    /// A policy load or reload finished; `version` is the one now serving.
    pub fn policy_loaded(&self, version: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
        // Make sure the other result shows as 0 rather than missing, so
        // `rate(..{result="error"})` works before the first failure.
        let other = if ok { "error" } else { "ok" };
        drop(self.reloads.get_or_create(&ResultLabels {
            result: other.to_string(),
        }));
        if ok {
            self.policy_info.clear();
            self.policy_info
                .get_or_create(&VersionLabels {
                    version: version.to_string(),
                })
                .set(1);
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            self.last_reload.set(now.as_secs_f64());
        }
    }

    /// Where one budget stands (`key` as in `crate::budget`: `monthly|tenant|acme`).
    pub fn budget_balance(&self, key: &str, limit: Micros, spent: Micros, reserved: Micros) {
        let l = BudgetLabels {
            budget: key.to_string(),
        };
        self.budget_spent.get_or_create(&l).set(spent as f64 / 1e6);
        let ratio = if limit == 0 {
            1.0
        } else {
            spent.saturating_add(reserved) as f64 / limit as f64
        };
        self.budget_utilisation.get_or_create(&l).set(ratio);
    }

    /// A request found a budget threshold reached.
    pub fn budget_action(&self, tenant: &str, action: crate::ir::BudgetAction) {
        let action = match action {
            crate::ir::BudgetAction::Warn => "warn",
            crate::ir::BudgetAction::ConfirmPremium => "confirm_premium",
            crate::ir::BudgetAction::Downgrade => "downgrade",
            crate::ir::BudgetAction::Block => "block",
        };
        self.budget_actions
            .get_or_create(&BudgetActionLabels {
                tenant: tenant.to_string(),
                action: action.to_string(),
            })
            .inc();
    }

    pub fn decision_log_dropped(&self) {
        self.decision_log_dropped.inc();
    }

    /// The text exposition for `GET /metrics` (see [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }

    /// The OpenMetrics exposition (see [`OPENMETRICS_CONTENT_TYPE`]), for
    /// scrapers that ask for it in `Accept`.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Encoding into a String only fails on a formatter error; say so
            // in the exposition rather than serving half a page silently.
            out.clear();
            let _ = writeln!(out, "# metrics encoding failed\n# EOF");
        }
        out
    }
}

/// OpenMetrics names a counter family without `_total` and its samples with
/// it; the Prometheus text format names both with it. `# UNIT` and `# EOF`
/// do not exist there.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let _ = writeln!(out, "{prefix}{name}{suffix} {tail}");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn dollars(micros: Micros) -> f64 {
    // u64 -> f64 loses precision only above 2^53 micro-dollars (9 billion dollars).
    #[expect(clippy::cast_precision_loss, reason = "exact below 2^53 micro-dollars")]
    let m = micros as f64;
    m / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metrics {
        let m = Metrics::new();
        m.request_done(&RequestDone {
            tenant: "acme",
            feature: Some("support"),
            intent: Some("chat"),
            model: Some("gpt-4o-mini"),
            provider: Some("openai"),
            status: 200,
            total: Duration::from_millis(420),
            first_token: Some(Duration::from_millis(80)),
            input_tokens: 1200,
            output_tokens: 300,
            estimated_cost: 2_500,
            actual_cost: 1_500_000,
        });
        m.request_done(&RequestDone {
            tenant: "acme",
            status: 403,
            ..Default::default()
        });
        m.attempt_failed("gpt-4o", "openai", "429");
        m.attempt_failed("gpt-4o", "openai", "timeout");
        m.retry("gpt-4o", "openai");
        m.fallback("gpt-4o", "claude-sonnet");
        m.breaker_state(BreakerScope::Model, "gpt-4o", BreakerGauge::Open);
        m.breaker_state(BreakerScope::Provider, "openai", BreakerGauge::HalfOpen);
        m.policy_loaded("abc123", true);
        m.policy_loaded("abc123", false);
        m.policy_loaded("def456", true);
        m.decision_log_dropped();
        m
    }

    #[test]
    fn every_event_shows_in_the_exposition() {
        let text = sample().encode();
        for line in [
            "routeplane_requests_total{tenant=\"acme\",feature=\"support\",intent=\"chat\",model=\"gpt-4o-mini\",provider=\"openai\",status=\"200\"} 1",
            "routeplane_requests_total{tenant=\"acme\",feature=\"none\",intent=\"none\",model=\"none\",provider=\"none\",status=\"403\"} 1",
            "routeplane_input_tokens_total{tenant=\"acme\",model=\"gpt-4o-mini\",provider=\"openai\"} 1200",
            "routeplane_output_tokens_total{tenant=\"acme\",model=\"gpt-4o-mini\",provider=\"openai\"} 300",
            "routeplane_actual_cost_dollars_total{tenant=\"acme\",feature=\"support\",model=\"gpt-4o-mini\"} 1.5",
            "routeplane_estimated_cost_dollars_total{tenant=\"acme\",feature=\"support\",model=\"gpt-4o-mini\"} 0.0025",
            "routeplane_provider_errors_total{model=\"gpt-4o\",provider=\"openai\",code=\"429\"} 1",
            "routeplane_retries_total{model=\"gpt-4o\",provider=\"openai\"} 1",
            "routeplane_fallbacks_total{from=\"gpt-4o\",to=\"claude-sonnet\"} 1",
            "routeplane_breaker_state{scope=\"model\",name=\"gpt-4o\"} 2",
            "routeplane_breaker_state{scope=\"provider\",name=\"openai\"} 1",
            "routeplane_policy_info{version=\"def456\"} 1",
            "routeplane_policy_reloads_total{result=\"ok\"} 2",
            "routeplane_policy_reloads_total{result=\"error\"} 1",
            "routeplane_decision_log_dropped_total 1",
            "routeplane_request_duration_seconds_count{model=\"gpt-4o-mini\",provider=\"openai\"} 1",
            "routeplane_first_token_seconds_bucket{le=\"0.128\",model=\"gpt-4o-mini\",provider=\"openai\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        // The old version's info series is gone after a swap.
        assert!(!text.contains("abc123"));
        assert!(text.contains("# TYPE routeplane_requests_total counter\n"));
        assert!(!text.contains("# EOF"));
        assert!(sample().encode_openmetrics().ends_with("# EOF\n"));
    }

    #[test]
    fn cached_series_count_across_threads_and_appear_only_when_used() {
        let m = std::sync::Arc::new(Metrics::new());
        let done = |tokens: u64, first_token: Option<Duration>| RequestDone {
            tenant: "acme",
            feature: Some("support"),
            intent: Some("chat"),
            model: Some("m"),
            provider: Some("p"),
            status: 200,
            total: Duration::from_millis(3),
            first_token,
            input_tokens: tokens,
            output_tokens: tokens,
            ..Default::default()
        };
        // No tokens, no first token yet: those series do not exist.
        m.request_done(&done(0, None));
        let text = m.encode();
        assert!(!text.contains("routeplane_input_tokens_total{"), "{text}");
        assert!(
            !text.contains("routeplane_first_token_seconds_count{"),
            "{text}"
        );
        // Two threads, each with its own cache, on the same series.
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        m.request_done(&done(2, Some(Duration::from_millis(1))));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Past the cache's size: it starts over, nothing is lost.
        for i in 0..SERIES_CACHE_MAX + 10 {
            let feature = format!("f{i}");
            m.request_done(&RequestDone {
                feature: Some(&feature),
                ..done(0, None)
            });
        }
        m.request_done(&done(2, None));
        let text = m.encode();
        for line in [
            "routeplane_requests_total{tenant=\"acme\",feature=\"support\",intent=\"chat\",model=\"m\",provider=\"p\",status=\"200\"} 1002",
            "routeplane_input_tokens_total{tenant=\"acme\",model=\"m\",provider=\"p\"} 2002",
            "routeplane_first_token_seconds_count{model=\"m\",provider=\"p\"} 1000",
            "routeplane_request_duration_seconds_count{model=\"m\",provider=\"p\"} 5108",
            "routeplane_requests_total{tenant=\"acme\",feature=\"f10\",intent=\"chat\",model=\"m\",provider=\"p\",status=\"200\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}`");
        }
        // Client-chosen features are exported up to a bound, the rest as
        // `other`; requests without one stay `none`.
        m.request_done(&RequestDone {
            feature: None,
            ..done(0, None)
        });
        let text = m.encode();
        assert!(
            text.lines().any(
                |l| l.starts_with("routeplane_requests_total{tenant=\"acme\",feature=\"none\"")
            ),
            "{text}"
        );
        let other = format!(
            "routeplane_requests_total{{tenant=\"acme\",feature=\"other\",intent=\"chat\",model=\"m\",provider=\"p\",status=\"200\"}} {}",
            SERIES_CACHE_MAX + 10 - (MAX_FEATURE_LABELS - 1)
        );
        assert!(text.lines().any(|l| l == other), "missing `{other}`");
        assert!(!text.contains("feature=\"f4105\""));
        let features: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("routeplane_requests_total{"))
            .filter_map(|l| l.split("feature=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(features.len(), MAX_FEATURE_LABELS + 2, "{features:?}");
    }

    /// `promtool check metrics` on the exposition, when promtool is installed
    /// (scripts/install-test-deps.sh installs it; CI always has it).
    #[test]
    fn promtool_accepts_the_exposition() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is missing on CI: run scripts/install-test-deps.sh"
            );
            eprintln!(
                "promtool not installed, skipping (scripts/install-test-deps.sh installs it)"
            );
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sample().encode().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && report.trim().is_empty(),
            "promtool check metrics:\n{report}"
        );
    }
}
