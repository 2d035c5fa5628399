//! Conversions between our byte offsets and LSP positions, and between our
//! diagnostics and LSP's.

use lsp_types as lsp;

use crate::diag::{Diagnostic, Severity};
use crate::source::{SourceFile, Span};

/// How the client counts columns: UTF-8 bytes if it said it can, else UTF-16 units (LSP's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    Utf16,
}

pub fn position(file: &SourceFile, offset: usize, enc: Encoding) -> lsp::Position {
    let (line, _) = file.line_col(offset);
    let line_text = file.line_text(line);
    let line_start = file.line_start(line);
    let in_line = offset.saturating_sub(line_start).min(line_text.len());
    let prefix = line_text.get(..in_line).unwrap_or(line_text);
    let character = match enc {
        Encoding::Utf8 => prefix.len(),
        Encoding::Utf16 => prefix.encode_utf16().count(),
    };
    lsp::Position {
        line: to_u32(line.saturating_sub(1)),
        character: to_u32(character),
    }
}

pub fn range(file: &SourceFile, span: Span, enc: Encoding) -> lsp::Range {
    lsp::Range {
        start: position(file, span.start(), enc),
        end: position(file, span.end(), enc),
    }
}

/// The byte offset of an LSP position; positions past the end clamp to it.
pub fn offset(file: &SourceFile, pos: lsp::Position, enc: Encoding) -> usize {
    let line = pos.line as usize + 1;
    let start = file.line_start(line);
    if start >= file.text.len() && line > 1 {
        return file.text.len();
    }
    let text = file.line_text(line);
    let mut units = 0usize;
    for (i, ch) in text.char_indices() {
        if units >= pos.character as usize {
            return start + i;
        }
        units += match enc {
            Encoding::Utf8 => ch.len_utf8(),
            Encoding::Utf16 => ch.len_utf16(),
        };
    }
    start + text.len()
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Our diagnostic as LSP's, for `file`. Labels in other files become related information.
pub fn diagnostic<'a>(
    d: &Diagnostic,
    file: &SourceFile,
    enc: Encoding,
    uri_of: &dyn Fn(crate::source::FileId) -> Option<(lsp::Uri, &'a SourceFile)>,
) -> Option<lsp::Diagnostic> {
    let span = d.span()?;
    let mut related = Vec::new();
    for l in d.labels.iter().filter(|l| !l.primary) {
        if let Some((uri, f)) = uri_of(l.span.file) {
            related.push(lsp::DiagnosticRelatedInformation {
                location: lsp::Location {
                    uri,
                    range: range(f, l.span, enc),
                },
                message: l.message.clone(),
            });
        }
    }
    let mut message = d.message.clone();
    if let Some(help) = &d.help {
        message.push_str("\nhelp: ");
        message.push_str(help);
    }
    Some(lsp::Diagnostic {
        range: range(file, span, enc),
        severity: Some(match d.severity {
            Severity::Error => lsp::DiagnosticSeverity::ERROR,
            Severity::Warning => lsp::DiagnosticSeverity::WARNING,
        }),
        code: Some(lsp::NumberOrString::String(d.code.clone())),
        source: Some("routeplane".into()),
        message,
        related_information: (!related.is_empty()).then_some(related),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_in_both_encodings() {
        let f = SourceFile::new("a", "ab\n// é😀 x\nlast");
        for enc in [Encoding::Utf8, Encoding::Utf16] {
            for off in [0, 1, 3, 6, 8, 12, f.text.len()] {
                if !f.text.is_char_boundary(off) {
                    continue;
                }
                assert_eq!(
                    offset(&f, position(&f, off, enc), enc),
                    off,
                    "{enc:?} {off}"
                );
            }
        }
        let x = f.text.find('x').unwrap();
        assert_eq!(
            position(&f, x, Encoding::Utf16),
            lsp::Position {
                line: 1,
                character: 7
            }
        );
        assert_eq!(
            position(&f, x, Encoding::Utf8),
            lsp::Position {
                line: 1,
                character: 10
            }
        );
        // A lone `\r` (old Mac) is a line break, as the protocol says.
        let mac = SourceFile::new("a", "ab\rcd\r\nef");
        let e = mac.text.find('e').unwrap();
        assert_eq!(
            position(&mac, e, Encoding::Utf16),
            lsp::Position {
                line: 2,
                character: 0
            }
        );
        assert_eq!(
            offset(&mac, position(&mac, 4, Encoding::Utf8), Encoding::Utf8),
            4
        );
        // Out-of-range positions clamp instead of panicking.
        assert_eq!(
            offset(
                &f,
                lsp::Position {
                    line: 99,
                    character: 5
                },
                Encoding::Utf16
            ),
            f.text.len()
        );
    }
}
