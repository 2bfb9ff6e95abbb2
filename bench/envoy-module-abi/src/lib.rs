//! The part of Envoy 1.40's dynamic-module ABI (`source/extensions/dynamic_modules/abi/abi.h`,
//! ABI version "v0.2.0") the benchmark's native modules use, declared by hand: the types, the
//! status values of the event hooks, the callbacks, and the hooks Envoy requires that neither
//! module uses (`unused_http_filter_hooks!`). Each callback was checked against the Envoy 1.40.0 binary: it
//! is exported (`nm -D --defined-only`), and its disassembly reads the arguments in the registers
//! these declarations put them in (x86-64 SysV: a 16-byte buffer struct passed by value takes two
//! registers, or the stack once the six integer registers are used up).

use std::ffi::{c_char, c_void};
use std::ptr;

/// `ENVOY_DYNAMIC_MODULES_ABI_VERSION` of Envoy 1.40 (it logs "... v0.2.0 matched."), for
/// `envoy_dynamic_module_on_program_init` to return. Envoy only compares it, logging a warning on
/// a mismatch; it must outlive the call (a static).
pub static ABI_VERSION: &[u8] = b"v0.2.0\0";

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy, valid until the end of the
/// current event hook (or the next change to what they point into).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl EnvoyBuffer {
    pub const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: ptr::null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module; Envoy copies them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    /// A null buffer: `set_header` with a null value removes the header.
    pub const NULL: ModuleBuffer = ModuleBuffer {
        ptr: ptr::null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_envoy_http_header`: a header of one of Envoy's header maps.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

impl EnvoyHttpHeader {
    pub const EMPTY: EnvoyHttpHeader = EnvoyHttpHeader {
        key_ptr: ptr::null(),
        key_length: 0,
        value_ptr: ptr::null(),
        value_length: 0,
    };
}

/// `envoy_dynamic_module_type_module_http_header`: a header the module hands Envoy.
#[repr(C)]
pub struct ModuleHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

/// `envoy_dynamic_module_type_http_header_type` (a C enum: 32-bit). The 1.40 binary's jump tables
/// map 0 to `requestHeaders()` and 2 to `responseHeaders()` of the filter's callbacks.
pub type HeaderType = u32;
pub const REQUEST_HEADER: HeaderType = 0;
pub const RESPONSE_HEADER: HeaderType = 2;

/// `envoy_dynamic_module_type_http_body_type`. In 1.40: 0 the request chunk of the current hook,
/// 1 the request body Envoy buffered (`decodingBuffer()`), 2 the response chunk of the current
/// hook (3, the buffered response, is not used).
pub type BodyType = u32;
pub const RECEIVED_REQUEST_BODY: BodyType = 0;
pub const BUFFERED_REQUEST_BODY: BodyType = 1;
pub const RECEIVED_RESPONSE_BODY: BodyType = 2;

/// `envoy_dynamic_module_type_attribute_id`: 24 is `source.address` (the downstream remote
/// address as `ip:port`, what the proxy-wasm property `source.address` returns).
pub type AttributeId = u32;
pub const ATTRIBUTE_SOURCE_ADDRESS: AttributeId = 24;

/// The `envoy_dynamic_module_type_on_http_filter_*_status` enums: Envoy `static_cast`s them to
/// its own `FilterHeadersStatus`, `FilterDataStatus` and `FilterTrailersStatus`.
pub type Status = u32;
/// Every status enum: continue.
pub const CONTINUE: Status = 0;
/// Headers and trailers: `StopIteration`.
pub const STOP_ITERATION: Status = 1;
/// Bodies: `StopIterationAndBuffer` (Envoy keeps the chunk in its buffer, so at the end of the
/// stream the buffered body is all of it).
pub const STOP_ITERATION_AND_BUFFER: Status = 1;

/// `envoy_dynamic_module_type_http_callout_result` and
/// `envoy_dynamic_module_type_http_stream_reset_reason`, only passed to the unused hooks.
pub type CalloutResult = u32;
pub type StreamResetReason = u32;

// Callbacks: exported by the `envoy` executable, resolved when Envoy `dlopen`s the module.
extern "C" {
    /// Writes the `index`th value of header `key` into `result_buffer` (a null buffer when
    /// absent); `optional_size` (nullable) receives the number of values.
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: *mut c_void,
        header_type: HeaderType,
        key: ModuleBuffer,
        result_buffer: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    /// The number of headers in the map (0 when the map is not available yet).
    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter_envoy_ptr: *mut c_void,
        header_type: HeaderType,
    ) -> usize;

    /// Writes every header of the map into `result_headers`, which must have room for
    /// `get_headers_size` entries.
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter_envoy_ptr: *mut c_void,
        header_type: HeaderType,
        result_headers: *mut EnvoyHttpHeader,
    ) -> bool;

    /// Replaces every value of `key` with `value`; a null (or empty) `value` removes the header.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: *mut c_void,
        header_type: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    /// The length of a body buffer (0 when there is none).
    pub fn envoy_dynamic_module_callback_http_get_body_size(
        filter_envoy_ptr: *mut c_void,
        body_type: BodyType,
    ) -> usize;

    /// The number of slices of a body buffer (0 when there is none).
    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter_envoy_ptr: *mut c_void,
        body_type: BodyType,
    ) -> usize;

    /// Writes the slices of a body buffer into `result_buffer_vector`, which must have room for
    /// `get_body_chunks_size` entries.
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter_envoy_ptr: *mut c_void,
        body_type: BodyType,
        result_buffer_vector: *mut EnvoyBuffer,
    ) -> bool;

    /// Whether the request chunk of the current hook is Envoy's buffered request body itself (a
    /// filter before this one buffered it and then continued).
    pub fn envoy_dynamic_module_callback_http_received_buffered_request_body(
        filter_envoy_ptr: *mut c_void,
    ) -> bool;

    /// A string attribute of the stream.
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter_envoy_ptr: *mut c_void,
        attribute_id: AttributeId,
        result: *mut EnvoyBuffer,
    ) -> bool;

    /// Sends a local reply (Envoy's `sendLocalReply`); Envoy copies the headers and body.
    /// `details` empty: Envoy uses "dynamic_module" as the response code details.
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: *mut c_void,
        status_code: u32,
        headers_vector: *const ModuleHttpHeader,
        headers_vector_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    /// Sets filter state `key` to a read-only `Router::StringAccessorImpl` holding `value` (what
    /// an access log's `%FILTER_STATE(key:PLAIN)%` prints).
    pub fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter_envoy_ptr: *mut c_void,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
}

/// The bytes of an Envoy-owned (ptr, length) pair; empty for a null pointer.
///
/// # Safety
/// A non-null `ptr` must point to `length` readable bytes that stay valid for `'a`.
pub unsafe fn envoy_bytes<'a>(ptr: *const c_char, length: usize) -> &'a [u8] {
    if ptr.is_null() || length == 0 {
        return &[];
    }
    // SAFETY: the caller guarantees `length` readable bytes at `ptr`.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), length) }
}

/// Defines `envoy_dynamic_module_on_program_init`, called once when Envoy loads the module: it
/// returns `ABI_VERSION` (a null return makes Envoy unload the module).
#[macro_export]
macro_rules! program_init {
    () => {
        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const ::std::ffi::c_char {
            $crate::ABI_VERSION.as_ptr().cast()
        }
    };
}

/// Defines, in the module crate that invokes it (a cdylib exports only its own `#[no_mangle]`
/// items), the HTTP filter hooks Envoy 1.40 requires of every module (it refuses the filter
/// configuration if one is missing: "Failed to resolve symbol ...") that these modules never
/// need: scheduled events, the downstream write-buffer watermarks, and the callout and stream
/// hooks (neither module starts a callout or a stream). The parameters are abi.h's.
#[macro_export]
macro_rules! unused_http_filter_hooks {
    () => {
        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
            _filter_envoy_ptr: *mut ::std::ffi::c_void,
            _filter_module_ptr: *const ::std::ffi::c_void,
            _event_id: u64,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
            _filter_envoy_ptr: *mut ::std::ffi::c_void,
            _filter_module_ptr: *const ::std::ffi::c_void,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
            _filter_envoy_ptr: *mut ::std::ffi::c_void,
            _filter_module_ptr: *const ::std::ffi::c_void,
        ) {
        }

        #[no_mangle]
        #[allow(clippy::too_many_arguments)] // abi.h's signature.
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
            _filter_envoy_ptr: *mut ::std::ffi::c_void,
            _filter_module_ptr: *const ::std::ffi::c_void,
            _callout_id: u64,
            _result: $crate::CalloutResult,
            _headers: *mut $crate::EnvoyHttpHeader,
            _headers_size: usize,
            _body_chunks: *mut $crate::EnvoyBuffer,
            _body_chunks_size: usize,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
            _filter_envoy_ptr: *mut ::std::ffi::c_void,
            _filter_module_ptr: *const ::std::ffi::c_void,
            _stream_id: u64,
            _headers: *mut $crate::EnvoyHttpHeader,
            _headers_size: usize,
            _end_stream: bool,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
            _filter_envoy_ptr: *mut ::std::ffi::c_void,
            _filter_module_ptr: *const ::std::ffi::c_void,
            _stream_id: u64,
            _data: *const $crate::EnvoyBuffer,
            _data_count: usize,
            _end_stream: bool,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
            _filter_envoy_ptr: *mut ::std::ffi::c_void,
            _filter_module_ptr: *const ::std::ffi::c_void,
            _stream_id: u64,
            _trailers: *mut $crate::EnvoyHttpHeader,
            _trailers_size: usize,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
            _filter_envoy_ptr: *mut ::std::ffi::c_void,
            _filter_module_ptr: *const ::std::ffi::c_void,
            _stream_id: u64,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
            _filter_envoy_ptr: *mut ::std::ffi::c_void,
            _filter_module_ptr: *const ::std::ffi::c_void,
            _stream_id: u64,
            _reason: $crate::StreamResetReason,
        ) {
        }
    };
}
