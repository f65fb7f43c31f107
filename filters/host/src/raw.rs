//! The proxy-wasm ABI calls txmesh uses, without panics.
//!
//! The SDK's `hostcalls` wrappers `panic!` on any status they do not expect
//! (and on non-UTF-8 header values in the string getters); a panic traps the
//! VM and takes every stream on it down. These wrappers return `Option`/`bool`
//! for every status instead. txmesh does not use the SDK at all: `rt` is its
//! runtime.

#![allow(unsafe_code)]

use std::ptr::{null, null_mut};

pub const MAP_REQUEST_HEADERS: u32 = 0;
pub const MAP_RESPONSE_HEADERS: u32 = 2;
pub const MAP_RESPONSE_TRAILERS: u32 = 3;
pub const MAP_CALL_RESPONSE_HEADERS: u32 = 6;
pub const BUFFER_CALL_RESPONSE_BODY: u32 = 4;
pub const BUFFER_GRPC_RECEIVE: u32 = 5;
pub const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
pub const STREAM_RESPONSE: u32 = 1;
pub const STATUS_OK: u32 = 0;
pub const STATUS_CAS_MISMATCH: u32 = 8;

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_get_status(
        return_code: *mut u32,
        return_message_data: *mut *mut u8,
        return_message_size: *mut usize,
    ) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
}

// WASI's clock, which proxy-wasm hosts implement for both clocks (Envoy:
// its time source's system and monotonic time).
#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn clock_time_get(clock_id: u32, precision: u64, time: *mut u64) -> u16;
}

/// Takes ownership of a buffer the host allocated through
/// `proxy_on_memory_allocate` (`rt`: a boxed slice of exactly `size` bytes).
unsafe fn take(ptr: *mut u8, size: usize) -> Vec<u8> {
    if ptr.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(ptr, size, size)
    }
}

pub fn get_header(map: u32, name: &str) -> Option<Vec<u8>> {
    let (mut p, mut n) = (null_mut(), 0usize);
    // SAFETY: pointers are valid for the call; the host fills p/n on Ok.
    let status =
        unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut p, &mut n) };
    (status == STATUS_OK).then(|| unsafe { take(p, n) })
}

/// Header names and values, in order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// All headers of a map in one host call, in order (`None` when the host
/// refuses, e.g. no such map in this callback).
pub fn get_header_pairs(map: u32) -> Option<Pairs> {
    let (mut p, mut n) = (null_mut(), 0usize);
    // SAFETY: pointers are valid for the call; the host fills p/n on Ok.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut p, &mut n) };
    if status != STATUS_OK {
        return None;
    }
    let bytes = unsafe { take(p, n) };
    parse_pairs(&bytes)
}

/// The proxy-wasm map encoding: count, (key length, value length) per pair,
/// then each key and value followed by a NUL. `None` if malformed.
pub fn parse_pairs(bytes: &[u8]) -> Option<Pairs> {
    let u32_at = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32_at(0)?;
    let mut sizes = 4usize;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(count.min(256));
    for _ in 0..count {
        let (klen, vlen) = (u32_at(sizes)?, u32_at(sizes + 4)?);
        sizes += 8;
        let key = bytes.get(data..data.checked_add(klen)?)?.to_vec();
        data = data.checked_add(klen + 1)?;
        let value = bytes.get(data..data.checked_add(vlen)?)?.to_vec();
        data = data.checked_add(vlen + 1)?;
        out.push((key, value));
    }
    Some(out)
}

pub fn set_header(map: u32, name: &str, value: Option<&[u8]>) -> bool {
    // SAFETY: pointers and lengths describe live slices.
    let status = unsafe {
        match value {
            Some(v) => {
                proxy_replace_header_map_value(map, name.as_ptr(), name.len(), v.as_ptr(), v.len())
            }
            None => proxy_remove_header_map_value(map, name.as_ptr(), name.len()),
        }
    };
    status == STATUS_OK
}

pub fn get_property(path: &[&str]) -> Option<Vec<u8>> {
    let mut ser = Vec::new();
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            ser.push(0);
        }
        ser.extend_from_slice(part.as_bytes());
    }
    let (mut p, mut n) = (null_mut(), 0usize);
    // SAFETY: as above.
    let status = unsafe { proxy_get_property(ser.as_ptr(), ser.len(), &mut p, &mut n) };
    if status != STATUS_OK || p.is_null() {
        return None;
    }
    Some(unsafe { take(p, n) })
}

pub fn get_shared(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    let (mut p, mut n, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: as above.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut p, &mut n, &mut cas) };
    if status != STATUS_OK {
        return (None, None);
    }
    let value = (!p.is_null()).then(|| unsafe { take(p, n) });
    (value, (cas != 0).then_some(cas))
}

/// `Ok`, `Err(true)` on CAS mismatch, `Err(false)` on any other failure.
pub fn set_shared(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), bool> {
    // SAFETY: as above.
    let status = unsafe {
        proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    };
    match status {
        STATUS_OK => Ok(()),
        STATUS_CAS_MISMATCH => Err(true),
        _ => Err(false),
    }
}

pub fn define_metric(kind: u32, name: &str) -> Result<u32, u32> {
    let mut id = 0u32;
    // SAFETY: as above.
    let status = unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) };
    if status == STATUS_OK {
        Ok(id)
    } else {
        Err(status)
    }
}

pub fn increment_metric(id: u32, delta: i64) -> u32 {
    // SAFETY: plain values.
    unsafe { proxy_increment_metric(id, delta) }
}

pub fn record_metric(id: u32, value: u64) -> u32 {
    // SAFETY: plain values.
    unsafe { proxy_record_metric(id, value) }
}

pub fn get_buffer(buffer: u32, start: usize, max: usize) -> Vec<u8> {
    let (mut p, mut n) = (null_mut(), 0usize);
    // SAFETY: as above.
    let status = unsafe { proxy_get_buffer_bytes(buffer, start, max, &mut p, &mut n) };
    if status != STATUS_OK {
        return Vec::new();
    }
    unsafe { take(p, n) }
}

pub fn serialize_map(map: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

pub fn send_local_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
    let h = serialize_map(headers);
    // SAFETY: as above.
    let s = unsafe {
        proxy_send_local_response(
            u32::from(status),
            null(),
            0,
            body.as_ptr(),
            body.len(),
            h.as_ptr(),
            h.len(),
            -1,
        )
    };
    s == STATUS_OK
}

/// A dispatch's token, or the host's refusal.
fn token_or(status: u32, token: u32) -> Result<u32, u32> {
    if status == STATUS_OK {
        Ok(token)
    } else {
        Err(status)
    }
}

/// Starts an HTTP callout to `cluster`; the answer arrives in
/// `proxy_on_http_call_response` of the current context. `Err(status)` when
/// the host refuses it (unknown cluster, bad headers).
pub fn http_call(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout_ms: u64,
) -> Result<u32, u32> {
    let h = serialize_map(headers);
    let mut token = 0u32;
    // SAFETY: pointers and lengths describe live slices; token is written on Ok.
    let status = unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            h.as_ptr(),
            h.len(),
            body.as_ptr(),
            body.len(),
            null(),
            0,
            u32::try_from(timeout_ms).unwrap_or(u32::MAX),
            &mut token,
        )
    };
    token_or(status, token)
}

/// Starts a unary gRPC call of `service`/`method` on `cluster`; the answer
/// arrives in `proxy_on_grpc_receive` (OK) or `proxy_on_grpc_close` (any
/// other status) of the current context. Its token is counted apart from
/// HTTP callouts' by the host.
pub fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    metadata: &[(&str, &str)],
    message: &[u8],
    timeout_ms: u64,
) -> Result<u32, u32> {
    let m = serialize_map(metadata);
    let mut token = 0u32;
    // SAFETY: pointers and lengths describe live slices; token is written on Ok.
    let status = unsafe {
        proxy_grpc_call(
            cluster.as_ptr(),
            cluster.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            m.as_ptr(),
            m.len(),
            message.as_ptr(),
            message.len(),
            u32::try_from(timeout_ms).unwrap_or(u32::MAX),
            &mut token,
        )
    };
    token_or(status, token)
}

/// The message of the gRPC status being reported (in `proxy_on_grpc_close`).
pub fn grpc_status_message() -> Vec<u8> {
    let (mut code, mut p, mut n) = (0u32, null_mut(), 0usize);
    // SAFETY: as above.
    let status = unsafe { proxy_get_status(&mut code, &mut p, &mut n) };
    if status != STATUS_OK {
        return Vec::new();
    }
    unsafe { take(p, n) }
}

/// Calls `proxy_on_tick` of the current (root) context every `ms` milliseconds.
pub fn set_tick_period(ms: u32) -> bool {
    // SAFETY: plain value.
    unsafe { proxy_set_tick_period_milliseconds(ms) == STATUS_OK }
}

pub fn continue_response() -> bool {
    // SAFETY: plain value.
    unsafe { proxy_continue_stream(STREAM_RESPONSE) == STATUS_OK }
}

pub fn set_effective_context(id: u32) -> bool {
    // SAFETY: plain value.
    unsafe { proxy_set_effective_context(id) == STATUS_OK }
}

pub fn now_nanos() -> u64 {
    let mut t = 0u64;
    // SAFETY: as above.
    unsafe {
        proxy_get_current_time_nanoseconds(&mut t);
    }
    t
}

/// The host's monotonic clock in ns (WASI `clock_time_get`, clock 1); the
/// wall clock if the host refuses it.
pub fn monotonic_nanos() -> u64 {
    let mut t = 0u64;
    // SAFETY: as above.
    let status = unsafe { clock_time_get(1, 1, &mut t) };
    if status == 0 {
        t
    } else {
        now_nanos()
    }
}

/// Levels: 0 trace, 1 debug, 2 info, 3 warn, 4 error, 5 critical.
pub fn log(level: u32, msg: &str) {
    // SAFETY: as above.
    unsafe {
        proxy_log(level, msg.as_ptr(), msg.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_malformed_input_is_refused() {
        let bytes = serialize_map(&[(":path", "/a"), ("x-empty", ""), ("k", "v")]);
        let pairs = parse_pairs(&bytes).unwrap();
        assert_eq!(
            pairs,
            vec![
                (b":path".to_vec(), b"/a".to_vec()),
                (b"x-empty".to_vec(), Vec::new()),
                (b"k".to_vec(), b"v".to_vec()),
            ]
        );
        assert_eq!(parse_pairs(&[]), Some(Vec::new()));
        for cut in 1..bytes.len() - 1 {
            assert_eq!(parse_pairs(&bytes[..cut]), None, "cut at {cut}");
        }
        assert_eq!(parse_pairs(&[0xff, 0xff, 0xff, 0xff]), None, "huge count");
    }
}
