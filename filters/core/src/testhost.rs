//! A fake filter host for the engines' unit tests: shared data, metrics,
//! headers and properties from [`FakeHost`], plus a clock, callouts, replies
//! and logs that a test reads back.
#![allow(clippy::type_complexity)]

use crate::host::fake::FakeHost;
use crate::host::{
    Callout, Clock, Family, FilterHost, HostError, LogLevel, Metrics, Properties, RequestHeaders,
    ResponsePart, SharedData, SharedSetError,
};
use std::cell::{Cell, RefCell};

#[derive(Default)]
pub struct Host {
    pub base: FakeHost,
    /// The monotonic clock, ms; the wall clock is `now + wall_step`.
    pub now: Cell<u64>,
    /// How far the wall clock has been stepped ([`Host::step_wall`]).
    pub wall_step: Cell<u64>,
    pub next_token: Cell<u32>,
    pub rand: Cell<u8>,
    pub calls: RefCell<Vec<(u32, Callout)>>,
    /// Tokens of the calls dispatched from another context, with it.
    pub dispatched_in: RefCell<Vec<(u32, u32)>>,
    pub replies: RefCell<Vec<(u32, u16, Vec<(String, String)>, String)>>,
    pub resumed: RefCell<Vec<(u32, Vec<(String, String)>)>>,
    /// Where each resume of `resumed` set its fields.
    pub resumed_at: RefCell<Vec<ResponsePart>>,
    pub response: RefCell<Vec<(String, Vec<u8>)>>,
    pub trailers: RefCell<Vec<(String, Vec<u8>)>>,
    pub logs: RefCell<Vec<String>>,
    pub dispatch_fails_for: RefCell<Option<String>>,
}

impl SharedData for Host {
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.base.shared_get(key)
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedSetError> {
        self.base.shared_set(key, value, cas)
    }
    fn shared_version(&self) -> Option<u64> {
        self.base.shared_version()
    }
}
impl Metrics for Host {
    fn define_metric(&self, family: &'static Family, values: &[&str]) -> Result<u32, HostError> {
        self.base.define_metric(family, values)
    }
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError> {
        self.base.increment_metric(id, delta)
    }
    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        self.base.record_metric(id, value)
    }
}
impl RequestHeaders for Host {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.base.request_header(name)
    }
    fn set_request_header(&self, name: &str, value: Option<&str>) {
        self.base.set_request_header(name, value)
    }
}
impl Properties for Host {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.base.property(path)
    }
}
impl Clock for Host {
    fn now_us(&self) -> u64 {
        (self.now.get() + self.wall_step.get()) * 1000
    }
    fn monotonic_us(&self) -> u64 {
        self.now.get() * 1000
    }
}
impl FilterHost for Host {
    fn now_ms(&self) -> u64 {
        self.now.get() + self.wall_step.get()
    }
    fn random_id(&self) -> [u8; 16] {
        self.rand.set(self.rand.get() + 1);
        let mut b = [7u8; 16];
        b[0] = self.rand.get();
        b[9] = self.rand.get().wrapping_mul(13);
        b
    }
    fn dispatch(&self, c: &Callout) -> Result<u32, HostError> {
        if self.dispatch_fails_for.borrow().as_deref() == Some(c.cluster.as_str()) {
            return Err(HostError("BadArgument".into()));
        }
        let t = self.next_token.get() + 1;
        self.next_token.set(t);
        self.calls.borrow_mut().push((t, c.clone()));
        Ok(t)
    }
    fn dispatch_in(&self, ctx: u32, c: &Callout) -> Result<u32, HostError> {
        let t = self.dispatch(c)?;
        self.dispatched_in.borrow_mut().push((t, ctx));
        Ok(t)
    }
    fn send_reply(&self, ctx: u32, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        self.replies.borrow_mut().push((
            ctx,
            status,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            String::from_utf8_lossy(body).into_owned(),
        ));
    }
    fn resume_response(&self, ctx: u32, part: ResponsePart, headers: &[(&str, &str)]) {
        self.resumed_at.borrow_mut().push(part);
        self.resumed.borrow_mut().push((
            ctx,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
    }
    fn set_response_field(&self, part: ResponsePart, name: &str, value: &str) {
        let map = match part {
            ResponsePart::Headers => &self.response,
            ResponsePart::Trailers => &self.trailers,
        };
        map.borrow_mut()
            .push((name.to_string(), value.as_bytes().to_vec()));
    }
    fn response_trailer(&self, name: &str) -> Option<Vec<u8>> {
        self.trailers
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.response
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
    fn log(&self, _level: LogLevel, msg: &str) {
        self.logs.borrow_mut().push(msg.to_string());
    }
}

impl Host {
    pub fn new() -> Self {
        let h = Self::default();
        h.now.set(1_000_000);
        h
    }
    /// Time passes: both clocks move.
    pub fn advance(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }
    /// The wall clock is stepped forward (NTP, an operator): the monotonic
    /// clock does not move.
    pub fn step_wall(&self, ms: u64) {
        self.wall_step.set(self.wall_step.get() + ms);
    }
}
