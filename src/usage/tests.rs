use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};

fn scan(kind: BodyKind, chunks: &[&[u8]]) -> UsageScanner {
    let mut s = UsageScanner::new(kind);
    for c in chunks {
        s.feed(c);
    }
    s
}

fn usage(p: u64, c: u64) -> Option<Usage> {
    Some(Usage {
        prompt_tokens: p,
        completion_tokens: c,
        ..Usage::default()
    })
}

const CHAT: &str = r#"{"id":"9cdb","created":1787150111,"model":"mistral-small-latest","usage":{"prompt_tokens":23,"total_tokens":32,"completion_tokens":9,"prompt_tokens_details":{"cached_tokens":0},"service_tier":"standard"},"object":"chat.completion","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","tool_calls":null,"content":"2 + 2 equals **4**."}}]}"#;

const STREAM: &str = concat!(
    "data: {\"id\":\"548e\",\"object\":\"chat.completion.chunk\",\"created\":1787150060,\"model\":\"mistral-small-latest\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"p\":\"abc\"}\n\n",
    "data: {\"id\":\"548e\",\"object\":\"chat.completion.chunk\",\"created\":1787150060,\"model\":\"mistral-small-latest\",\"choices\":[{\"index\":0,\"delta\":{\"content\":[{\"type\":\"thinking\",\"thinking\":[{\"type\":\"text\",\"text\":\"hm \\\"usage\\\": {\"}]},{\"type\":\"text\",\"text\":\"1\"}]},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"548e\",\"object\":\"chat.completion.chunk\",\"created\":1787150060,\"model\":\"mistral-small-latest\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" 3\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":22,\"total_tokens\":30,\"completion_tokens\":8,\"prompt_tokens_details\":{\"cached_tokens\":5},\"service_tier\":\"priority\"},\"p\":\"abcde\"}\n\n",
    "data: [DONE]\n\n",
);

#[test]
fn non_streamed_chat() {
    let s = scan(BodyKind::Json, &[CHAT.as_bytes()]);
    let r = s.result();
    assert_eq!(r.usage, usage(23, 9));
    assert_eq!(r.model.as_deref(), Some("mistral-small-latest"));
    assert!(s.is_complete());
    assert_eq!(s.bytes_seen(), CHAT.len() as u64);
}

#[test]
fn streamed_chat_with_padding_arrays_cache_and_priority() {
    let s = scan(BodyKind::EventStream, &[STREAM.as_bytes()]);
    let r = s.result();
    assert_eq!(
        r.usage,
        Some(Usage {
            prompt_tokens: 22,
            completion_tokens: 8,
            cached_prompt_tokens: 5,
            priority: true,
            ..Usage::default()
        })
    );
    assert!(s.saw_done() && s.is_complete());
}

#[test]
fn crlf_and_bare_cr_line_ends_and_other_fields() {
    for sep in ["\r\n", "\r"] {
        let body = STREAM.replace('\n', sep);
        let body = format!(": keep-alive{sep}event: message{sep}id: 7{sep}{sep}{body}");
        let s = scan(BodyKind::EventStream, &[body.as_bytes()]);
        assert_eq!(
            s.result().usage.map(|u| u.completion_tokens),
            Some(8),
            "{sep:?}"
        );
        assert!(s.saw_done());
    }
}

#[test]
fn multi_line_data_and_no_space_after_colon() {
    let body = "data:{\"usage\":\ndata: {\"prompt_tokens\":3,\ndata:\"completion_tokens\":4}}\n\ndata:[DONE]\n\n";
    let s = scan(BodyKind::EventStream, &[body.as_bytes()]);
    assert_eq!(s.result().usage, usage(3, 4));
    assert!(s.saw_done());
}

#[test]
fn embeddings_and_fim() {
    let embed = r#"{"id":"e","object":"list","data":[{"object":"embedding","embedding":[0.1,-0.2,3e-5],"index":0}],"model":"mistral-embed","usage":{"prompt_tokens":6,"total_tokens":6,"completion_tokens":0}}"#;
    assert_eq!(
        scan(BodyKind::Json, &[embed.as_bytes()]).result().usage,
        usage(6, 0)
    );
    let fim = r#"{"model":"codestral-latest","object":"chat.completion","choices":[{"message":{"content":"x"}}],"usage":{"completion_tokens":12,"prompt_tokens":40}}"#;
    let r = scan(BodyKind::Json, &[fim.as_bytes()]).result();
    assert_eq!(r.usage, usage(40, 12));
    assert_eq!(r.model.as_deref(), Some("codestral-latest"));
}

#[test]
fn nested_or_fake_usage_is_not_billing_usage() {
    // `usage` inside a message, inside a string, or `usage: null` is not the response's usage.
    let body = r#"{"choices":[{"message":{"usage":{"prompt_tokens":999,"completion_tokens":999}}}],"note":"\"usage\":{\"prompt_tokens\":5}","usage":null}"#;
    assert_eq!(
        scan(BodyKind::Json, &[body.as_bytes()]).result().usage,
        None
    );
    let total_only = r#"{"usage":{"total_tokens":50}}"#;
    assert_eq!(
        scan(BodyKind::Json, &[total_only.as_bytes()])
            .result()
            .usage,
        None
    );
}

#[test]
fn truncated_and_error_bodies() {
    let cut = &CHAT.as_bytes()[..CHAT.len() / 2];
    let s = scan(BodyKind::Json, &[cut]);
    assert!(!s.is_complete());
    let err = br#"{"object":"error","message":"Invalid model","type":"invalid_request_error","param":null,"code":"1500"}"#;
    let s = scan(BodyKind::Json, &[err]);
    assert_eq!(s.result().usage, None);
    assert!(s.is_complete());
    let stream_cut = &STREAM.as_bytes()[..STREAM.find("\"usage\"").unwrap()];
    let s = scan(BodyKind::EventStream, &[stream_cut]);
    assert_eq!(s.result().usage, None);
    assert!(!s.is_complete());
}

#[test]
fn content_types() {
    assert_eq!(
        BodyKind::from_content_type("text/event-stream; charset=utf-8"),
        BodyKind::EventStream
    );
    assert_eq!(
        BodyKind::from_content_type("Text/Event-Stream"),
        BodyKind::EventStream
    );
    assert_eq!(
        BodyKind::from_content_type("application/json"),
        BodyKind::Json
    );
    assert_eq!(BodyKind::from_content_type(""), BodyKind::Json);
}

#[test]
fn deep_nesting_gives_up_without_panicking() {
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let s = scan(BodyKind::Json, &[deep.as_bytes()]);
    assert_eq!(s.result(), ScanResult::default());
}

// --- properties -------------------------------------------------------------------------------

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ]{0,12}",
        "\\PC{0,12}",
        Just("quote \" backslash \\ slash / tab \t nl \n".to_string()),
        Just("\"usage\":{\"prompt_tokens\":1}".to_string()),
        Just("data: [DONE]\n\n".to_string()),
    ]
}

fn usage_value() -> impl Strategy<Value = Value> {
    (
        0u64..1_000_000,
        0u64..1_000_000,
        proptest::option::of(0u64..1000),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(p, c, cached, prio, reorder)| {
            let mut u = serde_json::Map::new();
            let tier = if prio { "priority" } else { "standard" };
            if reorder {
                u.insert("service_tier".into(), json!(tier));
                u.insert("completion_tokens".into(), json!(c));
                u.insert("total_tokens".into(), json!(p + c));
                u.insert("prompt_tokens".into(), json!(p));
            } else {
                u.insert("prompt_tokens".into(), json!(p));
                u.insert("total_tokens".into(), json!(p + c));
                u.insert("completion_tokens".into(), json!(c));
                u.insert("service_tier".into(), json!(tier));
            }
            if let Some(cached) = cached {
                u.insert(
                    "prompt_tokens_details".into(),
                    json!({"cached_tokens": cached}),
                );
            }
            Value::Object(u)
        })
}

fn response() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(usage_value()),
        json_string(),
        json_string(),
        proptest::collection::vec(json_string(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(usage, content, pad, parts, array_content)| {
            let content = if array_content {
                json!(parts.iter().map(|t| json!({"type": "text", "text": t})).collect::<Vec<_>>())
            } else {
                json!(content)
            };
            let mut doc = serde_json::Map::new();
            doc.insert("id".into(), json!("x"));
            doc.insert("choices".into(), json!([{"index": 0, "delta": {"content": content}, "message": {"content": [1, {"usage": {"prompt_tokens": 7}}]}}]));
            doc.insert("p".into(), json!(pad));
            if let Some(u) = usage {
                doc.insert("usage".into(), u);
            }
            doc.insert("model".into(), json!("mistral-small-latest"));
            Value::Object(doc)
        })
}

/// The reference: what a full parse of the document says.
fn expected(doc: &Value) -> Option<Usage> {
    let u = doc.get("usage")?;
    Some(Usage {
        prompt_tokens: u["prompt_tokens"].as_u64()?,
        completion_tokens: u["completion_tokens"].as_u64()?,
        cached_prompt_tokens: u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        priority: u["service_tier"] == "priority",
        ..Usage::default()
    })
}

fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut last = 0;
    for p in points {
        out.push(bytes[last..p].to_vec());
        last = p;
    }
    out.push(bytes[last..].to_vec());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn json_scan_matches_a_full_parse_for_any_split(doc in response(), cuts in proptest::collection::vec(any::<usize>(), 0..12)) {
        let body = serde_json::to_vec(&doc).unwrap();
        let mut s = UsageScanner::new(BodyKind::Json);
        for chunk in split(&body, &cuts) {
            s.feed(&chunk);
        }
        prop_assert_eq!(s.result().usage, expected(&doc));
        prop_assert_eq!(s.result().model, Some("mistral-small-latest".to_string()));
        prop_assert!(s.is_complete());
    }

    #[test]
    fn sse_scan_matches_the_last_event_with_usage(
        docs in proptest::collection::vec(response(), 1..5),
        crlf in any::<bool>(),
        done in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut body = String::new();
        for d in &docs {
            body.push_str(&format!("data: {}{nl}{nl}", serde_json::to_string(d).unwrap()));
        }
        if done {
            body.push_str(&format!("data: [DONE]{nl}{nl}"));
        }
        let mut s = UsageScanner::new(BodyKind::EventStream);
        for chunk in split(body.as_bytes(), &cuts) {
            s.feed(&chunk);
        }
        let want = docs.iter().rev().find_map(|d| d.get("usage").map(|_| expected(d))).flatten();
        prop_assert_eq!(s.result().usage, want);
        prop_assert_eq!(s.saw_done(), done);
    }

    #[test]
    fn garbage_and_truncation_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), cut in any::<usize>()) {
        for kind in [BodyKind::Json, BodyKind::EventStream] {
            let mut s = UsageScanner::new(kind);
            s.feed(&bytes);
            let _ = (s.result(), s.is_complete(), s.saw_done());
        }
        let body = serde_json::to_vec(&json!({"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "model": "m"})).unwrap();
        let mut s = UsageScanner::new(BodyKind::Json);
        s.feed(&body[..cut % (body.len() + 1)]);
        let _ = s.result();
    }
}

#[test]
fn conversation_and_transcription_event_streams() {
    // Named events, no [DONE]: usage rides on the final event's top level.
    let conv = concat!(
        "event: conversation.response.started\n",
        "data: {\"type\":\"conversation.response.started\",\"conversation_id\":\"c1\"}\n\n",
        "event: message.output.delta\n",
        "data: {\"type\":\"message.output.delta\",\"content\":\"Hi\",\"model\":\"mistral-medium-latest\"}\n\n",
        "event: conversation.response.done\n",
        "data: {\"type\":\"conversation.response.done\",\"usage\":{\"prompt_tokens\":31,\"completion_tokens\":7,\"total_tokens\":38,\"connector_tokens\":null}}\n\n",
    );
    let s = scan(BodyKind::EventStream, &[conv.as_bytes()]);
    assert_eq!(s.result().usage, usage(31, 7));
    assert!(!s.saw_done() && s.is_complete());
    let transcription = "event: transcription.done\ndata: {\"type\":\"transcription.done\",\"model\":\"voxtral-mini-latest\",\"usage\":{\"prompt_audio_seconds\":12,\"prompt_tokens\":9,\"total_tokens\":632,\"completion_tokens\":375}}\n\n";
    let r = scan(BodyKind::EventStream, &[transcription.as_bytes()]).result();
    // Tokens from prompt and completion, never from total_tokens; the audio seconds too.
    assert_eq!(
        r.usage,
        Some(Usage {
            audio_seconds: 12,
            ..usage(9, 375).unwrap()
        })
    );
}

#[test]
fn responses_ocr_and_conversation_shapes() {
    let conv = r#"{"object":"conversation.response","conversation_id":"c","outputs":[{"object":"entry","type":"message.output","model":"mistral-small-latest","content":"abcd"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
    let r = scan(BodyKind::Json, &[conv.as_bytes()]).result();
    assert_eq!(r.model.as_deref(), Some("mistral-small-latest"));
    assert_eq!(r.usage, usage(5, 2));
    assert_eq!(r.generated_bytes, 4);
    let responses = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hello\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"mistral-small-latest\",\"usage\":{\"input_tokens\":11,\"output_tokens\":3,\"total_tokens\":14}}}\n\n";
    let r = scan(BodyKind::EventStream, &[responses.as_bytes()]).result();
    assert_eq!(r.usage, usage(11, 3));
    assert_eq!(r.model.as_deref(), Some("mistral-small-latest"));
    assert_eq!(r.generated_bytes, 5);
    let ocr = r#"{"pages":[{"index":0,"markdown":"x"}],"model":"mistral-ocr-2505","usage_info":{"pages_processed":4,"doc_size_bytes":10}}"#;
    let r = scan(BodyKind::Json, &[ocr.as_bytes()]).result();
    assert_eq!(r.usage.map(|u| u.pages), Some(4));
}

/// The model is the one named last, by any event (the one still open at the end included);
/// events that name none, or a name that is not UTF-8, leave it as it was.
#[test]
fn the_model_of_a_stream_is_the_last_one_named() {
    let event = |model: Option<&[u8]>| -> Vec<u8> {
        let mut e = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]".to_vec();
        if let Some(m) = model {
            e.extend_from_slice(b",\"model\":\"");
            e.extend_from_slice(m);
            e.extend_from_slice(b"\"");
        }
        e.extend_from_slice(b"}\n\n");
        e
    };
    let stream = [
        event(Some(b"mistral-small-latest")),
        event(Some(b"codestral-latest")),
        event(None),
        event(Some(b"bad\xff")),
    ]
    .concat();
    let model = |chunks: &[&[u8]]| scan(BodyKind::EventStream, chunks).result().model;
    assert_eq!(model(&[&stream]).as_deref(), Some("codestral-latest"));
    // Cut off inside an event that names another model: that event counts.
    let open = b"data: {\"model\":\"mistral-large-latest\",\"choices\":[";
    assert_eq!(
        model(&[&stream, open]).as_deref(),
        Some("mistral-large-latest")
    );
    let generated = scan(BodyKind::EventStream, &[&stream])
        .result()
        .generated_bytes;
    assert_eq!(generated, 4);
}
