//! Validation of a lowered policy: structure (every intent has one default
//! route, classification is total, fallbacks do not loop), the layering
//! promise (no route entry the constraints always remove, no tenant class
//! left without a model), and lints.
//!
//! Decisions the brief leaves open, taken the way a strict user would expect:
//! - Tenant classes are the combinations of the finite (enum and bool) tenant
//!   attributes that some condition reads; attributes nobody reads cannot
//!   change a decision and are not enumerated. To bound the work, at most
//!   [`MAX_CLASSES`] classes are enumerated: attributes that would exceed it
//!   are treated as unknown, which only makes the checks more lenient.
//! - A route applies to a class when its intent is reachable for the class
//!   (some classify rule may pick it before a rule that surely matches) and
//!   the route may be selected (its `when` is not false, and no earlier
//!   refined route of the intent surely matches). Each route that may apply
//!   must keep a model: a request may reach it.
//! - Coverage counts candidates and model fallbacks, and `route X` fallbacks
//!   expanded to X's default route; downgrades do not count (they are an
//!   alternative, not a way to serve the request). Disabled models count as
//!   removed. Premium-tier entries count only if premium is always allowed
//!   for the class (no `premium only` clause, or one that surely holds).
//! - `candidate-denied` is reported for an entry that constraints remove in
//!   every class the route applies to; disabled entries get the
//!   `disabled-candidate` lint instead.
//! - Fallback cycles are loops between default routes through `route X`
//!   fallbacks; a refined route falling back to its own intent's default
//!   route is fine.
//! - After lowering errors only the checks that cannot be consequences of
//!   those errors run (missing-default, missing-route, duplicate-route,
//!   fallback-cycle); empty-route, the set-based checks (coverage,
//!   candidate-denied) and the lints wait for a clean lowering. After syntax
//!   errors `analyze` runs no check at all (the tree is partial).
//! - `missing-default` is also reported when a policy has models but no
//!   classify rule at all: every request needs an intent.

use std::collections::{HashMap, HashSet};

use crate::diag::Diagnostic;
use crate::ir::{
    AttrId, CmpOp, Cond, ConstraintId, FallbackTarget, Field, IntentId, ModelId, Policy,
    RequestField, RouteId, Tier, Value,
};
use crate::lower::{compare, Usage};
use crate::source::Span;

/// The largest number of tenant classes enumerated by the coverage check.
pub const MAX_CLASSES: usize = 4096;

/// The result of evaluating a condition when only some fields are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tri {
    False,
    Unknown,
    True,
}

impl Tri {
    fn not(self) -> Tri {
        match self {
            Tri::False => Tri::True,
            Tri::True => Tri::False,
            Tri::Unknown => Tri::Unknown,
        }
    }
    fn from(b: bool) -> Tri {
        if b {
            Tri::True
        } else {
            Tri::False
        }
    }
}

/// Three-valued evaluation of a request-scope condition for a tenant class:
/// `tenant[i]` is the value of tenant attribute `i`, `None` when unknown.
/// Request fields, `tenant.id` and model fields are unknown.
pub fn eval3(c: &Cond, tenant: &[Option<Value>]) -> Tri {
    let get = |f: &Field| match f {
        Field::Tenant(id) => tenant.get(id.index()).and_then(Option::as_ref),
        _ => None,
    };
    match c {
        Cond::True => Tri::True,
        Cond::False => Tri::False,
        Cond::Not(x) => eval3(x, tenant).not(),
        Cond::And(xs) => {
            let mut out = Tri::True;
            for x in xs {
                match eval3(x, tenant) {
                    Tri::False => return Tri::False,
                    Tri::Unknown => out = Tri::Unknown,
                    Tri::True => {}
                }
            }
            out
        }
        Cond::Or(xs) => {
            let mut out = Tri::False;
            for x in xs {
                match eval3(x, tenant) {
                    Tri::True => return Tri::True,
                    Tri::Unknown => out = Tri::Unknown,
                    Tri::False => {}
                }
            }
            out
        }
        Cond::Bool(f) => get(f).map_or(Tri::Unknown, |v| Tri::from(*v == Value::Bool(true))),
        Cond::Cmp(f, op, v) => get(f).map_or(Tri::Unknown, |x| Tri::from(compare(x, *op, v))),
        Cond::In(f, vs) => get(f).map_or(Tri::Unknown, |x| Tri::from(vs.contains(x))),
        Cond::Has(f, v) => get(f).map_or(Tri::Unknown, |x| Tri::from(matches!(x, Value::List(xs) if xs.contains(v)))),
        Cond::Matches(f, re) => get(f).map_or(Tri::Unknown, |x| Tri::from(matches!(x, Value::Str(s) if re.0.is_match(s)))),
        Cond::Contains(f, ws) => get(f).map_or(Tri::Unknown, |x| {
            Tri::from(matches!(x, Value::Str(s) if { let s = s.to_lowercase(); ws.iter().any(|w| s.contains(w.as_str())) }))
        }),
    }
}

/// Every field a condition reads.
fn fields<'a>(c: &'a Cond, out: &mut Vec<&'a Field>) {
    match c {
        Cond::True | Cond::False => {}
        Cond::Not(x) => fields(x, out),
        Cond::And(xs) | Cond::Or(xs) => xs.iter().for_each(|x| fields(x, out)),
        Cond::Bool(f)
        | Cond::Cmp(f, ..)
        | Cond::In(f, _)
        | Cond::Has(f, _)
        | Cond::Matches(f, _)
        | Cond::Contains(f, _) => out.push(f),
    }
}

/// Whether a condition reads a tenant attribute (else it is the same for every class).
fn reads_tenant(c: &Cond) -> bool {
    let mut fs = Vec::new();
    fields(c, &mut fs);
    fs.iter().any(|f| matches!(f, Field::Tenant(_)))
}

/// All request-scope conditions of a policy.
fn all_conds(p: &Policy) -> impl Iterator<Item = &Cond> {
    let c = p.constraints.iter().filter_map(|c| c.when.as_ref());
    let k = p.classify.iter().filter_map(|r| r.when.as_ref());
    let r = p
        .routes
        .iter()
        .flat_map(|r| r.when.iter().chain(r.premium_only.iter()));
    c.chain(k).chain(r).map(|w| &w.cond)
}

/// Check a lowered policy. `lowered_ok` is false when lowering reported
/// errors; the set-based checks are then skipped.
pub fn check(p: &Policy, usage: &Usage, lowered_ok: bool) -> Vec<Diagnostic> {
    let mut c = Checker { p, out: Vec::new() };
    c.classify();
    c.routes(lowered_ok);
    c.fallback_cycles();
    if lowered_ok {
        c.lints(usage);
        c.shadowed();
        let classes = Classes::new(p);
        c.never_fires(&classes);
        c.coverage(&classes);
    }
    c.out
}

/// A rule for the shadowing check: its condition (`None` = otherwise), span and name.
type RuleRef<'a> = (Option<&'a Cond>, Span, IntentId, &'static str);

struct Checker<'a> {
    p: &'a Policy,
    out: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn model_name(&self, m: ModelId) -> &str {
        self.p.model(m).map_or("?", |m| m.name.as_str())
    }
    fn intent_name(&self, i: IntentId) -> &str {
        self.p.intent(i).map_or("?", |i| i.name.as_str())
    }

    // ------------------------------------------------------------ structure

    fn classify(&mut self) {
        match self.p.classify.last() {
            None => {
                if self.p.models.is_empty() {
                    return;
                }
                let span = self.p.routes.first().map(|r| r.name_span).or(self
                    .p
                    .models
                    .first()
                    .map(|m| m.name_span));
                let mut d =
                    Diagnostic::error("missing-default", "the policy has no `classify` rules");
                if let Some(s) = span {
                    d = d.with_label(s, "requests cannot be given an intent");
                }
                self.out.push(d.with_help("add `classify { chat otherwise }`: every request needs an intent, and the last rule is the default"));
            }
            Some(last)
                if last.when.is_some() && !self.p.classify.iter().any(|r| r.when.is_none()) =>
            {
                let name = self.intent_name(last.intent).to_string();
                self.out.push(
                    Diagnostic::error("missing-default", "classification has no default")
                        .with_label(last.span, "the last rule has a condition")
                        .with_help(format!("end the rules with `<intent> otherwise` (for example `{name} otherwise`) so every request gets an intent")),
                );
            }
            Some(_) => {}
        }
    }

    fn routes(&mut self, lowered_ok: bool) {
        let mut default: Vec<Option<RouteId>> = vec![None; self.p.intents.len()];
        for (i, r) in self.p.routes.iter().enumerate() {
            let id = RouteId(i as u32);
            // After lowering errors a route may be empty only because its names were dropped.
            if lowered_ok && r.candidates.is_empty() && r.fallback.is_empty() {
                self.out.push(
                    Diagnostic::error(
                        "empty-route",
                        format!("route `{}` has no candidates", self.intent_name(r.intent)),
                    )
                    .with_label(r.name_span, "no model to send a request to")
                    .with_help("add `candidates [model, ...]`"),
                );
            }
            if r.when.is_some() {
                continue;
            }
            let Some(slot) = default.get_mut(r.intent.index()) else {
                continue;
            };
            match slot {
                Some(first) => {
                    let first_span = self
                        .p
                        .routes
                        .get(first.index())
                        .map_or(r.name_span, |f| f.name_span);
                    let name = self.intent_name(r.intent).to_string();
                    self.out.push(
                        Diagnostic::error(
                            "duplicate-route",
                            format!("intent `{name}` has two default routes"),
                        )
                        .with_label(r.name_span, "second default route")
                        .with_label(first_span, "first default route")
                        .with_help(format!(
                            "merge them, or refine one with `route {name} when ...`"
                        )),
                    );
                }
                None => *slot = Some(id),
            }
        }
        for (i, intent) in self.p.intents.iter().enumerate() {
            if default.get(i).copied().flatten().is_none() {
                let refined = self.p.routes.iter().any(|r| r.intent.index() == i);
                let help = if refined {
                    format!("the routes for `{0}` all have a `when`; add a default `route {0} {{ candidates [..] }}` for the other requests", intent.name)
                } else {
                    format!("add `route {} {{ candidates [..] }}`", intent.name)
                };
                self.out.push(
                    Diagnostic::error(
                        "missing-route",
                        format!("intent `{}` has no default route", intent.name),
                    )
                    .with_label(intent.span, "requests classified here have nowhere to go")
                    .with_help(help),
                );
            }
        }
    }

    fn fallback_cycles(&mut self) {
        // Edges between intents through their default routes' `route X` fallbacks.
        let n = self.p.intents.len();
        let mut edges: Vec<Vec<(IntentId, Span)>> = vec![Vec::new(); n];
        let mut seen = vec![false; n];
        for r in self.p.routes.iter().filter(|r| r.when.is_none()) {
            // Only the first default route of an intent counts (duplicate-route says the rest).
            let (Some(e), Some(s)) = (
                edges.get_mut(r.intent.index()),
                seen.get_mut(r.intent.index()),
            ) else {
                continue;
            };
            if std::mem::replace(s, true) {
                continue;
            }
            for f in &r.fallback {
                if let FallbackTarget::Route(t) = f.target {
                    e.push((t, f.span));
                }
            }
        }
        // Iterative DFS; a back edge closes a cycle.
        let mut state = vec![0u8; n]; // 0 new, 1 on stack, 2 done
        let mut reported: HashSet<Vec<u32>> = HashSet::new();
        for start in 0..n {
            if state.get(start) != Some(&0) {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            if let Some(s) = state.get_mut(start) {
                *s = 1;
            }
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                let Some(&(to, span)) = edges.get(node).and_then(|e| e.get(*next)) else {
                    if let Some(s) = state.get_mut(node) {
                        *s = 2;
                    }
                    stack.pop();
                    continue;
                };
                *next += 1;
                match state.get(to.index()) {
                    Some(0) => {
                        if let Some(s) = state.get_mut(to.index()) {
                            *s = 1;
                        }
                        stack.push((to.index(), 0));
                    }
                    Some(1) => {
                        let pos = stack
                            .iter()
                            .position(|(x, _)| *x == to.index())
                            .unwrap_or(0);
                        let cycle: Vec<u32> =
                            stack.iter().skip(pos).map(|(x, _)| *x as u32).collect();
                        let mut key = cycle.clone();
                        key.sort_unstable();
                        if reported.insert(key) {
                            let mut path: Vec<&str> = cycle
                                .iter()
                                .map(|&x| self.intent_name(IntentId(x)))
                                .collect();
                            path.push(self.intent_name(to));
                            let path = path.join(" -> ");
                            self.out.push(
                                Diagnostic::error("fallback-cycle", format!("fallback routes form a cycle: {path}"))
                                    .with_label(span, "this fallback leads back to an earlier route")
                                    .with_help("fall back to models, or to a route that does not fall back here"),
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    // ------------------------------------------------------------ lints

    fn lints(&mut self, usage: &Usage) {
        for (i, m) in self.p.models.iter().enumerate() {
            if !usage.models.get(i).copied().unwrap_or(true) {
                self.out.push(
                    Diagnostic::lint("unused-model", format!("model `{}` is never used", m.name))
                        .with_label(m.name_span, "declared here")
                        .with_help("use it in a route or constraint, or remove it"),
                );
            }
        }
        for (i, pr) in self.p.providers.iter().enumerate() {
            if !usage.providers.get(i).copied().unwrap_or(true) {
                self.out.push(
                    Diagnostic::lint(
                        "unused-provider",
                        format!("provider `{}` has no models", pr.name),
                    )
                    .with_label(pr.span, "declared here")
                    .with_help("declare a model with this provider, or remove it"),
                );
            }
        }
        self.unused_attributes();
        self.similar_capabilities();
        for r in &self.p.routes {
            let name = self.intent_name(r.intent).to_string();
            if let (Some(first), Some(last)) = (r.score.first(), r.score.last()) {
                if r.score.iter().all(|w| w.weight == 0.0) {
                    self.out.push(
                        Diagnostic::lint("zero-weights", format!("every score weight of route `{name}` is zero"))
                            .with_label(first.span.to(last.span), "all weights are 0")
                            .with_help("give at least one signal a weight, or remove `score` to use the default (quality, then price)"),
                    );
                }
            }
            self.settings_without_effect(r, &name);
            if let ([only], []) = (r.candidates.as_slice(), r.fallback.as_slice()) {
                self.out.push(
                    Diagnostic::lint("single-candidate", format!("route `{name}` has a single candidate and no fallback"))
                        .with_label(only.span, "the only model")
                        .with_help("when this model fails or is unavailable the request fails; add a second candidate or a `fallback [..]`"),
                );
            }
            let entries = r
                .candidates
                .iter()
                .map(|c| (c.model, c.span))
                .chain(r.fallback.iter().filter_map(|f| match f.target {
                    FallbackTarget::Model(m) => Some((m, f.span)),
                    FallbackTarget::Route(_) => None,
                }))
                .chain(r.downgrade.iter().map(|c| (c.model, c.span)));
            let entries: Vec<(ModelId, Span)> = entries.collect();
            self.mixed_kinds(&entries, &name);
            let disabled: Vec<(ModelId, Span)> = entries
                .into_iter()
                .filter(|(m, _)| self.p.model(*m).is_some_and(|m| !m.enabled))
                .collect();
            for (m, span) in disabled {
                let mname = self.model_name(m).to_string();
                self.out.push(
                    Diagnostic::lint("disabled-candidate", format!("model `{mname}` is disabled"))
                        .with_label(span, "never selected while disabled")
                        .with_help(format!(
                            "remove it from route `{name}`, or enable the model"
                        )),
                );
            }
        }
    }

    /// A route whose models are of different kinds: a request only goes to
    /// models whose kind serves its endpoint, so an embeddings model among
    /// chat models never serves this route's chat requests (and would have
    /// won them on price if it could).
    fn mixed_kinds(&mut self, entries: &[(ModelId, Span)], route: &str) {
        let kind = |m: ModelId| self.p.model(m).map(|m| m.kind);
        let Some(first) = entries.first().and_then(|(m, _)| kind(*m)) else {
            return;
        };
        let odd: Vec<(ModelId, Span)> = entries
            .iter()
            .copied()
            .filter(|(m, _)| kind(*m).is_some_and(|k| k != first))
            .collect();
        for (m, span) in odd {
            let other = kind(m).map_or("", |k| k.as_str());
            let model = self.model_name(m).to_string();
            self.out.push(
                Diagnostic::lint(
                    "mixed-kinds",
                    format!(
                        "route `{route}` mixes model kinds: `{model}` is {other}, its first candidate is {}",
                        first.as_str()
                    ),
                )
                .with_label(span, format!("serves only {other} requests"))
                .with_help(format!(
                    "a request goes only to models whose kind serves its endpoint, so `{model}` never serves what the route's {} models serve; give it its own intent and route",
                    first.as_str()
                )),
            );
        }
    }

    /// A capability one model declares that is one edit away from another's
    /// (`visoin` beside `vision`): that model would quietly fail every
    /// `model.caps has vision` and be removed where it should serve.
    fn similar_capabilities(&mut self) {
        // Each capability, with the models declaring it.
        let mut owners: std::collections::BTreeMap<&str, Vec<&crate::ir::Model>> =
            Default::default();
        for m in &self.p.models {
            for c in &m.caps {
                owners.entry(c.as_str()).or_default().push(m);
            }
        }
        let mut found = Vec::new();
        for (cap, models) in &owners {
            let [lone] = models.as_slice() else { continue };
            if cap.chars().count() < 4 {
                continue;
            }
            for (near, near_models) in &owners {
                // A lone pair is reported once, from its first name.
                let pair_seen = near_models.len() == 1 && near < cap;
                // `gen4` beside `gen5` names two generations, not a typo.
                let letters = |s: &str| {
                    s.chars()
                        .filter(|c| !c.is_ascii_digit())
                        .collect::<String>()
                };
                if near == cap
                    || pair_seen
                    || strsim::damerau_levenshtein(cap, near) != 1
                    || letters(cap) == letters(near)
                {
                    continue;
                }
                let others = near_models
                    .iter()
                    .map(|m| format!("`{}`", m.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                let first_other = near_models.first().map(|m| m.name_span);
                found.push((
                    lone.name.clone(),
                    lone.name_span,
                    cap.to_string(),
                    near.to_string(),
                    others,
                    first_other,
                ));
            }
        }
        for (model, span, cap, near, others, other_span) in found {
            let mut d = Diagnostic::lint(
                "similar-capability",
                format!("model `{model}` declares `{cap}`, one letter from `{near}` ({others})"),
            )
            .with_label(span, format!("the only model with `{cap}`"))
            .with_help(format!(
                "spell both the same: `model.caps has {near}` does not see `{cap}`, nor the other way round"
            ));
            if let Some(o) = other_span {
                d = d.with_label(o, format!("declares `{near}`"));
            }
            self.out.push(d);
        }
    }

    /// Route settings that can never change a decision: written in the
    /// belief that they do, they would sit in the policy doing nothing.
    fn settings_without_effect(&mut self, r: &crate::ir::Route, name: &str) {
        if let Some(when) = &r.premium_only {
            let premium = |m: ModelId| {
                self.p
                    .model(m)
                    .is_some_and(|m| m.tier == crate::ir::Tier::Premium)
            };
            let any_premium = r.candidates.iter().any(|c| premium(c.model))
                || r.fallback.iter().any(|f| match f.target {
                    FallbackTarget::Model(m) => premium(m),
                    // Another route's models: not worth guessing here.
                    FallbackTarget::Route(_) => true,
                });
            if !any_premium {
                self.out.push(
                    Diagnostic::lint(
                        "no-effect",
                        format!("`premium only` on route `{name}` never applies"),
                    )
                    .with_label(
                        when.span,
                        "no candidate or fallback of this route is premium",
                    )
                    .with_help(
                        "mark the models meant here `tier premium`, or remove `premium only`",
                    ),
                );
            }
        }
        let downgrades = self.p.protect.budgets.iter().any(|b| {
            b.thresholds
                .iter()
                .any(|t| t.action == crate::ir::BudgetAction::Downgrade)
        });
        if let (false, Some(first), Some(last)) =
            (downgrades, r.downgrade.first(), r.downgrade.last())
        {
            self.out.push(
                Diagnostic::lint(
                    "no-effect",
                    format!("the `downgrade` list of route `{name}` is never used"),
                )
                .with_label(
                    first.span.to(last.span),
                    "used only when a budget downgrades",
                )
                .with_help("add `downgrade at N%` to a budget in `protect`, or remove the list"),
            );
        }
    }

    fn unused_attributes(&mut self) {
        let mut tenant = vec![false; self.p.tenant_attrs.len()];
        let mut request = vec![false; self.p.request_attrs.len()];
        let feature = self.p.request_attr("feature");
        let mark_feature = |request: &mut Vec<bool>| {
            if let Some(slot) = feature.and_then(|f| request.get_mut(f.index())) {
                *slot = true;
            }
        };
        let mut fs = Vec::new();
        for c in all_conds(self.p) {
            fields(c, &mut fs);
        }
        for f in fs {
            match f {
                Field::Tenant(id) => set(&mut tenant, *id),
                Field::Request(RequestField::Meta(id)) => set(&mut request, *id),
                Field::Request(RequestField::Feature) => mark_feature(&mut request),
                _ => {}
            }
        }
        for b in &self.p.protect.budgets {
            if let crate::ir::BudgetAmount::TenantAttr(id) = b.amount {
                set(&mut tenant, id);
            }
            if matches!(
                b.scope,
                crate::ir::BudgetScope::Feature | crate::ir::BudgetScope::TenantFeature
            ) {
                mark_feature(&mut request);
            }
        }
        if self
            .p
            .protect
            .limits
            .iter()
            .any(|l| l.scope == crate::ir::LimitScope::Feature)
        {
            mark_feature(&mut request);
        }
        for (scope, attrs, used) in [
            ("tenant", &self.p.tenant_attrs, &tenant),
            ("request", &self.p.request_attrs, &request),
        ] {
            for (a, u) in attrs.iter().zip(used.iter()) {
                if !u {
                    self.out.push(
                        Diagnostic::lint(
                            "unused-attribute",
                            format!("`{scope}.{}` is never read", a.name),
                        )
                        .with_label(a.span, "declared here")
                        .with_help("use it in a condition or budget, or remove it"),
                    );
                }
            }
        }
    }

    /// Classify rules (and refined routes of one intent) that can never match
    /// because an earlier rule matches whenever they do.
    fn shadowed(&mut self) {
        let rules: Vec<RuleRef> = self
            .p
            .classify
            .iter()
            .map(|r| {
                (
                    r.when.as_ref().map(|w| &w.cond),
                    r.span,
                    r.intent,
                    "classify rule",
                )
            })
            .collect();
        self.shadowed_in(&rules);
        let mut per_intent: HashMap<IntentId, Vec<RuleRef>> = HashMap::new();
        for r in self.p.routes.iter().filter(|r| r.when.is_some()) {
            per_intent.entry(r.intent).or_default().push((
                r.when.as_ref().map(|w| &w.cond),
                r.name_span,
                r.intent,
                "route",
            ));
        }
        let mut groups: Vec<_> = per_intent.into_values().collect();
        groups.sort_by_key(|g| g.first().map(|x| (x.1.file, x.1.start)));
        for g in groups {
            self.shadowed_in(&g);
        }
    }

    fn shadowed_in(&mut self, rules: &[RuleRef]) {
        let mut otherwise: Option<Span> = None;
        // Earlier rules' disjuncts by structural hash, with the rule's span.
        let mut seen: HashMap<u64, Vec<(&Cond, Span)>> = HashMap::new();
        // Per field: the values earlier single `==`/`in` disjuncts cover.
        let mut covered: HashMap<&Field, (Vec<&Value>, Span)> = HashMap::new();
        for &(cond, span, intent, kind) in rules {
            let what = || format!("{kind} `{}`", self.intent_name(intent));
            if let Some(o) = otherwise {
                let d = Diagnostic::lint("shadowed-rule", format!("{} can never match", what()))
                    .with_label(span, "never reached")
                    .with_label(o, "this `otherwise` matches every request first")
                    .with_help("move it before the `otherwise` rule, or remove it");
                self.out.push(d);
                continue;
            }
            let Some(cond) = cond else {
                otherwise = Some(span);
                continue;
            };
            let conjuncts: &[Cond] = match cond {
                Cond::And(xs) => xs,
                c => std::slice::from_ref(c),
            };
            let mut by: Option<Span> = None;
            for c in conjuncts {
                let same = seen
                    .get(&cond_hash(c))
                    .and_then(|v| v.iter().find(|(x, _)| cond_eq(x, c)));
                if let Some((_, s)) = same {
                    by = Some(*s);
                    break;
                }
                if let Some((f, vs)) = eq_values(c) {
                    if let Some((cov, s)) = covered.get(f) {
                        if vs.iter().all(|v| cov.contains(&v)) {
                            by = Some(*s);
                            break;
                        }
                    }
                }
            }
            if let Some(b) = by {
                let d = Diagnostic::lint("shadowed-rule", format!("{} can never match", what()))
                    .with_label(span, "never reached")
                    .with_label(b, "this earlier rule matches whenever it would")
                    .with_help("make the condition more specific than the earlier rule, move it first, or remove it");
                self.out.push(d);
                continue;
            }
            let disjuncts: &[Cond] = match cond {
                Cond::Or(xs) => xs,
                c => std::slice::from_ref(c),
            };
            for d in disjuncts {
                seen.entry(cond_hash(d)).or_default().push((d, span));
                if let Some((f, vs)) = eq_values(d) {
                    let e = covered.entry(f).or_insert_with(|| (Vec::new(), span));
                    e.0.extend(vs.iter());
                    e.1 = span;
                }
            }
        }
    }

    // ------------------------------------------------------------ tenant classes

    fn never_fires(&mut self, classes: &Classes) {
        for c in &self.p.constraints {
            if c.removes.is_empty() {
                let (label, help) = match c.effect {
                    crate::ir::Effect::Deny => ("denies no declared model", "check the target: no model of this policy matches it"),
                    crate::ir::Effect::AllowOnly => ("allows every declared model", "an allowlist that names every model removes nothing; narrow it or remove it"),
                    crate::ir::Effect::Require => ("every declared model meets this requirement", "the requirement removes nothing; check the condition or remove the rule"),
                };
                self.out.push(
                    Diagnostic::lint(
                        "never-fires",
                        format!("constraint `{}` never removes a model", c.name),
                    )
                    .with_label(c.span, label)
                    .with_help(help),
                );
                continue;
            }
            let Some(w) = &c.when else { continue };
            if classes.all.iter().all(|t| eval3(&w.cond, t) == Tri::False) {
                self.out.push(
                    Diagnostic::lint("never-fires", format!("constraint `{}` can never fire", c.name))
                        .with_label(w.span, "false for every tenant")
                        .with_help("the condition contradicts itself over the declared tenant attribute values"),
                );
            }
        }
    }

    fn coverage(&mut self, classes: &Classes) {
        let p = self.p;
        let nm = p.models.len();
        let ni = p.intents.len();
        let mut refined: Vec<Vec<usize>> = vec![Vec::new(); ni];
        let mut default: Vec<Option<usize>> = vec![None; ni];
        for (i, r) in p.routes.iter().enumerate() {
            if r.when.is_some() {
                if let Some(v) = refined.get_mut(r.intent.index()) {
                    v.push(i);
                }
            } else if let Some(d) = default.get_mut(r.intent.index()) {
                d.get_or_insert(i);
            }
        }
        // Per route entry (candidates, model fallbacks, downgrades): whether it
        // survived in some class the route applies to, and the first remover.
        let mut entry_state: Vec<Vec<EntryState>> = p
            .routes
            .iter()
            .map(|r| {
                vec![
                    EntryState::default();
                    r.candidates.len() + r.fallback.len() + r.downgrade.len()
                ]
            })
            .collect();
        let mut holes: Vec<Vec<Hole>> = vec![Vec::new(); p.routes.len()];
        let mut removed: Vec<Option<ConstraintId>> = vec![None; nm];
        let mut reachable = vec![false; ni];
        // Constraints whose condition reads no tenant attribute fire the same
        // way for every class: resolve them once, keep the rest per class.
        let mut base: Vec<Option<ConstraintId>> = vec![None; nm];
        let mut per_class: Vec<usize> = Vec::new();
        for (ci, c) in p.constraints.iter().enumerate() {
            let fixed = match &c.when {
                None => Some(Tri::True),
                Some(w) if !reads_tenant(&w.cond) => Some(eval3(&w.cond, &[])),
                Some(_) => None,
            };
            match fixed {
                Some(Tri::True) => {
                    for m in &c.removes {
                        if let Some(slot) = base.get_mut(m.index()) {
                            slot.get_or_insert(ConstraintId(ci as u32));
                        }
                    }
                }
                Some(_) => {}
                None => per_class.push(ci),
            }
        }
        let classify_fixed: Vec<Option<Tri>> = p
            .classify
            .iter()
            .map(|r| match &r.when {
                None => Some(Tri::True),
                Some(w) if !reads_tenant(&w.cond) => Some(eval3(&w.cond, &[])),
                Some(_) => None,
            })
            .collect();
        for tenant in &classes.all {
            removed.clone_from(&base);
            for &ci in &per_class {
                let Some(c) = p.constraints.get(ci) else {
                    continue;
                };
                let fires = c
                    .when
                    .as_ref()
                    .is_none_or(|w| eval3(&w.cond, tenant) == Tri::True);
                if fires {
                    let id = ConstraintId(ci as u32);
                    for m in &c.removes {
                        if let Some(slot) = removed.get_mut(m.index()) {
                            // The first rule in source order is the one named.
                            if slot.is_none_or(|old| id < old) {
                                *slot = Some(id);
                            }
                        }
                    }
                }
            }
            reachable.iter_mut().for_each(|r| *r = false);
            for (rule, fixed) in p.classify.iter().zip(&classify_fixed) {
                let t = match fixed {
                    Some(t) => *t,
                    None => rule
                        .when
                        .as_ref()
                        .map_or(Tri::True, |w| eval3(&w.cond, tenant)),
                };
                if t != Tri::False {
                    if let Some(r) = reachable.get_mut(rule.intent.index()) {
                        *r = true;
                    }
                }
                if t == Tri::True {
                    break;
                }
            }
            for intent in 0..ni {
                if !reachable.get(intent).copied().unwrap_or(false) {
                    continue;
                }
                let mut applying: Vec<usize> = Vec::new();
                let mut sure = false;
                for &ri in refined.get(intent).map_or(&[][..], |v| &v[..]) {
                    let t = p
                        .routes
                        .get(ri)
                        .and_then(|r| r.when.as_ref())
                        .map_or(Tri::True, |w| eval3(&w.cond, tenant));
                    if t != Tri::False {
                        applying.push(ri);
                    }
                    if t == Tri::True {
                        sure = true;
                        break;
                    }
                }
                if !sure {
                    if let Some(d) = default.get(intent).copied().flatten() {
                        applying.push(d);
                    }
                }
                for ri in applying {
                    let Some(route) = p.routes.get(ri) else {
                        continue;
                    };
                    if route.candidates.is_empty() && route.fallback.is_empty() {
                        continue; // empty-route says it already
                    }
                    let premium_ok = route
                        .premium_only
                        .as_ref()
                        .is_none_or(|w| eval3(&w.cond, tenant) == Tri::True);
                    let status = |m: ModelId| -> Status {
                        let Some(model) = p.model(m) else {
                            return Status::Disabled;
                        };
                        if let Some(Some(c)) = removed.get(m.index()) {
                            return Status::Removed(*c);
                        }
                        if !model.enabled {
                            return Status::Disabled;
                        }
                        Status::Ok
                    };
                    // Layering: entries removed in every applicable class.
                    let states = entry_state.get_mut(ri);
                    if let Some(states) = states {
                        for ((m, _), st) in route_entries(route).zip(states.iter_mut()) {
                            st.applies = true;
                            match status(m) {
                                Status::Removed(c) => {
                                    st.remover.get_or_insert(c);
                                }
                                _ => st.survives = true,
                            }
                        }
                    }
                    // Coverage: some candidate or fallback must survive.
                    let mut why: Vec<(ModelId, Span, Why)> = Vec::new();
                    let mut ok = false;
                    // Few routes fall back to routes: a short list beats a bitset per route.
                    let mut visited: Vec<IntentId> = Vec::new();
                    let mut pending: Vec<(&crate::ir::Route, Option<Span>)> = vec![(route, None)];
                    while let Some((r, via)) = pending.pop() {
                        let prem = if std::ptr::eq(r, route) {
                            premium_ok
                        } else {
                            r.premium_only
                                .as_ref()
                                .is_none_or(|w| eval3(&w.cond, tenant) == Tri::True)
                        };
                        let models = r.candidates.iter().map(|c| (c.model, c.span)).chain(
                            r.fallback.iter().filter_map(|f| match f.target {
                                FallbackTarget::Model(m) => Some((m, f.span)),
                                FallbackTarget::Route(_) => None,
                            }),
                        );
                        for (m, span) in models {
                            let span = via.unwrap_or(span);
                            match status(m) {
                                Status::Ok
                                    if !prem
                                        && p.model(m).is_some_and(|x| x.tier == Tier::Premium) =>
                                {
                                    why.push((m, span, Why::Premium))
                                }
                                Status::Ok => {
                                    ok = true;
                                    break;
                                }
                                Status::Removed(c) => why.push((m, span, Why::Constraint(c))),
                                Status::Disabled => why.push((m, span, Why::Disabled)),
                            }
                        }
                        if ok {
                            break;
                        }
                        for f in &r.fallback {
                            if let FallbackTarget::Route(t) = f.target {
                                {
                                    if !visited.contains(&t) {
                                        visited.push(t);
                                        if let Some(d) = default
                                            .get(t.index())
                                            .copied()
                                            .flatten()
                                            .and_then(|d| p.routes.get(d))
                                        {
                                            pending.push((d, Some(via.unwrap_or(f.span))));
                                        }
                                    }
                                }
                            }
                        }
                    }
                    if !ok {
                        if let Some(h) = holes.get_mut(ri) {
                            h.push(Hole {
                                class: classes.describe(tenant),
                                why,
                            });
                        }
                    }
                }
            }
        }
        for (ri, (route, states)) in p.routes.iter().zip(entry_state.iter()).enumerate() {
            for ((m, span), st) in route_entries(route).zip(states) {
                if st.applies && !st.survives {
                    if let Some(c) = st.remover.and_then(|c| p.constraints.get(c.index())) {
                        let mname = self.model_name(m).to_string();
                        let iname = self.intent_name(route.intent).to_string();
                        self.out.push(
                            Diagnostic::error("candidate-denied", format!("model `{mname}` in route `{iname}` is removed by constraint `{}` wherever the route applies", c.name))
                                .with_label(span, "never allowed here")
                                .with_label(c.span, format!("`{}` removes `{mname}`", c.name))
                                .with_help("constraints always win over routes: remove the model from the route, or narrow the constraint"),
                        );
                    }
                }
            }
            let Some(hs) = holes.get(ri) else { continue };
            let Some(first) = hs.first() else { continue };
            let iname = self.intent_name(route.intent).to_string();
            let mut d = Diagnostic::error(
                "coverage-hole",
                format!("no model is left for intent `{iname}` for {}", first.class),
            )
            .with_label(
                route.name_span,
                "no candidate or fallback of this route survives",
            );
            let mut parts = Vec::new();
            let mut labelled: HashSet<(u32, u32, u32)> = HashSet::new();
            for (m, span, why) in &first.why {
                let mname = self.model_name(*m).to_string();
                let reason = match why {
                    Why::Constraint(c) => format!(
                        "removed by `{}`",
                        p.constraints
                            .get(c.index())
                            .map_or("?", |c| c.name.as_str())
                    ),
                    Why::Disabled => "disabled".to_string(),
                    Why::Premium => "premium, not allowed by `premium only`".to_string(),
                };
                parts.push(format!("`{mname}` {reason}"));
                if labelled.insert((span.file.0, span.start, span.end)) {
                    d = d.with_label(*span, format!("`{mname}` {reason}"));
                }
            }
            let more = if hs.len() > 1 {
                let others: Vec<&str> = hs
                    .iter()
                    .skip(1)
                    .take(3)
                    .map(|h| h.class.trim_start_matches("tenant class "))
                    .collect();
                let ell = if hs.len() > 4 { ", ..." } else { "" };
                format!(
                    " (also {} other tenant class{}: {}{ell})",
                    hs.len() - 1,
                    if hs.len() > 2 { "es" } else { "" },
                    others.join("; ")
                )
            } else {
                String::new()
            };
            d = d.with_help(format!(
                "{}; add a candidate or fallback the constraints keep for this tenant class, or narrow the constraint{more}",
                parts.join(", ")
            ));
            self.out.push(d);
        }
    }
}

fn set(v: &mut [bool], id: AttrId) {
    if let Some(s) = v.get_mut(id.index()) {
        *s = true;
    }
}

/// The models a route names: candidates, model fallbacks, downgrades.
fn route_entries(r: &crate::ir::Route) -> impl Iterator<Item = (ModelId, Span)> + '_ {
    r.candidates
        .iter()
        .map(|c| (c.model, c.span))
        .chain(r.fallback.iter().filter_map(|f| match f.target {
            FallbackTarget::Model(m) => Some((m, f.span)),
            FallbackTarget::Route(_) => None,
        }))
        .chain(r.downgrade.iter().map(|c| (c.model, c.span)))
}

#[derive(Clone, Copy)]
enum Status {
    Ok,
    Removed(ConstraintId),
    Disabled,
}

#[derive(Clone, Copy, Debug)]
enum Why {
    Constraint(ConstraintId),
    Disabled,
    Premium,
}

#[derive(Clone, Debug)]
struct Hole {
    class: String,
    why: Vec<(ModelId, Span, Why)>,
}

#[derive(Clone, Copy, Default)]
struct EntryState {
    applies: bool,
    survives: bool,
    remover: Option<ConstraintId>,
}

/// A structural hash of a condition: equal conditions hash equal.
fn cond_hash(c: &Cond) -> u64 {
    use std::hash::{Hash, Hasher};
    fn value(v: &Value, h: &mut impl Hasher) {
        match v {
            Value::Bool(b) => (0u8, b).hash(h),
            Value::Number(n) => (1u8, n.to_bits()).hash(h),
            Value::Str(s) => (2u8, s).hash(h),
            Value::Enum(i) => (3u8, i).hash(h),
            Value::List(vs) => {
                (4u8, vs.len()).hash(h);
                vs.iter().for_each(|v| value(v, h));
            }
        }
    }
    fn go(c: &Cond, h: &mut impl Hasher) {
        std::mem::discriminant(c).hash(h);
        match c {
            Cond::True | Cond::False => {}
            Cond::Not(x) => go(x, h),
            Cond::And(xs) | Cond::Or(xs) => {
                xs.len().hash(h);
                xs.iter().for_each(|x| go(x, h));
            }
            Cond::Bool(f) => f.hash(h),
            Cond::Cmp(f, op, v) => {
                f.hash(h);
                op.hash(h);
                value(v, h);
            }
            Cond::In(f, vs) => {
                f.hash(h);
                vs.iter().for_each(|v| value(v, h));
            }
            Cond::Has(f, v) => {
                f.hash(h);
                value(v, h);
            }
            Cond::Matches(f, re) => (f, re.0.as_str()).hash(h),
            Cond::Contains(f, ws) => (f, ws).hash(h),
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    go(c, &mut h);
    h.finish()
}

/// Structural equality of conditions (`Cond` has no `PartialEq`: regexes).
fn cond_eq(a: &Cond, b: &Cond) -> bool {
    let all = |xs: &[Cond], ys: &[Cond]| {
        xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| cond_eq(x, y))
    };
    match (a, b) {
        (Cond::True, Cond::True) | (Cond::False, Cond::False) => true,
        (Cond::Not(x), Cond::Not(y)) => cond_eq(x, y),
        (Cond::And(xs), Cond::And(ys)) | (Cond::Or(xs), Cond::Or(ys)) => all(xs, ys),
        (Cond::Bool(f), Cond::Bool(g)) => f == g,
        (Cond::Cmp(f, o, v), Cond::Cmp(g, p, w)) => f == g && o == p && v == w,
        (Cond::In(f, vs), Cond::In(g, ws)) => f == g && vs == ws,
        (Cond::Has(f, v), Cond::Has(g, w)) => f == g && v == w,
        (Cond::Matches(f, r), Cond::Matches(g, s)) => f == g && r.0.as_str() == s.0.as_str(),
        (Cond::Contains(f, v), Cond::Contains(g, w)) => f == g && v == w,
        _ => false,
    }
}

/// `f == v` or `f in [..]`: the field and the values.
fn eq_values(c: &Cond) -> Option<(&Field, &[Value])> {
    match c {
        Cond::Cmp(f, CmpOp::Eq, v) => Some((f, std::slice::from_ref(v))),
        Cond::In(f, vs) => Some((f, vs.as_slice())),
        _ => None,
    }
}

/// The tenant classes to enumerate.
pub struct Classes<'a> {
    p: &'a Policy,
    /// The attributes enumerated, in declaration order.
    attrs: Vec<AttrId>,
    /// One value vector per class, indexed by attribute id.
    pub all: Vec<Vec<Option<Value>>>,
}

impl<'a> Classes<'a> {
    pub fn new(p: &'a Policy) -> Self {
        let mut read = vec![false; p.tenant_attrs.len()];
        let mut fs = Vec::new();
        for c in all_conds(p) {
            fields(c, &mut fs);
        }
        for f in fs {
            if let Field::Tenant(id) = f {
                set(&mut read, *id);
            }
        }
        let mut attrs = Vec::new();
        let mut all: Vec<Vec<Option<Value>>> = vec![vec![None; p.tenant_attrs.len()]];
        for (i, a) in p.tenant_attrs.iter().enumerate() {
            if !read.get(i).copied().unwrap_or(false) {
                continue;
            }
            let Some(values) = a.ty.finite_values() else {
                continue;
            };
            if values.is_empty() || all.len().saturating_mul(values.len()) > MAX_CLASSES {
                continue;
            }
            attrs.push(AttrId(i as u32));
            let mut next = Vec::with_capacity(all.len() * values.len());
            for class in &all {
                for v in &values {
                    let mut c = class.clone();
                    if let Some(slot) = c.get_mut(i) {
                        *slot = Some(v.clone());
                    }
                    next.push(c);
                }
            }
            all = next;
        }
        Classes { p, attrs, all }
    }

    /// `plan=free, eu=true`, or `any tenant` when nothing is enumerated.
    pub fn describe(&self, class: &[Option<Value>]) -> String {
        let parts: Vec<String> = self
            .attrs
            .iter()
            .filter_map(|id| {
                let a = self.p.tenant_attrs.get(id.index())?;
                let v = class.get(id.index())?.as_ref()?;
                let text = match (v, &a.ty) {
                    (Value::Enum(i), crate::ir::Type::Enum(names)) => {
                        names.get(*i as usize).cloned().unwrap_or_default()
                    }
                    (Value::Bool(b), _) => b.to_string(),
                    (other, _) => format!("{other:?}"),
                };
                Some(format!("{}={text}", a.name))
            })
            .collect();
        if parts.is_empty() {
            "any tenant".to_string()
        } else {
            format!("tenant class `{}`", parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests;
