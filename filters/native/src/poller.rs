//! The native router's registry poller: one `RouterEngine` on Envoy's main
//! thread per router config.
//!
//! The HTTP-filter ABI has no timer and no per-worker root context
//! (docs/native.md). So the config's [`crate::ticker::Ticker`] wakes the
//! main thread every tick (`on_http_filter_config_scheduled`), where this
//! engine ticks: it keeps the poller lease, reads the registry with a config-level
//! callout (answered on the main thread), enforces the read's deadline and
//! publishes the table in the process-wide shared data. The workers' engines
//! only follow (`RouterEngine::following`): they never call etcd.

use crate::abi::{self, ConfigEnvoyPtr, EnvoyBuffer, EnvoyHttpHeader};
use crate::host::{Families, NativeHost};
use std::sync::Mutex;
use txmesh_core::host::CalloutResponse;
use txmesh_core::router::engine::RouterEngine;

/// One router config's poller (lives as long as the config; its ticks come
/// from the config's [`crate::ticker::Ticker`]).
pub struct Poller {
    /// Main thread only (config hooks); the lock is never contended.
    engine: Mutex<RouterEngine>,
}

impl Poller {
    pub fn new(engine: RouterEngine) -> Self {
        Poller {
            engine: Mutex::new(engine),
        }
    }

    /// A tick (the scheduler's event, on the main thread).
    pub fn tick(&self, envoy: ConfigEnvoyPtr, families: &Families) {
        let host = NativeHost::on_config(envoy, families);
        let mut engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        engine.on_tick(&host);
    }

    /// The registry read's answer (on the main thread).
    pub fn answered(
        &self,
        envoy: ConfigEnvoyPtr,
        families: &Families,
        callout_id: u64,
        resp: CalloutResponse,
    ) {
        let Ok(token) = u32::try_from(callout_id) else {
            return; // Never dispatched: dispatch refuses ids past u32.
        };
        let host = NativeHost::on_config(envoy, families);
        let mut engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        engine.on_callout(&host, token, resp);
    }
}

/// A config-level callout's answer as the engines read answers: `:status`
/// and the body's chunks joined; no HTTP answer when the call failed.
///
/// # Safety
/// `headers` and `chunks` point to `n_headers` / `n_chunks` items Envoy owns
/// for the duration of the hook (or are null).
pub unsafe fn callout_response(
    result: u32,
    headers: *const EnvoyHttpHeader,
    n_headers: usize,
    chunks: *const EnvoyBuffer,
    n_chunks: usize,
) -> CalloutResponse {
    if result != abi::CALLOUT_SUCCESS || headers.is_null() {
        return CalloutResponse::default();
    }
    // SAFETY: by the caller's contract.
    let headers = unsafe { std::slice::from_raw_parts(headers, n_headers) };
    let status = headers.iter().find_map(|h| {
        // SAFETY: Envoy's buffers, valid for this hook.
        let (k, v) = unsafe {
            (
                EnvoyBuffer {
                    ptr: h.key_ptr,
                    len: h.key_len,
                }
                .bytes(),
                EnvoyBuffer {
                    ptr: h.value_ptr,
                    len: h.value_len,
                }
                .bytes(),
            )
        };
        (k == b":status")
            .then(|| std::str::from_utf8(v).ok()?.parse::<u16>().ok())
            .flatten()
    });
    let mut body = Vec::new();
    if !chunks.is_null() {
        // SAFETY: by the caller's contract.
        for c in unsafe { std::slice::from_raw_parts(chunks, n_chunks) } {
            // SAFETY: Envoy's buffer, valid for this hook; copied.
            body.extend_from_slice(unsafe { c.bytes() });
        }
    }
    CalloutResponse { status, body }
}
