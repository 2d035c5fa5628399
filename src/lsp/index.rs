//! A symbol index over the AST: where each model, provider, intent and
//! attribute is defined and referenced. Go to definition, find references,
//! rename and hover all start here.
//!
//! The index is built from the syntax tree alone, so it works on policies
//! that do not check; lowering is not needed to navigate.

use std::collections::HashMap;

use crate::source::{FileId, Span};
use crate::syntax::ast::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SymbolKind {
    Model,
    Provider,
    Intent,
    TenantAttr,
    RequestAttr,
}

impl SymbolKind {
    pub fn describe(self) -> &'static str {
        match self {
            SymbolKind::Model => "model",
            SymbolKind::Provider => "provider",
            SymbolKind::Intent => "intent",
            SymbolKind::TenantAttr => "tenant attribute",
            SymbolKind::RequestAttr => "request attribute",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Symbol {
    /// Every definition (more than one is a `duplicate-name` error, still navigable).
    pub defs: Vec<Span>,
    pub refs: Vec<Span>,
}

impl Symbol {
    /// Definitions then references, each once.
    pub fn occurrences(&self) -> impl Iterator<Item = Span> + '_ {
        self.defs.iter().chain(self.refs.iter()).copied()
    }
}

#[derive(Debug, Default)]
pub struct Index {
    pub symbols: HashMap<(SymbolKind, String), Symbol>,
}

impl Index {
    pub fn build(files: &[FileAst]) -> Index {
        let mut ix = Index::default();
        for f in files {
            for item in &f.items {
                ix.item(item);
            }
        }
        // An intent is defined by the first classify rule naming it; later rules are references.
        for sym in ix
            .symbols
            .iter_mut()
            .filter(|((k, _), _)| *k == SymbolKind::Intent)
            .map(|(_, s)| s)
        {
            if sym.defs.len() > 1 {
                let rest = sym.defs.split_off(1);
                sym.refs.extend(rest);
            }
        }
        ix
    }

    /// The symbol whose definition or reference covers `offset` in `file`.
    pub fn at(&self, file: FileId, offset: usize) -> Option<(SymbolKind, &str, Span)> {
        self.symbols.iter().find_map(|((kind, name), sym)| {
            sym.occurrences()
                .find(|s| s.file == file && s.start() <= offset && offset <= s.end())
                .map(|s| (*kind, name.as_str(), s))
        })
    }

    pub fn get(&self, kind: SymbolKind, name: &str) -> Option<&Symbol> {
        self.symbols.get(&(kind, name.to_string()))
    }

    /// Names of one kind, sorted, for completion.
    pub fn names(&self, kind: SymbolKind) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .symbols
            .iter()
            .filter(|((k, _), s)| *k == kind && !s.defs.is_empty())
            .map(|((_, n), _)| n.as_str())
            .collect();
        v.sort_unstable();
        v
    }

    fn def(&mut self, kind: SymbolKind, id: &Ident) {
        self.symbols
            .entry((kind, id.name.clone()))
            .or_default()
            .defs
            .push(id.span);
    }

    fn reference(&mut self, kind: SymbolKind, id: &Ident) {
        self.symbols
            .entry((kind, id.name.clone()))
            .or_default()
            .refs
            .push(id.span);
    }

    fn item(&mut self, item: &Item) {
        match item {
            Item::Schema(s) => {
                let kind = match s.scope {
                    SchemaScope::Tenant => SymbolKind::TenantAttr,
                    SchemaScope::Request => SymbolKind::RequestAttr,
                };
                for a in &s.attrs {
                    self.def(kind, &a.name);
                }
            }
            Item::Provider(p) => self.def(SymbolKind::Provider, &p.name),
            Item::Model(m) => {
                self.def(SymbolKind::Model, &m.name);
                for p in &m.props {
                    if let PropKind::Provider(id) = &p.kind {
                        self.reference(SymbolKind::Provider, id);
                    }
                }
            }
            Item::Constraints(c) => {
                for rule in &c.rules {
                    match &rule.effect {
                        Effect::Deny(t) | Effect::AllowOnly(t) => self.target(t),
                        Effect::Require(e) => self.expr(e),
                    }
                    if let Some(w) = &rule.when {
                        self.expr(w);
                    }
                }
            }
            Item::Classify(c) => {
                for rule in &c.rules {
                    self.def(SymbolKind::Intent, &rule.intent);
                    if let Some(w) = &rule.when {
                        self.expr(w);
                    }
                }
            }
            Item::Route(r) => {
                self.reference(SymbolKind::Intent, &r.intent);
                if let Some(w) = &r.when {
                    self.expr(w);
                }
                for p in &r.props {
                    match &p.kind {
                        RoutePropKind::Candidates(ms) | RoutePropKind::Downgrade(ms) => {
                            ms.iter().for_each(|m| self.reference(SymbolKind::Model, m))
                        }
                        RoutePropKind::Fallback(items) => {
                            for it in items {
                                match it {
                                    FallbackItem::Model(m) => self.reference(SymbolKind::Model, m),
                                    FallbackItem::Route(i) => self.reference(SymbolKind::Intent, i),
                                }
                            }
                        }
                        RoutePropKind::PremiumOnly(e) => self.expr(e),
                        RoutePropKind::Score(_) => {}
                    }
                }
            }
            Item::Protect(p) => {
                for rule in &p.rules {
                    if let ProtectKind::Budget(Budget {
                        amount: BudgetAmount::Attr(path),
                        ..
                    }) = &rule.kind
                    {
                        self.path(path);
                    }
                }
            }
        }
    }

    fn target(&mut self, t: &Target) {
        match t {
            Target::Providers(ps, _) => ps
                .iter()
                .for_each(|p| self.reference(SymbolKind::Provider, p)),
            Target::Models(ms, _) => ms.iter().for_each(|m| self.reference(SymbolKind::Model, m)),
            Target::Where(e, _) => self.expr(e),
        }
    }

    fn expr(&mut self, e: &Expr) {
        match e {
            Expr::Or(es, _) | Expr::And(es, _) => es.iter().for_each(|e| self.expr(e)),
            Expr::Not(e, _) | Expr::Paren(e, _) => self.expr(e),
            Expr::Test(t) => {
                self.path(&t.path);
                // `model.name == x` and `model.provider == p` name catalogue symbols.
                let kind = match (t.path.scope, t.path.field.name.as_str()) {
                    (PathScope::Model, "name") => Some(SymbolKind::Model),
                    (PathScope::Model, "provider") => Some(SymbolKind::Provider),
                    _ => None,
                };
                if let (Some(kind), Some(op)) = (kind, &t.op) {
                    let lits: Vec<&Literal> = match op {
                        TestOp::Cmp(_, l) | TestOp::Has(l) => vec![l],
                        TestOp::In { list, .. } => list.iter().collect(),
                        _ => vec![],
                    };
                    for l in lits {
                        if let Literal::Name(id) = l {
                            self.reference(kind, id);
                        }
                    }
                }
            }
        }
    }

    fn path(&mut self, p: &Path) {
        match p.scope {
            PathScope::Tenant if p.field.name != "id" => {
                self.reference(SymbolKind::TenantAttr, &p.field)
            }
            PathScope::Request if !is_builtin_request_field(&p.field.name) => {
                self.reference(SymbolKind::RequestAttr, &p.field)
            }
            // `request.feature` is built in, but a declared `feature` attribute refines it.
            PathScope::Request
                if self
                    .symbols
                    .contains_key(&(SymbolKind::RequestAttr, p.field.name.clone())) =>
            {
                self.reference(SymbolKind::RequestAttr, &p.field)
            }
            _ => {}
        }
    }
}

/// Request fields every request has, with a one-line description (for hover and completion).
pub const BUILTIN_REQUEST_FIELDS: &[(&str, &str, &str)] = &[
    (
        "endpoint",
        "enum(chat, embeddings, images, audio_transcription, audio_speech)",
        "the API endpoint the request came to",
    ),
    (
        "response_format",
        "enum(text, json_object, json_schema)",
        "the `response_format.type` of the body",
    ),
    ("has_tools", "bool", "the request offers tools or functions"),
    ("has_images", "bool", "a message has an image part"),
    ("stream", "bool", "the client asked for a stream"),
    ("input_tokens", "number", "estimated input tokens"),
    ("max_tokens", "number", "the requested output cap"),
    (
        "feature",
        "string",
        "the feature tag, header `x-routeplane-feature`",
    ),
    (
        "prompt",
        "string",
        "the last user message, for `matches` and `contains`",
    ),
    (
        "model",
        "string",
        "the model the client asked for (`auto` when none)",
    ),
];

pub fn is_builtin_request_field(name: &str) -> bool {
    BUILTIN_REQUEST_FIELDS.iter().any(|(n, _, _)| *n == name)
}

/// Fields a `models where` / `require` condition can read.
pub const MODEL_FIELDS: &[(&str, &str)] = &[
    ("name", "string"),
    ("provider", "provider name"),
    ("kind", "enum(chat, embeddings, image, audio, video)"),
    ("region", "string"),
    ("tier", "enum(standard, premium)"),
    ("caps", "list(string)"),
    ("labels", "list(string)"),
    ("context", "number (tokens)"),
    ("quality", "number in [0, 1]"),
    ("price_in", "number ($ per 1M input tokens)"),
    ("price_out", "number ($ per 1M output tokens)"),
    ("enabled", "bool"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syntax::parse_file;

    #[test]
    fn finds_definitions_and_references_across_items() {
        let src = "provider openai { region us }\nmodel mini { provider openai kind chat }\n\
                   classify { chat otherwise }\nroute chat { candidates [mini] fallback [mini] }\n\
                   tenant { plan: enum(free, pro) }\nconstraints { allow only [mini] when tenant.plan == free }";
        let ast = parse_file(FileId(0), src).ast;
        let ix = Index::build(&[ast]);
        let mini = ix.get(SymbolKind::Model, "mini").unwrap();
        assert_eq!((mini.defs.len(), mini.refs.len()), (1, 3));
        assert_eq!(
            ix.get(SymbolKind::Provider, "openai").unwrap().refs.len(),
            1
        );
        assert_eq!(
            ix.get(SymbolKind::TenantAttr, "plan").unwrap().refs.len(),
            1
        );
        let offset = src.find("[mini]").unwrap() + 2;
        let (kind, name, _) = ix.at(FileId(0), offset).unwrap();
        assert_eq!((kind, name), (SymbolKind::Model, "mini"));
        assert_eq!(ix.names(SymbolKind::Intent), ["chat"]);
    }
}
