//! A minimal header-swap HTTP filter as a native Envoy dynamic module: the floor any native filter
//! pays in Envoy (a C call per event hook, one header read, one header write), the counterpart of
//! the proxy-wasm filter in `../minimal-filter`. The filter configuration (the `filter_config` of
//! the `DynamicModuleFilter`, a `google.protobuf.StringValue`, which Envoy passes without the
//! wrapper) is the upstream `authorization` value to set, e.g. `Bearer <real key>`.
//!
//! The ABI is Envoy's `source/extensions/dynamic_modules/abi/abi.h`, checked against the Envoy
//! 1.40.0 binary (its exported callbacks, the hook names it resolves, the two callbacks' argument
//! registers, and a load that logs "ABI version v0.2.0 matched"). Only the declarations this module
//! needs are written out below, by hand: the event hooks Envoy 1.40 requires of an HTTP filter
//! module (it refuses the filter config if one is missing: "Failed to resolve symbol ...") and the
//! two callbacks it calls. Hooks Envoy treats as optional (config-level scheduling and callouts,
//! local reply, per-route config) are left out, so Envoy skips them.

use std::ffi::{c_char, c_void};
use std::ptr;

// ---------------------------------------------------------------------------------------------
// ABI types (abi.h). Every `*_ptr` is an opaque pointer; the enums are C enums, i.e. 32-bit.
// ---------------------------------------------------------------------------------------------

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy.
#[repr(C)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module.
#[repr(C)]
pub struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header`: only passed to hooks this module ignores.
#[repr(C)]
pub struct EnvoyHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// `envoy_dynamic_module_type_http_header_type`.
type HeaderType = u32;
const REQUEST_HEADER: HeaderType = 0;

/// Every `envoy_dynamic_module_type_on_http_filter_*_status` enum: `Continue` is 0 in each.
type Status = u32;
const CONTINUE: Status = 0;

/// `envoy_dynamic_module_type_http_callout_result` and
/// `envoy_dynamic_module_type_http_stream_reset_reason`, only passed to ignored hooks.
type CalloutResult = u32;
type StreamResetReason = u32;

// ---------------------------------------------------------------------------------------------
// Callbacks: functions Envoy's binary exports and the module calls (resolved when Envoy
// `dlopen`s the module; the `envoy` executable exports them dynamically).
// ---------------------------------------------------------------------------------------------

extern "C" {
    /// Writes the `index`th value of header `key` into `result_buffer` (a null buffer when absent);
    /// `optional_size` (nullable) receives the number of values. The value is Envoy's memory,
    /// valid until the end of the current hook or the next header write.
    fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: *mut c_void,
        header_type: HeaderType,
        key: ModuleBuffer,
        result_buffer: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    /// Replaces every value of header `key` with `value` (Envoy copies both).
    fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: *mut c_void,
        header_type: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
}

// ---------------------------------------------------------------------------------------------
// Module state.
// ---------------------------------------------------------------------------------------------

/// `ENVOY_DYNAMIC_MODULES_ABI_VERSION` of Envoy 1.40 (it logs "... v0.2.0 matched."). Envoy only
/// compares it, logging a warning on a mismatch; it must outlive `on_program_init`.
static ABI_VERSION: &[u8] = b"v0.2.0\0";

const AUTHORIZATION: &[u8] = b"authorization";

/// The in-module filter config: the `authorization` value, owned by the module from
/// `on_http_filter_config_new` to `on_http_filter_config_destroy`. Envoy's per-stream filter
/// holds a reference to its config, so the config outlives every stream created from it.
struct Config {
    authorization: Box<[u8]>,
}

fn module_buffer(bytes: &[u8]) -> ModuleBuffer {
    ModuleBuffer {
        ptr: bytes.as_ptr().cast(),
        length: bytes.len(),
    }
}

// ---------------------------------------------------------------------------------------------
// Event hooks: exported for Envoy.
// ---------------------------------------------------------------------------------------------

/// Called once when Envoy loads the module; a null return makes Envoy unload it.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

/// Called on the main thread for each filter config. Copies the config bytes into the module
/// (Envoy's buffers live only for this call); an empty config is rejected (null), as the proxy-wasm
/// filter rejects it.
///
/// # Safety
/// `config` must point to `config.length` readable bytes (Envoy guarantees it for this call).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _filter_config_envoy_ptr: *mut c_void,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    if config.ptr.is_null() || config.length == 0 {
        return ptr::null();
    }
    // SAFETY: Envoy passes a valid buffer of `length` bytes, alive for the duration of this call.
    let bytes = unsafe { std::slice::from_raw_parts(config.ptr.cast::<u8>(), config.length) };
    let config = Box::new(Config {
        authorization: bytes.into(),
    });
    Box::into_raw(config).cast_const().cast()
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

/// Called per HTTP stream. The filter has no per-stream state, so the in-module filter is the
/// config itself: no allocation per request (a null return would make Envoy fail the stream).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    filter_config_ptr: *const c_void,
    _filter_envoy_ptr: *mut c_void,
) -> *const c_void {
    filter_config_ptr
}

/// Nothing to free: the in-module filter is the config (see `on_http_filter_new`).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_filter_module_ptr: *const c_void) {}

/// Reads the client's credential (a real filter would check it), then swaps in the configured one
/// when the request carries one, as the proxy-wasm filter does.
///
/// # Safety
/// `filter_envoy_ptr` must be Envoy's live filter and `filter_module_ptr` the config pointer
/// returned by `on_http_filter_new` (Envoy guarantees both for this call).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    _end_of_stream: bool,
) -> Status {
    // SAFETY: `filter_module_ptr` is the live `Config` (it outlives the stream).
    let Some(config) = (unsafe { filter_module_ptr.cast::<Config>().as_ref() }) else {
        return CONTINUE;
    };
    let mut current = EnvoyBuffer {
        ptr: ptr::null(),
        length: 0,
    };
    // SAFETY: the key and result buffers are valid for the call; the count is not wanted (null).
    let found = unsafe {
        envoy_dynamic_module_callback_http_get_header(
            filter_envoy_ptr,
            REQUEST_HEADER,
            module_buffer(AUTHORIZATION),
            &mut current,
            0,
            ptr::null_mut(),
        )
    };
    if found && !current.ptr.is_null() {
        // SAFETY: key and value are valid for the call; Envoy copies them into the header map.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                filter_envoy_ptr,
                REQUEST_HEADER,
                module_buffer(AUTHORIZATION),
                module_buffer(&config.authorization),
            );
        }
    }
    CONTINUE
}

// Every other hook Envoy 1.40 requires: continue, or do nothing. The parameters are abi.h's, so
// each symbol has the signature Envoy calls it with, even where the module ignores them.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _end_of_stream: bool,
) -> Status {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) -> Status {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _end_of_stream: bool,
) -> Status {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _end_of_stream: bool,
) -> Status {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) -> Status {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _event_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
}

// Callout and stream hooks: never called, since the module starts no callout or stream, but
// Envoy 1.40 requires the symbols.

#[no_mangle]
#[allow(clippy::too_many_arguments)] // abi.h's signature.
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _callout_id: u64,
    _result: CalloutResult,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *mut EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _reason: StreamResetReason,
) {
}
