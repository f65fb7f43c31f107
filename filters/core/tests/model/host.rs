//! The host the model runs the real `TxnEngine` on: one callback at a time,
//! against the sidecar's modelled shared data and clock, with every effect
//! (a callout, a local reply, a resumed response) collected for the world to
//! deliver. It decides nothing: it is Envoy's side of the ABI.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use txmesh_core::host::{
    Callout, Clock, Family, FilterHost, HostError, LogLevel, Metrics, Properties, RequestHeaders,
    ResponsePart, SharedData, SharedSetError,
};

/// What one callback asked the host to do, in order.
#[derive(Debug, Clone)]
pub enum Effect {
    /// A callout dispatched from context `from`, answered to `token`.
    Dispatch {
        from: u32,
        token: u32,
        call: Callout,
    },
    /// A local reply on stream `ctx`.
    Reply {
        ctx: u32,
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Stream `ctx`'s paused response goes on, with these headers set.
    Resume {
        ctx: u32,
        headers: Vec<(String, String)>,
    },
}

/// A 32-bit FNV-1a of a shared-data value: the model's CAS token. Comparing
/// values instead of counting writes keeps equal tables equal states.
fn cas_of(v: &[u8]) -> u32 {
    v.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

pub struct ModelHost {
    pub shared: RefCell<BTreeMap<String, Vec<u8>>>,
    /// This sidecar's wall clock, ms.
    pub now_ms: u64,
    /// The context whose callback is running.
    pub current: u32,
    pub request_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub properties: Vec<(String, Vec<u8>)>,
    pub response_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub response_trailers: RefCell<Vec<(String, Vec<u8>)>>,
    /// Callout tokens still referenced somewhere in the world: not reused.
    pub tokens_in_use: RefCell<BTreeSet<u32>>,
    /// Seed of `random_id` (the sidecar and its incarnation) and a counter.
    pub seed: u64,
    pub draws: Cell<u8>,
    pub effects: RefCell<Vec<Effect>>,
    /// Log lines of this callback (shown with a counterexample when asked).
    pub logs: RefCell<Vec<String>>,
}

impl ModelHost {
    pub fn new(shared: BTreeMap<String, Vec<u8>>, now_ms: u64, current: u32) -> Self {
        Self {
            shared: RefCell::new(shared),
            now_ms,
            current,
            request_headers: RefCell::new(Vec::new()),
            properties: Vec::new(),
            response_headers: RefCell::new(Vec::new()),
            response_trailers: RefCell::new(Vec::new()),
            tokens_in_use: RefCell::new(BTreeSet::new()),
            seed: 0,
            draws: Cell::new(0),
            effects: RefCell::new(Vec::new()),
            logs: RefCell::new(Vec::new()),
        }
    }

    fn next_token(&self) -> u32 {
        let mut used = self.tokens_in_use.borrow_mut();
        let t = (1..).find(|t| !used.contains(t)).unwrap_or(u32::MAX);
        used.insert(t);
        t
    }
}

impl SharedData for ModelHost {
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.borrow().get(key) {
            Some(v) => (Some(v.clone()), Some(cas_of(v))),
            None => (None, None),
        }
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedSetError> {
        let mut map = self.shared.borrow_mut();
        if let (Some(want), Some(have)) = (cas, map.get(key).map(|v| cas_of(v))) {
            if want != have {
                return Err(SharedSetError::CasMismatch);
            }
        }
        map.insert(key.to_string(), value.to_vec());
        Ok(())
    }
}

impl Metrics for ModelHost {
    fn define_metric(&self, family: &'static Family, values: &[&str]) -> Result<u32, HostError> {
        Ok(cas_of(family.encoded(values).as_bytes()))
    }
    fn increment_metric(&self, _id: u32, _delta: i64) -> Result<(), HostError> {
        Ok(())
    }
    fn record_metric(&self, _id: u32, _value: u64) -> Result<(), HostError> {
        Ok(())
    }
}

impl RequestHeaders for ModelHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.request_headers
            .borrow()
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    fn set_request_header(&self, name: &str, value: Option<&str>) {
        let mut h = self.request_headers.borrow_mut();
        h.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            h.push((name.to_string(), v.as_bytes().to_vec()));
        }
    }
}

impl Properties for ModelHost {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let key = path.join(".");
        self.properties
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }
}

impl Clock for ModelHost {
    fn now_us(&self) -> u64 {
        self.now_ms * 1000
    }
}

impl FilterHost for ModelHost {
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
    fn random_id(&self) -> [u8; 16] {
        let n = self.draws.get().wrapping_add(1);
        self.draws.set(n);
        let mut b = [0x5au8; 16];
        b[..8].copy_from_slice(&self.seed.to_le_bytes());
        b[8] = n;
        b
    }
    fn dispatch(&self, c: &Callout) -> Result<u32, HostError> {
        self.dispatch_in(self.current, c)
    }
    fn dispatch_in(&self, ctx: u32, c: &Callout) -> Result<u32, HostError> {
        let from = if ctx == 0 { self.current } else { ctx };
        let token = self.next_token();
        self.effects.borrow_mut().push(Effect::Dispatch {
            from,
            token,
            call: c.clone(),
        });
        Ok(token)
    }
    fn send_reply(&self, ctx: u32, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        self.effects.borrow_mut().push(Effect::Reply {
            ctx,
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        });
    }
    fn resume_response(&self, ctx: u32, _part: ResponsePart, headers: &[(&str, &str)]) {
        self.effects.borrow_mut().push(Effect::Resume {
            ctx,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.response_headers
            .borrow()
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    fn response_trailer(&self, name: &str) -> Option<Vec<u8>> {
        self.response_trailers
            .borrow()
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    fn set_response_field(&self, _part: ResponsePart, name: &str, value: &str) {
        let mut h = self.response_headers.borrow_mut();
        h.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        h.push((name.to_string(), value.as_bytes().to_vec()));
    }
    fn log(&self, level: LogLevel, msg: &str) {
        self.logs.borrow_mut().push(format!("{level:?} {msg}"));
    }
}
