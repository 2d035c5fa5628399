//! Document symbols (the outline) and formatting.

use lsp_types as lsp;

use super::{convert, Server};
use crate::source::{SourceFile, Span};
use crate::syntax::ast::{Item, SchemaScope};

struct Outline<'a> {
    file: &'a SourceFile,
    enc: convert::Encoding,
}

impl Outline<'_> {
    #[expect(
        deprecated,
        reason = "DocumentSymbol::deprecated must still be set; `tags` replaces it"
    )]
    fn symbol(
        &self,
        name: String,
        detail: Option<String>,
        kind: lsp::SymbolKind,
        span: Span,
        sel: Span,
        children: Vec<lsp::DocumentSymbol>,
    ) -> lsp::DocumentSymbol {
        let (file, enc) = (self.file, self.enc);
        lsp::DocumentSymbol {
            name,
            detail,
            kind,
            tags: None,
            deprecated: None,
            range: convert::range(file, span, enc),
            selection_range: convert::range(file, sel, enc),
            children: (!children.is_empty()).then_some(children),
        }
    }
}

pub fn document_symbols(
    server: &mut Server,
    params: lsp::DocumentSymbolParams,
) -> Option<lsp::DocumentSymbolResponse> {
    let enc = server.encoding;
    let (view, id) = server.view_for(&params.text_document.uri)?;
    let file = view.file(id)?;
    let ast = view.analysis.files.get(id.0 as usize)?;
    let o = Outline { file, enc };
    let mut out = Vec::new();
    for item in &ast.items {
        let s = match item {
            Item::Schema(s) => {
                let name = if s.scope == SchemaScope::Tenant {
                    "tenant"
                } else {
                    "request"
                };
                let kids = s
                    .attrs
                    .iter()
                    .map(|a| {
                        o.symbol(
                            a.name.name.clone(),
                            None,
                            lsp::SymbolKind::FIELD,
                            a.span,
                            a.name.span,
                            vec![],
                        )
                    })
                    .collect();
                o.symbol(
                    name.into(),
                    None,
                    lsp::SymbolKind::STRUCT,
                    s.span,
                    s.span,
                    kids,
                )
            }
            Item::Provider(p) => o.symbol(
                p.name.name.clone(),
                Some("provider".into()),
                lsp::SymbolKind::MODULE,
                p.span,
                p.name.span,
                vec![],
            ),
            Item::Model(m) => o.symbol(
                m.name.name.clone(),
                Some("model".into()),
                lsp::SymbolKind::CLASS,
                m.span,
                m.name.span,
                vec![],
            ),
            Item::Constraints(c) => {
                let kids = c
                    .rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let name = r
                            .label
                            .as_ref()
                            .map_or_else(|| format!("rule {}", i + 1), |l| l.name.clone());
                        o.symbol(name, None, lsp::SymbolKind::EVENT, r.span, r.span, vec![])
                    })
                    .collect();
                o.symbol(
                    "constraints".into(),
                    None,
                    lsp::SymbolKind::NAMESPACE,
                    c.span,
                    c.span,
                    kids,
                )
            }
            Item::Classify(c) => {
                let kids = c
                    .rules
                    .iter()
                    .map(|r| {
                        o.symbol(
                            r.intent.name.clone(),
                            None,
                            lsp::SymbolKind::ENUM_MEMBER,
                            r.span,
                            r.intent.span,
                            vec![],
                        )
                    })
                    .collect();
                o.symbol(
                    "classify".into(),
                    None,
                    lsp::SymbolKind::NAMESPACE,
                    c.span,
                    c.span,
                    kids,
                )
            }
            Item::Route(r) => {
                let detail = r
                    .when
                    .as_ref()
                    .map(|w| format!("when {}", file.slice(w.span())));
                o.symbol(
                    format!("route {}", r.intent.name),
                    detail,
                    lsp::SymbolKind::FUNCTION,
                    r.span,
                    r.intent.span,
                    vec![],
                )
            }
            Item::Protect(p) => o.symbol(
                "protect".into(),
                None,
                lsp::SymbolKind::NAMESPACE,
                p.span,
                p.span,
                vec![],
            ),
        };
        out.push(s);
    }
    Some(lsp::DocumentSymbolResponse::Nested(out))
}

/// Format the whole document exactly like `routeplane fmt`; a file with
/// syntax errors is left alone (no edits).
pub fn formatting(
    server: &mut Server,
    params: lsp::DocumentFormattingParams,
) -> Option<Vec<lsp::TextEdit>> {
    let enc = server.encoding;
    let (view, id) = server.view_for(&params.text_document.uri)?;
    let file = view.file(id)?;
    let formatted = crate::fmt::format_source(id, &file.text).ok()?;
    if formatted == file.text {
        return Some(Vec::new());
    }
    let whole = Span::new(id, 0, file.text.len());
    Some(vec![lsp::TextEdit {
        range: convert::range(file, whole, enc),
        new_text: formatted,
    }])
}
