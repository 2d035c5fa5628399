//! The OpenAI-compatible gateway: `routeplane serve`.
//!
//! Per request: load the current policy once, authenticate the tenant,
//! extract the request features, `decide`, then dispatch along the
//! decision's ordered attempts with the policy's runtime protection.
//!
//! Architecture invariant: the gateway never chooses a model itself. Every
//! model it sends to comes from `Decision::attempts`, so nothing here can
//! reach a model the tenant's constraints removed.

pub mod breaker;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod limits;
pub mod providers;
pub mod relay;
pub mod server;
pub mod sse;
pub mod stats;
pub mod validate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::http::HeaderValue;

use crate::config::{Config, KeyHash};
use breaker::{Breaker, BreakerConfig};
use engine::{BreakerState, CompiledPolicy, ModelId, ModelStats, Stats, TenantView};
use providers::Upstream;
use stats::ModelLive;

/// One consistent view of what to serve: a policy and, when the source
/// reloads the config file too, the config that goes with it.
#[derive(Clone)]
pub struct Snapshot {
    pub policy: Arc<CompiledPolicy>,
    pub config: Option<Arc<Config>>,
}

/// Where the gateway gets the current policy. The reload module's store
/// implements it; tests use [`FixedPolicy`].
pub trait PolicySource: Send + Sync {
    /// Called once per request.
    fn current(&self) -> Snapshot;
    /// The body of `GET /admin/policy`, when the source can say more than the version.
    fn admin_json(&self) -> Option<serde_json::Value> {
        None
    }
    /// `POST /admin/reload`: rebuild from the files now, swapping only when
    /// the build has no errors; the new version or why not. `None` when the
    /// source does not read files.
    fn reload_now(&self) -> Option<ReloadFuture<'_>> {
        None
    }
}

/// A reload in progress: the new version, or why the old one keeps serving.
pub type ReloadFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<String, crate::reload::Failure>> + Send + 'a>,
>;

/// A policy that changes only when someone calls [`FixedPolicy::set`].
pub struct FixedPolicy(ArcSwap<CompiledPolicy>);

impl FixedPolicy {
    pub fn new(p: CompiledPolicy) -> Self {
        FixedPolicy(ArcSwap::from_pointee(p))
    }
    pub fn set(&self, p: CompiledPolicy) {
        self.0.store(Arc::new(p));
    }
}

impl PolicySource for FixedPolicy {
    fn current(&self) -> Snapshot {
        Snapshot {
            policy: self.0.load_full(),
            config: None,
        }
    }
}

impl PolicySource for crate::reload::PolicyStore<crate::reload::Served> {
    fn current(&self) -> Snapshot {
        let loaded = crate::reload::PolicyStore::current(self);
        Snapshot {
            policy: loaded.value.policy.clone(),
            config: Some(loaded.value.config.clone()),
        }
    }
    fn admin_json(&self) -> Option<serde_json::Value> {
        Some(self.admin_policy_json())
    }
    fn reload_now(&self) -> Option<ReloadFuture<'_>> {
        Some(Box::pin(self.reload(crate::reload::Trigger::Admin)))
    }
}

/// One tenant resolved against one policy version.
pub struct TenantRt {
    pub id: String,
    pub key_sha256: KeyHash,
    pub view: TenantView,
}

/// One model's runtime handles for one policy version; the shared state
/// (stats, breakers) is looked up by name so it survives reloads.
pub struct ModelRt {
    pub name: String,
    pub provider: String,
    /// `name` and `provider` as response header values, built once per
    /// version rather than on every response.
    pub name_header: Option<HeaderValue>,
    pub provider_header: Option<HeaderValue>,
    /// `None` when the config has no provider of that name (reported at load).
    pub upstream: Option<Arc<Upstream>>,
    pub upstream_model: String,
    pub live: Arc<ModelLive>,
    pub model_breaker: Arc<Breaker>,
    pub provider_breaker: Arc<Breaker>,
}

/// Everything derived from one policy version, built once per version off
/// the hot path, so a request does index lookups only.
pub struct Runtime {
    pub policy: Arc<CompiledPolicy>,
    /// The config this runtime was built from (reloaded with the policy when the store watches it).
    pub config: Arc<Config>,
    pub tenants: Vec<TenantRt>,
    /// Indexed by `ModelId`.
    pub models: Vec<ModelRt>,
    /// The policy version and each intent's name (indexed by `IntentId`)
    /// as response header values.
    pub version_header: Option<HeaderValue>,
    pub intent_headers: Vec<Option<HeaderValue>>,
    pub model_breaker: Option<BreakerConfig>,
    pub provider_breaker: Option<BreakerConfig>,
}

impl Runtime {
    /// Whether this runtime was built from exactly this snapshot.
    fn matches(&self, snap: &Snapshot) -> bool {
        Arc::ptr_eq(&self.policy, &snap.policy)
            && snap
                .config
                .as_ref()
                .is_none_or(|c| Arc::ptr_eq(&self.config, c))
    }

    pub fn model(&self, id: ModelId) -> Option<&ModelRt> {
        self.models.get(id.index())
    }
}

/// `decide`'s view of the live statistics.
pub struct LiveStats<'a> {
    pub rt: &'a Runtime,
    pub now: Instant,
}

impl Stats for LiveStats<'_> {
    fn model(&self, m: ModelId) -> ModelStats {
        let Some(rt) = self.rt.model(m) else {
            return ModelStats {
                latency_ms: None,
                first_token_ms: None,
                success_rate: None,
                breaker: BreakerState::Closed,
            };
        };
        let mb = rt.model_breaker.state(self.now);
        let pb = rt.provider_breaker.state(self.now);
        let breaker = match (mb, pb) {
            (BreakerState::Open, _) | (_, BreakerState::Open) => BreakerState::Open,
            (BreakerState::HalfOpen, _) | (_, BreakerState::HalfOpen) => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        };
        ModelStats {
            latency_ms: rt.live.latency_ms(),
            first_token_ms: rt.live.first_token_ms(),
            success_rate: rt.live.success_rate(),
            breaker,
        }
    }
}

/// Optional parts of the gateway.
#[derive(Clone, Default)]
pub struct Options {
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub decision_log: Option<crate::decision_log::DecisionLog>,
    /// Budget reservations and the spend ledger; `None`: budgets are not enforced.
    pub budgets: Option<Arc<crate::budget::Budgets>>,
}

/// The gateway's shared state.
pub struct Gateway {
    /// The config the process started with (listen address, policy path).
    pub config: Arc<Config>,
    pub policies: Arc<dyn PolicySource>,
    runtime: ArcSwap<Runtime>,
    /// Serializes runtime rebuilds; remembers the last version that failed.
    rebuild: Mutex<Option<String>>,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    live: Mutex<HashMap<String, Arc<ModelLive>>>,
    pub limiters: limits::Limiters,
    decision_seq: AtomicU64,
    /// A random per-instance prefix, so decision ids of two gateways (two
    /// replicas, two restarts in the same second, two in one test) never collide.
    boot: u64,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub decision_log: Option<crate::decision_log::DecisionLog>,
    pub budgets: Option<Arc<crate::budget::Budgets>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct StartError(pub Vec<String>);

impl Gateway {
    /// Build the gateway for a config and a policy source. Fails when the
    /// current policy does not fit the config (tenant attributes, providers).
    pub fn new(
        config: Config,
        policies: Arc<dyn PolicySource>,
        opts: Options,
    ) -> Result<Arc<Gateway>, StartError> {
        let boot: u64 = rand::random();
        let config = Arc::new(config);
        let snap = policies.current();
        // A placeholder runtime; replaced below before anyone can see it.
        let empty = Runtime {
            policy: snap.policy.clone(),
            config: config.clone(),
            tenants: Vec::new(),
            models: Vec::new(),
            version_header: None,
            intent_headers: Vec::new(),
            model_breaker: None,
            provider_breaker: None,
        };
        let gw = Gateway {
            config,
            policies,
            runtime: ArcSwap::from_pointee(empty),
            rebuild: Mutex::new(None),
            breakers: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            limiters: limits::Limiters::default(),
            decision_seq: AtomicU64::new(0),
            boot,
            metrics: opts.metrics,
            decision_log: opts.decision_log,
            budgets: opts.budgets,
        };
        let rt = gw.build_runtime(&snap).map_err(StartError)?;
        gw.runtime.store(Arc::new(rt));
        Ok(Arc::new(gw))
    }

    /// The runtime for the current policy. A request calls this once and
    /// uses the result throughout, so no decision mixes two versions.
    pub fn runtime(&self) -> Arc<Runtime> {
        let rt = self.runtime.load_full();
        let snap = self.policies.current();
        if rt.matches(&snap) {
            return rt;
        }
        let Ok(mut failed) = self.rebuild.lock() else {
            return rt;
        };
        // Someone else may have rebuilt while we waited.
        let rt = self.runtime.load_full();
        let version = snap.policy.version().to_string();
        if rt.matches(&snap) || failed.as_deref() == Some(version.as_str()) {
            return rt;
        }
        match self.build_runtime(&snap) {
            Ok(new) => {
                let new = Arc::new(new);
                self.runtime.store(new.clone());
                *failed = None;
                tracing::info!(version, "serving a new policy");
                new
            }
            Err(errors) => {
                // The policy compiled but does not fit this config: keep the last good one.
                for e in &errors {
                    tracing::error!(version, "{e}");
                }
                *failed = Some(version);
                rt
            }
        }
    }

    fn build_runtime(&self, snap: &Snapshot) -> Result<Runtime, Vec<String>> {
        let policy = snap.policy.clone();
        let config = snap.config.clone().unwrap_or_else(|| self.config.clone());
        let upstreams: HashMap<String, Arc<Upstream>> = config
            .providers
            .iter()
            .map(|p| (p.name.clone(), Arc::new(Upstream::new(p.clone()))))
            .collect();
        let mut errors = Vec::new();
        let p = policy.policy();
        let mut tenants = Vec::new();
        for t in &config.tenants {
            match policy.tenant(&t.id, &t.attrs) {
                Ok(view) => tenants.push(TenantRt {
                    id: t.id.clone(),
                    key_sha256: t.key_sha256,
                    view,
                }),
                Err(problems) => errors.extend(
                    problems
                        .into_iter()
                        .map(|pr| config.error_at(t.line, pr).to_string()),
                ),
            }
        }
        for prov in &p.providers {
            if !upstreams.contains_key(&prov.name) {
                let msg = format!(
                    "the policy's provider `{}` has no entry under `providers:`",
                    prov.name
                );
                errors.push(config.error_at(None, msg).to_string());
            }
        }
        let mut models = Vec::new();
        for m in &p.models {
            let provider = p
                .provider(m.provider)
                .map(|pr| pr.name.clone())
                .unwrap_or_default();
            let upstream = upstreams.get(&provider).cloned();
            let upstream_model = upstream
                .as_ref()
                .map_or(m.name.as_str(), |u| u.cfg.upstream_model(&m.name))
                .to_string();
            models.push(ModelRt {
                name: m.name.clone(),
                name_header: header_value(&m.name),
                provider_header: header_value(&provider),
                live: self.shared(&self.live, &m.name),
                model_breaker: self.shared(&self.breakers, &format!("model:{}", m.name)),
                provider_breaker: self.shared(&self.breakers, &format!("provider:{provider}")),
                provider,
                upstream,
                upstream_model,
            });
        }
        let breaker_cfg = |scope| {
            p.protect
                .breakers
                .iter()
                .find(|b| b.scope == scope)
                .map(|b| BreakerConfig {
                    failures: b.failures.max(1),
                    window: Duration::from_millis(b.window_ms),
                    cooldown: Duration::from_millis(b.cooldown_ms),
                })
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Runtime {
            model_breaker: breaker_cfg(crate::ir::BreakerScope::Model),
            provider_breaker: breaker_cfg(crate::ir::BreakerScope::Provider),
            version_header: header_value(policy.version()),
            intent_headers: p.intents.iter().map(|i| header_value(&i.name)).collect(),
            policy,
            config,
            tenants,
            models,
        })
    }

    fn shared<T: Default>(&self, map: &Mutex<HashMap<String, Arc<T>>>, key: &str) -> Arc<T> {
        match map.lock() {
            Ok(mut m) => m.entry(key.to_string()).or_default().clone(),
            Err(_) => Arc::new(T::default()),
        }
    }

    pub fn next_decision_id(&self) -> String {
        let n = self.decision_seq.fetch_add(1, Ordering::Relaxed);
        decision_id(self.boot, n)
    }

    /// The breaker state of every model and provider, for metrics and admin.
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        let now = Instant::now();
        let Ok(map) = self.breakers.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = map.iter().map(|(k, b)| (k.clone(), b.state(now))).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// `format!("{:012x}-{n:08x}", boot & 0xffff_ffff_ffff)`, written digit by
/// digit: once a request, and `format!`'s machinery costs more than the rest.
fn decision_id(boot: u64, n: u64) -> String {
    fn push_hex(s: &mut String, v: u64, min_digits: u32) {
        let digits = (64 - v.leading_zeros()).div_ceil(4).max(min_digits);
        for i in (0..digits).rev() {
            let nibble = u32::try_from((v >> (4 * i)) & 0xf).unwrap_or(0);
            s.push(char::from_digit(nibble, 16).unwrap_or('0'));
        }
    }
    let mut s = String::with_capacity(29);
    push_hex(&mut s, boot & 0xffff_ffff_ffff, 12);
    s.push('-');
    push_hex(&mut s, n, 8);
    s
}

/// A name as a response header value; `None` for one a header cannot carry
/// (policy names are identifiers, so only in theory).
fn header_value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn decision_ids_are_written_as_format_would() {
        for boot in [
            0,
            1,
            0xabc,
            0xffff_ffff_ffff,
            u64::MAX,
            0x1234_5678_9abc_def0,
        ] {
            for n in [0, 9, 0xdead_beef, 0x1_0000_0000, u64::MAX] {
                assert_eq!(
                    super::decision_id(boot, n),
                    format!("{:012x}-{n:08x}", boot & 0xffff_ffff_ffff)
                );
            }
        }
    }
}
