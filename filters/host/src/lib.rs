//! The one place where txmesh-core's host traits meet proxy-wasm.
//!
//! `WasmHost` acts on the context named `current` (the context whose callback
//! is running): proxy-wasm host calls act on the host's "effective" context,
//! and when the engine must act on another stream (answer a paused request
//! from the root context's tick), `WasmHost` switches the effective context
//! to it and back.

pub mod raw;
pub mod rt;

use txmesh_core::host::{
    Callout, CalloutResponse, Clock, Family, FilterHost, HostError, LogLevel, MetricKind, Metrics,
    Properties, RequestHeaders, ResponsePart, SharedData, SharedSetError, Verdict,
};

/// The proxy-wasm header map of a response part.
fn response_map(part: ResponsePart) -> u32 {
    match part {
        ResponsePart::Headers => raw::MAP_RESPONSE_HEADERS,
        ResponsePart::Trailers => raw::MAP_RESPONSE_TRAILERS,
    }
}

/// Lives for one callback (build one per call into the VM).
#[derive(Debug, Default)]
pub struct WasmHost {
    /// The context whose callback is running (0: unknown / not needed).
    pub current: u32,
    /// The current stream's request headers, all read in one host call at
    /// the first lookup: one call (≈1.3 µs) instead of one per header
    /// (≈0.7 µs each; BENCHMARKS.md "What a host call costs").
    request_headers: std::cell::RefCell<Option<raw::Pairs>>,
}

impl WasmHost {
    pub fn on(current: u32) -> Self {
        Self {
            current,
            ..Self::default()
        }
    }

    /// Runs `f` with `ctx` as the effective context, then switches back.
    fn with_context(&self, ctx: u32, f: impl FnOnce()) {
        // 0: no context named (an engine not told its root): the current one.
        if ctx == self.current || ctx == 0 {
            f();
            return;
        }
        if raw::set_effective_context(ctx) {
            f();
            if self.current != 0 {
                raw::set_effective_context(self.current);
            }
        }
    }
}

/// The plugin configuration of `size` bytes, parsed by `parse`. An error is
/// logged as `invalid plugin configuration <error>` (`on_configure` then
/// returns false and Envoy refuses the configuration).
pub fn plugin_config<T, E: std::fmt::Display>(
    size: usize,
    parse: impl FnOnce(&[u8]) -> Result<T, E>,
) -> Option<T> {
    let bytes = raw::get_buffer(raw::BUFFER_PLUGIN_CONFIGURATION, 0, size);
    match parse(&bytes) {
        Ok(c) => Some(c),
        Err(e) => {
            raw::log(4, &format!("invalid plugin configuration {e}"));
            None
        }
    }
}

/// Runs `f` on a filter's context table; nothing when it is busy (a
/// re-entrant callback, which Envoy should never make).
pub fn with_contexts<R, S, T>(
    table: &'static std::thread::LocalKey<std::cell::RefCell<rt::Contexts<R, S>>>,
    f: impl FnOnce(&mut rt::Contexts<R, S>) -> T,
) -> Option<T> {
    table.with(|t| t.try_borrow_mut().ok().map(|mut t| f(&mut t)))
}

/// `proxy_on_configure`'s tail: installs root `root`'s engine and, for
/// filters with periodic work, starts its tick. The ABI's answer (1 = ok).
pub fn install_root<R, S>(
    table: &'static std::thread::LocalKey<std::cell::RefCell<rt::Contexts<R, S>>>,
    root: u32,
    engine: R,
    tick_ms: Option<u64>,
) -> u32 {
    if with_contexts(table, |c| c.set_root(root, engine)).is_none() {
        return 0;
    }
    if let Some(ms) = tick_ms {
        raw::set_tick_period(u32::try_from(ms).unwrap_or(u32::MAX));
    }
    1
}

/// Runs `f` on root `root`'s engine (`proxy_on_tick`).
pub fn with_root<R, S>(
    table: &'static std::thread::LocalKey<std::cell::RefCell<rt::Contexts<R, S>>>,
    root: u32,
    f: impl FnOnce(&mut R, &WasmHost),
) {
    with_contexts(table, |c| {
        if let Some(e) = c.root_mut(root) {
            f(e, &WasmHost::on(root));
        }
    });
}

/// `proxy_on_http_call_response`: reads the answer and hands it to the
/// engine that must see it ([`rt::Contexts::for_callout`]).
pub fn deliver_callout<R, S>(
    table: &'static std::thread::LocalKey<std::cell::RefCell<rt::Contexts<R, S>>>,
    ctx: u32,
    num_headers: usize,
    body_size: usize,
    mut f: impl FnMut(&mut R, &WasmHost, CalloutResponse),
) {
    let resp = callout_response(num_headers, body_size);
    let host = WasmHost::on(ctx);
    with_contexts(table, |c| c.for_callout(ctx, |e| f(e, &host, resp.clone())));
}

/// Marks the tokens of gRPC calls apart from HTTP callouts' (Envoy counts
/// the two from 1 each): an engine keys its calls by token.
pub const GRPC_TOKEN: u32 = 1 << 31;

/// `proxy_on_grpc_receive` / `proxy_on_grpc_close` of a unary gRPC call:
/// its answer (status 0 with the response message, or the failure and its
/// message) handed to the engine that must see it, under its
/// [`GRPC_TOKEN`]-marked token.
pub fn deliver_grpc<R, S>(
    table: &'static std::thread::LocalKey<std::cell::RefCell<rt::Contexts<R, S>>>,
    ctx: u32,
    token: u32,
    status: u32,
    body: Vec<u8>,
    mut f: impl FnMut(&mut R, &WasmHost, u32, CalloutResponse),
) {
    let resp = CalloutResponse::from_grpc(status, body);
    let host = WasmHost::on(ctx);
    with_contexts(table, |c| {
        c.for_callout(ctx, |e| f(e, &host, token | GRPC_TOKEN, resp.clone()))
    });
}

/// The ABI's filter status for an engine's verdict (0 Continue, 1 Pause).
pub fn action(v: Verdict) -> u32 {
    match v {
        Verdict::Continue => 0,
        Verdict::Pause => 1,
    }
}

/// `proxy_on_context_create` for a filter that keeps per-stream state: the
/// stream's entry in its table, or a warning (now and then) when the table
/// is full and the stream goes untracked.
pub fn create_stream<R, S>(
    table: &'static std::thread::LocalKey<std::cell::RefCell<rt::Contexts<R, S>>>,
    filter: &str,
    ctx: u32,
    root: u32,
    state: S,
) {
    with_contexts(table, |c| {
        if !c.create(ctx, root, state) && c.refusal_worth_logging() {
            raw::log(
                3,
                &format!(
                    "{filter}: {} streams in flight in this worker, the most it tracks: new streams are not tracked ({} so far)",
                    c.streams(),
                    c.refused
                ),
            );
        }
    });
}

/// Reads the answer of a callout inside `on_http_call_response`. No headers
/// means no HTTP answer (timeout, reset, no upstream).
pub fn callout_response(num_headers: usize, body_size: usize) -> CalloutResponse {
    if num_headers == 0 {
        return CalloutResponse::default();
    }
    let status = raw::get_header(raw::MAP_CALL_RESPONSE_HEADERS, ":status")
        .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok());
    let body = if body_size > 0 {
        raw::get_buffer(raw::BUFFER_CALL_RESPONSE_BODY, 0, body_size)
    } else {
        Vec::new()
    };
    CalloutResponse { status, body }
}

impl Metrics for WasmHost {
    /// Labels go into the stat name (Istio's encoding); the bootstrap's
    /// `stats_tags` turn them into tags.
    fn define_metric(&self, family: &'static Family, values: &[&str]) -> Result<u32, HostError> {
        let t = match family.kind {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        let name = family.encoded(values);
        raw::define_metric(t, &name)
            .map_err(|s| HostError(format!("define_metric {name}: status {s}")))
    }
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError> {
        match raw::increment_metric(id, delta) {
            raw::STATUS_OK => Ok(()),
            s => Err(HostError(format!("increment_metric: status {s}"))),
        }
    }
    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        match raw::record_metric(id, value) {
            raw::STATUS_OK => Ok(()),
            s => Err(HostError(format!("record_metric: status {s}"))),
        }
    }
}

impl SharedData for WasmHost {
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        raw::get_shared(key)
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedSetError> {
        raw::set_shared(key, value, cas).map_err(|mismatch| {
            if mismatch {
                SharedSetError::CasMismatch
            } else {
                SharedSetError::Other("set_shared_data failed".to_string())
            }
        })
    }
}

impl RequestHeaders for WasmHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        let Ok(mut cache) = self.request_headers.try_borrow_mut() else {
            return raw::get_header(raw::MAP_REQUEST_HEADERS, name);
        };
        if cache.is_none() {
            *cache = raw::get_header_pairs(raw::MAP_REQUEST_HEADERS);
        }
        match cache.as_ref() {
            Some(pairs) => pairs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v.clone()),
            // The host refused the pairs: ask for the one header.
            None => raw::get_header(raw::MAP_REQUEST_HEADERS, name),
        }
    }
    fn set_request_header(&self, name: &str, value: Option<&str>) {
        raw::set_header(raw::MAP_REQUEST_HEADERS, name, value.map(str::as_bytes));
        if let Ok(mut cache) = self.request_headers.try_borrow_mut() {
            if let Some(pairs) = cache.as_mut() {
                pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(name.as_bytes()));
                if let Some(v) = value {
                    pairs.push((name.as_bytes().to_vec(), v.as_bytes().to_vec()));
                }
            }
        }
    }
}

impl Properties for WasmHost {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        raw::get_property(path)
    }
}

impl Clock for WasmHost {
    fn now_us(&self) -> u64 {
        raw::now_nanos() / 1_000
    }
    fn monotonic_us(&self) -> u64 {
        raw::monotonic_nanos() / 1_000
    }
}

impl FilterHost for WasmHost {
    fn now_ms(&self) -> u64 {
        raw::now_nanos() / 1_000_000
    }

    fn random_id(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        if getrandom::getrandom(&mut b).is_err() {
            // No entropy from the host: fall back to time (ids stay unique
            // per process; the engine rejects all-zero).
            b.copy_from_slice(&u128::from(raw::now_nanos()).to_le_bytes());
        }
        b
    }

    fn dispatch(&self, c: &Callout) -> Result<u32, HostError> {
        if let Some(g) = c.grpc {
            let metadata: Vec<(&str, &str)> = c
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            return raw::grpc_call(
                &c.cluster,
                g.service,
                g.method,
                &metadata,
                &c.body,
                c.timeout_ms,
            )
            .map(|t| t | GRPC_TOKEN)
            .map_err(|s| HostError(format!("gRPC call to {}: status {s}", c.cluster)));
        }
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", c.method),
            (":path", &c.path),
            (":authority", &c.cluster),
        ];
        headers.extend(c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        raw::http_call(&c.cluster, &headers, &c.body, c.timeout_ms)
            .map_err(|s| HostError(format!("dispatch to {}: status {s}", c.cluster)))
    }

    fn dispatch_in(&self, ctx: u32, c: &Callout) -> Result<u32, HostError> {
        let mut out = Err(HostError(format!(
            "dispatch to {}: no context {ctx}",
            c.cluster
        )));
        self.with_context(ctx, || out = self.dispatch(c));
        if let Err(e) = &out {
            raw::log(3, &e.0);
        }
        out
    }

    fn send_reply(&self, ctx: u32, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        self.with_context(ctx, || {
            raw::send_local_response(status, headers, body);
        });
    }

    fn resume_response(&self, ctx: u32, part: ResponsePart, fields: &[(&str, &str)]) {
        self.with_context(ctx, || {
            for (k, v) in fields {
                raw::set_header(response_map(part), k, Some(v.as_bytes()));
            }
            raw::continue_response();
        });
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        raw::get_header(raw::MAP_RESPONSE_HEADERS, name)
    }

    fn response_trailer(&self, name: &str) -> Option<Vec<u8>> {
        raw::get_header(raw::MAP_RESPONSE_TRAILERS, name)
    }

    fn set_response_field(&self, part: ResponsePart, name: &str, value: &str) {
        raw::set_header(response_map(part), name, Some(value.as_bytes()));
    }

    fn log(&self, level: LogLevel, msg: &str) {
        let l = match level {
            LogLevel::Debug => 1,
            LogLevel::Info => 2,
            LogLevel::Warn => 3,
            LogLevel::Error => 4,
        };
        raw::log(l, msg);
    }
}

/// Exports `proxy_on_tick` and `proxy_on_http_call_response` for a filter
/// whose engines run timers and callouts (router, txn): the tick goes to the
/// root's engine, a callout's answer to the engine that must see it
/// ([`deliver_callout`]). `$table` is the filter's `thread_local!` context
/// table; its engine type has `on_tick(&mut self, &WasmHost)` and
/// `on_callout(&mut self, &WasmHost, u32, CalloutResponse)`.
#[macro_export]
macro_rules! export_tick_and_callouts {
    ($table:ident) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_tick(root: u32) {
            $crate::with_root(&$table, root, |e, h| e.on_tick(h));
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_http_call_response(
            ctx: u32,
            token: u32,
            headers: usize,
            body: usize,
            _trailers: usize,
        ) {
            $crate::deliver_callout(&$table, ctx, headers, body, |e, h, resp| {
                e.on_callout(h, token, resp)
            });
        }
    };
}
