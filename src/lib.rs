//! routeplane: a routing control plane for LLM gateways.
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
