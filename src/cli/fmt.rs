//! `routeplane fmt [--check] [PATH...]`: rewrite `.route` files in the
//! canonical layout.
//!
//! Exit codes: 0 all files formatted (or already were), 1 with `--check` when
//! some file would change (they are listed on stdout), 2 when a file cannot be
//! read or written or has syntax errors (those files are left untouched).

use std::path::{Path, PathBuf};

use routeplane::diag::Diagnostic;
use routeplane::fmt::format_source;
use routeplane::render::Human;
use routeplane::source::{FileId, Sources};

#[derive(clap::Args)]
pub struct Args {
    /// Write nothing; list the files that would change and exit 1 if any
    #[arg(long)]
    check: bool,
    /// `.route` files, or directories searched recursively
    #[arg(default_value = "policies")]
    paths: Vec<PathBuf>,
}

pub fn run(args: Args) -> u8 {
    let mut files = Vec::new();
    let mut failed = false;
    for path in &args.paths {
        if let Err(e) = collect(path, &mut files) {
            eprintln!("error: cannot read `{}`: {e}", path.display());
            failed = true;
        }
    }
    let mut changed = false;
    for file in &files {
        match format_file(file, args.check) {
            Ok(true) => {
                changed = true;
                if args.check {
                    println!("{}", file.display());
                }
            }
            Ok(false) => {}
            Err(msg) => {
                eprint!("{msg}");
                failed = true;
            }
        }
    }
    if failed {
        2
    } else if args.check && changed {
        1
    } else {
        0
    }
}

/// Format one file; `Ok(true)` when its text changes (and, unless `check`, was rewritten).
fn format_file(path: &Path, check: bool) -> Result<bool, String> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| format!("error: cannot read `{shown}`: {e}\n"))?;
    // Never rewrite a file we could not read exactly: lossy decoding would drop bytes.
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("error: `{shown}` is not valid UTF-8; it was left unchanged\n"))?;
    let out = format_source(FileId(0), &text).map_err(|diags| render(&shown, &text, &diags))?;
    if out == text {
        return Ok(false);
    }
    if !check {
        write_atomically(path, &out)
            .map_err(|e| format!("error: cannot write `{shown}`: {e}\n"))?;
    }
    Ok(true)
}

/// Write to a temporary file next to `path`, then rename it over `path`, so a
/// crash never leaves a half-written policy.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.fmt-{}.tmp", std::process::id()));
    let result = (|| {
        std::fs::write(&tmp, text)?;
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Every `.route` file under `path`, in name order. Hidden directories and
/// `target` are skipped.
fn collect(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if std::fs::metadata(path)?.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if !name.starts_with('.') && name != "target" {
                collect(&p, out)?;
            }
        } else if p.extension().is_some_and(|e| e == "route") {
            out.push(p);
        }
    }
    Ok(())
}

/// The diagnostics as `routeplane check` shows them (on stderr: colored when
/// stderr is a terminal and `NO_COLOR` is unset).
fn render(name: &str, text: &str, diags: &[Diagnostic]) -> String {
    let mut sources = Sources::new();
    sources.add(name, text);
    let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let human = Human::new(color);
    let mut out: String = diags
        .iter()
        .map(|d| human.diagnostic(&sources, d))
        .collect();
    out.push_str(&format!(
        "error: `{name}` has syntax errors; it was left unchanged\n"
    ));
    out
}
