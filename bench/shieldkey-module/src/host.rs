//! `shieldkey::stream::host::Host` over Envoy's dynamic-module callbacks for one stream: the
//! native counterpart of `src/glue/host.rs`. Every callback result is copied into module memory at
//! once (Envoy's buffers live only until the end of the hook), and every failure becomes a value.

use std::ffi::c_void;

use shieldkey::store::SharedStore;
use shieldkey::stream::host::{Host, LogLevel, MetricKind};

use crate::shared::{self, ProcessStore};
use envoy_module_abi::{self as abi, envoy_bytes, EnvoyBuffer, EnvoyHttpHeader, ModuleBuffer};

/// The host of one stream: Envoy's filter pointer (null while a configuration loads, when there
/// is no stream: then every stream call answers "nothing").
pub struct NativeHost {
    filter: *mut c_void,
}

/// The prefix proxy-wasm gives a filter's filter-state values (`wasm.<name>`): the access log of
/// envoy/demo.yaml reads `%FILTER_STATE(wasm.shieldkey_audit:PLAIN)%`.
const FILTER_STATE_PREFIX: &str = "wasm.";

pub fn log(level: LogLevel, message: &str) {
    // Warnings and errors only, to stderr (Envoy's log file in the harness). Messages from the
    // core never hold a secret.
    if matches!(level, LogLevel::Warn | LogLevel::Error) {
        eprintln!("[shieldkey-module] {message}");
    }
}

impl NativeHost {
    pub fn new(filter: *mut c_void) -> Self {
        NativeHost { filter }
    }

    /// No stream: for loading a configuration.
    pub fn detached() -> Self {
        NativeHost::new(std::ptr::null_mut())
    }

    fn set_request_header_to(&self, name: &str, value: ModuleBuffer) -> bool {
        if self.filter.is_null() {
            return false;
        }
        // SAFETY: key and value are valid for the call; Envoy copies them.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.filter,
                abi::REQUEST_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        }
    }

    /// One of Envoy's "how many, then fill them in" lists (headers, body slices): empty without
    /// a stream, when there is none, or when filling fails.
    fn envoy_list<T: Copy>(
        &self,
        empty: T,
        count: impl FnOnce(*mut c_void) -> usize,
        fill: impl FnOnce(*mut c_void, *mut T) -> bool,
    ) -> Vec<T> {
        if self.filter.is_null() {
            return Vec::new();
        }
        let n = count(self.filter);
        if n == 0 {
            return Vec::new();
        }
        let mut list = vec![empty; n];
        if fill(self.filter, list.as_mut_ptr()) {
            list
        } else {
            Vec::new()
        }
    }

    fn headers(&self, header_type: abi::HeaderType) -> Vec<(String, Vec<u8>)> {
        let raw = self.envoy_list(
            EnvoyHttpHeader::EMPTY,
            // SAFETY: `filter` is Envoy's live filter for the duration of the hook.
            |f| unsafe { abi::envoy_dynamic_module_callback_http_get_headers_size(f, header_type) },
            // SAFETY: the list has room for the count Envoy reported for this map.
            |f, list| unsafe {
                abi::envoy_dynamic_module_callback_http_get_headers(f, header_type, list)
            },
        );
        raw.iter()
            .map(|h| {
                // SAFETY: Envoy filled in pointers into its header map, valid during the hook.
                let (key, value) = unsafe {
                    (
                        envoy_bytes(h.key_ptr, h.key_length),
                        envoy_bytes(h.value_ptr, h.value_length),
                    )
                };
                // Header names are tokens (ASCII): Envoy's codecs refuse anything else.
                (String::from_utf8_lossy(key).into_owned(), value.to_vec())
            })
            .collect()
    }

    /// Appends the slices of one body buffer to `out`.
    fn append_body(&self, body_type: abi::BodyType, out: &mut Vec<u8>) {
        let chunks = self.envoy_list(
            EnvoyBuffer::EMPTY,
            // SAFETY: `filter` is Envoy's live filter for the duration of the hook.
            |f| unsafe {
                abi::envoy_dynamic_module_callback_http_get_body_chunks_size(f, body_type)
            },
            // SAFETY: the list has room for the count Envoy reported for this buffer.
            |f, list| unsafe {
                abi::envoy_dynamic_module_callback_http_get_body_chunks(f, body_type, list)
            },
        );
        for chunk in &chunks {
            // SAFETY: Envoy filled in its buffer's slices, valid during the hook.
            out.extend_from_slice(unsafe { envoy_bytes(chunk.ptr, chunk.length) });
        }
    }

    fn body_size(&self, body_type: abi::BodyType) -> usize {
        if self.filter.is_null() {
            return 0;
        }
        // SAFETY: `filter` is Envoy's live filter for the duration of the hook.
        unsafe { abi::envoy_dynamic_module_callback_http_get_body_size(self.filter, body_type) }
    }

    /// Whether the request chunk of this hook is Envoy's buffered body itself (then the two must
    /// not be added up).
    fn received_is_buffered(&self) -> bool {
        !self.filter.is_null()
            // SAFETY: `filter` is Envoy's live filter for the duration of the hook.
            && unsafe {
                abi::envoy_dynamic_module_callback_http_received_buffered_request_body(self.filter)
            }
    }

    /// The request body so far: what Envoy buffered (this filter returned
    /// `StopIterationAndBuffer` for the earlier chunks; at the end of the stream Envoy 1.40 adds
    /// the last chunk to that buffer before the hook) and this hook's chunk, if any. The
    /// counterpart of proxy-wasm's `body_size`.
    pub fn request_body_size(&self) -> usize {
        let received = self.body_size(abi::RECEIVED_REQUEST_BODY);
        if self.received_is_buffered() {
            return received;
        }
        received.saturating_add(self.body_size(abi::BUFFERED_REQUEST_BODY))
    }

    /// This hook's response chunk length.
    pub fn response_chunk_size(&self) -> usize {
        self.body_size(abi::RECEIVED_RESPONSE_BODY)
    }
}

impl Host for NativeHost {
    fn now_unix_ms(&self) -> Option<i64> {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        i64::try_from(since.as_millis()).ok()
    }

    fn log(&self, level: LogLevel, message: &str) {
        log(level, message);
    }

    fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.headers(abi::REQUEST_HEADER)
    }

    fn set_request_header(&self, name: &str, value: &[u8]) -> bool {
        // An empty value would remove the header (the ABI's convention): never what is meant.
        !value.is_empty() && self.set_request_header_to(name, ModuleBuffer::of(value))
    }

    fn remove_request_header(&self, name: &str) -> bool {
        // A null value removes the header.
        self.set_request_header_to(name, ModuleBuffer::NULL)
    }

    fn request_body(&self) -> Option<Vec<u8>> {
        let mut body = Vec::with_capacity(self.request_body_size());
        if !self.received_is_buffered() {
            self.append_body(abi::BUFFERED_REQUEST_BODY, &mut body);
        }
        self.append_body(abi::RECEIVED_REQUEST_BODY, &mut body);
        Some(body)
    }

    fn response_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.headers(abi::RESPONSE_HEADER)
    }

    fn response_chunk(&self, _size: usize) -> Option<Vec<u8>> {
        let mut chunk = Vec::new();
        self.append_body(abi::RECEIVED_RESPONSE_BODY, &mut chunk);
        Some(chunk)
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        // The only property the core reads.
        if self.filter.is_null() || path != ["source", "address"] {
            return None;
        }
        let mut out = EnvoyBuffer::EMPTY;
        // SAFETY: `out` is valid for the call; Envoy points it at the address string.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.filter,
                abi::ATTRIBUTE_SOURCE_ADDRESS,
                &mut out,
            )
        };
        if !ok {
            return None;
        }
        // SAFETY: Envoy's string, valid during the hook.
        Some(unsafe { envoy_bytes(out.ptr, out.length) }.to_vec())
    }

    fn send_local_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        if self.filter.is_null() {
            return;
        }
        let headers: Vec<abi::ModuleHttpHeader> = headers
            .iter()
            .map(|(k, v)| abi::ModuleHttpHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // SAFETY: headers and body are valid for the call; Envoy copies them.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.filter,
                status,
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::NULL,
            );
        }
    }

    fn set_filter_state(&self, name: &str, value: &[u8]) {
        if self.filter.is_null() {
            return;
        }
        let key = format!("{FILTER_STATE_PREFIX}{name}");
        // SAFETY: key and value are valid for the call; Envoy copies them.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_set_filter_state_bytes(
                self.filter,
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value),
            )
        };
        if !ok {
            // The request's audit record would lack ShieldKey's fields: never silently.
            log(
                LogLevel::Error,
                &format!("shieldkey: could not write filter state {key}"),
            );
        }
    }

    fn store(&self) -> &dyn SharedStore {
        &ProcessStore
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32> {
        shared::define_metric(kind, name)
    }

    fn increment_metric(&self, id: u32, by: i64) {
        shared::increment_metric(id, by);
    }

    fn record_metric(&self, id: u32, value: u64) {
        shared::record_metric(id, value);
    }

    // Single-Envoy mode without webhook delivery: the core enqueues an alert only when the policy
    // names a webhook (accepted with a warning at configuration, `lib.rs`; the alert is still
    // logged), and calls the fleet-mode methods below only in fleet mode (refused).
    fn enqueue_alert(&self, _body: &[u8]) {}

    fn dispatch_call(
        &self,
        _cluster: &str,
        _authority: &str,
        _path: &str,
        _body: &[u8],
        _timeout_ms: u64,
    ) -> Option<u32> {
        None
    }

    fn call_response(&self, _body_size: usize) -> (u32, Vec<u8>) {
        (0, Vec::new())
    }

    fn resume_request(&self) {}

    fn mark_spent(&self, _token_id: &str) {}
}
