//! Server-sent events: an incremental parser (bytes in any chunking, events
//! out) and the few events the gateway writes itself.

use bytes::Bytes;

/// One event: its `event:` name (if any) and its joined `data:` lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub event: Option<String>,
    pub data: String,
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
    /// Bounds memory for hostile upstreams that never end a line.
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
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    // The line's buffer is kept for the next line.
                    let mut line = std::mem::take(&mut self.line);
                    self.line_done(&line, &mut out);
                    line.clear();
                    self.line = line;
                }
                _ => {
                    if self.line.len() < self.max_line {
                        self.line.push(b);
                    }
                }
            }
        }
        out
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            if self.has_data || self.current.event.is_some() {
                out.push(std::mem::take(&mut self.current));
                self.has_data = false;
            }
            return;
        }
        if line.first() == Some(&b':') {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
            None => (text.to_string(), String::new()),
        };
        match field.as_str() {
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(&value);
                self.has_data = true;
            }
            "event" => self.current.event = Some(value),
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
                data: "{\"a\":1}".into(),
            },
            Event {
                event: None,
                data: "x\ny".into(),
            },
            Event {
                event: None,
                data: "[DONE]".into(),
            },
        ];
        for size in 1..text.len() {
            assert_eq!(parse_in_chunks(text, size), expect, "chunk size {size}");
        }
    }

    #[test]
    fn an_unfinished_event_is_not_emitted() {
        assert_eq!(parse_in_chunks("data: {\"cut", 4), vec![]);
    }
}
