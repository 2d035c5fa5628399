//! The one entry point every front end calls: sources in, AST + IR + diagnostics out.
//!
//! `routeplane check`, the language server and the gateway's reload all call
//! [`analyze`], so there is one truth about whether a policy is valid.

use crate::diag::Diagnostic;
use crate::ir::Policy;
use crate::lower;
use crate::source::Sources;
use crate::syntax::{self, ast::FileAst};

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
    let lowered = lower::lower(&files);
    diagnostics.extend(lowered.diagnostics);
    let policy = lowered.policy;
    diagnostics.sort_by_key(|d| d.span().map(|s| (s.file, s.start)));
    Analysis {
        files,
        policy,
        diagnostics,
    }
}
