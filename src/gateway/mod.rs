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
pub mod server;
pub mod sse;
pub mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::{Config, KeyHash};
use breaker::{Breaker, BreakerConfig};
use engine::{BreakerState, CompiledPolicy, ModelId, ModelStats, Stats, TenantView};
use providers::Upstream;
use stats::ModelLive;

/// Where the gateway gets the current policy. The reload module's store
/// implements it; tests and `serve` without a watcher use [`FixedPolicy`].
pub trait PolicySource: Send + Sync {
    fn current(&self) -> Arc<CompiledPolicy>;
}

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
    fn current(&self) -> Arc<CompiledPolicy> {
        self.0.load_full()
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
    pub tenants: Vec<TenantRt>,
    /// Indexed by `ModelId`.
    pub models: Vec<ModelRt>,
    pub model_breaker: Option<BreakerConfig>,
    pub provider_breaker: Option<BreakerConfig>,
}

impl Runtime {
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

/// The gateway's shared state.
pub struct Gateway {
    pub config: Config,
    pub policies: Arc<dyn PolicySource>,
    runtime: ArcSwap<Runtime>,
    /// Serializes runtime rebuilds; remembers the last version that failed.
    rebuild: Mutex<Option<String>>,
    upstreams: HashMap<String, Arc<Upstream>>,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    live: Mutex<HashMap<String, Arc<ModelLive>>>,
    pub limiters: limits::Limiters,
    decision_seq: AtomicU64,
    /// A per-process prefix, so decision ids from two runs never collide.
    boot: u64,
    pub decision_log: Option<dispatch::DecisionSink>,
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
    ) -> Result<Arc<Gateway>, StartError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| StartError(vec![format!("cannot build the HTTP client: {e}")]))?;
        let upstreams = config
            .providers
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    Arc::new(Upstream::new(p.clone(), client.clone())),
                )
            })
            .collect();
        let decision_log = match &config.decision_log {
            Some(path) => Some(dispatch::DecisionSink::open(path).map_err(|e| {
                StartError(vec![format!(
                    "cannot open the decision log `{}`: {e}",
                    path.display()
                )])
            })?),
            None => None,
        };
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let policy = policies.current();
        // A placeholder runtime; replaced below before anyone can see it.
        let empty = Runtime {
            policy: policy.clone(),
            tenants: Vec::new(),
            models: Vec::new(),
            model_breaker: None,
            provider_breaker: None,
        };
        let gw = Gateway {
            config,
            policies,
            runtime: ArcSwap::from_pointee(empty),
            rebuild: Mutex::new(None),
            upstreams,
            breakers: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            limiters: limits::Limiters::default(),
            decision_seq: AtomicU64::new(0),
            boot,
            decision_log,
        };
        let rt = gw.build_runtime(policy).map_err(StartError)?;
        gw.runtime.store(Arc::new(rt));
        Ok(Arc::new(gw))
    }

    /// The runtime for the current policy. A request calls this once and
    /// uses the result throughout, so no decision mixes two versions.
    pub fn runtime(&self) -> Arc<Runtime> {
        let rt = self.runtime.load_full();
        let current = self.policies.current();
        if Arc::ptr_eq(&rt.policy, &current) {
            return rt;
        }
        let Ok(mut failed) = self.rebuild.lock() else {
            return rt;
        };
        // Someone else may have rebuilt while we waited.
        let rt = self.runtime.load_full();
        if Arc::ptr_eq(&rt.policy, &current) || failed.as_deref() == Some(current.version()) {
            return rt;
        }
        match self.build_runtime(current.clone()) {
            Ok(new) => {
                let new = Arc::new(new);
                self.runtime.store(new.clone());
                *failed = None;
                tracing::info!(version = current.version(), "policy runtime rebuilt");
                new
            }
            Err(errors) => {
                // The policy compiled but does not fit this config: keep the last good one.
                for e in &errors {
                    tracing::error!(version = current.version(), "{e}");
                }
                *failed = Some(current.version().to_string());
                rt
            }
        }
    }

    fn build_runtime(&self, policy: Arc<CompiledPolicy>) -> Result<Runtime, Vec<String>> {
        let mut errors = Vec::new();
        let p = policy.policy();
        let mut tenants = Vec::new();
        for t in &self.config.tenants {
            match policy.tenant(&t.id, &t.attrs) {
                Ok(view) => tenants.push(TenantRt {
                    id: t.id.clone(),
                    key_sha256: t.key_sha256,
                    view,
                }),
                Err(problems) => {
                    for problem in problems {
                        errors.push(
                            self.config
                                .error_at(t.line, format!("tenant `{}`: {problem}", t.id))
                                .to_string(),
                        );
                    }
                }
            }
        }
        for prov in &p.providers {
            if !self.upstreams.contains_key(&prov.name) {
                errors.push(
                    self.config
                        .error_at(
                            None,
                            format!(
                                "the policy's provider `{}` has no entry under `providers:`",
                                prov.name
                            ),
                        )
                        .to_string(),
                );
            }
        }
        let mut models = Vec::new();
        for m in &p.models {
            let provider = p
                .provider(m.provider)
                .map(|pr| pr.name.clone())
                .unwrap_or_default();
            let upstream = self.upstreams.get(&provider).cloned();
            let upstream_model = upstream
                .as_ref()
                .map_or(m.name.as_str(), |u| u.cfg.upstream_model(&m.name))
                .to_string();
            models.push(ModelRt {
                name: m.name.clone(),
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
            policy,
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
        format!("{:08x}-{n:08x}", self.boot & 0xffff_ffff)
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
