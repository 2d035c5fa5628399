//! The one entry point every front end calls: sources in, AST + IR + diagnostics out.
//!
//! `routeplane check`, the language server and the gateway's reload all call
//! [`analyze`], so there is one truth about whether a policy is valid.

use crate::diag::Diagnostic;
use crate::ir::Policy;
use std::collections::HashMap;

use crate::check;
use crate::lower;
use crate::source::{FileId, Sources, Span};
use crate::syntax::{
    self,
    ast::{FileAst, Item},
};

/// Everything known about a policy after analysis.
#[derive(Debug)]
pub struct Analysis {
    /// One tree per source file, in the order of `Sources`.
    pub files: Vec<FileAst>,
    /// The lowered policy. Complete when there are no errors; otherwise the
    /// best effort (useful for the editor), never to be compiled.
    pub policy: Policy,
    /// All diagnostics of all files, sorted by file and position, with
    /// silenced lints removed.
    pub diagnostics: Vec<Diagnostic>,
}

impl Analysis {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| !d.is_error())
    }
}

/// Parse, lower and check a policy. Never panics, never stops at the first error.
pub fn analyze(sources: &Sources) -> Analysis {
    let mut diagnostics = Vec::new();
    let mut files = Vec::new();
    for (id, file) in sources.iter() {
        let parsed = syntax::parse_file(id, &file.text);
        diagnostics.extend(parsed.diagnostics);
        files.push(parsed.ast);
    }
    let syntax_ok = diagnostics.is_empty();
    // The parser sees U+FFFD where the bytes were not UTF-8: in a string or a
    // comment it parses, and `"caf\xe9"` (Latin-1) silently never matched.
    for (id, file) in sources.iter() {
        if let Some(at) = file.invalid_utf8 {
            diagnostics.push(
                Diagnostic::error("syntax", format!("`{}` is not valid UTF-8", file.name))
                    .with_label(
                        Span::new(id, at, at.saturating_add('\u{fffd}'.len_utf8())),
                        "these bytes are not UTF-8",
                    )
                    .with_help("save the file as UTF-8"),
            );
        }
    }
    let lowered = lower::lower(&files);
    let lowered_ok = !lowered.diagnostics.iter().any(Diagnostic::is_error);
    diagnostics.extend(lowered.diagnostics);
    let has_models = files
        .iter()
        .flat_map(|f| f.items.iter())
        .any(|i| matches!(i, Item::Model(_)));
    if has_models && syntax_ok {
        // With a partial tree, checks would report consequences of the syntax errors.
        diagnostics.extend(check::check(&lowered.policy, &lowered.usage, lowered_ok));
    } else if syntax_ok {
        let mut d = Diagnostic::error("empty-policy", "the policy declares no models")
            .with_help("declare at least one `provider` and one `model`, then route to it");
        if let Some((id, _)) = sources.iter().next() {
            d = d.with_label(Span::new(id, 0, 0), "no `model` in any file of this policy");
        }
        diagnostics.push(d);
    }
    let policy = lowered.policy;
    let (allowed, unknown) = allowed_lints(sources, &files);
    diagnostics.extend(unknown);
    diagnostics.retain(|d| !suppressed(d, sources, &allowed));
    diagnostics.sort_by_key(|d| d.span().map(|s| (s.file, s.start, s.end)));
    // Spans compare equal whatever their location: dedup on exact locations.
    diagnostics.dedup_by(|a, b| {
        a == b
            && a.labels
                .iter()
                .zip(&b.labels)
                .all(|(x, y)| x.span.same_as(&y.span))
    });
    Analysis {
        files,
        policy,
        diagnostics,
    }
}

/// Lines silenced by `// allow(lint-a, lint-b)` comments: (file, line) ->
/// lint names. A comment silences lints on its own line and on the next one.
type Allowed = HashMap<(FileId, usize), Vec<String>>;

/// The `// allow(...)` comments, and a warning for each name in them that is
/// no lint (`single-candiate`): it would silence nothing, unnoticed.
fn allowed_lints(sources: &Sources, files: &[FileAst]) -> (Allowed, Vec<Diagnostic>) {
    let lints = || {
        crate::render::RULES
            .iter()
            .filter(|r| r.severity == crate::diag::Severity::Warning)
            .map(|r| r.name)
    };
    let mut unknown = Vec::new();
    let mut out: Allowed = HashMap::new();
    for f in files {
        let Some(src) = sources.get(f.file) else {
            continue;
        };
        for c in &f.comments {
            let body = c.text.trim_start_matches('/').trim();
            let Some(rest) = body.strip_prefix("allow(") else {
                continue;
            };
            let Some((list, _)) = rest.split_once(')') else {
                continue;
            };
            let names: Vec<String> = list
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            for n in names.iter().filter(|n| !lints().any(|l| l == n.as_str())) {
                // `rule` also finds lints, and by their `route::` code too.
                let is_error = crate::render::rule(n)
                    .is_some_and(|r| r.severity == crate::diag::Severity::Error);
                let code_of_lint = n
                    .strip_prefix("route::")
                    .filter(|b| lints().any(|l| l == *b));
                let help = match crate::diag::did_you_mean(n, lints()) {
                    _ if is_error => "errors cannot be allowed: fix what it reports".to_string(),
                    _ if code_of_lint.is_some() => format!(
                        "name the lint without `route::`: `allow({})`",
                        code_of_lint.unwrap_or_default()
                    ),
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!(
                        "lints that can be allowed: {}",
                        lints().collect::<Vec<_>>().join(", ")
                    ),
                };
                let message = if is_error {
                    format!("`{n}` is an error, not a lint")
                } else {
                    format!("`{n}` is not a lint")
                };
                unknown.push(
                    Diagnostic::lint("unknown-lint", message)
                        .with_label(c.span, "silences nothing")
                        .with_help(help),
                );
            }
            let line = src.line_col(c.span.start()).0;
            for l in [line, line + 1] {
                out.entry((f.file, l))
                    .or_default()
                    .extend(names.iter().cloned());
            }
        }
    }
    (out, unknown)
}

fn suppressed(d: &Diagnostic, sources: &Sources, allowed: &Allowed) -> bool {
    let (Some(lint), Some(span)) = (d.lint, d.span()) else {
        return false;
    };
    let Some(src) = sources.get(span.file) else {
        return false;
    };
    let line = src.line_col(span.start()).0;
    allowed
        .get(&(span.file, line))
        .is_some_and(|names| names.iter().any(|n| n == lint))
}
