//! Text to AST. The only module that sees `pest::iterators::Pair`.
//!
//! Parsing never fails: [`parse_file`] returns a tree of every item that
//! parsed *and* a diagnostic for every item that did not. The grammar's
//! `error_item` rule skips a broken item up to the next line that starts an
//! item (a top-level keyword in column 0, or an indented item that opens its
//! block on that line); each skipped chunk is parsed again on its own to get
//! pest's precise error for it.

pub mod ast;

use ast::*;
use pest::iterators::Pair;
use pest::Parser as _;

use crate::diag::{did_you_mean, Diagnostic};
use crate::source::{FileId, Span};

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/route.pest"]
struct RouteParser;

type P<'i> = Pair<'i, Rule>;

/// The result of parsing one file: the items that parsed and the errors.
#[derive(Debug)]
pub struct Parsed {
    pub ast: FileAst,
    pub diagnostics: Vec<Diagnostic>,
}

/// Parse one file. Never panics; every broken item yields one diagnostic.
pub fn parse_file(file: FileId, text: &str) -> Parsed {
    let comments = scan_comments(file, text);
    let mut b = Builder {
        file,
        depth: 0,
        unclosed: 0,
        diagnostics: Vec::new(),
        text,
        comment_starts: comments
            .iter()
            .map(|c| (c.span.end(), c.span.start()))
            .collect(),
    };
    let mut items = Vec::new();
    match RouteParser::parse(Rule::file, text) {
        Ok(mut pairs) => {
            b.glued_words(pairs.clone());
            let inner = pairs.next().map(|p| p.into_inner());
            for p in inner.into_iter().flatten() {
                match p.as_rule() {
                    Rule::error_item => b.reparse_error_item(&p),
                    Rule::EOI => {}
                    _ => {
                        if let Some(item) = b.item(p) {
                            items.push(item);
                        }
                    }
                }
            }
        }
        // `file` accepts any input through `error_item`; this is a safety net.
        Err(e) => b.diagnostics.push(syntax_error(file, 0, &e, None).0),
    }
    Parsed {
        ast: FileAst {
            file,
            items,
            comments,
        },
        diagnostics: b.diagnostics,
    }
}

struct Builder<'t> {
    file: FileId,
    /// How many `not` and parentheses the condition being built is inside.
    depth: usize,
    /// How many broken items so far ended at the next item with their `}`
    /// missing: a lone `}` further on most likely closes one of them (an item
    /// nested in another's block, `provider p { model m { .. } }`), and is
    /// not reported a second time.
    unclosed: usize,
    diagnostics: Vec<Diagnostic>,
    text: &'t str,
    /// Comment end offset -> start offset, to trim comments off the end of spans.
    comment_starts: std::collections::HashMap<usize, usize>,
}

/// Words the grammar expects, shown in syntax errors by their spelling.
fn rule_display(rule: &Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::name => "a name",
        Rule::field => "a word",
        Rule::quantity => "a number",
        Rule::string => "a string",
        Rule::regex => "a regex `/.../`",
        Rule::literal => "a value",
        Rule::list | Rule::names => "a list `[...]`",
        Rule::schema | Rule::schema_scope => "`tenant` or `request`",
        Rule::provider => "`provider`",
        Rule::model => "`model`",
        Rule::constraints => "`constraints`",
        Rule::classify => "`classify`",
        Rule::route => "`route`",
        Rule::protect => "`protect`",
        Rule::attr_decl => "an attribute `name: type`",
        Rule::type_expr | Rule::scalar_type | Rule::enum_type | Rule::list_type => {
            "a type (`bool`, `string`, `number`, `enum(..)`, `list(..)`)"
        }
        Rule::provider_prop => "a provider property (`region`, `labels`)",
        Rule::model_prop => "a model property (`provider`, `kind`, `context`, `max_output`, `price`, `caps`, `region`, `tier`, `quality`, `tokenizer`, `enabled`, `disabled`, `labels`)",
        Rule::constraint | Rule::rule_label => "a constraint (`deny`, `allow only`, `require`)",
        Rule::target | Rule::target_models | Rule::target_providers | Rule::target_where => {
            "a target (`provider x`, `model x`, `models [..]`, `models where ..`)"
        }
        Rule::classify_rule => "a classification rule `intent when ..` or `intent otherwise`",
        Rule::when_clause => "`when`",
        Rule::otherwise => "`otherwise`",
        Rule::route_prop => "a route property (`candidates`, `score`, `premium only when`, `fallback`, `downgrade`)",
        Rule::score_term => "a score term `weight * signal`",
        Rule::score_sign => "`+` or `-`",
        Rule::fallback_item | Rule::fallback_route => "a model name or `route intent`",
        Rule::protect_rule => "a protection rule (`retry`, `timeout`, `breaker`, `limit`, `budget`)",
        Rule::status => "a status (`429`, `5xx`, `timeout`, `connect`)",
        Rule::retry_on => "`on [..]`",
        Rule::retry_backoff => "`backoff min..max`",
        Rule::timeout_part | Rule::timeout_kind => "`first_token` or `total`",
        Rule::limit_kind => "`concurrency`, `rate` or `tokens`",
        Rule::budget_period | Rule::budget_every => "a period (`daily`, `weekly`, `monthly`, `every 14d`)",
        Rule::budget_scope => "a scope (`tenant`, `feature`, `tenant and feature`)",
        Rule::budget_amount => "an amount (`$500` or `tenant.attribute`)",
        Rule::threshold | Rule::threshold_action | Rule::confirm_premium => {
            "a threshold (`warn`, `confirm premium`, `downgrade`, `block` `at N%`)"
        }
        Rule::cond | Rule::disj | Rule::conj | Rule::unary | Rule::test | Rule::path | Rule::scope => {
            "a condition such as `tenant.plan == free`"
        }
        Rule::test_op | Rule::op_cmp | Rule::cmp | Rule::op_in | Rule::op_has | Rule::op_matches | Rule::op_contains => {
            "an operator (`==`, `!=`, `<`, `>`, `in`, `has`, `matches`, `contains`)"
        }
        Rule::not_op | Rule::not_in => "`not`",
        Rule::price_io | Rule::price_flat | Rule::price_per => "a price (`in $X out $Y per 1M` or `$X per image`)",
        Rule::EOI => "end of file",
        _ => return None,
    })
}

/// Keywords that may follow in each context, to suggest a fix for a misspelt word.
const KEYWORDS: &[&str] = &[
    "tenant",
    "request",
    "provider",
    "model",
    "constraints",
    "classify",
    "route",
    "protect",
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
    "deny",
    "allow",
    "only",
    "require",
    "when",
    "otherwise",
    "candidates",
    "score",
    "premium",
    "fallback",
    "downgrade",
    "retry",
    "timeout",
    "breaker",
    "limit",
    "budget",
    "models",
    "providers",
    "where",
];

/// The grammar's other words: never suggested, and never "corrected" either.
const OTHER_WORDS: &[&str] = &[
    "after",
    "and",
    "at",
    "backoff",
    "bool",
    "concurrency",
    "confirm",
    "contains",
    "enum",
    "every",
    "failures",
    "false",
    "first_token",
    "has",
    "in",
    "list",
    "matches",
    "not",
    "number",
    "on",
    "open",
    "or",
    "out",
    "per",
    "probe",
    "rate",
    "string",
    "tokens",
    "total",
    "true",
    "within",
];

/// The deepest nesting of `not` and parentheses a condition may have. Every
/// stage after the parser (building the tree, lowering, analysis, formatting)
/// recurses once per level: a few hundred levels overflowed the stack and
/// aborted `check`, the language server and the gateway's reload.
pub const MAX_NESTING: usize = 64;

/// The longest word a syntax error quotes.
const MAX_SHOWN: usize = 40;

/// What an item's braces hold (`provider x { provider_prop* }`): where one of
/// these is expected, so is the `}` that closes the item.
const BODY_RULES: &[Rule] = &[
    Rule::attr_decl,
    Rule::provider_prop,
    Rule::model_prop,
    Rule::constraint,
    Rule::rule_label,
    Rule::classify_rule,
    Rule::route_prop,
    Rule::protect_rule,
    Rule::threshold,
    Rule::threshold_action,
    Rule::confirm_premium,
];

/// The item after a broken one, whose text is parsed alone and so ends
/// where this item starts.
#[derive(Clone, Copy, Debug)]
struct NextItem<'t> {
    /// Byte offset of its keyword in the file (after any indentation).
    at: usize,
    keyword: &'t str,
}

/// pest's error for a broken item, as a diagnostic, and whether the item
/// looks unclosed (its text ended at the next item while its block still
/// wanted a property or the `}`). `next`: the item after this one, when the
/// text parsed ends there rather than at the end of the file.
fn syntax_error(
    file: FileId,
    offset: usize,
    e: &pest::error::Error<Rule>,
    next: Option<NextItem<'_>>,
) -> (Diagnostic, bool) {
    let (start, end) = match e.location {
        pest::error::InputLocation::Pos(p) => (p, p),
        pest::error::InputLocation::Span((s, e)) => (s, e),
    };
    let (expected, found_word) = match &e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => {
            let mut names: Vec<&str> = positives.iter().filter_map(rule_display).collect();
            names.dedup();
            let mut uniq: Vec<&str> = Vec::new();
            for n in names {
                if !uniq.contains(&n) {
                    uniq.push(n);
                }
            }
            // Inside an item's braces the closing `}` is as expected as
            // another property; pest lists rules only, so it is added here
            // (an unclosed block said "expected a route property" alone).
            if !positives.is_empty() && positives.iter().all(|r| BODY_RULES.contains(r)) {
                uniq.push("`}`");
            }
            (uniq, true)
        }
        pest::error::ErrorVariant::CustomError { message } => (vec![], !message.is_empty()),
    };
    let line = e.line();
    // The word at the error position, if any, for the message and a suggestion.
    let col = match e.line_col {
        pest::error::LineColLocation::Pos((_, c))
        | pest::error::LineColLocation::Span((_, c), _) => c,
    };
    let rest: String = line.chars().skip(col.saturating_sub(1)).collect();
    let word: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .collect();
    // A word can be a whole 10 MB line: show and label its start only.
    let token: String = if word.is_empty() {
        rest.chars().take(1).collect()
    } else {
        word.chars().take(MAX_SHOWN).collect()
    };
    let cut = word.chars().nth(MAX_SHOWN).is_some();
    let next = next.filter(|_| token.is_empty());
    let at_next_item = next.is_some();
    let next_word = next.map_or("", |n| n.keyword);
    // The next item may be indented: its label goes on its keyword, not on
    // the blanks before it.
    let span = match next {
        Some(n) => Span::new(file, n.at, n.at + n.keyword.len()),
        None => Span::new(file, offset + start, offset + end.max(start + token.len())),
    };
    let found = match (token.is_empty(), cut) {
        (true, _) if at_next_item => format!("the next item, `{next_word}`"),
        (true, _) => "end of file".to_string(),
        (false, false) => format!("`{token}`"),
        (false, true) => format!("`{token}...`"),
    };
    let label = match at_next_item {
        true => "the next item starts here".to_string(),
        false => format!("unexpected {found}"),
    };
    let expected_text = match expected.as_slice() {
        [] => "valid syntax".to_string(),
        [one] => (*one).to_string(),
        many => many.join(" or "),
    };
    let mut d = Diagnostic::error("syntax", format!("expected {expected_text}, found {found}"))
        .with_label(span, label);
    // Edit distance is quadratic: no suggestion for words no keyword is near.
    // A word the grammar knows is spelt right, whatever went wrong after it:
    // `provider x region us }` (no `{`) suggested `providers` for `provider`.
    let spelt_right = KEYWORDS.contains(&word.as_str()) || OTHER_WORDS.contains(&word.as_str());
    let suggestion = if found_word && !word.is_empty() && !cut && !spelt_right {
        did_you_mean(&word, KEYWORDS.iter().copied())
    } else {
        None
    };
    let unclosed = at_next_item && expected.contains(&"`}`");
    d = match suggestion {
        Some(s) => d
            .with_help(format!("did you mean `{s}`?"))
            .with_suggestion(span, s),
        None if unclosed => d.with_help(
            "is this item's closing `}` missing? It was skipped; the rest of the file is still checked",
        ),
        None => d.with_help("this item was skipped; the rest of the file is still checked"),
    };
    (d, unclosed)
}

/// Whether a chunk the parser skipped is a `}` alone (with blanks and comments).
fn is_lone_close(text: &str) -> bool {
    let at = skip_trivia(text, 0);
    text.get(at..)
        .and_then(|rest| rest.strip_prefix('}'))
        .is_some_and(|after| skip_trivia(after, 0) == after.len())
}

/// The offset of the first character at or after `from` that is neither
/// blank nor inside a comment.
fn skip_trivia(text: &str, from: usize) -> usize {
    let mut at = from;
    while let Some(rest) = text.get(at..) {
        let blank = rest.len() - rest.trim_start().len();
        at += blank;
        match text.get(at..) {
            Some(r) if r.starts_with("//") => at += r.find(['\n', '\r']).unwrap_or(r.len()),
            _ if blank == 0 => break,
            _ => {}
        }
    }
    at
}

/// Unescape a string literal's body (without quotes).
fn unescape(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn strip_delims(s: &str) -> &str {
    let mut chars = s.chars();
    chars.next();
    chars.next_back();
    chars.as_str()
}

/// Parse the text of a `quantity` token.
pub fn parse_quantity(text: &str, span: Span) -> Quantity {
    let (money, rest) = match text.strip_prefix('$') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (main, per) = match rest.split_once('/') {
        Some((m, p)) => (m, Some(p.to_string())),
        None => (rest, None),
    };
    let num_end = main
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || (*i == 0 && *c == '-')))
        .map_or(main.len(), |(i, _)| i);
    let (num, unit) = main.split_at(num_end);
    Quantity {
        text: text.to_string(),
        money,
        value: num.parse().unwrap_or(0.0),
        unit: unit.to_string(),
        per,
        span,
    }
}

impl Builder<'_> {
    /// The pair's span without trailing whitespace and comments. pest
    /// consumes the skipped trivia before an optional part that then does not
    /// match (`test = { path ~ test_op? }`), which would otherwise make spans
    /// run on to the next line.
    fn span(&self, p: &P) -> Span {
        let s = p.as_span();
        let end = self.trim_trivia(s.start(), s.end());
        Span::new(self.file, s.start(), end)
    }

    /// A word the grammar split in two: pest matches a keyword as a prefix,
    /// so `providerx {`, `modelgpt {` and `kindchat` parsed as `provider x`,
    /// `model gpt` and `kind chat` without a word. A name, field, quantity
    /// or path that starts right after a letter, digit or `_` is glued to
    /// the word before it; each is an error.
    fn glued_words(&mut self, pairs: pest::iterators::Pairs<'_, Rule>) {
        let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        for p in pairs.flatten() {
            if !matches!(
                p.as_rule(),
                Rule::name | Rule::field | Rule::quantity | Rule::path
            ) {
                continue;
            }
            let start = p.as_span().start();
            let bytes = self.text.as_bytes();
            if !start
                .checked_sub(1)
                .and_then(|i| bytes.get(i))
                .is_some_and(|&b| is_word(b))
            {
                continue;
            }
            let word_start = (0..start)
                .rev()
                .take_while(|&i| bytes.get(i).is_some_and(|&b| is_word(b)))
                .last()
                .unwrap_or(start);
            let (Some(before), Some(after)) = (
                self.text.get(word_start..start),
                self.text.get(start..p.as_span().end()),
            ) else {
                continue;
            };
            // Only the first token of a path: `tenant.plan` is one.
            let shown = after.split('.').next().unwrap_or(after);
            self.diagnostics.push(
                Diagnostic::error(
                    "syntax",
                    format!("`{before}{shown}` runs `{before}` and `{shown}` together"),
                )
                .with_label(
                    Span::new(self.file, word_start, start + shown.len()),
                    format!("read as `{before} {shown}`"),
                )
                .with_help(format!("put a space between them: `{before} {shown}`"))
                .with_suggestion(
                    Span::new(self.file, word_start, start + shown.len()),
                    format!("{before} {shown}"),
                ),
            );
        }
    }

    fn ident(&self, p: &P) -> Ident {
        Ident {
            name: p.as_str().to_string(),
            span: self.span(p),
        }
    }

    fn internal(&mut self, p: &P) {
        let span = self.span(p);
        self.diagnostics.push(
            Diagnostic::error(
                "internal",
                format!(
                    "internal error: unexpected parse tree at `{:?}`",
                    p.as_rule()
                ),
            )
            .with_label(span, "here")
            .with_help("this is a bug in routeplane; please report it with this file"),
        );
    }

    fn reparse_error_item(&mut self, p: &P) {
        let offset = p.as_span().start();
        let text = p.as_str();
        // The item is parsed alone: its text ends where the next item's
        // keyword starts (after its indentation), which its error would call
        // "end of file".
        let end = offset.saturating_add(text.len());
        let next = self.text.get(end..).and_then(|rest| {
            let indented = rest.trim_start_matches([' ', '\t']);
            let keyword_len = indented
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(indented.len());
            let at = end + (rest.len() - indented.len());
            let keyword = self.text.get(at..at + keyword_len)?;
            (!keyword.is_empty()).then_some(NextItem { at, keyword })
        });
        if self.unclosed > 0 && is_lone_close(text) {
            self.unclosed -= 1;
            return;
        }
        match RouteParser::parse(Rule::item_only, text) {
            Err(e) => {
                let d = match self.missing_open_brace(offset, text, &e, next.map(|n| n.keyword)) {
                    Some(d) => d,
                    None => {
                        let (d, unclosed) = syntax_error(self.file, offset, &e, next);
                        self.unclosed += usize::from(unclosed);
                        d
                    }
                };
                self.diagnostics.push(d);
            }
            // Whitespace- and comment-only chunks parse: nothing to report.
            Ok(_) if text.trim().is_empty() => {}
            Ok(_) => {
                let span = self.span(p);
                self.diagnostics.push(
                    Diagnostic::error("syntax", "this item could not be parsed")
                        .with_label(span, "here")
                        .with_help("check that each block's braces are balanced"),
                );
            }
        }
    }

    /// The error for an item whose `{` is missing (`model gpt-4o` then its
    /// properties, `route chat [`), located just after the item's name (or
    /// its route condition), where the `{` belongs. pest locates it at the
    /// item's keyword, or names the properties on the next line as the
    /// problem. `None` when the item's head is not followed by something
    /// other than `{`, or when pest's error lies further in (`route chat
    /// when a.b and {` is missing a condition, not a `{`).
    fn missing_open_brace(
        &self,
        offset: usize,
        text: &str,
        e: &pest::error::Error<Rule>,
        next: Option<&str>,
    ) -> Option<Diagnostic> {
        let head = RouteParser::parse(Rule::item_head, text).ok()?.next()?;
        let mut keyword = "";
        let mut name = None;
        let mut condition = false;
        let mut head_end = 0;
        for part in head.into_inner() {
            head_end = head_end.max(part.as_span().end());
            match part.as_rule() {
                Rule::head_route | Rule::head_named | Rule::head_block => keyword = part.as_str(),
                Rule::name => name = Some(part.as_str()),
                Rule::when_clause => condition = true,
                _ => {}
            }
        }
        // pest counts the blanks and comments before an optional part that is
        // absent (`name ~ when_clause?`): the `{` belongs before them.
        let head_end = self.trim_trivia(offset, offset + head_end) - offset;
        let found_at = skip_trivia(text, head_end);
        let rest = text.get(found_at..).unwrap_or("");
        if rest.starts_with('{') {
            return None;
        }
        let error_at = match e.location {
            pest::error::InputLocation::Pos(p) | pest::error::InputLocation::Span((p, _)) => p,
        };
        if error_at > found_at {
            return None;
        }
        let shown = |s: &str| -> String {
            match s.chars().nth(MAX_SHOWN) {
                Some(_) => format!("{}...", s.chars().take(MAX_SHOWN).collect::<String>()),
                None => s.to_string(),
            }
        };
        let item = match name {
            Some(n) => format!("{keyword} {}", shown(n)),
            None => keyword.to_string(),
        };
        let word: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
            .collect();
        let found = match (word.is_empty(), rest.chars().next(), next) {
            (false, _, _) => format!("`{}`", shown(&word)),
            (true, Some(c), _) => format!("`{c}`"),
            (true, None, Some(n)) => format!("the next item, `{n}`"),
            (true, None, None) => "end of file".to_string(),
        };
        let after = match condition {
            true => format!("the condition of `{item}`"),
            false => format!("`{item}`"),
        };
        let example = match (keyword, condition) {
            ("route", true) => format!("`{item} when .. {{ .. }}`"),
            ("route", false) => format!("`{item} {{ .. }}` or `{item} when .. {{ .. }}`"),
            _ => format!("`{item} {{ .. }}`"),
        };
        let at = offset + head_end;
        Some(
            Diagnostic::error("syntax", format!("expected `{{` after {after}, found {found}"))
                .with_label(Span::new(self.file, at, at), "expected `{` here")
                .with_help(format!(
                    "open the item's block with `{{`: {example}; this item was skipped, the rest of the file is still checked"
                )),
        )
    }

    /// `end` moved back over the blanks and comments before it, down to `start`.
    fn trim_trivia(&self, start: usize, end: usize) -> usize {
        let mut end = end;
        loop {
            let trimmed = self.text.get(start..end).map_or(0, |t| t.trim_end().len());
            end = start + trimmed;
            match self.comment_starts.get(&end) {
                Some(&c) if c >= start => end = c,
                _ => return end,
            }
        }
    }

    fn item(&mut self, p: P) -> Option<Item> {
        let span = self.span(&p);
        let rule = p.as_rule();
        let item = match rule {
            Rule::schema => Item::Schema(self.schema(p, span)?),
            Rule::provider => {
                let mut it = p.into_inner();
                let name = self.ident(&it.next()?);
                let props = it.filter_map(|pp| self.prop(pp)).collect();
                Item::Provider(ProviderDecl { name, props, span })
            }
            Rule::model => {
                let mut it = p.into_inner();
                let name = self.ident(&it.next()?);
                let props = it.filter_map(|pp| self.prop(pp)).collect();
                Item::Model(ModelDecl { name, props, span })
            }
            Rule::constraints => {
                let rules = p.into_inner().filter_map(|c| self.constraint(c)).collect();
                Item::Constraints(ConstraintsBlock { rules, span })
            }
            Rule::classify => {
                let rules = p
                    .into_inner()
                    .filter_map(|c| self.classify_rule(c))
                    .collect();
                Item::Classify(ClassifyBlock { rules, span })
            }
            Rule::route => Item::Route(self.route(p, span)?),
            Rule::protect => {
                let rules = p
                    .into_inner()
                    .filter_map(|r| self.protect_rule(r))
                    .collect();
                Item::Protect(ProtectBlock { rules, span })
            }
            _ => {
                self.internal(&p);
                return None;
            }
        };
        Some(item)
    }

    fn schema(&mut self, p: P, span: Span) -> Option<SchemaDecl> {
        let mut it = p.into_inner();
        let scope = match it.next()?.as_str() {
            "tenant" => SchemaScope::Tenant,
            _ => SchemaScope::Request,
        };
        let mut attrs = Vec::new();
        for a in it {
            let aspan = self.span(&a);
            let mut ai = a.into_inner();
            let name = self.ident(&ai.next()?);
            let ty = self.type_expr(ai.next()?)?;
            let default = match ai.next() {
                Some(l) => Some(self.literal(l)?),
                None => None,
            };
            attrs.push(AttrDecl {
                name,
                ty,
                default,
                span: aspan,
            });
        }
        Some(SchemaDecl { scope, attrs, span })
    }

    fn type_expr(&mut self, p: P) -> Option<TypeExpr> {
        let inner = p.into_inner().next()?;
        let span = self.span(&inner);
        Some(match inner.as_rule() {
            Rule::scalar_type => match inner.as_str() {
                "bool" => TypeExpr::Bool(span),
                "string" => TypeExpr::String(span),
                _ => TypeExpr::Number(span),
            },
            Rule::enum_type => {
                TypeExpr::Enum(inner.into_inner().map(|v| self.ident(&v)).collect(), span)
            }
            Rule::list_type => {
                TypeExpr::List(Box::new(self.type_expr(inner.into_inner().next()?)?), span)
            }
            _ => {
                self.internal(&inner);
                return None;
            }
        })
    }

    fn quantity(&self, p: &P) -> Quantity {
        parse_quantity(p.as_str(), self.span(p))
    }

    fn names(&self, p: P) -> Vec<Ident> {
        p.into_inner().map(|n| self.ident(&n)).collect()
    }

    fn prop(&mut self, p: P) -> Option<Prop> {
        // provider_prop / model_prop wrap one prop_* rule.
        let inner = p.into_inner().next()?;
        let span = self.span(&inner);
        let rule = inner.as_rule();
        if rule == Rule::prop_enabled {
            return Some(Prop {
                kind: PropKind::Enabled(inner.as_str() == "enabled"),
                span,
            });
        }
        let mut it = inner.clone().into_inner();
        let kind = match rule {
            Rule::prop_provider => PropKind::Provider(self.ident(&it.next()?)),
            Rule::prop_kind => PropKind::Kind(self.ident(&it.next()?)),
            Rule::prop_context => PropKind::Context(self.quantity(&it.next()?)),
            Rule::prop_max_output => PropKind::MaxOutput(self.quantity(&it.next()?)),
            Rule::prop_caps => PropKind::Caps(self.names(it.next()?)),
            Rule::prop_labels => PropKind::Labels(self.names(it.next()?)),
            Rule::prop_region => PropKind::Region(self.ident(&it.next()?)),
            Rule::prop_tier => PropKind::Tier(self.ident(&it.next()?)),
            Rule::prop_quality => PropKind::Quality(self.quantity(&it.next()?)),
            Rule::prop_tokenizer => PropKind::Tokenizer(self.ident(&it.next()?)),
            Rule::prop_price => {
                let body = it.next()?;
                let mut bi = body.clone().into_inner();
                let price = match body.as_rule() {
                    Rule::price_io => {
                        let input = self.quantity(&bi.next()?);
                        let output = self.quantity(&bi.next()?);
                        let per = self.price_per(bi.next()?)?;
                        Price::InOut { input, output, per }
                    }
                    _ => {
                        let amount = self.quantity(&bi.next()?);
                        let per = self.price_per(bi.next()?)?;
                        Price::Flat { amount, per }
                    }
                };
                PropKind::Price(price)
            }
            _ => {
                self.internal(&inner);
                return None;
            }
        };
        Some(Prop { kind, span })
    }

    fn price_per(&self, p: P) -> Option<PricePer> {
        let inner = p.into_inner().next()?;
        Some(match inner.as_rule() {
            Rule::quantity => PricePer::Tokens(self.quantity(&inner)),
            _ => PricePer::Unit(self.ident(&inner)),
        })
    }

    fn literal(&mut self, p: P) -> Option<Literal> {
        let inner = if p.as_rule() == Rule::literal {
            p.into_inner().next()?
        } else {
            p
        };
        let span = self.span(&inner);
        Some(match inner.as_rule() {
            Rule::string => Literal::Str(unescape(strip_delims(inner.as_str())), span),
            Rule::regex => Literal::Regex(strip_delims(inner.as_str()).replace("\\/", "/"), span),
            Rule::bool_lit => Literal::Bool(inner.as_str() == "true", span),
            Rule::quantity => Literal::Quantity(self.quantity(&inner)),
            Rule::name | Rule::keyword => Literal::Name(self.ident(&inner)),
            Rule::list => {
                let mut items = Vec::new();
                for l in inner.into_inner() {
                    items.push(self.literal(l)?);
                }
                Literal::List(items, span)
            }
            _ => {
                self.internal(&inner);
                return None;
            }
        })
    }

    fn list_items(&mut self, p: P) -> Option<Vec<Literal>> {
        match self.literal(p)? {
            Literal::List(items, _) => Some(items),
            other => Some(vec![other]),
        }
    }

    // -------------------------------------------------------------- conditions

    fn cond(&mut self, p: P) -> Option<Expr> {
        match p.as_rule() {
            Rule::cond | Rule::when_clause => self.cond(p.into_inner().next()?),
            Rule::disj | Rule::conj => {
                let span = self.span(&p);
                let is_or = p.as_rule() == Rule::disj;
                let mut parts = Vec::new();
                for c in p.into_inner() {
                    parts.push(self.cond(c)?);
                }
                if parts.len() == 1 {
                    return parts.pop();
                }
                Some(if is_or {
                    Expr::Or(parts, span)
                } else {
                    Expr::And(parts, span)
                })
            }
            Rule::unary => self.unary(p),
            Rule::test => {
                let span = self.span(&p);
                let mut it = p.into_inner();
                let path = self.path(it.next()?)?;
                let op = match it.next() {
                    Some(op) => Some(self.test_op(op)?),
                    None => None,
                };
                Some(Expr::Test(Test { path, op, span }))
            }
            _ => {
                self.internal(&p);
                None
            }
        }
    }

    fn unary(&mut self, p: P) -> Option<Expr> {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let first = it.next()?;
        if !matches!(first.as_rule(), Rule::not_op | Rule::cond) {
            return self.cond(first);
        }
        if self.depth >= MAX_NESTING {
            self.diagnostics.push(
                Diagnostic::error(
                    "syntax",
                    format!(
                        "this condition nests more than {MAX_NESTING} levels of `not` and parentheses"
                    ),
                )
                .with_label(Span::new(self.file, span.start(), span.start().saturating_add(1)), "too deep from here")
                .with_help("split it into simpler conditions"),
            );
            return None;
        }
        self.depth = self.depth.saturating_add(1);
        let e = match first.as_rule() {
            Rule::not_op => it
                .next()
                .and_then(|c| self.cond(c))
                .map(|c| Expr::Not(Box::new(c), span)),
            _ => self.cond(first).map(|c| Expr::Paren(Box::new(c), span)),
        };
        self.depth = self.depth.saturating_sub(1);
        e
    }

    fn path(&mut self, p: P) -> Option<Path> {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let scope = match it.next()?.as_str() {
            "tenant" => PathScope::Tenant,
            "request" => PathScope::Request,
            "model" => PathScope::Model,
            _ => PathScope::Provider,
        };
        let field = self.ident(&it.next()?);
        Some(Path { scope, field, span })
    }

    fn test_op(&mut self, p: P) -> Option<TestOp> {
        let op = p.into_inner().next()?;
        let span = self.span(&op);
        let rule = op.as_rule();
        let mut it = op.into_inner();
        Some(match rule {
            Rule::op_cmp => {
                let cmp = match it.next()?.as_str() {
                    "==" => CmpOp::Eq,
                    "!=" => CmpOp::Ne,
                    "<=" => CmpOp::Le,
                    ">=" => CmpOp::Ge,
                    "<" => CmpOp::Lt,
                    _ => CmpOp::Gt,
                };
                TestOp::Cmp(cmp, self.literal(it.next()?)?)
            }
            Rule::op_in => {
                let first = it.next()?;
                let (negated, list) = if first.as_rule() == Rule::not_in {
                    (true, it.next()?)
                } else {
                    (false, first)
                };
                TestOp::In {
                    negated,
                    list: self.list_items(list)?,
                    span,
                }
            }
            Rule::op_has => TestOp::Has(self.literal(it.next()?)?),
            Rule::op_matches => TestOp::Matches(self.literal(it.next()?)?),
            Rule::op_contains => TestOp::Contains(self.literal(it.next()?)?),
            _ => return None,
        })
    }

    // -------------------------------------------------------------- layer 1

    fn constraint(&mut self, p: P) -> Option<Constraint> {
        let span = self.span(&p);
        let mut label = None;
        let mut effect = None;
        let mut when = None;
        for part in p.into_inner() {
            match part.as_rule() {
                Rule::rule_label => label = Some(self.ident(&part.into_inner().next()?)),
                Rule::deny_rule => {
                    effect = Some(Effect::Deny(self.target(part.into_inner().next()?)?))
                }
                Rule::allow_rule => {
                    effect = Some(Effect::AllowOnly(self.target(part.into_inner().next()?)?))
                }
                Rule::require_rule => {
                    effect = Some(Effect::Require(self.cond(part.into_inner().next()?)?))
                }
                Rule::when_clause => when = Some(self.cond(part)?),
                _ => self.internal(&part),
            }
        }
        Some(Constraint {
            label,
            effect: effect?,
            when,
            span,
        })
    }

    fn target(&mut self, p: P) -> Option<Target> {
        let inner = p.into_inner().next()?;
        let span = self.span(&inner);
        let rule = inner.as_rule();
        let arg = inner.into_inner().next()?;
        let idents = |b: &Self, a: P| {
            if a.as_rule() == Rule::names {
                b.names(a)
            } else {
                vec![b.ident(&a)]
            }
        };
        Some(match rule {
            Rule::target_where => Target::Where(self.cond(arg)?, span),
            Rule::target_providers => Target::Providers(idents(self, arg), span),
            _ => Target::Models(idents(self, arg), span),
        })
    }

    // -------------------------------------------------------------- layer 2

    fn classify_rule(&mut self, p: P) -> Option<ClassifyRule> {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let intent = self.ident(&it.next()?);
        let tail = it.next()?;
        let when = if tail.as_rule() == Rule::when_clause {
            Some(self.cond(tail)?)
        } else {
            None
        };
        Some(ClassifyRule { intent, when, span })
    }

    // -------------------------------------------------------------- layer 3

    fn route(&mut self, p: P, span: Span) -> Option<RouteDecl> {
        let mut it = p.into_inner().peekable();
        let intent = self.ident(&it.next()?);
        let when = match it.peek() {
            Some(w) if w.as_rule() == Rule::when_clause => {
                let w = it.next()?;
                Some(self.cond(w)?)
            }
            _ => None,
        };
        let mut props = Vec::new();
        for rp in it {
            let inner = rp.into_inner().next()?;
            let pspan = self.span(&inner);
            let rule = inner.as_rule();
            let kind = match rule {
                Rule::candidates => {
                    RoutePropKind::Candidates(self.names(inner.into_inner().next()?))
                }
                Rule::downgrade => RoutePropKind::Downgrade(self.names(inner.into_inner().next()?)),
                Rule::premium => RoutePropKind::PremiumOnly(self.cond(inner.into_inner().next()?)?),
                Rule::fallback => {
                    let mut items = Vec::new();
                    for fi in inner.into_inner() {
                        let x = fi.into_inner().next()?;
                        items.push(if x.as_rule() == Rule::fallback_route {
                            FallbackItem::Route(self.ident(&x.into_inner().next()?))
                        } else {
                            FallbackItem::Model(self.ident(&x))
                        });
                    }
                    RoutePropKind::Fallback(items)
                }
                Rule::score => {
                    let mut terms = Vec::new();
                    let mut negative = false;
                    for t in inner.into_inner() {
                        if t.as_rule() == Rule::score_sign {
                            negative = t.as_str() == "-";
                            continue;
                        }
                        let tspan = self.span(&t);
                        let mut ti = t.into_inner();
                        let weight = self.quantity(&ti.next()?);
                        let signal = self.ident(&ti.next()?);
                        terms.push(ScoreTerm {
                            negative,
                            weight,
                            signal,
                            span: tspan,
                        });
                        negative = false;
                    }
                    RoutePropKind::Score(terms)
                }
                _ => {
                    self.internal(&inner);
                    continue;
                }
            };
            props.push(RouteProp { kind, span: pspan });
        }
        Some(RouteDecl {
            intent,
            when,
            props,
            span,
        })
    }

    // -------------------------------------------------------------- layer 4

    fn protect_rule(&mut self, p: P) -> Option<ProtectRule> {
        let inner = p.into_inner().next()?;
        let span = self.span(&inner);
        let rule = inner.as_rule();
        let mut it = inner.clone().into_inner();
        let kind = match rule {
            Rule::retry => {
                let count = self.quantity(&it.next()?);
                let mut on = Vec::new();
                let mut backoff = None;
                for part in it {
                    match part.as_rule() {
                        Rule::retry_on => on = part.into_inner().map(|s| self.ident(&s)).collect(),
                        _ => {
                            let mut bi = part.into_inner();
                            let lo = self.quantity(&bi.next()?);
                            let hi = self.quantity(&bi.next()?);
                            backoff = Some((lo, hi));
                        }
                    }
                }
                ProtectKind::Retry { count, on, backoff }
            }
            Rule::timeout => {
                let mut parts = Vec::new();
                for tp in it {
                    let mut ti = tp.into_inner();
                    let k = self.ident(&ti.next()?);
                    let q = self.quantity(&ti.next()?);
                    parts.push((k, q));
                }
                ProtectKind::Timeout { parts }
            }
            Rule::breaker => {
                let scope = self.ident(&it.next()?);
                let failures = self.quantity(&it.next()?);
                let window = self.quantity(&it.next()?);
                let cooldown = self.quantity(&it.next()?);
                ProtectKind::Breaker {
                    scope,
                    failures,
                    window,
                    cooldown,
                }
            }
            Rule::limit => {
                let kind = self.ident(&it.next()?);
                let amount = self.quantity(&it.next()?);
                let scope = self.ident(&it.next()?);
                ProtectKind::Limit {
                    kind,
                    amount,
                    scope,
                }
            }
            Rule::budget => {
                let period_p = it.next()?.into_inner().next()?;
                let period = if period_p.as_rule() == Rule::budget_every {
                    BudgetPeriod::Every(self.quantity(&period_p.into_inner().next()?))
                } else {
                    BudgetPeriod::Named(self.ident(&period_p))
                };
                let scope = it.next()?.into_inner().map(|s| self.ident(&s)).collect();
                let amount_p = it.next()?.into_inner().next()?;
                let amount = if amount_p.as_rule() == Rule::path {
                    BudgetAmount::Attr(self.path(amount_p)?)
                } else {
                    BudgetAmount::Money(self.quantity(&amount_p))
                };
                let mut thresholds = Vec::new();
                for t in it {
                    let tspan = self.span(&t);
                    let mut ti = t.into_inner();
                    let action_p = ti.next()?;
                    let a = action_p.into_inner().next()?;
                    let action = if a.as_rule() == Rule::confirm_premium {
                        Ident {
                            name: "confirm_premium".into(),
                            span: self.span(&a),
                        }
                    } else {
                        self.ident(&a)
                    };
                    let at = self.quantity(&ti.next()?);
                    thresholds.push(Threshold {
                        action,
                        at,
                        span: tspan,
                    });
                }
                ProtectKind::Budget(Budget {
                    period,
                    scope,
                    amount,
                    thresholds,
                })
            }
            _ => {
                self.internal(&inner);
                return None;
            }
        };
        Some(ProtectRule { kind, span })
    }
}

/// Collect `//` comments with a lexical scan that skips strings and regexes.
pub fn scan_comments(file: FileId, text: &str) -> Vec<Comment> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                i += 1;
                while let Some(&c) = bytes.get(i) {
                    i += 1;
                    if c == b'\\' {
                        i += 1;
                    } else if matches!(c, b'"' | b'\n' | b'\r') {
                        break;
                    }
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                // Any line break ends it, a lone `\r` too, as in the grammar.
                let end = text
                    .get(i..)
                    .and_then(|r| r.find(['\n', '\r']))
                    .map_or(text.len(), |n| i + n);
                let body = text.get(i..end).unwrap_or("").trim_end().to_string();
                out.push(Comment {
                    span: Span::new(file, i, i + body.len()),
                    text: body,
                });
                i = end;
            }
            _ => i += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests;
