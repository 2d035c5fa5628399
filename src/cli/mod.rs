//! Subcommands. Exit codes: 0 success, 1 the input has problems, 2 usage or I/O error.
pub mod check;
pub mod explain;
pub mod fmt;
pub mod lsp;
pub mod serve;
pub mod test;
pub mod usage;
