//! routeplane: a routing control plane for LLM gateways.
//!
//! The whole pipeline in one example: sources in, a compiled policy out, then
//! a decision per request. The constraints hold whatever the route prefers:
//! the free plan never reaches the premium model.
//!
//! ```
//! use routeplane::decide::{decide, NoStats, RequestFeatures};
//! use routeplane::ir::Endpoint;
//! use routeplane::source::Sources;
//!
//! let mut sources = Sources::new();
//! sources.add("policy.route", r#"
//!     tenant { plan: enum(free, pro) }
//!     provider openai { region us }
//!     model gpt-4o-mini { provider openai kind chat price in $0.15 out $0.60 per 1M quality 0.7 }
//!     model gpt-4o { provider openai kind chat price in $2.50 out $10 per 1M quality 0.9 }
//!     constraints { free_plan: allow only [gpt-4o-mini] when tenant.plan == free }
//!     classify { chat otherwise }
//!     route chat { candidates [gpt-4o, gpt-4o-mini] score 1 * quality }
//! "#);
//! let policy = routeplane::compile::compile(&sources).expect("the policy has no errors");
//!
//! let request = RequestFeatures::from_openai_json(
//!     Endpoint::Chat,
//!     &serde_json::json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
//! );
//! let names = |plan: &str| {
//!     let attrs = serde_json::json!({ "plan": plan });
//!     let tenant = policy.tenant("acme", attrs.as_object().unwrap()).unwrap();
//!     let decision = decide(&policy, &tenant, &request, &NoStats);
//!     decision.attempts.iter().map(|m| policy.policy().models[m.index()].name.clone()).collect::<Vec<_>>()
//! };
//! assert_eq!(names("pro"), ["gpt-4o", "gpt-4o-mini"]);
//! assert_eq!(names("free"), ["gpt-4o-mini"]);
//! ```
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod analysis;
pub mod budget;
pub mod check;
pub mod compile;
pub mod config;
pub mod decide;
pub mod decision_log;
pub mod diag;
pub mod estimate;
pub mod fmt;
pub mod gateway;
pub mod ir;
pub mod load;
pub mod lower;
pub mod lsp;
pub mod metrics;
pub mod policytest;
pub mod reload;
pub mod render;
pub mod source;
pub mod state;
pub mod syntax;
