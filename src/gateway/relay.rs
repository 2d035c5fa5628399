//! What of an upstream's stream reaches the client, and what the gateway
//! reads from it on the way (`[DONE]`, the usage, the text).
//!
//! Only whole events are passed on: the bytes after the last blank line wait
//! for the rest of their event. So when the upstream fails in the middle of
//! an event, the half event is dropped and the client's next bytes are the
//! gateway's own error event, not JSON glued to a fragment. A chunk that ends
//! on a blank line (the usual case) is passed on as it is, without a copy.
//!
//! Nothing goes on before the first token: the first event that carries
//! anything (content, a tool call, a refusal, a finish reason, usage,
//! `[DONE]`). An error event before it fails the attempt, so dispatch tries
//! the next model: nothing reached the client yet. Comments (`: keep-alive`)
//! and chunks with only a role or an empty content are held until then and
//! go on first, in order. So an
//! upstream that sends a keep-alive or a role chunk and then stalls still
//! meets the first-token timeout, and dispatch falls back with nothing sent
//! to the client.
//!
//! A usage-only event (no `choices`, or none, and a `usage`) reaches the
//! client only when it asked for one (`stream_options.include_usage: true`).
//! The gateway asks every upstream for usage to settle the cost, and the
//! Anthropic translation and the mock always report it; a client that did
//! not ask would otherwise get a chunk whose empty `choices` breaks the
//! usual `chunk.choices[0]`. An event with content and usage goes on whole.

use std::ops::Range;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use super::providers::{AttemptError, Usage};
use super::sse;

/// The longest event a relay waits for. An upstream that never ends its
/// event would otherwise grow the wait without bound; the parser's own line
/// limit is the same.
const MAX_PARTIAL_EVENT: usize = 4 * 1024 * 1024;

/// The most an upstream may send before its first token: comments and
/// role chunks are a few dozen bytes each.
const MAX_BEFORE_FIRST_TOKEN: usize = 1024 * 1024;

/// One stream's relay: fed the upstream's chunks, it returns what may go to
/// the client now.
#[derive(Default)]
pub struct Relay {
    parser: sse::Parser,
    tracker: Tracker,
    /// The bytes after the last blank line: an event not complete yet.
    partial: BytesMut,
    /// The client asked for the usage chunk.
    usage_to_client: bool,
    /// The first token was read: from now on whole events go on at once.
    started: bool,
    /// What came before the first token, held until it comes.
    held: BytesMut,
}

impl Relay {
    /// `collect`: keep the streamed text, to count the output when no usage
    /// comes. `usage_to_client`: the client asked for the usage chunk.
    pub fn new(collect: bool, usage_to_client: bool) -> Relay {
        Relay {
            tracker: Tracker {
                collect,
                ..Tracker::default()
            },
            usage_to_client,
            ..Relay::default()
        }
    }

    /// Take one chunk of the upstream's stream; return the bytes that may go
    /// to the client now (possibly none): every block up to the chunk's last
    /// blank line, after what was waiting from earlier chunks. Once `[DONE]`
    /// is read the stream is complete, and everything left is returned as
    /// the upstream sent it. `Err`: an event longer than any real one.
    pub fn push(&mut self, chunk: Bytes) -> Result<Bytes, AttemptError> {
        // What of `partial` + `chunk[..whole]` goes on: `partial` belongs to
        // the chunk's first block; `kept` are ranges of `chunk`, merged when
        // they touch, so a chunk with nothing left out is one range.
        let mut whole: Option<usize> = None;
        let mut keep_partial = true;
        let mut kept: SmallVec<[Range<usize>; 2]> = SmallVec::new();
        for block in self.parser.feed_blocks(&chunk) {
            let start = whole.unwrap_or(0);
            let seen = match block.event {
                Some(event) => {
                    if !self.started {
                        match first_token(&event.data) {
                            First::Held => {}
                            First::Token => self.started = true,
                            // Nothing went to the client yet: a broken stream
                            // (an HTML page behind an event-stream header)
                            // fails the attempt, and the next model is tried.
                            First::NotJson => {
                                return Err(AttemptError::Protocol(
                                    "the upstream's stream does not carry JSON events".into(),
                                ))
                            }
                            // The same for a stream that opens with an error
                            // (an overload): passed on, the client got a 200
                            // that held nothing but the upstream's error.
                            First::Error => {
                                return Err(AttemptError::Protocol(format!(
                                    "the upstream's stream began with an error: {}",
                                    error_message(&event.data)
                                )))
                            }
                        }
                    }
                    self.tracker.event(event)
                }
                None => Seen::Other,
            };
            whole = Some(block.end);
            if seen == Seen::UsageOnly && !self.usage_to_client {
                if start == 0 {
                    keep_partial = false;
                }
            } else {
                match kept.last_mut() {
                    Some(last) if last.end == start => last.end = block.end,
                    _ => kept.push(start..block.end),
                }
            }
            if self.tracker.done {
                // Nothing after `[DONE]` is read: the rest goes on as sent.
                if let Some(last) = kept.last_mut() {
                    last.end = chunk.len();
                }
                break;
            }
        }
        let Some(whole) = whole.map(|w| w.min(chunk.len())) else {
            self.partial.extend_from_slice(&chunk);
            if self.partial.len() > MAX_PARTIAL_EVENT {
                return Err(AttemptError::Protocol(format!(
                    "the upstream sent an event longer than {MAX_PARTIAL_EVENT} bytes"
                )));
            }
            return Ok(Bytes::new());
        };
        let before = std::mem::take(&mut self.partial);
        let out = match (keep_partial && !before.is_empty(), kept.as_slice()) {
            (false, []) => Bytes::new(),
            (false, [only]) => chunk.slice(only.start.min(chunk.len())..only.end.min(chunk.len())),
            (true, _) | (false, [_, _, ..]) => {
                let mut out = if keep_partial {
                    before
                } else {
                    BytesMut::new()
                };
                for r in &kept {
                    out.extend_from_slice(chunk.get(r.clone()).unwrap_or_default());
                }
                out.freeze()
            }
        };
        if !self.tracker.done {
            self.partial
                .extend_from_slice(chunk.get(whole..).unwrap_or_default());
        }
        if self.started && self.held.is_empty() {
            return Ok(out);
        }
        self.held.extend_from_slice(&out);
        if self.started {
            return Ok(std::mem::take(&mut self.held).freeze());
        }
        if self.held.len() > MAX_BEFORE_FIRST_TOKEN {
            return Err(AttemptError::Protocol(format!(
                "the upstream sent more than {MAX_BEFORE_FIRST_TOKEN} bytes before its first token"
            )));
        }
        Ok(Bytes::new())
    }

    /// The first token was read (see the module's docs): what
    /// [`Relay::push`] returned so far is what may go to the client.
    pub fn started(&self) -> bool {
        self.started
    }

    /// `[DONE]` was read: the stream is complete.
    pub fn done(&self) -> bool {
        self.tracker.done
    }

    /// The usage the upstream reported, if it did.
    pub fn usage(&self) -> Option<Usage> {
        self.tracker.usage
    }

    /// The text streamed so far (collected only when asked at [`Relay::new`]).
    pub fn text(&mut self) -> &str {
        self.tracker.text()
    }
}

/// Watches a passed-through stream: did it finish (`[DONE]`), what usage did it report.
#[derive(Default)]
struct Tracker {
    done: bool,
    usage: Option<Usage>,
    /// Keep the streamed text, to count the output when no usage comes.
    collect: bool,
    /// Content chunks not read yet: most streams end with their usage, and
    /// then the chunks never need parsing.
    deltas: Vec<Vec<u8>>,
    deltas_bytes: usize,
    text: String,
}

/// Past this many bytes of unread content chunks, they are read into text
/// (a few bytes each instead of a whole chunk), so a long stream without
/// usage holds little memory.
const MAX_UNREAD_DELTAS: usize = 256 * 1024;

/// The keys a tracker looks for in each event, with their searchers built
/// once (building one per search cost more than the search).
static USAGE_KEY: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
static CONTENT_KEY: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"content\""));
static CONTENT_STARTS: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"content\":\""));

/// What a tracker saw in one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// Usage and no choices: the final chunk `include_usage` asks for.
    UsageOnly,
    Other,
}

impl Tracker {
    fn event(&mut self, e: sse::Event) -> Seen {
        if e.data == b"[DONE]" {
            self.done = true;
            return Seen::Other;
        }
        // Some APIs send `"usage": null` in every chunk and the counts in the last.
        if USAGE_KEY.find(&e.data).is_some() {
            // Lossy, as the text readers are: one bad byte elsewhere in
            // the chunk must not lose the counts.
            let text = String::from_utf8_lossy(&e.data);
            if let Ok((Some(u), has_choices)) = Usage::from_openai_chunk(text.as_bytes()) {
                self.usage = Some(u);
                return if has_choices {
                    Seen::Other
                } else {
                    Seen::UsageOnly
                };
            }
        }
        if self.collect && self.usage.is_none() && CONTENT_KEY.find(&e.data).is_some() {
            self.deltas_bytes += e.data.len();
            self.deltas.push(e.data);
            if self.deltas_bytes > MAX_UNREAD_DELTAS {
                self.read_deltas();
            }
        }
        Seen::Other
    }

    fn read_deltas(&mut self) {
        for d in self.deltas.drain(..) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&String::from_utf8_lossy(&d)) {
                crate::estimate::push_delta_text(&v, &mut self.text);
            }
        }
        self.deltas_bytes = 0;
    }

    /// The text streamed so far.
    fn text(&mut self) -> &str {
        self.read_deltas();
        &self.text
    }
}

/// An event that carries nothing yet: a chat completion chunk whose choices
/// (if any) have only a role, and otherwise empty values (`""`, `null`,
/// `[]`, `{}`): OpenAI's first chunk (`"role":"assistant","content":""`,
/// `"refusal":null`), Anthropic's translated `message_start`, Azure's
/// `choices: []` with the prompt's filter results. An `error` event (with
/// no text) is the upstream failing before it answered. Anything else that
/// is JSON, and `[DONE]`, is a first token; an event that is not JSON is a
/// broken stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum First {
    Held,
    Token,
    NotJson,
    Error,
}

/// What an error event says, short and without anything key-like.
fn error_message(data: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(data).unwrap_or_default();
    let error = v.get("error").unwrap_or(&v);
    let message = error
        .get("message")
        .and_then(serde_json::Value::as_str)
        .map_or_else(|| error.to_string(), str::to_string);
    crate::decision_log::redact(&message.chars().take(200).collect::<String>())
}

/// `"content":"` and then anything but the closing quote: text.
fn carries_text(data: &[u8]) -> bool {
    CONTENT_STARTS
        .find_iter(data)
        .any(|at| data.get(at + CONTENT_STARTS.needle().len()) != Some(&b'"'))
}

fn first_token(data: &[u8]) -> First {
    use serde_json::Value;
    // Most events carry text: `"content":"` and then anything but the
    // closing quote. Such an event is a first token whatever else it holds,
    // and saying so needs no parse (a spelling with spaces takes the parse).
    if data == b"[DONE]" || carries_text(data) {
        return First::Token;
    }
    fn nothing(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::Bool(_) | Value::Number(_) => false,
        }
    }
    fn empty_choice(c: &Value) -> bool {
        let Value::Object(c) = c else { return false };
        c.iter().all(|(k, v)| match k.as_str() {
            "index" => true,
            "delta" => match v {
                Value::Object(d) => d.iter().all(|(k, v)| k == "role" || nothing(v)),
                _ => nothing(v),
            },
            _ => nothing(v),
        })
    }
    let chunk = match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(chunk)) => chunk,
        Ok(_) => return First::Token,
        Err(_) => return First::NotJson,
    };
    let carries = |key: &str| chunk.get(key).is_some_and(|v| !nothing(v));
    if carries("error") {
        return First::Error;
    }
    if carries("usage") {
        return First::Token;
    }
    match chunk.get("choices") {
        Some(Value::Array(choices)) if choices.iter().all(empty_choice) => First::Held,
        _ => First::Token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str, usage: &str) -> String {
        format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{content}\"}}}}],\"usage\":{usage}}}\n\n"
        )
    }

    /// What the client gets when `text` arrives in chunks of `size` bytes.
    fn relayed(text: &str, size: usize) -> (String, Relay) {
        relayed_to(Relay::new(false, true), text, size)
    }

    fn relayed_to(mut r: Relay, text: &str, size: usize) -> (String, Relay) {
        let mut out = String::new();
        for c in text.as_bytes().chunks(size) {
            let b = r.push(Bytes::copy_from_slice(c)).unwrap();
            out.push_str(std::str::from_utf8(&b).unwrap());
        }
        (out, r)
    }

    #[test]
    fn a_tracker_reads_usage_and_keeps_the_text_for_when_none_comes() {
        let mut r = Relay::new(true, true);
        r.push(Bytes::from(chunk("Hel", "null"))).unwrap();
        r.push(Bytes::from(chunk("lo", "null"))).unwrap();
        r.push(Bytes::from_static(b"data: [DONE]\n\n")).unwrap();
        assert!(r.done());
        assert_eq!(r.usage(), None);
        assert_eq!(r.text(), "Hello");

        let mut r = Relay::new(true, true);
        r.push(Bytes::from(chunk("Hi", "null"))).unwrap();
        r.push(Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
        ))
        .unwrap();
        assert_eq!(
            r.usage(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 1
            })
        );

        // A long stream without usage keeps text, not whole chunks.
        let mut r = Relay::new(true, true);
        for _ in 0..5_000 {
            r.push(Bytes::from(chunk("ab", "null"))).unwrap();
        }
        assert!(r.tracker.deltas_bytes <= MAX_UNREAD_DELTAS);
        assert_eq!(r.text().len(), 10_000);
    }

    #[test]
    fn only_whole_events_are_passed_on_in_any_chunking() {
        let events = [
            "data: {\"a\":1}\n\n",
            ": keep-alive\n\n",
            "data: {\"b\":\r\ndata: 2}\r\n\r\n",
            "event: x\ndata: {\"c\":3}\n\n",
        ];
        let text = format!("{}data: {{\"trunc", events.concat());
        for size in 1..=text.len() {
            let (out, r) = relayed(&text, size);
            // Every event whole, nothing of the cut one.
            assert_eq!(out, events.concat(), "chunk size {size}");
            assert!(!r.done());
        }
    }

    #[test]
    fn a_chunk_ending_on_a_blank_line_is_passed_on_without_a_copy() {
        let mut r = Relay::new(false, true);
        let chunk = Bytes::from(chunk("x", "null"));
        let out = r.push(chunk.clone()).unwrap();
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(out.len(), chunk.len());
    }

    #[test]
    fn after_done_everything_left_is_passed_on_as_sent() {
        let text = "data: {\"a\":1}\n\ndata: [DONE]\n\n\n";
        for size in 1..=text.len() {
            let (out, r) = relayed(text, size);
            assert!(r.done(), "chunk size {size}");
            assert_eq!(out, text, "chunk size {size}");
        }
    }

    #[test]
    fn a_usage_only_event_reaches_only_a_client_that_asked() {
        let usage_only =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        let no_choices = "data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        let with_content = chunk("!", "{\"prompt_tokens\":3,\"completion_tokens\":1}");
        let first = chunk("Hi", "null");
        let done = "data: [DONE]\n\n";
        let want = Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 1,
        });
        for (last, dropped) in [
            (usage_only, true),
            (no_choices, true),
            (with_content.as_str(), false),
        ] {
            let text = format!("{first}{last}{done}");
            for size in 1..=text.len() {
                let (out, r) = relayed_to(Relay::new(false, false), &text, size);
                let expect = if dropped {
                    format!("{first}{done}")
                } else {
                    text.clone()
                };
                assert_eq!(out, expect, "chunk size {size}");
                // The gateway still read the usage it settles with.
                assert_eq!(r.usage(), want);
                let (out, _) = relayed_to(Relay::new(false, true), &text, size);
                assert_eq!(out, text, "chunk size {size}, asked");
            }
        }
        // One that is first in its chunk, after a partial event of the
        // previous chunk, takes that partial with it.
        let mut r = Relay::new(false, false);
        let (head, tail) = usage_only.split_at(10);
        assert_eq!(r.push(Bytes::from(first.clone())).unwrap(), first);
        assert!(r
            .push(Bytes::copy_from_slice(head.as_bytes()))
            .unwrap()
            .is_empty());
        let out = r.push(Bytes::from(format!("{tail}{done}"))).unwrap();
        assert_eq!(out, done);
    }

    #[test]
    fn the_first_token_is_the_first_event_that_carries_something() {
        for (data, before) in [
            (
                r#"{"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}"#,
                First::Held,
            ),
            (
                r#"{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
                First::Held,
            ),
            (
                r#"{"choices":[],"prompt_filter_results":[{"prompt_index":0}]}"#,
                First::Held,
            ),
            (
                r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
                First::Token,
            ),
            (
                r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f"}}]}}]}"#,
                First::Token,
            ),
            (
                r#"{"choices":[{"index":0,"delta":{"refusal":"no"}}]}"#,
                First::Token,
            ),
            (
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
                First::Token,
            ),
            (
                r#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
                First::Token,
            ),
            (r#"{"error":{"message":"overloaded"}}"#, First::Error),
            (
                r#"{"error":null,"choices":[{"delta":{"content":"a"}}]}"#,
                First::Token,
            ),
            (
                r#"{"choices":[{"delta":{"content":"a"}}],"error":{"message":"x"}}"#,
                First::Token,
            ),
            (r#"{"id":"x"}"#, First::Token),
            ("[DONE]", First::Token),
            ("not json", First::NotJson),
            ("<html>Bad Gateway</html>", First::NotJson),
        ] {
            assert_eq!(first_token(data.as_bytes()), before, "{data}");
        }
    }

    #[test]
    fn what_comes_before_the_first_token_is_held_then_passed_on_first() {
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        let keep_alive = ": keep-alive\n\n";
        let first = chunk("Hi", "null");
        let text = format!("{keep_alive}{role}{first}");
        for size in 1..=text.len() {
            let mut r = Relay::new(false, true);
            let mut out = String::new();
            for c in text.as_bytes().chunks(size) {
                let b = r.push(Bytes::copy_from_slice(c)).unwrap();
                // Nothing goes on before the first token.
                assert!(r.started() || b.is_empty(), "chunk size {size}");
                out.push_str(std::str::from_utf8(&b).unwrap());
            }
            assert!(r.started());
            assert_eq!(out, text, "chunk size {size}");
        }
        let mut r = Relay::new(false, true);
        assert!(r
            .push(Bytes::from(format!("{keep_alive}{role}")))
            .unwrap()
            .is_empty());
        assert!(!r.started());
        // An upstream that never gets to its first token cannot fill memory.
        let comments = Bytes::from(": x\n\n".repeat(64 * 1024));
        assert!((0..8).any(|_| r.push(comments.clone()).is_err()));
    }

    #[test]
    fn an_event_that_never_ends_fails_the_stream_with_bounded_memory() {
        let mut r = Relay::new(false, true);
        r.push(Bytes::from_static(b"data: {\"a\":")).unwrap();
        let big = Bytes::from(vec![b'x'; 1024 * 1024]);
        let mut failed = false;
        for _ in 0..8 {
            if r.push(big.clone()).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        assert!(r.partial.len() <= MAX_PARTIAL_EVENT + big.len());
    }
}
