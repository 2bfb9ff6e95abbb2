//! The streaming usage scanner on server-sent event bodies.
//!
//! Input: a chunking plan (see `take_cuts`) then the payload, used twice:
//! 1. as a raw event stream: never panics, and the result is the same whole, at the fuzzer's
//!    cut points and one byte at a time;
//! 2. as the JSON of one event, framed as `data:` lines (one per line of the payload, as a server
//!    sends multi-line data) plus `data: [DONE]`: the event scan must report exactly what the JSON
//!    scanner reports on the payload itself, `[DONE]` must be seen, and on documents the scanner
//!    is specified for (see `expected_scan`) usage and model equal a full parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shieldkey::usage::BodyKind;
use shieldkey_fuzz::{expected_scan, scan_any_split, take_cuts, J};

fuzz_target!(|data: &[u8]| {
    let (cuts, payload) = take_cuts(data);
    scan_any_split(BodyKind::EventStream, payload, &cuts);

    // A bare CR is a line end in SSE but not in the JSON it frames: leave those to part 1.
    if payload.contains(&b'\r') {
        return;
    }
    let mut framed = Vec::with_capacity(payload.len() + 32);
    for line in payload.split(|b| *b == b'\n') {
        framed.extend_from_slice(b"data: ");
        framed.extend_from_slice(line);
        framed.push(b'\n');
    }
    framed.extend_from_slice(b"\ndata: [DONE]\n\n");
    let sse = scan_any_split(BodyKind::EventStream, &framed, &cuts);
    assert!(sse.done && sse.complete, "[DONE] not seen");
    let json = scan_any_split(BodyKind::Json, payload, &cuts);
    assert_eq!(
        sse.result, json.result,
        "one SSE event reads differently from the same JSON"
    );

    if payload.contains(&b'\\') {
        return;
    }
    let Some(doc) = J::parse(payload) else {
        return;
    };
    if let Some(want) = expected_scan(&doc) {
        assert_eq!(
            sse.result.usage, want.usage,
            "usage differs from a full parse"
        );
        assert_eq!(
            sse.result.model, want.model,
            "model differs from a full parse"
        );
    }
});
