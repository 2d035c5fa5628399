//! `routeplane fmt [--check] [PATH...]`: rewrite `.route` files in the
//! canonical layout.
//!
//! Exit codes: 0 all files formatted (or already were), 1 with `--check` when
//! some file would change (they are listed on stdout), 2 when a file cannot be
//! read or written or has syntax errors (those files are left untouched).
//!
//! INVARIANT: `fmt` never changes what `check` reports: a policy whose
//! diagnostics would differ after formatting (an `// allow(..)` comment that
//! no longer sits on or above its line) is left untouched and reported.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use routeplane::analysis::analyze;
use routeplane::diag::Diagnostic;
use routeplane::fmt::format_source;
use routeplane::load::read_policy;
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
        if let Err(e) = collect(path, &mut files, &mut HashSet::new()) {
            eprintln!("error: cannot read `{}`: {e}", path.display());
            failed = true;
        }
    }
    // Format everything in memory first: a file is written only once its
    // whole policy is known to mean the same after formatting.
    let mut changes = Vec::new();
    for file in &files {
        match format_file(file) {
            Ok(Some(change)) => changes.push(change),
            Ok(None) => {}
            Err(msg) => {
                eprint!("{msg}");
                failed = true;
            }
        }
    }
    if let Err(msgs) = same_diagnostics(&mut changes) {
        eprint!("{msgs}");
        failed = true;
    }
    if args.check {
        let list: String = changes
            .iter()
            .map(|c| format!("{}\n", c.path.display()))
            .collect();
        if !super::print_out(&list) {
            return 2;
        }
    } else {
        for change in &changes {
            if let Err(e) = write_atomically(&change.path, &change.text) {
                eprintln!("error: cannot write `{}`: {e}", change.path.display());
                failed = true;
            }
        }
    }
    if failed {
        2
    } else if args.check && !changes.is_empty() {
        1
    } else {
        0
    }
}

/// A file whose formatted text differs from what is on disk.
struct Change {
    path: PathBuf,
    text: String,
}

/// Format one file in memory; `Ok(None)` when it is already formatted.
fn format_file(path: &Path) -> Result<Option<Change>, String> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| format!("error: cannot read `{shown}`: {e}\n"))?;
    // Never rewrite a file we could not read exactly: lossy decoding would drop bytes.
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("error: `{shown}` is not valid UTF-8; it was left unchanged\n"))?;
    let out = format_source(FileId(0), &text).map_err(|diags| render(&shown, &text, &diags))?;
    Ok((out != text).then(|| Change {
        path: path.to_path_buf(),
        text: out,
    }))
}

/// Formatting keeps the tree, but `// allow(lint)` comments work by line, so a
/// layout change could make one stop applying. Check each changed policy (the
/// `.route` files of a directory) before and after, and keep out of `changes`
/// the files of a policy whose diagnostics would differ.
fn same_diagnostics(changes: &mut Vec<Change>) -> Result<(), String> {
    let mut dirs: Vec<PathBuf> = changes
        .iter()
        .filter_map(|c| c.path.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    let mut msgs = String::new();
    for dir in dirs {
        let dir_for_read = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir.as_path()
        };
        let Ok(policy) = read_policy(dir_for_read) else {
            continue;
        };
        let mut after = Sources::new();
        for (_, f) in policy.sources.iter() {
            let name = Path::new(&f.name).file_name();
            let changed = changes
                .iter()
                .find(|c| c.path.parent() == Some(dir.as_path()) && c.path.file_name() == name);
            after.add(
                f.name.clone(),
                changed.map_or(f.text.as_str(), |c| c.text.as_str()),
            );
        }
        let summary = |sources: &Sources| {
            let mut v: Vec<(String, String)> = analyze(sources)
                .diagnostics
                .into_iter()
                .map(|d| (d.code, d.message))
                .collect();
            v.sort();
            v
        };
        let (before, now) = (summary(&policy.sources), summary(&after));
        if before == now {
            continue;
        }
        let new: Vec<String> = now
            .iter()
            .filter(|d| !before.contains(d))
            .map(|(c, m)| format!("{c}: {m}"))
            .collect();
        msgs.push_str(&format!(
            "error: formatting `{}` would change what `routeplane check` reports{}{}\n  \
             help: an `// allow(lint)` comment silences its own line and the next; move it onto the line of the warning\n",
            dir_for_read.display(),
            if new.is_empty() { "" } else { ": " },
            new.join("; "),
        ));
        changes.retain(|c| c.path.parent() != Some(dir.as_path()));
    }
    if msgs.is_empty() {
        Ok(())
    } else {
        Err(msgs)
    }
}

/// Write to a temporary file next to `path`, then rename it over `path`, so a
/// crash never leaves a half-written policy.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    // A policy file that is a symlink (to a shared policy) is written where it
    // leads: renaming over the link replaced it with a copy, and the shared
    // file stayed as it was.
    let real = std::fs::canonicalize(path);
    let path = real.as_deref().unwrap_or(path);
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
/// `target` are skipped, and so is a directory already searched (`seen` holds
/// them resolved): a symlink loop would list its files again and again.
fn collect(
    path: &Path,
    out: &mut Vec<PathBuf>,
    seen: &mut HashSet<PathBuf>,
) -> std::io::Result<()> {
    if std::fs::metadata(path)?.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        if !seen.insert(real) {
            return Ok(());
        }
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if !name.starts_with('.') && name != "target" {
                collect(&p, out, seen)?;
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
