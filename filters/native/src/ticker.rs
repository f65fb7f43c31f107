//! Every filter config's tick on Envoy's main thread.
//!
//! The HTTP-filter ABI has no timer and no per-worker root context
//! (docs/native.md). Each config owns a config scheduler and a small thread
//! (`txmesh-tick`) that commits to it every [`TICK_MS`]; each commit arrives
//! as `on_http_filter_config_scheduled` on the main thread. There the config
//! records the counters its workers summed since the last tick (all
//! filters) and the router's poller ticks.

use crate::abi::{self, ConfigEnvoyPtr, ConfigSchedulerPtr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The tick period, ms: the wasm filters' root-context tick.
pub const TICK_MS: u64 = txmesh_core::router::engine::TICK_MS;

/// A scheduler pointer handed to the tick thread: Envoy's scheduler may be
/// committed to from any thread (ENVOY-NOTES); it is deleted only after the
/// thread has been joined.
struct SchedulerRef(ConfigSchedulerPtr);
// SAFETY: see above; the thread only calls `scheduler_commit` with it.
unsafe impl Send for SchedulerRef {}

/// One config's tick: its scheduler and the thread that commits to it.
pub struct Ticker {
    name: String,
    scheduler: ConfigSchedulerPtr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts ticking the config `envoy` (the filter `name`, for the log).
    pub fn start(envoy: ConfigEnvoyPtr, name: &str) -> Result<Self, String> {
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
            .name("txmesh-tick".into())
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
            Ok(thread) => Ok(Ticker {
                name: name.to_string(),
                scheduler,
                stop,
                thread: Some(thread),
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
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        // SAFETY: the only thread committing to it has ended.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.scheduler)
        }
        crate::host::log(
            abi::LOG_INFO,
            &format!("txmesh native filter {:?}: tick stopped", self.name),
        );
    }
}
