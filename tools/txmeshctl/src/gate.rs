//! `gate`: the txn filter's gate from its own config.

use crate::common::*;

/// `txmeshctl gate <config.json|->`: the txn filter's gate, from the very
/// config the filter runs with (so the two cannot disagree).
pub(crate) fn gate(path: &str) -> Res<()> {
    let bytes = if path == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
            .map_err(|e| Fail(format!("cannot read the config from stdin: {e}")))?;
        b
    } else {
        std::fs::read(path).map_err(|e| Fail(format!("cannot read {path}: {e}")))?
    };
    let cfg = txmesh_core::txn::config::TxnConfig::parse(&bytes)
        .map_err(|e| Fail(format!("{path}: invalid txn filter config {e}")))?;
    let text =
        serde_json::to_string_pretty(&cfg.gate_matcher()).map_err(|e| Fail(e.to_string()))?;
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), format!("{text}\n").as_bytes());
    Ok(())
}
