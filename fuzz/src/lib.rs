//! Helpers shared by the fuzz targets: an order- and duplicate-preserving JSON tree (the oracles
//! need to see duplicate keys, which `serde_json::Value` silently collapses), chunking of an input
//! at fuzzer-chosen points, and percent-decoding as a Python ASGI server does it.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON document as written: members in order, duplicates kept.
#[derive(Debug, Clone, PartialEq)]
pub enum J {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    /// Parses with serde_json (same grammar, recursion limit and UTF-8 rules as `Value`).
    pub fn parse(bytes: &[u8]) -> Option<J> {
        serde_json::from_slice(bytes).ok()
    }

    /// The last member named `key` (what `serde_json::Value` keeps), if this is an object.
    pub fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn members(&self) -> &[(String, J)] {
        match self {
            J::Obj(m) => m,
            _ => &[],
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            J::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Whether this object has a key given twice (at this level only).
    pub fn has_duplicate_key(&self) -> bool {
        let members = self.members();
        members
            .iter()
            .enumerate()
            .any(|(i, (k, _))| members[..i].iter().any(|(k2, _)| k2 == k))
    }

    /// Whether any object anywhere in the document has a key given twice.
    pub fn has_duplicate_key_anywhere(&self) -> bool {
        match self {
            J::Obj(m) => {
                self.has_duplicate_key() || m.iter().any(|(_, v)| v.has_duplicate_key_anywhere())
            }
            J::Arr(items) => items.iter().any(J::has_duplicate_key_anywhere),
            _ => false,
        }
    }

    /// Containers nested in each other (a scalar is 0, `{}` is 1).
    pub fn depth(&self) -> usize {
        match self {
            J::Obj(m) => 1 + m.iter().map(|(_, v)| v.depth()).max().unwrap_or(0),
            J::Arr(items) => 1 + items.iter().map(J::depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// Every string in the document, keys included, and the text of every number.
    pub fn texts(&self, out: &mut Vec<String>) {
        match self {
            J::Str(s) => out.push(s.clone()),
            J::Num(n) => out.push(n.to_string()),
            J::Bool(b) => out.push(b.to_string()),
            J::Null => out.push("null".into()),
            J::Arr(items) => items.iter().for_each(|v| v.texts(out)),
            J::Obj(m) => m.iter().for_each(|(k, v)| {
                out.push(k.clone());
                v.texts(out)
            }),
        }
    }
}

/// How a JSON value reads as a token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Absent, or not a non-negative integer (string, null, fraction, negative, ...).
    NotACount,
    Count(u64),
    /// A number that does not fit `u64` (serde_json turned it into a float): whether it was
    /// written as a huge integer or as `1e30` cannot be told any more, so oracles skip it.
    Unknowable,
}

pub fn count_of(v: Option<&J>) -> Count {
    match v {
        Some(J::Num(n)) => match n.as_u64() {
            Some(c) => Count::Count(c),
            None if n.as_f64().is_some_and(|f| f >= 1.8e19) => Count::Unknowable,
            None => Count::NotACount,
        },
        _ => Count::NotACount,
    }
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        d.deserialize_any(JVisitor)
    }
}

struct JVisitor;

impl<'de> Visitor<'de> for JVisitor {
    type Value = J;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<J, E> {
        Ok(J::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<J, E> {
        Ok(J::Num(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<J, E> {
        Ok(J::Num(v.into()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<J, E> {
        serde_json::Number::from_f64(v)
            .map(J::Num)
            .ok_or_else(|| E::custom("not a finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<J, E> {
        Ok(J::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<J, E> {
        Ok(J::Str(v))
    }
    fn visit_unit<E>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_none<E>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(J::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
        let mut members = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, J>()? {
            members.push((k, v));
        }
        Ok(J::Obj(members))
    }
}

/// Reads a chunking plan from the front of a fuzz input: byte 0 gives the number of cuts (0-15),
/// then two bytes (little endian) per cut; the rest is the payload. Returns (cuts, payload).
pub fn take_cuts(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = usize::from(n % 16);
    let header = (2 * n).min(rest.len());
    let (cut_bytes, payload) = rest.split_at(header);
    let cuts = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    (cuts, payload)
}

/// Splits `bytes` at the given points (each taken modulo `len + 1`, sorted): empty chunks
/// included, concatenation always equals the input.
pub fn split_at_points<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut last = 0;
    for p in points {
        out.push(&bytes[last..p]);
        last = p;
    }
    out.push(&bytes[last..]);
    out
}

/// Percent-decodes a path as uvicorn/Starlette do before routing (`urllib.parse.unquote`):
/// every `%XX` with two hex digits becomes that byte; anything else is kept as is.
pub fn percent_decode(path: &[u8]) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%' && i + 2 < path.len() {
            if let (Some(h), Some(l)) = (hex(path[i + 1]), hex(path[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(path[i]);
        i += 1;
    }
    out
}

/// Whether `inner` lies inside `outer` in memory (a true sub-slice, not just equal bytes).
pub fn is_subslice(outer: &[u8], inner: &[u8]) -> bool {
    let o = outer.as_ptr() as usize;
    let i = inner.as_ptr() as usize;
    i >= o && i + inner.len() <= o + outer.len()
}

/// Whether `needle` occurs in `haystack` (byte substring).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// What a full parse says a response body's usage scan must find, for documents the scanner is
/// specified on: a top-level object, no key given twice, at most 64 containers deep, no
/// `usage_info`/`response` aliases at the top and no `input_tokens`/`output_tokens` aliases in
/// `usage` (their interplay with the plain names is order-dependent), and no string that the
/// scanner's 128-byte capture cannot hold where it captures (`service_tier`, `model`).
/// The caller must also ensure the body has no backslash (the scanner does not decode escapes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanExpectation {
    pub usage: Option<shieldkey::usage::Usage>,
    pub model: Option<String>,
}

const MAX_DEPTH: usize = 64;
const MAX_CAPTURE: usize = 128;

pub fn expected_scan(doc: &J) -> Option<ScanExpectation> {
    if !matches!(doc, J::Obj(_)) || doc.depth() > MAX_DEPTH || doc.has_duplicate_key_anywhere() {
        return None;
    }
    if doc.get("usage_info").is_some() || doc.get("response").is_some() {
        return None;
    }
    let usage = doc.get("usage");
    if let Some(u) = usage {
        if u.get("input_tokens").is_some() || u.get("output_tokens").is_some() {
            return None;
        }
    }
    let count = |v: Option<&J>| match count_of(v) {
        Count::Count(c) => Some(Some(c)),
        Count::NotACount => Some(None),
        Count::Unknowable => None,
    };
    let field = |k: &str| usage.and_then(|u| u.get(k));
    let prompt = count(field("prompt_tokens"))?;
    let completion = count(field("completion_tokens"))?;
    let pages = count(field("pages_processed"))?;
    let audio = count(field("prompt_audio_seconds"))?;
    let cached = count(field("prompt_tokens_details").and_then(|d| d.get("cached_tokens")))?;

    // `service_tier` is read at the top level and in `usage`; the last one in the text wins.
    let mut tier: Option<&str> = None;
    for (k, v) in doc.members() {
        if k == "service_tier" {
            if let J::Str(s) = v {
                tier = Some(s);
            }
        }
        if k == "usage" {
            for (k2, v2) in v.members() {
                if let ("service_tier", J::Str(s)) = (k2.as_str(), v2) {
                    tier = Some(s);
                }
            }
        }
    }
    if tier.is_some_and(|t| t.len() > MAX_CAPTURE) {
        return None;
    }
    let model = match doc.get("model") {
        Some(J::Str(m)) if m.len() > MAX_CAPTURE => return None,
        Some(J::Str(m)) => Some(m.clone()),
        _ => None,
    };
    let saw_usage = matches!(usage, Some(J::Obj(_)));
    let counted = prompt.is_some() || completion.is_some() || pages.is_some() || audio.is_some();
    let usage = (saw_usage && counted).then(|| shieldkey::usage::Usage {
        prompt_tokens: prompt.unwrap_or(0),
        completion_tokens: completion.unwrap_or(0),
        cached_prompt_tokens: cached.unwrap_or(0),
        priority: tier == Some("priority"),
        pages: pages.unwrap_or(0),
        audio_seconds: audio.unwrap_or(0),
    });
    Some(ScanExpectation { usage, model })
}

/// Everything a scanner reports, to compare two feedings of the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    pub result: shieldkey::usage::ScanResult,
    pub complete: bool,
    pub done: bool,
    pub bytes_seen: u64,
}

pub fn scan_chunks<'a>(
    kind: shieldkey::usage::BodyKind,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> ScanOutcome {
    let mut s = shieldkey::usage::UsageScanner::new(kind);
    for c in chunks {
        s.feed(c);
    }
    ScanOutcome {
        result: s.result(),
        complete: s.is_complete(),
        done: s.saw_done(),
        bytes_seen: s.bytes_seen(),
    }
}

/// Feeds `body` whole, at the given cut points, and one byte at a time; asserts all three agree.
pub fn scan_any_split(
    kind: shieldkey::usage::BodyKind,
    body: &[u8],
    cuts: &[usize],
) -> ScanOutcome {
    let whole = scan_chunks(kind, [body]);
    let split = scan_chunks(kind, split_at_points(body, cuts));
    assert_eq!(whole, split, "chunking changed the result (cuts {cuts:?})");
    let bytewise = scan_chunks(kind, body.chunks(1));
    assert_eq!(whole, bytewise, "byte-at-a-time feeding changed the result");
    assert_eq!(whole.bytes_seen, body.len() as u64);
    whole
}

/// The input made parseable by serde_json where serde_json is stricter than JSON, or where the
/// crate is knowingly lenient, keeping its structure:
/// - numbers beyond `f64` (`8e477`: valid JSON, which serde_json refuses) become `0`;
/// - with `strings`, every string's content is made valid: bytes outside ASCII become `?` and
///   `\uD800`-`\uDFFF` escapes become `\u0041` (invalid UTF-8, lone surrogates).
pub fn tame(data: &[u8], strings: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut in_str = false;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        if !in_str {
            if b == b'-' || b.is_ascii_digit() {
                let len = data[i..]
                    .iter()
                    .position(|c| !(c.is_ascii_digit() || b"+-.eE".contains(c)))
                    .unwrap_or(data.len() - i);
                let token = &data[i..i + len];
                let huge = std::str::from_utf8(token)
                    .ok()
                    .and_then(|t| t.parse::<f64>().ok())
                    .is_some_and(|f| f.is_infinite());
                out.extend_from_slice(if huge { b"0" } else { token });
                i += len;
                continue;
            }
            in_str = b == b'"';
            out.push(b);
            i += 1;
            continue;
        }
        match b {
            b'"' => {
                in_str = false;
                out.push(b);
                i += 1;
            }
            b'\\' => {
                let surrogate = strings
                    && data.get(i + 1) == Some(&b'u')
                    && data
                        .get(i + 2..i + 6)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u16::from_str_radix(h, 16).ok())
                        .is_some_and(|c| (0xD800..=0xDFFF).contains(&c));
                if surrogate {
                    out.extend_from_slice(b"\\u0041");
                    i += 6;
                } else {
                    out.extend_from_slice(&data[i..(i + 2).min(data.len())]);
                    i += 2;
                }
            }
            0x80.. if strings => {
                out.push(b'?');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}
