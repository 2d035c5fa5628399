//! Rendering diagnostics for people and for machines.
//!
//! Four formats, one input: the diagnostics of each checked policy together
//! with its [`Sources`].
//! - `human`: miette's graphical report with a rustc-like header
//!   (`error[route::unknown-model]: ...`), the `file:line:col`, the source lines
//!   with their labels and the help line. Labels in another file than the
//!   primary one follow as `note:` reports of their own.
//! - `json`: one document with a stable schema ([`JsonReport`]) that is
//!   deliberately separate from [`Diagnostic`], so internal changes do not break
//!   the tools that read it.
//! - `github`: workflow commands that GitHub Actions turns into annotations.
//! - `sarif`: SARIF 2.1.0 for code scanning.
//!
//! Lines and columns are 1-based everywhere; columns count characters.

use std::fmt::{self, Write as _};

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, ThemeCharacters, ThemeStyles};
use serde::Serialize;

use crate::diag::{Diagnostic, Severity};
use crate::source::{SourceFile, Sources, Span};

/// Width human reports are wrapped at. Fixed rather than taken from the
/// terminal so that output (and the UI snapshots) never depend on the window.
pub const HUMAN_WIDTH: usize = 100;

/// The diagnostics of one checked policy.
#[derive(Clone, Copy, Debug)]
pub struct Checked<'a> {
    /// Where the policy came from (its directory or single file), for display.
    pub name: &'a str,
    pub sources: &'a Sources,
    pub diagnostics: &'a [Diagnostic],
}

// ---------------------------------------------------------------- catalogue

/// One diagnostic code that routeplane can emit.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// The kebab-case name; the code is `route::<name>`.
    pub name: &'static str,
    pub severity: Severity,
    pub description: &'static str,
}

const fn error(name: &'static str, description: &'static str) -> Rule {
    Rule {
        name,
        severity: Severity::Error,
        description,
    }
}
const fn lint(name: &'static str, description: &'static str) -> Rule {
    Rule {
        name,
        severity: Severity::Warning,
        description,
    }
}

/// Every code in the shared list, for SARIF's rule table and for docs.
pub const RULES: &[Rule] = &[
    error("syntax", "the text does not follow the grammar of `.route` files"),
    error("unknown-model", "a name refers to a model that is not declared"),
    error("unknown-provider", "a name refers to a provider that is not declared"),
    error("unknown-intent", "a route or fallback names an intent that no classify rule produces"),
    error("unknown-attribute", "a condition reads a field that does not exist in its scope"),
    error("unknown-variant", "a value is not a variant of the field's enum"),
    error("unknown-signal", "a score term names a signal other than price, latency, first_token, success, quality and health"),
    error("unknown-kind", "a model kind other than chat, embeddings, image, audio and video"),
    error("unknown-capability", "a capability that no model declares"),
    error("unknown-word", "a word outside the fixed vocabulary (protection words, tiers, price units, statuses)"),
    error("duplicate-name", "two declarations share one name"),
    error("duplicate-property", "a property is given twice in one declaration"),
    error("missing-property", "a required property is missing"),
    error("type-mismatch", "a value does not have the type of the field it is compared with"),
    error("unsupported-type", "a request attribute is declared with a type a request cannot send (a list)"),
    error("unit-mismatch", "a quantity has the wrong unit or none where one is required"),
    error("invalid-range", "a number is outside its allowed range"),
    error("invalid-regex", "a regular expression does not compile"),
    error("wrong-scope", "a condition reads fields that are not available where it is used"),
    error("fallback-cycle", "fallbacks between routes form a cycle"),
    error("candidate-denied", "a candidate, fallback or downgrade target is denied by a constraint where the route applies"),
    error("coverage-hole", "for some intent and tenant class no candidate survives the constraints"),
    error("missing-default", "the last classify rule is not an `otherwise` rule"),
    error("missing-route", "an intent has no default route"),
    error("duplicate-route", "an intent has more than one default route"),
    error("empty-route", "a route has no candidates"),
    error("empty-policy", "the policy declares no models"),
    lint("unused-model", "a model is declared but never used"),
    lint("unused-provider", "a provider is declared but no model uses it"),
    lint("unused-attribute", "a tenant or request attribute is declared but never read"),
    lint("shadowed-rule", "a classify rule can never match because an earlier rule matches first"),
    lint("never-fires", "a constraint can never fire or never removes a model"),
    lint("zero-weights", "every weight of a score is zero"),
    lint("single-candidate", "a route has one candidate and no fallback"),
    lint("disabled-candidate", "a route names a disabled model"),
    lint("similar-capability", "a capability one model declares is one letter from another model's"),
    lint("unknown-lint", "an `// allow(...)` comment names something that is not a lint: it silences nothing"),
    lint("mixed-kinds", "a route whose candidates, fallbacks or downgrades are of different model kinds (chat and embeddings): each request only goes to the models whose kind serves its endpoint"),
    lint("no-effect", "a route setting that can never apply: `premium only` without premium models, `downgrade` without a budget that downgrades"),
];

/// The catalogue entry of a code such as `route::unknown-model`.
pub fn rule(code: &str) -> Option<&'static Rule> {
    let name = code.strip_prefix("route::").unwrap_or(code);
    RULES.iter().find(|r| r.name == name)
}

// ---------------------------------------------------------------- summary

/// Counts over a whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub errors: usize,
    pub warnings: usize,
    pub policies: usize,
    pub files: usize,
}

impl Summary {
    pub fn of(checked: &[Checked<'_>]) -> Summary {
        let mut s = Summary {
            policies: checked.len(),
            ..Summary::default()
        };
        for c in checked {
            s.files += c.sources.len();
            for d in c.diagnostics {
                match d.severity {
                    Severity::Error => s.errors += 1,
                    Severity::Warning => s.warnings += 1,
                }
            }
        }
        s
    }

    /// Whether the run fails: errors, or warnings when they are denied.
    pub fn failed(&self, deny_warnings: bool) -> bool {
        self.errors > 0 || (deny_warnings && self.warnings > 0)
    }

    /// `error: 3 errors, 1 warning in 2 policies`, `warning: ...`, or `ok: ...`.
    pub fn line(&self, deny_warnings: bool) -> String {
        let policies = plural(self.policies, "policy", "policies");
        if self.errors == 0 && self.warnings == 0 {
            return format!("ok: no problems in {policies}");
        }
        let mut counts = Vec::new();
        if self.errors > 0 {
            counts.push(plural(self.errors, "error", "errors"));
        }
        if self.warnings > 0 {
            counts.push(plural(self.warnings, "warning", "warnings"));
        }
        let head = if self.failed(deny_warnings) {
            "error"
        } else {
            "warning"
        };
        let denied = if self.errors == 0 && deny_warnings {
            " (warnings denied)"
        } else {
            ""
        };
        format!("{head}: {} in {policies}{denied}", counts.join(", "))
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

// ---------------------------------------------------------------- locations

/// The byte range of a span as shown to users: clamped to the text and to
/// character boundaries (a span from a buggy stage must not make a renderer
/// panic), and without trailing whitespace, which a label never means to
/// cover (a span that swallowed the line break would be drawn over two lines).
fn bounds(src: &SourceFile, span: Span) -> (usize, usize) {
    let text = &src.text;
    let mut start = span.start().min(text.len());
    while !text.is_char_boundary(start) {
        start = start.saturating_sub(1);
    }
    let mut end = span.end().clamp(start, text.len());
    while !text.is_char_boundary(end) {
        end += 1;
    }
    let covered = text.get(start..end).unwrap_or("");
    let trimmed = covered.trim_end();
    if !trimmed.is_empty() {
        end = start + trimmed.len();
    }
    (start, end)
}

/// A resolved span: file name and 1-based start and end positions.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Place<'a> {
    file: &'a str,
    line: usize,
    column: usize,
    end_line: usize,
    end_column: usize,
}

fn place<'a>(sources: &'a Sources, span: Span) -> Option<Place<'a>> {
    let f = sources.get(span.file)?;
    let (start, end) = bounds(f, span);
    let (line, column) = f.line_col(start);
    let (end_line, end_column) = f.line_col(end);
    Some(Place {
        file: &f.name,
        line,
        column,
        end_line,
        end_column,
    })
}

// ---------------------------------------------------------------- human

/// When human output is colored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ColorChoice {
    /// Colored when stdout is a terminal and `NO_COLOR` is unset or empty.
    #[default]
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    pub fn enabled(self) -> bool {
        use std::io::IsTerminal;
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        }
    }
}

/// Renders diagnostics as miette reports.
#[derive(Clone, Copy, Debug)]
pub struct Human {
    pub color: bool,
    pub width: usize,
}

impl Default for Human {
    fn default() -> Self {
        Human {
            color: false,
            width: HUMAN_WIDTH,
        }
    }
}

impl Human {
    pub fn new(color: bool) -> Self {
        Human {
            color,
            width: HUMAN_WIDTH,
        }
    }

    /// One diagnostic: the report at its primary location, then a note for
    /// every label that lies in another file. Ends with a newline.
    pub fn diagnostic(&self, sources: &Sources, d: &Diagnostic) -> String {
        let primary_file = d.span().map(|s| s.file);
        let source = primary_file.and_then(|f| sources.get(f));
        if let (Some(src), Some(span)) = (source, d.span()) {
            let (line, _) = src.line_col(span.start());
            if src.line_text(line).len() > MAX_SNIPPET_LINE {
                // miette would draw the whole line (megabytes of a broken
                // file, seconds to lay out): the location and message only.
                let message = format!("{}: {}", sources.location(span), d.message);
                let report = Report {
                    message: &message,
                    severity: d.severity,
                    help: d.help.as_deref(),
                    source: None,
                    labels: Vec::new(),
                };
                return self.render(&report, &header(d.severity, &d.code));
            }
        }
        let labels: Vec<LabeledSpan> = match source {
            Some(src) => d
                .labels
                .iter()
                .filter(|l| Some(l.span.file) == primary_file)
                .map(|l| labeled(src, l.span, &l.message, l.primary))
                .collect(),
            None => Vec::new(),
        };
        let report = Report {
            message: &d.message,
            severity: d.severity,
            help: d.help.as_deref(),
            source: source.map(named),
            labels,
        };
        let mut out = self.render(&report, &header(d.severity, &d.code));
        for l in d
            .labels
            .iter()
            .filter(|l| Some(l.span.file) != primary_file)
        {
            let Some(src) = sources.get(l.span.file) else {
                continue;
            };
            let message = if l.message.is_empty() {
                "related location"
            } else {
                &l.message
            };
            let note = Report {
                message,
                severity: d.severity,
                help: None,
                source: Some(named(src)),
                labels: vec![labeled(src, l.span, "", true)],
            };
            out.push_str(&self.render(&note, "note:"));
        }
        out
    }

    /// Any miette diagnostic (such as a load error), with the same look.
    pub fn other(&self, d: &dyn miette::Diagnostic) -> String {
        let code = d.code().map(|c| c.to_string()).unwrap_or_default();
        let head = if code.is_empty() {
            "error:".to_string()
        } else {
            format!("error[{code}]:")
        };
        // Re-wrapped so the code shows in our header only, and the cause
        // (already part of the message) is not repeated.
        let message = d.to_string();
        let help = d.help().map(|h| h.to_string());
        let report = Report {
            message: &message,
            severity: Severity::Error,
            help: help.as_deref(),
            source: None,
            labels: Vec::new(),
        };
        self.render(&report, &head)
    }

    /// Every diagnostic of every policy, a blank line between reports, then the summary.
    pub fn run(&self, checked: &[Checked<'_>], deny_warnings: bool) -> String {
        let mut out = String::new();
        for c in checked {
            for d in c.diagnostics {
                out.push_str(&self.diagnostic(c.sources, d));
                out.push('\n');
            }
        }
        let summary = Summary::of(checked);
        let line = summary.line(deny_warnings);
        if self.color {
            // Bold red, yellow or green, as rustc colors its summary.
            let color = if summary.failed(deny_warnings) {
                "31"
            } else if summary.warnings > 0 {
                "33"
            } else {
                "32"
            };
            let (head, rest) = line.split_once(':').unwrap_or((&line, ""));
            let _ = writeln!(out, "\u{1b}[1;{color}m{head}\u{1b}[0m:{rest}");
        } else {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    fn render(&self, d: &Report<'_>, head: &str) -> String {
        // miette writes `  <icon> <message>` as the first line; the icon is the
        // header (`error[route::x]:`), so the report reads like rustc's.
        let mut characters = ThemeCharacters::unicode();
        characters.error = head.to_string();
        characters.warning = head.to_string();
        characters.advice = head.to_string();
        let styles = if self.color {
            ThemeStyles::ansi()
        } else {
            ThemeStyles::none()
        };
        let handler = GraphicalReportHandler::new_themed(GraphicalTheme { characters, styles })
            .with_width(self.width)
            .with_links(false)
            .with_urls(false)
            // Messages stay on one line, as rustc's do: easier to grep, and
            // the output does not depend on where a message happens to wrap.
            .with_wrap_lines(false)
            .without_syntax_highlighting();
        let mut out = String::new();
        if handler.render_report(&mut out, d).is_err() {
            // Rendering only fails on a label miette cannot read; the message
            // alone is still worth showing.
            out = format!("  {head} {d}\n");
        }
        let out = out.strip_prefix("  ").map(str::to_string).unwrap_or(out);
        // Drop trailing spaces miette leaves on empty gutter lines, so
        // snapshots and terminals agree.
        let mut clean = String::with_capacity(out.len());
        for line in out.lines() {
            clean.push_str(line.trim_end());
            clean.push('\n');
        }
        clean
    }
}

/// Lines longer than this (bytes) are not drawn in a report.
const MAX_SNIPPET_LINE: usize = 1000;

fn header(severity: Severity, code: &str) -> String {
    match severity {
        Severity::Error => format!("error[{code}]:"),
        Severity::Warning => format!("warning[{code}]:"),
    }
}

fn named(src: &SourceFile) -> Named {
    // miette draws a lone `\r` (an old Mac line break) inside the line
    // rather than as a break; as a `\n`, which is one byte too, every
    // offset stays where it was and the drawing has the lines that
    // `line_col` counts.
    let mut text: String = src
        .text
        .char_indices()
        .map(|(i, c)| match c {
            '\r' if src
                .text
                .get(i + 1..)
                .is_none_or(|rest| !rest.starts_with('\n')) =>
            {
                '\n'
            }
            c => c,
        })
        .collect();
    if !text.ends_with('\n') {
        // miette draws no label at the very end of a text; a final line
        // break gives an "at end of file" label a place to stand.
        text.push('\n');
    }
    Named {
        source: SourceFile::new(src.name.clone(), text),
    }
}

/// A named source whose lines and columns are those of
/// [`SourceFile::line_col`], as in every other output: miette's columns
/// count bytes, so the `file:line:col` above a report would point past the
/// spot on a line with `é` before it, and its lines counted a lone `\r`
/// that JSON did not.
#[derive(Debug)]
struct Named {
    source: SourceFile,
}

impl miette::SourceCode for Named {
    fn read_span<'a>(
        &'a self,
        span: &miette::SourceSpan,
        before: usize,
        after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'a> + 'a>, miette::MietteError> {
        let inner = self.source.text.read_span(span, before, after)?;
        // 1-based, without the byte-order mark editors do not show; miette's are 0-based.
        let (line, column) = self.source.line_col(inner.span().offset());
        Ok(Box::new(
            miette::MietteSpanContents::new_named(
                self.source.name.clone(),
                inner.data(),
                *inner.span(),
                line.saturating_sub(1),
                column.saturating_sub(1),
                inner.line_count(),
            )
            .with_language("route"),
        ))
    }
}

/// A miette label for a span, clamped to the text and to character boundaries
/// (a span from a buggy stage must not make the renderer panic).
fn labeled(src: &SourceFile, span: Span, message: &str, primary: bool) -> LabeledSpan {
    let text = &src.text;
    let (mut start, end) = bounds(src, span);
    if span.is_empty() && start >= text.trim_end().len() {
        // "found end of file": miette cannot draw a label past the last line,
        // so point just after the last token, as rustc does.
        start = text.trim_end().len();
    }
    let end = end.max(start);
    let label = if message.is_empty() {
        None
    } else {
        Some(message.to_string())
    };
    if primary {
        LabeledSpan::new_primary_with_span(label, (start, end - start))
    } else {
        LabeledSpan::new_with_span(label, (start, end - start))
    }
}

/// The miette view of one report.
#[derive(Debug)]
struct Report<'a> {
    message: &'a str,
    severity: Severity,
    help: Option<&'a str>,
    source: Option<Named>,
    labels: Vec<LabeledSpan>,
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message)
    }
}

impl std::error::Error for Report<'_> {}

impl miette::Diagnostic for Report<'_> {
    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source.as_ref().map(|s| s as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.labels.is_empty() {
            None
        } else {
            Some(Box::new(self.labels.iter().cloned()))
        }
    }
}

// ---------------------------------------------------------------- json

/// The JSON document of `check --format json`. Version 1; fields are only
/// ever added.
#[derive(Debug, Serialize)]
pub struct JsonReport<'a> {
    pub version: u32,
    pub ok: bool,
    pub summary: Summary,
    pub policies: Vec<JsonPolicy<'a>>,
    pub diagnostics: Vec<JsonDiagnostic<'a>>,
}

#[derive(Debug, Serialize)]
pub struct JsonPolicy<'a> {
    pub path: &'a str,
    pub files: Vec<&'a str>,
    pub errors: usize,
    pub warnings: usize,
}

#[derive(Debug, Serialize)]
pub struct JsonDiagnostic<'a> {
    /// The policy the diagnostic belongs to (its `path` in `policies`).
    pub policy: &'a str,
    pub file: Option<&'a str>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub end_line: Option<usize>,
    pub end_column: Option<usize>,
    pub code: &'a str,
    pub severity: &'static str,
    pub message: &'a str,
    pub help: Option<&'a str>,
    /// For lints, the name `// allow(...)` takes.
    pub lint: Option<&'static str>,
    pub labels: Vec<JsonLabel<'a>>,
    pub suggestion: Option<JsonSuggestion<'a>>,
}

#[derive(Debug, Serialize)]
pub struct JsonLabel<'a> {
    pub file: &'a str,
    pub line: usize,
    pub column: usize,
    pub end_line: usize,
    pub end_column: usize,
    pub message: &'a str,
    pub primary: bool,
}

#[derive(Debug, Serialize)]
pub struct JsonSuggestion<'a> {
    pub file: &'a str,
    pub line: usize,
    pub column: usize,
    pub end_line: usize,
    pub end_column: usize,
    pub replacement: &'a str,
}

fn severity_name(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

/// The JSON report of a run.
pub fn json_report<'a>(checked: &[Checked<'a>], deny_warnings: bool) -> JsonReport<'a> {
    let summary = Summary::of(checked);
    let mut policies = Vec::new();
    let mut diagnostics = Vec::new();
    for c in checked {
        let errors = c.diagnostics.iter().filter(|d| d.is_error()).count();
        policies.push(JsonPolicy {
            path: c.name,
            files: c.sources.iter().map(|(_, f)| f.name.as_str()).collect(),
            errors,
            warnings: c.diagnostics.len() - errors,
        });
        for d in c.diagnostics {
            let at = d.span().and_then(|s| place(c.sources, s));
            let labels = d
                .labels
                .iter()
                .filter_map(|l| {
                    let p = place(c.sources, l.span)?;
                    Some(JsonLabel {
                        file: p.file,
                        line: p.line,
                        column: p.column,
                        end_line: p.end_line,
                        end_column: p.end_column,
                        message: &l.message,
                        primary: l.primary,
                    })
                })
                .collect();
            let suggestion = d.suggestion.as_ref().and_then(|s| {
                let p = place(c.sources, s.span)?;
                Some(JsonSuggestion {
                    file: p.file,
                    line: p.line,
                    column: p.column,
                    end_line: p.end_line,
                    end_column: p.end_column,
                    replacement: &s.replacement,
                })
            });
            diagnostics.push(JsonDiagnostic {
                policy: c.name,
                file: at.as_ref().map(|p| p.file),
                line: at.as_ref().map(|p| p.line),
                column: at.as_ref().map(|p| p.column),
                end_line: at.as_ref().map(|p| p.end_line),
                end_column: at.as_ref().map(|p| p.end_column),
                code: &d.code,
                severity: severity_name(d.severity),
                message: &d.message,
                help: d.help.as_deref(),
                lint: d.lint,
                labels,
                suggestion,
            });
        }
    }
    JsonReport {
        version: 1,
        ok: !summary.failed(deny_warnings),
        summary,
        policies,
        diagnostics,
    }
}

/// `check --format json`: one pretty-printed document and a newline.
pub fn json(checked: &[Checked<'_>], deny_warnings: bool) -> String {
    let mut out =
        serde_json::to_string_pretty(&json_report(checked, deny_warnings)).unwrap_or_default();
    out.push('\n');
    out
}

// ---------------------------------------------------------------- github

/// `check --format github`: one workflow command per diagnostic
/// (`::error file=..,line=..,col=..,endLine=..,endColumn=..,title=<code>::<message>`).
pub fn github(checked: &[Checked<'_>]) -> String {
    let mut out = String::new();
    for c in checked {
        for d in c.diagnostics {
            let command = match d.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let mut props = Vec::new();
            if let Some(p) = d.span().and_then(|s| place(c.sources, s)) {
                props.push(format!("file={}", escape_property(p.file)));
                props.push(format!("line={}", p.line));
                props.push(format!("col={}", p.column));
                props.push(format!("endLine={}", p.end_line));
                props.push(format!("endColumn={}", p.end_column));
            }
            props.push(format!("title={}", escape_property(&d.code)));
            let mut message = d.message.clone();
            if let Some(help) = &d.help {
                message.push_str("\nhelp: ");
                message.push_str(help);
            }
            let _ = writeln!(
                out,
                "::{command} {}::{}",
                props.join(","),
                escape_data(&message)
            );
        }
    }
    out
}

/// Escaping of a workflow command's message, as the runner decodes it.
fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Escaping of a workflow command's property value: data escaping plus `:` and `,`.
fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

// ---------------------------------------------------------------- sarif

pub const SARIF_SCHEMA: &str =
    "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json";

/// `check --format sarif`: a SARIF 2.1.0 log with one run.
pub fn sarif(checked: &[Checked<'_>]) -> String {
    let mut out = serde_json::to_string_pretty(&sarif_log(checked)).unwrap_or_default();
    out.push('\n');
    out
}

/// The SARIF log as a JSON value (the schema is SARIF's, not ours).
pub fn sarif_log(checked: &[Checked<'_>]) -> serde_json::Value {
    use serde_json::{json, Value};

    // Rules: the whole catalogue, plus any code we emit that it lacks, so
    // every result's `ruleId` resolves.
    let mut rules: Vec<(String, Severity, String)> = RULES
        .iter()
        .map(|r| {
            (
                format!("route::{}", r.name),
                r.severity,
                r.description.to_string(),
            )
        })
        .collect();
    for d in checked.iter().flat_map(|c| c.diagnostics) {
        if !rules.iter().any(|(id, _, _)| *id == d.code) {
            rules.push((d.code.clone(), d.severity, String::new()));
        }
    }
    let rule_values: Vec<Value> = rules
        .iter()
        .map(|(id, severity, description)| {
            let name = id.strip_prefix("route::").unwrap_or(id);
            let mut rule = json!({
                "id": id,
                "name": name,
                "defaultConfiguration": { "level": sarif_level(*severity) },
                "properties": { "tags": [if *severity == Severity::Warning { "lint" } else { "error" }] },
            });
            if !description.is_empty() {
                set(&mut rule, "shortDescription", json!({ "text": description }));
            }
            rule
        })
        .collect();

    let mut artifacts: Vec<String> = Vec::new();
    let mut results = Vec::new();
    for c in checked {
        for (_, f) in c.sources.iter() {
            if !artifacts.contains(&f.name) {
                artifacts.push(f.name.clone());
            }
        }
        for d in c.diagnostics {
            let rule_index = rules
                .iter()
                .position(|(id, _, _)| *id == d.code)
                .unwrap_or(0);
            let mut text = d.message.clone();
            if let Some(help) = &d.help {
                text.push_str("\nhelp: ");
                text.push_str(help);
            }
            let mut result = json!({
                "ruleId": d.code,
                "ruleIndex": rule_index,
                "level": sarif_level(d.severity),
                "message": { "text": text },
            });
            let location = |span: Span, artifacts: &[String]| -> Option<Value> {
                let p = place(c.sources, span)?;
                let mut loc = artifact_location(p.file);
                if let Some(i) = artifacts.iter().position(|a| a == p.file) {
                    set(&mut loc, "index", json!(i));
                }
                Some(json!({
                    "artifactLocation": loc,
                    "region": {
                        "startLine": p.line,
                        "startColumn": p.column,
                        "endLine": p.end_line,
                        "endColumn": p.end_column,
                    },
                }))
            };
            // Code scanning drops results without a location, so one with no
            // span is reported at the start of the policy's first file.
            let first_file = c.sources.iter().next().map(|(id, _)| Span::new(id, 0, 0));
            if let Some(loc) = d
                .span()
                .or(first_file)
                .and_then(|s| location(s, &artifacts))
            {
                set(
                    &mut result,
                    "locations",
                    json!([{ "physicalLocation": loc }]),
                );
            }
            let related: Vec<Value> = d
                .labels
                .iter()
                .filter(|l| !l.primary)
                .filter_map(|l| location(l.span, &artifacts).map(|loc| (l, loc)))
                .enumerate()
                .map(|(i, (l, loc))| {
                    json!({ "id": i, "physicalLocation": loc, "message": { "text": l.message } })
                })
                .collect();
            if !related.is_empty() {
                set(&mut result, "relatedLocations", Value::Array(related));
            }
            if let Some(lint) = d.lint {
                set(&mut result, "properties", json!({ "lint": lint }));
            }
            results.push(result);
        }
    }

    json!({
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "routeplane",
                "version": env!("CARGO_PKG_VERSION"),
                "semanticVersion": env!("CARGO_PKG_VERSION"),
                "rules": rule_values,
            }},
            "columnKind": "unicodeCodePoints",
            "originalUriBaseIds": { "%SRCROOT%": { "description": { "text": "the directory routeplane ran in" } } },
            "artifacts": artifacts.iter().map(|a| json!({ "location": artifact_location(a) })).collect::<Vec<_>>(),
            "results": results,
        }],
    })
}

/// Adds a member to a JSON object (`value[key] = ...` without the indexing).
fn set(value: &mut serde_json::Value, key: &str, member: serde_json::Value) {
    if let Some(object) = value.as_object_mut() {
        object.insert(key.to_string(), member);
    }
}

fn sarif_level(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

/// A path as a SARIF artifact location: relative paths against `%SRCROOT%`,
/// absolute ones as `file://` URIs.
fn artifact_location(path: &str) -> serde_json::Value {
    let slashed = path.replace('\\', "/");
    let slashed = slashed.strip_prefix("./").unwrap_or(&slashed);
    if slashed.starts_with('/') {
        serde_json::json!({ "uri": format!("file://{}", percent_encode(slashed)) })
    } else {
        serde_json::json!({ "uri": percent_encode(slashed), "uriBaseId": "%SRCROOT%" })
    }
}

/// Percent-encoding of a path for a URI: everything but unreserved characters and `/`.
fn percent_encode(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileId;

    fn two_files() -> Sources {
        let mut s = Sources::new();
        s.add("a.route", "model gpt { provider openai kind chat }\n");
        s.add("b.route", "route chat {\n  candidates [gtp]\n}\n");
        s
    }

    fn unknown_model() -> Diagnostic {
        Diagnostic::error("unknown-model", "unknown model `gtp`")
            .with_label(Span::new(FileId(1), 27, 30), "not declared")
            .with_help("did you mean `gpt`?")
            .with_suggestion(Span::new(FileId(1), 27, 30), "gpt")
    }

    fn duplicate() -> Diagnostic {
        Diagnostic::error("duplicate-name", "model `gpt` is declared twice")
            .with_label(Span::new(FileId(1), 6, 10), "declared again here")
            .with_label(Span::new(FileId(0), 6, 9), "first declared here")
    }

    #[test]
    fn a_line_too_long_to_draw_gets_its_location_and_message_only() {
        let mut s = Sources::new();
        let text = format!("model m {{}}\n{}\n", "x".repeat(100_000));
        s.add("long.route", text);
        let d = Diagnostic::error("syntax", "expected valid syntax, found `xxx...`")
            .with_label(Span::new(FileId(0), 11, 51), "unexpected")
            .with_help("this item was skipped");
        let out = Human::default().diagnostic(&s, &d);
        assert!(out.len() < 400, "{} bytes", out.len());
        assert!(
            out.starts_with(
                "error[route::syntax]: long.route:2:1: expected valid syntax, found `xxx...`"
            ),
            "{out}"
        );
        assert!(out.contains("this item was skipped"), "{out}");
    }

    #[test]
    fn human_has_a_rustc_like_header_source_and_help() {
        let out = Human::default().diagnostic(&two_files(), &unknown_model());
        insta::assert_snapshot!(out, @r"
        error[route::unknown-model]: unknown model `gtp`
           ╭─[b.route:2:15]
         1 │ route chat {
         2 │   candidates [gtp]
           ·               ─┬─
           ·                ╰── not declared
         3 │ }
           ╰────
          help: did you mean `gpt`?
        ");
    }

    #[test]
    fn labels_in_other_files_become_notes() {
        let out = Human::default().diagnostic(&two_files(), &duplicate());
        insta::assert_snapshot!(out, @r"
        error[route::duplicate-name]: model `gpt` is declared twice
           ╭─[b.route:1:7]
         1 │ route chat {
           ·       ──┬─
           ·         ╰── declared again here
         2 │   candidates [gtp]
           ╰────
        note: first declared here
           ╭─[a.route:1:7]
         1 │ model gpt { provider openai kind chat }
           ·       ───
           ╰────
        ");
    }

    #[test]
    fn color_only_when_asked() {
        let plain = Human::new(false).diagnostic(&two_files(), &unknown_model());
        assert!(!plain.contains('\u{1b}'));
        let colored = Human::new(true).diagnostic(&two_files(), &unknown_model());
        assert!(colored.contains('\u{1b}'));
    }

    #[test]
    fn spans_out_of_range_do_not_panic() {
        let s = two_files();
        for span in [
            Span::new(FileId(0), 500, 600),
            Span::new(FileId(9), 0, 1),
            Span::new(FileId(0), 0, 0),
        ] {
            let d = Diagnostic::error("syntax", "x").with_label(span, "here");
            let _ = Human::default().diagnostic(&s, &d);
            let c = [Checked {
                name: "p",
                sources: &s,
                diagnostics: std::slice::from_ref(&d),
            }];
            let _ = (json(&c, false), github(&c), sarif(&c));
        }
        let mut u = Sources::new();
        u.add("u.route", "é€x");
        let d = Diagnostic::error("syntax", "x").with_label(Span::new(FileId(0), 1, 4), "mid-char");
        let _ = Human::default().diagnostic(&u, &d);
    }

    #[test]
    fn summary_lines() {
        let s = |errors, warnings, policies| {
            Summary {
                errors,
                warnings,
                policies,
                files: 0,
            }
            .line(false)
        };
        assert_eq!(s(3, 1, 2), "error: 3 errors, 1 warning in 2 policies");
        assert_eq!(s(1, 0, 1), "error: 1 error in 1 policy");
        assert_eq!(s(0, 2, 1), "warning: 2 warnings in 1 policy");
        assert_eq!(s(0, 0, 3), "ok: no problems in 3 policies");
        let denied = Summary {
            errors: 0,
            warnings: 1,
            policies: 1,
            files: 1,
        }
        .line(true);
        assert_eq!(denied, "error: 1 warning in 1 policy (warnings denied)");
    }

    #[test]
    fn github_escapes_per_the_runner_rules() {
        assert_eq!(escape_data("a%b\r\nc"), "a%25b%0D%0Ac");
        assert_eq!(escape_property("route::x,y"), "route%3A%3Ax%2Cy");
        let s = two_files();
        let d = [unknown_model()];
        let out = github(&[Checked {
            name: "p",
            sources: &s,
            diagnostics: &d,
        }]);
        assert_eq!(
            out,
            "::error file=b.route,line=2,col=15,endLine=2,endColumn=18,title=route%3A%3Aunknown-model::unknown model `gtp`%0Ahelp: did you mean `gpt`?\n"
        );
    }

    #[test]
    fn json_has_the_stable_fields() {
        let s = two_files();
        let d = [unknown_model(), duplicate()];
        let v: serde_json::Value = serde_json::from_str(&json(
            &[Checked {
                name: "p",
                sources: &s,
                diagnostics: &d,
            }],
            false,
        ))
        .unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["ok"], false);
        assert_eq!(v["summary"]["errors"], 2);
        let first = &v["diagnostics"][0];
        assert_eq!(first["file"], "b.route");
        assert_eq!(
            (first["line"].as_u64(), first["column"].as_u64()),
            (Some(2), Some(15))
        );
        assert_eq!(
            (first["end_line"].as_u64(), first["end_column"].as_u64()),
            (Some(2), Some(18))
        );
        assert_eq!(first["code"], "route::unknown-model");
        assert_eq!(first["severity"], "error");
        assert_eq!(first["help"], "did you mean `gpt`?");
        assert_eq!(first["lint"], serde_json::Value::Null);
        assert_eq!(first["suggestion"]["replacement"], "gpt");
        let second = &v["diagnostics"][1];
        assert_eq!(second["labels"][1]["file"], "a.route");
        assert_eq!(second["labels"][1]["primary"], false);
    }

    #[test]
    fn sarif_rules_cover_every_result() {
        let s = two_files();
        let d = [
            unknown_model(),
            duplicate(),
            Diagnostic::error("brand-new", "x"),
        ];
        let v = sarif_log(&[Checked {
            name: "p",
            sources: &s,
            diagnostics: &d,
        }]);
        assert_eq!(v["version"], "2.1.0");
        let rules = v["runs"][0]["tool"]["driver"]["rules"].as_array().unwrap();
        for r in v["runs"][0]["results"].as_array().unwrap() {
            let idx = r["ruleIndex"].as_u64().unwrap() as usize;
            assert_eq!(rules[idx]["id"], r["ruleId"]);
        }
        let region = &v["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"];
        assert_eq!(region["startLine"], 2);
        assert_eq!(region["startColumn"], 15);
        let unplaced = &v["runs"][0]["results"][2]["locations"][0]["physicalLocation"];
        assert_eq!(unplaced["artifactLocation"]["uri"], "a.route");
        assert_eq!(unplaced["region"]["startLine"], 1);
    }

    #[test]
    fn artifact_uris_are_encoded() {
        assert_eq!(
            artifact_location("./policies/my policy/a.route")["uri"],
            "policies/my%20policy/a.route"
        );
        assert_eq!(
            artifact_location("/tmp/a.route")["uri"],
            "file:///tmp/a.route"
        );
    }

    #[test]
    fn the_catalogue_has_each_code_once() {
        for (i, r) in RULES.iter().enumerate() {
            assert!(
                RULES.iter().skip(i + 1).all(|o| o.name != r.name),
                "{}",
                r.name
            );
        }
        assert_eq!(RULES.len(), 39);
        assert!(rule("route::zero-weights").is_some_and(|r| r.severity == Severity::Warning));
    }
}
