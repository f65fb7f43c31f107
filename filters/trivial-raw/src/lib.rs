//! txmesh_trivial_raw.wasm: the floor of a wasm filter built on `txmesh_host::rt`
//! (BENCHMARKS.md): one exported callback, request headers, that sets one
//! request header. Compare with txmesh_trivial.wasm (the same on the SDK).

use txmesh_host::raw;

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_ctx: u32, _headers: usize, _eos: u32) -> u32 {
    raw::set_header(raw::MAP_REQUEST_HEADERS, "x-txmesh-trivial", Some(b"1"));
    0
}
