//! Path canonicalisation and route lookup. Whatever `canonical_path` accepts is a path that every
//! server on the way reads the same: no percent escape (FastAPI decodes before routing), no empty,
//! `.` or `..` segment (slash merging, dot-segment removal), no query; and `lookup` never panics.
//!
//! Input: `<method> <path>` like a request line; without a space the whole input is the path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shieldkey::routes::{self, canonical_path, lookup};
use shieldkey_fuzz::percent_decode;

const METHODS: &[&[u8]] = &[b"GET", b"POST", b"DELETE", b"PATCH", b"PUT", b"get", b""];

fn check_canonical(input: &[u8], p: &str) {
    let b = p.as_bytes();
    assert!(input.starts_with(b), "not a prefix of the input");
    // It is the input up to the query, not less.
    let rest = &input[b.len()..];
    assert!(
        rest.is_empty() || rest[0] == b'?',
        "cut before the query: {rest:?}"
    );
    assert!(p.starts_with('/'));
    assert!(!p.contains('%'));
    assert!(!p.contains('?'));
    assert!(!p.contains('#'));
    assert!(!p.contains('\\'));
    assert!(!p.contains("//"));
    assert!(!p.contains("/./") && !p.contains("/../"));
    assert!(!p.ends_with("/.") && !p.ends_with("/..") && !p.ends_with('/'));
    assert!(p.bytes().all(|c| c.is_ascii_graphic()), "{p:?}");
    // What a percent-decoding server routes on is the same path.
    assert_eq!(percent_decode(b), b);
    // Canonical form is a fixed point.
    assert_eq!(canonical_path(b), Some(p));
}

fn check_lookup(method: &[u8], path: &str) {
    if let Some(route) = lookup(method, path) {
        assert!(routes::TABLE.contains(route));
        let segments: Vec<&str> = path[1..].split('/').collect();
        let template: Vec<&str> = route.template.split('/').collect();
        if template.last() == Some(&"**") {
            assert!(segments.len() >= template.len() - 1);
        } else {
            assert_eq!(
                segments.len(),
                template.len(),
                "{path} vs {}",
                route.template
            );
        }
        for (seg, part) in segments.iter().zip(&template) {
            match *part {
                "**" => break,
                "{}" => assert!(!seg.is_empty()),
                literal => assert_eq!(seg, &literal),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (method, path) = match data.iter().position(|b| *b == b' ') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"POST"[..], data),
    };
    if let Some(p) = canonical_path(path) {
        check_canonical(path, p);
        check_lookup(method, p);
        for m in METHODS {
            check_lookup(m, p);
        }
    }
    // lookup on arbitrary (non-canonical) text never panics either.
    let text = String::from_utf8_lossy(path);
    let _ = lookup(method, &text);
    let _ = lookup(b"GET", &text);
});
