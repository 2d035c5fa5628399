//! Quick fixes: every diagnostic with a suggestion ("did you mean `x`?")
//! becomes a code action that applies it.

use std::collections::HashMap;

use lsp_types as lsp;

use super::{convert, Server};

#[expect(
    clippy::mutable_key_type,
    reason = "lsp_types::WorkspaceEdit is keyed by Uri"
)]
pub fn code_actions(
    server: &mut Server,
    params: lsp::CodeActionParams,
) -> Option<lsp::CodeActionResponse> {
    let enc = server.encoding;
    let uri = params.text_document.uri.clone();
    let (view, id) = server.view_for(&uri)?;
    let file = view.file(id)?;
    let want_start = convert::offset(file, params.range.start, enc);
    let want_end = convert::offset(file, params.range.end, enc);
    let mut actions = Vec::new();
    for d in &view.analysis.diagnostics {
        let Some(s) = &d.suggestion else { continue };
        if s.span.file != id || s.span.end() < want_start || s.span.start() > want_end {
            continue;
        }
        let edit = lsp::TextEdit {
            range: convert::range(file, s.span, enc),
            new_text: s.replacement.clone(),
        };
        let mut changes = HashMap::new();
        changes.insert(uri.clone(), vec![edit]);
        let uri_of = |fid| Some((view.uri(fid)?, view.file(fid)?));
        actions.push(lsp::CodeActionOrCommand::CodeAction(lsp::CodeAction {
            title: format!("replace with `{}`", s.replacement),
            kind: Some(lsp::CodeActionKind::QUICKFIX),
            diagnostics: convert::diagnostic(d, file, enc, &uri_of).map(|x| vec![x]),
            edit: Some(lsp::WorkspaceEdit {
                changes: Some(changes),
                ..Default::default()
            }),
            is_preferred: Some(true),
            ..Default::default()
        }));
    }
    Some(actions)
}
