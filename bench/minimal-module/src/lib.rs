//! A minimal header-swap HTTP filter as a native Envoy dynamic module: the floor any native filter
//! pays in Envoy (a C call per event hook, one header read, one header write), the counterpart of
//! the proxy-wasm filter in `../minimal-filter`. The filter configuration (the `filter_config` of
//! the `DynamicModuleFilter`, a `google.protobuf.StringValue`, which Envoy passes without the
//! wrapper) is the upstream `authorization` value to set, e.g. `Bearer <real key>`.
//!
//! The ABI declarations are `../envoy-module-abi`'s (Envoy 1.40's, checked against its binary).
//! The module defines every HTTP filter hook Envoy 1.40 requires (it refuses the filter config if
//! one is missing: "Failed to resolve symbol ..."); hooks Envoy treats as optional (config-level
//! scheduling and callouts, local reply, per-route config) are left out, so Envoy skips them.

use std::ffi::c_void;
use std::ptr;

use envoy_module_abi::{
    envoy_bytes, envoy_dynamic_module_callback_http_get_header,
    envoy_dynamic_module_callback_http_set_header, EnvoyBuffer, ModuleBuffer, Status, CONTINUE,
    REQUEST_HEADER,
};

// ---------------------------------------------------------------------------------------------
// Module state.
// ---------------------------------------------------------------------------------------------

const AUTHORIZATION: &[u8] = b"authorization";

/// The in-module filter config: the `authorization` value, owned by the module from
/// `on_http_filter_config_new` to `on_http_filter_config_destroy`. Envoy's per-stream filter
/// holds a reference to its config, so the config outlives every stream created from it.
struct Config {
    authorization: Box<[u8]>,
}

// ---------------------------------------------------------------------------------------------
// Event hooks: exported for Envoy.
// ---------------------------------------------------------------------------------------------

envoy_module_abi::program_init!();

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
    // SAFETY: Envoy passes a valid buffer of `length` bytes, alive for the duration of this call.
    let bytes = unsafe { envoy_bytes(config.ptr, config.length) };
    if bytes.is_empty() {
        return ptr::null();
    }
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
    let mut current = EnvoyBuffer::EMPTY;
    // SAFETY: the key and result buffers are valid for the call; the count is not wanted (null).
    let found = unsafe {
        envoy_dynamic_module_callback_http_get_header(
            filter_envoy_ptr,
            REQUEST_HEADER,
            ModuleBuffer::of(AUTHORIZATION),
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
                ModuleBuffer::of(AUTHORIZATION),
                ModuleBuffer::of(&config.authorization),
            );
        }
    }
    CONTINUE
}

// Every other stream hook: continue, or do nothing. The parameters are abi.h's, so each symbol
// has the signature Envoy calls it with, though the filter ignores them.
macro_rules! continue_hooks {
    ($($hook:ident($($arg:ident: $type:ty),*);)*) => {$(
        #[no_mangle]
        pub extern "C" fn $hook(
            _filter_envoy_ptr: *mut c_void,
            _filter_module_ptr: *const c_void,
            $($arg: $type),*
        ) -> Status {
            $(let _ = $arg;)*
            CONTINUE
        }
    )*};
}

continue_hooks! {
    envoy_dynamic_module_on_http_filter_request_body(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_request_trailers();
    envoy_dynamic_module_on_http_filter_response_headers(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_response_body(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_response_trailers();
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
}

// The hooks Envoy 1.40 requires that this filter never needs.
envoy_module_abi::unused_http_filter_hooks!();
