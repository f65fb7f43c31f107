//! txmesh-core: every piece of txmesh logic that can be tested without Envoy.
//!
//! The proxy-wasm glue crates (`filters/*`) implement the small host traits in
//! [`host`] on top of the proxy-wasm SDK and call into this crate; the unit tests
//! here implement the same traits with [`host::fake::FakeHost`].

pub mod authz;
pub mod b64;
pub mod config;
pub mod flags;
pub mod grpc;
pub mod host;
pub mod json;
pub mod labels;
pub mod metrics;
pub mod prom;
pub mod props;
pub mod rng;
pub mod router;
#[cfg(test)]
pub(crate) mod testhost;
pub mod txn;
