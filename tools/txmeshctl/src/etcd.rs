//! etcd, through the project's one client (txmesh-etcd), with failures
//! said as an operator needs them.

use crate::common::{Fail, Res};

/// The project's etcd client, with failures said as an operator needs them.
pub(crate) struct Etcd(pub txmesh_etcd::Etcd);

impl Etcd {
    pub(crate) fn new(url: &str) -> Self {
        Self(txmesh_etcd::Etcd::new(url))
    }

    pub(crate) fn fail(&self, e: txmesh_etcd::Error) -> Fail {
        match e {
            txmesh_etcd::Error::Unreachable { url, error } => Fail(format!(
                "cannot reach etcd at {url} ({error}).\n  Is etcd running? `make up` starts it on 127.0.0.1:2379; point elsewhere with --etcd or TXMESH_ETCD."
            )),
            other => Fail(format!("etcd at {}: {other}", self.0.url())),
        }
    }

    /// (key, value, lease id) under `prefix`.
    pub(crate) fn list(&self, prefix: &str) -> Res<Vec<(String, Vec<u8>, i64)>> {
        let kvs = self.0.list(prefix).map_err(|e| self.fail(e))?;
        Ok(kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value, kv.lease))
            .collect())
    }

    pub(crate) fn get(&self, key: &str) -> Res<Option<Vec<u8>>> {
        self.0.get(key).map_err(|e| self.fail(e))
    }
}
