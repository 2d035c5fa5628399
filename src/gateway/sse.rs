//! Server-sent events: an incremental parser (bytes in any chunking, events
//! out) and the few events the gateway writes itself.

use bytes::Bytes;

/// One event: its `event:` name (if any) and its joined `data:` lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub event: Option<String>,
    /// As the upstream sent them: kept as bytes because a passed-through
    /// stream only looks into a few events, and checking every one for
    /// UTF-8 was half the parser's work. A reader that wants text converts.
    pub data: Vec<u8>,
}

/// What one blank line ended: the event it completed, if the lines before it
/// made one (comments alone do not), and the offset in the fed chunk just
/// past the blank line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub event: Option<Event>,
    pub end: usize,
}

/// Feed it chunks as they arrive; it returns every event completed so far.
/// Lines may end in `\n`, `\r\n` or `\r`; a partial line waits for the next chunk.
#[derive(Debug)]
pub struct Parser {
    line: Vec<u8>,
    current: Event,
    has_data: bool,
    /// The last byte was `\r`, so a following `\n` belongs to the same line end.
    after_cr: bool,
    /// Bounds memory for hostile upstreams that never end a line, or never
    /// end an event: the longest line, and the most data an event keeps.
    max_line: usize,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            line: Vec::new(),
            current: Event::default(),
            has_data: false,
            after_cr: false,
            max_line: 4 * 1024 * 1024,
        }
    }
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        self.scan(chunk, |event, _| out.extend(event));
        out
    }

    /// Like [`Parser::feed`], but every blank line ends a [`Block`], with or
    /// without an event in it (a block of comments has none), and says where
    /// in `chunk` it ended: what a relay needs to pass on whole events only.
    pub fn feed_blocks(&mut self, chunk: &[u8]) -> Vec<Block> {
        let mut out = Vec::new();
        self.scan(chunk, |event, end| out.push(Block { event, end }));
        out
    }

    /// Calls `on_blank_line` with the event the blank line completed (if
    /// any) and the offset in `chunk` just past the blank line's end.
    fn scan(&mut self, chunk: &[u8], mut on_blank_line: impl FnMut(Option<Event>, usize)) {
        let mut rest = chunk;
        loop {
            if self.after_cr {
                if rest.is_empty() {
                    break;
                }
                self.after_cr = false;
                if let Some(after) = rest.strip_prefix(b"\n".as_slice()) {
                    rest = after;
                    continue;
                }
            }
            // Whole runs up to the next line end at once, not byte by byte.
            let Some(end) = memchr::memchr2(b'\n', b'\r', rest) else {
                self.extend_line(rest);
                break;
            };
            let (head, tail) = rest.split_at(end);
            self.extend_line(head);
            self.after_cr = tail.first() == Some(&b'\r');
            rest = tail.get(1..).unwrap_or_default();
            if self.line.is_empty() {
                // A `\r\n` whose `\n` is in this chunk ends here too; one
                // split between two chunks ends at its `\r`, and the `\n`
                // starts the next block (a line end either way).
                let mut after = chunk.len() - rest.len();
                if self.after_cr && rest.first() == Some(&b'\n') {
                    after += 1;
                }
                on_blank_line(self.blank_line(), after);
                continue;
            }
            // The line's buffer is kept for the next line.
            let mut line = std::mem::take(&mut self.line);
            self.line_done(&line);
            line.clear();
            self.line = line;
        }
    }
    /// Append to the current line, up to `max_line` bytes; the rest is dropped.
    fn extend_line(&mut self, bytes: &[u8]) {
        let room = self.max_line.saturating_sub(self.line.len());
        self.line
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
    }

    /// A blank line: the end of the event being read, if it has anything.
    fn blank_line(&mut self) -> Option<Event> {
        if self.has_data || self.current.event.is_some() {
            self.has_data = false;
            return Some(std::mem::take(&mut self.current));
        }
        None
    }

    /// A line that is not blank: a comment or a field.
    fn line_done(&mut self, line: &[u8]) {
        if line.first() == Some(&b':') {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => (
                line.get(..i).unwrap_or_default(),
                line.get(i + 1..).unwrap_or_default(),
            ),
            None => (line, &[][..]),
        };
        let value = value.strip_prefix(b" ".as_slice()).unwrap_or(value);
        match field {
            b"data" => {
                let room = self.max_line.saturating_sub(self.current.data.len());
                if self.has_data && room > 0 {
                    self.current.data.push(b'\n');
                }
                let room = self.max_line.saturating_sub(self.current.data.len());
                self.current
                    .data
                    .extend_from_slice(value.get(..room.min(value.len())).unwrap_or_default());
                self.has_data = true;
            }
            b"event" => self.current.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }
}

/// `data: <json>\n\n`
pub fn data(json: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// The event that ends a stream that failed after bytes reached the client:
/// OpenAI clients raise on an `error` object in a data line.
pub fn error_event(message: &str, code: &str) -> Bytes {
    data(
        &serde_json::json!({ "error": { "message": message, "type": "upstream_error", "code": code } }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_chunks(text: &str, size: usize) -> Vec<Event> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for c in text.as_bytes().chunks(size) {
            out.extend(p.feed(c));
        }
        out
    }

    #[test]
    fn any_chunking_gives_the_same_events() {
        let text = "event: message_start\ndata: {\"a\":1}\n\n: comment\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        let expect = vec![
            Event {
                event: Some("message_start".into()),
                data: b"{\"a\":1}".to_vec(),
            },
            Event {
                event: None,
                data: b"x\ny".to_vec(),
            },
            Event {
                event: None,
                data: b"[DONE]".to_vec(),
            },
        ];
        for size in 1..text.len() {
            assert_eq!(parse_in_chunks(text, size), expect, "chunk size {size}");
        }
    }

    #[test]
    fn an_event_that_never_ends_holds_bounded_data() {
        let mut p = Parser {
            max_line: 64,
            ..Parser::default()
        };
        for _ in 0..1000 {
            assert!(p.feed(b"data: 0123456789\n").is_empty());
        }
        assert!(p.current.data.len() <= 64, "{}", p.current.data.len());
        let events = p.feed(b"\n");
        assert_eq!(events.len(), 1);
        assert!(events[0].data.starts_with(b"0123456789\n0123456789"));
    }

    #[test]
    fn blocks_end_after_each_blank_line_in_any_chunking() {
        // `\r\n`, `\n` and `\r` line ends, a comment-only block, stray blank lines.
        let text = "data: a\r\n\r\n: keep-alive\n\ndata: b\r\rdata: c\n\n\ndata: cut";
        let whole_ends = [11, 25, 34, 43, 44];
        let mut p = Parser::new();
        let blocks = p.feed_blocks(text.as_bytes());
        assert_eq!(blocks.iter().map(|b| b.end).collect::<Vec<_>>(), whole_ends);
        let events = |bs: &[Block]| -> Vec<Option<Vec<u8>>> {
            bs.iter()
                .map(|b| b.event.as_ref().map(|e| e.data.clone()))
                .collect()
        };
        let expect = events(&blocks);
        assert_eq!(
            expect,
            vec![
                Some(b"a".to_vec()),
                None,
                Some(b"b".to_vec()),
                Some(b"c".to_vec()),
                None
            ]
        );
        for size in 1..text.len() {
            let mut p = Parser::new();
            let mut got = Vec::new();
            for (i, c) in text.as_bytes().chunks(size).enumerate() {
                got.extend(p.feed_blocks(c).into_iter().map(|b| Block {
                    end: b.end + i * size,
                    ..b
                }));
            }
            assert_eq!(events(&got), expect, "chunk size {size}");
            for (b, want) in got.iter().zip(whole_ends) {
                // A `\r\n` split between two chunks ends its block at the `\r`.
                let split_crlf = b.end + 1 == want && b.end % size == 0;
                assert!(b.end == want || split_crlf, "chunk size {size}: {got:?}");
            }
        }
    }

    #[test]
    fn an_unfinished_event_is_not_emitted() {
        assert_eq!(parse_in_chunks("data: {\"cut", 4), vec![]);
    }
}
