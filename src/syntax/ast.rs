//! The abstract syntax tree: what the user wrote, with a span on every node.
//!
//! The AST keeps the user's words (names are strings, quantities keep their
//! text); resolving names, types and units is the job of `lower`.

use crate::source::{FileId, Span};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A comment, kept for the formatter. `text` includes the leading `//`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comment {
    pub text: String,
    pub span: Span,
}

/// One parsed file.
#[derive(Clone, Debug, PartialEq)]
pub struct FileAst {
    pub file: FileId,
    pub items: Vec<Item>,
    pub comments: Vec<Comment>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Schema(SchemaDecl),
    Provider(ProviderDecl),
    Model(ModelDecl),
    Constraints(ConstraintsBlock),
    Classify(ClassifyBlock),
    Route(RouteDecl),
    Protect(ProtectBlock),
}

impl Item {
    pub fn span(&self) -> Span {
        match self {
            Item::Schema(x) => x.span,
            Item::Provider(x) => x.span,
            Item::Model(x) => x.span,
            Item::Constraints(x) => x.span,
            Item::Classify(x) => x.span,
            Item::Route(x) => x.span,
            Item::Protect(x) => x.span,
        }
    }
}

// ------------------------------------------------------------------ literals

/// A number as written, with optional `$`, unit and `/unit`: `$0.15`, `128k`,
/// `200ms`, `80%`, `600/min`.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantity {
    /// The exact source text (the formatter prints it back unchanged).
    pub text: String,
    pub money: bool,
    pub value: f64,
    /// The suffix after the number: "", "k", "M", "ms", "s", "min", "%", ...
    pub unit: String,
    /// The unit after a `/`, for rates: `600/min` has `per = Some("min")`.
    pub per: Option<String>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    /// A string with escapes resolved.
    Str(String, Span),
    /// A regex, the text between the slashes.
    Regex(String, Span),
    Bool(bool, Span),
    Quantity(Quantity),
    /// A bare word: an enum variant, a model name, ...
    Name(Ident),
    List(Vec<Literal>, Span),
}

impl Literal {
    pub fn span(&self) -> Span {
        match self {
            Literal::Str(_, s)
            | Literal::Regex(_, s)
            | Literal::Bool(_, s)
            | Literal::List(_, s) => *s,
            Literal::Quantity(q) => q.span,
            Literal::Name(i) => i.span,
        }
    }
}

// ------------------------------------------------------------------ schemas

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchemaScope {
    Tenant,
    Request,
}

/// `tenant { ... }` or `request { ... }`.
#[derive(Clone, Debug, PartialEq)]
pub struct SchemaDecl {
    pub scope: SchemaScope,
    pub attrs: Vec<AttrDecl>,
    pub span: Span,
}

/// `plan: enum(free, pro) = free`
#[derive(Clone, Debug, PartialEq)]
pub struct AttrDecl {
    pub name: Ident,
    pub ty: TypeExpr,
    pub default: Option<Literal>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TypeExpr {
    Bool(Span),
    String(Span),
    Number(Span),
    Enum(Vec<Ident>, Span),
    List(Box<TypeExpr>, Span),
}

impl TypeExpr {
    pub fn span(&self) -> Span {
        match self {
            TypeExpr::Bool(s)
            | TypeExpr::String(s)
            | TypeExpr::Number(s)
            | TypeExpr::Enum(_, s)
            | TypeExpr::List(_, s) => *s,
        }
    }
}

// ------------------------------------------------------------------ catalogue

#[derive(Clone, Debug, PartialEq)]
pub struct ProviderDecl {
    pub name: Ident,
    pub props: Vec<Prop>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelDecl {
    pub name: Ident,
    pub props: Vec<Prop>,
    pub span: Span,
}

/// One property of a provider or model.
#[derive(Clone, Debug, PartialEq)]
pub struct Prop {
    pub kind: PropKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PropKind {
    Provider(Ident),
    Kind(Ident),
    Context(Quantity),
    MaxOutput(Quantity),
    Price(Price),
    Caps(Vec<Ident>),
    Region(Ident),
    Tier(Ident),
    Quality(Quantity),
    Tokenizer(Ident),
    /// `enabled` (true) or `disabled` (false).
    Enabled(bool),
    Labels(Vec<Ident>),
}

impl PropKind {
    /// The keyword that introduces this property, for messages.
    pub fn keyword(&self) -> &'static str {
        match self {
            PropKind::Provider(_) => "provider",
            PropKind::Kind(_) => "kind",
            PropKind::Context(_) => "context",
            PropKind::MaxOutput(_) => "max_output",
            PropKind::Price(_) => "price",
            PropKind::Caps(_) => "caps",
            PropKind::Region(_) => "region",
            PropKind::Tier(_) => "tier",
            PropKind::Quality(_) => "quality",
            PropKind::Tokenizer(_) => "tokenizer",
            PropKind::Enabled(_) => "enabled",
            PropKind::Labels(_) => "labels",
        }
    }
}

/// `price in $0.15 out $0.60 per 1M` or `price $0.04 per image`.
#[derive(Clone, Debug, PartialEq)]
pub enum Price {
    InOut {
        input: Quantity,
        output: Quantity,
        per: PricePer,
    },
    Flat {
        amount: Quantity,
        per: PricePer,
    },
}

/// What a price is per: a token count (`1M`, `1k`) or a unit word (`image`, `second`).
#[derive(Clone, Debug, PartialEq)]
pub enum PricePer {
    Tokens(Quantity),
    Unit(Ident),
}

// ------------------------------------------------------------------ conditions

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Or(Vec<Expr>, Span),
    And(Vec<Expr>, Span),
    Not(Box<Expr>, Span),
    /// A parenthesised expression, kept so the formatter can print it back.
    Paren(Box<Expr>, Span),
    Test(Test),
}

impl Expr {
    pub fn span(&self) -> Span {
        match self {
            Expr::Or(_, s) | Expr::And(_, s) | Expr::Not(_, s) | Expr::Paren(_, s) => *s,
            Expr::Test(t) => t.span,
        }
    }
}

/// `scope.field`, for example `tenant.plan` or `model.caps`.
#[derive(Clone, Debug, PartialEq)]
pub struct Path {
    pub scope: PathScope,
    pub field: Ident,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathScope {
    Tenant,
    Request,
    Model,
    Provider,
}

impl PathScope {
    pub fn as_str(self) -> &'static str {
        match self {
            PathScope::Tenant => "tenant",
            PathScope::Request => "request",
            PathScope::Model => "model",
            PathScope::Provider => "provider",
        }
    }
}

/// A path with an optional operator. A bare path is a boolean test.
#[derive(Clone, Debug, PartialEq)]
pub struct Test {
    pub path: Path,
    pub op: Option<TestOp>,
    pub span: Span,
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

impl CmpOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum TestOp {
    Cmp(CmpOp, Literal),
    /// `in [..]`, or `not in [..]` when `negated`.
    In {
        negated: bool,
        list: Vec<Literal>,
        span: Span,
    },
    Has(Literal),
    /// `matches /re/` or `matches "re"`: the argument is a `Literal::Regex` or `Literal::Str`.
    Matches(Literal),
    /// `contains "word"` or `contains ["a", "b"]` (any of them).
    Contains(Literal),
}

// ------------------------------------------------------------------ layer 1

#[derive(Clone, Debug, PartialEq)]
pub struct ConstraintsBlock {
    pub rules: Vec<Constraint>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Constraint {
    /// `eu_only: deny ...`: the name used in denials and explanations.
    pub label: Option<Ident>,
    pub effect: Effect,
    pub when: Option<Expr>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    Deny(Target),
    AllowOnly(Target),
    /// `require <model condition>`: models that fail the condition are removed.
    Require(Expr),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// `provider x` / `providers [x, y]`
    Providers(Vec<Ident>, Span),
    /// `model x` / `models [x, y]` / `[x, y]`
    Models(Vec<Ident>, Span),
    /// `models where <model condition>`
    Where(Expr, Span),
}

// ------------------------------------------------------------------ layer 2

#[derive(Clone, Debug, PartialEq)]
pub struct ClassifyBlock {
    pub rules: Vec<ClassifyRule>,
    pub span: Span,
}

/// `intent when cond` or `intent otherwise` (`when` is `None`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifyRule {
    pub intent: Ident,
    pub when: Option<Expr>,
    pub span: Span,
}

// ------------------------------------------------------------------ layer 3

/// `route intent [when cond] { ... }`
#[derive(Clone, Debug, PartialEq)]
pub struct RouteDecl {
    pub intent: Ident,
    pub when: Option<Expr>,
    pub props: Vec<RouteProp>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteProp {
    pub kind: RoutePropKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RoutePropKind {
    Candidates(Vec<Ident>),
    Score(Vec<ScoreTerm>),
    PremiumOnly(Expr),
    Fallback(Vec<FallbackItem>),
    Downgrade(Vec<Ident>),
}

impl RoutePropKind {
    pub fn keyword(&self) -> &'static str {
        match self {
            RoutePropKind::Candidates(_) => "candidates",
            RoutePropKind::Score(_) => "score",
            RoutePropKind::PremiumOnly(_) => "premium only",
            RoutePropKind::Fallback(_) => "fallback",
            RoutePropKind::Downgrade(_) => "downgrade",
        }
    }
}

/// `0.5 * price`; `negative` for a term after `-`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreTerm {
    pub negative: bool,
    pub weight: Quantity,
    pub signal: Ident,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FallbackItem {
    Model(Ident),
    /// `route chat`: the models of another intent's route.
    Route(Ident),
}

// ------------------------------------------------------------------ layer 4

#[derive(Clone, Debug, PartialEq)]
pub struct ProtectBlock {
    pub rules: Vec<ProtectRule>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProtectRule {
    pub kind: ProtectKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ProtectKind {
    /// `retry 2 on [429, 5xx, timeout] backoff 200ms..2s`
    Retry {
        count: Quantity,
        on: Vec<Ident>,
        backoff: Option<(Quantity, Quantity)>,
    },
    /// `timeout first_token 10s total 120s` (each part optional, at least one)
    Timeout {
        parts: Vec<(Ident, Quantity)>,
    },
    /// `breaker per model open after 5 failures within 30s, probe after 15s`
    Breaker {
        scope: Ident,
        failures: Quantity,
        window: Quantity,
        cooldown: Quantity,
    },
    /// `limit concurrency 64 per model`, `limit rate 600/min per tenant`, `limit tokens 1M/min per tenant`
    Limit {
        kind: Ident,
        amount: Quantity,
        scope: Ident,
    },
    Budget(Budget),
}

/// `budget monthly per tenant $500 { warn at 80% ... }`
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub period: BudgetPeriod,
    /// One word (`tenant`, `feature`) or two joined by `and`.
    pub scope: Vec<Ident>,
    pub amount: BudgetAmount,
    pub thresholds: Vec<Threshold>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum BudgetPeriod {
    /// `daily`, `weekly`, `monthly`
    Named(Ident),
    /// `every 14d`
    Every(Quantity),
}

#[derive(Clone, Debug, PartialEq)]
pub enum BudgetAmount {
    Money(Quantity),
    /// A tenant attribute holding the amount in dollars: `tenant.monthly_budget`.
    Attr(Path),
}

/// `warn at 80%`, `confirm premium at 90%`, `downgrade at 95%`, `block at 100%`
#[derive(Clone, Debug, PartialEq)]
pub struct Threshold {
    /// The action word; `confirm premium` is stored as `confirm_premium`.
    pub action: Ident,
    pub at: Quantity,
    pub span: Span,
}
