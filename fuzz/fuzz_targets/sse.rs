//! The SSE parser on any bytes in any chunking: never panics, and the events
//! do not depend on where the chunks were cut.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routeplane::gateway::sse::Parser;

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (data, cuts) = input;
    let whole = Parser::new().feed(&data);
    let mut p = Parser::new();
    let mut pieces = Vec::new();
    let mut rest: &[u8] = &data;
    for c in cuts {
        if rest.is_empty() {
            break;
        }
        let n = (c as usize % rest.len()).max(1);
        let (head, tail) = rest.split_at(n);
        pieces.extend(p.feed(head));
        rest = tail;
    }
    pieces.extend(p.feed(rest));
    assert_eq!(whole, pieces, "chunking changed the events");
});
