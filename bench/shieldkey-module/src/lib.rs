//! ShieldKey's unchanged core (`shieldkey::stream::Stream`) as a native Envoy dynamic module: a
//! benchmark prototype, not the product, so `make bench` can measure ShieldKey-as-native beside
//! ShieldKey-as-wasm. Single-Envoy mode only: no fleet mode, no webhook delivery.
//!
//! What proxy-wasm gives the wasm filter and a native module keeps itself:
//! - one VM per worker thread, each with its own compiled policy: here one `Active` per worker
//!   thread and configuration, loaded on the worker's first stream (`worker_active`), since the
//!   core's `Active` is single-threaded (`Rc`, `RefCell`);
//! - shared data, visible to every worker: a process-wide store with the same compare-and-swap
//!   semantics (`shared::ProcessStore`);
//! - stats: kept in process memory only (`shared`), not handed to Envoy.
//!
//! Every `extern "C"` function below is total: no unwrap, expect or panic (an unwind across the
//! FFI boundary is undefined, and the release profile aborts on panic: an abort takes Envoy down).

mod host;
mod shared;

use std::cell::RefCell;
use std::ffi::c_void;
use std::ptr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use shieldkey::config::raw::RawPolicy;
use shieldkey::config::source::ZLIB_FIRST_BYTE;
use shieldkey::config::token_stream::{self, Head};
use shieldkey::config::ConfigError;
use shieldkey::master_key::MasterKey;
use shieldkey::stream::active::Active;
use shieldkey::stream::host::LogLevel;
use shieldkey::stream::metrics::MetricIds;
use shieldkey::stream::{Flow, Stream};

use envoy_module_abi::{
    envoy_bytes, EnvoyBuffer, Status, CONTINUE, STOP_ITERATION, STOP_ITERATION_AND_BUFFER,
};
use host::{log, NativeHost};

// ---------------------------------------------------------------------------------------------
// Configuration.
// ---------------------------------------------------------------------------------------------

/// One filter configuration, created on Envoy's main thread and read (never written) by every
/// worker thread: it holds only thread-safe data (checked by `_config_is_sync`).
struct Config {
    /// Names this configuration in the workers' caches (an address could be reused).
    id: u64,
    /// The plugin configuration: the bytes the wasm filter gets (policy JSON, or it
    /// zlib-compressed).
    policy: Box<[u8]>,
    /// The document without its tokens (`token_stream::parse_head`).
    head: Head,
    master: MasterKey,
}

fn _config_is_sync() {
    fn sync<T: Send + Sync>() {}
    sync::<Config>();
}

static NEXT_CONFIG_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Stat ids this worker defined, by name (`MetricIds`: one per proxy-wasm VM, i.e. worker).
    static METRIC_IDS: Rc<MetricIds> = Rc::new(MetricIds::default());
    /// This worker's view of each configuration, by `Config::id`. A destroyed configuration's
    /// entry stays until the thread ends (a prototype: its configuration never changes).
    static ACTIVE: RefCell<Vec<(u64, Rc<Active>)>> = const { RefCell::new(Vec::new()) };
}

fn metric_ids() -> Rc<MetricIds> {
    METRIC_IDS.with(Rc::clone)
}

/// The plugin configuration from the filter config Envoy passes. Given the ECDS file's
/// `configuration` Any as the `filter_config` (a BytesValue, or a StringValue of plain JSON),
/// Envoy passes exactly the bytes the wasm filter gets; given a StringValue holding the base64
/// text of the published BytesValue, it is decoded here.
fn plugin_configuration(config: &[u8]) -> Vec<u8> {
    let first = config.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'{') | None) || config.first() == Some(&ZLIB_FIRST_BYTE) {
        return config.to_vec();
    }
    base64::engine::general_purpose::STANDARD
        .decode(config.trim_ascii())
        .unwrap_or_else(|_| config.to_vec())
}

/// The master key from the environment variable the policy names, as the wasm glue reads it.
fn master_key(raw: &RawPolicy) -> Result<MasterKey, ConfigError> {
    shieldkey::config::master_key_env::master_key(raw, "not set in Envoy's environment")
}

/// What the wasm root context's `configure` does in single-Envoy mode: parse the document's head,
/// open the master key, compile the policy and publish its token records into shared data (once
/// per process; a worker's later `Active::load` finds them published).
fn configure(config: &[u8]) -> Result<Config, ConfigError> {
    let policy = plugin_configuration(config);
    if policy.is_empty() {
        return Err(ConfigError::at(
            ".",
            "the filter needs a plugin configuration",
        ));
    }
    let source: &[u8] = &policy;
    let head = token_stream::parse_head(&source)?;
    if head.policy.fleet.is_some() {
        return Err(ConfigError::at(
            "fleet",
            "fleet mode is not supported by the native module prototype",
        ));
    }
    if head
        .policy
        .alerts
        .as_ref()
        .and_then(|a| a.webhook.as_ref())
        .is_some()
    {
        log(
            LogLevel::Warn,
            "shieldkey: the native module prototype delivers no budget alert webhooks (alerts are only logged)",
        );
    }
    let master = master_key(&head.policy)?;
    Active::load(
        &NativeHost::detached(),
        &source,
        &head,
        &master,
        &metric_ids(),
        None,
    )?;
    Ok(Config {
        id: NEXT_CONFIG_ID.fetch_add(1, Ordering::Relaxed),
        policy: policy.into_boxed_slice(),
        head,
        master,
    })
}

/// This worker's `Active` for `config`, loaded on its first stream (as each proxy-wasm VM
/// configures its own). `None` when it cannot be loaded: the stream then refuses every request
/// (`Denial::PolicyUnavailable`), as the wasm filter does without a configuration.
fn worker_active(config: &Config) -> Option<Rc<Active>> {
    let cached = ACTIVE.with(|cache| {
        cache
            .borrow()
            .iter()
            .find(|(id, _)| *id == config.id)
            .map(|(_, active)| active.clone())
    });
    if cached.is_some() {
        return cached;
    }
    let source: &[u8] = &config.policy;
    let loaded = Active::load(
        &NativeHost::detached(),
        &source,
        &config.head,
        &config.master,
        &metric_ids(),
        None,
    );
    match loaded {
        Ok(active) => {
            let active = Rc::new(active);
            ACTIVE.with(|cache| cache.borrow_mut().push((config.id, active.clone())));
            Some(active)
        }
        Err(e) => {
            log(
                LogLevel::Error,
                &format!("shieldkey: configuration rejected on a worker: {e}"),
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Event hooks: program and configuration.
// ---------------------------------------------------------------------------------------------

envoy_module_abi::program_init!();

/// Called on the main thread for each filter config; null rejects it (Envoy refuses the
/// configuration), with the reason on stderr. The reason names a field, never a secret (the
/// core's configuration errors never quote one).
///
/// # Safety
/// `config` must point to `config.length` readable bytes (Envoy guarantees it for this call).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _filter_config_envoy_ptr: *mut c_void,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    // SAFETY: Envoy's buffer, valid for the duration of this call.
    let bytes = unsafe { envoy_bytes(config.ptr, config.length) };
    match configure(bytes) {
        Ok(config) => Box::into_raw(Box::new(config)).cast_const().cast(),
        Err(e) => {
            log(
                LogLevel::Error,
                &format!("shieldkey: configuration rejected: {e}"),
            );
            ptr::null()
        }
    }
}

/// # Safety
/// `filter_config_ptr` must come from `on_http_filter_config_new` and be destroyed only once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    filter_config_ptr: *const c_void,
) {
    if !filter_config_ptr.is_null() {
        // SAFETY: it is the pointer `Box::into_raw` returned in `on_http_filter_config_new`.
        drop(unsafe { Box::from_raw(filter_config_ptr.cast_mut().cast::<Config>()) });
    }
}

// ---------------------------------------------------------------------------------------------
// Event hooks: one HTTP stream. Envoy calls them on the stream's worker thread, one at a time.
// ---------------------------------------------------------------------------------------------

/// The in-module filter: the core's stream state machine.
struct Filter {
    stream: Stream,
}

/// Called per HTTP stream on its worker thread. Never null (a null return would fail the
/// stream): without a loadable configuration the stream refuses every request.
///
/// # Safety
/// `filter_config_ptr` must be a live `Config` from `on_http_filter_config_new` (Envoy's filter
/// holds its config, so the config outlives the stream).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    filter_config_ptr: *const c_void,
    _filter_envoy_ptr: *mut c_void,
) -> *const c_void {
    // SAFETY: see above; Envoy never passes a config this module rejected (null).
    let config = unsafe { filter_config_ptr.cast::<Config>().as_ref() };
    let active = config.and_then(worker_active);
    let filter = Box::new(Filter {
        stream: Stream::new(active),
    });
    Box::into_raw(filter).cast_const().cast()
}

/// # Safety
/// `filter_module_ptr` must come from `on_http_filter_new` and be destroyed only once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(
    filter_module_ptr: *const c_void,
) {
    if !filter_module_ptr.is_null() {
        // SAFETY: it is the pointer `Box::into_raw` returned in `on_http_filter_new`.
        drop(unsafe { Box::from_raw(filter_module_ptr.cast_mut().cast::<Filter>()) });
    }
}

/// The stream of a hook: `on_http_filter_new`'s `Filter`, used by one hook at a time.
///
/// # Safety
/// `filter_module_ptr` must be null or the live pointer `on_http_filter_new` returned.
unsafe fn filter<'a>(filter_module_ptr: *const c_void) -> Option<&'a mut Filter> {
    // SAFETY: see above; Envoy calls a stream's hooks one at a time on one thread.
    unsafe { filter_module_ptr.cast_mut().cast::<Filter>().as_mut() }
}

/// Headers and trailers: a pause is a stop (a local reply was sent).
fn headers_status(flow: Flow) -> Status {
    match flow {
        Flow::Continue => CONTINUE,
        Flow::Pause => STOP_ITERATION,
    }
}

/// Bodies: a pause holds the data, buffered, so the body is whole at its end of stream (and
/// after a local reply it makes no difference), as proxy-wasm's `Action::Pause` does.
fn body_status(flow: Flow) -> Status {
    match flow {
        Flow::Continue => CONTINUE,
        Flow::Pause => STOP_ITERATION_AND_BUFFER,
    }
}

/// Runs `phase` on the stream of a hook with its host. Without the module's filter (unreachable:
/// `on_http_filter_new` never returns null) a request phase is refused, never forwarded unjudged,
/// and a response phase goes on.
///
/// # Safety
/// `filter_envoy_ptr` must be Envoy's live filter and `filter_module_ptr` null or the live
/// pointer `on_http_filter_new` returned, for the duration of the hook.
unsafe fn on_stream(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    request_phase: bool,
    phase: impl FnOnce(&mut Stream, &NativeHost) -> Status,
) -> Status {
    let host = NativeHost::new(filter_envoy_ptr);
    // SAFETY: the module's filter pointer, for this call.
    match unsafe { filter(filter_module_ptr) } {
        Some(f) => phase(&mut f.stream, &host),
        None if request_phase => {
            use shieldkey::stream::host::Host;
            host.send_local_reply(
                503,
                &[("content-type", "text/plain")],
                b"shieldkey: no filter state\n",
            );
            STOP_ITERATION
        }
        None => CONTINUE,
    }
}

/// # Safety
/// Envoy's live filter and this module's filter, for this call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> Status {
    // SAFETY: the caller's guarantees.
    unsafe {
        on_stream(filter_envoy_ptr, filter_module_ptr, true, |stream, host| {
            headers_status(stream.on_request_headers(host, end_of_stream))
        })
    }
}

/// # Safety
/// Envoy's live filter and this module's filter, for this call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> Status {
    // SAFETY: the caller's guarantees.
    unsafe {
        on_stream(filter_envoy_ptr, filter_module_ptr, true, |stream, host| {
            // The whole body so far, as proxy-wasm's `body_size` (the core's size limit is on it).
            let size = host.request_body_size();
            body_status(stream.on_request_body(host, size, end_of_stream))
        })
    }
}

/// # Safety
/// Envoy's live filter and this module's filter, for this call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
) -> Status {
    // SAFETY: the caller's guarantees.
    unsafe {
        on_stream(filter_envoy_ptr, filter_module_ptr, true, |stream, host| {
            headers_status(stream.on_request_trailers(host))
        })
    }
}

/// # Safety
/// Envoy's live filter and this module's filter, for this call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> Status {
    // SAFETY: the caller's guarantees.
    unsafe {
        on_stream(
            filter_envoy_ptr,
            filter_module_ptr,
            false,
            |stream, host| headers_status(stream.on_response_headers(host, end_of_stream)),
        )
    }
}

/// # Safety
/// Envoy's live filter and this module's filter, for this call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> Status {
    // SAFETY: the caller's guarantees.
    unsafe {
        on_stream(
            filter_envoy_ptr,
            filter_module_ptr,
            false,
            |stream, host| {
                let size = host.response_chunk_size();
                body_status(stream.on_response_body(host, size, end_of_stream))
            },
        )
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) -> Status {
    CONTINUE
}

/// The stream is over, however it ended: proxy-wasm's `on_log`. Envoy calls it before the
/// stream's access logs run, so the audit record written here is in the stream's log line.
///
/// # Safety
/// Envoy's live filter and this module's filter, for this call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
) {
    // SAFETY: the module's filter pointer, for this call.
    if let Some(f) = unsafe { filter(filter_module_ptr) } {
        f.stream.on_log(&NativeHost::new(filter_envoy_ptr));
    }
}

// Every other hook Envoy 1.40 requires: nothing to do.
envoy_module_abi::unused_http_filter_hooks!();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_configuration_is_taken_as_the_wasm_filter_gets_it() {
        assert_eq!(
            plugin_configuration(b" {\"version\":1}"),
            b" {\"version\":1}"
        );
        let packed = shieldkey::config::source::compress(b"{\"version\":1}");
        assert_eq!(plugin_configuration(&packed), packed);
        let text = base64::engine::general_purpose::STANDARD.encode(&packed);
        assert_eq!(plugin_configuration(text.as_bytes()), packed);
    }
}
