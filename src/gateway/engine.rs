//! The engine API the gateway codes against, in one place: `compile` and
//! `decide` from the core, and the IR types a decision mentions.

pub use crate::compile::{compile, compile_policy, CompiledPolicy, TenantView};
pub use crate::decide::{
    decide, explain, BreakerState, Decision, Denial, ModelStats, RequestFeatures, Stats, Trace,
};
pub use crate::ir::{
    BudgetAction, ConstraintId, Endpoint, IntentId, Micros, ModelId, ResponseFormat, RouteId,
};
