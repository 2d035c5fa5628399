//! A validated policy compiled for per-request decisions.
//!
//! [`compile`] runs [`analyze`] (the one truth about validity) and turns the
//! IR into a [`CompiledPolicy`]:
//! - model sets are fixed-width bitsets over the catalogue ([`ModelSet`]);
//! - constraints are `(condition, removes)` pairs; the ones that depend only on
//!   the tenant are resolved once per tenant in [`CompiledPolicy::tenant`], and
//!   the request-dependent rest is indexed so a request evaluates only the
//!   rules that can fire for it;
//! - classification is a decision tree that switches on the finite request
//!   features (endpoint, response format, the bool flags); its leaves hold the
//!   remaining ordered rules, simplified for the path, indexed by the string
//!   value their first test compares (`request.feature == "..."`);
//! - routes are candidate lists plus weight vectors, fallbacks pre-expanded.
//!
//! Every element keeps its span, so explanations point at `file:line`.
//!
//! Architecture invariant: nothing here does I/O; `decide` only reads a
//! `CompiledPolicy`, which is immutable after `compile` (Send + Sync).

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::analysis::{analyze, Analysis};
use crate::ir::{
    AttrId, CmpOp, Cond, ConstraintId, Endpoint, FallbackTarget, Field, IntentId, ModelId, Policy,
    RequestField, ResponseFormat, RouteId, Signal, Tier, Type, Value,
};
use crate::source::{Sources, Span};

// ------------------------------------------------------------------ bitsets

/// Words kept inline: catalogues of up to 256 models never touch the heap.
const INLINE_WORDS: usize = 4;

/// A set of models as a bitset over the catalogue. Up to 256 models it lives
/// inline (cloning it is a copy); larger catalogues fall back to the heap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSet {
    Inline([u64; INLINE_WORDS]),
    Heap(Box<[u64]>),
}

impl ModelSet {
    /// The empty set for a catalogue of `n` models.
    pub fn empty(n: usize) -> Self {
        let words = n.div_ceil(64);
        if words <= INLINE_WORDS {
            ModelSet::Inline([0; INLINE_WORDS])
        } else {
            ModelSet::Heap(vec![0; words].into_boxed_slice())
        }
    }
    pub fn from_iter(n: usize, models: impl IntoIterator<Item = ModelId>) -> Self {
        let mut s = Self::empty(n);
        for m in models {
            s.insert(m);
        }
        s
    }
    fn words(&self) -> &[u64] {
        match self {
            ModelSet::Inline(w) => w,
            ModelSet::Heap(w) => w,
        }
    }
    fn words_mut(&mut self) -> &mut [u64] {
        match self {
            ModelSet::Inline(w) => w,
            ModelSet::Heap(w) => w,
        }
    }
    pub fn insert(&mut self, m: ModelId) {
        if let Some(w) = self.words_mut().get_mut(m.index() / 64) {
            *w |= 1u64 << (m.index() % 64);
        }
    }
    pub fn remove(&mut self, m: ModelId) {
        if let Some(w) = self.words_mut().get_mut(m.index() / 64) {
            *w &= !(1u64 << (m.index() % 64));
        }
    }
    pub fn contains(&self, m: ModelId) -> bool {
        self.words()
            .get(m.index() / 64)
            .is_some_and(|w| w & (1u64 << (m.index() % 64)) != 0)
    }
    /// Removes every model of `other` from `self`.
    pub fn remove_all(&mut self, other: &ModelSet) {
        for (a, b) in self.words_mut().iter_mut().zip(other.words()) {
            *a &= !b;
        }
    }
    pub fn union_with(&mut self, other: &ModelSet) {
        for (a, b) in self.words_mut().iter_mut().zip(other.words()) {
            *a |= b;
        }
    }
    pub fn intersects(&self, other: &ModelSet) -> bool {
        self.words()
            .iter()
            .zip(other.words())
            .any(|(a, b)| a & b != 0)
    }
    pub fn is_empty(&self) -> bool {
        self.words().iter().all(|w| *w == 0)
    }
    pub fn len(&self) -> usize {
        self.words().iter().map(|w| w.count_ones() as usize).sum()
    }
    /// The models in id order.
    pub fn iter(&self) -> impl Iterator<Item = ModelId> + '_ {
        self.words().iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(ModelId((i as u32) * 64 + bit))
            })
        })
    }
}

// ------------------------------------------------------------------ conditions

/// Where a condition reads its value from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Slot {
    Endpoint,
    ResponseFormat,
    HasTools,
    HasImages,
    Stream,
    InputTokens,
    MaxTokens,
    Feature,
    Prompt,
    Model,
    Meta(u32),
    TenantId,
    Tenant(u32),
}

impl Slot {
    /// The finite request features the classification tree switches on, with
    /// their number of values.
    const SWITCHABLE: [(Slot, usize); 5] = [
        (Slot::Endpoint, Endpoint::NAMES.len()),
        (Slot::ResponseFormat, ResponseFormat::NAMES.len()),
        (Slot::HasTools, 2),
        (Slot::HasImages, 2),
        (Slot::Stream, 2),
    ];
}

/// A value read from a tenant or a request. Comparisons with `Missing`
/// (an unset `max_tokens`, an absent metadata attribute) are false.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FieldVal<'a> {
    Missing,
    Bool(bool),
    Num(f64),
    Str(&'a str),
    Enum(u32),
    List(&'a [Value]),
}

impl FieldVal<'_> {
    /// The index of a finite value (enum variant, or bool as 0/1).
    fn finite(self) -> Option<u32> {
        match self {
            FieldVal::Enum(i) => Some(i),
            FieldVal::Bool(b) => Some(u32::from(b)),
            _ => None,
        }
    }
}

/// A condition with fields resolved to slots and literals to the slot's type.
#[derive(Clone, Debug)]
pub(crate) enum CCond {
    True,
    False,
    Not(Box<CCond>),
    And(Box<[CCond]>),
    Or(Box<[CCond]>),
    /// A bool field is true.
    IsTrue(Slot),
    /// A finite field (enum variant or bool) is one of the set bits.
    FiniteIn(Slot, u64),
    Num(Slot, CmpOp, f64),
    StrEq(Slot, Box<str>),
    StrIn(Slot, Box<[Box<str>]>),
    /// A list field contains the value.
    Has(Slot, Value),
    /// `matches`, and `contains` compiled to a case-insensitive alternation.
    Regex(Slot, regex::Regex),
}

fn cmp_f64(a: f64, op: CmpOp, b: f64) -> bool {
    match op {
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
    }
}

impl CCond {
    /// Evaluates with a reader for slot values.
    pub(crate) fn eval<'a>(&self, read: &impl Fn(Slot) -> FieldVal<'a>) -> bool {
        match self {
            CCond::True => true,
            CCond::False => false,
            CCond::Not(c) => !c.eval(read),
            CCond::And(cs) => cs.iter().all(|c| c.eval(read)),
            CCond::Or(cs) => cs.iter().any(|c| c.eval(read)),
            atom => atom.slot().is_some_and(|s| atom.atom_holds(read(s))),
        }
    }

    fn slot(&self) -> Option<Slot> {
        match self {
            CCond::IsTrue(s)
            | CCond::FiniteIn(s, _)
            | CCond::Num(s, ..)
            | CCond::StrEq(s, _)
            | CCond::StrIn(s, _)
            | CCond::Has(s, _)
            | CCond::Regex(s, _) => Some(*s),
            _ => None,
        }
    }

    fn atom_holds(&self, v: FieldVal<'_>) -> bool {
        match (self, v) {
            (CCond::IsTrue(_), FieldVal::Bool(b)) => b,
            (CCond::FiniteIn(_, mask), v) => v
                .finite()
                .is_some_and(|i| i < 64 && mask & (1u64 << i) != 0),
            (CCond::Num(_, op, n), FieldVal::Num(x)) => cmp_f64(x, *op, *n),
            (CCond::StrEq(_, s), FieldVal::Str(x)) => **s == *x,
            (CCond::StrIn(_, ss), FieldVal::Str(x)) => ss.iter().any(|s| **s == *x),
            (CCond::Has(_, want), FieldVal::List(items)) => items.iter().any(|i| i == want),
            (CCond::Regex(_, re), FieldVal::Str(x)) => re.is_match(x),
            _ => false,
        }
    }

    /// Folds every atom whose slot `known` can answer; `None` when nothing changed,
    /// so unchanged conditions stay shared.
    pub(crate) fn simplify<'a>(
        &self,
        known: &impl Fn(Slot) -> Option<FieldVal<'a>>,
    ) -> Option<CCond> {
        match self {
            CCond::True | CCond::False => None,
            CCond::Not(c) => c.simplify(known).map(|c| match c {
                CCond::True => CCond::False,
                CCond::False => CCond::True,
                c => CCond::Not(Box::new(c)),
            }),
            CCond::And(cs) | CCond::Or(cs) => {
                let is_and = matches!(self, CCond::And(_));
                let mut changed = false;
                let mut out = Vec::with_capacity(cs.len());
                for c in cs.iter() {
                    let s = c.simplify(known);
                    changed |= s.is_some();
                    match s.unwrap_or_else(|| c.clone()) {
                        CCond::True if is_and => {}
                        CCond::False if !is_and => {}
                        CCond::False if is_and => return Some(CCond::False),
                        CCond::True if !is_and => return Some(CCond::True),
                        c => out.push(c),
                    }
                }
                if !changed {
                    return None;
                }
                Some(match out.len() {
                    0 if is_and => CCond::True,
                    0 => CCond::False,
                    1 => out.pop().unwrap_or(CCond::True),
                    _ if is_and => CCond::And(out.into_boxed_slice()),
                    _ => CCond::Or(out.into_boxed_slice()),
                })
            }
            atom => {
                let v = known(atom.slot()?)?;
                Some(if atom.atom_holds(v) {
                    CCond::True
                } else {
                    CCond::False
                })
            }
        }
    }

    fn visit_slots(&self, f: &mut impl FnMut(Slot)) {
        match self {
            CCond::True | CCond::False => {}
            CCond::Not(c) => c.visit_slots(f),
            CCond::And(cs) | CCond::Or(cs) => cs.iter().for_each(|c| c.visit_slots(f)),
            atom => {
                if let Some(s) = atom.slot() {
                    f(s)
                }
            }
        }
    }

    fn mentions(&self, slot: Slot) -> bool {
        let mut r = false;
        self.visit_slots(&mut |s| r |= s == slot);
        r
    }

    /// A string equality this condition requires: the rule can only match
    /// when the slot holds one of the values. Used to index rules.
    fn anchor(&self) -> Option<(Slot, Vec<&str>)> {
        match self {
            CCond::StrEq(s, v) => Some((*s, vec![&**v])),
            CCond::StrIn(s, vs) => Some((*s, vs.iter().map(|v| &**v).collect())),
            CCond::And(cs) => cs.iter().find_map(CCond::anchor),
            _ => None,
        }
    }
}

// ------------------------------------------------------------------ rule index

/// Ordered rules indexed by the string value they require in one slot, so a
/// request only evaluates the rules that can match it. Positions are into the
/// owner's rule list, ascending in every list.
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleIndex {
    slot: Option<Slot>,
    by_value: HashMap<Box<str>, Box<[u32]>>,
    rest: Box<[u32]>,
}

impl RuleIndex {
    pub(crate) fn build<'c>(conds: impl Iterator<Item = &'c CCond> + Clone) -> RuleIndex {
        // Index on the slot that anchors the most rules.
        let mut counts: Vec<(Slot, usize)> = Vec::new();
        for c in conds.clone() {
            if let Some((s, _)) = c.anchor() {
                match counts.iter_mut().find(|(x, _)| *x == s) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((s, 1)),
                }
            }
        }
        let slot = counts.iter().max_by_key(|(_, n)| *n).map(|(s, _)| *s);
        let mut by_value: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut rest = Vec::new();
        for (i, c) in conds.enumerate() {
            let pos = i as u32;
            match c.anchor() {
                Some((s, values)) if Some(s) == slot => {
                    for v in values {
                        let list = by_value.entry(v.into()).or_default();
                        if list.last() != Some(&pos) {
                            list.push(pos);
                        }
                    }
                }
                _ => rest.push(pos),
            }
        }
        RuleIndex {
            slot,
            by_value: by_value
                .into_iter()
                .map(|(k, v)| (k, v.into_boxed_slice()))
                .collect(),
            rest: rest.into_boxed_slice(),
        }
    }

    /// The lists of positions that can match for these slot values; every
    /// position appears in at most one of them.
    pub(crate) fn lists<'s, 'a>(&'s self, read: &impl Fn(Slot) -> FieldVal<'a>) -> [&'s [u32]; 2] {
        let keyed = match self.slot.map(read) {
            Some(FieldVal::Str(v)) => self.by_value.get(v).map_or(&[][..], |l| &l[..]),
            _ => &[],
        };
        [&self.rest, keyed]
    }
}

// ------------------------------------------------------------------ compiled parts

#[derive(Clone, Debug)]
pub(crate) struct CConstraint {
    pub(crate) removes: ModelSet,
    /// `None`: always fires.
    pub(crate) when: Option<Arc<CCond>>,
}

#[derive(Clone, Debug)]
pub(crate) struct LeafRule {
    pub(crate) cond: Arc<CCond>,
    /// Index into `Policy::classify`.
    pub(crate) rule: u32,
    pub(crate) intent: IntentId,
}

#[derive(Clone, Debug)]
pub(crate) enum Node {
    /// Children by the slot's value index.
    Switch(Slot, Box<[Node]>),
    Leaf {
        rules: Box<[LeafRule]>,
        index: RuleIndex,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct CRoute {
    pub(crate) when: Option<CCond>,
    pub(crate) candidates: Box<[ModelId]>,
    /// Weights by [`signal_index`]; empty score means the default order
    /// (quality, then price).
    pub(crate) weights: [f64; 6],
    pub(crate) default_order: bool,
    pub(crate) premium_only: Option<CCond>,
    /// Fallback models in order, `route x` expanded to that intent's default
    /// route's candidates then fallbacks.
    pub(crate) fallbacks: Box<[ModelId]>,
    pub(crate) downgrade: Box<[ModelId]>,
}

pub(crate) fn signal_index(s: Signal) -> usize {
    match s {
        Signal::Price => 0,
        Signal::Latency => 1,
        Signal::FirstToken => 2,
        Signal::Success => 3,
        Signal::Quality => 4,
        Signal::Health => 5,
    }
}

pub(crate) const SIGNALS: [Signal; 6] = [
    Signal::Price,
    Signal::Latency,
    Signal::FirstToken,
    Signal::Success,
    Signal::Quality,
    Signal::Health,
];

/// A policy ready for per-request decisions. Immutable; share it through `Arc`.
#[derive(Debug)]
pub struct CompiledPolicy {
    version: String,
    policy: Policy,
    sources: Sources,
    pub(crate) enabled: ModelSet,
    pub(crate) premium: ModelSet,
    /// Per endpoint (`Endpoint as usize`): the models whose kind cannot serve it.
    pub(crate) not_serving: [ModelSet; 5],
    pub(crate) constraints: Box<[CConstraint]>,
    pub(crate) tree: Node,
    pub(crate) routes: Box<[CRoute]>,
    /// Per intent: refined routes in source order, then the default route.
    pub(crate) intent_routes: Box<[Box<[RouteId]>]>,
    pub(crate) model_names: HashMap<Box<str>, ModelId>,
    pub(crate) intent_names: HashMap<Box<str>, IntentId>,
    /// Declared request attributes: name and whether values are bool / number.
    pub(crate) meta: Box<[(Box<str>, MetaKind)]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetaKind {
    Str,
    Bool,
    Num,
}

/// Compile a policy: analyze it (errors return the analysis) and build the
/// decision structures.
#[allow(
    clippy::result_large_err,
    reason = "the API hands the whole analysis back; errors are the cold path"
)]
pub fn compile(sources: &Sources) -> Result<CompiledPolicy, Analysis> {
    let analysis = analyze(sources);
    if analysis.has_errors() {
        return Err(analysis);
    }
    Ok(compile_policy(analysis.policy, sources.clone()))
}

/// Short hex SHA-256 of the sources (names and texts): the policy version.
pub fn version_of(sources: &Sources) -> String {
    let mut h = Sha256::new();
    for (_, f) in sources.iter() {
        // The same scheme as the reload store's, so both report one version.
        h.update(f.name.as_bytes());
        h.update([0]);
        h.update(f.text.as_bytes());
        h.update([0]);
    }
    let digest = hex::encode(h.finalize());
    digest.chars().take(12).collect()
}

/// Compile an already validated IR policy (tests and benchmarks build IR by
/// hand). The policy must have passed the checks; nothing here re-validates.
pub fn compile_policy(policy: Policy, sources: Sources) -> CompiledPolicy {
    let n = policy.models.len();
    let cx = CondCompiler { policy: &policy };
    let enabled = ModelSet::from_iter(
        n,
        policy
            .models
            .iter()
            .enumerate()
            .filter(|(_, m)| m.enabled)
            .map(|(i, _)| ModelId(i as u32)),
    );
    let premium = ModelSet::from_iter(
        n,
        policy
            .models
            .iter()
            .enumerate()
            .filter(|(_, m)| m.tier == Tier::Premium)
            .map(|(i, _)| ModelId(i as u32)),
    );
    let not_serving = Endpoint::ALL.map(|e| {
        ModelSet::from_iter(
            n,
            policy
                .models
                .iter()
                .enumerate()
                .filter(|(_, m)| !m.kind.serves(e))
                .map(|(i, _)| ModelId(i as u32)),
        )
    });
    let constraints = policy
        .constraints
        .iter()
        .map(|c| CConstraint {
            removes: ModelSet::from_iter(n, c.removes.iter().copied()),
            when: c.when.as_ref().map(|w| Arc::new(cx.cond(&w.cond))),
        })
        .collect();
    let rules: Vec<LeafRule> = policy
        .classify
        .iter()
        .enumerate()
        .map(|(i, r)| LeafRule {
            cond: Arc::new(r.when.as_ref().map_or(CCond::True, |w| cx.cond(&w.cond))),
            rule: i as u32,
            intent: r.intent,
        })
        .collect();
    let tree = build_tree(rules, 0);
    let routes = policy
        .routes
        .iter()
        .map(|r| {
            let mut weights = [0.0; 6];
            for w in &r.score {
                if let Some(x) = weights.get_mut(signal_index(w.signal)) {
                    *x += w.weight;
                }
            }
            let mut fallbacks = Vec::new();
            let mut visited = vec![r.intent];
            expand_fallbacks(&policy, &r.fallback, &mut visited, &mut fallbacks);
            CRoute {
                when: r.when.as_ref().map(|w| cx.cond(&w.cond)),
                candidates: r.candidates.iter().map(|c| c.model).collect(),
                weights,
                default_order: r.score.is_empty(),
                premium_only: r.premium_only.as_ref().map(|w| cx.cond(&w.cond)),
                fallbacks: fallbacks.into_boxed_slice(),
                downgrade: r.downgrade.iter().map(|c| c.model).collect(),
            }
        })
        .collect();
    let intent_routes = (0..policy.intents.len())
        .map(|i| {
            let id = IntentId(i as u32);
            let refined = policy
                .routes_for(id)
                .filter(|(_, r)| r.when.is_some())
                .map(|(rid, _)| rid);
            let default = policy
                .routes_for(id)
                .filter(|(_, r)| r.when.is_none())
                .map(|(rid, _)| rid)
                .take(1);
            refined.chain(default).collect()
        })
        .collect();
    let model_names = policy
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str().into(), ModelId(i as u32)))
        .collect();
    let intent_names = policy
        .intents
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str().into(), IntentId(i as u32)))
        .collect();
    let meta = policy
        .request_attrs
        .iter()
        .map(|a| {
            let kind = match a.ty {
                Type::Bool => MetaKind::Bool,
                Type::Number => MetaKind::Num,
                _ => MetaKind::Str,
            };
            (a.name.as_str().into(), kind)
        })
        .collect();
    CompiledPolicy {
        version: version_of(&sources),
        policy,
        sources,
        enabled,
        premium,
        not_serving,
        constraints,
        tree,
        routes,
        intent_routes,
        model_names,
        intent_names,
        meta,
    }
}

/// Appends the models a fallback list tries, expanding `route x` to that
/// intent's default route (candidates, then its own fallbacks); `visited`
/// stops cycles (the checker rejects them, this keeps compile total).
fn expand_fallbacks(
    policy: &Policy,
    list: &[crate::ir::Fallback],
    visited: &mut Vec<IntentId>,
    out: &mut Vec<ModelId>,
) {
    for f in list {
        match &f.target {
            FallbackTarget::Model(m) => out.push(*m),
            FallbackTarget::Route(intent) => {
                if visited.contains(intent) {
                    continue;
                }
                visited.push(*intent);
                if let Some((_, r)) = policy.routes_for(*intent).find(|(_, r)| r.when.is_none()) {
                    out.extend(r.candidates.iter().map(|c| c.model));
                    expand_fallbacks(policy, &r.fallback, visited, out);
                }
            }
        }
    }
}

/// Build the classification tree: switch on a finite request feature the
/// remaining rules test (the first rule's first), simplify every rule for each
/// value, and stop when no remaining rule tests a finite request feature.
fn build_tree(rules: Vec<LeafRule>, assigned: u32) -> Node {
    // Drop rules that cannot match; nothing after an always-true rule is reachable.
    let mut live = Vec::with_capacity(rules.len());
    for r in rules {
        match *r.cond {
            CCond::False => continue,
            CCond::True => {
                live.push(r);
                break;
            }
            _ => live.push(r),
        }
    }
    let unassigned = |s: usize| assigned & (1 << s) == 0;
    let pick = live.iter().find_map(|r| {
        Slot::SWITCHABLE
            .iter()
            .enumerate()
            .find(|(i, (s, _))| unassigned(*i) && r.cond.mentions(*s))
            .map(|(i, (s, n))| (i, *s, *n))
    });
    let Some((bit, slot, n)) = pick else {
        let index = RuleIndex::build(live.iter().map(|r| &*r.cond));
        return Node::Leaf {
            rules: live.into_boxed_slice(),
            index,
        };
    };
    let children = (0..n)
        .map(|v| {
            let value = if matches!(slot, Slot::Endpoint | Slot::ResponseFormat) {
                FieldVal::Enum(v as u32)
            } else {
                FieldVal::Bool(v == 1)
            };
            let known = |s: Slot| (s == slot).then_some(value);
            let rules = live
                .iter()
                .map(|r| match r.cond.simplify(&known) {
                    Some(c) => LeafRule {
                        cond: Arc::new(c),
                        ..r.clone()
                    },
                    None => r.clone(),
                })
                .collect();
            build_tree(rules, assigned | (1 << bit))
        })
        .collect();
    Node::Switch(slot, children)
}

/// Turns IR conditions into [`CCond`]s, normalising literals to the field's type.
struct CondCompiler<'p> {
    policy: &'p Policy,
}

/// What kind of value a slot holds.
enum SlotType<'p> {
    /// Variant names (bools are `["false", "true"]`).
    Finite(Vec<&'p str>),
    Num,
    Str,
    List(&'p Type),
}

impl<'p> CondCompiler<'p> {
    fn slot(&self, f: &Field) -> Option<Slot> {
        Some(match f {
            Field::TenantId => Slot::TenantId,
            Field::Tenant(a) => Slot::Tenant(a.0),
            Field::Request(r) => match r {
                RequestField::Endpoint => Slot::Endpoint,
                RequestField::ResponseFormat => Slot::ResponseFormat,
                RequestField::HasTools => Slot::HasTools,
                RequestField::HasImages => Slot::HasImages,
                RequestField::Stream => Slot::Stream,
                RequestField::InputTokens => Slot::InputTokens,
                RequestField::MaxTokens => Slot::MaxTokens,
                RequestField::Feature => Slot::Feature,
                RequestField::Prompt => Slot::Prompt,
                RequestField::Model => Slot::Model,
                RequestField::Meta(a) => Slot::Meta(a.0),
            },
            Field::Model(_) => return None,
        })
    }

    fn slot_type(&self, s: Slot) -> SlotType<'p> {
        const BOOL: [&str; 2] = ["false", "true"];
        match s {
            Slot::Endpoint => SlotType::Finite(Endpoint::NAMES.to_vec()),
            Slot::ResponseFormat => SlotType::Finite(ResponseFormat::NAMES.to_vec()),
            Slot::HasTools | Slot::HasImages | Slot::Stream => SlotType::Finite(BOOL.to_vec()),
            Slot::InputTokens | Slot::MaxTokens => SlotType::Num,
            Slot::Prompt | Slot::Model | Slot::TenantId => SlotType::Str,
            // Request-side values arrive as strings; enums compare by variant name.
            Slot::Feature => match self
                .policy
                .request_attrs
                .iter()
                .find(|a| a.name == "feature")
                .map(|a| &a.ty)
            {
                Some(Type::Number) => SlotType::Num,
                Some(Type::Bool) => SlotType::Finite(BOOL.to_vec()),
                _ => SlotType::Str,
            },
            Slot::Meta(i) => match self.policy.request_attrs.get(i as usize).map(|a| &a.ty) {
                Some(Type::Number) => SlotType::Num,
                Some(Type::Bool) => SlotType::Finite(BOOL.to_vec()),
                Some(Type::List(t)) => SlotType::List(t),
                _ => SlotType::Str,
            },
            Slot::Tenant(i) => match self.policy.tenant_attrs.get(i as usize).map(|a| &a.ty) {
                Some(Type::Number) => SlotType::Num,
                Some(Type::Bool) => SlotType::Finite(BOOL.to_vec()),
                Some(Type::Enum(vs)) => SlotType::Finite(vs.iter().map(String::as_str).collect()),
                Some(Type::List(t)) => SlotType::List(t),
                _ => SlotType::Str,
            },
        }
    }

    /// The enum variants of the field's declared type, for literals given as enum indexes.
    fn variant_name(&self, s: Slot, i: u32) -> Option<String> {
        let names: Vec<String> = match s {
            Slot::Feature => match self
                .policy
                .request_attrs
                .iter()
                .find(|a| a.name == "feature")
                .map(|a| &a.ty)
            {
                Some(Type::Enum(vs)) => vs.clone(),
                _ => return None,
            },
            Slot::Meta(m) => match self.policy.request_attrs.get(m as usize).map(|a| &a.ty) {
                Some(Type::Enum(vs)) => vs.clone(),
                _ => return None,
            },
            _ => return None,
        };
        names.get(i as usize).cloned()
    }

    fn finite_index(names: &[&str], v: &Value) -> Option<u32> {
        match v {
            Value::Enum(i) => Some(*i),
            Value::Bool(b) => Some(u32::from(*b)),
            Value::Str(s) => names.iter().position(|n| n == s).map(|i| i as u32),
            _ => None,
        }
    }

    fn string(&self, s: Slot, v: &Value) -> Option<Box<str>> {
        match v {
            Value::Str(x) => Some(x.as_str().into()),
            Value::Enum(i) => self.variant_name(s, *i).map(Into::into),
            Value::Bool(b) => Some(b.to_string().into()),
            Value::Number(n) => Some(n.to_string().into()),
            Value::List(_) => None,
        }
    }

    fn cond(&self, c: &Cond) -> CCond {
        match c {
            Cond::True => CCond::True,
            Cond::False => CCond::False,
            Cond::Not(c) => CCond::Not(Box::new(self.cond(c))),
            Cond::And(cs) => CCond::And(cs.iter().map(|c| self.cond(c)).collect()),
            Cond::Or(cs) => CCond::Or(cs.iter().map(|c| self.cond(c)).collect()),
            Cond::Bool(f) => match self.slot(f) {
                Some(s) => match self.slot_type(s) {
                    SlotType::Finite(_) => CCond::FiniteIn(s, 0b10),
                    _ => CCond::IsTrue(s),
                },
                None => CCond::False,
            },
            Cond::Cmp(f, op, v) => self.slot(f).map_or(CCond::False, |s| self.cmp(s, *op, v)),
            Cond::In(f, vs) => match self.slot(f) {
                None => CCond::False,
                Some(s) => match self.slot_type(s) {
                    SlotType::Finite(names) => {
                        let mask = vs
                            .iter()
                            .filter_map(|v| Self::finite_index(&names, v))
                            .filter(|i| *i < 64)
                            .fold(0u64, |m, i| m | 1 << i);
                        CCond::FiniteIn(s, mask)
                    }
                    SlotType::Num => CCond::Or(
                        vs.iter()
                            .filter_map(|v| {
                                if let Value::Number(n) = v {
                                    Some(CCond::Num(s, CmpOp::Eq, *n))
                                } else {
                                    None
                                }
                            })
                            .collect(),
                    ),
                    SlotType::Str => {
                        CCond::StrIn(s, vs.iter().filter_map(|v| self.string(s, v)).collect())
                    }
                    SlotType::List(_) => CCond::False,
                },
            },
            Cond::Has(f, v) => match self.slot(f) {
                Some(s) => {
                    let v = match (self.slot_type(s), v) {
                        (SlotType::List(Type::Enum(names)), Value::Str(x)) => names
                            .iter()
                            .position(|n| n == x)
                            .map_or(v.clone(), |i| Value::Enum(i as u32)),
                        _ => v.clone(),
                    };
                    CCond::Has(s, v)
                }
                None => CCond::False,
            },
            Cond::Matches(f, re) => self
                .slot(f)
                .map_or(CCond::False, |s| CCond::Regex(s, re.0.clone())),
            Cond::Contains(f, words) => match self.slot(f) {
                Some(s) if !words.is_empty() => {
                    let alts: Vec<String> = words.iter().map(|w| regex::escape(w)).collect();
                    match regex::Regex::new(&format!("(?i)(?:{})", alts.join("|"))) {
                        Ok(re) => CCond::Regex(s, re),
                        Err(_) => CCond::False,
                    }
                }
                _ => CCond::False,
            },
        }
    }

    fn cmp(&self, s: Slot, op: CmpOp, v: &Value) -> CCond {
        match self.slot_type(s) {
            SlotType::Finite(names) => match (Self::finite_index(&names, v), op) {
                (Some(i), CmpOp::Eq) if i < 64 => CCond::FiniteIn(s, 1 << i),
                (Some(i), CmpOp::Ne) if i < 64 => CCond::FiniteIn(s, !(1u64 << i)),
                _ => CCond::False,
            },
            SlotType::Num => match v {
                Value::Number(n) => CCond::Num(s, op, *n),
                _ => CCond::False,
            },
            SlotType::Str => match (self.string(s, v), op) {
                (Some(x), CmpOp::Eq) => CCond::StrEq(s, x),
                (Some(x), CmpOp::Ne) => CCond::Not(Box::new(CCond::StrEq(s, x))),
                _ => CCond::False,
            },
            SlotType::List(_) => CCond::False,
        }
    }
}

// ------------------------------------------------------------------ tenants

/// A tenant resolved against one compiled policy: attribute values with
/// defaults filled, and the constraints that depend only on the tenant
/// already applied. Rebuild it when the policy changes.
#[derive(Clone, Debug)]
pub struct TenantView {
    pub id: String,
    pub(crate) policy_version: String,
    /// By `AttrId`.
    pub(crate) values: Vec<Option<Value>>,
    /// Enabled models minus what tenant-only constraints remove.
    pub(crate) allowed: ModelSet,
    /// Constraints that always fire for this tenant, in source order.
    pub(crate) fired: Vec<ConstraintId>,
    /// Request-dependent constraints, simplified for this tenant.
    pub(crate) live: Vec<(ConstraintId, CCond)>,
    pub(crate) live_index: RuleIndex,
}

impl TenantView {
    /// The version of the policy this view was built for.
    pub fn policy_version(&self) -> &str {
        &self.policy_version
    }
    /// Attribute values by `AttrId` (after defaults).
    pub fn values(&self) -> &[Option<Value>] {
        &self.values
    }
    /// The attribute value (after defaults), if set.
    pub fn attr(&self, id: AttrId) -> Option<&Value> {
        self.values.get(id.index()).and_then(Option::as_ref)
    }
    /// Models allowed for this tenant before request-dependent constraints.
    pub fn allowed(&self) -> &ModelSet {
        &self.allowed
    }
    pub(crate) fn read(&self, s: Slot) -> Option<FieldVal<'_>> {
        match s {
            Slot::TenantId => Some(FieldVal::Str(&self.id)),
            Slot::Tenant(i) => Some(match self.values.get(i as usize).and_then(Option::as_ref) {
                Some(v) => value_ref(v),
                None => FieldVal::Missing,
            }),
            _ => None,
        }
    }
}

pub(crate) fn value_ref(v: &Value) -> FieldVal<'_> {
    match v {
        Value::Bool(b) => FieldVal::Bool(*b),
        Value::Number(n) => FieldVal::Num(*n),
        Value::Str(s) => FieldVal::Str(s),
        Value::Enum(i) => FieldVal::Enum(*i),
        Value::List(l) => FieldVal::List(l),
    }
}

fn json_type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a bool",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Converts a JSON value to the attribute's type.
fn from_json(ty: &Type, v: &serde_json::Value) -> Result<Value, String> {
    match (ty, v) {
        (Type::Bool, serde_json::Value::Bool(b)) => Ok(Value::Bool(*b)),
        (Type::Number, serde_json::Value::Number(n)) => n
            .as_f64()
            .map(Value::Number)
            .ok_or_else(|| "is not a finite number".to_string()),
        (Type::String, serde_json::Value::String(s)) => Ok(Value::Str(s.clone())),
        (Type::Enum(vs), serde_json::Value::String(s)) => match vs.iter().position(|x| x == s) {
            Some(i) => Ok(Value::Enum(i as u32)),
            None => Err(format!(
                "has `{s}`, expected one of {}",
                vs.iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
        (Type::List(t), serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| from_json(t, i))
            .collect::<Result<_, _>>()
            .map(Value::List),
        (ty, v) => Err(format!(
            "should be {}, found {}",
            ty.describe(),
            json_type_name(v)
        )),
    }
}

impl CompiledPolicy {
    /// The short hex hash of the sources this policy was compiled from.
    pub fn version(&self) -> &str {
        &self.version
    }
    /// The validated IR.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
    /// The sources, for rendering `file:line` in explanations.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }
    /// `file:line` of a span.
    pub fn location(&self, span: Span) -> String {
        match self.sources.get(span.file) {
            Some(f) => format!("{}:{}", f.name, f.line_col(span.start()).0),
            None => "<unknown>".into(),
        }
    }
    pub fn model_by_name(&self, name: &str) -> Option<ModelId> {
        self.model_names.get(name).copied()
    }
    pub fn intent_by_name(&self, name: &str) -> Option<IntentId> {
        self.intent_names.get(name).copied()
    }
    pub fn model_name(&self, m: ModelId) -> &str {
        self.policy.model(m).map_or("?", |m| m.name.as_str())
    }
    pub fn intent_name(&self, i: IntentId) -> &str {
        self.policy.intent(i).map_or("?", |i| i.name.as_str())
    }
    pub fn constraint_name(&self, c: ConstraintId) -> &str {
        self.policy
            .constraints
            .get(c.index())
            .map_or("?", |c| c.name.as_str())
    }
    /// The models the policy enables.
    pub fn enabled(&self) -> &ModelSet {
        &self.enabled
    }

    /// Checks tenant attributes (JSON values from the gateway config) against
    /// the tenant schema, fills defaults and resolves the tenant-only
    /// constraints once. Err lists every problem.
    pub fn tenant(
        &self,
        id: &str,
        attrs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<TenantView, Vec<String>> {
        let mut problems = Vec::new();
        let schema = &self.policy.tenant_attrs;
        for k in attrs.keys() {
            if !schema.iter().any(|a| &a.name == k) {
                let names: Vec<&str> = schema.iter().map(|a| a.name.as_str()).collect();
                let hint = crate::diag::did_you_mean(k, names.iter().copied())
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                problems.push(format!("tenant `{id}`: unknown attribute `{k}`{hint}"));
            }
        }
        let mut values = Vec::with_capacity(schema.len());
        for a in schema {
            match attrs.get(&a.name) {
                Some(v) => match from_json(&a.ty, v) {
                    Ok(v) => values.push(Some(v)),
                    Err(e) => {
                        problems.push(format!("tenant `{id}`: attribute `{}` {e}", a.name));
                        values.push(None);
                    }
                },
                None => match &a.default {
                    Some(d) => values.push(Some(d.clone())),
                    None => {
                        problems.push(format!(
                            "tenant `{id}`: missing attribute `{}` ({}, no default)",
                            a.name,
                            a.ty.describe()
                        ));
                        values.push(None);
                    }
                },
            }
        }
        // An attribute that holds a budget's amount is money: a negative one
        // would read as $0 and block every request with a misleading reason.
        let mut money: Vec<AttrId> = (self.policy.protect.budgets.iter())
            .filter_map(|b| match b.amount {
                crate::ir::BudgetAmount::TenantAttr(a) => Some(a),
                crate::ir::BudgetAmount::Fixed(_) => None,
            })
            .collect();
        money.sort_unstable();
        money.dedup();
        for a in money {
            let (Some(Some(Value::Number(n))), Some(def)) =
                (values.get(a.0 as usize), schema.get(a.0 as usize))
            else {
                continue;
            };
            if *n < 0.0 {
                problems.push(format!(
                    "tenant `{id}`: attribute `{}` is {n}, but it is the amount of a budget in dollars: give 0 or more",
                    def.name
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(self.tenant_from_values(id, values))
    }

    /// Builds a tenant view from typed values (by `AttrId`; `None` = unset).
    pub fn tenant_from_values(&self, id: &str, values: Vec<Option<Value>>) -> TenantView {
        let mut t = TenantView {
            id: id.to_string(),
            policy_version: self.version.clone(),
            values,
            allowed: self.enabled.clone(),
            fired: Vec::new(),
            live: Vec::new(),
            live_index: RuleIndex::default(),
        };
        let mut fired = Vec::new();
        let mut live = Vec::new();
        for (i, c) in self.constraints.iter().enumerate() {
            let id = ConstraintId(i as u32);
            let simplified = match &c.when {
                None => CCond::True,
                Some(w) => w.simplify(&|s| t.read(s)).unwrap_or_else(|| (**w).clone()),
            };
            match simplified {
                CCond::True => {
                    t.allowed.remove_all(&c.removes);
                    fired.push(id);
                }
                CCond::False => {}
                cond => live.push((id, cond)),
            }
        }
        t.live_index = RuleIndex::build(live.iter().map(|(_, c)| c));
        t.fired = fired;
        t.live = live;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_sets_inline_and_heap() {
        for n in [3usize, 64, 256, 257, 1000] {
            let mut s = ModelSet::empty(n);
            let ids: Vec<ModelId> = [0, n / 2, n - 1]
                .iter()
                .map(|i| ModelId(*i as u32))
                .collect();
            for id in &ids {
                s.insert(*id);
            }
            assert_eq!(matches!(s, ModelSet::Inline(_)), n <= 256);
            let got: Vec<ModelId> = s.iter().collect();
            let mut want = ids.clone();
            want.dedup();
            assert_eq!(got, want);
            let mut t = s.clone();
            t.remove(ids[0]);
            assert!(!t.contains(ids[0]) && s.contains(ids[0]));
            s.remove_all(&t);
            assert_eq!(s.len(), 1);
        }
    }

    #[test]
    fn compile_refuses_policies_with_errors_and_versions_match_reload() {
        let mut bad = Sources::new();
        bad.add(
            "a.route",
            "classify { chat when request.endpoint == chatt }\n",
        );
        let err = compile(&bad).unwrap_err();
        assert!(err.has_errors());
        let mut good = Sources::new();
        good.add(
            "a.route",
            "provider p { region us }\nmodel m { provider p kind chat }\nclassify { chat otherwise }\nroute chat { candidates [m] }\n",
        );
        let p = compile(&good).map_err(|a| a.diagnostics).unwrap();
        assert_eq!(p.version(), crate::reload::sources_version(&good));
        let t = p.tenant("x", &serde_json::Map::new()).unwrap();
        let d = crate::decide::decide(
            &p,
            &t,
            &crate::decide::RequestFeatures::default(),
            &crate::decide::NoStats,
        );
        assert_eq!(d.attempts, [ModelId(0)]);
    }

    #[test]
    fn versions_hash_names_and_texts() {
        let mut a = Sources::new();
        a.add("a.route", "x");
        let mut b = Sources::new();
        b.add("b.route", "x");
        assert_ne!(version_of(&a), version_of(&b));
        assert_eq!(version_of(&a).len(), 12);
        assert_eq!(version_of(&a), version_of(&a.clone()));
    }
}
