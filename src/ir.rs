//! The typed intermediate representation: names resolved to ids, literals
//! typed and converted to units (micro-dollars, milliseconds, token counts).
//!
//! `lower` builds a [`Policy`] from the AST; `check` validates it; `compile`
//! turns a validated policy into a decision tree. Every element keeps the span
//! of the source that produced it, so decisions can point back to a line.
//!
//! Money is integer micro-dollars (`1_000_000` = $1), never floating point.

use crate::source::Span;

macro_rules! id_type {
    ($($name:ident),*) => {$(
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        pub struct $name(pub u32);
        impl $name {
            pub fn index(self) -> usize { self.0 as usize }
        }
    )*};
}
id_type!(ModelId, ProviderId, AttrId, IntentId, RouteId, ConstraintId);

/// Micro-dollars: 1_000_000 = $1.
pub type Micros = u64;

#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub tenant_attrs: Vec<AttrDef>,
    pub request_attrs: Vec<AttrDef>,
    pub providers: Vec<Provider>,
    pub models: Vec<Model>,
    /// Layer 1, in source order.
    pub constraints: Vec<Constraint>,
    /// Intents in order of first appearance in `classify`.
    pub intents: Vec<Intent>,
    /// Layer 2: ordered, first match wins. The last rule is the `otherwise` default
    /// once the policy is validated.
    pub classify: Vec<ClassifyRule>,
    /// Layer 3, in source order.
    pub routes: Vec<Route>,
    /// Layer 4.
    pub protect: Protect,
}

impl Policy {
    pub fn model(&self, id: ModelId) -> Option<&Model> {
        self.models.get(id.index())
    }
    pub fn provider(&self, id: ProviderId) -> Option<&Provider> {
        self.providers.get(id.index())
    }
    pub fn intent(&self, id: IntentId) -> Option<&Intent> {
        self.intents.get(id.index())
    }
    pub fn model_by_name(&self, name: &str) -> Option<ModelId> {
        self.models
            .iter()
            .position(|m| m.name == name)
            .map(|i| ModelId(i as u32))
    }
    pub fn intent_by_name(&self, name: &str) -> Option<IntentId> {
        self.intents
            .iter()
            .position(|m| m.name == name)
            .map(|i| IntentId(i as u32))
    }
    pub fn tenant_attr(&self, name: &str) -> Option<AttrId> {
        self.tenant_attrs
            .iter()
            .position(|a| a.name == name)
            .map(|i| AttrId(i as u32))
    }
    pub fn request_attr(&self, name: &str) -> Option<AttrId> {
        self.request_attrs
            .iter()
            .position(|a| a.name == name)
            .map(|i| AttrId(i as u32))
    }
    /// The routes for an intent, in source order (refined ones first is the
    /// caller's business: see `Route::when`).
    pub fn routes_for(&self, intent: IntentId) -> impl Iterator<Item = (RouteId, &Route)> {
        self.routes
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.intent == intent)
            .map(|(i, r)| (RouteId(i as u32), r))
    }
}

// ------------------------------------------------------------------ types and values

#[derive(Clone, Debug, PartialEq)]
pub enum Type {
    Bool,
    String,
    Number,
    /// The variant names, in declaration order; values are indexes into this list.
    Enum(Vec<String>),
    List(Box<Type>),
}

impl Type {
    pub fn describe(&self) -> String {
        match self {
            Type::Bool => "bool".into(),
            Type::String => "string".into(),
            Type::Number => "number".into(),
            Type::Enum(v) => format!("enum({})", v.join(", ")),
            Type::List(t) => format!("list({})", t.describe()),
        }
    }
    /// The values of a finite type (bool and enum), for enumerating tenant classes.
    pub fn finite_values(&self) -> Option<Vec<Value>> {
        match self {
            Type::Bool => Some(vec![Value::Bool(false), Value::Bool(true)]),
            Type::Enum(v) => Some((0..v.len()).map(|i| Value::Enum(i as u32)).collect()),
            _ => None,
        }
    }
}

/// A runtime value of a tenant or request attribute.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Number(f64),
    Str(String),
    /// Index into the attribute's enum variants.
    Enum(u32),
    List(Vec<Value>),
}

#[derive(Clone, Debug)]
pub struct AttrDef {
    pub name: String,
    pub ty: Type,
    pub default: Option<Value>,
    pub span: Span,
}

// ------------------------------------------------------------------ catalogue

#[derive(Clone, Debug)]
pub struct Provider {
    pub name: String,
    pub region: Option<String>,
    pub labels: Vec<String>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Chat,
    Embeddings,
    Image,
    Audio,
    Video,
}

impl ModelKind {
    pub const ALL: [(&'static str, ModelKind); 5] = [
        ("chat", ModelKind::Chat),
        ("embeddings", ModelKind::Embeddings),
        ("image", ModelKind::Image),
        ("audio", ModelKind::Audio),
        ("video", ModelKind::Video),
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Chat => "chat",
            ModelKind::Embeddings => "embeddings",
            ModelKind::Image => "image",
            ModelKind::Audio => "audio",
            ModelKind::Video => "video",
        }
    }

    /// Whether a model of this kind can answer requests to `e`: a chat request
    /// never goes to an embeddings model, whatever the scores say.
    pub fn serves(self, e: Endpoint) -> bool {
        matches!(
            (self, e),
            (ModelKind::Chat, Endpoint::Chat)
                | (ModelKind::Embeddings, Endpoint::Embeddings)
                | (ModelKind::Image, Endpoint::Images)
                | (
                    ModelKind::Audio,
                    Endpoint::AudioTranscription | Endpoint::AudioSpeech
                )
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Standard,
    Premium,
}

/// Prices in micro-dollars. Token prices are per 1M tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pricing {
    pub input_per_mtok: Micros,
    pub output_per_mtok: Micros,
    pub per_image: Micros,
    pub per_audio_second: Micros,
}

#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    pub provider: ProviderId,
    pub kind: ModelKind,
    /// Context window in tokens.
    pub context: u64,
    /// Output cap used for cost estimates when the request sets no `max_tokens`.
    pub max_output: Option<u64>,
    pub pricing: Pricing,
    pub caps: Vec<String>,
    /// The model's own region, or its provider's.
    pub region: Option<String>,
    pub tier: Tier,
    /// Offline quality score in [0, 1].
    pub quality: f64,
    /// Tokenizer family for estimates (`o200k`, `cl100k`, ...); `None` means the
    /// documented approximation.
    pub tokenizer: Option<String>,
    pub enabled: bool,
    pub labels: Vec<String>,
    pub span: Span,
    /// The span of the name, for labels that point at the declaration.
    pub name_span: Span,
}

// ------------------------------------------------------------------ conditions

/// A typed reference to something a condition can read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    TenantId,
    Tenant(AttrId),
    Request(RequestField),
    Model(ModelField),
}

/// Request features the gateway extracts from every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestField {
    /// enum [`Endpoint`]
    Endpoint,
    /// enum [`ResponseFormat`]
    ResponseFormat,
    HasTools,
    HasImages,
    Stream,
    InputTokens,
    MaxTokens,
    /// The feature tag (header `x-routeplane-feature`); a string unless the
    /// `request` schema declares `feature` with another type.
    Feature,
    /// The last user message, for `matches` and `contains`.
    Prompt,
    /// The model the client asked for (`auto` when none).
    Model,
    /// A declared request metadata attribute.
    Meta(AttrId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Chat,
    Embeddings,
    Images,
    AudioTranscription,
    AudioSpeech,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Chat,
        Endpoint::Embeddings,
        Endpoint::Images,
        Endpoint::AudioTranscription,
        Endpoint::AudioSpeech,
    ];
    pub const NAMES: [&'static str; 5] = [
        "chat",
        "embeddings",
        "images",
        "audio_transcription",
        "audio_speech",
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema,
}

impl ResponseFormat {
    pub const NAMES: [&'static str; 3] = ["text", "json_object", "json_schema"];
}

/// Static model attributes a `models where` / `require` condition can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelField {
    Name,
    Provider,
    Kind,
    Region,
    Tier,
    Caps,
    Labels,
    Context,
    Quality,
    PriceIn,
    PriceOut,
    Enabled,
    ProviderRegion,
    ProviderLabels,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A typed, name-resolved condition.
#[derive(Clone, Debug)]
pub enum Cond {
    True,
    False,
    Not(Box<Cond>),
    And(Vec<Cond>),
    Or(Vec<Cond>),
    /// A bool field.
    Bool(Field),
    Cmp(Field, CmpOp, Value),
    /// Membership of a scalar field in a literal set.
    In(Field, Vec<Value>),
    /// A list field contains the value.
    Has(Field, Value),
    /// A string field matches the regex.
    Matches(Field, RegexLit),
    /// A string field contains any of the words (case-insensitive).
    Contains(Field, Vec<String>),
}

/// A compiled regex that remembers its source, for explanations.
#[derive(Clone, Debug)]
pub struct RegexLit(pub regex::Regex);

impl Cond {
    /// Whether the condition reads the request (otherwise it depends on the
    /// tenant alone and can be resolved once per tenant).
    pub fn reads_request(&self) -> bool {
        match self {
            Cond::True | Cond::False => false,
            Cond::Not(c) => c.reads_request(),
            Cond::And(cs) | Cond::Or(cs) => cs.iter().any(Cond::reads_request),
            Cond::Bool(f)
            | Cond::Cmp(f, ..)
            | Cond::In(f, _)
            | Cond::Has(f, _)
            | Cond::Matches(f, _)
            | Cond::Contains(f, _) => {
                matches!(f, Field::Request(_))
            }
        }
    }
}

/// A condition with the span of its source text.
#[derive(Clone, Debug)]
pub struct When {
    pub cond: Cond,
    pub span: Span,
}

// ------------------------------------------------------------------ layer 1

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Deny,
    AllowOnly,
    Require,
}

/// Every constraint has one meaning: when `when` holds, the models in
/// `removes` leave the allowed set. `deny` removes its target; `allow only`
/// and `require` remove the complement of theirs. Layer 1 is the
/// intersection of what every firing rule keeps, so deny always wins.
#[derive(Clone, Debug)]
pub struct Constraint {
    /// The label (`eu_only: deny ...`) or a generated `constraints[N]`.
    pub name: String,
    pub effect: Effect,
    /// The models this rule removes when it fires (static: model attributes only).
    pub removes: Vec<ModelId>,
    /// `None` means always.
    pub when: Option<When>,
    pub span: Span,
}

// ------------------------------------------------------------------ layer 2

#[derive(Clone, Debug)]
pub struct Intent {
    pub name: String,
    /// The first classify rule that names it.
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct ClassifyRule {
    pub intent: IntentId,
    /// `None` for `otherwise`.
    pub when: Option<When>,
    pub span: Span,
}

// ------------------------------------------------------------------ layer 3

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Cheaper is better.
    Price,
    /// Lower total latency is better.
    Latency,
    /// Lower first-token latency is better.
    FirstToken,
    /// Recent success rate.
    Success,
    /// The catalogue's offline quality score.
    Quality,
    /// Breaker state: closed 1, half-open 0.5, open 0.
    Health,
}

impl Signal {
    pub const ALL: [(&'static str, Signal); 6] = [
        ("price", Signal::Price),
        ("latency", Signal::Latency),
        ("first_token", Signal::FirstToken),
        ("success", Signal::Success),
        ("quality", Signal::Quality),
        ("health", Signal::Health),
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Price => "price",
            Signal::Latency => "latency",
            Signal::FirstToken => "first_token",
            Signal::Success => "success",
            Signal::Quality => "quality",
            Signal::Health => "health",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Weight {
    pub signal: Signal,
    /// Negative for terms written after `-`.
    pub weight: f64,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FallbackTarget {
    Model(ModelId),
    Route(IntentId),
}

#[derive(Clone, Debug)]
pub struct Fallback {
    pub target: FallbackTarget,
    pub span: Span,
}

/// A model named in a route, with where it was named.
#[derive(Clone, Debug)]
pub struct ModelRef {
    pub model: ModelId,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Route {
    pub intent: IntentId,
    /// A refinement (`route chat when tenant.plan == enterprise`); `None` is the
    /// intent's default route. Refined routes are tried in source order first.
    pub when: Option<When>,
    pub candidates: Vec<ModelRef>,
    /// Empty means the documented default (quality then price).
    pub score: Vec<Weight>,
    /// Premium-tier candidates are only kept when this holds.
    pub premium_only: Option<When>,
    pub fallback: Vec<Fallback>,
    pub downgrade: Vec<ModelRef>,
    pub span: Span,
    /// The span of the intent name after `route`.
    pub name_span: Span,
}

// ------------------------------------------------------------------ layer 4

#[derive(Clone, Debug, Default)]
pub struct Protect {
    pub retry: Option<Retry>,
    pub timeout: Timeouts,
    pub breakers: Vec<Breaker>,
    pub limits: Vec<Limit>,
    pub budgets: Vec<Budget>,
}

/// What a retry may be triggered by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    Status(u16),
    /// `5xx`: the hundreds digit.
    StatusClass(u16),
    Timeout,
    Connect,
    Reset,
}

#[derive(Clone, Debug)]
pub struct Retry {
    pub count: u32,
    pub on: Vec<RetryOn>,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub span: Span,
}

#[derive(Clone, Debug, Default)]
pub struct Timeouts {
    pub first_token_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub span: Option<Span>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerScope {
    Model,
    Provider,
}

#[derive(Clone, Debug)]
pub struct Breaker {
    pub scope: BreakerScope,
    pub failures: u32,
    pub window_ms: u64,
    pub cooldown_ms: u64,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    Tenant,
    Feature,
    Model,
    Provider,
}

#[derive(Clone, Debug, PartialEq)]
pub enum LimitKind {
    Concurrency(u32),
    /// Requests per window.
    Rate {
        requests: u64,
        window_ms: u64,
    },
    /// Tokens per window.
    Tokens {
        tokens: u64,
        window_ms: u64,
    },
}

#[derive(Clone, Debug)]
pub struct Limit {
    pub kind: LimitKind,
    pub scope: LimitScope,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Daily,
    Weekly,
    Monthly,
    /// A fixed length from the Unix epoch, in milliseconds.
    Every(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScope {
    Tenant,
    Feature,
    TenantFeature,
}

#[derive(Clone, Debug, PartialEq)]
pub enum BudgetAmount {
    Fixed(Micros),
    /// A number-typed tenant attribute holding dollars.
    TenantAttr(AttrId),
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    Warn,
    ConfirmPremium,
    Downgrade,
    Block,
}

#[derive(Clone, Debug)]
pub struct Threshold {
    pub action: BudgetAction,
    /// Percent of the budget, 0..=100.
    pub percent: f64,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Budget {
    pub period: BudgetPeriod,
    pub scope: BudgetScope,
    pub amount: BudgetAmount,
    /// Sorted by percent.
    pub thresholds: Vec<Threshold>,
    pub span: Span,
}
