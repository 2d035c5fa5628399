//! The engine API the gateway codes against (`compile`, `decide`).
//!
//! A stand-in with the same signatures as the engine's (see the team brief)
//! until `src/compile.rs` and `src/decide.rs` land; then this module only
//! re-exports them. The stand-in routes a named model to itself and anything
//! else to the enabled models of the endpoint's kind, in catalogue order.

use crate::analysis::{analyze, Analysis};
pub use crate::ir::{
    BudgetAction, ConstraintId, Endpoint, IntentId, Micros, ModelId, ResponseFormat, RouteId,
};
use crate::ir::{ModelKind, Policy};
use crate::source::Sources;

pub struct CompiledPolicy {
    policy: Policy,
    version: String,
}

#[allow(clippy::result_large_err)] // the engine's signature, kept as the brief gives it
pub fn compile(sources: &Sources) -> Result<CompiledPolicy, Analysis> {
    let a = analyze(sources);
    if a.has_errors() {
        return Err(a);
    }
    Ok(CompiledPolicy::from_policy(a.policy, &version_of(sources)))
}

fn version_of(sources: &Sources) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (_, f) in sources.iter() {
        h.update(f.text.as_bytes());
    }
    let digest = h.finalize();
    hex::encode(digest.get(..6).unwrap_or_default())
}

impl CompiledPolicy {
    pub fn from_policy(policy: Policy, version: &str) -> Self {
        CompiledPolicy {
            policy,
            version: version.to_string(),
        }
    }
    pub fn version(&self) -> &str {
        &self.version
    }
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
    pub fn tenant(
        &self,
        id: &str,
        _attrs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<TenantView, Vec<String>> {
        Ok(TenantView { id: id.to_string() })
    }
}

#[derive(Clone, Debug)]
pub struct TenantView {
    pub id: String,
}

#[derive(Clone, Debug)]
pub struct RequestFeatures {
    pub endpoint: Endpoint,
    pub response_format: ResponseFormat,
    pub has_tools: bool,
    pub has_images: bool,
    pub stream: bool,
    pub input_tokens: u64,
    pub max_tokens: Option<u64>,
    pub feature: Option<String>,
    pub prompt: String,
    pub model: Option<String>,
    pub meta: Vec<(String, String)>,
    pub confirmed: bool,
}

impl RequestFeatures {
    pub fn from_openai_json(endpoint: Endpoint, body: &serde_json::Value) -> Self {
        let model = body
            .get("model")
            .and_then(|m| m.as_str())
            .map(str::to_string);
        let stream = body
            .get("stream")
            .and_then(|s| s.as_bool())
            .unwrap_or(false);
        let max_tokens = body.get("max_tokens").and_then(|m| m.as_u64());
        let prompt = body
            .get("messages")
            .and_then(|m| m.as_array())
            .and_then(|m| {
                m.iter()
                    .rev()
                    .find(|m| m.get("role").and_then(|r| r.as_str()) == Some("user"))
            })
            .and_then(|m| m.get("content"))
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string();
        RequestFeatures {
            endpoint,
            response_format: ResponseFormat::Text,
            has_tools: body.get("tools").is_some(),
            has_images: false,
            stream,
            input_tokens: (body.to_string().len() / 4) as u64,
            max_tokens,
            feature: None,
            prompt,
            model,
            meta: Vec::new(),
            confirmed: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

#[derive(Clone, Debug)]
pub struct ModelStats {
    pub latency_ms: Option<f64>,
    pub first_token_ms: Option<f64>,
    pub success_rate: Option<f64>,
    pub breaker: BreakerState,
}

pub trait Stats {
    fn model(&self, m: ModelId) -> ModelStats;
    fn budget_action(&self) -> Option<BudgetAction> {
        None
    }
}

#[derive(Clone, Debug)]
pub struct Decision {
    pub intent: Option<IntentId>,
    pub route: Option<RouteId>,
    pub attempts: Vec<ModelId>,
    pub estimated_cost: Micros,
    pub outcome: Result<(), Denial>,
}

#[derive(Clone, Debug)]
pub enum Denial {
    ModelDenied { model: ModelId, rule: ConstraintId },
    UnknownModel(String),
    NoModelAvailable { intent: IntentId },
    BudgetBlocked,
    ConfirmationRequired,
}

fn kind_of(e: Endpoint) -> ModelKind {
    match e {
        Endpoint::Chat => ModelKind::Chat,
        Endpoint::Embeddings => ModelKind::Embeddings,
        Endpoint::Images => ModelKind::Image,
        Endpoint::AudioTranscription | Endpoint::AudioSpeech => ModelKind::Audio,
    }
}

pub fn decide(
    p: &CompiledPolicy,
    _t: &TenantView,
    r: &RequestFeatures,
    _s: &dyn Stats,
) -> Decision {
    let policy = p.policy();
    let mut d = Decision {
        intent: None,
        route: None,
        attempts: Vec::new(),
        estimated_cost: 0,
        outcome: Ok(()),
    };
    // Only unconditional constraints: enough for the stand-in.
    let denied_by = |id: ModelId| {
        policy
            .constraints
            .iter()
            .position(|c| c.when.is_none() && c.removes.contains(&id))
            .map(|i| ConstraintId(i as u32))
    };
    match r.model.as_deref() {
        Some(name) if name != "auto" => match policy.model_by_name(name) {
            Some(id) => match denied_by(id) {
                Some(rule) => d.outcome = Err(Denial::ModelDenied { model: id, rule }),
                None => d.attempts.push(id),
            },
            None => d.outcome = Err(Denial::UnknownModel(name.to_string())),
        },
        _ => {
            let kind = kind_of(r.endpoint);
            for (i, m) in policy.models.iter().enumerate() {
                if m.enabled && m.kind == kind && denied_by(ModelId(i as u32)).is_none() {
                    d.attempts.push(ModelId(i as u32));
                }
            }
        }
    }
    d
}
