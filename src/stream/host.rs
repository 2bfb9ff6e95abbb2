//! Everything one HTTP stream needs from its host, as a small trait. In Envoy it is backed by
//! proxy-wasm host calls (`glue::host`); natively by a recording fake, so a stream can be driven
//! through every phase and every early end without Envoy.

use crate::store::SharedStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

pub trait Host {
    fn now_unix_ms(&self) -> Option<i64>;
    fn log(&self, level: LogLevel, message: &str);

    /// Every request header, in one call.
    fn request_headers(&self) -> Vec<(String, Vec<u8>)>;
    fn set_request_header(&self, name: &str, value: &[u8]) -> bool;
    fn remove_request_header(&self, name: &str) -> bool;
    /// The whole request body buffered so far.
    fn request_body(&self) -> Option<Vec<u8>>;
    /// Every response header, in one call.
    fn response_headers(&self) -> Vec<(String, Vec<u8>)>;
    /// The response body chunk of the current callback.
    fn response_chunk(&self, size: usize) -> Option<Vec<u8>>;
    /// An Envoy attribute such as `source.address`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;

    fn send_local_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// Filter state `wasm.<name>`, read by access logs.
    fn set_filter_state(&self, name: &str, value: &[u8]);

    /// Shared data, visible to every worker of the VM.
    fn store(&self) -> &dyn SharedStore;
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32>;
    fn increment_metric(&self, id: u32, by: i64);
    fn record_metric(&self, id: u32, value: u64);
    /// Sends stat changes the host buffered (`increment_metric`/`record_metric` may be batched
    /// and sent on a timer): called where a change must be visible at once.
    fn flush_metrics(&self) {}
    /// Hands a budget alert to the root context, which delivers it off the request path.
    fn enqueue_alert(&self, body: &[u8]);

    /// Fleet mode: POSTs `body` through Envoy's callout from this stream; the reply comes to
    /// `Stream::on_call_response` with the returned id.
    fn dispatch_call(
        &self,
        cluster: &str,
        authority: &str,
        path: &str,
        body: &[u8],
        timeout_ms: u64,
    ) -> Option<u32>;
    /// The status and body of the callout reply being delivered.
    fn call_response(&self, body_size: usize) -> (u32, Vec<u8>);
    /// Lets a request held during a callout go on.
    fn resume_request(&self);
    /// Fleet mode: this token's spend changed; the syncer flushes it to etcd.
    fn mark_spent(&self, token_id: &str);
}
