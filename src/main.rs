//! The `routeplane` command line. Each subcommand lives in `cli/<name>.rs`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

/// The gateway allocates a little for every request on every worker thread;
/// mimalloc's thread-local heaps make that about half as costly as glibc's
/// malloc (measured with `benches/proxy.sh`, see docs/performance.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A routing control plane for LLM gateways.
#[derive(Parser)]
#[command(name = "routeplane", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check policies for errors and lints (exit 0 clean, 1 problems, 2 usage or I/O error)
    Check(cli::check::Args),
    /// Format policies in the canonical layout
    Fmt(cli::fmt::Args),
    /// Explain the decision for one request
    Explain(cli::explain::Args),
    /// Run the decision tests (`*.test.yaml`) next to the policies
    Test(cli::test::Args),
    /// Run the OpenAI-compatible gateway
    Serve(cli::serve::Args),
    /// Run the language server (stdio) for editors
    Lsp(cli::lsp::Args),
    /// Spend per tenant, feature, model or day, from the ledger
    Usage(cli::usage::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Check(a) => cli::check::run(a),
        Command::Fmt(a) => cli::fmt::run(a),
        Command::Explain(a) => cli::explain::run(a),
        Command::Test(a) => cli::test::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Lsp(a) => cli::lsp::run(a),
        Command::Usage(a) => cli::usage::run(a),
    };
    ExitCode::from(code)
}
