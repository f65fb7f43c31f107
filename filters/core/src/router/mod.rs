//! Discovery-aware routing (`txmesh_router.wasm`): an etcd service registry,
//! load-balancing strategies with latency and health feedback, per-endpoint
//! metrics. See docs/router.md.

pub mod balance;
pub mod config;
pub mod engine;
pub mod registry;
