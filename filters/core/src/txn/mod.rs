//! Transactions: ids and headers, config, the shared table, etcd decision
//! records, and the coordinator engine (see docs/protocol.md).

pub mod cause;
pub mod config;
pub mod engine;
pub mod etcd;
pub mod id;
pub mod pb;
pub mod seeded;
pub mod table;
pub mod tree;
