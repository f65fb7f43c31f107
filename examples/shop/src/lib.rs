//! The txmesh demo shop: order (the initiator), payment and inventory, each
//! a participant in transactions that its sidecar runs. See README.md.

pub mod participant;
pub mod registry;
pub mod services;
