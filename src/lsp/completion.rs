//! Completion: the keywords valid at the cursor, model and provider names,
//! attribute names and enum variants.
//!
//! The context is found lexically (the enclosing top-level block and the
//! words just before the cursor) because the text being typed rarely parses.

use lsp_types as lsp;

use super::index::{SymbolKind, BUILTIN_REQUEST_FIELDS, MODEL_FIELDS};
use super::{convert, Server};
use crate::syntax::ast::{FileAst, Item, SchemaScope, TypeExpr};

const TOP: &[&str] = &[
    "tenant",
    "request",
    "provider",
    "model",
    "constraints",
    "classify",
    "route",
    "protect",
];
const MODEL_PROPS: &[&str] = &[
    "provider",
    "kind",
    "context",
    "max_output",
    "price",
    "caps",
    "region",
    "tier",
    "quality",
    "tokenizer",
    "enabled",
    "disabled",
    "labels",
];
const PROVIDER_PROPS: &[&str] = &["region", "labels"];
const CONSTRAINT_WORDS: &[&str] = &[
    "deny",
    "allow only",
    "require",
    "when",
    "provider",
    "providers",
    "model",
    "models",
    "models where",
];
const ROUTE_PROPS: &[&str] = &[
    "candidates",
    "score",
    "premium only when",
    "fallback",
    "downgrade",
];
const PROTECT_RULES: &[&str] = &["retry", "timeout", "breaker", "limit", "budget"];
const SIGNALS: &[&str] = &[
    "price",
    "latency",
    "first_token",
    "success",
    "quality",
    "health",
];
const COND_WORDS: &[&str] = &[
    "tenant.", "request.", "and", "or", "not", "in", "has", "matches", "contains",
];

/// Where the cursor is.
#[derive(Debug, PartialEq, Eq)]
enum Block {
    Top,
    In(String),
}

fn enclosing_block(before: &str) -> Block {
    let mut depth = 0i32;
    // Any line break, a lone `\r` too, as the protocol and `line_col` count them.
    for line in before.split(['\n', '\r']).rev() {
        let code = line.split("//").next().unwrap_or("");
        depth += code.matches('}').count() as i32 - code.matches('{').count() as i32;
        if let Some(kw) = TOP.iter().find(|k| line.starts_with(**k)) {
            return if depth < 0 {
                Block::In((*kw).to_string())
            } else {
                Block::Top
            };
        }
    }
    Block::Top
}

pub fn completion(
    server: &mut Server,
    params: lsp::CompletionParams,
) -> Option<lsp::CompletionResponse> {
    let enc = server.encoding;
    let pos = params.text_document_position;
    let mut names: Vec<(SymbolKind, String)> =
        server.last_good_names(&pos.text_document.uri).to_vec();
    let (view, id) = server.view_for(&pos.text_document.uri)?;
    let file = view.file(id)?;
    let offset = convert::offset(file, pos.position, enc);
    let before = file.text.get(..offset)?;
    names.extend(
        view.index
            .symbols
            .iter()
            .filter(|(_, s)| !s.defs.is_empty())
            .map(|(k, _)| k.clone()),
    );
    names.sort();
    names.dedup();
    let of = |kind: SymbolKind| {
        names
            .iter()
            .filter(move |(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect::<Vec<_>>()
    };

    // The partial word being typed and the words before it.
    let line = before.rsplit(['\n', '\r']).next().unwrap_or("");
    let partial_len = line
        .chars()
        .rev()
        .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '-'))
        .count();
    let head: String = line
        .chars()
        .take(line.chars().count() - partial_len)
        .collect();
    let words: Vec<&str> = head
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    let last = words.last().copied().unwrap_or("");
    let in_list = head
        .rfind('[')
        .is_some_and(|o| head.rfind(']').is_none_or(|c| c < o));

    let mut items: Vec<(String, lsp::CompletionItemKind, Option<String>)> = Vec::new();
    let mut push = |names: Vec<String>, kind: lsp::CompletionItemKind, detail: Option<&str>| {
        items.extend(
            names
                .into_iter()
                .map(|n| (n, kind, detail.map(str::to_string))),
        );
    };
    let kw = |ws: &[&str]| ws.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();

    if let Some(scope) = ["tenant.", "request.", "model.", "provider."]
        .iter()
        .find(|s| head.ends_with(**s))
    {
        match *scope {
            "tenant." => {
                let mut v = of(SymbolKind::TenantAttr);
                v.push("id".into());
                push(v, lsp::CompletionItemKind::FIELD, Some("tenant attribute"));
            }
            "request." => {
                push(
                    BUILTIN_REQUEST_FIELDS
                        .iter()
                        .map(|(n, _, _)| (*n).to_string())
                        .collect(),
                    lsp::CompletionItemKind::FIELD,
                    Some("request field"),
                );
                push(
                    of(SymbolKind::RequestAttr),
                    lsp::CompletionItemKind::FIELD,
                    Some("request attribute"),
                );
            }
            _ => push(
                MODEL_FIELDS.iter().map(|(n, _)| (*n).to_string()).collect(),
                lsp::CompletionItemKind::FIELD,
                Some("model field"),
            ),
        }
    } else if let Some(variants) = enum_variants_for(&words, &view.analysis.files) {
        push(
            variants,
            lsp::CompletionItemKind::ENUM_MEMBER,
            Some("variant"),
        );
    } else {
        match enclosing_block(before) {
            Block::Top => {
                if last == "route" {
                    push(
                        of(SymbolKind::Intent),
                        lsp::CompletionItemKind::ENUM,
                        Some("intent"),
                    );
                } else {
                    push(kw(TOP), lsp::CompletionItemKind::KEYWORD, None);
                }
            }
            Block::In(b) => match b.as_str() {
                "model" => match last {
                    "provider" => push(
                        of(SymbolKind::Provider),
                        lsp::CompletionItemKind::MODULE,
                        Some("provider"),
                    ),
                    "kind" => push(
                        kw(&["chat", "embeddings", "image", "audio", "video"]),
                        lsp::CompletionItemKind::ENUM_MEMBER,
                        None,
                    ),
                    "tier" => push(
                        kw(&["standard", "premium"]),
                        lsp::CompletionItemKind::ENUM_MEMBER,
                        None,
                    ),
                    _ => push(kw(MODEL_PROPS), lsp::CompletionItemKind::KEYWORD, None),
                },
                "provider" => push(kw(PROVIDER_PROPS), lsp::CompletionItemKind::KEYWORD, None),
                "constraints" => {
                    if matches!(last, "provider" | "providers")
                        || (in_list && words.iter().any(|w| w.starts_with("providers")))
                    {
                        push(
                            of(SymbolKind::Provider),
                            lsp::CompletionItemKind::MODULE,
                            Some("provider"),
                        );
                    } else if matches!(last, "model" | "models" | "only") || in_list {
                        push(
                            of(SymbolKind::Model),
                            lsp::CompletionItemKind::CLASS,
                            Some("model"),
                        );
                    } else {
                        push(kw(CONSTRAINT_WORDS), lsp::CompletionItemKind::KEYWORD, None);
                        push(kw(COND_WORDS), lsp::CompletionItemKind::KEYWORD, None);
                    }
                }
                "classify" => {
                    if words.is_empty() {
                        push(
                            of(SymbolKind::Intent),
                            lsp::CompletionItemKind::ENUM,
                            Some("intent"),
                        );
                    }
                    push(
                        kw(&["when", "otherwise"]),
                        lsp::CompletionItemKind::KEYWORD,
                        None,
                    );
                    push(kw(COND_WORDS), lsp::CompletionItemKind::KEYWORD, None);
                }
                "route" => {
                    if in_list {
                        push(
                            of(SymbolKind::Model),
                            lsp::CompletionItemKind::CLASS,
                            Some("model"),
                        );
                        if words.first() == Some(&"fallback") {
                            push(kw(&["route"]), lsp::CompletionItemKind::KEYWORD, None);
                        }
                    } else if last == "route" {
                        push(
                            of(SymbolKind::Intent),
                            lsp::CompletionItemKind::ENUM,
                            Some("intent"),
                        );
                    } else if last == "*" {
                        push(kw(SIGNALS), lsp::CompletionItemKind::VALUE, Some("signal"));
                    } else {
                        push(kw(ROUTE_PROPS), lsp::CompletionItemKind::KEYWORD, None);
                    }
                }
                "protect" => push(kw(PROTECT_RULES), lsp::CompletionItemKind::KEYWORD, None),
                "tenant" | "request" => push(
                    kw(&["bool", "string", "number", "enum(", "list("]),
                    lsp::CompletionItemKind::TYPE_PARAMETER,
                    None,
                ),
                _ => {}
            },
        }
    }
    let list = items
        .into_iter()
        .map(|(label, kind, detail)| {
            let documentation = super::hover::KEYWORDS
                .iter()
                .find(|(k, _)| *k == label)
                .map(|(_, d)| {
                    lsp::Documentation::MarkupContent(lsp::MarkupContent {
                        kind: lsp::MarkupKind::Markdown,
                        value: (*d).to_string(),
                    })
                });
            lsp::CompletionItem {
                label,
                kind: Some(kind),
                detail,
                documentation,
                ..Default::default()
            }
        })
        .collect();
    Some(lsp::CompletionResponse::Array(list))
}

/// After `tenant.plan ==` or `tenant.plan in [`, the variants of that enum.
/// Read from the syntax tree, so it works while lowering reports errors.
fn enum_variants_for(words: &[&str], files: &[FileAst]) -> Option<Vec<String>> {
    let op_at = words
        .iter()
        .rposition(|w| matches!(*w, "==" | "!=" | "in") || w.starts_with('['))?;
    let path = words.get(op_at.checked_sub(1)?)?;
    let path = if *path == "not" {
        words.get(op_at.checked_sub(2)?)?
    } else {
        path
    };
    let (scope, field) = path.split_once('.')?;
    let scope = match scope {
        "tenant" => SchemaScope::Tenant,
        "request" => {
            let builtin = match field {
                "endpoint" => Some(crate::ir::Endpoint::NAMES.as_slice()),
                "response_format" => Some(crate::ir::ResponseFormat::NAMES.as_slice()),
                _ => None,
            };
            if let Some(names) = builtin {
                return Some(names.iter().map(|s| (*s).to_string()).collect());
            }
            SchemaScope::Request
        }
        _ => return None,
    };
    files
        .iter()
        .flat_map(|f| &f.items)
        .find_map(|item| match item {
            Item::Schema(s) if s.scope == scope => s
                .attrs
                .iter()
                .find(|a| a.name.name == field)
                .and_then(|a| match &a.ty {
                    TypeExpr::Enum(v, _) => Some(v.iter().map(|i| i.name.clone()).collect()),
                    _ => None,
                }),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_enclosing_block() {
        assert_eq!(enclosing_block(""), Block::Top);
        assert_eq!(
            enclosing_block("model a {\n  provider "),
            Block::In("model".into())
        );
        assert_eq!(enclosing_block("model a { provider p }\n"), Block::Top);
        assert_eq!(
            enclosing_block("route chat when tenant.x {\n  candidates [a, "),
            Block::In("route".into())
        );
        assert_eq!(
            enclosing_block("classify {\n  // } not a brace\n  "),
            Block::In("classify".into())
        );
    }
}
