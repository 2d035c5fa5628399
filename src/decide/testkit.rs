//! Building IR policies by hand, for engine tests, property tests and
//! benchmarks that must not depend on the text front end.

use crate::ir::*;
use crate::source::Span;

/// A policy under construction. Names are resolved on the spot; unknown
/// names resolve to id 0 (tests build consistent policies).
#[derive(Default)]
pub struct Builder {
    pub p: Policy,
}

fn sp() -> Span {
    Span::default()
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn tenant_attr(&mut self, name: &str, ty: Type, default: Option<Value>) -> AttrId {
        self.p.tenant_attrs.push(AttrDef {
            name: name.into(),
            ty,
            default,
            span: sp(),
        });
        AttrId(self.p.tenant_attrs.len() as u32 - 1)
    }

    pub fn request_attr(&mut self, name: &str, ty: Type, default: Option<Value>) -> AttrId {
        self.p.request_attrs.push(AttrDef {
            name: name.into(),
            ty,
            default,
            span: sp(),
        });
        AttrId(self.p.request_attrs.len() as u32 - 1)
    }

    pub fn provider(&mut self, name: &str, region: &str) -> ProviderId {
        self.p.providers.push(Provider {
            name: name.into(),
            region: Some(region.into()),
            labels: vec![],
            span: sp(),
        });
        ProviderId(self.p.providers.len() as u32 - 1)
    }

    /// Make `m` a model of another kind than chat.
    pub fn set_kind(&mut self, m: ModelId, kind: ModelKind) {
        if let Some(model) = self.p.models.get_mut(m.index()) {
            model.kind = kind;
        }
    }

    /// A chat model; prices in dollars per 1M tokens.
    pub fn model(
        &mut self,
        name: &str,
        provider: ProviderId,
        price_in: f64,
        price_out: f64,
        quality: f64,
        tier: Tier,
    ) -> ModelId {
        let region = self.p.provider(provider).and_then(|p| p.region.clone());
        self.p.models.push(Model {
            name: name.into(),
            provider,
            kind: ModelKind::Chat,
            context: 128_000,
            max_output: None,
            pricing: Pricing {
                input_per_mtok: (price_in * 1e6).round() as u64,
                output_per_mtok: (price_out * 1e6).round() as u64,
                per_image: 0,
                per_audio_second: 0,
            },
            caps: vec![],
            region,
            tier,
            quality,
            tokenizer: None,
            enabled: true,
            labels: vec![],
            span: sp(),
            name_span: sp(),
        });
        ModelId(self.p.models.len() as u32 - 1)
    }

    pub fn constraint(
        &mut self,
        name: &str,
        effect: Effect,
        removes: &[ModelId],
        when: Option<Cond>,
    ) -> ConstraintId {
        self.p.constraints.push(Constraint {
            name: name.into(),
            effect,
            removes: removes.to_vec(),
            when: when.map(|cond| When { cond, span: sp() }),
            span: sp(),
        });
        ConstraintId(self.p.constraints.len() as u32 - 1)
    }

    pub fn intent(&mut self, name: &str) -> IntentId {
        if let Some(i) = self.p.intent_by_name(name) {
            return i;
        }
        self.p.intents.push(Intent {
            name: name.into(),
            span: sp(),
        });
        IntentId(self.p.intents.len() as u32 - 1)
    }

    /// A classify rule; `None` is `otherwise`.
    pub fn classify(&mut self, intent: &str, when: Option<Cond>) {
        let intent = self.intent(intent);
        self.p.classify.push(ClassifyRule {
            intent,
            when: when.map(|cond| When { cond, span: sp() }),
            span: sp(),
        });
    }

    pub fn route(&mut self, r: RouteSpec) -> RouteId {
        let intent = self.intent(&r.intent);
        let refs = |ms: &[ModelId]| {
            ms.iter()
                .map(|m| ModelRef {
                    model: *m,
                    span: sp(),
                })
                .collect()
        };
        self.p.routes.push(Route {
            intent,
            when: r.when.map(|cond| When { cond, span: sp() }),
            candidates: refs(&r.candidates),
            score: r
                .score
                .iter()
                .map(|(signal, weight)| Weight {
                    signal: *signal,
                    weight: *weight,
                    span: sp(),
                })
                .collect(),
            premium_only: r.premium_only.map(|cond| When { cond, span: sp() }),
            fallback: r
                .fallback
                .into_iter()
                .map(|target| Fallback { target, span: sp() })
                .collect(),
            downgrade: refs(&r.downgrade),
            span: sp(),
            name_span: sp(),
        });
        RouteId(self.p.routes.len() as u32 - 1)
    }
}

/// The parts of a route a test sets.
#[derive(Default)]
pub struct RouteSpec {
    pub intent: String,
    pub when: Option<Cond>,
    pub candidates: Vec<ModelId>,
    pub score: Vec<(Signal, f64)>,
    pub premium_only: Option<Cond>,
    pub fallback: Vec<FallbackTarget>,
    pub downgrade: Vec<ModelId>,
}

/// `request.<field> == value` for the enum request fields.
pub fn endpoint_is(e: Endpoint) -> Cond {
    Cond::Cmp(
        Field::Request(RequestField::Endpoint),
        CmpOp::Eq,
        Value::Enum(e as u32),
    )
}
pub fn format_is(f: ResponseFormat) -> Cond {
    Cond::Cmp(
        Field::Request(RequestField::ResponseFormat),
        CmpOp::Eq,
        Value::Enum(f as u32),
    )
}
pub fn req_bool(f: RequestField) -> Cond {
    Cond::Bool(Field::Request(f))
}
pub fn feature_is(s: &str) -> Cond {
    Cond::Cmp(
        Field::Request(RequestField::Feature),
        CmpOp::Eq,
        Value::Str(s.into()),
    )
}
pub fn tenant_is(a: AttrId, v: Value) -> Cond {
    Cond::Cmp(Field::Tenant(a), CmpOp::Eq, v)
}
