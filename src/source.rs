//! Source files, file ids and spans.
//!
//! The core never reads files: callers hand it `(name, text)` pairs as a
//! [`Sources`] set, so the CLI, the gateway and the language server all run the
//! same analysis over the same inputs.

use std::fmt;

/// Index of a file inside a [`Sources`] set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize)]
pub struct FileId(pub u32);

/// A byte range in one source file.
///
/// Spans are ignored by equality and hashing so that two trees that differ only
/// in layout compare equal (the formatter's round-trip test relies on this).
/// Use [`Span::same_as`] to compare locations.
#[derive(Clone, Copy, Default, serde::Serialize)]
pub struct Span {
    pub file: FileId,
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(file: FileId, start: usize, end: usize) -> Self {
        Span {
            file,
            start: clamp_u32(start),
            end: clamp_u32(end.max(start)),
        }
    }
    pub fn start(&self) -> usize {
        self.start as usize
    }
    pub fn end(&self) -> usize {
        self.end as usize
    }
    pub fn len(&self) -> usize {
        self.end().saturating_sub(self.start())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The smallest span covering both (same file assumed; `self`'s file wins).
    pub fn to(&self, other: Span) -> Span {
        Span {
            file: self.file,
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
    /// Location equality, which `==` deliberately ignores.
    pub fn same_as(&self, other: &Span) -> bool {
        self.file == other.file && self.start == other.start && self.end == other.end
    }
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl PartialEq for Span {
    fn eq(&self, _: &Span) -> bool {
        true
    }
}
impl Eq for Span {}
impl std::hash::Hash for Span {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}
impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}..{}", self.file.0, self.start, self.end)
    }
}

/// A UTF-8 byte-order mark, which some Windows editors write first.
pub const BOM: char = '\u{feff}';

/// The line breaks of a text, as `(start, end)` byte ranges: `\r\n`, `\n`
/// and a lone `\r` (old Mac files) are each one break, as for the grammar
/// (pest's `NEWLINE`) and the language server protocol. Every line number
/// and column shown anywhere (human, JSON, GitHub and SARIF reports, the
/// language server, `// allow` comments, the formatter) comes from here, so
/// they all agree.
pub fn line_breaks(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().filter_map(move |(i, &b)| match b {
        b'\n' if i > 0 && bytes.get(i - 1) == Some(&b'\r') => None,
        b'\n' => Some((i, i + 1)),
        b'\r' if bytes.get(i + 1) == Some(&b'\n') => Some((i, i + 2)),
        b'\r' => Some((i, i + 1)),
        _ => None,
    })
}

/// One source file: a display name (usually a path) and its text.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
    /// Where the first bytes that were not UTF-8 were replaced by U+FFFD
    /// (a byte offset in `text`), for a file read with [`Sources::add_bytes`].
    pub invalid_utf8: Option<usize>,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        let text = text.into();
        let mut line_starts = vec![0];
        line_starts.extend(line_breaks(&text).map(|(_, end)| end));
        SourceFile {
            name: name.into(),
            text,
            invalid_utf8: None,
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let mut start = self.line_starts.get(line).copied().unwrap_or(0);
        if line == 0 && self.text.starts_with(BOM) && offset >= BOM.len_utf8() {
            // The byte-order mark the parser skips; editors do not show it.
            start = BOM.len_utf8();
        }
        let col = self
            .text
            .get(start..offset)
            .map_or(0, |s| s.chars().count());
        (line + 1, col + 1)
    }

    /// The byte offset where a 1-based line starts; the end of the text for
    /// a line past the last.
    pub fn line_start(&self, line: usize) -> usize {
        self.line_starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(self.text.len())
    }

    /// The text of a 1-based line, without its line break.
    pub fn line_text(&self, line: usize) -> &str {
        let Some(&start) = self.line_starts.get(line.saturating_sub(1)) else {
            return "";
        };
        let end = self
            .line_starts
            .get(line)
            .copied()
            .unwrap_or(self.text.len());
        self.text
            .get(start..end)
            .unwrap_or("")
            .trim_end_matches(['\n', '\r'])
    }

    /// The text under a span, or "" if the span does not fit this file.
    pub fn slice(&self, span: Span) -> &str {
        self.text.get(span.start()..span.end()).unwrap_or("")
    }
}

/// The files that make up one policy.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    files: Vec<SourceFile>,
}

impl Sources {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> FileId {
        let id = FileId(clamp_u32(self.files.len()));
        self.files.push(SourceFile::new(name, text));
        id
    }
    /// Add a file read from disk. Bytes that are not UTF-8 are replaced by
    /// U+FFFD, and where the first was is kept for a diagnostic.
    pub fn add_bytes(&mut self, name: impl Into<String>, bytes: &[u8]) -> FileId {
        let invalid = std::str::from_utf8(bytes).err().map(|e| e.valid_up_to());
        let id = self.add(name, String::from_utf8_lossy(bytes).into_owned());
        if let Some(f) = self.files.last_mut() {
            f.invalid_utf8 = invalid;
        }
        id
    }
    pub fn get(&self, id: FileId) -> Option<&SourceFile> {
        self.files.get(id.0 as usize)
    }
    pub fn iter(&self) -> impl Iterator<Item = (FileId, &SourceFile)> {
        self.files
            .iter()
            .enumerate()
            .map(|(i, f)| (FileId(clamp_u32(i)), f))
    }
    pub fn len(&self) -> usize {
        self.files.len()
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
    /// `file:line:col` of the start of a span.
    pub fn location(&self, span: Span) -> String {
        match self.get(span.file) {
            Some(f) => {
                let (l, c) = f.line_col(span.start());
                format!("{}:{}:{}", f.name, l, c)
            }
            None => "<unknown>".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let f = SourceFile::new("a.route", "ab\ncd\n");
        assert_eq!(f.line_col(0), (1, 1));
        assert_eq!(f.line_col(3), (2, 1));
        assert_eq!(f.line_col(4), (2, 2));
        assert_eq!(f.line_text(2), "cd");
        assert_eq!(f.line_text(9), "");
    }

    #[test]
    fn every_kind_of_line_break_counts_once() {
        // `\r\n`, `\n` and a lone `\r` (old Mac) are one break each; a lone
        // `\r` was no break here while miette counted it, so the human
        // report and JSON gave different lines.
        let f = SourceFile::new("a.route", "a\r\nb\nc\rd\r\re");
        let lines: Vec<(usize, usize)> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|w| f.line_col(f.text.find(w).unwrap()))
            .collect();
        assert_eq!(lines, [(1, 1), (2, 1), (3, 1), (4, 1), (6, 1)]);
        assert_eq!(f.line_text(3), "c");
        assert_eq!(f.line_text(5), "");
        assert_eq!(f.line_start(6), f.text.find('e').unwrap());
        assert_eq!(f.line_start(7), f.text.len());
        // The `\n` of a `\r\n` is not a line of its own, even at the start.
        assert_eq!(line_breaks("\n\r\n").collect::<Vec<_>>(), [(0, 1), (1, 3)]);
    }

    #[test]
    fn spans_compare_equal_regardless_of_location() {
        let a = Span::new(FileId(0), 1, 2);
        let b = Span::new(FileId(1), 5, 9);
        assert_eq!(a, b);
        assert!(!a.same_as(&b));
    }
}
