//! Hover: a model's catalogue entry, an attribute's type, a keyword's meaning.

use lsp_types as lsp;

use super::index::{SymbolKind, BUILTIN_REQUEST_FIELDS, MODEL_FIELDS};
use super::{convert, Server};
use crate::ir::{Micros, Model, Policy, Type};
use crate::syntax::ast::{Item, SchemaScope};

pub fn hover(server: &mut Server, params: lsp::HoverParams) -> Option<lsp::Hover> {
    let enc = server.encoding;
    let pos = params.text_document_position_params;
    let (view, file_id) = server.view_for(&pos.text_document.uri)?;
    let file = view.file(file_id)?;
    let offset = convert::offset(file, pos.position, enc);
    let (markdown, span) = if let Some((kind, name, span)) = view.index.at(file_id, offset) {
        (
            symbol_doc(&view.analysis.policy, &view.analysis.files, kind, name),
            span,
        )
    } else {
        let (word, span) = word_at(&file.text, offset)?;
        let doc = keyword_doc(&file.text, span.0, &word)?;
        (doc, crate::source::Span::new(file_id, span.0, span.1))
    };
    Some(lsp::Hover {
        contents: lsp::HoverContents::Markup(lsp::MarkupContent {
            kind: lsp::MarkupKind::Markdown,
            value: markdown,
        }),
        range: Some(convert::range(file, span, enc)),
    })
}

fn dollars(m: Micros) -> String {
    let s = format!("{:.4}", m as f64 / 1_000_000.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("${s}")
}

fn model_doc(policy: &Policy, m: &Model) -> String {
    let provider = policy.provider(m.provider).map_or("?", |p| p.name.as_str());
    let mut lines = vec![
        format!("**model** `{}`", m.name),
        String::new(),
        format!(
            "- provider: `{provider}`{}",
            m.region
                .as_ref()
                .map(|r| format!(" (region `{r}`)"))
                .unwrap_or_default()
        ),
        format!(
            "- kind: `{}`, tier: `{}`",
            m.kind.as_str(),
            if m.tier == crate::ir::Tier::Premium {
                "premium"
            } else {
                "standard"
            }
        ),
        format!("- context: {} tokens", m.context),
    ];
    let p = m.pricing;
    if p.input_per_mtok > 0 || p.output_per_mtok > 0 {
        lines.push(format!(
            "- price: {} in / {} out per 1M tokens",
            dollars(p.input_per_mtok),
            dollars(p.output_per_mtok)
        ));
    }
    if p.per_image > 0 {
        lines.push(format!("- price: {} per image", dollars(p.per_image)));
    }
    if p.per_audio_second > 0 {
        lines.push(format!(
            "- price: {} per audio second",
            dollars(p.per_audio_second)
        ));
    }
    if !m.caps.is_empty() {
        lines.push(format!("- capabilities: {}", m.caps.join(", ")));
    }
    lines.push(format!("- quality: {}", m.quality));
    if !m.enabled {
        lines.push("- **disabled**".into());
    }
    lines.join("\n")
}

fn symbol_doc(
    policy: &Policy,
    files: &[crate::syntax::ast::FileAst],
    kind: SymbolKind,
    name: &str,
) -> String {
    match kind {
        SymbolKind::Model => match policy.models.iter().find(|m| m.name == name) {
            Some(m) => model_doc(policy, m),
            None => format!("**model** `{name}`"),
        },
        SymbolKind::Provider => {
            let p = policy.providers.iter().find(|p| p.name == name);
            let models: Vec<&str> = policy
                .models
                .iter()
                .filter(|m| policy.provider(m.provider).is_some_and(|p| p.name == name))
                .map(|m| m.name.as_str())
                .collect();
            let region = p
                .and_then(|p| p.region.as_deref())
                .map(|r| format!("\n\n- region: `{r}`"))
                .unwrap_or_default();
            format!(
                "**provider** `{name}`{region}\n- models: {}",
                if models.is_empty() {
                    "none".into()
                } else {
                    models.join(", ")
                }
            )
        }
        SymbolKind::Intent => {
            let routes = policy
                .intent_by_name(name)
                .map_or(0, |i| policy.routes_for(i).count());
            format!("**intent** `{name}`\n\nchosen by `classify`; {routes} route(s)")
        }
        SymbolKind::TenantAttr | SymbolKind::RequestAttr => {
            let (attrs, scope) = if kind == SymbolKind::TenantAttr {
                (&policy.tenant_attrs, SchemaScope::Tenant)
            } else {
                (&policy.request_attrs, SchemaScope::Request)
            };
            let ty = attrs
                .iter()
                .find(|a| a.name == name)
                .map(|a| a.ty.describe())
                .or_else(|| {
                    // Fall back to the syntax when lowering did not get that far.
                    files.iter().flat_map(|f| &f.items).find_map(|i| match i {
                        Item::Schema(s) if s.scope == scope => s
                            .attrs
                            .iter()
                            .find(|a| a.name.name == name)
                            .map(|_| "declared".to_string()),
                        _ => None,
                    })
                });
            let variants = attrs
                .iter()
                .find(|a| a.name == name)
                .and_then(|a| match &a.ty {
                    Type::Enum(v) => Some(format!(
                        "\n\nvariants: {}",
                        v.iter()
                            .map(|v| format!("`{v}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    _ => None,
                });
            format!(
                "**{}** `{name}`: `{}`{}",
                kind.describe(),
                ty.unwrap_or_else(|| "?".into()),
                variants.unwrap_or_default()
            )
        }
    }
}

/// The identifier-ish word around `offset` and its byte range.
pub fn word_at(text: &str, offset: usize) -> Option<(String, (usize, usize))> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let before = text.get(..offset.min(text.len()))?;
    let start = before
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_word(*c))
        .last()
        .map_or(offset, |(i, _)| i);
    let after = text.get(offset.min(text.len())..)?;
    let end = offset
        + after
            .char_indices()
            .take_while(|(_, c)| is_word(*c))
            .last()
            .map_or(0, |(i, c)| i + c.len_utf8());
    let word = text.get(start..end)?;
    (!word.is_empty()).then(|| (word.to_string(), (start, end)))
}

fn keyword_doc(text: &str, start: usize, word: &str) -> Option<String> {
    // `request.x` / `model.x`: document the built-in field.
    let before = text.get(..start).unwrap_or("");
    if let Some(scope) = ["request.", "model.", "provider."]
        .iter()
        .find(|s| before.ends_with(**s))
    {
        if *scope == "request." {
            if let Some((n, ty, doc)) = BUILTIN_REQUEST_FIELDS.iter().find(|(n, _, _)| *n == word) {
                return Some(format!("**request.{n}**: `{ty}`\n\n{doc}"));
            }
        } else if let Some((n, ty)) = MODEL_FIELDS.iter().find(|(n, _)| *n == word) {
            return Some(format!("**{scope}{n}**: `{ty}`"));
        }
    }
    KEYWORDS
        .iter()
        .find(|(k, _)| *k == word)
        .map(|(k, doc)| format!("**{k}**\n\n{doc}"))
}

/// Keyword documentation, shared with completion.
pub const KEYWORDS: &[(&str, &str)] = &[
    ("tenant", "Declares the typed attributes every tenant has (`plan: enum(free, pro)`), or reads one in a condition (`tenant.plan`)."),
    ("request", "Declares request metadata attributes, or reads a request field in a condition (`request.endpoint`)."),
    ("provider", "Declares an upstream provider (`provider openai { region us }`), or names a model's provider."),
    ("model", "Declares a model of the catalogue: provider, kind, context, price, caps, region, tier, quality."),
    ("constraints", "Layer 1: hard rules. `deny`, `allow only` and `require` remove models; deny always wins and nothing later can add a model back."),
    ("deny", "Removes the target models (or a provider's models) when the rule fires."),
    ("allow", "`allow only [..]`: removes every model outside the list when the rule fires."),
    ("only", "`allow only [..]` keeps only the listed models; `premium only when ..` keeps premium models only for matching requests."),
    ("require", "Removes every model that fails the model condition, e.g. `require model.caps has vision when request.has_images`."),
    ("where", "`models where <model condition>`: the models whose static attributes match."),
    ("when", "The condition under which a rule applies, over tenant and request fields."),
    ("classify", "Layer 2: ordered intent rules, first match wins; the last rule must be `intent otherwise`."),
    ("otherwise", "The default intent: makes classification total."),
    ("route", "Layer 3: how to rank the models layer 1 allowed for one intent (`route chat { .. }`), optionally refined with `when`."),
    ("candidates", "The models a route may use, before the constraints remove any."),
    ("score", "A weighted sum of signals (price, latency, first_token, success, quality, health), each normalised to 0..1, higher is better."),
    ("premium", "`premium only when ..`: premium-tier candidates are kept only for requests that match."),
    ("fallback", "Models (or `route other`) tried after the scored candidates, still subject to the constraints."),
    ("downgrade", "The cheaper models used when a budget reaches its `downgrade` threshold."),
    ("protect", "Layer 4: runtime protection: retry, timeout, breaker, limit, budget."),
    ("retry", "`retry N on [429, 5xx, timeout] backoff 200ms..2s`: retries per attempt, honouring `Retry-After`."),
    ("timeout", "`timeout first_token 10s total 120s`."),
    ("breaker", "`breaker per model|provider open after N failures within 30s, probe after 15s`."),
    ("limit", "`limit concurrency N per model`, `limit rate 600/min per tenant`, `limit tokens 1M/min per tenant`."),
    ("budget", "`budget monthly per tenant $500 { warn at 80% confirm premium at 90% downgrade at 95% block at 100% }`."),
    ("price", "`price in $0.15 out $0.60 per 1M` (tokens) or `price $0.04 per image`."),
    ("caps", "Capabilities of a model, e.g. `caps [tools, json, vision]`; tested with `model.caps has vision`."),
    ("tier", "`tier standard` (default) or `tier premium`: premium models can be kept for named high-value work."),
    ("kind", "`kind chat|embeddings|image|audio|video`."),
    ("context", "The context window in tokens, e.g. `context 128k`."),
    ("quality", "An offline quality score in 0..1, usable as the `quality` score signal."),
    ("region", "The region of a provider or model; a model defaults to its provider's."),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_at_finds_names_with_dashes() {
        let t = "candidates [gpt-4o-mini, x]";
        let off = t.find("4o").unwrap();
        assert_eq!(word_at(t, off).unwrap().0, "gpt-4o-mini");
        assert_eq!(word_at(t, 0).unwrap().0, "candidates");
        assert_eq!(word_at("", 0), None);
    }

    #[test]
    fn request_fields_and_keywords_are_documented() {
        let t = "x when request.has_tools";
        let start = t.find("has_tools").unwrap();
        assert!(keyword_doc(t, start, "has_tools").unwrap().contains("bool"));
        assert!(keyword_doc("deny", 0, "deny").unwrap().contains("Removes"));
        assert_eq!(keyword_doc("zz", 0, "zz"), None);
    }
}
