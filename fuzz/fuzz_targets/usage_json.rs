//! The streaming usage scanner on JSON response bodies.
//!
//! Input: a chunking plan (see `take_cuts`) then the body. Properties: never panics; the result
//! is the same whole, at the fuzzer's cut points and one byte at a time; a valid JSON document
//! closes the scan; and on the documents it is specified for (see `expected_scan`) without
//! escapes, usage and model equal what a full parse of the document says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shieldkey::usage::BodyKind;
use shieldkey_fuzz::{expected_scan, scan_any_split, take_cuts, J};

fuzz_target!(|data: &[u8]| {
    let (cuts, body) = take_cuts(data);
    let got = scan_any_split(BodyKind::Json, body, &cuts);

    let Some(doc) = J::parse(body) else {
        return;
    };
    if matches!(doc, J::Obj(_) | J::Arr(_) | J::Str(_)) && doc.depth() <= 64 {
        assert!(got.complete, "a whole JSON document did not close the scan");
    }
    if body.contains(&b'\\') {
        return;
    }
    if let Some(want) = expected_scan(&doc) {
        assert_eq!(
            got.result.usage, want.usage,
            "usage differs from a full parse"
        );
        assert_eq!(
            got.result.model, want.model,
            "model differs from a full parse"
        );
    }
});
