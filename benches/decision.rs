//! The decision: one whole request through `stream::Stream`, the host-neutral state machine the
//! proxy-wasm glue forwards every callback to (request headers, request body, response headers,
//! response body, log), against an in-memory host. With a token without rules and with every rule
//! on (budget, requests and tokens per minute, source CIDR, model allow-list, max_tokens ceiling:
//! body read and judged, reservation and settlement by compare-and-swap in shared data). Then the
//! pieces: `authenticate::authenticate`, `access::check_route` + `access::judge_body`.
//!
//! Before measuring, it prints the host calls one request makes (each is one proxy-wasm host call
//! in Envoy, `glue::host`), the cost a native benchmark cannot see.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code: failing loudly is the point

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::rc::Rc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use shieldkey::access::{self, Judge};
use shieldkey::authenticate::{authenticate, Credentials};
use shieldkey::config::token_stream;
use shieldkey::master_key::MasterKey;
use shieldkey::routes;
use shieldkey::seal;
use shieldkey::store::{MemoryStore, SharedStore, StoreError};
use shieldkey::stream::active::Active;
use shieldkey::stream::host::{Host, LogLevel, MetricKind};
use shieldkey::stream::metrics::MetricIds;
use shieldkey::stream::{Flow, Stream};
use shieldkey::token::{format_token, SECRET_BYTES};
use shieldkey::token_digest::TokenVerifier;

const REAL_KEY: &str = "RealMistralKey0123456789abcdefXY";
const PATH: &str = "/v1/chat/completions";
const REQUEST: &str = r#"{"model":"mistral-small-latest","max_tokens":256,"temperature":0.3,"messages":[{"role":"system","content":"You are a concise assistant for an engineering team."},{"role":"user","content":"Summarise in two sentences why a proxy should keep API keys away from clients, and what a revocable token adds."}]}"#;
const RESPONSE: &str = r#"{"id":"0b7e1f6a2c5d4e8f9a1b3c5d7e9f1a2b","object":"chat.completion","created":1790000000,"model":"mistral-small-latest","choices":[{"index":0,"message":{"role":"assistant","tool_calls":null,"content":"Hello! Envoy sits in front of the upstream and forwards each request once its filters have run; here it answers with a short completion of about sixty tokens, long enough to look like a real reply."},"finish_reason":"stop"}],"usage":{"prompt_tokens":38,"total_tokens":102,"completion_tokens":64,"prompt_tokens_details":{"cached_tokens":0},"service_tier":"standard"}}"#;

/// Host calls by name, counted.
#[derive(Default)]
struct Calls(RefCell<BTreeMap<&'static str, u64>>);

impl Calls {
    fn hit(&self, name: &'static str) {
        *self.0.borrow_mut().entry(name).or_default() += 1;
    }
    fn take(&self) -> BTreeMap<&'static str, u64> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

/// Shared data that counts its reads and writes.
struct CountingStore<'a> {
    inner: &'a MemoryStore,
    calls: &'a Calls,
}

impl SharedStore for CountingStore<'_> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.calls.hit("get_shared_data");
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.calls.hit("set_shared_data");
        self.inner.set(key, value, cas)
    }
}

/// One Envoy worker serving one stream at a time, in memory.
struct BenchHost {
    now_ms: Cell<i64>,
    request_headers: RefCell<Vec<(String, Vec<u8>)>>,
    request_body: RefCell<Vec<u8>>,
    response_headers: RefCell<Vec<(String, Vec<u8>)>>,
    response_chunk: RefCell<Vec<u8>>,
    store: MemoryStore,
    calls: Calls,
    metrics: RefCell<Vec<i64>>,
    // Leaked once per host: `store()` hands out a borrow of the counting view.
    counting: Cell<Option<&'static CountingStore<'static>>>,
}

impl BenchHost {
    fn new() -> &'static BenchHost {
        let host: &'static BenchHost = Box::leak(Box::new(BenchHost {
            now_ms: Cell::new(1_790_000_000_000),
            request_headers: RefCell::default(),
            request_body: RefCell::default(),
            response_headers: RefCell::default(),
            response_chunk: RefCell::default(),
            store: MemoryStore::new(),
            calls: Calls::default(),
            metrics: RefCell::default(),
            counting: Cell::new(None),
        }));
        let counting: &'static CountingStore<'static> = Box::leak(Box::new(CountingStore {
            inner: &host.store,
            calls: &host.calls,
        }));
        host.counting.set(Some(counting));
        host
    }
}

impl Host for BenchHost {
    fn now_unix_ms(&self) -> Option<i64> {
        self.calls.hit("get_current_time");
        Some(self.now_ms.get())
    }
    fn log(&self, _level: LogLevel, _message: &str) {
        self.calls.hit("log");
    }
    fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.calls.hit("get_request_headers");
        self.request_headers.borrow().clone()
    }
    fn set_request_header(&self, name: &str, value: &[u8]) -> bool {
        self.calls.hit("set_request_header");
        let mut headers = self.request_headers.borrow_mut();
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        headers.push((name.to_string(), value.to_vec()));
        true
    }
    fn remove_request_header(&self, name: &str) -> bool {
        self.calls.hit("remove_request_header");
        self.request_headers
            .borrow_mut()
            .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        true
    }
    fn request_body(&self) -> Option<Vec<u8>> {
        self.calls.hit("get_request_body");
        Some(self.request_body.borrow().clone())
    }
    fn response_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.calls.hit("get_response_headers");
        self.response_headers.borrow().clone()
    }
    fn response_chunk(&self, size: usize) -> Option<Vec<u8>> {
        self.calls.hit("get_response_body");
        let chunk = self.response_chunk.borrow();
        Some(chunk.get(..size.min(chunk.len()))?.to_vec())
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.calls.hit("get_property");
        (path == ["source", "address"]).then(|| b"127.0.0.1:51234".to_vec())
    }
    fn send_local_reply(&self, status: u32, _headers: &[(&str, &str)], body: &[u8]) {
        panic!(
            "refused: {status} {}",
            String::from_utf8_lossy(body).into_owned()
        );
    }
    fn set_filter_state(&self, _name: &str, _value: &[u8]) {
        self.calls.hit("set_property (filter state)");
    }
    fn store(&self) -> &dyn SharedStore {
        match self.counting.get() {
            Some(counting) => counting,
            None => &self.store,
        }
    }
    fn define_metric(&self, _kind: MetricKind, _name: &str) -> Option<u32> {
        self.calls.hit("define_metric");
        let mut metrics = self.metrics.borrow_mut();
        metrics.push(0);
        u32::try_from(metrics.len() - 1).ok()
    }
    fn increment_metric(&self, id: u32, by: i64) {
        // Buffered in the VM and sent on a timer (glue::host): not a host call per request.
        if let Some(v) = self.metrics.borrow_mut().get_mut(id as usize) {
            *v += by;
        }
    }
    fn record_metric(&self, id: u32, value: u64) {
        self.calls.hit("record_metric");
        if let Some(v) = self.metrics.borrow_mut().get_mut(id as usize) {
            *v = value as i64;
        }
    }
    fn enqueue_alert(&self, _body: &[u8]) {
        self.calls.hit("enqueue_shared_queue");
    }
    fn dispatch_call(&self, _: &str, _: &str, _: &str, _: &[u8], _: u64) -> Option<u32> {
        self.calls.hit("dispatch_http_call");
        None
    }
    fn call_response(&self, _body_size: usize) -> (u32, Vec<u8>) {
        (0, Vec::new())
    }
    fn resume_request(&self) {
        self.calls.hit("resume_http_request");
    }
    fn mark_spent(&self, _token_id: &str) {
        self.calls.hit("enqueue_shared_queue");
    }
}

/// A loaded configuration with one minted token `bench` (with `rules`) and 9 others like it.
struct Gateway {
    host: &'static BenchHost,
    active: Rc<Active>,
    authorization: Vec<u8>,
}

impl Gateway {
    fn new(rules: Value) -> Gateway {
        let master = MasterKey::from_bytes(&[7u8; 32]).unwrap();
        let verifier = TokenVerifier::new(master.digest_key()).unwrap();
        let sealed = seal::seal(
            master.seal_key(),
            "prod",
            REAL_KEY.as_bytes(),
            &[3u8; seal::NONCE_LEN],
        )
        .unwrap();
        let mut records = Vec::new();
        let mut authorization = Vec::new();
        for i in 0..10u8 {
            let id = if i == 0 {
                "bench".to_string()
            } else {
                format!("other-{i}")
            };
            let (full, secret) = format_token(&id, &[i + 1; SECRET_BYTES]);
            if i == 0 {
                authorization = [b"Bearer ".as_slice(), full.expose()].concat();
            }
            let digest = STANDARD.encode(verifier.digest(&id, secret.expose()));
            let mut record = json!({"id": id, "digest": digest, "upstream_key": "prod",
                                    "owner": format!("{id}@example.com")});
            record
                .as_object_mut()
                .unwrap()
                .extend(rules.as_object().unwrap().clone());
            records.push(record);
        }
        let doc = json!({"version": 1, "upstream_keys": [{"id": "prod", "sealed": sealed}],
                         "tokens": records});
        let bytes = serde_json::to_vec(&doc).unwrap();
        let host = BenchHost::new();
        let head = token_stream::parse_head(&bytes).unwrap();
        let ids = Rc::new(MetricIds::default());
        let active = Rc::new(Active::load(host, &bytes, &head, &master, &ids, None).unwrap());
        Gateway {
            host,
            active,
            authorization,
        }
    }

    /// One request through every phase; panics if it was refused.
    fn request(&self) {
        let h = self.host;
        h.now_ms.set(h.now_ms.get() + 1);
        *h.request_headers.borrow_mut() = vec![
            (":method".into(), b"POST".to_vec()),
            (":path".into(), PATH.as_bytes().to_vec()),
            (":authority".into(), b"127.0.0.1:10000".to_vec()),
            ("authorization".into(), self.authorization.clone()),
            ("content-type".into(), b"application/json".to_vec()),
            (
                "content-length".into(),
                REQUEST.len().to_string().into_bytes(),
            ),
        ];
        *h.request_body.borrow_mut() = REQUEST.as_bytes().to_vec();
        let mut stream = Stream::new(Some(self.active.clone()));
        assert_eq!(stream.on_request_headers(h, false), Flow::Continue);
        assert_eq!(
            stream.on_request_body(h, REQUEST.len(), true),
            Flow::Continue
        );
        *h.response_headers.borrow_mut() = vec![
            (":status".into(), b"200".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
        ];
        stream.on_response_headers(h, false);
        *h.response_chunk.borrow_mut() = RESPONSE.as_bytes().to_vec();
        stream.on_response_body(h, RESPONSE.len(), true);
        stream.on_log(h);
    }
}

fn all_rules() -> Value {
    json!({
        "budget": {"limit_usd": "1000000", "window": "monthly"},
        "rate_limit": {"requests_per_minute": 1_000_000_000u64,
                       "tokens_per_minute": 1_000_000_000_000u64},
        "source_cidrs": ["127.0.0.0/8", "::1/128"],
        "models": {"allow": ["mistral-small-*", "codestral-*"], "max_tokens": 4096},
    })
}

fn print_host_calls(name: &str, gateway: &Gateway) {
    gateway.request(); // first request: records read, stats defined
    gateway.host.calls.take();
    gateway.request();
    let calls = gateway.host.calls.take();
    let total: u64 = calls.values().sum();
    let list: Vec<String> = calls.iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!(
        "decision/{name}: {total} host calls per request: {}",
        list.join(", ")
    );
}

fn decision(c: &mut Criterion) {
    let norules = Gateway::new(json!({}));
    let allrules = Gateway::new(all_rules());
    print_host_calls("norules", &norules);
    print_host_calls("allrules", &allrules);

    let mut group = c.benchmark_group("decision");
    group.bench_function("request_norules", |b| b.iter(|| norules.request()));
    group.bench_function("request_allrules", |b| b.iter(|| allrules.request()));

    // The pieces, with the every-rule token.
    let host = allrules.host;
    let active = allrules.active.clone();
    let authorization = allrules.authorization.clone();
    group.bench_function("authenticate", |b| {
        b.iter(|| {
            let credentials = Credentials {
                authorization: Some(black_box(authorization.as_slice())),
                x_api_key: None,
            };
            let lookup = |id: &str| active.token(host, id);
            authenticate(&lookup, &active.verifier, &credentials, 1_790_000_000).unwrap()
        })
    });
    let record = active.token(host, "bench").unwrap();
    let settings = &active.policy.settings;
    group.bench_function("check_route+judge_body", |b| {
        b.iter(|| {
            let mut would_deny = Vec::new();
            let mut judge = Judge::new(false, false, &mut would_deny);
            let route = routes::lookup(b"POST", black_box(PATH));
            let kind = access::check_route(&record.rules, &mut judge, route).unwrap();
            access::judge_body(
                &record.rules,
                &mut judge,
                settings,
                kind,
                Some(black_box(REQUEST.as_bytes())),
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
