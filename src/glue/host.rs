//! `stream::host::Host` over proxy-wasm host calls, panic-free: every host error becomes a value
//! (the SDK's trait helpers unwrap, and a panic in the VM is an outage).

use std::cell::RefCell;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType};

use super::host_store::HostStore;
use crate::config::source::{PolicySource, RangeReader};
use crate::store::SharedStore;
use crate::stream::host::{Host, LogLevel, MetricKind};
use crate::stream::metrics::PendingMetrics;

thread_local! {
    /// Counter increments of this VM (one per worker thread) not sent to Envoy yet: a request's
    /// counters are added up here and sent by the root context's timer (`flush_metrics`), one
    /// host call per counter that changed instead of one per request and counter. Increments
    /// commute, so workers flushing at different times add up right; gauges are not buffered.
    static PENDING_METRICS: RefCell<PendingMetrics> = RefCell::new(PendingMetrics::default());
}

/// Sends every buffered stat change to Envoy.
pub fn flush_metrics() {
    let pending = PENDING_METRICS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (id, by) in pending.counters {
        let _ = hostcalls::increment_metric(id, by);
    }
}

/// The host of one HTTP stream. `alert_queue`: the shared queue budget alerts go to.
pub struct WasmHost {
    pub alert_queue: Option<u32>,
}

/// The shared queue budget alerts' webhook bodies go to: enqueued by a stream (single-Envoy mode)
/// or the syncer (fleet mode), sent by the worker root contexts on their tick.
pub const ALERT_QUEUE: &str = "shieldkey.alerts";
/// The shared queue token ids whose spend changed go to (fleet mode; the syncer drains it).
pub const SPENT_QUEUE: &str = "shieldkey.fleet.spent";
/// The filter's `vm_id`: the namespace of shared data and queues.
pub const VM_ID: &str = "shieldkey";

pub fn log(level: LogLevel, message: &str) {
    let level = match level {
        LogLevel::Debug => proxy_wasm::types::LogLevel::Debug,
        LogLevel::Info => proxy_wasm::types::LogLevel::Info,
        LogLevel::Warn => proxy_wasm::types::LogLevel::Warn,
        LogLevel::Error => proxy_wasm::types::LogLevel::Error,
    };
    let _ = hostcalls::log(level, message);
}

pub fn now_unix_ms() -> Option<i64> {
    let now = hostcalls::get_current_time().ok()?;
    let since = now.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// Envoy's `node.id`.
pub fn node_id() -> Option<String> {
    // `xds.node` is the attribute's name in current Envoy; `node` in older ones.
    [vec!["xds", "node", "id"], vec!["node", "id"]]
        .into_iter()
        .find_map(|path| hostcalls::get_property(path).ok().flatten())
        .and_then(|id| String::from_utf8(id).ok())
        .filter(|s| !s.is_empty())
}

/// The plugin configuration, read from Envoy a piece at a time (`config::source`).
pub struct PluginConfiguration;

impl PolicySource for PluginConfiguration {
    fn reader(&self) -> Box<dyn std::io::Read + '_> {
        Box::new(RangeReader::new(|offset, len| {
            hostcalls::get_buffer(BufferType::PluginConfiguration, offset, len)
                .ok()
                .flatten()
        }))
    }
}

/// POSTs `body` through Envoy's HTTP callout; the reply comes to the root context's
/// `on_http_call_response` with the returned token.
pub fn dispatch_post(
    cluster: &str,
    path: &str,
    authority: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
    timeout: Duration,
) -> Option<u32> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra_headers);
    hostcalls::dispatch_http_call(cluster, headers, Some(body), vec![], timeout).ok()
}

impl Host for WasmHost {
    fn now_unix_ms(&self) -> Option<i64> {
        now_unix_ms()
    }

    fn log(&self, level: LogLevel, message: &str) {
        log(level, message);
    }

    fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        // Header names are tokens (ASCII): Envoy's codecs refuse anything else, so the SDK's
        // UTF-8 decoding of names cannot fail.
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default()
    }

    fn set_request_header(&self, name: &str, value: &[u8]) -> bool {
        hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value)).is_ok()
    }

    fn remove_request_header(&self, name: &str) -> bool {
        hostcalls::remove_map_value(MapType::HttpRequestHeaders, name).is_ok()
    }

    fn request_body(&self) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, usize::MAX)
            .ok()
            .flatten()
    }

    fn response_headers(&self) -> Vec<(String, Vec<u8>)> {
        hostcalls::get_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default()
    }

    fn response_chunk(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .ok()
            .flatten()
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn send_local_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let _ = hostcalls::send_http_response(status, headers.to_vec(), Some(body));
    }

    fn set_filter_state(&self, name: &str, value: &[u8]) {
        if hostcalls::set_property(vec![name], Some(value)).is_err() {
            // The request's audit record would lack ShieldKey's fields: never silently.
            log(
                LogLevel::Error,
                &format!("shieldkey: could not write filter state wasm.{name}"),
            );
        }
    }

    fn store(&self) -> &dyn SharedStore {
        &HostStore
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
        };
        hostcalls::define_metric(kind, name).ok()
    }

    fn increment_metric(&self, id: u32, by: i64) {
        PENDING_METRICS.with(|p| p.borrow_mut().increment(id, by));
    }

    fn record_metric(&self, id: u32, value: u64) {
        // Gauges are set at once, never buffered: workers flush at different times, and a
        // buffered older value could land after a newer one from another worker.
        let _ = hostcalls::record_metric(id, value);
    }

    fn flush_metrics(&self) {
        flush_metrics();
    }

    fn enqueue_alert(&self, body: &[u8]) {
        if let Some(queue) = self.alert_queue {
            let _ = hostcalls::enqueue_shared_queue(queue, Some(body));
        }
    }

    fn dispatch_call(
        &self,
        cluster: &str,
        authority: &str,
        path: &str,
        body: &[u8],
        timeout_ms: u64,
    ) -> Option<u32> {
        dispatch_post(
            cluster,
            path,
            authority,
            body,
            &[
                ("x-envoy-retry-on", "connect-failure,refused-stream"),
                ("x-envoy-max-retries", "2"),
            ],
            Duration::from_millis(timeout_ms),
        )
    }

    fn call_response(&self, body_size: usize) -> (u32, Vec<u8>) {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        (status, body)
    }

    fn resume_request(&self) {
        let _ = hostcalls::resume_http_request();
    }

    fn mark_spent(&self, token_id: &str) {
        // The syncer registers the queue; until it has, there is nothing to tell.
        if let Ok(Some(queue)) = hostcalls::resolve_shared_queue(VM_ID, SPENT_QUEUE) {
            let _ = hostcalls::enqueue_shared_queue(queue, Some(token_id.as_bytes()));
        }
    }
}
