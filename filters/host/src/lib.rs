//! The one place where txmesh-core's host traits meet the proxy-wasm SDK.
//!
//! `WasmHost` is a zero-sized handle: in proxy-wasm, every host call acts on
//! the context that is current when the call is made, so the same value
//! serves root and HTTP contexts alike.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};
use txmesh_core::host::{
    HostError, MetricKind, Metrics, Properties, RequestHeaders, SharedData, SharedSetError,
};

#[derive(Debug, Default, Clone, Copy)]
pub struct WasmHost;

fn err(what: &str, s: Status) -> HostError {
    HostError(format!("{what}: {s:?}"))
}

impl Metrics for WasmHost {
    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let t = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(t, name).map_err(|s| err("define_metric", s))
    }
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError> {
        hostcalls::increment_metric(id, delta).map_err(|s| err("increment_metric", s))
    }
    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        hostcalls::record_metric(id, value).map_err(|s| err("record_metric", s))
    }
}

impl SharedData for WasmHost {
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedSetError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SharedSetError::CasMismatch),
            Err(s) => Err(SharedSetError::Other(format!("{s:?}"))),
        }
    }
}

impl RequestHeaders for WasmHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(proxy_wasm::types::MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }
    fn set_request_header(&self, name: &str, value: Option<&str>) {
        let _ =
            hostcalls::set_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, name, value);
    }
}

impl Properties for WasmHost {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }
}
