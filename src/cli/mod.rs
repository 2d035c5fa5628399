//! Subcommands. Exit codes: 0 success, 1 the input has problems, 2 usage or I/O error.
pub mod check;
pub mod explain;
pub mod fmt;
pub mod lsp;
pub mod serve;
pub mod test;
pub mod usage;

/// Write a command's output to stdout in one go. `print!` panics when stdout
/// is closed (`routeplane explain ... | head -1`); this returns false instead,
/// and the command exits 2 (an I/O error) without a word more.
pub fn print_out(text: &str) -> bool {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok()
}
