//! Usage scanning: every response body byte goes through `UsageScanner` as it streams past.
//! Throughput in bytes (MB/s in criterion's report) for a large JSON chat completion and for an
//! SSE chat stream of 2,000 events (the shape `make bench` streams), fed in 16 KiB chunks as
//! Envoy delivers them, and in one piece.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code: failing loudly is the point

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shieldkey::usage::{BodyKind, UsageScanner};

const WORDS: [&str; 5] = ["one", " two", " three", " four", " five"];
const USAGE: &str = r#""usage":{"prompt_tokens":38,"total_tokens":2038,"completion_tokens":2000,"prompt_tokens_details":{"cached_tokens":0},"service_tier":"standard"}"#;

/// A chat completion whose answer is `content_bytes` long (escapes and all), usage at the end.
fn chat_json(content_bytes: usize) -> Vec<u8> {
    let mut content = String::with_capacity(content_bytes + 16);
    let mut i = 0;
    while content.len() < content_bytes {
        content.push_str(if i % 40 == 39 { "\\n" } else { WORDS[i % 5] });
        i += 1;
    }
    format!(
        r#"{{"id":"0b7e1f6a2c5d4e8f","object":"chat.completion","created":1790000000,"model":"mistral-small-latest","choices":[{{"index":0,"message":{{"role":"assistant","tool_calls":null,"content":"{content}"}},"finish_reason":"stop"}}],{USAGE}}}"#
    )
    .into_bytes()
}

/// A chat stream as tests/bench/bench.py's upstream sends it: a role chunk, `events` content
/// chunks with the `p` padding field, usage on the last, then [DONE].
fn chat_stream(events: usize) -> Vec<u8> {
    let base = r#""id":"548e0b7e1f6a2c5d","object":"chat.completion.chunk","created":1790000000,"model":"mistral-small-latest""#;
    let mut out = format!(
        "data: {{{base},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n"
    );
    for i in 0..events {
        let last = i == events - 1;
        let finish = if last { "\"stop\"" } else { "null" };
        let usage = if last {
            format!(",{USAGE}")
        } else {
            String::new()
        };
        out.push_str(&format!(
            "data: {{{base},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}},\"finish_reason\":{finish}}}],\"p\":\"{}\"{usage}}}\n\n",
            WORDS[i % 5],
            &"abcdefghijklmnopqrst"[..1 + i % 20],
        ));
    }
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

fn scan(kind: BodyKind, body: &[u8], chunk: usize) -> u64 {
    let mut scanner = UsageScanner::new(kind);
    for piece in body.chunks(chunk) {
        scanner.feed(piece);
    }
    let result = scanner.result();
    assert!(scanner.is_complete());
    result.usage.map_or(0, |u| u.completion_tokens)
}

fn usage_scanning(c: &mut Criterion) {
    let mut group = c.benchmark_group("usage_scan");
    let bodies = [
        ("json_1KiB", BodyKind::Json, chat_json(700)),
        ("json_1MiB", BodyKind::Json, chat_json(1 << 20)),
        ("sse_2000_events", BodyKind::EventStream, chat_stream(2000)),
    ];
    for (name, kind, body) in &bodies {
        assert!(scan(*kind, body, body.len()) > 0, "{name}: no usage found");
        group.throughput(Throughput::Bytes(body.len() as u64));
        for chunk in [16 * 1024, body.len()] {
            let label = if chunk == body.len() {
                "whole"
            } else {
                "16KiB_chunks"
            };
            group.bench_with_input(BenchmarkId::new(*name, label), body, |b, body| {
                b.iter(|| scan(*kind, black_box(body), chunk))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, usage_scanning);
criterion_main!(benches);
