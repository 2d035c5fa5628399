//! The formatter: one canonical layout for `.route` files.
//!
//! The tree is printed from the AST, so spacing, indentation and line breaks
//! are always the same; the source text is used only for what the AST does not
//! keep: comments, blank lines between rules, and the exact spelling of strings
//! and regexes. Quantities keep their text (`$0.15`, `128k`, `600/min`).
//!
//! Layout:
//! - top-level items are separated by exactly one blank line;
//! - blocks are indented by two spaces, one property or rule per line;
//! - one blank line between rules is kept where the source had one or more;
//! - `provider x` for one name, `providers [a, b]` for several (same for models).
//!
//! Comments stay where they were: before an item or a rule, at the end of a
//! line, at the end of a block or of the file. A list with comments between
//! its items is printed one item per line, each comment next to its item. A
//! comment anywhere else inside a rule moves to its own line just before the
//! rule: its text is never lost.
//!
//! INVARIANT: [`format_source`] returns text whose AST equals the input's (spans
//! ignored) and that holds every comment of the input, or it refuses. Files with
//! syntax errors are refused, never formatted.

use crate::diag::Diagnostic;
use crate::source::{FileId, Span};
use crate::syntax::ast::*;
use crate::syntax::parse_file;

/// Format one file. Returns the diagnostics instead when the file has syntax
/// errors (a broken file is never rewritten).
pub fn format_source(file: FileId, text: &str) -> Result<String, Vec<Diagnostic>> {
    let parsed = parse_file(file, text);
    if !parsed.diagnostics.is_empty() {
        return Err(parsed.diagnostics);
    }
    let out = format_ast(&parsed.ast, text);
    verify(file, &parsed.ast, &out)?;
    Ok(out)
}

/// The safety net behind the invariant: the output must parse to the same tree
/// and keep every comment. A failure here is a formatter bug, reported rather
/// than written to disk.
fn verify(file: FileId, before: &FileAst, out: &str) -> Result<(), Vec<Diagnostic>> {
    let after = parse_file(file, out);
    let same_tree = after.diagnostics.is_empty() && after.ast.items == before.items;
    let before_comments: Vec<&str> = before.comments.iter().map(|c| c.text.as_str()).collect();
    let after_comments: Vec<&str> = after.ast.comments.iter().map(|c| c.text.as_str()).collect();
    if same_tree && before_comments == after_comments {
        return Ok(());
    }
    let span = Span::new(file, 0, 0);
    Err(vec![Diagnostic::error(
        "internal",
        "internal error: formatting would change the meaning of this file",
    )
    .with_label(span, "this file was left unchanged")
    .with_help(
        "this is a bug in routeplane; please report it with this file",
    )])
}

/// Print a tree in the canonical layout. `text` is the source the tree was
/// parsed from (for comments, blank lines and string spellings); pass `""`
/// for a tree built in code.
pub fn format_ast(ast: &FileAst, text: &str) -> String {
    let nodes: Vec<Node> = ast.items.iter().map(|i| item(i, text)).collect();
    let mut p = Printer::new(text, &ast.comments);
    for (i, n) in nodes.iter().enumerate() {
        let next = nodes.get(i + 1).map(|n| n.span().start());
        p.node(n, 0, i == 0, true, next);
    }
    p.rest(0, text.len(), false);
    let mut out = p.out;
    while out.ends_with("\n\n") {
        out.pop();
    }
    if out == "\n" {
        out.clear();
    }
    out
}

// ------------------------------------------------------------------ layout tree

/// What gets printed: a line, or a block `header {` children `}`.
enum Node {
    /// One line; `list` is how to print it over several lines when comments
    /// sit between the items of its list.
    Line {
        text: String,
        span: Span,
        list: Option<ListForm>,
    },
    Block {
        header: String,
        span: Span,
        children: Vec<Node>,
    },
}

impl Node {
    fn span(&self) -> Span {
        match self {
            Node::Line { span, .. } | Node::Block { span, .. } => *span,
        }
    }
}

fn line(text: String, span: Span) -> Node {
    Node::Line {
        text,
        span,
        list: None,
    }
}

/// A line that ends in (or contains) a list: `head` then the items, one per
/// line, then `close` and `tail`. `candidates [a, b] ` is head `candidates [`,
/// close `]`, tail ``.
struct ListForm {
    head: String,
    items: Vec<(String, Span)>,
    close: char,
    tail: String,
}

fn list_line(
    text: String,
    span: Span,
    head: String,
    items: Vec<(String, Span)>,
    close: char,
    tail: String,
) -> Node {
    let list = (!items.is_empty()).then_some(ListForm {
        head,
        items,
        close,
        tail,
    });
    Node::Line { text, span, list }
}

fn ident_items(ns: &[Ident]) -> Vec<(String, Span)> {
    ns.iter().map(|n| (n.name.clone(), n.span)).collect()
}

// ------------------------------------------------------------------ printer

struct Printer<'a> {
    text: &'a str,
    comments: Vec<&'a Comment>,
    /// Offsets of the line breaks of `text`.
    breaks: Vec<usize>,
    /// Index of the first comment not printed yet.
    next: usize,
    /// Offset of the end of what was last printed, for blank-line detection.
    pos: usize,
    out: String,
}

impl<'a> Printer<'a> {
    fn new(text: &'a str, comments: &'a [Comment]) -> Self {
        let mut comments: Vec<&Comment> = comments.iter().collect();
        comments.sort_by_key(|c| c.span.start);
        let breaks = crate::source::line_breaks(text)
            .map(|(start, _)| start)
            .collect();
        Printer {
            text,
            comments,
            breaks,
            next: 0,
            pos: 0,
            out: String::new(),
        }
    }

    /// The end of a span without the whitespace and comments pest counts in a
    /// rule that ends with an optional part (`retry 1` then a comment).
    fn end(&self, span: Span) -> usize {
        let mut end = span.end().min(self.text.len());
        loop {
            let Some(body) = self.text.get(span.start()..end) else {
                return span.end();
            };
            end = span.start() + body.trim_end().len();
            let comment = self
                .comments
                .binary_search_by_key(&end, |c| c.span.end())
                .ok()
                .and_then(|i| self.comments.get(i));
            match comment {
                Some(c) if c.span.start() >= span.start() && c.span.start() < end => {
                    end = c.span.start()
                }
                _ => return end,
            }
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.breaks.partition_point(|&b| b < offset)
    }

    /// Whether the source has a blank line between two offsets.
    fn blank_between(&self, from: usize, to: usize) -> bool {
        if from >= to {
            return false;
        }
        let Some(gap) = self.text.get(from..to) else {
            return false;
        };
        // A blank line is two line breaks with only whitespace between them
        // (`\r\n`, `\n` and a lone `\r` are one break each).
        let breaks: Vec<(usize, usize)> = crate::source::line_breaks(gap).collect();
        breaks.windows(2).any(|pair| match pair {
            [(_, end), (start, _)] => gap.get(*end..*start).is_some_and(|s| s.trim().is_empty()),
            _ => false,
        })
    }

    fn indent(&mut self, level: usize) {
        for _ in 0..level {
            self.out.push_str("  ");
        }
    }

    /// One blank line, never two, never at the top of the file and never
    /// right after a block's opening brace.
    fn blank_line(&mut self) {
        let last = self
            .out
            .trim_end_matches('\n')
            .rsplit('\n')
            .next()
            .unwrap_or("")
            .trim_start();
        let opens_block = last.ends_with('{') && !last.starts_with("//");
        if !self.out.is_empty() && !self.out.ends_with("\n\n") && !opens_block {
            self.out.push('\n');
        }
    }

    fn peek(&self) -> Option<&'a Comment> {
        self.comments.get(self.next).copied()
    }

    /// Print, each on its own line, the comments that start before `limit`,
    /// keeping one blank line where the source had some. `first` is true for
    /// the first thing in a block (no blank line before it). Returns whether
    /// it printed anything.
    fn rest(&mut self, level: usize, limit: usize, first: bool) -> bool {
        let mut printed = false;
        while let Some(c) = self.peek() {
            if c.span.start() >= limit {
                break;
            }
            if (printed || !first) && self.blank_between(self.pos, c.span.start()) {
                self.blank_line();
            }
            self.indent(level);
            self.out.push_str(&c.text);
            self.out.push('\n');
            self.pos = c.span.end();
            self.next += 1;
            printed = true;
        }
        printed
    }

    /// The comment at the end of the source line where `end` is, if it starts
    /// after `end` and before `limit` (the next node's start).
    fn trailing(&mut self, end: usize, limit: Option<usize>) -> Option<&'a Comment> {
        let c = self.peek()?;
        let start = c.span.start();
        if start < end
            || limit.is_some_and(|l| start >= l)
            || self.line_of(start) != self.line_of(end)
        {
            return None;
        }
        self.next += 1;
        Some(c)
    }

    fn finish_line(&mut self, end: usize, limit: Option<usize>) {
        match self.trailing(end, limit) {
            Some(c) => {
                self.out.push(' ');
                self.out.push_str(&c.text);
                self.pos = c.span.end();
            }
            None => self.pos = self.pos.max(end),
        }
        self.out.push('\n');
    }

    /// Print one node with its comments. `next` is the start of the following
    /// sibling, so a comment after it is not taken as this node's trailing one.
    fn node(&mut self, n: &Node, level: usize, first: bool, top: bool, next: Option<usize>) {
        let span = n.span();
        let end = self.end(span);
        // Items always have a blank line between them; rules where the source had one.
        if !first && (top || self.blank_between(self.pos, self.first_start(span.start()))) {
            self.blank_line();
        }
        match n {
            Node::Line { text, list, .. } => {
                if let Some(l) = list {
                    if self.list_lines(l, level, span, end, first && !top, next) {
                        return;
                    }
                }
                // Comments inside the line's span move to just before it.
                self.leading(level, end, span.start(), first && !top);
                self.indent(level);
                self.out.push_str(text);
                self.finish_line(end, next);
            }
            Node::Block {
                header, children, ..
            } => {
                self.leading(level, span.start(), span.start(), first && !top);
                self.indent(level);
                self.out.push_str(header);
                let one_line = self.line_of(span.start()) == self.line_of(end);
                let body_start = children.first().map_or(end, |c| c.span().start());
                if children.is_empty() && !self.has_comment_before(end) {
                    self.out.push_str(" {}");
                    self.finish_line(end, next);
                    return;
                }
                self.out.push_str(" {");
                // A comment on the header line stays there; so does the comment
                // after a block written on one line.
                let header_limit = if one_line { next } else { Some(body_start) };
                let header_end = if one_line { end } else { span.start() };
                match self.trailing(header_end, header_limit) {
                    Some(c) => {
                        self.out.push(' ');
                        self.out.push_str(&c.text);
                        self.pos = c.span.end();
                    }
                    None => self.pos = span.start(),
                }
                self.out.push('\n');
                for (i, child) in children.iter().enumerate() {
                    let child_next = children.get(i + 1).map_or(end, |c| c.span().start());
                    self.node(child, level + 1, i == 0, false, Some(child_next));
                }
                self.rest(level + 1, end, children.is_empty());
                self.indent(level);
                self.out.push('}');
                self.finish_line(end, next);
            }
        }
    }

    /// Print a line whose list holds comments with one item per line, so each
    /// comment stays next to its item. Returns false (printing nothing) when
    /// the list has no comment inside, or when a comment sits after the list
    /// but inside the line (then the plain layout moves all of them up).
    fn list_lines(
        &mut self,
        l: &ListForm,
        level: usize,
        span: Span,
        end: usize,
        first: bool,
        next: Option<usize>,
    ) -> bool {
        let (Some(first_item), Some(last_item)) = (l.items.first(), l.items.last()) else {
            return false;
        };
        let Some(close) = self.closing(last_item.1.end(), l.close) else {
            return false;
        };
        let inside = |c: &Comment| c.span.start() >= first_item.1.start() && c.span.start() < close;
        let after = |c: &Comment| c.span.start() > close && c.span.start() < end;
        let pending = self.comments.get(self.next..).unwrap_or(&[]);
        if !pending.iter().any(|c| inside(c)) || pending.iter().any(|c| after(c)) {
            return false;
        }
        self.leading(level, first_item.1.start(), span.start(), first);
        self.indent(level);
        self.out.push_str(&l.head);
        self.out.push('\n');
        for (i, (item, ispan)) in l.items.iter().enumerate() {
            self.rest(level + 1, ispan.start(), i == 0);
            self.indent(level + 1);
            self.out.push_str(item);
            self.out.push(',');
            let limit = l.items.get(i + 1).map_or(close, |n| n.1.start());
            self.finish_line(ispan.end(), Some(limit));
        }
        self.rest(level + 1, close, false);
        self.indent(level);
        self.out.push(l.close);
        self.out.push_str(&l.tail);
        self.finish_line(end, next);
        true
    }

    /// The offset of the `close` character that ends a list whose last item
    /// ends at `from`: only spaces, commas and comments may come between.
    fn closing(&self, from: usize, close: char) -> Option<usize> {
        let mut i = from;
        loop {
            let rest = self.text.get(i..)?;
            let c = rest.chars().next()?;
            if c == close {
                return Some(i);
            }
            if c.is_whitespace() || c == ',' {
                i += c.len_utf8();
            } else if rest.starts_with("//") {
                i += rest.find(['\n', '\r']).unwrap_or(rest.len());
            } else {
                return None;
            }
        }
    }

    fn has_comment_before(&self, limit: usize) -> bool {
        self.peek().is_some_and(|c| c.span.start() < limit)
    }

    /// Where the leading comments of a node (or the node) start, for the
    /// blank line before them.
    fn first_start(&self, node_start: usize) -> usize {
        self.peek()
            .map_or(node_start, |c| c.span.start().min(node_start))
    }

    /// Leading comments of a node: every comment before `limit`. Comments
    /// between `node_start` and `limit` are inside the node and move before it.
    fn leading(&mut self, level: usize, limit: usize, node_start: usize, first: bool) {
        // A blank line between the comments and the node is kept too.
        if self.rest(level, limit, first) && self.blank_between(self.pos, node_start) {
            self.blank_line();
        }
    }
}

// ------------------------------------------------------------------ items

fn item(it: &Item, text: &str) -> Node {
    match it {
        Item::Schema(s) => {
            let header = match s.scope {
                SchemaScope::Tenant => "tenant",
                SchemaScope::Request => "request",
            };
            let children = s.attrs.iter().map(|a| attr_node(a, text)).collect();
            Node::Block {
                header: header.into(),
                span: s.span,
                children,
            }
        }
        Item::Provider(x) => Node::Block {
            header: format!("provider {}", x.name.name),
            span: x.span,
            children: x.props.iter().map(prop_node).collect(),
        },
        Item::Model(x) => Node::Block {
            header: format!("model {}", x.name.name),
            span: x.span,
            children: x.props.iter().map(prop_node).collect(),
        },
        Item::Constraints(c) => Node::Block {
            header: "constraints".into(),
            span: c.span,
            children: c.rules.iter().map(|r| constraint_node(r, text)).collect(),
        },
        Item::Classify(c) => Node::Block {
            header: "classify".into(),
            span: c.span,
            children: c
                .rules
                .iter()
                .map(|r| line(classify_rule(r, text), r.span))
                .collect(),
        },
        Item::Route(r) => {
            let mut header = format!("route {}", r.intent.name);
            if let Some(w) = &r.when {
                header.push_str(" when ");
                header.push_str(&expr(w, text));
            }
            let children = r.props.iter().map(|p| route_prop_node(p, text)).collect();
            Node::Block {
                header,
                span: r.span,
                children,
            }
        }
        Item::Protect(p) => Node::Block {
            header: "protect".into(),
            span: p.span,
            children: p.rules.iter().map(protect_rule).collect(),
        },
    }
}

// The `*_node` functions give lines that hold a list the multi-line form used
// when comments sit between the list's items.

fn attr_node(a: &AttrDecl, text: &str) -> Node {
    let TypeExpr::Enum(vs, _) = &a.ty else {
        return line(attr(a, text), a.span);
    };
    let tail = a
        .default
        .as_ref()
        .map(|d| format!(" = {}", literal(d, text)))
        .unwrap_or_default();
    list_line(
        attr(a, text),
        a.span,
        format!("{}: enum(", a.name.name),
        ident_items(vs),
        ')',
        tail,
    )
}

fn prop_node(p: &Prop) -> Node {
    match &p.kind {
        PropKind::Caps(ns) | PropKind::Labels(ns) => {
            let head = format!("{} [", p.kind.keyword());
            list_line(
                prop(&p.kind),
                p.span,
                head,
                ident_items(ns),
                ']',
                String::new(),
            )
        }
        k => line(prop(k), p.span),
    }
}

fn constraint_node(c: &Constraint, text: &str) -> Node {
    let (effect, target) = match &c.effect {
        Effect::Deny(t) => ("deny", t),
        Effect::AllowOnly(t) => ("allow only", t),
        Effect::Require(_) => return line(constraint(c, text), c.span),
    };
    let (word, ns) = match target {
        Target::Providers(ns, _) => ("providers", ns),
        Target::Models(ns, _) => ("models", ns),
        Target::Where(..) => return line(constraint(c, text), c.span),
    };
    if ns.len() == 1 {
        return line(constraint(c, text), c.span);
    }
    let label = c
        .label
        .as_ref()
        .map(|l| format!("{}: ", l.name))
        .unwrap_or_default();
    let head = format!("{label}{effect} {word} [");
    list_line(
        constraint(c, text),
        c.span,
        head,
        ident_items(ns),
        ']',
        when(&c.when, text),
    )
}

fn route_prop_node(p: &RouteProp, text: &str) -> Node {
    let items = match &p.kind {
        RoutePropKind::Candidates(ns) | RoutePropKind::Downgrade(ns) => ident_items(ns),
        RoutePropKind::Fallback(items) => items
            .iter()
            .map(|i| match i {
                FallbackItem::Model(n) => (n.name.clone(), n.span),
                FallbackItem::Route(n) => (format!("route {}", n.name), n.span),
            })
            .collect(),
        k => return line(route_prop(k, text), p.span),
    };
    let head = format!("{} [", p.kind.keyword());
    list_line(
        route_prop(&p.kind, text),
        p.span,
        head,
        items,
        ']',
        String::new(),
    )
}

fn attr(a: &AttrDecl, text: &str) -> String {
    let mut s = format!("{}: {}", a.name.name, type_expr(&a.ty));
    if let Some(d) = &a.default {
        s.push_str(" = ");
        s.push_str(&literal(d, text));
    }
    s
}

fn type_expr(t: &TypeExpr) -> String {
    match t {
        TypeExpr::Bool(_) => "bool".into(),
        TypeExpr::String(_) => "string".into(),
        TypeExpr::Number(_) => "number".into(),
        TypeExpr::Enum(vs, _) => format!("enum({})", join(vs.iter().map(|v| v.name.clone()))),
        TypeExpr::List(t, _) => format!("list({})", type_expr(t)),
    }
}

fn join(parts: impl Iterator<Item = String>) -> String {
    parts.collect::<Vec<_>>().join(", ")
}

fn names(ns: &[Ident]) -> String {
    format!("[{}]", join(ns.iter().map(|n| n.name.clone())))
}

fn prop(p: &PropKind) -> String {
    match p {
        PropKind::Provider(n) => format!("provider {}", n.name),
        PropKind::Kind(n) => format!("kind {}", n.name),
        PropKind::Context(q) => format!("context {}", q.text),
        PropKind::MaxOutput(q) => format!("max_output {}", q.text),
        PropKind::Price(Price::InOut { input, output, per }) => {
            format!(
                "price in {} out {} per {}",
                input.text,
                output.text,
                price_per(per)
            )
        }
        PropKind::Price(Price::Flat { amount, per }) => {
            format!("price {} per {}", amount.text, price_per(per))
        }
        PropKind::Caps(ns) => format!("caps {}", names(ns)),
        PropKind::Region(n) => format!("region {}", n.name),
        PropKind::Tier(n) => format!("tier {}", n.name),
        PropKind::Quality(q) => format!("quality {}", q.text),
        PropKind::Tokenizer(n) => format!("tokenizer {}", n.name),
        PropKind::Enabled(true) => "enabled".into(),
        PropKind::Enabled(false) => "disabled".into(),
        PropKind::Labels(ns) => format!("labels {}", names(ns)),
    }
}

fn price_per(p: &PricePer) -> String {
    match p {
        PricePer::Tokens(q) => q.text.clone(),
        PricePer::Unit(n) => n.name.clone(),
    }
}

// ------------------------------------------------------------------ literals and conditions

/// The source spelling of a string or regex when the span holds it, so escapes
/// stay as the user wrote them; otherwise a fresh spelling.
fn spelled(text: &str, span: Span, delim: char) -> Option<&str> {
    let s = text.get(span.start()..span.end())?;
    (s.len() >= 2 && s.starts_with(delim) && s.ends_with(delim)).then_some(s)
}

fn literal(l: &Literal, text: &str) -> String {
    match l {
        Literal::Str(s, span) => match spelled(text, *span, '"') {
            Some(src) => src.to_string(),
            None => quote(s),
        },
        Literal::Regex(r, span) => match spelled(text, *span, '/') {
            Some(src) => src.to_string(),
            None => format!("/{}/", r.replace('/', "\\/")),
        },
        Literal::Bool(b, _) => b.to_string(),
        Literal::Quantity(q) => q.text.clone(),
        Literal::Name(n) => n.name.clone(),
        Literal::List(items, _) => list(items, text),
    }
}

fn list(items: &[Literal], text: &str) -> String {
    format!("[{}]", join(items.iter().map(|l| literal(l, text))))
}

/// A string literal for a value that has no source spelling.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Binding strength: `or` < `and` < `not` < a test or a parenthesised group.
fn precedence(e: &Expr) -> u8 {
    match e {
        Expr::Or(..) => 0,
        Expr::And(..) => 1,
        Expr::Not(..) => 2,
        Expr::Paren(..) | Expr::Test(_) => 3,
    }
}

/// Print `e` where an operand of strength `min` is expected, adding
/// parentheses only when precedence needs them (a tree built in code may lack
/// them; a parsed tree keeps the user's as `Expr::Paren`).
fn operand(e: &Expr, min: u8, text: &str) -> String {
    let s = expr(e, text);
    if precedence(e) < min {
        format!("({s})")
    } else {
        s
    }
}

pub(crate) fn expr(e: &Expr, text: &str) -> String {
    match e {
        // The parser flattens `a or b or c`, so a nested `or` needs parentheses to
        // read back as the same tree; likewise for `and`.
        Expr::Or(parts, _) => parts
            .iter()
            .map(|p| operand(p, 1, text))
            .collect::<Vec<_>>()
            .join(" or "),
        Expr::And(parts, _) => parts
            .iter()
            .map(|p| operand(p, 2, text))
            .collect::<Vec<_>>()
            .join(" and "),
        Expr::Not(inner, _) => format!("not {}", operand(inner, 2, text)),
        Expr::Paren(inner, _) => format!("({})", expr(inner, text)),
        Expr::Test(t) => test(t, text),
    }
}

fn test(t: &Test, text: &str) -> String {
    let path = format!("{}.{}", t.path.scope.as_str(), t.path.field.name);
    match &t.op {
        None => path,
        Some(TestOp::Cmp(op, l)) => format!("{path} {} {}", op.as_str(), literal(l, text)),
        Some(TestOp::In {
            negated,
            list: items,
            ..
        }) => {
            let kw = if *negated { "not in" } else { "in" };
            format!("{path} {kw} {}", list(items, text))
        }
        Some(TestOp::Has(l)) => format!("{path} has {}", literal(l, text)),
        Some(TestOp::Matches(l)) => format!("{path} matches {}", literal(l, text)),
        Some(TestOp::Contains(l)) => format!("{path} contains {}", literal(l, text)),
    }
}

fn when(w: &Option<Expr>, text: &str) -> String {
    match w {
        Some(e) => format!(" when {}", expr(e, text)),
        None => String::new(),
    }
}

// ------------------------------------------------------------------ layers 1 to 3

fn target(t: &Target, text: &str) -> String {
    match t {
        Target::Providers(ns, _) => match ns.as_slice() {
            [one] => format!("provider {}", one.name),
            many => format!("providers {}", names(many)),
        },
        Target::Models(ns, _) => match ns.as_slice() {
            [one] => format!("model {}", one.name),
            many => format!("models {}", names(many)),
        },
        Target::Where(e, _) => format!("models where {}", expr(e, text)),
    }
}

fn constraint(c: &Constraint, text: &str) -> String {
    let label = c
        .label
        .as_ref()
        .map(|l| format!("{}: ", l.name))
        .unwrap_or_default();
    let effect = match &c.effect {
        Effect::Deny(t) => format!("deny {}", target(t, text)),
        Effect::AllowOnly(t) => format!("allow only {}", target(t, text)),
        Effect::Require(e) => format!("require {}", expr(e, text)),
    };
    format!("{label}{effect}{}", when(&c.when, text))
}

fn classify_rule(r: &ClassifyRule, text: &str) -> String {
    match &r.when {
        Some(e) => format!("{} when {}", r.intent.name, expr(e, text)),
        None => format!("{} otherwise", r.intent.name),
    }
}

fn route_prop(p: &RoutePropKind, text: &str) -> String {
    match p {
        RoutePropKind::Candidates(ns) => format!("candidates {}", names(ns)),
        RoutePropKind::Score(terms) => {
            let mut s = String::from("score");
            for (i, t) in terms.iter().enumerate() {
                let term = format!("{} * {}", t.weight.text, t.signal.name);
                match (i, t.negative) {
                    (0, _) => s.push_str(&format!(" {term}")),
                    (_, true) => s.push_str(&format!(" - {term}")),
                    (_, false) => s.push_str(&format!(" + {term}")),
                }
            }
            s
        }
        RoutePropKind::PremiumOnly(e) => format!("premium only when {}", expr(e, text)),
        RoutePropKind::Fallback(items) => {
            let parts = items.iter().map(|i| match i {
                FallbackItem::Model(n) => n.name.clone(),
                FallbackItem::Route(n) => format!("route {}", n.name),
            });
            format!("fallback [{}]", join(parts))
        }
        RoutePropKind::Downgrade(ns) => format!("downgrade {}", names(ns)),
    }
}

// ------------------------------------------------------------------ layer 4

fn protect_rule(r: &ProtectRule) -> Node {
    let text = match &r.kind {
        ProtectKind::Retry { count, on, backoff } => {
            let mut s = format!("retry {}", count.text);
            if !on.is_empty() {
                s.push_str(&format!(" on {}", names(on)));
            }
            let tail = backoff
                .as_ref()
                .map(|(lo, hi)| format!(" backoff {}..{}", lo.text, hi.text))
                .unwrap_or_default();
            s.push_str(&tail);
            let head = format!("retry {} on [", count.text);
            return list_line(s, r.span, head, ident_items(on), ']', tail);
        }
        ProtectKind::Timeout { parts } => {
            let mut s = String::from("timeout");
            for (k, q) in parts {
                s.push_str(&format!(" {} {}", k.name, q.text));
            }
            s
        }
        ProtectKind::Breaker {
            scope,
            failures,
            window,
            cooldown,
        } => format!(
            "breaker per {} open after {} failures within {}, probe after {}",
            scope.name, failures.text, window.text, cooldown.text
        ),
        ProtectKind::Limit {
            kind,
            amount,
            scope,
        } => format!("limit {} {} per {}", kind.name, amount.text, scope.name),
        ProtectKind::Budget(b) => {
            let period = match &b.period {
                BudgetPeriod::Named(n) => n.name.clone(),
                BudgetPeriod::Every(q) => format!("every {}", q.text),
            };
            let scope = b
                .scope
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(" and ");
            let amount = match &b.amount {
                BudgetAmount::Money(q) => q.text.clone(),
                BudgetAmount::Attr(p) => format!("{}.{}", p.scope.as_str(), p.field.name),
            };
            let children = b
                .thresholds
                .iter()
                .map(|t| {
                    let action = if t.action.name == "confirm_premium" {
                        "confirm premium"
                    } else {
                        t.action.name.as_str()
                    };
                    line(format!("{action} at {}", t.at.text), t.span)
                })
                .collect();
            return Node::Block {
                header: format!("budget {period} per {scope} {amount}"),
                span: r.span,
                children,
            };
        }
    };
    line(text, r.span)
}

#[cfg(test)]
mod tests;
