//! Diagnostics: one type for every stage, with a stable code, a labelled span
//! and a help line. Rendering (human, JSON, GitHub, SARIF) lives in `render`.

use crate::source::Span;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Label {
    pub span: Span,
    pub message: String,
    /// The primary label is where the problem is; others add context.
    pub primary: bool,
}

/// A machine-applicable fix: replace the text under `span` with `replacement`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Suggestion {
    pub span: Span,
    pub replacement: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// Stable code such as `route::unknown-model`. Lints use `route::<lint-name>`.
    pub code: String,
    pub severity: Severity,
    /// Lowercase, no final period, user input in backticks.
    pub message: String,
    pub labels: Vec<Label>,
    pub help: Option<String>,
    /// For lints: the kebab-case name that `// allow(name)` silences.
    pub lint: Option<&'static str>,
    pub suggestion: Option<Suggestion>,
}

impl Diagnostic {
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Diagnostic {
            code: format!("route::{code}"),
            severity: Severity::Error,
            message: message.into(),
            labels: Vec::new(),
            help: None,
            lint: None,
            suggestion: None,
        }
    }

    /// A warning that can be silenced with `// allow(<lint>)`.
    pub fn lint(lint: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            code: format!("route::{lint}"),
            severity: Severity::Warning,
            message: message.into(),
            labels: Vec::new(),
            help: None,
            lint: Some(lint),
            suggestion: None,
        }
    }

    pub fn with_label(mut self, span: Span, message: impl Into<String>) -> Self {
        let primary = self.labels.is_empty();
        self.labels.push(Label {
            span,
            message: message.into(),
            primary,
        });
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_suggestion(mut self, span: Span, replacement: impl Into<String>) -> Self {
        self.suggestion = Some(Suggestion {
            span,
            replacement: replacement.into(),
        });
        self
    }

    /// The primary span, where the diagnostic is reported.
    pub fn span(&self) -> Option<Span> {
        self.labels
            .iter()
            .find(|l| l.primary)
            .or(self.labels.first())
            .map(|l| l.span)
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The closest candidate to `word`, for "did you mean" help.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, c)| *score > 0.8 && *c != word)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("gpt-4o-mni", ["gpt-4o-mini", "claude"]),
            Some("gpt-4o-mini")
        );
        assert_eq!(did_you_mean("zzz", ["gpt-4o-mini", "claude"]), None);
    }
}
