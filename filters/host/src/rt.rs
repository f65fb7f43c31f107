//! A minimal proxy-wasm runtime: the ABI marker, the allocator, and the
//! table of root and stream contexts each filter keeps.
//!
//! Why not the SDK's dispatcher: Envoy calls into the VM only for the
//! callbacks a module exports, and every call costs (≈0.5 µs on the bench
//! machine, BENCHMARKS.md). The SDK exports all of them and keeps a boxed
//! context per stream; with this runtime each filter exports exactly the
//! callbacks it uses (`#[no_mangle] extern "C" fn proxy_on_…` in its glue
//! crate) and keeps its per-stream state in a bounded [`Contexts`] table.

#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::mem::MaybeUninit;

/// The ABI version this module speaks (Envoy looks for the export's name).
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Buffers the host hands to the module (header values, properties, bodies)
/// are allocated here; `raw::take` turns them back into a `Vec<u8>` with the
/// same layout (a boxed slice of exactly `size` bytes).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut v: Vec<MaybeUninit<u8>> = Vec::with_capacity(size);
    // SAFETY: MaybeUninit needs no initialisation; the host writes the bytes.
    unsafe { v.set_len(size) };
    Box::into_raw(v.into_boxed_slice()).cast::<u8>()
}

/// Streams one filter tracks at most (per VM, i.e. per Envoy worker). Envoy
/// calls `proxy_on_log` for every stream it created a context for, which
/// removes the entry; the bound only matters if that ever failed.
pub const MAX_STREAMS: usize = 1 << 16;

/// Root contexts (one per plugin configuration in this VM) and the streams
/// they created, with their per-stream state.
pub struct Contexts<R, S> {
    roots: BTreeMap<u32, R>,
    streams: HashMap<u32, (u32, S)>,
    /// The last stream created and its root, for filters that act only at
    /// request headers and keep no per-stream state (see [`Contexts::note`]).
    last: (u32, u32),
    /// Streams refused because the table was full.
    pub refused: u64,
}

impl<R, S> Default for Contexts<R, S> {
    fn default() -> Self {
        Self {
            roots: BTreeMap::new(),
            streams: HashMap::new(),
            last: (0, 0),
            refused: 0,
        }
    }
}

impl<R, S> Contexts<R, S> {
    /// Installs (or replaces) the engine of root context `id`.
    pub fn set_root(&mut self, id: u32, engine: R) {
        self.roots.insert(id, engine);
    }

    pub fn root_mut(&mut self, id: u32) -> Option<&mut R> {
        self.roots.get_mut(&id)
    }

    /// `proxy_on_context_create`: a stream context `ctx` of root `root`
    /// (root contexts themselves, `root == 0`, are installed by
    /// [`Contexts::set_root`] at configure time). False when the table is
    /// full: the stream is not tracked.
    pub fn create(&mut self, ctx: u32, root: u32, state: S) -> bool {
        if root == 0 {
            return true;
        }
        if self.streams.len() >= MAX_STREAMS {
            self.refused += 1;
            return false;
        }
        self.streams.insert(ctx, (root, state));
        true
    }

    /// `proxy_on_context_create` for a filter that keeps no per-stream state
    /// (and so exports no `proxy_on_log` to forget it): remembers only the
    /// last stream's root. Envoy creates a stream's context right before its
    /// request headers, with no other call into the VM in between.
    pub fn note(&mut self, ctx: u32, root: u32) {
        if root != 0 {
            self.last = (ctx, root);
        }
    }

    /// The engine of stream `ctx` noted by [`Contexts::note`]; when `ctx`
    /// was not the last one noted, the only root if there is exactly one.
    pub fn noted_engine(&mut self, ctx: u32) -> Option<&mut R> {
        let root = if self.last.0 == ctx {
            self.last.1
        } else if self.roots.len() == 1 {
            *self.roots.keys().next()?
        } else {
            return None;
        };
        self.roots.get_mut(&root)
    }

    /// Whether the latest refusal should be logged: the 1st, 2nd, 4th, 8th …
    /// (a full table is worth knowing about, not worth a log line per stream).
    pub fn refusal_worth_logging(&self) -> bool {
        self.refused.is_power_of_two()
    }

    /// The engine and the state of stream `ctx`.
    pub fn stream_mut(&mut self, ctx: u32) -> Option<(&mut R, &mut S)> {
        let (root, state) = self.streams.get_mut(&ctx)?;
        let engine = self.roots.get_mut(root)?;
        Some((engine, state))
    }

    /// The engine of a context: its own (a root) or its root's (a stream).
    pub fn engine_of(&mut self, ctx: u32) -> Option<&mut R> {
        let root = match self.streams.get(&ctx) {
            Some((root, _)) => *root,
            None => ctx,
        };
        self.roots.get_mut(&root)
    }

    /// Runs `f` on the engine that must see a callout answered on context
    /// `ctx`: the context's own engine, or, when the stream that made the
    /// call has ended, every engine (callout tokens are unique in a VM, and
    /// an engine ignores tokens it does not own).
    pub fn for_callout(&mut self, ctx: u32, mut f: impl FnMut(&mut R)) {
        match self.engine_of(ctx) {
            Some(e) => f(e),
            None => self.roots.values_mut().for_each(f),
        }
    }

    /// Removes stream `ctx` (at `proxy_on_log`), returning its engine and state.
    pub fn finish(&mut self, ctx: u32) -> Option<(&mut R, S)> {
        let (root, state) = self.streams.remove(&ctx)?;
        let engine = self.roots.get_mut(&root)?;
        Some((engine, state))
    }

    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_map_to_their_root_and_are_removed_at_finish() {
        let mut c: Contexts<&str, u32> = Contexts::default();
        c.set_root(1, "inbound");
        c.set_root(2, "outbound");
        assert!(c.create(1, 0, 0), "a root context is not a stream");
        assert!(c.create(10, 1, 7));
        assert!(c.create(11, 2, 8));
        assert_eq!(c.streams(), 2);
        let (engine, state) = c.stream_mut(11).unwrap();
        assert_eq!((*engine, *state), ("outbound", 8));
        assert_eq!(c.engine_of(10).copied(), Some("inbound"));
        assert_eq!(c.engine_of(2).copied(), Some("outbound"));
        assert_eq!(c.engine_of(99), None);
        let (engine, state) = c.finish(10).unwrap();
        assert_eq!((*engine, state), ("inbound", 7));
        assert!(c.finish(10).is_none(), "finished once");
        assert_eq!(c.streams(), 1);
    }

    #[test]
    fn a_callout_goes_to_its_contexts_engine_or_to_all_once_the_stream_ended() {
        let mut c: Contexts<Vec<u32>, ()> = Contexts::default();
        c.set_root(1, Vec::new());
        c.set_root(2, Vec::new());
        c.create(10, 2, ());
        c.for_callout(10, |e| e.push(10));
        c.for_callout(1, |e| e.push(1));
        c.finish(10);
        c.for_callout(10, |e| e.push(99));
        assert_eq!(c.root_mut(1).cloned(), Some(vec![1, 99]));
        assert_eq!(c.root_mut(2).cloned(), Some(vec![10, 99]));
    }

    #[test]
    fn noted_streams_find_their_root_without_a_table() {
        let mut c: Contexts<&str, ()> = Contexts::default();
        c.set_root(1, "a");
        assert_eq!(c.noted_engine(5).copied(), Some("a"), "the only root");
        c.set_root(2, "b");
        c.note(5, 2);
        assert_eq!(c.noted_engine(5).copied(), Some("b"));
        assert_eq!(c.noted_engine(6), None, "two roots and not the last noted");
        assert_eq!(c.streams(), 0);
    }

    #[test]
    fn a_full_table_refuses_new_streams_and_counts_them() {
        let mut c: Contexts<(), ()> = Contexts::default();
        c.set_root(1, ());
        for ctx in 0..MAX_STREAMS as u32 {
            assert!(c.create(ctx + 2, 1, ()));
        }
        assert!(!c.create(u32::MAX, 1, ()));
        assert_eq!(c.refused, 1);
        assert!(c.refusal_worth_logging());
        assert!(!c.create(u32::MAX - 1, 1, ()));
        assert!(c.refusal_worth_logging(), "the 2nd");
        assert!(!c.create(u32::MAX - 2, 1, ()));
        assert!(!c.refusal_worth_logging(), "not the 3rd");
        assert!(c.stream_mut(u32::MAX).is_none());
        c.finish(2);
        assert!(c.create(u32::MAX, 1, ()), "room again after a stream ends");
    }
}
