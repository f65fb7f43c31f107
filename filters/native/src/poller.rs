//! The native router's registry poller: one `RouterEngine` on Envoy's main
//! thread per router config.
//!
//! The HTTP-filter ABI has no timer and no per-worker root context
//! (docs/native.md). So the config owns a scheduler and a small thread that
//! commits to it every [`TICK_MS`]; each commit arrives as
//! `on_http_filter_config_scheduled` on the main thread, where this engine
//! ticks: it keeps the poller lease, reads the registry with a config-level
//! callout (answered on the main thread), enforces the read's deadline and
//! publishes the table in the process-wide shared data. The workers' engines
//! only follow (`RouterEngine::on_refresh`): they never call etcd.

use crate::abi::{self, ConfigEnvoyPtr, ConfigSchedulerPtr, EnvoyBuffer, EnvoyHttpHeader};
use crate::host::{Families, NativeHost};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use txmesh_core::host::CalloutResponse;
use txmesh_core::router::engine::{RouterEngine, TICK_MS};

/// A scheduler pointer handed to the ticker thread: Envoy's scheduler may be
/// committed to from any thread (ENVOY-NOTES); it is deleted only after the
/// thread has been joined.
struct SchedulerRef(ConfigSchedulerPtr);
// SAFETY: see above; the ticker only calls `scheduler_commit` with it.
unsafe impl Send for SchedulerRef {}

/// The thread that wakes the poller every tick.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// One router config's poller (lives as long as the config).
pub struct Poller {
    /// Main thread only (config hooks); the lock is never contended.
    engine: Mutex<RouterEngine>,
    scheduler: ConfigSchedulerPtr,
    ticker: Option<Ticker>,
}

impl Poller {
    /// Starts ticking `engine` on the main thread of the config `envoy`.
    pub fn start(envoy: ConfigEnvoyPtr, engine: RouterEngine) -> Result<Self, String> {
        // SAFETY: called in config_new, with the config's Envoy pointer.
        let scheduler =
            unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(envoy) };
        if scheduler.is_null() {
            return Err("Envoy gave no config scheduler".into());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let target = SchedulerRef(scheduler);
        let spawned = std::thread::Builder::new()
            .name("txmesh-router-tick".into())
            .spawn(move || {
                let target = target;
                while !flag.load(Ordering::Acquire) {
                    std::thread::park_timeout(Duration::from_millis(TICK_MS));
                    if flag.load(Ordering::Acquire) {
                        break;
                    }
                    // SAFETY: the scheduler outlives this thread (Drop joins
                    // before deleting it).
                    unsafe {
                        abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                            target.0, 0,
                        )
                    }
                }
            });
        match spawned {
            Ok(thread) => Ok(Poller {
                engine: Mutex::new(engine),
                scheduler,
                ticker: Some(Ticker { stop, thread }),
            }),
            Err(e) => {
                // SAFETY: created above, never shared.
                unsafe {
                    abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
                        scheduler,
                    )
                };
                Err(format!("cannot start the tick thread: {e}"))
            }
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

impl Drop for Poller {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.stop.store(true, Ordering::Release);
            t.thread.thread().unpark();
            let _ = t.thread.join();
        }
        // SAFETY: the only thread committing to it has ended.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.scheduler)
        }
        crate::host::log(
            abi::LOG_INFO,
            "txmesh native router: registry poller stopped",
        );
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
