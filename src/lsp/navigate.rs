//! Go to definition, find references and rename, across the files of a policy.

use std::collections::HashMap;

use lsp_types as lsp;

use super::{convert, PolicyView, Server};
use crate::source::Span;

fn location(view: &PolicyView, span: Span, enc: convert::Encoding) -> Option<lsp::Location> {
    let file = view.file(span.file)?;
    Some(lsp::Location {
        uri: view.uri(span.file)?,
        range: convert::range(file, span, enc),
    })
}

/// The symbol under the cursor: its kind and name, and the view.
fn symbol_at(
    server: &mut Server,
    pos: &lsp::TextDocumentPositionParams,
) -> Option<(super::index::SymbolKind, String, Span)> {
    let enc = server.encoding;
    let (view, id) = server.view_for(&pos.text_document.uri)?;
    let offset = convert::offset(view.file(id)?, pos.position, enc);
    view.index
        .at(id, offset)
        .map(|(k, n, s)| (k, n.to_string(), s))
}

pub fn definition(
    server: &mut Server,
    params: lsp::GotoDefinitionParams,
) -> Option<lsp::GotoDefinitionResponse> {
    let pos = params.text_document_position_params;
    let (kind, name, _) = symbol_at(server, &pos)?;
    let enc = server.encoding;
    let (view, _) = server.view_for(&pos.text_document.uri)?;
    let defs: Vec<lsp::Location> = view
        .index
        .get(kind, &name)?
        .defs
        .iter()
        .filter_map(|s| location(view, *s, enc))
        .collect();
    match defs.len() {
        0 => None,
        1 => defs
            .into_iter()
            .next()
            .map(lsp::GotoDefinitionResponse::Scalar),
        _ => Some(lsp::GotoDefinitionResponse::Array(defs)),
    }
}

pub fn references(server: &mut Server, params: lsp::ReferenceParams) -> Option<Vec<lsp::Location>> {
    let pos = params.text_document_position;
    let (kind, name, _) = symbol_at(server, &pos)?;
    let enc = server.encoding;
    let (view, _) = server.view_for(&pos.text_document.uri)?;
    let sym = view.index.get(kind, &name)?;
    let spans: Vec<Span> = if params.context.include_declaration {
        sym.occurrences().collect()
    } else {
        sym.refs.clone()
    };
    Some(
        spans
            .into_iter()
            .filter_map(|s| location(view, s, enc))
            .collect(),
    )
}

pub fn prepare_rename(
    server: &mut Server,
    params: lsp::TextDocumentPositionParams,
) -> Option<lsp::PrepareRenameResponse> {
    let (_, name, span) = symbol_at(server, &params)?;
    let enc = server.encoding;
    let (view, _) = server.view_for(&params.text_document.uri)?;
    let file = view.file(span.file)?;
    Some(lsp::PrepareRenameResponse::RangeWithPlaceholder {
        range: convert::range(file, span, enc),
        placeholder: name,
    })
}

/// Whether `name` is a valid name in the language (what the grammar's `name` accepts).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.ends_with(['.', '-'])
}

#[expect(
    clippy::mutable_key_type,
    reason = "lsp_types::WorkspaceEdit is keyed by Uri"
)]
pub fn rename(
    server: &mut Server,
    params: lsp::RenameParams,
) -> Result<Option<lsp::WorkspaceEdit>, String> {
    let pos = params.text_document_position;
    if !valid_name(&params.new_name) {
        return Err(format!(
            "`{}` is not a valid name: use letters, digits, `_`, `-` and `.`, starting with a letter",
            params.new_name
        ));
    }
    let Some((kind, name, _)) = symbol_at(server, &pos) else {
        return Ok(None);
    };
    let enc = server.encoding;
    let Some((view, _)) = server.view_for(&pos.text_document.uri) else {
        return Ok(None);
    };
    let Some(sym) = view.index.get(kind, &name) else {
        return Ok(None);
    };
    let mut changes: HashMap<lsp::Uri, Vec<lsp::TextEdit>> = HashMap::new();
    for span in sym.occurrences() {
        if let Some(loc) = location(view, span, enc) {
            changes.entry(loc.uri).or_default().push(lsp::TextEdit {
                range: loc.range,
                new_text: params.new_name.clone(),
            });
        }
    }
    Ok(Some(lsp::WorkspaceEdit {
        changes: Some(changes),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_the_grammar() {
        assert!(super::valid_name("gpt-4o-mini"));
        assert!(super::valid_name("claude-3.5"));
        assert!(!super::valid_name("4o"));
        assert!(!super::valid_name("a b"));
        assert!(!super::valid_name(""));
        assert!(!super::valid_name("x-"));
    }
}
