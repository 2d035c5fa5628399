//! routeplane: a routing control plane for LLM gateways.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod diag;
pub mod source;
pub mod syntax;
pub mod ir;
pub mod load;
pub mod analysis;
pub mod config;
pub mod fmt;
