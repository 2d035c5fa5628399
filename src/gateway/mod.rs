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
    /// The config's tenants resolved against `policy`, in config order, when
    /// the source resolved them already (the reload store checks them
    /// before it swaps), so the gateway does not do it again.
    pub tenants: Option<Arc<[TenantView]>>,
}

/// Where the gateway gets the current policy. The reload module's store
/// implements it; tests use [`FixedPolicy`].
pub trait PolicySource: Send + Sync {
    /// What to serve now; called when the gateway builds its runtime.
    fn current(&self) -> Snapshot;
    /// Whether `policy` (with `config`) is still what to serve. Called once
    /// per request, so it should not clone anything.
    fn serves(&self, policy: &Arc<CompiledPolicy>, config: &Arc<Config>) -> bool {
        let snap = self.current();
        Arc::ptr_eq(&snap.policy, policy)
            && snap.config.as_ref().is_none_or(|c| Arc::ptr_eq(c, config))
    }
    /// Call `hook` after every swap to a new policy, before the reload that
    /// made it reports success: the gateway builds its runtime there, off
    /// the request path. `false`: this source does not (it changes without
    /// a reload), and requests build the runtime when they find it old.
    fn on_swap(&self, _hook: SwapHook) -> bool {
        false
    }
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

/// What [`PolicySource::on_swap`] calls.
pub type SwapHook = Box<dyn Fn() + Send + Sync>;

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
            tenants: None,
        }
    }
    fn serves(&self, policy: &Arc<CompiledPolicy>, _config: &Arc<Config>) -> bool {
        Arc::ptr_eq(&self.0.load(), policy)
    }
}

impl PolicySource for crate::reload::PolicyStore<crate::reload::Served> {
    fn current(&self) -> Snapshot {
        let loaded = crate::reload::PolicyStore::current(self);
        Snapshot {
            policy: loaded.value.policy.clone(),
            config: Some(loaded.value.config.clone()),
            tenants: Some(loaded.value.tenants.clone()),
        }
    }
    // No `serves`: this store builds each runtime as it swaps (`on_swap`),
    // so requests never ask it whether theirs is current.
    fn on_swap(&self, hook: SwapHook) -> bool {
        crate::reload::PolicyStore::on_swap(self, hook);
        true
    }
    fn admin_json(&self) -> Option<serde_json::Value> {
        Some(self.admin_policy_json())
    }
    fn reload_now(&self) -> Option<ReloadFuture<'_>> {
        Some(Box::pin(self.reload(crate::reload::Trigger::Admin)))
    }
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
    /// The config's tenants resolved against this policy, in config order.
    pub tenants: Arc<[TenantView]>,
    /// Each tenant's index in `tenants` by the SHA-256 of its key (keys are
    /// unique: the config refuses two tenants with one key).
    pub tenant_by_key: HashMap<KeyHash, usize>,
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
    /// The source builds each new runtime as it swaps ([`PolicySource::on_swap`]):
    /// a request that finds the runtime old leaves the build to it.
    built_on_swap: std::sync::atomic::AtomicBool,
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
            tenants: Arc::from([]),
            tenant_by_key: HashMap::new(),
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
            built_on_swap: std::sync::atomic::AtomicBool::new(false),
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
        let gw = Arc::new(gw);
        // Weak: the source lives in the gateway, the hook must not keep it alive.
        let weak = Arc::downgrade(&gw);
        let built_on_swap = gw.policies.on_swap(Box::new(move || {
            if let Some(gw) = weak.upgrade() {
                gw.rebuild_now();
            }
        }));
        gw.built_on_swap.store(built_on_swap, Ordering::Relaxed);
        // A swap between the first build and the hook's registration had no
        // hook to build it: catch up now (nothing to do when none came).
        gw.rebuild_now();
        Ok(gw)
    }

    /// The runtime for the current policy. A request calls this once and
    /// uses the result throughout, so no decision mixes two versions.
    ///
    /// The reload store builds the runtime of a new policy as it swaps it
    /// in ([`PolicySource::on_swap`]); a request neither builds one then nor
    /// waits for a build another thread is running (with 100,000 tenants
    /// it takes tens of milliseconds): until it is done, requests keep the
    /// last runtime.
    pub fn runtime(&self) -> Arc<Runtime> {
        let rt = self.runtime.load_full();
        if self.built_on_swap.load(Ordering::Relaxed)
            || self.policies.serves(&rt.policy, &rt.config)
        {
            return rt;
        }
        match self.rebuild.try_lock() {
            Ok(mut failed) => self.rebuild_locked(&mut failed),
            Err(std::sync::TryLockError::Poisoned(p)) => self.rebuild_locked(&mut p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => rt,
        }
    }

    /// Bring the runtime up to the current policy now, waiting for a build
    /// in progress rather than skipping it.
    fn rebuild_now(&self) {
        let mut failed = self
            .rebuild
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.rebuild_locked(&mut failed);
    }

    fn rebuild_locked(&self, failed: &mut Option<String>) -> Arc<Runtime> {
        // Someone else may have rebuilt while we waited.
        let rt = self.runtime.load_full();
        let snap = self.policies.current();
        let version = snap.policy.version();
        if rt.matches(&snap) || failed.as_deref() == Some(version) {
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
                *failed = Some(version.to_string());
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
        let tenants: Arc<[TenantView]> = match &snap.tenants {
            Some(resolved) if resolved.len() == config.tenants.len() => resolved.clone(),
            _ => {
                let mut tenants = Vec::with_capacity(config.tenants.len());
                for t in &config.tenants {
                    match policy.tenant(&t.id, &t.attrs) {
                        Ok(view) => tenants.push(view),
                        Err(problems) => errors.extend(
                            problems
                                .into_iter()
                                .map(|pr| config.error_at(t.line, pr).to_string()),
                        ),
                    }
                }
                tenants.into()
            }
        };
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
            tenant_by_key: config
                .tenants
                .iter()
                .enumerate()
                .map(|(i, t)| (t.key_sha256, i))
                .collect(),
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
    use std::sync::Arc;

    use super::*;
    use crate::reload::{served_builder, Paths, PolicyStore, Trigger};

    fn policy_text(quality: &str) -> String {
        format!("provider mock {{ region us }}\nmodel m {{ provider mock kind chat quality {quality} }}\nclassify {{ chat otherwise }}\nroute chat {{ candidates [m] }}\n")
    }

    fn compiled(quality: &str) -> CompiledPolicy {
        let mut sources = crate::source::Sources::new();
        sources.add("p.route", policy_text(quality));
        engine::compile(&sources).unwrap()
    }

    fn config() -> Config {
        let text = "policy: p\nproviders: [{ name: mock, kind: mock }]\ntenants:\n  - { id: a, key: ka }\n  - { id: b, key: kb }\n";
        Config::parse("gw.yaml", text, std::path::Path::new("."), &|_| None).unwrap()
    }

    #[tokio::test]
    async fn a_reload_builds_the_runtime_before_it_reports_success() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (store, gw) = served(dir, "[{ id: a, key: ka }]");
        // The tenants the store resolved to check the reload are the ones
        // served, not resolved a second time.
        assert!(Arc::ptr_eq(
            &gw.runtime().tenants,
            &store.current().value.tenants
        ));

        std::fs::write(dir.join("p/main.route"), policy_text("0.6")).unwrap();
        let version = store.reload(Trigger::Manual).await.unwrap();
        // No request came: the reload built the runtime itself.
        assert_eq!(gw.runtime.load().policy.version(), version);
        assert!(Arc::ptr_eq(
            &gw.runtime.load().tenants,
            &store.current().value.tenants
        ));
    }

    #[test]
    fn a_request_keeps_the_last_runtime_while_another_thread_builds_one() {
        let fixed = Arc::new(FixedPolicy::new(compiled("0.5")));
        let gw = Gateway::new(config(), fixed.clone(), Options::default()).unwrap();
        let old = gw.runtime().policy.version().to_string();
        fixed.set(compiled("0.6"));
        let building = gw.rebuild.lock().unwrap();
        // Does not wait for the lock (the test would hang).
        assert_eq!(gw.runtime().policy.version(), old);
        drop(building);
        assert_ne!(gw.runtime().policy.version(), old);
    }

    #[test]
    fn tenants_are_found_by_their_key() {
        let gw = Gateway::new(
            config(),
            Arc::new(FixedPolicy::new(compiled("0.5"))),
            Options::default(),
        )
        .unwrap();
        let rt = gw.runtime();
        let find = |key: &str| {
            rt.tenant_by_key
                .get(&crate::config::sha256(key))
                .and_then(|&i| rt.tenants.get(i))
                .map(|t| t.id.clone())
        };
        assert_eq!(find("ka").as_deref(), Some("a"));
        assert_eq!(find("kb").as_deref(), Some("b"));
        assert_eq!(find("kc"), None);
    }

    /// A store and a gateway on `gw.yaml` with `tenants`, in `dir`.
    fn served(
        dir: &std::path::Path,
        tenants: &str,
    ) -> (Arc<PolicyStore<crate::reload::Served>>, Arc<Gateway>) {
        std::fs::create_dir_all(dir.join("p")).unwrap();
        std::fs::write(dir.join("p/main.route"), policy_text("0.5")).unwrap();
        std::fs::write(
            dir.join("gw.yaml"),
            format!("policy: p\nproviders: [{{ name: mock, kind: mock }}]\ntenants: {tenants}\n"),
        )
        .unwrap();
        let config = Arc::new(Config::load(&dir.join("gw.yaml")).unwrap());
        let paths = Paths {
            policy: config.policy.clone(),
            config: Some(config.path.clone()),
        };
        let store = PolicyStore::load(paths, served_builder(Arc::clone(&config)), None).unwrap();
        let gw = Gateway::new((*config).clone(), store.clone(), Options::default()).unwrap();
        (store, gw)
    }

    fn finds(rt: &Runtime, key: &str) -> Option<String> {
        rt.tenant_by_key
            .get(&crate::config::sha256(key))
            .and_then(|&i| rt.tenants.get(i))
            .map(|t| t.id.clone())
    }

    /// Holds `gw.rebuild` on another thread (as a request building a
    /// runtime does) until the returned sender is dropped.
    fn hold_rebuild(
        gw: &Arc<Gateway>,
    ) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = Arc::clone(gw);
        let t = std::thread::spawn(move || {
            let _g = holder.rebuild.lock().unwrap();
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        locked_rx.recv().unwrap();
        (release_tx, t)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_config_only_reload_serves_the_new_tenants() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (store, gw) = served(dir, "[{ id: a, key: ka }]");
        let before = gw.runtime();
        assert_eq!(finds(&before, "kb"), None);
        // Same policy, one more tenant and tenant a's key changed.
        std::fs::write(
            dir.join("gw.yaml"),
            "policy: p\nproviders: [{ name: mock, kind: mock }]\ntenants: [{ id: a, key: ka2 }, { id: b, key: kb }]\n",
        )
        .unwrap();
        let version = store.reload(Trigger::Manual).await.unwrap();
        assert_eq!(
            version,
            before.policy.version(),
            "the policy did not change"
        );
        let rt = gw.runtime.load_full();
        assert_eq!(finds(&rt, "kb").as_deref(), Some("b"));
        assert_eq!(finds(&rt, "ka2").as_deref(), Some("a"));
        assert_eq!(
            finds(&rt, "ka"),
            None,
            "the old key is revoked once the reload returns"
        );
        assert_eq!(rt.tenants.len(), rt.config.tenants.len());
        for (i, t) in rt.config.tenants.iter().enumerate() {
            assert_eq!(rt.tenants[i].id, t.id);
        }
    }

    /// A reload of an edited policy while another thread holds the rebuild
    /// lock, once the store swapped: the version before and the reload.
    async fn reload_while_building(
        dir: &std::path::Path,
        store: &Arc<PolicyStore<crate::reload::Served>>,
    ) -> (
        String,
        tokio::task::JoinHandle<Result<String, crate::reload::Failure>>,
    ) {
        let old = store.current().version.clone();
        std::fs::write(dir.join("p/main.route"), policy_text("0.6")).unwrap();
        let reload = {
            let store = store.clone();
            tokio::spawn(async move { store.reload(Trigger::Manual).await })
        };
        while store.current().version == old {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        (old, reload)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_waits_for_a_build_in_progress_and_then_serves_the_new_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (store, gw) = served(dir, "[{ id: a, key: ka }]");
        let (release, holder) = hold_rebuild(&gw);
        // Swapped in the store, the hook waits for the lock; requests keep
        // the last runtime meanwhile and never block.
        let (old, reload) = reload_while_building(dir, &store).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(gw.runtime().policy.version(), old);
        assert!(!reload.is_finished(), "the reload waits for its runtime");
        drop(release);
        holder.join().unwrap();
        let version = reload.await.unwrap().unwrap();
        assert_ne!(version, old);
        assert_eq!(gw.runtime.load().policy.version(), version);
        assert_eq!(gw.runtime().policy.version(), version);
    }

    /// Found by review: a reload future dropped while its runtime builds (a
    /// watcher task aborted, a `timeout` around `reload`) had swapped the
    /// policy without `status`, the metrics and the log ever saying so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_dropped_while_its_runtime_builds_is_still_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (store, gw) = served(dir, "[{ id: a, key: ka }]");
        let succeeded = store.status().succeeded;
        let (release, holder) = hold_rebuild(&gw);
        let (old, reload) = reload_while_building(dir, &store).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        reload.abort();
        let _ = reload.await;
        drop(release);
        holder.join().unwrap();
        let new = store.current().version.clone();
        assert_ne!(new, old, "swapped");
        let status = store.status();
        assert_eq!(
            (status.succeeded, status.last.map(|r| r.version)),
            (succeeded + 1, Some(new)),
            "a swapped policy must be recorded as reloaded"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_runtime_a_request_sees_pairs_tenants_with_its_own_config() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let (store, gw) = served(&dir, "[{ id: a, key: ka }, { id: b, key: kb }]");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let gw = Arc::clone(&gw);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let rt = gw.runtime();
                        assert_eq!(rt.tenants.len(), rt.config.tenants.len());
                        for (i, t) in rt.config.tenants.iter().enumerate() {
                            assert_eq!(rt.tenants[i].id, t.id);
                            assert_eq!(rt.tenants[i].policy_version(), rt.policy.version());
                            assert_eq!(rt.tenant_by_key.get(&t.key_sha256), Some(&i));
                        }
                        seen += 1;
                    }
                    seen
                })
            })
            .collect();
        for i in 0..30 {
            let (tenants, quality) = if i % 2 == 0 {
                (
                    "[{ id: c, key: kc }, { id: b, key: ka }, { id: a, key: kb }]",
                    "0.6",
                )
            } else {
                ("[{ id: a, key: ka }, { id: b, key: kb }]", "0.5")
            };
            // Sometimes the policy, sometimes only the config.
            if i % 3 != 0 {
                std::fs::write(dir.join("p/main.route"), policy_text(quality)).unwrap();
            }
            std::fs::write(
                dir.join("gw.yaml"),
                format!(
                    "policy: p\nproviders: [{{ name: mock, kind: mock }}]\ntenants: {tenants}\n"
                ),
            )
            .unwrap();
            let v = store.reload(Trigger::Manual).await.unwrap();
            let rt = gw.runtime();
            assert_eq!(rt.policy.version(), v);
            assert!(Arc::ptr_eq(&rt.config, &store.current().value.config));
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }

    #[test]
    fn the_store_does_not_keep_a_dropped_gateway_alive() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, gw) = served(tmp.path(), "[{ id: a, key: ka }]");
        let weak = Arc::downgrade(&gw);
        drop(gw);
        assert!(weak.upgrade().is_none());
        drop(store);
    }

    #[tokio::test]
    async fn every_gateway_on_a_store_gets_the_new_runtime() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (store, first) = served(dir, "[{ id: a, key: ka }]");
        let config = Config::load(&dir.join("gw.yaml")).unwrap();
        let second = Gateway::new(config, store.clone(), Options::default()).unwrap();
        std::fs::write(dir.join("p/main.route"), policy_text("0.6")).unwrap();
        let version = store.reload(Trigger::Manual).await.unwrap();
        assert_eq!(first.runtime().policy.version(), version);
        assert_eq!(second.runtime().policy.version(), version);
    }

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
