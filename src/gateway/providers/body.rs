//! The client's JSON body, kept two ways: parsed, for the fields the gateway
//! reads, and as the bytes the client sent, for forwarding.
//!
//! A provider that forwards the body (OpenAI-compatible ones) sends the
//! client's bytes with only the `model` value replaced, so every other field
//! reaches the upstream exactly as sent: key order, the spelling of numbers
//! (a `seed` above 2^64 stays exact instead of becoming a float), escapes.
//! Splicing is also cheaper than writing a JSON tree back out.
//!
//! Forwarding bytes makes one thing the tree hid matter: a key sent twice in
//! one object. serde_json keeps the last, and the gateway decides on it (the
//! model, the prompt a data rule reads, the size a budget reserves for), while
//! an upstream that keeps the first would act on the other. So a duplicate
//! key anywhere in the body is a 400 naming it.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde_json::Value;

#[derive(Clone, Debug)]
pub struct JsonBody {
    value: Value,
    raw: Bytes,
    /// Where `model` and `stream_options` sit in `raw`.
    layout: Layout,
    /// The client itself asked for a stream's usage chunk
    /// (`stream_options.include_usage: true`), whatever the gateway adds.
    client_asked_usage: bool,
}

impl JsonBody {
    /// `raw` and the `value` parsed from it. `Err`: a message for the client
    /// (a key appears twice in one object, or the body is not an object).
    pub fn new(raw: Bytes, value: Value) -> Result<JsonBody, String> {
        let layout = Layout::of(&raw)?;
        // Every member of every object is a `:` outside strings; the tree
        // keeps one per distinct key. Fewer in the tree: a duplicate.
        if layout.members != members_in(&value) {
            return Err(duplicate_key(&raw));
        }
        let client_asked_usage = value
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            == Some(&Value::Bool(true));
        Ok(JsonBody {
            value,
            raw,
            layout,
            client_asked_usage,
        })
    }

    /// The parsed body.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The bytes as the client sent them (after [`JsonBody::ask_stream_usage`], if called).
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The body with `model` set to `model`, everything else byte for byte.
    pub fn with_model(&self, model: &str) -> Bytes {
        let value = serde_json::to_vec(model).unwrap_or_default();
        Bytes::from(self.spliced("model", self.layout.model.as_ref(), &value))
    }

    /// The client asked for a stream's final usage chunk
    /// (`stream_options.include_usage: true`). Still what the client sent
    /// after [`JsonBody::ask_stream_usage`]: a client that did not ask must
    /// not get the chunk the gateway asked for (code that reads
    /// `chunk.choices[0]` fails on its empty `choices`).
    pub fn client_asked_usage(&self) -> bool {
        self.client_asked_usage
    }

    /// Make a streamed chat completion report its usage in a final chunk
    /// (`stream_options.include_usage`), which settling a budget needs. The
    /// client's other stream options are kept; [`JsonBody::client_asked_usage`]
    /// still says what the client asked.
    pub fn ask_stream_usage(&mut self) {
        const ASK: &[u8] = br#"{"include_usage":true}"#;
        let Some(at) = &self.layout.stream_options else {
            // The usual case, on every streamed request: add the member in
            // front; everything after it moves by what was added.
            let raw = self.spliced("stream_options", None, ASK);
            let added = raw.len().saturating_sub(self.raw.len());
            let layout = &mut self.layout;
            let value_at = layout.members_at + br#""stream_options":"#.len();
            layout.model = layout.model.take().map(|m| m.start + added..m.end + added);
            layout.stream_options = Some(value_at..value_at + ASK.len());
            layout.has_members = true;
            self.raw = Bytes::from(raw);
            if let Value::Object(o) = &mut self.value {
                o.insert(
                    "stream_options".into(),
                    serde_json::json!({ "include_usage": true }),
                );
            }
            return;
        };
        let mut options = match self.value.get("stream_options") {
            Some(Value::Object(o)) => o.clone(),
            _ => serde_json::Map::new(),
        };
        if options.get("include_usage") == Some(&Value::Bool(true)) {
            return;
        }
        options.insert("include_usage".into(), Value::Bool(true));
        let options = Value::Object(options);
        let bytes = serde_json::to_vec(&options).unwrap_or_default();
        let raw = Bytes::from(self.spliced("stream_options", Some(at), &bytes));
        let Ok(layout) = Layout::of(&raw) else {
            // Cannot happen: a valid object with one valid value replaced.
            return;
        };
        if let Value::Object(o) = &mut self.value {
            o.insert("stream_options".into(), options);
        }
        self.raw = raw;
        self.layout = layout;
    }

    /// The raw body with `key`'s value (at `at`) replaced by `value`, or the
    /// member added first when the body has no `key`.
    fn spliced(&self, key: &str, at: Option<&Range<usize>>, value: &[u8]) -> Vec<u8> {
        let raw: &[u8] = &self.raw;
        let mut out = Vec::with_capacity(raw.len() + key.len() + value.len() + 4);
        match at {
            Some(r) => {
                out.extend_from_slice(raw.get(..r.start).unwrap_or_default());
                out.extend_from_slice(value);
                out.extend_from_slice(raw.get(r.end..).unwrap_or_default());
            }
            None => {
                out.extend_from_slice(raw.get(..self.layout.members_at).unwrap_or_default());
                out.push(b'"');
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
                out.extend_from_slice(value);
                if self.layout.has_members {
                    out.push(b',');
                }
                out.extend_from_slice(raw.get(self.layout.members_at..).unwrap_or_default());
            }
        }
        out
    }
}

/// Where the fields the gateway may replace sit in the raw body.
#[derive(Clone, Debug)]
struct Layout {
    members_at: usize,
    has_members: bool,
    /// Members of all objects at any depth.
    members: usize,
    model: Option<Range<usize>>,
    stream_options: Option<Range<usize>>,
}

impl Layout {
    /// Scan the top-level object of `raw`, which serde_json has already
    /// parsed: only its structure matters here, so strings are skipped by
    /// their quotes and escapes, nested values by their brackets, and no
    /// value is built. Malformed input is an error, never a panic.
    fn of(raw: &[u8]) -> Result<Layout, String> {
        const NOT_JSON: &str = "the body is not valid JSON";
        let open = skip_ws(raw, 0);
        if raw.get(open) != Some(&b'{') {
            return Err("the body must be a JSON object".into());
        }
        let mut layout = Layout {
            members_at: open + 1,
            has_members: false,
            members: 0,
            model: None,
            stream_options: None,
        };
        let mut i = skip_ws(raw, open + 1);
        if raw.get(i) == Some(&b'}') {
            return Ok(layout);
        }
        loop {
            let key_end = string_end(raw, i).ok_or(NOT_JSON)?;
            let key = key_text(raw.get(i..key_end).ok_or(NOT_JSON)?).ok_or(NOT_JSON)?;
            i = skip_ws(raw, key_end);
            if raw.get(i) != Some(&b':') {
                return Err(NOT_JSON.into());
            }
            let start = skip_ws(raw, i + 1);
            let end = value_end(raw, start, &mut layout.members).ok_or(NOT_JSON)?;
            layout.has_members = true;
            layout.members += 1;
            match &*key {
                "model" => layout.model = Some(start..end),
                "stream_options" => layout.stream_options = Some(start..end),
                _ => {}
            }
            i = skip_ws(raw, end);
            match raw.get(i) {
                Some(b',') => i = skip_ws(raw, i + 1),
                Some(b'}') => return Ok(layout),
                _ => return Err(NOT_JSON.into()),
            }
        }
    }
}

fn skip_ws(raw: &[u8], mut i: usize) -> usize {
    while raw
        .get(i)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// The index just after the string that starts (with its `"`) at `i`.
fn string_end(raw: &[u8], i: usize) -> Option<usize> {
    if raw.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', raw.get(j..)?)?;
        match raw.get(j)? {
            b'"' => return Some(j + 1),
            _ => j += 2,
        }
    }
}

/// The index just after the value that starts at `i`; `members` counts the
/// members of the objects inside it.
fn value_end(raw: &[u8], i: usize, members: &mut usize) -> Option<usize> {
    match raw.get(i)? {
        b'"' => string_end(raw, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match raw.get(j)? {
                    b'"' => {
                        j = string_end(raw, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b':' => *members += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        // A number, `true`, `false` or `null`.
        _ => {
            let mut j = i;
            while raw
                .get(j)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// A key (with its quotes) as text: borrowed, unless it has escapes.
fn key_text(quoted: &[u8]) -> Option<Cow<'_, str>> {
    if quoted.contains(&b'\\') {
        serde_json::from_slice::<String>(quoted)
            .ok()
            .map(Cow::Owned)
    } else {
        let inner = quoted.get(1..quoted.len().checked_sub(1)?)?;
        std::str::from_utf8(inner).ok().map(Cow::Borrowed)
    }
}

/// Members of all objects in `v`. serde_json nests at most 128 deep, so
/// the recursion is bounded.
fn members_in(v: &Value) -> usize {
    match v {
        Value::Object(o) => o.len() + o.values().map(members_in).sum::<usize>(),
        Value::Array(a) => a.iter().map(members_in).sum(),
        _ => 0,
    }
}

/// The message for a body with a key twice in one object, naming the first
/// such key by its path. Runs only when the counts said there is one.
fn duplicate_key(raw: &[u8]) -> String {
    let mut path = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(raw);
    let found = serde::de::DeserializeSeed::deserialize(FindDuplicate(&mut path), &mut de);
    match found {
        // The error is the key's path; serde_json adds where it is.
        Err(e) if e.is_data() => {
            let text = e.to_string();
            let at = format!(" at line {} column {}", e.line(), e.column());
            let path = text.strip_suffix(&at).unwrap_or(&text);
            format!(
                "`{path}` appears twice in the same object (line {}, column {}): send each key once",
                e.line(),
                e.column()
            )
        }
        _ => "the body has a key twice in one object: send each key once".into(),
    }
}

/// Walks a JSON value; fails at the first key seen twice in one object,
/// with the key's path (`messages[0].content`) in the error.
struct FindDuplicate<'p>(&'p mut Vec<String>);

impl<'de> serde::de::DeserializeSeed<'de> for FindDuplicate<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FindDuplicate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let at = match self.0.last() {
                Some(parent) => format!("{parent}.{key}"),
                None => key.clone(),
            };
            if !keys.insert(key) {
                return Err(serde::de::Error::custom(at));
            }
            self.0.push(at);
            map.next_value_seed(FindDuplicate(self.0))?;
            self.0.pop();
        }
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let at = format!("{}[{i}]", self.0.last().map_or("", String::as_str));
            self.0.push(at);
            let more = seq.next_element_seed(FindDuplicate(self.0))?;
            self.0.pop();
            if more.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> JsonBody {
        let raw = Bytes::copy_from_slice(s.as_bytes());
        let value = serde_json::from_slice(&raw).unwrap();
        JsonBody::new(raw, value).unwrap()
    }

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn only_the_model_value_changes() {
        let src = r#"{ "stream": true, "model" : "auto", "z": 1, "a": {"model": "inner"},
            "seed": 18446744073709551616, "temperature": 1.0E0, "s": "\u00e9\/" }"#;
        let out = text(body(src).with_model("gpt-4o"));
        assert_eq!(out, src.replace(r#""auto""#, r#""gpt-4o""#));
        // Still JSON, with the model an upstream will read.
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["a"]["model"], "inner");
    }

    #[test]
    fn a_missing_model_is_added_first() {
        assert_eq!(
            text(body(r#" {"input": "x"}"#).with_model("m")),
            r#" {"model":"m","input": "x"}"#
        );
        assert_eq!(text(body("{ }").with_model("m")), r#"{"model":"m" }"#);
    }

    #[test]
    fn model_names_are_escaped() {
        let out = text(body(r#"{"model":"auto"}"#).with_model("a\"b"));
        assert_eq!(out, r#"{"model":"a\"b"}"#);
    }

    #[test]
    fn an_escaped_key_is_the_same_field() {
        let out = text(body(r#"{"mod\u0065l":"auto","n":1}"#).with_model("m"));
        assert_eq!(out, r#"{"mod\u0065l":"m","n":1}"#);
    }

    fn refused(src: &str) -> String {
        let raw = Bytes::copy_from_slice(src.as_bytes());
        let value = serde_json::from_slice(&raw).unwrap();
        JsonBody::new(raw, value).unwrap_err()
    }

    #[test]
    fn a_key_twice_in_one_object_is_refused_by_its_path() {
        for (src, path) in [
            (
                r#"{"model":"cheap","messages":[],"model":"denied"}"#,
                "model",
            ),
            (r#"{"model":"cheap","mod\u0065l":"denied"}"#, "model"),
            (r#"{"user":"a","user":"b"}"#, "user"),
            // What a data rule reads: the upstream could see the other content.
            (
                r#"{"messages":[{"role":"user","content":"my ssn is 1","content":"hi"}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"},{"role":"user","role":"system","content":"b"}]}"#,
                "messages[1].role",
            ),
            (
                r#"{"response_format":{"type":"json_schema","type":"text"}}"#,
                "response_format.type",
            ),
            (r#"{"a":[[{"x":{"k":1,"k":2}}]]}"#, "a[0][0].x.k"),
        ] {
            let err = refused(src);
            assert!(
                err.starts_with(&format!(
                    "`{path}` appears twice in the same object (line 1, column "
                )),
                "{src}: {err}"
            );
        }
        // The same key in different objects is fine.
        body(
            r#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}],"role":1}"#,
        );
        // Colons and braces inside strings are not members.
        body(r#"{"a":"x:{\"k\":1,\"k\":2}","b":[":"]}"#);
    }

    #[test]
    fn stream_usage_is_asked_for_and_other_options_kept() {
        let mut b = body(r#"{"model":"auto","stream":true}"#);
        b.ask_stream_usage();
        assert_eq!(
            text(b.raw().clone()),
            r#"{"stream_options":{"include_usage":true},"model":"auto","stream":true}"#
        );
        assert_eq!(b.value()["stream_options"]["include_usage"], true);
        let fresh = Layout::of(b.raw()).unwrap();
        assert_eq!(
            (b.layout.model.clone(), b.layout.stream_options.clone()),
            (fresh.model, fresh.stream_options)
        );
        // The model is still found after the body moved.
        assert_eq!(
            text(b.with_model("m")),
            r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );

        let mut b = body(r#"{"stream_options":{"x":1},"stream":true}"#);
        b.ask_stream_usage();
        assert_eq!(
            text(b.raw().clone()),
            r#"{"stream_options":{"include_usage":true,"x":1},"stream":true}"#
        );
        let mut b = body(r#"{"stream_options":null}"#);
        b.ask_stream_usage();
        assert_eq!(
            text(b.raw().clone()),
            r#"{"stream_options":{"include_usage":true}}"#
        );
        // Already asked: untouched.
        let src = r#"{"stream_options": {"include_usage": true}}"#;
        let mut b = body(src);
        b.ask_stream_usage();
        assert_eq!(text(b.raw().clone()), src);
    }

    #[test]
    fn what_the_client_asked_for_survives_the_gateways_ask() {
        for (src, asked) in [
            (r#"{"stream":true}"#, false),
            (r#"{"stream_options":null}"#, false),
            (r#"{"stream_options":{"include_usage":false}}"#, false),
            (r#"{"stream_options":{"x":1}}"#, false),
            (r#"{"stream_options":{"include_usage":true}}"#, true),
        ] {
            let mut b = body(src);
            b.ask_stream_usage();
            assert_eq!(b.value()["stream_options"]["include_usage"], true, "{src}");
            assert_eq!(b.client_asked_usage(), asked, "{src}");
        }
    }

    fn json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-z\"\\\\\u{e9}\n{}\\[\\],: ]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z\"\\\\{}]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// JSON text whose objects may repeat a key, and whether one does.
    fn json_text() -> impl proptest::strategy::Strategy<Value = (String, bool)> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(("1".to_string(), false)),
            Just(("\"a:{}\\\"b\"".to_string(), false)),
            Just(("null".to_string(), false)),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(|items| {
                    let dup = items.iter().any(|(_, d)| *d);
                    let text = items
                        .into_iter()
                        .map(|(t, _)| t)
                        .collect::<Vec<_>>()
                        .join(",");
                    (format!("[{text}]"), dup)
                }),
                proptest::collection::vec(("[abc]|mod\\\\u0065l|model", inner), 0..4).prop_map(
                    |members| {
                        let mut keys = std::collections::HashSet::new();
                        let mut dup = false;
                        let mut parts = Vec::new();
                        for (k, (t, d)) in members {
                            dup |= d || !keys.insert(k.replace("mod\\u0065l", "model"));
                            parts.push(format!("\"{k}\" : {t}"));
                        }
                        (format!("{{ {} }}", parts.join(", ")), dup)
                    }
                ),
            ]
        })
    }

    proptest::proptest! {
        /// A body is refused exactly when some object in it repeats a key.
        #[test]
        fn duplicate_keys_are_found_at_any_depth(
            (members, dup) in proptest::strategy::Strategy::prop_map(
                proptest::collection::vec(("[abc]|model", json_text()), 0..4),
                |members| {
                    let mut keys = std::collections::HashSet::new();
                    let mut dup = false;
                    let mut parts = Vec::new();
                    for (k, (t, d)) in members {
                        dup |= d || !keys.insert(k.clone());
                        parts.push(format!("\"{k}\":{t}"));
                    }
                    (format!("{{{}}}", parts.join(",")), dup)
                },
            )
        ) {
            let raw = Bytes::from(members.clone());
            let value: Value = serde_json::from_slice(&raw).unwrap();
            let got = JsonBody::new(raw, value);
            proptest::prop_assert_eq!(got.is_err(), dup, "{}: {:?}", members, got.err());
        }

        /// Whatever the body, compact or pretty, the upstream reads it back
        /// with only `model` changed.
        #[test]
        fn splicing_the_model_changes_only_the_model(
            fields in proptest::collection::btree_map("[a-z_\"]{1,6}|model|stream_options", json(), 0..6),
            pretty: bool,
        ) {
            let body = Value::Object(fields.into_iter().collect());
            let raw = if pretty {
                serde_json::to_vec_pretty(&body).unwrap()
            } else {
                serde_json::to_vec(&body).unwrap()
            };
            let parsed: Value = serde_json::from_slice(&raw).unwrap();
            let b = JsonBody::new(Bytes::from(raw), parsed.clone()).unwrap();
            let out: Value = serde_json::from_slice(&b.with_model("chosen")).unwrap();
            let mut expected = parsed;
            expected["model"] = Value::from("chosen");
            proptest::prop_assert_eq!(out, expected.clone());

            // The same after asking for the stream's usage.
            let mut b = b;
            b.ask_stream_usage();
            let out: Value = serde_json::from_slice(&b.with_model("chosen")).unwrap();
            match expected.get_mut("stream_options") {
                Some(Value::Object(o)) => {
                    o.insert("include_usage".into(), Value::Bool(true));
                }
                _ => expected["stream_options"] = serde_json::json!({ "include_usage": true }),
            }
            proptest::prop_assert_eq!(&out, &expected);
            // The parsed body still says what the bytes say.
            let reparsed: Value = serde_json::from_slice(b.raw()).unwrap();
            proptest::prop_assert_eq!(b.value(), &reparsed);
        }

        /// Bytes that are not JSON are an error, never a panic.
        #[test]
        fn any_bytes_scan_without_panicking(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = Layout::of(&raw);
        }
    }
}
