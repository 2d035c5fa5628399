//! Per-request decisions over a [`CompiledPolicy`].
//!
//! [`decide`] is pure: no I/O, no locks, and no allocation beyond the returned
//! [`Decision`] (its `attempts` vector) for routes of up to 32 candidates.
//! [`explain`] runs the very same code with a recorder attached and returns a
//! [`Trace`].
//!
//! The layers, in order:
//! 1. constraints: the tenant's pre-resolved allowed set minus what firing
//!    request-dependent rules remove. INVARIANT: every later step only filters
//!    or orders this set; no model outside it can reach `attempts`.
//! 2. classification (decision tree) to an intent, unless the request names an
//!    intent (`"model": "<intent>"`) or a model; a named model is still
//!    classified so the intent's route supplies the fallbacks.
//! 3. the intent's route (refined routes in source order, then the default):
//!    allowed candidates by score, then allowed fallbacks, de-duplicated;
//!    premium-tier models only when the route's `premium only when` holds.
//!    A model named by the client is checked against the constraints only.
//! 4. the budget action from [`Stats::budget_action`], then models whose
//!    breaker is open move to the end of the order.
//!
//! # Signal normalisation
//! Every signal is in `[0, 1]`, higher is better, so a weight says how much a
//! signal matters and `score = Σ weight × signal`:
//! - `price`: cheapest candidate's estimated cost / this candidate's (1 = the
//!   cheapest; a free model scores 1);
//! - `latency`, `first_token`: fastest candidate's latency / this one's (1 =
//!   the fastest among candidates with stats);
//! - `success`: the recent success rate as is;
//! - `quality`: the catalogue's `quality` as is;
//! - `health`: breaker closed 1, half-open 0.5, open 0.
//!
//! A stat the gateway does not know yet scores 0.5. Ties break by candidate
//! order in the route, then by model name. A route without `score` orders by
//! quality (higher first), then price (cheaper first).
//!
//! # Estimated cost
//! Input tokens × input price + output tokens × output price, where output
//! tokens are the request's `max_tokens`, else the model's `max_output`, else
//! 1024 (0 for embeddings); plus the per-image price on the images endpoint.
//! Integer micro-dollars, rounded up.

use serde::Serialize;
use smallvec::SmallVec;

use crate::compile::{value_ref, FieldVal, MetaKind, ModelSet, Node, Slot, SIGNALS};
pub use crate::compile::{CompiledPolicy, TenantView};
use crate::ir::{
    BudgetAction, ConstraintId, Endpoint, IntentId, Micros, ModelId, ResponseFormat, RouteId,
    Signal, Type, Value,
};

pub mod reference;

// ------------------------------------------------------------------ request features

/// What the engine knows about a request.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RequestFeatures {
    pub endpoint: Endpoint,
    pub response_format: ResponseFormat,
    pub has_tools: bool,
    pub has_images: bool,
    pub stream: bool,
    pub input_tokens: u64,
    pub max_tokens: Option<u64>,
    pub feature: Option<String>,
    /// The last user message.
    pub prompt: String,
    /// `None` or `"auto"`: route by policy; otherwise a model or an intent name.
    pub model: Option<String>,
    /// Declared request attributes (header `x-routeplane-meta-<name>` or body `metadata.<name>`).
    pub meta: Vec<(String, String)>,
    /// `x-routeplane-confirm`: the client confirms premium spend.
    pub confirmed: bool,
}

impl Default for RequestFeatures {
    fn default() -> Self {
        RequestFeatures {
            endpoint: Endpoint::Chat,
            response_format: ResponseFormat::Text,
            has_tools: false,
            has_images: false,
            stream: false,
            input_tokens: 0,
            max_tokens: None,
            feature: None,
            prompt: String::new(),
            model: None,
            meta: Vec::new(),
            confirmed: false,
        }
    }
}

/// Characters per token for the fast estimate: OpenAI's rule of thumb for
/// English text. A real tokenizer per model family is a later issue.
pub const CHARS_PER_TOKEN: u64 = 4;
/// Tokens each chat message adds for its role and separators.
pub const TOKENS_PER_MESSAGE: u64 = 3;

/// The token ids an embeddings `input` gives as numbers: OpenAI's API takes
/// a single token array (`[1, 2, 3]`) or several (`[[1, 2], [3]]`) as well as
/// text. Each id is one token; without counting them such a request would be
/// estimated at no tokens at all, so its reservation and the token limits
/// would never hold it back.
pub fn token_ids_in(input: &serde_json::Value) -> u64 {
    let ids = |items: &[serde_json::Value]| items.iter().filter(|i| i.is_number()).count() as u64;
    match input {
        serde_json::Value::Array(items) => items.iter().fold(ids(items), |n, item| match item {
            serde_json::Value::Array(inner) => n.saturating_add(ids(inner)),
            _ => n,
        }),
        _ => 0,
    }
}

fn text_of(content: &serde_json::Value, out: &mut String, images: &mut bool) {
    match content {
        serde_json::Value::String(s) => out.push_str(s),
        serde_json::Value::Array(parts) => {
            for p in parts {
                match p {
                    serde_json::Value::String(s) => push_part(out, s),
                    serde_json::Value::Object(o) => {
                        let ty = o.get("type").and_then(|t| t.as_str()).unwrap_or("");
                        if ty.contains("image") || o.contains_key("image_url") {
                            *images = true;
                        }
                        if let Some(t) = o.get("text").and_then(|t| t.as_str()) {
                            push_part(out, t);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn push_part(out: &mut String, s: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(s);
}

impl RequestFeatures {
    /// Extracts features from an OpenAI-style body. Never panics: fields of
    /// the wrong type are ignored. `input_tokens` is a fast estimate:
    /// characters of all message text / [`CHARS_PER_TOKEN`] (rounded up) plus
    /// [`TOKENS_PER_MESSAGE`] per message; for embeddings the `input`
    /// strings and token ids ([`token_ids_in`]), for images the `prompt`.
    pub fn from_openai_json(endpoint: Endpoint, body: &serde_json::Value) -> RequestFeatures {
        let mut f = RequestFeatures {
            endpoint,
            ..RequestFeatures::default()
        };
        let get = |k: &str| body.get(k);
        let mut chars = 0u64;
        let mut messages = 0u64;
        if let Some(msgs) = get("messages").and_then(|m| m.as_array()) {
            for m in msgs {
                messages += 1;
                let mut text = String::new();
                let mut images = false;
                if let Some(c) = m.get("content") {
                    text_of(c, &mut text, &mut images);
                }
                f.has_images |= images;
                chars += text.chars().count() as u64;
                if m.get("role").and_then(|r| r.as_str()) == Some("user") {
                    f.prompt = text;
                }
            }
        }
        let mut token_ids = 0u64;
        match get("input") {
            Some(serde_json::Value::String(s)) => chars += s.chars().count() as u64,
            Some(input @ serde_json::Value::Array(items)) => {
                for i in items {
                    if let Some(s) = i.as_str() {
                        chars += s.chars().count() as u64;
                    }
                }
                token_ids = token_ids_in(input);
            }
            _ => {}
        }
        if let Some(p) = get("prompt").and_then(|p| p.as_str()) {
            chars += p.chars().count() as u64;
            if f.prompt.is_empty() {
                f.prompt = p.to_string();
            }
        }
        f.input_tokens = (chars.div_ceil(CHARS_PER_TOKEN) + messages * TOKENS_PER_MESSAGE)
            .saturating_add(token_ids);
        let non_empty = |k: &str| {
            get(k)
                .and_then(|v| v.as_array())
                .is_some_and(|a| !a.is_empty())
        };
        f.has_tools = non_empty("tools") || non_empty("functions");
        f.response_format = match get("response_format")
            .and_then(|r| r.get("type"))
            .and_then(|t| t.as_str())
        {
            Some("json_object") => ResponseFormat::JsonObject,
            Some("json_schema") => ResponseFormat::JsonSchema,
            _ => ResponseFormat::Text,
        };
        f.max_tokens = get("max_completion_tokens")
            .and_then(|v| v.as_u64())
            .or_else(|| get("max_tokens").and_then(|v| v.as_u64()));
        f.stream = get("stream").and_then(|v| v.as_bool()).unwrap_or(false);
        f.model = get("model").and_then(|v| v.as_str()).map(str::to_string);
        if let Some(meta) = get("metadata").and_then(|m| m.as_object()) {
            for (k, v) in meta {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => continue,
                };
                if k == "feature" {
                    f.feature = Some(v);
                } else {
                    f.meta.push((k.clone(), v));
                }
            }
        }
        f
    }

    /// Checks the values sent for the policy's declared request attributes
    /// against their types. A value that fits no rule (an enum variant with
    /// a typo, `yes please` for a bool) would otherwise read as a value no
    /// condition matches and silently skip a constraint; it is refused here,
    /// naming the attribute, the value and what it accepts.
    pub fn check_declared(&self, p: &CompiledPolicy) -> Result<(), String> {
        for attr in &p.policy().request_attrs {
            let sent = if attr.name == "feature" {
                self.feature.as_deref()
            } else {
                self.meta
                    .iter()
                    .find(|(k, _)| *k == attr.name)
                    .map(|(_, v)| v.as_str())
            };
            let Some(v) = sent else { continue };
            let expected = match &attr.ty {
                Type::String | Type::List(_) => continue,
                Type::Bool if !matches!(typed(MetaKind::Bool, v), FieldVal::Missing) => continue,
                Type::Number if !matches!(typed(MetaKind::Num, v), FieldVal::Missing) => continue,
                Type::Enum(names) if names.iter().any(|n| n == v) => continue,
                Type::Bool => "`true` or `false`".to_string(),
                Type::Number => "a number".to_string(),
                Type::Enum(names) => format!(
                    "one of {}",
                    names
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let how = if attr.name == "feature" {
                "`x-routeplane-feature` or `metadata.feature`".to_string()
            } else {
                format!("`x-routeplane-meta-{0}` or `metadata.{0}`", attr.name)
            };
            let shown: String = v.chars().take(64).collect();
            let cut = if shown.len() < v.len() { "..." } else { "" };
            return Err(format!(
                "request attribute `{}` is `{shown}{cut}`, which the policy does not accept: send {expected} ({how})",
                attr.name
            ));
        }
        Ok(())
    }

    /// True when the request leaves the choice to the policy.
    pub fn is_auto(&self) -> bool {
        self.model
            .as_deref()
            .is_none_or(|m| m.is_empty() || m == "auto")
    }
}

// ------------------------------------------------------------------ live stats

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    #[default]
    Closed,
    HalfOpen,
    Open,
}

/// Read from `explain --stats` and decision tests: a misspelt key (`latency`,
/// `succes_rate`) is refused rather than silently read as "no statistic".
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelStats {
    pub latency_ms: Option<f64>,
    pub first_token_ms: Option<f64>,
    /// In [0, 1].
    pub success_rate: Option<f64>,
    pub breaker: BreakerState,
}

/// Live state the gateway feeds into decisions.
pub trait Stats {
    fn model(&self, m: ModelId) -> ModelStats;
    /// The strongest budget threshold crossed for this tenant and request.
    fn budget_action(&self) -> Option<BudgetAction> {
        None
    }
    /// Whether a `confirm premium` threshold is crossed, even when a stronger
    /// action (a downgrade) is the one reported: thresholds hold from their
    /// percentage on, so spending more never lifts the premium guard.
    fn premium_needs_confirmation(&self) -> bool {
        self.budget_action() == Some(BudgetAction::ConfirmPremium)
    }
}

/// No live stats: every stat unknown, every breaker closed, no budget action.
pub struct NoStats;

impl Stats for NoStats {
    fn model(&self, _: ModelId) -> ModelStats {
        ModelStats::default()
    }
}

// ------------------------------------------------------------------ decisions

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub intent: Option<IntentId>,
    pub route: Option<RouteId>,
    /// Models to try in order: primary, the rest by score, then fallbacks.
    pub attempts: Vec<ModelId>,
    /// Estimated cost of the first attempt.
    pub estimated_cost: Micros,
    pub outcome: Result<(), Denial>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Denial {
    /// The client named a model a constraint removes.
    ModelDenied {
        model: ModelId,
        rule: ConstraintId,
    },
    /// The client named a model the catalogue disables.
    ModelDisabled {
        model: ModelId,
    },
    /// The client named a model whose kind cannot serve the request's
    /// endpoint (an embeddings model on chat completions).
    ModelCannotServe {
        model: ModelId,
        endpoint: Endpoint,
    },
    /// The client named something that is neither a model nor an intent.
    UnknownModel(String),
    NoModelAvailable {
        intent: IntentId,
        endpoint: Endpoint,
    },
    BudgetBlocked,
    ConfirmationRequired,
}

impl Denial {
    /// A stable kebab-case code, for logs, tests and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::ModelDenied { .. } => "model-denied",
            Denial::ModelDisabled { .. } => "model-disabled",
            Denial::ModelCannotServe { .. } => "model-cannot-serve",
            Denial::UnknownModel(_) => "unknown-model",
            Denial::NoModelAvailable { .. } => "no-model-available",
            Denial::BudgetBlocked => "budget-blocked",
            Denial::ConfirmationRequired => "confirmation-required",
        }
    }

    /// The constraint responsible, if one is.
    pub fn rule(&self) -> Option<ConstraintId> {
        match self {
            Denial::ModelDenied { rule, .. } => Some(*rule),
            _ => None,
        }
    }

    /// A message naming the model, intent and rule (with `file:line`).
    pub fn message(&self, p: &CompiledPolicy) -> String {
        match self {
            Denial::ModelDenied { model, rule } => {
                let loc = p.policy().constraints.get(rule.index()).map(|c| p.location(c.span)).unwrap_or_default();
                format!("model `{}` is denied by rule `{}` ({loc})", p.model_name(*model), p.constraint_name(*rule))
            }
            Denial::ModelDisabled { model } => format!("model `{}` is disabled in the catalogue", p.model_name(*model)),
            Denial::ModelCannotServe { model, endpoint } => {
                let kind = p.policy().model(*model).map_or("", |m| m.kind.as_str());
                format!("model `{}` is of kind `{kind}`: it cannot serve {}", p.model_name(*model), endpoint_path(*endpoint))
            }
            Denial::UnknownModel(m) => format!("`{m}` is neither a model nor an intent of this policy"),
            Denial::NoModelAvailable { intent, endpoint } => {
                format!(
                    "no model is available for intent `{}` on {}: the constraints removed every candidate and fallback whose kind serves it",
                    p.intent_name(*intent),
                    endpoint_path(*endpoint)
                )
            }
            Denial::BudgetBlocked => "the budget is exhausted: requests are blocked until it resets".into(),
            Denial::ConfirmationRequired => {
                "the budget requires confirmation for premium models: resend with `x-routeplane-confirm: true`".into()
            }
        }
    }
}

/// The API path of an endpoint, for messages.
pub fn endpoint_path(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Embeddings => "/v1/embeddings",
        Endpoint::Images => "/v1/images/generations",
        Endpoint::AudioTranscription => "/v1/audio/transcriptions",
        Endpoint::AudioSpeech => "/v1/audio/speech",
    }
}

// ------------------------------------------------------------------ evaluation

/// A candidate being scored.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cand {
    pub(crate) model: ModelId,
    /// Position in the route's candidate list.
    pub(crate) order: u32,
    pub(crate) cost: Micros,
    pub(crate) stats: ModelStats,
    /// Normalised signals by `SIGNALS` order.
    pub(crate) signals: [f64; 6],
    pub(crate) score: f64,
}

const CAND0: Cand = Cand {
    model: ModelId(0),
    order: 0,
    cost: 0,
    stats: ModelStats {
        latency_ms: None,
        first_token_ms: None,
        success_rate: None,
        breaker: BreakerState::Closed,
    },
    signals: [0.0; 6],
    score: 0.0,
};

/// Candidates scored on the stack; routes with more fall back to the heap.
const STACK_CANDS: usize = 32;

/// How the intent was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Classified {
    Rule(u32),
    RequestedIntent,
}

/// Hooks for [`explain`]; the hot path uses [`NoTrace`], which compiles away.
pub(crate) trait Tracer {
    fn live_fired(&mut self, _c: ConstraintId) {}
    fn classified(&mut self, _how: Classified) {}
    fn premium(&mut self, _ok: bool) {}
    fn scored(&mut self, _c: &Cand) {}
    fn budget(&mut self, _a: BudgetAction) {}
    /// Premium models left the attempts until the client confirms.
    fn premium_held(&mut self) {}
}

pub(crate) struct NoTrace;
impl Tracer for NoTrace {}

/// Reads a slot for this tenant and request.
fn read<'a>(
    p: &'a CompiledPolicy,
    t: &'a TenantView,
    r: &'a RequestFeatures,
    s: Slot,
) -> FieldVal<'a> {
    match s {
        Slot::Endpoint => FieldVal::Enum(r.endpoint as u32),
        Slot::ResponseFormat => FieldVal::Enum(r.response_format as u32),
        Slot::HasTools => FieldVal::Bool(r.has_tools),
        Slot::HasImages => FieldVal::Bool(r.has_images),
        Slot::Stream => FieldVal::Bool(r.stream),
        Slot::InputTokens => FieldVal::Num(r.input_tokens as f64),
        Slot::MaxTokens => r
            .max_tokens
            .map_or(FieldVal::Missing, |n| FieldVal::Num(n as f64)),
        Slot::Prompt => FieldVal::Str(&r.prompt),
        Slot::Model => FieldVal::Str(
            r.model
                .as_deref()
                .filter(|m| !m.is_empty())
                .unwrap_or("auto"),
        ),
        Slot::Feature => match p.meta.iter().position(|(n, _)| &**n == "feature") {
            Some(i) => meta_value(p, r, i),
            None => r
                .feature
                .as_deref()
                .map_or(FieldVal::Missing, FieldVal::Str),
        },
        Slot::Meta(i) => meta_value(p, r, i as usize),
        Slot::TenantId | Slot::Tenant(_) => t.read(s).unwrap_or(FieldVal::Missing),
    }
}

/// A declared request attribute: the value sent (`feature` is the feature
/// tag), else the declared default. Request-side enums compare by variant name.
fn meta_value<'a>(p: &'a CompiledPolicy, r: &'a RequestFeatures, i: usize) -> FieldVal<'a> {
    let Some((name, kind)) = p.meta.get(i) else {
        return FieldVal::Missing;
    };
    let sent = if &**name == "feature" {
        r.feature.as_deref()
    } else {
        r.meta
            .iter()
            .find(|(k, _)| k == &**name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(v) = sent {
        return typed(*kind, v);
    }
    match p.policy().request_attrs.get(i) {
        Some(crate::ir::AttrDef {
            default: Some(Value::Enum(v)),
            ty: Type::Enum(names),
            ..
        }) => names
            .get(*v as usize)
            .map_or(FieldVal::Missing, |n| FieldVal::Str(n)),
        Some(crate::ir::AttrDef {
            default: Some(d), ..
        }) => value_ref(d),
        _ => FieldVal::Missing,
    }
}

fn typed(kind: MetaKind, v: &str) -> FieldVal<'_> {
    match kind {
        MetaKind::Str => FieldVal::Str(v),
        MetaKind::Bool => match v {
            "true" | "1" | "yes" => FieldVal::Bool(true),
            "false" | "0" | "no" => FieldVal::Bool(false),
            _ => FieldVal::Missing,
        },
        MetaKind::Num => match v.trim().parse::<f64>() {
            Ok(n) if n.is_finite() => FieldVal::Num(n),
            _ => FieldVal::Missing,
        },
    }
}

/// Estimated cost of serving the request with a model, in micro-dollars (rounded up).
pub fn estimate_cost(p: &CompiledPolicy, m: ModelId, r: &RequestFeatures) -> Micros {
    let Some(model) = p.policy().model(m) else {
        return 0;
    };
    let out = match r.endpoint {
        Endpoint::Embeddings => 0,
        _ => r.max_tokens.or(model.max_output).unwrap_or(1024),
    };
    let tokens = u128::from(r.input_tokens) * u128::from(model.pricing.input_per_mtok)
        + u128::from(out) * u128::from(model.pricing.output_per_mtok);
    let mut micros = tokens.div_ceil(1_000_000);
    if r.endpoint == Endpoint::Images {
        micros += u128::from(model.pricing.per_image);
    }
    u64::try_from(micros).unwrap_or(u64::MAX)
}

fn classify<'p>(
    p: &'p CompiledPolicy,
    rd: &impl Fn(Slot) -> FieldVal<'p>,
) -> Option<(IntentId, u32)> {
    let mut node = &p.tree;
    loop {
        match node {
            Node::Switch(slot, children) => {
                let i = match rd(*slot) {
                    FieldVal::Enum(i) => i as usize,
                    FieldVal::Bool(b) => usize::from(b),
                    _ => 0,
                };
                node = children.get(i)?;
            }
            Node::Leaf { rules, index } => {
                let mut best: Option<u32> = None;
                for list in index.lists(rd) {
                    for &pos in list {
                        if best.is_some_and(|b| pos > b) {
                            break;
                        }
                        if rules.get(pos as usize).is_some_and(|r| r.cond.eval(rd)) {
                            best = Some(pos);
                            break;
                        }
                    }
                }
                let r = rules.get(best? as usize)?;
                return Some((r.intent, r.rule));
            }
        }
    }
}

/// The first constraint (in source order) that removes `m` for this tenant and request.
/// Calls its argument with every firing request-dependent constraint.
type ForEachLive<'a> = dyn Fn(&mut dyn FnMut(ConstraintId)) + 'a;

fn remover(
    p: &CompiledPolicy,
    t: &TenantView,
    fired_live: &ForEachLive<'_>,
    m: ModelId,
) -> Option<ConstraintId> {
    let removes = |c: &ConstraintId| {
        p.constraints
            .get(c.index())
            .is_some_and(|k| k.removes.contains(m))
    };
    let mut best = t.fired.iter().copied().find(|c| removes(c));
    fired_live(&mut |c| {
        if removes(&c) && best.is_none_or(|b| c < b) {
            best = Some(c);
        }
    });
    best
}

/// Decides where a request goes. Pure; see the module docs for the semantics.
pub fn decide(p: &CompiledPolicy, t: &TenantView, r: &RequestFeatures, s: &dyn Stats) -> Decision {
    run(p, t, r, s, &mut NoTrace)
}

pub(crate) fn run<T: Tracer>(
    p: &CompiledPolicy,
    t: &TenantView,
    r: &RequestFeatures,
    s: &dyn Stats,
    tr: &mut T,
) -> Decision {
    let rd = |slot: Slot| read(p, t, r, slot);
    let mut d = Decision {
        intent: None,
        route: None,
        attempts: Vec::new(),
        estimated_cost: 0,
        outcome: Ok(()),
    };

    // Layer 1: the tenant's allowed set minus firing request-dependent rules,
    // and minus the models whose kind cannot answer this endpoint.
    let mut allowed = t.allowed.clone();
    if let Some(wrong_kind) = p.not_serving.get(r.endpoint as usize) {
        allowed.remove_all(wrong_kind);
    }
    let for_each_live = |f: &mut dyn FnMut(ConstraintId)| {
        for list in t.live_index.lists(&rd) {
            for &pos in list {
                if let Some((id, cond)) = t.live.get(pos as usize) {
                    if cond.eval(&rd) {
                        f(*id);
                    }
                }
            }
        }
    };
    for_each_live(&mut |id| {
        if let Some(c) = p.constraints.get(id.index()) {
            allowed.remove_all(&c.removes);
        }
        tr.live_fired(id);
    });

    // Layer 2: what the client named, then classification.
    let mut explicit: Option<ModelId> = None;
    let intent = if r.is_auto() {
        None
    } else {
        let name = r.model.as_deref().unwrap_or("");
        if let Some(i) = p.intent_by_name(name) {
            tr.classified(Classified::RequestedIntent);
            Some(i)
        } else if let Some(m) = p.model_by_name(name) {
            explicit = Some(m);
            None
        } else {
            d.outcome = Err(Denial::UnknownModel(name.to_string()));
            return d;
        }
    };
    let intent = match intent {
        Some(i) => i,
        None => match classify(p, &rd) {
            Some((i, rule)) => {
                tr.classified(Classified::Rule(rule));
                i
            }
            // A validated policy always ends in `otherwise`.
            None => {
                d.outcome = Err(Denial::NoModelAvailable {
                    intent: IntentId(0),
                    endpoint: r.endpoint,
                });
                return d;
            }
        },
    };
    d.intent = Some(intent);

    // Layer 3: the first refined route whose condition holds, else the default.
    let routes = p
        .intent_routes
        .get(intent.index())
        .map_or(&[][..], |r| &r[..]);
    let Some((rid, route)) = routes
        .iter()
        .filter_map(|id| p.routes.get(id.index()).map(|r| (*id, r)))
        .find(|(_, r)| r.when.as_ref().is_none_or(|c| c.eval(&rd)))
    else {
        d.outcome = Err(Denial::NoModelAvailable {
            intent,
            endpoint: r.endpoint,
        });
        return d;
    };
    d.route = Some(rid);
    let premium_ok = route.premium_only.as_ref().is_none_or(|c| c.eval(&rd));
    tr.premium(premium_ok);
    let keep = |m: ModelId| allowed.contains(m) && (premium_ok || !p.premium.contains(m));
    let mut seen = ModelSet::empty(p.policy().models.len());
    let mut attempts = Vec::with_capacity(route.candidates.len() + route.fallbacks.len() + 1);

    if let Some(m) = explicit {
        if !p
            .policy()
            .model(m)
            .is_some_and(|x| x.kind.serves(r.endpoint))
        {
            d.outcome = Err(Denial::ModelCannotServe {
                model: m,
                endpoint: r.endpoint,
            });
            return d;
        }
        if !allowed.contains(m) {
            d.outcome = Err(match remover(p, t, &for_each_live, m) {
                Some(rule) => Denial::ModelDenied { model: m, rule },
                None => Denial::ModelDisabled { model: m },
            });
            return d;
        }
        attempts.push(m);
        seen.insert(m);
    } else {
        // Inline up to STACK_CANDS and never initialised ahead: zeroing a
        // fixed array of them was most of a small policy's decision.
        let mut kept: SmallVec<[Cand; STACK_CANDS]> = SmallVec::new();
        for (order, &m) in route.candidates.iter().enumerate() {
            if !keep(m) || seen.contains(m) {
                continue;
            }
            seen.insert(m);
            kept.push(Cand {
                model: m,
                order: order as u32,
                cost: estimate_cost(p, m, r),
                stats: s.model(m),
                ..CAND0
            });
        }
        let cands = kept.as_mut_slice();
        score(p, route.weights, cands);
        for c in cands.iter() {
            tr.scored(c);
        }
        if route.default_order {
            let price = crate::compile::signal_index(Signal::Price);
            let quality = crate::compile::signal_index(Signal::Quality);
            let key = |c: &Cand| {
                (
                    c.signals.get(quality).copied().unwrap_or(0.0),
                    c.signals.get(price).copied().unwrap_or(0.0),
                )
            };
            cands.sort_unstable_by(|a, b| {
                let (qa, pa) = key(a);
                let (qb, pb) = key(b);
                qb.total_cmp(&qa)
                    .then(pb.total_cmp(&pa))
                    .then(a.order.cmp(&b.order))
                    .then_with(|| p.model_name(a.model).cmp(p.model_name(b.model)))
            });
        } else {
            cands.sort_unstable_by(|a, b| {
                b.score
                    .total_cmp(&a.score)
                    .then(a.order.cmp(&b.order))
                    .then_with(|| p.model_name(a.model).cmp(p.model_name(b.model)))
            });
        }
        attempts.extend(cands.iter().map(|c| c.model));
    }
    for &m in route.fallbacks.iter() {
        if keep(m) && !seen.contains(m) {
            seen.insert(m);
            attempts.push(m);
        }
    }

    // Layer 4: budget, then open breakers last.
    match s.budget_action() {
        Some(BudgetAction::Block) => {
            tr.budget(BudgetAction::Block);
            d.outcome = Err(Denial::BudgetBlocked);
            return d;
        }
        Some(BudgetAction::ConfirmPremium) if !r.confirmed => {
            tr.budget(BudgetAction::ConfirmPremium);
            tr.premium_held();
            if let Err(e) = without_premium(p, explicit, &mut attempts) {
                d.outcome = Err(e);
                return d;
            }
        }
        Some(BudgetAction::Downgrade) => {
            tr.budget(BudgetAction::Downgrade);
            if route.downgrade.is_empty() {
                // Only models cheaper than the primary; if it is already the
                // cheapest, the cheapest ones stay.
                let costs = |m: &ModelId| estimate_cost(p, *m, r);
                let primary = attempts.first().map(costs).unwrap_or(0);
                let min = attempts.iter().map(costs).min().unwrap_or(0);
                let limit = if min < primary { primary - 1 } else { min };
                attempts.retain(|m| costs(m) <= limit);
            } else {
                attempts.clear();
                let mut seen = ModelSet::empty(p.policy().models.len());
                for &m in route.downgrade.iter() {
                    if keep(m) && !seen.contains(m) {
                        seen.insert(m);
                        attempts.push(m);
                    }
                }
            }
            if s.premium_needs_confirmation() && !r.confirmed {
                tr.premium_held();
                if let Err(e) = without_premium(p, explicit, &mut attempts) {
                    d.outcome = Err(e);
                    return d;
                }
            }
        }
        Some(a) => tr.budget(a),
        None => {}
    }
    if attempts
        .iter()
        .any(|m| s.model(*m).breaker == BreakerState::Open)
    {
        // Stable partition: the open ones keep their relative order at the end.
        let open = attempts
            .iter()
            .filter(|m| s.model(**m).breaker == BreakerState::Open)
            .count();
        let mut moved = 0;
        let mut i = 0;
        while i + moved < attempts.len() && moved < open {
            if attempts
                .get(i)
                .is_some_and(|m| s.model(*m).breaker == BreakerState::Open)
            {
                let m = attempts.remove(i);
                attempts.push(m);
                moved += 1;
            } else {
                i += 1;
            }
        }
    }
    if attempts.is_empty() {
        d.outcome = Err(Denial::NoModelAvailable {
            intent,
            endpoint: r.endpoint,
        });
        return d;
    }
    d.estimated_cost = attempts.first().map_or(0, |m| estimate_cost(p, *m, r));
    d.attempts = attempts;
    d
}

/// Premium models leave the attempts until the client confirms; a premium
/// model the client named, or nothing left, needs the confirmation. A named
/// model a downgrade already replaced is not asked about: confirming it
/// would not bring it back.
fn without_premium(
    p: &CompiledPolicy,
    explicit: Option<ModelId>,
    attempts: &mut Vec<ModelId>,
) -> Result<(), Denial> {
    if explicit.is_some_and(|m| p.premium.contains(m) && attempts.contains(&m)) {
        return Err(Denial::ConfirmationRequired);
    }
    attempts.retain(|m| !p.premium.contains(*m));
    if attempts.is_empty() {
        return Err(Denial::ConfirmationRequired);
    }
    Ok(())
}

/// Fills every candidate's normalised signals and score.
fn score(p: &CompiledPolicy, weights: [f64; 6], cands: &mut [Cand]) {
    let min_cost = cands.iter().map(|c| c.cost).min().unwrap_or(0);
    let fastest = |f: fn(&ModelStats) -> Option<f64>| {
        cands
            .iter()
            .filter_map(|c| f(&c.stats))
            .filter(|x| *x >= 0.0)
            .reduce(f64::min)
    };
    let latency = |s: &ModelStats| s.latency_ms;
    let first_token = |s: &ModelStats| s.first_token_ms;
    let (best_lat, best_ft) = (fastest(latency), fastest(first_token));
    let ratio = |best: Option<f64>, this: Option<f64>| match (best, this) {
        (Some(b), Some(t)) if t > 0.0 => (b / t).clamp(0.0, 1.0),
        (Some(_), Some(_)) => 1.0,
        _ => 0.5,
    };
    for c in cands.iter_mut() {
        for (i, sig) in SIGNALS.iter().enumerate() {
            let v = match sig {
                Signal::Price => {
                    if c.cost == 0 {
                        1.0
                    } else {
                        min_cost as f64 / c.cost as f64
                    }
                }
                Signal::Latency => ratio(best_lat, c.stats.latency_ms),
                Signal::FirstToken => ratio(best_ft, c.stats.first_token_ms),
                Signal::Success => c.stats.success_rate.map_or(0.5, |x| {
                    if x.is_nan() {
                        0.5
                    } else {
                        x.clamp(0.0, 1.0)
                    }
                }),
                Signal::Quality => p.policy().model(c.model).map_or(0.0, |m| m.quality),
                Signal::Health => match c.stats.breaker {
                    BreakerState::Closed => 1.0,
                    BreakerState::HalfOpen => 0.5,
                    BreakerState::Open => 0.0,
                },
            };
            if let Some(x) = c.signals.get_mut(i) {
                *x = v;
            }
        }
        c.score = c
            .signals
            .iter()
            .zip(weights.iter())
            .map(|(s, w)| s * w)
            .sum();
    }
}

mod explain;
pub use explain::{explain, Trace};

#[doc(hidden)]
pub mod testkit;

#[cfg(test)]
mod tests;
