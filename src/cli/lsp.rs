//! `routeplane lsp`: the language server over stdio.

#[derive(clap::Args)]
pub struct Args {
    /// Accepted for editors that pass it; stdio is the only transport.
    #[arg(long)]
    stdio: bool,
}

pub fn run(_args: Args) -> u8 {
    match routeplane::lsp::run_stdio() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("routeplane lsp: {e}");
            2
        }
    }
}
