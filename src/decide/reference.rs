//! A plain interpreter of the IR, written for clarity, not speed: the oracle
//! for the differential test of the compiled decision tree. It shares only the
//! documented arithmetic (cost estimate, signal normalisation) with
//! [`decide`](super::decide); conditions, constraints, classification and
//! route selection are evaluated straight from the [`Policy`].

use super::{estimate_cost, BreakerState, Decision, Denial, RequestFeatures, Stats};
use crate::compile::CompiledPolicy;
use crate::ir::{
    BudgetAction, CmpOp, Cond, ConstraintId, Endpoint, FallbackTarget, Field, IntentId, ModelId,
    Policy, RequestField, ResponseFormat, RouteId, Signal, Tier, Type, Value,
};

/// A scalar value with enums spelled by name, so comparisons need no types.
#[derive(Clone, Debug, PartialEq)]
enum Scalar {
    Bool(bool),
    Num(f64),
    Str(String),
    List(Vec<Scalar>),
}

struct Env<'a> {
    policy: &'a Policy,
    tenant_id: &'a str,
    tenant: &'a [Option<Value>],
    req: &'a RequestFeatures,
}

fn variant(ty: Option<&Type>, i: u32) -> String {
    match ty {
        Some(Type::Enum(vs)) => vs.get(i as usize).cloned().unwrap_or_default(),
        Some(Type::Bool) => (i == 1).to_string(),
        _ => i.to_string(),
    }
}

/// A literal or stored value, as a scalar of the field's type.
fn scalar(ty: Option<&Type>, v: &Value) -> Scalar {
    match v {
        Value::Bool(b) => Scalar::Bool(*b),
        Value::Number(n) => Scalar::Num(*n),
        Value::Str(s) => Scalar::Str(s.clone()),
        Value::Enum(i) => Scalar::Str(variant(ty, *i)),
        Value::List(items) => {
            let inner = match ty {
                Some(Type::List(t)) => Some(&**t),
                other => other,
            };
            Scalar::List(items.iter().map(|i| scalar(inner, i)).collect())
        }
    }
}

impl Env<'_> {
    fn field_type(&self, f: &Field) -> Option<Type> {
        match f {
            Field::TenantId => Some(Type::String),
            Field::Tenant(a) => self
                .policy
                .tenant_attrs
                .get(a.index())
                .map(|a| a.ty.clone()),
            Field::Request(RequestField::Endpoint) => Some(Type::Enum(
                Endpoint::NAMES.iter().map(|s| s.to_string()).collect(),
            )),
            Field::Request(RequestField::ResponseFormat) => Some(Type::Enum(
                ResponseFormat::NAMES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )),
            Field::Request(RequestField::Feature) => Some(
                self.policy
                    .request_attr("feature")
                    .and_then(|a| self.policy.request_attrs.get(a.index()))
                    .map_or(Type::String, |a| a.ty.clone()),
            ),
            Field::Request(RequestField::Meta(a)) => self
                .policy
                .request_attrs
                .get(a.index())
                .map(|a| a.ty.clone()),
            _ => None,
        }
    }

    /// The value of a field, `None` when unset.
    fn get(&self, f: &Field) -> Option<Scalar> {
        let from_text = |ty: Option<Type>, s: &str| match ty {
            Some(Type::Bool) => match s {
                "true" | "1" | "yes" => Some(Scalar::Bool(true)),
                "false" | "0" | "no" => Some(Scalar::Bool(false)),
                _ => None,
            },
            Some(Type::Number) => s.trim().parse().ok().map(Scalar::Num),
            _ => Some(Scalar::Str(s.to_string())),
        };
        let r = self.req;
        match f {
            Field::TenantId => Some(Scalar::Str(self.tenant_id.to_string())),
            Field::Tenant(a) => {
                let ty = self.field_type(f);
                self.tenant
                    .get(a.index())
                    .and_then(|v| v.as_ref())
                    .map(|v| scalar(ty.as_ref(), v))
            }
            Field::Request(rf) => match rf {
                RequestField::Endpoint => Endpoint::NAMES
                    .get(r.endpoint as usize)
                    .map(|s| Scalar::Str(s.to_string())),
                RequestField::ResponseFormat => ResponseFormat::NAMES
                    .get(r.response_format as usize)
                    .map(|s| Scalar::Str(s.to_string())),
                RequestField::HasTools => Some(Scalar::Bool(r.has_tools)),
                RequestField::HasImages => Some(Scalar::Bool(r.has_images)),
                RequestField::Stream => Some(Scalar::Bool(r.stream)),
                RequestField::InputTokens => Some(Scalar::Num(r.input_tokens as f64)),
                RequestField::MaxTokens => r.max_tokens.map(|n| Scalar::Num(n as f64)),
                RequestField::Prompt => Some(Scalar::Str(r.prompt.clone())),
                RequestField::Model => Some(Scalar::Str(
                    r.model
                        .clone()
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| "auto".into()),
                )),
                RequestField::Feature => match self.policy.request_attr("feature") {
                    Some(a) => self.get(&Field::Request(RequestField::Meta(a))),
                    None => r.feature.as_ref().map(|s| Scalar::Str(s.clone())),
                },
                RequestField::Meta(a) => {
                    let def = self.policy.request_attrs.get(a.index())?;
                    let sent = if def.name == "feature" {
                        r.feature.as_ref()
                    } else {
                        r.meta.iter().find(|(k, _)| *k == def.name).map(|(_, v)| v)
                    };
                    match sent {
                        Some(v) => from_text(Some(def.ty.clone()), v),
                        None => def.default.as_ref().map(|d| scalar(Some(&def.ty), d)),
                    }
                }
            },
            Field::Model(_) => None,
        }
    }

    fn holds(&self, c: &Cond) -> bool {
        match c {
            Cond::True => true,
            Cond::False => false,
            Cond::Not(c) => !self.holds(c),
            Cond::And(cs) => cs.iter().all(|c| self.holds(c)),
            Cond::Or(cs) => cs.iter().any(|c| self.holds(c)),
            Cond::Bool(f) => self.get(f) == Some(Scalar::Bool(true)),
            Cond::Cmp(f, op, v) => {
                let ty = self.field_type(f);
                let want = scalar(ty.as_ref(), v);
                match (self.get(f), want) {
                    (Some(Scalar::Num(a)), Scalar::Num(b)) => match op {
                        CmpOp::Eq => a == b,
                        CmpOp::Ne => a != b,
                        CmpOp::Lt => a < b,
                        CmpOp::Le => a <= b,
                        CmpOp::Gt => a > b,
                        CmpOp::Ge => a >= b,
                    },
                    (Some(a), b) => match op {
                        CmpOp::Eq => a == b,
                        CmpOp::Ne => a != b,
                        _ => false,
                    },
                    (None, _) => false,
                }
            }
            Cond::In(f, vs) => {
                let ty = self.field_type(f);
                self.get(f)
                    .is_some_and(|a| vs.iter().any(|v| scalar(ty.as_ref(), v) == a))
            }
            Cond::Has(f, v) => {
                let ty = self.field_type(f);
                let elem = match &ty {
                    Some(Type::List(t)) => Some(&**t),
                    _ => None,
                };
                match self.get(f) {
                    Some(Scalar::List(items)) => items.contains(&scalar(elem, v)),
                    _ => false,
                }
            }
            Cond::Matches(f, re) => {
                matches!(self.get(f), Some(Scalar::Str(s)) if re.0.is_match(&s))
            }
            Cond::Contains(f, words) => match self.get(f) {
                Some(Scalar::Str(s)) => {
                    let s = s.to_lowercase();
                    words.iter().any(|w| s.contains(&w.to_lowercase()))
                }
                _ => false,
            },
        }
    }

    fn when(&self, w: &Option<crate::ir::When>) -> bool {
        w.as_ref().is_none_or(|w| self.holds(&w.cond))
    }
}

/// The models layer 1 allows: enabled, of a kind that serves the request's
/// endpoint, and removed by no firing constraint.
pub fn allowed(
    p: &CompiledPolicy,
    tenant_id: &str,
    tenant: &[Option<Value>],
    r: &RequestFeatures,
) -> Vec<ModelId> {
    let policy = p.policy();
    let env = Env {
        policy,
        tenant_id,
        tenant,
        req: r,
    };
    (0..policy.models.len())
        .map(|i| ModelId(i as u32))
        .filter(|m| {
            policy
                .model(*m)
                .is_some_and(|x| x.enabled && x.kind.serves(r.endpoint))
        })
        .filter(|m| {
            !policy
                .constraints
                .iter()
                .any(|c| env.when(&c.when) && c.removes.contains(m))
        })
        .collect()
}

/// The reference decision, same contract as [`decide`](super::decide).
pub fn decide(
    p: &CompiledPolicy,
    tenant_id: &str,
    tenant: &[Option<Value>],
    r: &RequestFeatures,
    s: &dyn Stats,
) -> Decision {
    let policy = p.policy();
    let env = Env {
        policy,
        tenant_id,
        tenant,
        req: r,
    };
    let mut d = Decision {
        intent: None,
        route: None,
        attempts: Vec::new(),
        estimated_cost: 0,
        outcome: Ok(()),
    };

    // Layer 1.
    let firing: Vec<usize> = policy
        .constraints
        .iter()
        .enumerate()
        .filter(|(_, c)| env.when(&c.when))
        .map(|(i, _)| i)
        .collect();
    let removed_by = |m: ModelId| {
        firing.iter().copied().find(|i| {
            policy
                .constraints
                .get(*i)
                .is_some_and(|c| c.removes.contains(&m))
        })
    };
    let serves = |m: ModelId| policy.model(m).is_some_and(|x| x.kind.serves(r.endpoint));
    let allowed = |m: ModelId| {
        policy.model(m).is_some_and(|x| x.enabled) && removed_by(m).is_none() && serves(m)
    };

    // Layer 2.
    let auto = r.is_auto();
    let name = r.model.clone().unwrap_or_default();
    let requested_intent = if auto {
        None
    } else {
        policy.intent_by_name(&name)
    };
    let requested_model = if auto || requested_intent.is_some() {
        None
    } else {
        policy.model_by_name(&name)
    };
    if !auto && requested_intent.is_none() && requested_model.is_none() {
        d.outcome = Err(Denial::UnknownModel(name));
        return d;
    }
    let intent = match requested_intent {
        Some(i) => i,
        None => match policy.classify.iter().find(|c| env.when(&c.when)) {
            Some(c) => c.intent,
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

    // Layer 3.
    let refined = policy
        .routes_for(intent)
        .filter(|(_, r)| r.when.is_some())
        .find(|(_, r)| env.when(&r.when));
    let chosen = refined.or_else(|| policy.routes_for(intent).find(|(_, r)| r.when.is_none()));
    let Some((rid, route)) = chosen else {
        d.outcome = Err(Denial::NoModelAvailable {
            intent,
            endpoint: r.endpoint,
        });
        return d;
    };
    let rid: RouteId = rid;
    d.route = Some(rid);
    let premium_ok = route
        .premium_only
        .as_ref()
        .is_none_or(|w| env.holds(&w.cond));
    let is_premium = |m: ModelId| policy.model(m).is_some_and(|x| x.tier == Tier::Premium);
    let usable = |m: ModelId| allowed(m) && (premium_ok || !is_premium(m));

    let mut order: Vec<ModelId> = Vec::new();
    if let Some(m) = requested_model {
        if !serves(m) {
            d.outcome = Err(Denial::ModelCannotServe {
                model: m,
                endpoint: r.endpoint,
            });
            return d;
        }
        if !allowed(m) {
            d.outcome = Err(match removed_by(m) {
                Some(i) => Denial::ModelDenied {
                    model: m,
                    rule: ConstraintId(i as u32),
                },
                None => Denial::ModelDisabled { model: m },
            });
            return d;
        }
        order.push(m);
    } else {
        let mut cands: Vec<(usize, ModelId)> = Vec::new();
        for (i, c) in route.candidates.iter().enumerate() {
            if usable(c.model) && !cands.iter().any(|(_, m)| *m == c.model) {
                cands.push((i, c.model));
            }
        }
        let cost = |m: ModelId| estimate_cost(p, m, r);
        let min_cost = cands.iter().map(|(_, m)| cost(*m)).min().unwrap_or(0);
        let stats: Vec<_> = cands.iter().map(|(_, m)| s.model(*m)).collect();
        let best = |f: &dyn Fn(&super::ModelStats) -> Option<f64>| {
            stats
                .iter()
                .filter_map(f)
                .filter(|x| *x >= 0.0)
                .reduce(f64::min)
        };
        let best_lat = best(&|s| s.latency_ms);
        let best_ft = best(&|s| s.first_token_ms);
        let ratio = |b: Option<f64>, t: Option<f64>| match (b, t) {
            (Some(b), Some(t)) if t > 0.0 => (b / t).clamp(0.0, 1.0),
            (Some(_), Some(_)) => 1.0,
            _ => 0.5,
        };
        let signal = |m: ModelId, st: &super::ModelStats, sig: Signal| -> f64 {
            match sig {
                Signal::Price => {
                    let c = cost(m);
                    if c == 0 {
                        1.0
                    } else {
                        min_cost as f64 / c as f64
                    }
                }
                Signal::Latency => ratio(best_lat, st.latency_ms),
                Signal::FirstToken => ratio(best_ft, st.first_token_ms),
                Signal::Success => {
                    st.success_rate
                        .map_or(0.5, |x| if x.is_nan() { 0.5 } else { x.clamp(0.0, 1.0) })
                }
                Signal::Quality => policy.model(m).map_or(0.0, |x| x.quality),
                Signal::Health => match st.breaker {
                    BreakerState::Closed => 1.0,
                    BreakerState::HalfOpen => 0.5,
                    BreakerState::Open => 0.0,
                },
            }
        };
        // Sum in the fixed signal order, as the compiled weights do.
        let signals = [
            Signal::Price,
            Signal::Latency,
            Signal::FirstToken,
            Signal::Success,
            Signal::Quality,
            Signal::Health,
        ];
        let mut keyed: Vec<(f64, f64, usize, String, ModelId)> = cands
            .iter()
            .zip(&stats)
            .map(|((i, m), st)| {
                let (a, b) = if route.score.is_empty() {
                    (
                        signal(*m, st, Signal::Quality),
                        signal(*m, st, Signal::Price),
                    )
                } else {
                    let total = signals
                        .iter()
                        .map(|sig| {
                            let w: f64 = route
                                .score
                                .iter()
                                .filter(|w| w.signal == *sig)
                                .map(|w| w.weight)
                                .fold(0.0, |a, b| a + b);
                            w * signal(*m, st, *sig)
                        })
                        .sum();
                    (total, 0.0)
                };
                (
                    a,
                    b,
                    *i,
                    policy.model(*m).map(|x| x.name.clone()).unwrap_or_default(),
                    *m,
                )
            })
            .collect();
        keyed.sort_by(|x, y| {
            y.0.total_cmp(&x.0)
                .then(y.1.total_cmp(&x.1))
                .then(x.2.cmp(&y.2))
                .then(x.3.cmp(&y.3))
        });
        order.extend(keyed.iter().map(|k| k.4));
    }
    // Fallbacks, expanding `route x` to x's default route.
    let mut fallbacks = Vec::new();
    let mut visited = vec![route.intent];
    let mut stack: Vec<&crate::ir::Fallback> = route.fallback.iter().rev().collect();
    while let Some(f) = stack.pop() {
        match &f.target {
            FallbackTarget::Model(m) => fallbacks.push(*m),
            FallbackTarget::Route(i) => {
                if visited.contains(i) {
                    continue;
                }
                visited.push(*i);
                if let Some((_, r)) = policy.routes_for(*i).find(|(_, r)| r.when.is_none()) {
                    fallbacks.extend(r.candidates.iter().map(|c| c.model));
                    stack.extend(r.fallback.iter().rev());
                }
            }
        }
    }
    for m in fallbacks {
        if usable(m) && !order.contains(&m) {
            order.push(m);
        }
    }

    // Layer 4: block, downgrade, then the premium guard, which holds from
    // the `confirm premium` threshold on, past a downgrade too.
    let action = s.budget_action();
    if action == Some(BudgetAction::Block) {
        d.outcome = Err(Denial::BudgetBlocked);
        return d;
    }
    if action == Some(BudgetAction::Downgrade) {
        if route.downgrade.is_empty() {
            let cost = |m: &ModelId| estimate_cost(p, *m, r);
            let primary = order.first().map(cost).unwrap_or(0);
            let cheaper: Vec<ModelId> = order
                .iter()
                .copied()
                .filter(|m| cost(m) < primary)
                .collect();
            if cheaper.is_empty() {
                let min = order.iter().map(cost).min().unwrap_or(0);
                order.retain(|m| cost(m) == min);
            } else {
                order = cheaper;
            }
        } else {
            order = Vec::new();
            for c in &route.downgrade {
                if usable(c.model) && !order.contains(&c.model) {
                    order.push(c.model);
                }
            }
        }
    }
    let guarded = action == Some(BudgetAction::ConfirmPremium)
        || (action == Some(BudgetAction::Downgrade) && s.premium_needs_confirmation());
    if guarded && !r.confirmed {
        // The named model, unless a downgrade replaced it.
        if requested_model.is_some_and(|m| is_premium(m) && order.contains(&m)) {
            d.outcome = Err(Denial::ConfirmationRequired);
            return d;
        }
        order.retain(|m| !is_premium(*m));
        if order.is_empty() {
            d.outcome = Err(Denial::ConfirmationRequired);
            return d;
        }
    }
    let (closed, open): (Vec<ModelId>, Vec<ModelId>) = order
        .into_iter()
        .partition(|m| s.model(*m).breaker != BreakerState::Open);
    let order: Vec<ModelId> = closed.into_iter().chain(open).collect();
    if order.is_empty() {
        d.outcome = Err(Denial::NoModelAvailable {
            intent,
            endpoint: r.endpoint,
        });
        return d;
    }
    d.estimated_cost = estimate_cost(p, order.first().copied().unwrap_or(ModelId(0)), r);
    d.attempts = order;
    d
}
