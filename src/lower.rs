//! AST to typed IR: every name resolved, every condition typed, every quantity
//! converted to its unit (micro-dollars, milliseconds, tokens, percent).
//!
//! Lowering never stops at the first error: an unknown name or a bad value is
//! an error diagnostic and lowering goes on with the rest, so one run reports
//! everything. A policy lowered with errors is a best effort for the editor and
//! is never compiled.
//!
//! Decisions the brief leaves open, taken the way a strict user would expect:
//! - Names are global across files. A second declaration of a model, provider,
//!   attribute or constraint label is `duplicate-name`; the first one wins.
//! - A `request { }` schema may declare `feature` (to give it a type) but no
//!   other built-in request field; `tenant { }` may not declare `id`.
//! - Capabilities are an open vocabulary on models, but `model.caps has x` must
//!   name a capability some model declares (`unknown-capability`), and
//!   `model.region` / `provider.region` values must be a region some provider
//!   or model declares (`unknown-variant`): a typo there would silently deny or
//!   allow everything.
//! - `model.name` / `model.provider` values must name declared models/providers.
//! - A model without `context` has `context == 0`, which means "unknown, not
//!   checked"; without `quality` it has `0.5` (neutral); `tier` defaults to
//!   standard; `region` to its provider's; `enabled` to true.
//! - `price $X per 1M` (flat, per tokens) is an input price with free output;
//!   `in`/`out` prices must be per tokens. `per minute` is stored per second.
//! - Number values accept plain numbers and `$` amounts (dollars); counts
//!   (`input_tokens`, `max_tokens`, `context`) accept `k`/`M`; `price_in` and
//!   `price_out` compare in dollars per 1M tokens.
//! - `contains` words are stored lowercase: the match is case-insensitive.
//! - A declared `request.feature` of enum type compares as `Value::Enum`; the
//!   built-in string `feature` compares as `Value::Str`.
//! - `retry N` without `on [..]` retries on 429, 5xx, timeout, connect and
//!   reset; without `backoff` it waits 100ms..1s.
//! - A route naming an intent that no `classify` rule produces is
//!   `unknown-intent` (intents are the names used in `classify`).
//! - Listing a model twice in one `candidates`/`fallback`/`downgrade` list is
//!   `duplicate-name`.

use std::collections::{BTreeSet, HashMap};

use crate::diag::{did_you_mean, Diagnostic};
use crate::ir::{
    self, Cond, Field, IntentId, ModelField, ModelId, ProviderId, RequestField, Type, Value,
};
use crate::source::Span;
use crate::syntax::ast::{self, Expr, FileAst, Item, Literal, Quantity};

/// The result of lowering: the IR, the diagnostics, and which declarations
/// were named somewhere (for the unused-declaration lints).
#[derive(Debug, Default)]
pub struct Lowered {
    pub policy: ir::Policy,
    pub diagnostics: Vec<Diagnostic>,
    pub usage: Usage,
}

/// Declarations referenced by name anywhere in the policy (routes, constraint
/// targets, conditions), indexed by id. The models of a provider named in a
/// constraint target count as used: blocking a vendor is deliberate. A
/// provider is used when a model or a constraint names it.
#[derive(Debug, Default, Clone)]
pub struct Usage {
    pub models: Vec<bool>,
    pub providers: Vec<bool>,
}

/// Lower all files of a policy (in the order given) into one IR.
pub fn lower(files: &[FileAst]) -> Lowered {
    let mut l = Lowerer::default();
    l.run(files);
    let usage = Usage {
        models: l.model_used,
        providers: l.provider_used,
    };
    Lowered {
        policy: l.p,
        diagnostics: l.diags,
        usage,
    }
}

/// Built-in request fields: name, field, type (enum variants are fixed).
fn builtin_request(name: &str) -> Option<(RequestField, Type, Unit)> {
    let names = |n: &[&str]| Type::Enum(n.iter().map(|s| (*s).to_string()).collect());
    Some(match name {
        "endpoint" => (
            RequestField::Endpoint,
            names(&ir::Endpoint::NAMES),
            Unit::Plain,
        ),
        "response_format" => (
            RequestField::ResponseFormat,
            names(&ir::ResponseFormat::NAMES),
            Unit::Plain,
        ),
        "has_tools" => (RequestField::HasTools, Type::Bool, Unit::Plain),
        "has_images" => (RequestField::HasImages, Type::Bool, Unit::Plain),
        "stream" => (RequestField::Stream, Type::Bool, Unit::Plain),
        "input_tokens" => (RequestField::InputTokens, Type::Number, Unit::Count),
        "max_tokens" => (RequestField::MaxTokens, Type::Number, Unit::Count),
        "feature" => (RequestField::Feature, Type::String, Unit::Plain),
        "prompt" => (RequestField::Prompt, Type::String, Unit::Plain),
        "model" => (RequestField::Model, Type::String, Unit::Plain),
        _ => return None,
    })
}

const BUILTIN_REQUEST: [&str; 10] = [
    "endpoint",
    "response_format",
    "has_tools",
    "has_images",
    "stream",
    "input_tokens",
    "max_tokens",
    "feature",
    "prompt",
    "model",
];
const MODEL_FIELDS: [&str; 12] = [
    "name",
    "provider",
    "kind",
    "region",
    "tier",
    "caps",
    "labels",
    "context",
    "quality",
    "price_in",
    "price_out",
    "enabled",
];
const PROVIDER_FIELDS: [&str; 2] = ["region", "labels"];
/// Tokenizer names `estimate::Tokenizer::from_name` knows.
const TOKENIZERS: [&str; 5] = ["o200k", "o200k_base", "cl100k", "cl100k_base", "approx"];
const TIERS: [&str; 2] = ["standard", "premium"];
const PRICE_UNITS: [&str; 3] = ["image", "second", "minute"];

/// How a number literal is read for a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    /// Plain number or `$` amount (dollars); `k`/`M` scale.
    Plain,
    /// Token counts: plain, `k`, `M`.
    Count,
    /// Dollars: plain or `$`.
    Money,
    /// A plain number only.
    Bare,
}

/// Which names a string value must come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vocab {
    Any,
    Models,
    Providers,
    Regions,
    Caps,
}

/// Where a condition is evaluated: per request (tenant and request fields)
/// or per model (model and provider fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Request,
    Model,
}

struct FieldInfo {
    field: Field,
    ty: Type,
    unit: Unit,
    vocab: Vocab,
}

#[derive(Default)]
struct Lowerer {
    p: ir::Policy,
    diags: Vec<Diagnostic>,
    models: HashMap<String, ModelId>,
    providers: HashMap<String, ProviderId>,
    intents: HashMap<String, IntentId>,
    caps: BTreeSet<String>,
    regions: BTreeSet<String>,
    labels: HashMap<String, Span>,
    model_used: Vec<bool>,
    provider_used: Vec<bool>,
    /// Lowering a model condition reads these; set while lowering one.
    protect_seen: HashMap<&'static str, Span>,
}

impl Lowerer {
    fn run(&mut self, files: &[FileAst]) {
        let items = || files.iter().flat_map(|f| f.items.iter());
        for item in items() {
            if let Item::Schema(s) = item {
                self.schema(s);
            }
        }
        for item in items() {
            if let Item::Provider(p) = item {
                self.provider(p);
            }
        }
        for item in items() {
            if let Item::Model(m) = item {
                self.model(m);
            }
        }
        self.model_used = vec![false; self.p.models.len()];
        self.provider_used = vec![false; self.p.providers.len()];
        for m in &self.p.models {
            if let Some(u) = self.provider_used.get_mut(m.provider.index()) {
                *u = true;
            }
        }
        for m in &self.p.models {
            self.caps.extend(m.caps.iter().cloned());
            self.regions.extend(m.region.iter().cloned());
        }
        for p in &self.p.providers {
            self.regions.extend(p.region.iter().cloned());
        }
        // Intents first, so routes and constraints may come in any file order.
        for item in items() {
            if let Item::Classify(c) = item {
                for r in &c.rules {
                    self.intent(&r.intent);
                }
            }
        }
        for item in items() {
            if let Item::Classify(c) = item {
                for r in &c.rules {
                    self.classify_rule(r);
                }
            }
        }
        let mut n = 0usize;
        for item in items() {
            if let Item::Constraints(c) = item {
                for r in &c.rules {
                    n += 1;
                    self.constraint(r, n);
                }
            }
        }
        for item in items() {
            if let Item::Route(r) = item {
                self.route(r);
            }
        }
        for item in items() {
            if let Item::Protect(b) = item {
                for r in &b.rules {
                    self.protect_rule(r);
                }
            }
        }
        self.p
            .protect
            .budgets
            .iter_mut()
            .for_each(|b| b.thresholds.sort_by(|a, b| a.percent.total_cmp(&b.percent)));
    }

    // ------------------------------------------------------------ diagnostics

    fn err(
        &mut self,
        code: &str,
        message: impl Into<String>,
        span: Span,
        label: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.diags.push(
            Diagnostic::error(code, message)
                .with_label(span, label)
                .with_help(help),
        );
    }

    /// An unknown name: `code` error with did-you-mean help and a replacement suggestion.
    fn unknown<'a>(
        &mut self,
        code: &str,
        what: &str,
        name: &str,
        span: Span,
        known: impl IntoIterator<Item = &'a str>,
        otherwise: &str,
    ) {
        let known: Vec<&str> = known.into_iter().collect();
        let mut d = Diagnostic::error(code, format!("unknown {what} `{name}`"))
            .with_label(span, format!("not a known {what}"));
        match did_you_mean(name, known.iter().copied()) {
            Some(s) => {
                d = d
                    .with_help(format!("did you mean `{s}`?"))
                    .with_suggestion(span, s);
            }
            None => {
                d = d.with_help(otherwise.to_string());
            }
        }
        self.diags.push(d);
    }

    fn duplicate(&mut self, what: &str, name: &str, span: Span, first: Span) {
        self.diags.push(
            Diagnostic::error(
                "duplicate-name",
                format!("{what} `{name}` is declared twice"),
            )
            .with_label(span, "declared again here")
            .with_label(first, "first declared here")
            .with_help(
                "rename or remove one of the two; names are global across all files of a policy",
            ),
        );
    }

    // ------------------------------------------------------------ schemas

    fn schema(&mut self, s: &ast::SchemaDecl) {
        for a in &s.attrs {
            let name = a.name.name.as_str();
            let (list, scope) = match s.scope {
                ast::SchemaScope::Tenant => (&self.p.tenant_attrs, "tenant"),
                ast::SchemaScope::Request => (&self.p.request_attrs, "request"),
            };
            if let Some(prev) = list.iter().find(|x| x.name == name) {
                let first = prev.span;
                self.duplicate(&format!("attribute `{scope}`"), name, a.name.span, first);
                continue;
            }
            let builtin = match s.scope {
                ast::SchemaScope::Tenant => name == "id",
                ast::SchemaScope::Request => name != "feature" && builtin_request(name).is_some(),
            };
            if builtin {
                self.err(
                    "duplicate-name",
                    format!("`{scope}.{name}` is a built-in field"),
                    a.name.span,
                    "already defined by routeplane",
                    format!("choose another name; `{scope}.{name}` can be used in conditions without declaring it"),
                );
                continue;
            }
            if let (ast::SchemaScope::Request, ast::TypeExpr::List(_, span)) = (s.scope, &a.ty) {
                // A client sends one string per attribute (a header or a
                // `metadata` string); a list could only ever hold its default.
                self.err(
                    "unsupported-type",
                    format!("`request.{name}` cannot be a list"),
                    *span,
                    "requests send one value per attribute",
                    "declare it as `string` or `enum(...)`; lists are for tenant attributes, set in the gateway config",
                );
                continue;
            }
            self.repeated_variants(&a.ty, &format!("{scope}.{name}"));
            let ty = lower_type(&a.ty);
            let default = match &a.default {
                Some(lit) => {
                    let unit = Unit::Plain;
                    self.value(lit, &ty, unit, Vocab::Any, &format!("{scope}.{name}"))
                }
                None => None,
            };
            let def = ir::AttrDef {
                name: name.to_string(),
                ty,
                default,
                span: a.name.span,
            };
            match s.scope {
                ast::SchemaScope::Tenant => self.p.tenant_attrs.push(def),
                ast::SchemaScope::Request => self.p.request_attrs.push(def),
            }
        }
    }

    // ------------------------------------------------------------ catalogue

    fn check_props(&mut self, props: &[ast::Prop], owner: &str) -> Vec<bool> {
        let mut seen: HashMap<&'static str, Span> = HashMap::new();
        let mut keep = Vec::with_capacity(props.len());
        for p in props {
            let kw = p.kind.keyword();
            if let Some(first) = seen.get(kw).copied() {
                self.diags.push(
                    Diagnostic::error("duplicate-property", format!("{owner} sets `{kw}` twice"))
                        .with_label(p.span, "set again here")
                        .with_label(first, "first set here")
                        .with_help("remove one of them; the first one is used"),
                );
                keep.push(false);
            } else {
                seen.insert(kw, p.span);
                keep.push(true);
            }
        }
        keep
    }

    fn provider(&mut self, d: &ast::ProviderDecl) {
        let name = &d.name.name;
        if let Some(&id) = self.providers.get(name) {
            let first = self.p.provider(id).map_or(d.name.span, |p| p.span);
            self.duplicate("provider", name, d.name.span, first);
            return;
        }
        let keep = self.check_props(&d.props, &format!("provider `{name}`"));
        let mut region = None;
        let mut labels = Vec::new();
        for (p, k) in d.props.iter().zip(keep) {
            if !k {
                continue;
            }
            match &p.kind {
                ast::PropKind::Region(r) => region = Some(r.name.clone()),
                ast::PropKind::Labels(ls) => labels = ls.iter().map(|l| l.name.clone()).collect(),
                other => self.err(
                    "unknown-word",
                    format!("providers have no `{}` property", other.keyword()),
                    p.span,
                    "not a provider property",
                    "a provider has `region` and `labels`; model properties go in `model name { ... }`",
                ),
            }
        }
        let id = ProviderId(self.p.providers.len() as u32);
        self.providers.insert(name.clone(), id);
        self.p.providers.push(ir::Provider {
            name: name.clone(),
            region,
            labels,
            span: d.name.span,
        });
    }

    fn model(&mut self, d: &ast::ModelDecl) {
        let name = &d.name.name;
        if let Some(&id) = self.models.get(name) {
            let first = self.p.model(id).map_or(d.name.span, |m| m.name_span);
            self.duplicate("model", name, d.name.span, first);
            return;
        }
        let owner = format!("model `{name}`");
        let keep = self.check_props(&d.props, &owner);
        let mut provider = None;
        let mut provider_seen = false;
        let mut kind = None;
        let mut kind_seen = false;
        let mut m = ir::Model {
            name: name.clone(),
            provider: ProviderId(0),
            kind: ir::ModelKind::Chat,
            context: 0,
            max_output: None,
            pricing: ir::Pricing::default(),
            caps: Vec::new(),
            region: None,
            tier: ir::Tier::Standard,
            quality: 0.5,
            tokenizer: None,
            enabled: true,
            labels: Vec::new(),
            span: d.span,
            name_span: d.name.span,
        };
        for (p, k) in d.props.iter().zip(keep) {
            if !k {
                continue;
            }
            match &p.kind {
                ast::PropKind::Provider(i) => {
                    provider_seen = true;
                    match self.providers.get(&i.name) {
                        Some(&id) => provider = Some(id),
                        None => {
                            let known: Vec<String> =
                                self.p.providers.iter().map(|p| p.name.clone()).collect();
                            self.unknown(
                                "unknown-provider",
                                "provider",
                                &i.name,
                                i.span,
                                known.iter().map(String::as_str),
                                &format!("declare it with `provider {} {{ region .. }}`", i.name),
                            );
                        }
                    }
                }
                ast::PropKind::Kind(i) => {
                    kind_seen = true;
                    match ir::ModelKind::ALL.iter().find(|(n, _)| *n == i.name) {
                        Some((_, k)) => kind = Some(*k),
                        None => self.unknown(
                            "unknown-kind",
                            "model kind",
                            &i.name,
                            i.span,
                            ir::ModelKind::ALL.iter().map(|(n, _)| *n),
                            "the kinds are chat, embeddings, image, audio and video",
                        ),
                    }
                }
                ast::PropKind::Context(q) => {
                    if let Some(n) = self.count(q, "a context window") {
                        m.context = n;
                    }
                }
                ast::PropKind::MaxOutput(q) => m.max_output = self.count(q, "an output token cap"),
                ast::PropKind::Price(pr) => self.price(pr, &mut m.pricing),
                ast::PropKind::Caps(cs) => m.caps = cs.iter().map(|c| c.name.clone()).collect(),
                ast::PropKind::Region(r) => m.region = Some(r.name.clone()),
                ast::PropKind::Tier(t) => match t.name.as_str() {
                    "standard" => m.tier = ir::Tier::Standard,
                    "premium" => m.tier = ir::Tier::Premium,
                    _ => self.unknown(
                        "unknown-word",
                        "tier",
                        &t.name,
                        t.span,
                        TIERS,
                        "the tiers are `standard` and `premium`",
                    ),
                },
                ast::PropKind::Quality(q) => {
                    if let Some(v) = self.bare(q, "a quality score") {
                        if (0.0..=1.0).contains(&v) {
                            m.quality = v;
                        } else {
                            self.err(
                                "invalid-range",
                                format!("quality `{}` is outside 0..1", q.text),
                                q.span,
                                "out of range",
                                "quality is an offline score between 0 and 1, for example `0.8`",
                            );
                        }
                    }
                }
                ast::PropKind::Tokenizer(t) => {
                    if TOKENIZERS.contains(&t.name.to_ascii_lowercase().as_str()) {
                        m.tokenizer = Some(t.name.clone());
                    } else {
                        // An unknown name would quietly count by characters.
                        self.unknown(
                            "unknown-word",
                            "tokenizer",
                            &t.name,
                            t.span,
                            TOKENIZERS,
                            "the tokenizers are `o200k` and `cl100k` (tiktoken's), and `approx` (characters / 4)",
                        );
                    }
                }
                ast::PropKind::Enabled(b) => m.enabled = *b,
                ast::PropKind::Labels(ls) => m.labels = ls.iter().map(|l| l.name.clone()).collect(),
            }
        }
        if !provider_seen {
            self.err(
                "missing-property",
                format!("model `{name}` has no provider"),
                d.name.span,
                "declared here",
                "add `provider <name>`; every model belongs to a declared provider",
            );
        }
        if !kind_seen {
            self.err(
                "missing-property",
                format!("model `{name}` has no kind"),
                d.name.span,
                "declared here",
                "add `kind chat` (or embeddings, image, audio, video)",
            );
        }
        // A model without a resolvable provider or kind is kept out of the IR:
        // every later use reports it as unknown only once here.
        let (Some(provider), Some(kind)) = (provider, kind) else {
            // Still register the name so uses do not cascade into unknown-model.
            self.models.insert(name.clone(), ModelId(u32::MAX));
            return;
        };
        m.provider = provider;
        m.kind = kind;
        if m.region.is_none() {
            m.region = self.p.provider(provider).and_then(|p| p.region.clone());
        }
        let id = ModelId(self.p.models.len() as u32);
        self.models.insert(name.clone(), id);
        self.p.models.push(m);
    }

    fn price(&mut self, pr: &ast::Price, out: &mut ir::Pricing) {
        match pr {
            ast::Price::InOut { input, output, per } => {
                let n = match per {
                    ast::PricePer::Tokens(n) => n,
                    ast::PricePer::Unit(u) if PRICE_UNITS.contains(&u.name.as_str()) => {
                        self.err(
                            "unit-mismatch",
                            "`in`/`out` prices are per tokens",
                            u.span,
                            "expected a token count",
                            "write `per 1M` or `per 1k`; use `price $0.04 per image` for a flat price",
                        );
                        return;
                    }
                    ast::PricePer::Unit(u) => {
                        self.err(
                            "unknown-word",
                            format!("unknown price unit `{}`", u.name),
                            u.span,
                            "not a price unit",
                            "token prices are `per 1M` or `per 1k` (a token count)",
                        );
                        return;
                    }
                };
                let Some(tokens) = self.count(n, "a token count") else {
                    return;
                };
                if tokens == 0 {
                    self.err(
                        "invalid-range",
                        "price per 0 tokens",
                        n.span,
                        "must be positive",
                        "write `per 1M` or `per 1k`",
                    );
                    return;
                }
                let scale = 1_000_000.0 / tokens as f64;
                if let Some(i) = self.money(input) {
                    out.input_per_mtok = micros(i * scale);
                }
                if let Some(o) = self.money(output) {
                    out.output_per_mtok = micros(o * scale);
                }
            }
            ast::Price::Flat { amount, per } => {
                let Some(dollars) = self.money(amount) else {
                    return;
                };
                match per {
                    ast::PricePer::Tokens(n) => {
                        let Some(tokens) = self.count(n, "a token count") else { return };
                        if tokens == 0 {
                            self.err("invalid-range", "price per 0 tokens", n.span, "must be positive", "write `per 1M` or `per 1k`");
                            return;
                        }
                        out.input_per_mtok = micros(dollars * 1_000_000.0 / tokens as f64);
                    }
                    ast::PricePer::Unit(u) => match u.name.as_str() {
                        "image" => out.per_image = micros(dollars),
                        "second" => out.per_audio_second = micros(dollars),
                        "minute" => out.per_audio_second = micros(dollars / 60.0),
                        _ => self.unknown(
                            "unknown-word",
                            "price unit",
                            &u.name,
                            u.span,
                            ["image", "second", "minute"],
                            "prices are `per 1M` / `per 1k` tokens, `per image`, `per second` or `per minute`",
                        ),
                    },
                }
            }
        }
    }

    // ------------------------------------------------------------ quantities

    fn unit_err(&mut self, q: &Quantity, expected: &str, example: &str) {
        self.err(
            "unit-mismatch",
            format!("expected {expected}, found `{}`", q.text),
            q.span,
            format!("expected {expected}"),
            format!("write it like `{example}`"),
        );
    }

    fn negative(&mut self, q: &Quantity, what: &str) -> bool {
        if q.value < 0.0 {
            self.err(
                "invalid-range",
                format!("{what} cannot be negative"),
                q.span,
                "negative",
                "use a value of 0 or more",
            );
            return true;
        }
        false
    }

    /// A dollar amount: `$0.15` or `0.15`.
    fn money(&mut self, q: &Quantity) -> Option<f64> {
        if !q.unit.is_empty() || q.per.is_some() {
            self.unit_err(q, "a dollar amount", "$0.15");
            return None;
        }
        if self.negative(q, "a price") {
            return None;
        }
        Some(q.value)
    }

    /// A token count: `128k`, `1M`, `4000`.
    fn count(&mut self, q: &Quantity, what: &str) -> Option<u64> {
        let v = self.count_f(q, what)?;
        if self.negative(q, what) {
            return None;
        }
        if v.fract() != 0.0 {
            self.err(
                "invalid-range",
                format!("`{}` is not a whole number", q.text),
                q.span,
                "not whole",
                "counts are whole numbers",
            );
            return None;
        }
        Some(v as u64)
    }

    fn count_f(&mut self, q: &Quantity, what: &str) -> Option<f64> {
        let mult = match q.unit.as_str() {
            "" => 1.0,
            "k" => 1_000.0,
            "M" => 1_000_000.0,
            _ => {
                self.unit_err(q, what, "128k");
                return None;
            }
        };
        if q.money || q.per.is_some() {
            self.unit_err(q, what, "128k");
            return None;
        }
        Some(q.value * mult)
    }

    /// A plain number without unit.
    fn bare(&mut self, q: &Quantity, what: &str) -> Option<f64> {
        if q.money || !q.unit.is_empty() || q.per.is_some() {
            self.unit_err(q, &format!("{what} without a unit"), "0.8");
            return None;
        }
        Some(q.value)
    }

    /// A whole number without unit.
    fn whole(&mut self, q: &Quantity, what: &str) -> Option<u64> {
        let v = self.bare(q, what)?;
        if v < 0.0 || v.fract() != 0.0 {
            self.err(
                "invalid-range",
                format!(
                    "{what} must be a whole number of 0 or more, found `{}`",
                    q.text
                ),
                q.span,
                "not a whole number",
                "write it like `3`",
            );
            return None;
        }
        Some(v as u64)
    }

    /// A duration in milliseconds: `200ms`, `2s`, `5min`, `1h`, `1d`.
    fn duration(&mut self, q: &Quantity) -> Option<u64> {
        let mult = match q.unit.as_str() {
            "ms" => 1.0,
            "s" => 1_000.0,
            "min" => 60_000.0,
            "h" => 3_600_000.0,
            "d" => 86_400_000.0,
            _ => {
                self.unit_err(q, "a duration", "200ms` or `30s");
                return None;
            }
        };
        if q.money || q.per.is_some() {
            self.unit_err(q, "a duration", "200ms` or `30s");
            return None;
        }
        if self.negative(q, "a duration") {
            return None;
        }
        Some((q.value * mult).round() as u64)
    }

    /// A percentage 0..=100: `80%`.
    fn percent(&mut self, q: &Quantity) -> Option<f64> {
        if q.unit != "%" || q.money || q.per.is_some() {
            self.unit_err(q, "a percentage", "80%");
            return None;
        }
        if !(0.0..=100.0).contains(&q.value) {
            self.err(
                "invalid-range",
                format!("`{}` is outside 0%..100%", q.text),
                q.span,
                "out of range",
                "a threshold is a share of the budget, between 0% and 100%",
            );
            return None;
        }
        Some(q.value)
    }

    /// A rate: `600/min` -> (600, 60_000 ms). Token rates may use `k`/`M`.
    fn rate(&mut self, q: &Quantity, what: &str) -> Option<(u64, u64)> {
        let window = match q.per.as_deref() {
            Some("s") => 1_000,
            Some("min") => 60_000,
            Some("h") => 3_600_000,
            Some("d") => 86_400_000,
            _ => {
                self.unit_err(q, &format!("{what} per window"), "600/min");
                return None;
            }
        };
        let mult = match q.unit.as_str() {
            "" => 1.0,
            "k" => 1_000.0,
            "M" => 1_000_000.0,
            _ => {
                self.unit_err(q, &format!("{what} per window"), "600/min");
                return None;
            }
        };
        if q.money {
            self.unit_err(q, &format!("{what} per window"), "600/min");
            return None;
        }
        if q.value <= 0.0 || (q.value * mult).fract() != 0.0 {
            self.err(
                "invalid-range",
                format!("`{}` must be a positive whole rate", q.text),
                q.span,
                "out of range",
                "write it like `600/min`",
            );
            return None;
        }
        Some(((q.value * mult) as u64, window))
    }

    // ------------------------------------------------------------ conditions

    fn cond(&mut self, e: &Expr, scope: Scope) -> Cond {
        match e {
            Expr::Or(xs, _) => Cond::Or(xs.iter().map(|x| self.cond(x, scope)).collect()),
            Expr::And(xs, _) => Cond::And(xs.iter().map(|x| self.cond(x, scope)).collect()),
            Expr::Not(x, _) => Cond::Not(Box::new(self.cond(x, scope))),
            Expr::Paren(x, _) => self.cond(x, scope),
            Expr::Test(t) => self.test(t, scope).unwrap_or(Cond::False),
        }
    }

    fn when(&mut self, e: &Expr) -> ir::When {
        ir::When {
            cond: self.cond(e, Scope::Request),
            span: e.span(),
        }
    }

    fn field(&mut self, path: &ast::Path, scope: Scope) -> Option<FieldInfo> {
        let name = path.field.name.as_str();
        let full = format!("{}.{}", path.scope.as_str(), name);
        let wrong = match (scope, path.scope) {
            (Scope::Request, ast::PathScope::Model | ast::PathScope::Provider) => {
                Some("model and provider fields can only be read in `models where` and `require` conditions")
            }
            (Scope::Model, ast::PathScope::Tenant | ast::PathScope::Request) => Some(
                "`models where` and `require` select models by their static attributes; to depend on the tenant or request, add `when ...` to the rule",
            ),
            _ => None,
        };
        if let Some(help) = wrong {
            self.err(
                "wrong-scope",
                format!("`{full}` cannot be read here"),
                path.span,
                "not available in this condition",
                help,
            );
            return None;
        }
        let info = |field, ty, unit, vocab| {
            Some(FieldInfo {
                field,
                ty,
                unit,
                vocab,
            })
        };
        let strs = |v: &[&str]| Type::Enum(v.iter().map(|s| (*s).to_string()).collect());
        match path.scope {
            ast::PathScope::Tenant => {
                if name == "id" {
                    return info(Field::TenantId, Type::String, Unit::Plain, Vocab::Any);
                }
                if let Some(id) = self.p.tenant_attr(name) {
                    let ty = self
                        .p
                        .tenant_attrs
                        .get(id.index())
                        .map_or(Type::String, |a| a.ty.clone());
                    return info(Field::Tenant(id), ty, Unit::Plain, Vocab::Any);
                }
                let known: Vec<String> = std::iter::once("id".to_string())
                    .chain(self.p.tenant_attrs.iter().map(|a| a.name.clone()))
                    .collect();
                self.unknown(
                    "unknown-attribute",
                    "tenant attribute",
                    name,
                    path.field.span,
                    known.iter().map(String::as_str),
                    &format!("declare it in `tenant {{ {name}: ... }}`"),
                );
                None
            }
            ast::PathScope::Request => {
                if let Some((f, mut ty, unit)) = builtin_request(name) {
                    if name == "feature" {
                        if let Some(id) = self.p.request_attr(name) {
                            ty = self
                                .p
                                .request_attrs
                                .get(id.index())
                                .map_or(ty, |a| a.ty.clone());
                        }
                    }
                    return info(Field::Request(f), ty, unit, Vocab::Any);
                }
                if let Some(id) = self.p.request_attr(name) {
                    let ty = self
                        .p
                        .request_attrs
                        .get(id.index())
                        .map_or(Type::String, |a| a.ty.clone());
                    return info(
                        Field::Request(RequestField::Meta(id)),
                        ty,
                        Unit::Plain,
                        Vocab::Any,
                    );
                }
                let known: Vec<String> = BUILTIN_REQUEST
                    .iter()
                    .map(|s| (*s).to_string())
                    .chain(self.p.request_attrs.iter().map(|a| a.name.clone()))
                    .collect();
                self.unknown(
                    "unknown-attribute",
                    "request attribute",
                    name,
                    path.field.span,
                    known.iter().map(String::as_str),
                    &format!("declare request metadata in `request {{ {name}: ... }}`"),
                );
                None
            }
            ast::PathScope::Model => {
                let list = |t| Type::List(Box::new(t));
                let kinds: Vec<&str> = ir::ModelKind::ALL.iter().map(|(n, _)| *n).collect();
                let (f, ty, unit, vocab) = match name {
                    "name" => (ModelField::Name, Type::String, Unit::Plain, Vocab::Models),
                    "provider" => (
                        ModelField::Provider,
                        Type::String,
                        Unit::Plain,
                        Vocab::Providers,
                    ),
                    "kind" => (ModelField::Kind, strs(&kinds), Unit::Plain, Vocab::Any),
                    "region" => (
                        ModelField::Region,
                        Type::String,
                        Unit::Plain,
                        Vocab::Regions,
                    ),
                    "tier" => (ModelField::Tier, strs(&TIERS), Unit::Plain, Vocab::Any),
                    "caps" => (
                        ModelField::Caps,
                        list(Type::String),
                        Unit::Plain,
                        Vocab::Caps,
                    ),
                    "labels" => (
                        ModelField::Labels,
                        list(Type::String),
                        Unit::Plain,
                        Vocab::Any,
                    ),
                    "context" => (ModelField::Context, Type::Number, Unit::Count, Vocab::Any),
                    "quality" => (ModelField::Quality, Type::Number, Unit::Bare, Vocab::Any),
                    "price_in" => (ModelField::PriceIn, Type::Number, Unit::Money, Vocab::Any),
                    "price_out" => (ModelField::PriceOut, Type::Number, Unit::Money, Vocab::Any),
                    "enabled" => (ModelField::Enabled, Type::Bool, Unit::Plain, Vocab::Any),
                    _ => {
                        self.unknown(
                            "unknown-attribute",
                            "model field",
                            name,
                            path.field.span,
                            MODEL_FIELDS,
                            "model conditions read name, provider, kind, region, tier, caps, labels, context, quality, price_in, price_out and enabled",
                        );
                        return None;
                    }
                };
                info(Field::Model(f), ty, unit, vocab)
            }
            ast::PathScope::Provider => {
                let (f, ty, vocab) = match name {
                    "region" => (ModelField::ProviderRegion, Type::String, Vocab::Regions),
                    "labels" => (
                        ModelField::ProviderLabels,
                        Type::List(Box::new(Type::String)),
                        Vocab::Any,
                    ),
                    _ => {
                        self.unknown(
                            "unknown-attribute",
                            "provider field",
                            name,
                            path.field.span,
                            PROVIDER_FIELDS,
                            "provider conditions read `provider.region` and `provider.labels`",
                        );
                        return None;
                    }
                };
                info(Field::Model(f), ty, Unit::Plain, vocab)
            }
        }
    }

    fn mismatch(&mut self, path: &ast::Path, ty: &Type, span: Span, what: &str, help: &str) {
        let full = format!("{}.{}", path.scope.as_str(), path.field.name);
        self.err(
            "type-mismatch",
            format!("`{full}` is {}, {what}", describe(ty)),
            span,
            format!("`{full}` is {}", describe(ty)),
            help,
        );
    }

    fn test(&mut self, t: &ast::Test, scope: Scope) -> Option<Cond> {
        let fi = self.field(&t.path, scope)?;
        let full = PathName(&t.path);
        let f = fi.field.clone();
        match &t.op {
            None => {
                if fi.ty != Type::Bool {
                    self.mismatch(
                        &t.path,
                        &fi.ty,
                        t.span,
                        "not a condition on its own",
                        "compare it with a value, for example `== x`",
                    );
                    return None;
                }
                Some(Cond::Bool(f))
            }
            Some(ast::TestOp::Cmp(op, lit)) => {
                let op = lower_cmp(*op);
                if matches!(fi.ty, Type::List(_)) {
                    self.mismatch(
                        &t.path,
                        &fi.ty,
                        t.span,
                        "it cannot be compared",
                        &format!("test membership with `{full} has x`"),
                    );
                    return None;
                }
                let ordering = !matches!(op, ir::CmpOp::Eq | ir::CmpOp::Ne);
                if ordering && fi.ty != Type::Number {
                    self.mismatch(
                        &t.path,
                        &fi.ty,
                        t.span,
                        "it has no order",
                        "use `==`, `!=` or `in [..]`",
                    );
                    return None;
                }
                let v = self.value(lit, &fi.ty, fi.unit, fi.vocab, &full)?;
                Some(Cond::Cmp(f, op, v))
            }
            Some(ast::TestOp::In {
                negated,
                list,
                span,
            }) => {
                if matches!(fi.ty, Type::List(_)) {
                    self.mismatch(
                        &t.path,
                        &fi.ty,
                        *span,
                        "it cannot be tested with `in`",
                        &format!("test membership with `{full} has x`"),
                    );
                    return None;
                }
                let mut vs = Vec::new();
                let mut ok = true;
                for lit in list {
                    match self.value(lit, &fi.ty, fi.unit, fi.vocab, &full) {
                        Some(v) => vs.push(v),
                        None => ok = false,
                    }
                }
                if !ok {
                    return None;
                }
                let c = Cond::In(f, vs);
                Some(if *negated { Cond::Not(Box::new(c)) } else { c })
            }
            Some(ast::TestOp::Has(lit)) => {
                let Type::List(elem) = &fi.ty else {
                    self.mismatch(
                        &t.path,
                        &fi.ty,
                        t.span,
                        "not a list",
                        "use `==` or `in [..]`",
                    );
                    return None;
                };
                let v = self.value(lit, elem, fi.unit, fi.vocab, &full)?;
                Some(Cond::Has(f, v))
            }
            Some(ast::TestOp::Matches(lit)) => {
                if fi.ty != Type::String {
                    self.mismatch(
                        &t.path,
                        &fi.ty,
                        t.span,
                        "it cannot be matched",
                        "`matches` works on string fields such as `request.prompt`",
                    );
                    return None;
                }
                let (Literal::Regex(re, span) | Literal::Str(re, span)) = lit else {
                    return None;
                };
                match regex::RegexBuilder::new(re).size_limit(1 << 20).build() {
                    Ok(r) => Some(Cond::Matches(f, ir::RegexLit(r))),
                    Err(e) => {
                        let msg = e.to_string();
                        let last = msg.lines().last().unwrap_or("").trim().to_string();
                        self.err("invalid-regex", format!("invalid regex `{re}`"), *span, last, "the syntax is that of the Rust `regex` crate (no look-around or back-references)");
                        None
                    }
                }
            }
            Some(ast::TestOp::Contains(lit)) => {
                if fi.ty != Type::String {
                    self.mismatch(
                        &t.path,
                        &fi.ty,
                        t.span,
                        "it cannot contain words",
                        "`contains` works on string fields such as `request.prompt`",
                    );
                    return None;
                }
                let items: Vec<&Literal> = match lit {
                    Literal::List(xs, _) => xs.iter().collect(),
                    x => vec![x],
                };
                let mut words = Vec::new();
                for it in items {
                    match it {
                        Literal::Str(s, _) => words.push(s.to_lowercase()),
                        Literal::Name(i) => words.push(i.name.to_lowercase()),
                        other => {
                            self.err(
                                "type-mismatch",
                                "`contains` takes words",
                                other.span(),
                                "not a word",
                                "write `contains [\"word\", \"other\"]`",
                            );
                            return None;
                        }
                    }
                }
                Some(Cond::Contains(f, words))
            }
        }
    }

    /// Type-check a literal against a field type.
    fn value(
        &mut self,
        lit: &Literal,
        ty: &Type,
        unit: Unit,
        vocab: Vocab,
        field: &dyn std::fmt::Display,
    ) -> Option<Value> {
        let found = match lit {
            Literal::Str(..) => "a string",
            Literal::Regex(..) => "a regex",
            Literal::Bool(..) => "a bool",
            Literal::Quantity(_) => "a number",
            Literal::Name(_) => "a word",
            Literal::List(..) => "a list",
        };
        let text = |lit: &Literal| match lit {
            Literal::Str(s, _) => Some(s.clone()),
            Literal::Name(i) => Some(i.name.clone()),
            _ => None,
        };
        let mismatch = |this: &mut Self| {
            this.err(
                "type-mismatch",
                format!("`{field}` is {}, found {found}", describe(ty)),
                lit.span(),
                format!("expected {}", describe(ty)),
                match ty {
                    Type::Enum(vs) => format!("one of: {}", vs.join(", ")),
                    Type::Bool => "write `true` or `false`".to_string(),
                    Type::Number => "write a number, for example `4000` or `8k`".to_string(),
                    Type::String => "write a word or a quoted string".to_string(),
                    Type::List(_) => format!("test membership with `{field} has x`"),
                },
            );
            None
        };
        match ty {
            Type::Bool => match lit {
                Literal::Bool(b, _) => Some(Value::Bool(*b)),
                _ => mismatch(self),
            },
            Type::String => {
                let Some(s) = text(lit) else {
                    return mismatch(self);
                };
                if self.vocab_ok(&s, vocab, lit.span()) {
                    Some(Value::Str(s))
                } else {
                    None
                }
            }
            Type::Enum(vs) => {
                let Some(s) = text(lit) else {
                    return mismatch(self);
                };
                if let Some(i) = vs.iter().position(|v| *v == s) {
                    return Some(Value::Enum(i as u32));
                }
                let list = vs.join(", ");
                self.unknown(
                    "unknown-variant",
                    &format!("value for `{field}`"),
                    &s,
                    lit.span(),
                    vs.iter().map(String::as_str),
                    &format!("`{field}` is one of: {list}"),
                );
                None
            }
            Type::Number => {
                let Literal::Quantity(q) = lit else {
                    return mismatch(self);
                };
                let v = match unit {
                    Unit::Count => self.count_f(q, "a token count")?,
                    Unit::Money => {
                        if !q.unit.is_empty() || q.per.is_some() {
                            self.unit_err(q, "a dollar amount", "$2.50");
                            return None;
                        }
                        q.value
                    }
                    Unit::Bare => self.bare(q, "a number")?,
                    Unit::Plain => {
                        if q.money && q.unit.is_empty() && q.per.is_none() {
                            q.value
                        } else {
                            self.count_f(q, "a number")?
                        }
                    }
                };
                Some(Value::Number(v))
            }
            Type::List(elem) => match lit {
                Literal::List(xs, _) => {
                    let mut out = Vec::new();
                    for x in xs {
                        out.push(self.value(x, elem, unit, vocab, field)?);
                    }
                    Some(Value::List(out))
                }
                _ => mismatch(self),
            },
        }
    }

    fn vocab_ok(&mut self, s: &str, vocab: Vocab, span: Span) -> bool {
        match vocab {
            Vocab::Any => true,
            Vocab::Models => {
                if let Some(id) = self.models.get(s).copied() {
                    self.use_model(id);
                    return true;
                }
                let known: Vec<String> = self.models.keys().cloned().collect();
                self.unknown(
                    "unknown-model",
                    "model",
                    s,
                    span,
                    known.iter().map(String::as_str),
                    "declare it with `model name { ... }`",
                );
                false
            }
            Vocab::Providers => {
                if let Some(id) = self.providers.get(s).copied() {
                    if let Some(u) = self.provider_used.get_mut(id.index()) {
                        *u = true;
                    }
                    return true;
                }
                let known: Vec<String> = self.providers.keys().cloned().collect();
                self.unknown(
                    "unknown-provider",
                    "provider",
                    s,
                    span,
                    known.iter().map(String::as_str),
                    "declare it with `provider name { ... }`",
                );
                false
            }
            Vocab::Regions => {
                // Regions are an open vocabulary (a residency rule may name a
                // region no model is in yet); only a near miss is a typo.
                if self.regions.contains(s)
                    || did_you_mean(s, self.regions.iter().map(String::as_str)).is_none()
                {
                    return true;
                }
                let known: Vec<String> = self.regions.iter().cloned().collect();
                let list = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                self.unknown(
                    "unknown-variant",
                    "region",
                    s,
                    span,
                    known.iter().map(String::as_str),
                    &format!("the regions declared by providers and models are: {list}"),
                );
                false
            }
            Vocab::Caps => {
                if self.caps.contains(s) {
                    return true;
                }
                let known: Vec<String> = self.caps.iter().cloned().collect();
                let list = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                self.unknown(
                    "unknown-capability",
                    "capability",
                    s,
                    span,
                    known.iter().map(String::as_str),
                    &format!("no model declares it; the declared capabilities are: {list}"),
                );
                false
            }
        }
    }

    fn use_model(&mut self, id: ModelId) {
        if let Some(u) = self.model_used.get_mut(id.index()) {
            *u = true;
        }
    }

    /// Resolve a model name; `None` (with a diagnostic) if unknown or invalid.
    fn model_ref(&mut self, i: &ast::Ident) -> Option<ModelId> {
        match self.models.get(&i.name).copied() {
            Some(id) if id.0 == u32::MAX => None,
            Some(id) => {
                self.use_model(id);
                Some(id)
            }
            None => {
                let known: Vec<String> = self.models.keys().cloned().collect();
                self.unknown(
                    "unknown-model",
                    "model",
                    &i.name,
                    i.span,
                    known.iter().map(String::as_str),
                    &format!(
                        "declare it with `model {} {{ provider .. kind .. }}`",
                        i.name
                    ),
                );
                None
            }
        }
    }

    fn intent(&mut self, i: &ast::Ident) {
        if !self.intents.contains_key(&i.name) {
            let id = IntentId(self.p.intents.len() as u32);
            self.intents.insert(i.name.clone(), id);
            self.p.intents.push(ir::Intent {
                name: i.name.clone(),
                span: i.span,
            });
        }
    }

    fn intent_ref(&mut self, i: &ast::Ident) -> Option<IntentId> {
        if let Some(id) = self.intents.get(&i.name) {
            return Some(*id);
        }
        let known: Vec<String> = self.p.intents.iter().map(|x| x.name.clone()).collect();
        self.unknown(
            "unknown-intent",
            "intent",
            &i.name,
            i.span,
            known.iter().map(String::as_str),
            &format!("intents are the names `classify` produces; add `{} when ...` to a `classify` block", i.name),
        );
        None
    }

    // ------------------------------------------------------------ layer 1

    fn constraint(&mut self, r: &ast::Constraint, n: usize) {
        let name = match &r.label {
            Some(l) => {
                if let Some(first) = self.labels.get(&l.name).copied() {
                    self.duplicate("constraint", &l.name, l.span, first);
                } else {
                    self.labels.insert(l.name.clone(), l.span);
                }
                l.name.clone()
            }
            None => format!("constraints[{n}]"),
        };
        let nm = self.p.models.len();
        let (effect, keep_target): (ir::Effect, Option<Vec<bool>>) = match &r.effect {
            ast::Effect::Deny(t) => (ir::Effect::Deny, self.target(t)),
            ast::Effect::AllowOnly(t) => (ir::Effect::AllowOnly, self.target(t)),
            ast::Effect::Require(e) => (ir::Effect::Require, self.model_set(e)),
        };
        let when = r.when.as_ref().map(|w| self.when(w));
        let removes = match keep_target {
            Some(set) => (0..nm)
                .filter(|&i| {
                    let in_set = set.get(i).copied().unwrap_or(false);
                    match effect {
                        ir::Effect::Deny => in_set,
                        ir::Effect::AllowOnly | ir::Effect::Require => !in_set,
                    }
                })
                .map(|i| ModelId(i as u32))
                .collect(),
            None => Vec::new(),
        };
        self.p.constraints.push(ir::Constraint {
            name,
            effect,
            removes,
            when,
            span: r.span,
        });
    }

    /// The model set a target names, as one bool per model.
    fn target(&mut self, t: &ast::Target) -> Option<Vec<bool>> {
        let nm = self.p.models.len();
        match t {
            ast::Target::Providers(ps, _) => {
                let mut set = vec![false; nm];
                for p in ps {
                    let Some(id) = self.providers.get(&p.name).copied() else {
                        let known: Vec<String> =
                            self.p.providers.iter().map(|x| x.name.clone()).collect();
                        self.unknown(
                            "unknown-provider",
                            "provider",
                            &p.name,
                            p.span,
                            known.iter().map(String::as_str),
                            &format!(
                                "declare it with `provider {} {{ region .. }}` to block it",
                                p.name
                            ),
                        );
                        continue;
                    };
                    if let Some(u) = self.provider_used.get_mut(id.index()) {
                        *u = true;
                    }
                    // Blocking a provider is a deliberate use of its models:
                    // a catalogue may list them to document the block.
                    for (i, m) in self.p.models.iter().enumerate() {
                        if m.provider == id {
                            if let Some(s) = set.get_mut(i) {
                                *s = true;
                            }
                            if let Some(u) = self.model_used.get_mut(i) {
                                *u = true;
                            }
                        }
                    }
                }
                Some(set)
            }
            ast::Target::Models(ms, _) => {
                let mut set = vec![false; nm];
                for m in ms {
                    if let Some(id) = self.model_ref(m) {
                        if let Some(s) = set.get_mut(id.index()) {
                            *s = true;
                        }
                    }
                }
                Some(set)
            }
            ast::Target::Where(e, _) => self.model_set(e),
        }
    }

    /// The models satisfying a model condition.
    fn model_set(&mut self, e: &Expr) -> Option<Vec<bool>> {
        let before = self.diags.len();
        let c = self.cond(e, Scope::Model);
        if self.diags.len() != before {
            return None;
        }
        Some(
            self.p
                .models
                .iter()
                .map(|m| eval_model(&c, m, &self.p))
                .collect(),
        )
    }

    // ------------------------------------------------------------ layer 2

    fn classify_rule(&mut self, r: &ast::ClassifyRule) {
        let when = r.when.as_ref().map(|w| self.when(w));
        if let Some(&intent) = self.intents.get(&r.intent.name) {
            self.p.classify.push(ir::ClassifyRule {
                intent,
                when,
                span: r.span,
            });
        }
    }

    // ------------------------------------------------------------ layer 3

    fn route(&mut self, r: &ast::RouteDecl) {
        let intent = self.intent_ref(&r.intent);
        let when = r.when.as_ref().map(|w| self.when(w));
        let mut route = ir::Route {
            intent: intent.unwrap_or(IntentId(0)),
            when,
            candidates: Vec::new(),
            score: Vec::new(),
            premium_only: None,
            fallback: Vec::new(),
            downgrade: Vec::new(),
            span: r.span,
            name_span: r.intent.span,
        };
        let mut seen: HashMap<&'static str, Span> = HashMap::new();
        for p in &r.props {
            let kw = p.kind.keyword();
            if let Some(first) = seen.get(kw).copied() {
                self.diags.push(
                    Diagnostic::error(
                        "duplicate-property",
                        format!("route `{}` sets `{kw}` twice", r.intent.name),
                    )
                    .with_label(p.span, "set again here")
                    .with_label(first, "first set here")
                    .with_help("merge them into one; the first one is used"),
                );
                continue;
            }
            seen.insert(kw, p.span);
            match &p.kind {
                ast::RoutePropKind::Candidates(ms) => route.candidates = self.model_list(ms),
                ast::RoutePropKind::Downgrade(ms) => route.downgrade = self.model_list(ms),
                ast::RoutePropKind::PremiumOnly(e) => route.premium_only = Some(self.when(e)),
                ast::RoutePropKind::Score(terms) => {
                    for t in terms {
                        let signal = ir::Signal::ALL
                            .iter()
                            .find(|(n, _)| *n == t.signal.name)
                            .map(|(_, s)| *s);
                        let Some(signal) = signal else {
                            self.unknown(
                                "unknown-signal",
                                "signal",
                                &t.signal.name,
                                t.signal.span,
                                ir::Signal::ALL.iter().map(|(n, _)| *n),
                                "the signals are price, latency, first_token, success, quality and health",
                            );
                            continue;
                        };
                        let Some(w) = self.bare(&t.weight, "a weight") else {
                            continue;
                        };
                        if w < 0.0 {
                            self.err(
                                "invalid-range",
                                "a weight cannot be negative",
                                t.weight.span,
                                "negative",
                                "write `- 0.2 * signal` to subtract a term",
                            );
                            continue;
                        }
                        route.score.push(ir::Weight {
                            signal,
                            weight: if t.negative { -w } else { w },
                            span: t.span,
                        });
                    }
                }
                ast::RoutePropKind::Fallback(items) => {
                    let mut seen_m: HashMap<ModelId, Span> = HashMap::new();
                    let mut seen_r: HashMap<IntentId, Span> = HashMap::new();
                    for it in items {
                        match it {
                            ast::FallbackItem::Model(i) => {
                                let Some(id) = self.model_ref(i) else {
                                    continue;
                                };
                                if let Some(first) = seen_m.get(&id).copied() {
                                    self.listed_twice(&i.name, i.span, first);
                                    continue;
                                }
                                seen_m.insert(id, i.span);
                                route.fallback.push(ir::Fallback {
                                    target: ir::FallbackTarget::Model(id),
                                    span: i.span,
                                });
                            }
                            ast::FallbackItem::Route(i) => {
                                let Some(id) = self.intent_ref(i) else {
                                    continue;
                                };
                                if let Some(first) = seen_r.get(&id).copied() {
                                    self.listed_twice(&format!("route {}", i.name), i.span, first);
                                    continue;
                                }
                                seen_r.insert(id, i.span);
                                route.fallback.push(ir::Fallback {
                                    target: ir::FallbackTarget::Route(id),
                                    span: i.span,
                                });
                            }
                        }
                    }
                }
            }
        }
        if intent.is_some() {
            self.p.routes.push(route);
        }
    }

    fn listed_twice(&mut self, name: &str, span: Span, first: Span) {
        self.diags.push(
            Diagnostic::error("duplicate-name", format!("`{name}` is listed twice"))
                .with_label(span, "listed again here")
                .with_label(first, "first listed here")
                .with_help("remove the second one")
                .with_suggestion(span, ""),
        );
    }

    fn model_list(&mut self, ms: &[ast::Ident]) -> Vec<ir::ModelRef> {
        let mut out: Vec<ir::ModelRef> = Vec::new();
        for i in ms {
            let Some(id) = self.model_ref(i) else {
                continue;
            };
            if let Some(first) = out.iter().find(|r| r.model == id).map(|r| r.span) {
                self.listed_twice(&i.name, i.span, first);
                continue;
            }
            out.push(ir::ModelRef {
                model: id,
                span: i.span,
            });
        }
        out
    }

    // ------------------------------------------------------------ layer 4

    fn once(&mut self, kw: &'static str, span: Span) -> bool {
        if let Some(first) = self.protect_seen.get(kw).copied() {
            self.diags.push(
                Diagnostic::error(
                    "duplicate-property",
                    format!("`{kw}` is set twice in `protect`"),
                )
                .with_label(span, "set again here")
                .with_label(first, "first set here")
                .with_help("keep one; the first one is used"),
            );
            return false;
        }
        self.protect_seen.insert(kw, span);
        true
    }

    fn protect_rule(&mut self, r: &ast::ProtectRule) {
        let span = r.span;
        match &r.kind {
            ast::ProtectKind::Retry { count, on, backoff } => {
                if !self.once("retry", span) {
                    return;
                }
                let count = self
                    .whole(count, "a retry count")
                    .map_or(0, |c| u32::try_from(c).unwrap_or(u32::MAX));
                let mut out = Vec::new();
                for s in on {
                    if let Some(x) = self.retry_on(s) {
                        out.push(x);
                    }
                }
                if on.is_empty() {
                    out = vec![
                        ir::RetryOn::Status(429),
                        ir::RetryOn::StatusClass(5),
                        ir::RetryOn::Timeout,
                        ir::RetryOn::Connect,
                        ir::RetryOn::Reset,
                    ];
                }
                let (mut lo, mut hi) = (100, 1_000);
                if let Some((a, b)) = backoff {
                    let (x, y) = (self.duration(a), self.duration(b));
                    if let (Some(x), Some(y)) = (x, y) {
                        if x > y {
                            self.err(
                                "invalid-range",
                                format!("backoff `{}..{}` starts above its end", a.text, b.text),
                                a.span.to(b.span),
                                "the first bound is larger",
                                format!("write `backoff {}..{}`", b.text, a.text),
                            );
                        }
                        (lo, hi) = (x, y);
                    }
                }
                self.p.protect.retry = Some(ir::Retry {
                    count,
                    on: out,
                    backoff_min_ms: lo,
                    backoff_max_ms: hi,
                    span,
                });
            }
            ast::ProtectKind::Timeout { parts } => {
                for (k, q) in parts {
                    let kw = if k.name == "total" {
                        "timeout total"
                    } else {
                        "timeout first_token"
                    };
                    if !self.once(kw, k.span.to(q.span)) {
                        continue;
                    }
                    let Some(ms) = self.duration(q) else { continue };
                    if k.name == "total" {
                        self.p.protect.timeout.total_ms = Some(ms);
                    } else {
                        self.p.protect.timeout.first_token_ms = Some(ms);
                    }
                }
                if let (Some(ft), Some(total)) = (
                    self.p.protect.timeout.first_token_ms,
                    self.p.protect.timeout.total_ms,
                ) {
                    if ft > total {
                        self.err(
                            "invalid-range",
                            "the first-token timeout is longer than the total timeout",
                            span,
                            "first_token > total",
                            "the first token must arrive before the whole response; lower `first_token` or raise `total`",
                        );
                    }
                }
                self.p.protect.timeout.span = Some(self.p.protect.timeout.span.map_or(span, |s| s));
            }
            ast::ProtectKind::Breaker {
                scope,
                failures,
                window,
                cooldown,
            } => {
                let sc = match scope.name.as_str() {
                    "model" => ir::BreakerScope::Model,
                    "provider" => ir::BreakerScope::Provider,
                    _ => {
                        self.unknown(
                            "unknown-word",
                            "breaker scope",
                            &scope.name,
                            scope.span,
                            ["model", "provider"],
                            "write `breaker per model` or `breaker per provider`",
                        );
                        return;
                    }
                };
                let kw = if sc == ir::BreakerScope::Model {
                    "breaker per model"
                } else {
                    "breaker per provider"
                };
                if !self.once(kw, span) {
                    return;
                }
                let f = self.whole(failures, "a failure count");
                if f == Some(0) {
                    self.err(
                        "invalid-range",
                        "a breaker must open after at least 1 failure",
                        failures.span,
                        "zero",
                        "write `open after 5 failures`",
                    );
                }
                let (w, c) = (self.duration(window), self.duration(cooldown));
                if let (Some(f), Some(w), Some(c)) = (f, w, c) {
                    self.p.protect.breakers.push(ir::Breaker {
                        scope: sc,
                        failures: u32::try_from(f).unwrap_or(u32::MAX).max(1),
                        window_ms: w,
                        cooldown_ms: c,
                        span,
                    });
                }
            }
            ast::ProtectKind::Limit {
                kind,
                amount,
                scope,
            } => {
                let sc = match scope.name.as_str() {
                    "tenant" => ir::LimitScope::Tenant,
                    "feature" => ir::LimitScope::Feature,
                    "model" => ir::LimitScope::Model,
                    "provider" => ir::LimitScope::Provider,
                    _ => {
                        self.unknown(
                            "unknown-word",
                            "limit scope",
                            &scope.name,
                            scope.span,
                            ["tenant", "feature", "model", "provider"],
                            "limits are `per tenant`, `per feature`, `per model` or `per provider`",
                        );
                        return;
                    }
                };
                let k = match kind.name.as_str() {
                    "concurrency" => match self.whole(amount, "a concurrency limit") {
                        Some(0) => {
                            self.err(
                                "invalid-range",
                                "a concurrency limit of 0 blocks every request",
                                amount.span,
                                "zero",
                                "use at least 1",
                            );
                            None
                        }
                        Some(n) => Some(ir::LimitKind::Concurrency(
                            u32::try_from(n).unwrap_or(u32::MAX),
                        )),
                        None => None,
                    },
                    "rate" => self.rate(amount, "requests").map(|(requests, window_ms)| {
                        ir::LimitKind::Rate {
                            requests,
                            window_ms,
                        }
                    }),
                    _ => self
                        .rate(amount, "tokens")
                        .map(|(tokens, window_ms)| ir::LimitKind::Tokens { tokens, window_ms }),
                };
                let Some(limit) = k else { return };
                // Two limits of one kind, window and scope would share one
                // counter and each charge it: `4/min` written twice lets 2
                // through. Which of two different amounts was meant is a guess.
                let same = |other: &ir::LimitKind| match (&limit, other) {
                    (ir::LimitKind::Concurrency(_), ir::LimitKind::Concurrency(_)) => true,
                    (
                        ir::LimitKind::Rate { window_ms: a, .. },
                        ir::LimitKind::Rate { window_ms: b, .. },
                    )
                    | (
                        ir::LimitKind::Tokens { window_ms: a, .. },
                        ir::LimitKind::Tokens { window_ms: b, .. },
                    ) => a == b,
                    _ => false,
                };
                if let Some(first) = self
                    .p
                    .protect
                    .limits
                    .iter()
                    .find(|l| l.scope == sc && same(&l.kind))
                {
                    self.diags.push(
                        Diagnostic::error(
                            "duplicate-property",
                            format!(
                                "`limit {}` per {} is given twice",
                                kind.name, scope.name
                            ),
                        )
                        .with_label(span, "given again here")
                        .with_label(first.span, "first given here")
                        .with_help("keep one: limits of one kind, window and scope share a counter, so both would count every request"),
                    );
                    return;
                }
                self.p.protect.limits.push(ir::Limit {
                    kind: limit,
                    scope: sc,
                    span,
                });
            }
            ast::ProtectKind::Budget(b) => self.budget(b, span),
        }
    }

    fn retry_on(&mut self, s: &ast::Ident) -> Option<ir::RetryOn> {
        let n = s.name.as_str();
        match n {
            "timeout" => return Some(ir::RetryOn::Timeout),
            "connect" => return Some(ir::RetryOn::Connect),
            "reset" => return Some(ir::RetryOn::Reset),
            _ => {}
        }
        let b = n.as_bytes();
        if b.len() == 3 && b.first().is_some_and(u8::is_ascii_digit) {
            let first = u16::from(b.first().copied().unwrap_or(b'0') - b'0');
            if n.ends_with("xx") {
                if (4..=5).contains(&first) {
                    return Some(ir::RetryOn::StatusClass(first));
                }
            } else if let Ok(code) = n.parse::<u16>() {
                if (400..=599).contains(&code) {
                    return Some(ir::RetryOn::Status(code));
                }
            }
            self.err(
                "invalid-range",
                format!("`{n}` is not an error status"),
                s.span,
                "not retryable",
                "retries react to error statuses 400..599, `4xx` or `5xx`",
            );
            return None;
        }
        self.unknown(
            "unknown-word",
            "retry condition",
            n,
            s.span,
            ["timeout", "connect", "reset", "4xx", "5xx"],
            "retry on status codes (`429`, `5xx`) or `timeout`, `connect`, `reset`",
        );
        None
    }

    fn budget(&mut self, b: &ast::Budget, span: Span) {
        let period = match &b.period {
            ast::BudgetPeriod::Named(i) => match i.name.as_str() {
                "daily" => Some(ir::BudgetPeriod::Daily),
                "weekly" => Some(ir::BudgetPeriod::Weekly),
                "monthly" => Some(ir::BudgetPeriod::Monthly),
                _ => {
                    self.unknown(
                        "unknown-word",
                        "budget period",
                        &i.name,
                        i.span,
                        ["daily", "weekly", "monthly"],
                        "budgets are `daily`, `weekly`, `monthly` or `every 14d`",
                    );
                    None
                }
            },
            ast::BudgetPeriod::Every(q) => match self.duration(q) {
                Some(0) => {
                    self.err(
                        "invalid-range",
                        "a budget period cannot be zero",
                        q.span,
                        "zero",
                        "write `every 14d`",
                    );
                    None
                }
                Some(ms) => Some(ir::BudgetPeriod::Every(ms)),
                None => None,
            },
        };
        let words: Vec<&str> = b.scope.iter().map(|i| i.name.as_str()).collect();
        let scope = match words.as_slice() {
            ["tenant"] => Some(ir::BudgetScope::Tenant),
            ["feature"] => Some(ir::BudgetScope::Feature),
            ["tenant", "feature"] | ["feature", "tenant"] => Some(ir::BudgetScope::TenantFeature),
            _ => {
                let bad = b
                    .scope
                    .iter()
                    .find(|i| i.name != "tenant" && i.name != "feature")
                    .or(b.scope.first());
                if let Some(i) = bad {
                    self.unknown(
                        "unknown-word",
                        "budget scope",
                        &i.name,
                        i.span,
                        ["tenant", "feature"],
                        "budgets are `per tenant`, `per feature` or `per tenant and feature`",
                    );
                }
                None
            }
        };
        let amount = match &b.amount {
            ast::BudgetAmount::Money(q) => {
                self.money(q).map(|d| ir::BudgetAmount::Fixed(micros(d)))
            }
            ast::BudgetAmount::Attr(path) => {
                if path.scope != ast::PathScope::Tenant {
                    self.err(
                        "wrong-scope",
                        format!("a budget amount comes from the tenant, not `{}.{}`", path.scope.as_str(), path.field.name),
                        path.span,
                        "not a tenant attribute",
                        "write a dollar amount like `$500` or a number-typed tenant attribute like `tenant.monthly_budget`",
                    );
                    None
                } else {
                    match self.field(path, Scope::Request) {
                        Some(FieldInfo {
                            field: Field::Tenant(id),
                            ty: Type::Number,
                            ..
                        }) => Some(ir::BudgetAmount::TenantAttr(id)),
                        Some(fi) => {
                            self.mismatch(
                                path,
                                &fi.ty,
                                path.span,
                                "not an amount",
                                "declare the attribute as `number` (dollars)",
                            );
                            None
                        }
                        None => None,
                    }
                }
            }
        };
        let mut thresholds = Vec::new();
        for t in &b.thresholds {
            let action = match t.action.name.as_str() {
                "warn" => ir::BudgetAction::Warn,
                "confirm_premium" => ir::BudgetAction::ConfirmPremium,
                "downgrade" => ir::BudgetAction::Downgrade,
                "block" => ir::BudgetAction::Block,
                _ => {
                    self.unknown(
                        "unknown-word",
                        "budget action",
                        &t.action.name,
                        t.action.span,
                        ["warn", "downgrade", "block"],
                        "the actions are `warn`, `confirm premium`, `downgrade` and `block`",
                    );
                    continue;
                }
            };
            if let Some(percent) = self.percent(&t.at) {
                thresholds.push(ir::Threshold {
                    action,
                    percent,
                    span: t.span,
                });
            }
        }
        if let (Some(period), Some(scope), Some(amount)) = (period, scope, amount) {
            self.p.protect.budgets.push(ir::Budget {
                period,
                scope,
                amount,
                thresholds,
                span,
            });
        }
    }
}

/// `scope.field`, formatted only when a message needs it.
struct PathName<'a>(&'a ast::Path);

impl std::fmt::Display for PathName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0.scope.as_str(), self.0.field.name)
    }
}

fn micros(dollars: f64) -> ir::Micros {
    // `as` saturates on overflow and maps NaN to 0: no panic on odd input.
    (dollars * 1_000_000.0).round() as ir::Micros
}

fn describe(ty: &Type) -> String {
    match ty {
        Type::Enum(_) => format!("an {}", ty.describe()),
        Type::List(_) => format!("a {}", ty.describe()),
        _ => format!("a {}", ty.describe()),
    }
}

impl Lowerer {
    /// `enum(low, high, low)`: the repeat is a slip, and a value compares
    /// equal to the first of the two only.
    fn repeated_variants(&mut self, t: &ast::TypeExpr, attr: &str) {
        match t {
            ast::TypeExpr::Enum(vs, _) => {
                for (i, v) in vs.iter().enumerate() {
                    if let Some(first) = vs.iter().take(i).find(|f| f.name == v.name) {
                        self.diags.push(
                            Diagnostic::error(
                                "duplicate-name",
                                format!("`{attr}` lists the variant `{}` twice", v.name),
                            )
                            .with_label(v.span, "listed again here")
                            .with_label(first.span, "first listed here")
                            .with_help("remove the repeat"),
                        );
                    }
                }
            }
            ast::TypeExpr::List(inner, _) => self.repeated_variants(inner, attr),
            _ => {}
        }
    }
}

fn lower_type(t: &ast::TypeExpr) -> Type {
    match t {
        ast::TypeExpr::Bool(_) => Type::Bool,
        ast::TypeExpr::String(_) => Type::String,
        ast::TypeExpr::Number(_) => Type::Number,
        ast::TypeExpr::Enum(vs, _) => Type::Enum(vs.iter().map(|v| v.name.clone()).collect()),
        ast::TypeExpr::List(inner, _) => Type::List(Box::new(lower_type(inner))),
    }
}

fn lower_cmp(op: ast::CmpOp) -> ir::CmpOp {
    match op {
        ast::CmpOp::Eq => ir::CmpOp::Eq,
        ast::CmpOp::Ne => ir::CmpOp::Ne,
        ast::CmpOp::Lt => ir::CmpOp::Lt,
        ast::CmpOp::Le => ir::CmpOp::Le,
        ast::CmpOp::Gt => ir::CmpOp::Gt,
        ast::CmpOp::Ge => ir::CmpOp::Ge,
    }
}

/// The value of a static model field, borrowed from the model (evaluating
/// `models where` over every model must not allocate).
#[derive(Clone, Copy, Debug)]
pub enum ModelValue<'a> {
    Str(&'a str),
    Number(f64),
    Bool(bool),
    Enum(u32),
    List(&'a [String]),
}

/// The value of a static model field, as conditions see it.
pub fn model_value<'a>(f: ModelField, m: &'a ir::Model, p: &'a ir::Policy) -> ModelValue<'a> {
    let prov = p.provider(m.provider);
    match f {
        ModelField::Name => ModelValue::Str(&m.name),
        ModelField::Provider => ModelValue::Str(prov.map_or("", |p| p.name.as_str())),
        ModelField::Kind => ModelValue::Enum(
            ir::ModelKind::ALL
                .iter()
                .position(|(_, k)| *k == m.kind)
                .unwrap_or(0) as u32,
        ),
        ModelField::Region => ModelValue::Str(m.region.as_deref().unwrap_or("")),
        ModelField::Tier => ModelValue::Enum(if m.tier == ir::Tier::Premium { 1 } else { 0 }),
        ModelField::Caps => ModelValue::List(&m.caps),
        ModelField::Labels => ModelValue::List(&m.labels),
        ModelField::Context => ModelValue::Number(m.context as f64),
        ModelField::Quality => ModelValue::Number(m.quality),
        ModelField::PriceIn => ModelValue::Number(m.pricing.input_per_mtok as f64 / 1_000_000.0),
        ModelField::PriceOut => ModelValue::Number(m.pricing.output_per_mtok as f64 / 1_000_000.0),
        ModelField::Enabled => ModelValue::Bool(m.enabled),
        ModelField::ProviderRegion => {
            ModelValue::Str(prov.and_then(|p| p.region.as_deref()).unwrap_or(""))
        }
        ModelField::ProviderLabels => ModelValue::List(prov.map_or(&[][..], |p| &p.labels[..])),
    }
}

impl ModelValue<'_> {
    fn eq(&self, v: &Value) -> bool {
        match (self, v) {
            (ModelValue::Str(a), Value::Str(b)) => *a == b,
            (ModelValue::Number(a), Value::Number(b)) => a == b,
            (ModelValue::Bool(a), Value::Bool(b)) => a == b,
            (ModelValue::Enum(a), Value::Enum(b)) => a == b,
            _ => false,
        }
    }
    fn cmp(&self, op: ir::CmpOp, v: &Value) -> bool {
        match (self, v) {
            (ModelValue::Number(a), Value::Number(b)) => {
                compare(&Value::Number(*a), op, &Value::Number(*b))
            }
            _ => match op {
                ir::CmpOp::Eq => self.eq(v),
                ir::CmpOp::Ne => !self.eq(v),
                _ => false,
            },
        }
    }
}

/// Compare two values with an operator. Values of different shapes are unequal.
pub fn compare(a: &Value, op: ir::CmpOp, b: &Value) -> bool {
    use ir::CmpOp::*;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match op {
            Eq => x == y,
            Ne => x != y,
            Lt => x < y,
            Le => x <= y,
            Gt => x > y,
            Ge => x >= y,
        },
        _ => match op {
            Eq => a == b,
            Ne => a != b,
            _ => false,
        },
    }
}

/// Evaluate a model condition (model and provider fields only) for one model.
pub fn eval_model(c: &Cond, m: &ir::Model, p: &ir::Policy) -> bool {
    let get = |f: &Field| match f {
        Field::Model(mf) => Some(model_value(*mf, m, p)),
        _ => None,
    };
    match c {
        Cond::True => true,
        Cond::False => false,
        Cond::Not(x) => !eval_model(x, m, p),
        Cond::And(xs) => xs.iter().all(|x| eval_model(x, m, p)),
        Cond::Or(xs) => xs.iter().any(|x| eval_model(x, m, p)),
        Cond::Bool(f) => matches!(get(f), Some(ModelValue::Bool(true))),
        Cond::Cmp(f, op, v) => get(f).is_some_and(|x| x.cmp(*op, v)),
        Cond::In(f, vs) => get(f).is_some_and(|x| vs.iter().any(|v| x.eq(v))),
        Cond::Has(f, v) => {
            matches!((get(f), v), (Some(ModelValue::List(xs)), Value::Str(s)) if xs.contains(s))
        }
        Cond::Matches(f, re) => matches!(get(f), Some(ModelValue::Str(s)) if re.0.is_match(s)),
        Cond::Contains(f, ws) => {
            matches!(get(f), Some(ModelValue::Str(s)) if { let s = s.to_lowercase(); ws.iter().any(|w| s.contains(w.as_str())) })
        }
    }
}

#[cfg(test)]
mod tests;
