//! Explanations: the same evaluation as [`decide`](super::decide) with a
//! recorder attached, turned into a [`Trace`] with names and `file:line`.

use std::fmt::{self, Write as _};

use serde::Serialize;

use super::{run, Cand, Classified, Decision, RequestFeatures, Stats, Tracer};
use crate::compile::{CompiledPolicy, TenantView, SIGNALS};
use crate::ir::{
    BudgetAction, BudgetAmount, BudgetPeriod, ConstraintId, LimitKind, Micros, ModelId, RetryOn,
};

#[derive(Default)]
struct Recorder {
    live: Vec<ConstraintId>,
    classified: Option<Classified>,
    premium: Option<bool>,
    scored: Vec<Cand>,
    budget: Option<BudgetAction>,
    premium_held: bool,
}

impl Tracer for Recorder {
    fn live_fired(&mut self, c: ConstraintId) {
        self.live.push(c);
    }
    fn classified(&mut self, how: Classified) {
        self.classified = Some(how);
    }
    fn premium(&mut self, ok: bool) {
        self.premium = Some(ok);
    }
    fn scored(&mut self, c: &Cand) {
        self.scored.push(*c);
    }
    fn budget(&mut self, a: BudgetAction) {
        self.budget = Some(a);
    }
    fn premium_held(&mut self) {
        self.premium_held = true;
    }
}

/// Why a decision came out the way it did. Serialises to JSON for the
/// gateway's decision log; `Display` renders it for people.
#[derive(Clone, Debug, Serialize)]
pub struct Trace {
    pub policy_version: String,
    pub tenant: String,
    pub request: RequestFeatures,
    /// Constraints that fired, in source order, with the models each removed.
    pub constraints: Vec<FiredConstraint>,
    /// Enabled models whose kind cannot answer this request's endpoint
    /// (an embeddings model for a chat completion): layer 1 removes them
    /// before any rule.
    pub cannot_serve: Vec<String>,
    /// Models left after layer 1.
    pub allowed: Vec<String>,
    pub classification: Option<Classification>,
    pub route: Option<RouteTrace>,
    pub candidates: Vec<CandidateTrace>,
    pub budget_action: Option<BudgetAction>,
    /// Premium models were held back until the client confirms: the
    /// `confirm premium` threshold, also past a `downgrade` one.
    pub premium_held: bool,
    /// The final order of attempts.
    pub attempts: Vec<String>,
    pub estimated_cost_micros: Micros,
    pub estimated_cost: String,
    /// `ok`, or the denial's code.
    pub outcome: String,
    pub denial: Option<String>,
    pub protection: Vec<String>,
    #[serde(skip)]
    pub decision: Decision,
}

#[derive(Clone, Debug, Serialize)]
pub struct FiredConstraint {
    pub name: String,
    pub location: String,
    /// True when resolved from the tenant alone.
    pub tenant_only: bool,
    /// Enabled models this rule removes (another rule may remove them too).
    pub removed: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Classification {
    pub intent: String,
    /// `rule` (with its location) or `requested` (the client named the intent).
    pub by: String,
    pub location: Option<String>,
    /// For a client-named model.
    pub requested_model: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RouteTrace {
    pub intent: String,
    pub location: String,
    pub refined: bool,
    /// Whether `premium only when` held (true when the route has none).
    pub premium_allowed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CandidateTrace {
    pub model: String,
    /// `scored`, `removed by <rule>`, `premium not allowed`, `disabled`,
    /// `cannot serve <endpoint> (kind <kind>)`.
    pub status: String,
    pub terms: Vec<ScoreTerm>,
    pub score: Option<f64>,
    pub estimated_cost_micros: Option<Micros>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScoreTerm {
    pub signal: &'static str,
    pub weight: f64,
    /// The normalised signal in [0, 1].
    pub value: f64,
    pub contribution: f64,
}

/// Dollars with enough digits for sub-cent estimates.
pub fn dollars(m: Micros) -> String {
    format!("${}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// Explains the decision for a request: the same evaluation as `decide`, recorded.
pub fn explain(p: &CompiledPolicy, t: &TenantView, r: &RequestFeatures, s: &dyn Stats) -> Trace {
    let mut rec = Recorder::default();
    let decision = run(p, t, r, s, &mut rec);
    let policy = p.policy();
    let names = |ms: &mut dyn Iterator<Item = ModelId>| {
        ms.map(|m| p.model_name(m).to_string()).collect::<Vec<_>>()
    };

    let mut fired: Vec<(ConstraintId, bool)> = t
        .fired
        .iter()
        .map(|c| (*c, true))
        .chain(rec.live.iter().map(|c| (*c, false)))
        .collect();
    fired.sort();
    let constraints = fired
        .iter()
        .filter_map(|(id, tenant_only)| {
            let c = policy.constraints.get(id.index())?;
            let cc = p.constraints.get(id.index())?;
            Some(FiredConstraint {
                name: c.name.clone(),
                location: p.location(c.span),
                tenant_only: *tenant_only,
                removed: names(&mut cc.removes.iter().filter(|m| p.enabled.contains(*m))),
            })
        })
        .collect();
    let endpoint = r.endpoint;
    let wrong_kind = p
        .not_serving
        .get(endpoint as usize)
        .cloned()
        .unwrap_or_else(|| crate::compile::ModelSet::empty(policy.models.len()));
    let cannot_serve = names(&mut wrong_kind.iter().filter(|m| p.enabled.contains(*m)));
    let mut allowed = t.allowed.clone();
    allowed.remove_all(&wrong_kind);
    for id in &rec.live {
        if let Some(c) = p.constraints.get(id.index()) {
            allowed.remove_all(&c.removes);
        }
    }

    let requested_model = (!r.is_auto()
        && p.model_by_name(r.model.as_deref().unwrap_or("")).is_some())
    .then(|| r.model.clone())
    .flatten();
    let classification = decision.intent.map(|i| {
        let (by, location) = match rec.classified {
            Some(Classified::Rule(rule)) => (
                "rule",
                policy
                    .classify
                    .get(rule as usize)
                    .map(|c| p.location(c.span)),
            ),
            _ => ("requested", None),
        };
        Classification {
            intent: p.intent_name(i).to_string(),
            by: by.into(),
            location,
            requested_model: requested_model.clone(),
        }
    });
    let route = decision.route.and_then(|rid| {
        let r = policy.routes.get(rid.index())?;
        Some(RouteTrace {
            intent: p.intent_name(r.intent).to_string(),
            location: p.location(r.span),
            refined: r.when.is_some(),
            premium_allowed: rec.premium.unwrap_or(true),
        })
    });

    let mut candidates = Vec::new();
    if let Some(r) = decision
        .route
        .and_then(|rid| policy.routes.get(rid.index()))
    {
        let weights = p
            .routes
            .get(decision.route.map_or(0, |r| r.index()))
            .map(|r| r.weights)
            .unwrap_or_default();
        for c in &r.candidates {
            let m = c.model;
            let scored = rec.scored.iter().find(|s| s.model == m);
            let status = if scored.is_some() {
                "scored".to_string()
            } else if !p.enabled.contains(m) {
                "disabled".to_string()
            } else if wrong_kind.contains(m) {
                format!(
                    "cannot serve {} (kind {})",
                    super::endpoint_path(endpoint),
                    policy.model(m).map_or("?", |x| x.kind.as_str())
                )
            } else if !allowed.contains(m) {
                let by = fired.iter().find(|(id, _)| {
                    p.constraints
                        .get(id.index())
                        .is_some_and(|k| k.removes.contains(m))
                });
                match by {
                    Some((id, _)) => format!("removed by `{}`", p.constraint_name(*id)),
                    None => "removed".to_string(),
                }
            } else if requested_model.is_some() {
                "not scored: the request names a model".to_string()
            } else if rec.premium == Some(false) && p.premium.contains(m) {
                "premium not allowed".to_string()
            } else {
                "not scored".to_string()
            };
            let terms = scored
                .map(|s| {
                    SIGNALS
                        .iter()
                        .zip(weights.iter())
                        .zip(s.signals.iter())
                        .filter(|((_, w), _)| **w != 0.0)
                        .map(|((sig, w), v)| ScoreTerm {
                            signal: sig.as_str(),
                            weight: *w,
                            value: *v,
                            contribution: w * v,
                        })
                        .collect()
                })
                .unwrap_or_default();
            candidates.push(CandidateTrace {
                model: p.model_name(m).to_string(),
                status,
                terms,
                score: scored.map(|s| s.score),
                estimated_cost_micros: scored.map(|s| s.cost),
            });
        }
    }

    let allowed = names(&mut allowed.iter());
    Trace {
        policy_version: p.version().to_string(),
        tenant: t.id.clone(),
        request: r.clone(),
        constraints,
        cannot_serve,
        allowed,
        classification,
        route,
        candidates,
        budget_action: rec.budget,
        premium_held: rec.premium_held,
        attempts: names(&mut decision.attempts.iter().copied()),
        estimated_cost_micros: decision.estimated_cost,
        estimated_cost: dollars(decision.estimated_cost),
        outcome: match &decision.outcome {
            Ok(()) => "ok".into(),
            Err(d) => d.code().into(),
        },
        denial: decision.outcome.as_ref().err().map(|d| d.message(p)),
        protection: protection(p),
        decision,
    }
}

fn action_name(a: BudgetAction) -> &'static str {
    match a {
        BudgetAction::Warn => "warn",
        BudgetAction::ConfirmPremium => "confirm premium",
        BudgetAction::Downgrade => "downgrade",
        BudgetAction::Block => "block",
    }
}

fn scope_name(s: crate::ir::BudgetScope) -> &'static str {
    match s {
        crate::ir::BudgetScope::Tenant => "tenant",
        crate::ir::BudgetScope::Feature => "feature",
        crate::ir::BudgetScope::TenantFeature => "tenant and feature",
    }
}

/// The layer-4 settings, one line each with `file:line`.
fn protection(p: &CompiledPolicy) -> Vec<String> {
    let pr = &p.policy().protect;
    let mut out = Vec::new();
    if let Some(r) = &pr.retry {
        let on: Vec<String> =
            r.on.iter()
                .map(|o| match o {
                    RetryOn::Status(s) => s.to_string(),
                    RetryOn::StatusClass(c) => format!("{c}xx"),
                    RetryOn::Timeout => "timeout".into(),
                    RetryOn::Connect => "connect".into(),
                    RetryOn::Reset => "reset".into(),
                })
                .collect();
        out.push(format!(
            "retry {} on [{}] backoff {}ms..{}ms ({})",
            r.count,
            on.join(", "),
            r.backoff_min_ms,
            r.backoff_max_ms,
            p.location(r.span)
        ));
    }
    let t = &pr.timeout;
    if t.first_token_ms.is_some() || t.total_ms.is_some() {
        let mut s = "timeout".to_string();
        if let Some(ms) = t.first_token_ms {
            let _ = write!(s, " first_token {ms}ms");
        }
        if let Some(ms) = t.total_ms {
            let _ = write!(s, " total {ms}ms");
        }
        if let Some(span) = t.span {
            let _ = write!(s, " ({})", p.location(span));
        }
        out.push(s);
    }
    for b in &pr.breakers {
        out.push(format!(
            "breaker per {} open after {} failures within {}ms, probe after {}ms ({})",
            format!("{:?}", b.scope).to_lowercase(),
            b.failures,
            b.window_ms,
            b.cooldown_ms,
            p.location(b.span)
        ));
    }
    for l in &pr.limits {
        let what = match &l.kind {
            LimitKind::Concurrency(n) => format!("concurrency {n}"),
            LimitKind::Rate {
                requests,
                window_ms,
            } => format!("rate {requests} per {window_ms}ms"),
            LimitKind::Tokens { tokens, window_ms } => format!("tokens {tokens} per {window_ms}ms"),
        };
        out.push(format!(
            "limit {what} per {} ({})",
            format!("{:?}", l.scope).to_lowercase(),
            p.location(l.span)
        ));
    }
    for b in &pr.budgets {
        let period = match b.period {
            BudgetPeriod::Daily => "daily".to_string(),
            BudgetPeriod::Weekly => "weekly".to_string(),
            BudgetPeriod::Monthly => "monthly".to_string(),
            BudgetPeriod::Every(ms) => format!("every {ms}ms"),
        };
        let amount = match &b.amount {
            BudgetAmount::Fixed(m) => dollars(*m),
            BudgetAmount::TenantAttr(a) => format!(
                "tenant.{}",
                p.policy()
                    .tenant_attrs
                    .get(a.index())
                    .map_or("?", |a| a.name.as_str())
            ),
        };
        let th: Vec<String> = b
            .thresholds
            .iter()
            .map(|t| format!("{} at {}%", action_name(t.action), t.percent))
            .collect();
        out.push(format!(
            "budget {period} per {} {amount} {{ {} }} ({})",
            scope_name(b.scope),
            th.join(", "),
            p.location(b.span)
        ));
    }
    out
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "policy {}  tenant `{}`",
            self.policy_version, self.tenant
        )?;
        let r = &self.request;
        writeln!(
            f,
            "request: endpoint {:?}, format {:?}, ~{} input tokens, max_tokens {}, model `{}`{}{}{}",
            r.endpoint,
            r.response_format,
            r.input_tokens,
            r.max_tokens.map_or("-".to_string(), |n| n.to_string()),
            r.model.as_deref().unwrap_or("auto"),
            if r.has_tools { ", tools" } else { "" },
            if r.has_images { ", images" } else { "" },
            r.feature.as_deref().map(|x| format!(", feature `{x}`")).unwrap_or_default(),
        )?;
        writeln!(f, "\nconstraints:")?;
        if self.constraints.is_empty() {
            writeln!(f, "  (none fired)")?;
        }
        for c in &self.constraints {
            let removed = if c.removed.is_empty() {
                "nothing".to_string()
            } else {
                c.removed.join(", ")
            };
            writeln!(
                f,
                "  `{}` ({}) removed {}{}",
                c.name,
                c.location,
                removed,
                if c.tenant_only { "  [tenant]" } else { "" }
            )?;
        }
        if !self.cannot_serve.is_empty() {
            writeln!(
                f,
                "  {} cannot serve {}: removed by kind",
                self.cannot_serve.join(", "),
                crate::decide::endpoint_path(self.request.endpoint)
            )?;
        }
        writeln!(
            f,
            "  allowed: {}",
            if self.allowed.is_empty() {
                "(nothing)".to_string()
            } else {
                self.allowed.join(", ")
            }
        )?;
        if let Some(c) = &self.classification {
            match (&c.location, &c.requested_model) {
                (Some(l), _) => writeln!(f, "\nclassified as `{}` by the rule at {l}", c.intent)?,
                (None, _) => writeln!(f, "\nintent `{}` named by the request", c.intent)?,
            }
            if let Some(m) = &c.requested_model {
                writeln!(
                    f,
                    "  the request names model `{m}`; the route supplies the fallbacks"
                )?;
            }
        }
        if let Some(rt) = &self.route {
            writeln!(
                f,
                "route `{}`{} ({}){}",
                rt.intent,
                if rt.refined { " (refined)" } else { "" },
                rt.location,
                if rt.premium_allowed {
                    ""
                } else {
                    ", premium models not allowed"
                }
            )?;
        }
        if !self.candidates.is_empty() {
            writeln!(f, "\ncandidates:")?;
        }
        for c in &self.candidates {
            match c.score {
                Some(score) => {
                    let terms: Vec<String> = c
                        .terms
                        .iter()
                        .map(|t| format!("{:+.2}*{}({:.3})", t.weight, t.signal, t.value))
                        .collect();
                    writeln!(
                        f,
                        "  {:<24} score {:>7.4}  {}  est {}",
                        c.model,
                        score,
                        if terms.is_empty() {
                            "(default order: quality, then price)".to_string()
                        } else {
                            terms.join(" ")
                        },
                        dollars(c.estimated_cost_micros.unwrap_or(0))
                    )?;
                }
                None => writeln!(f, "  {:<24} {}", c.model, c.status)?,
            }
        }
        if let Some(a) = self.budget_action {
            writeln!(f, "\nbudget action: {}", action_name(a))?;
        }
        if self.premium_held {
            writeln!(
                f,
                "  premium models held back until the client confirms (`x-routeplane-confirm: true`)"
            )?;
        }
        writeln!(
            f,
            "\nattempts: {}",
            if self.attempts.is_empty() {
                "(none)".to_string()
            } else {
                self.attempts.join(" -> ")
            }
        )?;
        writeln!(f, "estimated cost: {}", self.estimated_cost)?;
        match &self.denial {
            Some(d) => writeln!(f, "outcome: denied ({}): {d}", self.outcome)?,
            None => writeln!(f, "outcome: ok")?,
        }
        if !self.protection.is_empty() {
            writeln!(f, "\nprotection:")?;
            for p in &self.protection {
                writeln!(f, "  {p}")?;
            }
        }
        Ok(())
    }
}
