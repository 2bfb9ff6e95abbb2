//! A recording host for native lifecycle tests: one "Envoy" (shared data, stats, logs) serving
//! one stream at a time, with the stream's headers, bodies and outcome kept for assertions.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;

use super::active::Active;
use super::host::{Host, LogLevel, MetricKind};
use super::metrics::MetricIds;
use super::{Flow, Stream};
use crate::config::raw;
use crate::master_key::MasterKey;
use crate::seal;
use crate::store::{MemoryStore, SharedStore};
use crate::token::format_token;
use crate::token_digest::TokenVerifier;

pub const REAL_KEY: &str = "RealMistralKey0123456789abcdefXY";

#[derive(Default)]
pub struct FakeHost {
    pub now_ms: Cell<i64>,
    pub request_headers: RefCell<Vec<(String, Vec<u8>)>>,
    /// Everything the client sent so far (Envoy buffers it while the filter pauses).
    pub request_body: RefCell<Vec<u8>>,
    pub response_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub response_chunk: RefCell<Vec<u8>>,
    pub source_address: RefCell<Option<Vec<u8>>>,
    pub reply: RefCell<Option<(u32, Vec<u8>)>>,
    pub filter_state: RefCell<HashMap<String, String>>,
    pub store: MemoryStore,
    metrics: RefCell<Vec<(String, i64)>>,
    /// How often each name was defined (Envoy allocates an entry every time).
    pub definitions: RefCell<HashMap<String, usize>>,
    pub logs: RefCell<Vec<String>>,
    pub alerts: RefCell<Vec<Vec<u8>>>,
    /// Callouts sent by streams (path, body), and the reply the next delivery carries.
    pub calls: RefCell<Vec<(String, Vec<u8>)>>,
    pub call_reply: RefCell<(u32, Vec<u8>)>,
    pub resumed: Cell<u32>,
    pub spent_marks: RefCell<Vec<String>>,
    /// Calls into the host (each one a proxy-wasm host call in Envoy), shared data apart.
    pub host_calls: Cell<usize>,
}

fn get(list: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    list.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

impl FakeHost {
    /// The value of stat `name` (0 when never defined or bumped).
    pub fn stat(&self, name: &str) -> i64 {
        self.metrics
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }

    pub fn stat_names(&self) -> Vec<String> {
        self.metrics
            .borrow()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        get(&self.request_headers.borrow(), name).map(|v| String::from_utf8_lossy(&v).into())
    }

    pub fn replied(&self) -> Option<(u32, Value)> {
        self.reply
            .borrow()
            .as_ref()
            .map(|(status, body)| (*status, serde_json::from_slice(body).unwrap_or(Value::Null)))
    }
}

impl Host for FakeHost {
    fn now_unix_ms(&self) -> Option<i64> {
        self.host_calls.set(self.host_calls.get() + 1);
        Some(self.now_ms.get())
    }
    fn log(&self, _level: LogLevel, message: &str) {
        self.host_calls.set(self.host_calls.get() + 1);
        self.logs.borrow_mut().push(message.to_string());
    }
    fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.host_calls.set(self.host_calls.get() + 1);
        self.request_headers.borrow().clone()
    }
    fn set_request_header(&self, name: &str, value: &[u8]) -> bool {
        self.host_calls.set(self.host_calls.get() + 1);
        self.remove_request_header(name);
        self.request_headers
            .borrow_mut()
            .push((name.to_string(), value.to_vec()));
        true
    }
    fn remove_request_header(&self, name: &str) -> bool {
        self.host_calls.set(self.host_calls.get() + 1);
        self.request_headers
            .borrow_mut()
            .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        true
    }
    fn request_body(&self) -> Option<Vec<u8>> {
        self.host_calls.set(self.host_calls.get() + 1);
        Some(self.request_body.borrow().clone())
    }
    fn response_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.host_calls.set(self.host_calls.get() + 1);
        self.response_headers.borrow().clone()
    }
    fn response_chunk(&self, size: usize) -> Option<Vec<u8>> {
        self.host_calls.set(self.host_calls.get() + 1);
        let chunk = self.response_chunk.borrow();
        Some(chunk.get(..size.min(chunk.len()))?.to_vec())
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.host_calls.set(self.host_calls.get() + 1);
        (path == ["source", "address"])
            .then(|| self.source_address.borrow().clone())
            .flatten()
    }
    fn send_local_reply(&self, status: u32, _headers: &[(&str, &str)], body: &[u8]) {
        self.host_calls.set(self.host_calls.get() + 1);
        *self.reply.borrow_mut() = Some((status, body.to_vec()));
    }
    /// Keeps the audit fragment as the fields it carries (`shieldkey_<field>`, nulls left out),
    /// after checking it splices into a JSON record as the access logs do.
    fn set_filter_state(&self, name: &str, value: &[u8]) {
        self.host_calls.set(self.host_calls.get() + 1);
        assert_eq!(name, crate::audit::FILTER_STATE_NAME);
        let text = std::str::from_utf8(value).unwrap();
        let record: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&format!("{{\"status\":0{text}}}")).unwrap();
        let mut state = self.filter_state.borrow_mut();
        state.clear();
        for (field, value) in record {
            if let Some(text) = value.as_str() {
                state.insert(format!("shieldkey_{field}"), text.to_string());
            }
        }
    }
    fn store(&self) -> &dyn SharedStore {
        &self.store
    }
    fn define_metric(&self, _kind: MetricKind, name: &str) -> Option<u32> {
        self.host_calls.set(self.host_calls.get() + 1);
        *self
            .definitions
            .borrow_mut()
            .entry(name.to_string())
            .or_default() += 1;
        let mut metrics = self.metrics.borrow_mut();
        let index = match metrics.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                metrics.push((name.to_string(), 0));
                metrics.len() - 1
            }
        };
        u32::try_from(index).ok()
    }
    fn increment_metric(&self, id: u32, by: i64) {
        // Buffered in the VM and sent on a timer (`glue::host`): not a host call per request.
        if let Some((_, v)) = self.metrics.borrow_mut().get_mut(id as usize) {
            *v += by;
        }
    }
    fn record_metric(&self, id: u32, value: u64) {
        self.host_calls.set(self.host_calls.get() + 1);
        if let Some((_, v)) = self.metrics.borrow_mut().get_mut(id as usize) {
            *v = value as i64;
        }
    }
    fn enqueue_alert(&self, body: &[u8]) {
        self.host_calls.set(self.host_calls.get() + 1);
        self.alerts.borrow_mut().push(body.to_vec());
    }
    fn dispatch_call(
        &self,
        _cluster: &str,
        _authority: &str,
        path: &str,
        body: &[u8],
        _timeout_ms: u64,
    ) -> Option<u32> {
        self.host_calls.set(self.host_calls.get() + 1);
        let mut calls = self.calls.borrow_mut();
        calls.push((path.to_string(), body.to_vec()));
        u32::try_from(calls.len()).ok()
    }
    fn call_response(&self, _body_size: usize) -> (u32, Vec<u8>) {
        self.host_calls.set(self.host_calls.get() + 1);
        self.call_reply.borrow().clone()
    }
    fn resume_request(&self) {
        self.host_calls.set(self.host_calls.get() + 1);
        self.resumed.set(self.resumed.get() + 1);
    }
    fn mark_spent(&self, token_id: &str) {
        self.host_calls.set(self.host_calls.get() + 1);
        self.spent_marks.borrow_mut().push(token_id.to_string());
    }
}

/// A gateway under test: the fake host, a loaded policy, and the tokens minted for it.
pub struct Gateway {
    pub host: FakeHost,
    pub active: Rc<Active>,
    pub tokens: HashMap<String, String>,
    pub metric_ids: Rc<MetricIds>,
    pub master: MasterKey,
    pub document: RefCell<Value>,
}

impl Gateway {
    /// `tokens`: (id, rules as JSON merged into the token record).
    pub fn new(tokens: &[(&str, Value)], extra: Value) -> Gateway {
        let master = MasterKey::from_bytes(&[7u8; 32]).unwrap();
        let verifier = TokenVerifier::new(master.digest_key()).unwrap();
        let sealed = seal::seal(
            master.seal_key(),
            "prod",
            REAL_KEY.as_bytes(),
            &[3u8; seal::NONCE_LEN],
        )
        .unwrap();
        let mut minted = HashMap::new();
        let mut records = Vec::new();
        for (i, (id, rules)) in tokens.iter().enumerate() {
            let (full, secret) = format_token(id, &[i as u8 + 1; crate::token::SECRET_BYTES]);
            let digest = STANDARD.encode(verifier.digest(id, secret.expose()));
            let mut record =
                serde_json::json!({"id": id, "digest": digest, "upstream_key": "prod"});
            if let (Some(r), Some(extra)) = (record.as_object_mut(), rules.as_object()) {
                r.extend(extra.clone());
            }
            records.push(record);
            minted.insert(
                id.to_string(),
                String::from_utf8(full.expose().to_vec()).unwrap(),
            );
        }
        let mut doc = serde_json::json!({
            "version": 1,
            "upstream_keys": [{"id": "prod", "sealed": sealed}],
            "tokens": records,
        });
        if let (Some(d), Some(extra)) = (doc.as_object_mut(), extra.as_object()) {
            d.extend(extra.clone());
        }
        let bytes = serde_json::to_vec(&doc).unwrap();
        let host = FakeHost::default();
        host.now_ms.set(1_790_000_000_000);
        let metric_ids = Rc::new(MetricIds::default());
        let head = crate::config::token_stream::parse_head(&bytes).unwrap();
        let active =
            Rc::new(Active::load(&host, &bytes, &head, &master, &metric_ids, None).unwrap());
        Gateway {
            host,
            active,
            tokens: minted,
            metric_ids,
            master,
            document: RefCell::new(doc),
        }
    }

    /// Applies a new configuration (`change` edits the policy document), as ECDS would: the VM,
    /// its shared data and its stat ids stay.
    pub fn reload(&mut self, change: impl FnOnce(&mut Value)) {
        self.try_reload(change).unwrap();
    }

    /// `reload`, or the configuration's error (the gateway then keeps its configuration).
    pub fn try_reload(
        &mut self,
        change: impl FnOnce(&mut Value),
    ) -> Result<(), crate::config::ConfigError> {
        let mut doc = self.document();
        change(&mut doc);
        let bytes = serde_json::to_vec(&doc).unwrap();
        let head = crate::config::token_stream::parse_head(&bytes)?;
        self.active = Rc::new(Active::load(
            &self.host,
            &bytes,
            &head,
            &self.master,
            &self.metric_ids,
            None,
        )?);
        *self.document.borrow_mut() = doc;
        Ok(())
    }

    /// The same gateway in fleet mode: records and base as the syncer writes them, leases
    /// claimed from etcd through the stream's callouts (answered by the test).
    pub fn into_fleet(mut self) -> Gateway {
        use crate::config::compile::{compile, CompileOptions};
        use crate::ledger::{Ledger, SharedDataLedger};
        let doc = self.document();
        let raw = raw::parse(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let policy = compile(&raw, "fp".into(), &CompileOptions::default()).unwrap();
        for token in &policy.tokens {
            let record = crate::token_record::encode(token);
            crate::policy_store::put_newest(&self.host.store, &token.id, 1, Some(&record)).unwrap();
            SharedDataLedger::new(&self.host.store)
                .ensure(&token.id)
                .unwrap();
        }
        let mut base = doc.clone();
        base["tokens"] = serde_json::json!([]);
        let fleet_raw: crate::config::raw::RawFleet =
            serde_json::from_value(serde_json::json!({"cluster": "etcd"})).unwrap();
        let mut with_fleet = raw.clone();
        with_fleet.tokens.clear();
        with_fleet.upstream_keys.clear();
        with_fleet.fleet = Some(fleet_raw.clone());
        let settings = crate::fleet::compile_fleet(&with_fleet, &fleet_raw).unwrap();
        let context = super::active::FleetContext {
            settings,
            node: "e1".into(),
        };
        self.active = Rc::new(
            Active::from_fleet_base(
                &self.host,
                &serde_json::to_vec(&base).unwrap(),
                &self.master,
                &self.metric_ids,
                context,
            )
            .unwrap(),
        );
        self
    }

    fn document(&self) -> Value {
        self.document.borrow().clone()
    }

    /// Starts a request: fresh per-stream host state and a new stream.
    pub fn request(&self, method: &str, path: &str, token: &str) -> Stream {
        let h = &self.host;
        *h.request_headers.borrow_mut() = vec![
            (":method".into(), method.as_bytes().to_vec()),
            (":path".into(), path.as_bytes().to_vec()),
            (
                "authorization".into(),
                format!("Bearer {}", self.tokens.get(token).map_or(token, |t| t)).into_bytes(),
            ),
            ("accept-encoding".into(), b"gzip, deflate".to_vec()),
        ];
        h.request_body.borrow_mut().clear();
        h.response_headers.borrow_mut().clear();
        h.reply.borrow_mut().take();
        h.filter_state.borrow_mut().clear();
        *h.source_address.borrow_mut() = Some(b"127.0.0.1:5000".to_vec());
        Stream::new(Some(self.active.clone()))
    }

    /// Delivers one request body chunk.
    pub fn body(&self, stream: &mut Stream, chunk: &[u8], end_of_stream: bool) -> Flow {
        self.host.request_body.borrow_mut().extend_from_slice(chunk);
        let size = self.host.request_body.borrow().len();
        stream.on_request_body(&self.host, size, end_of_stream)
    }

    pub fn respond(&self, stream: &mut Stream, status: u16, headers: &[(&str, &str)]) {
        let mut list = vec![(":status".to_string(), status.to_string().into_bytes())];
        list.extend(
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        );
        *self.host.response_headers.borrow_mut() = list;
        stream.on_response_headers(&self.host, false);
    }

    pub fn response_chunk(&self, stream: &mut Stream, chunk: &[u8], end_of_stream: bool) {
        *self.host.response_chunk.borrow_mut() = chunk.to_vec();
        stream.on_response_body(&self.host, chunk.len(), end_of_stream);
    }

    /// The token's spend in nano-USD, from its stat.
    pub fn spend(&self, id: &str) -> i64 {
        self.host
            .stat(&format!("shieldkey.token_id.{id}.spend_nano_usd"))
    }
}
