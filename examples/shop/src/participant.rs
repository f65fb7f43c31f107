//! The participant side of txmesh's protocol, generic over a service's
//! ledger: the three endpoints' semantics (idempotent prepare, commit and
//! abort; a prepare after an abort refused; abort of an unknown transaction
//! accepted), durable in SQLite.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::sync::Mutex;

/// What a service does with its own tables.
pub trait Ledger: Send + Sync {
    /// Schema of the service's own tables (beyond `txns`).
    fn schema(&self) -> &'static str;
    /// Seed data for a fresh database.
    fn seed(&self, tx: &Transaction) -> rusqlite::Result<()>;
    /// Turns the transaction's tentative work into a durable reservation.
    /// `Ok(Err(reason))` votes no; `Ok(Ok(false))`: nothing to do (read-only).
    fn prepare(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<Result<bool, String>>;
    /// Applies the reservation.
    fn commit(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<()>;
    /// Releases the tentative work or the reservation.
    fn abort(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<()>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    Commit,
    ReadOnly,
    Abort(String),
}

pub struct Participant<L: Ledger> {
    db: Mutex<Connection>,
    pub ledger: L,
}

const TXNS: &str = "CREATE TABLE IF NOT EXISTS txns (
    txn TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('working', 'prepared', 'committed', 'aborted')),
    deadline_ms INTEGER NOT NULL DEFAULT 0
);";

fn err(e: rusqlite::Error) -> String {
    format!("database error: {e}")
}

impl<L: Ledger> Participant<L> {
    /// Opens (and on first use creates and seeds) the database at `path`
    /// (`:memory:` for tests).
    pub fn open(path: &str, ledger: L) -> rusqlite::Result<Self> {
        let mut conn = Connection::open(path)?;
        // Several instances of a service may share one database file.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(TXNS)?;
        let fresh: bool = conn.query_row(
            "SELECT count(*) = 0 FROM sqlite_master WHERE name = 'seeded'",
            [],
            |r| r.get(0),
        )?;
        conn.execute_batch(ledger.schema())?;
        if fresh {
            let tx = conn.transaction()?;
            ledger.seed(&tx)?;
            tx.execute_batch("CREATE TABLE seeded (at INTEGER);")?;
            tx.commit()?;
        }
        Ok(Self {
            db: Mutex::new(conn),
            ledger,
        })
    }

    /// Runs `f` in one SQLite transaction.
    pub fn with_tx<T>(
        &self,
        f: impl FnOnce(&Transaction) -> rusqlite::Result<T>,
    ) -> Result<T, String> {
        let mut conn = self.db.lock().unwrap_or_else(|e| e.into_inner());
        // IMMEDIATE: take the write lock up front. Instances sharing the file
        // then wait for each other (busy timeout) instead of failing to
        // upgrade a read lock ("database is locked").
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let out = f(&tx).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(out)
    }

    fn state(tx: &Transaction, txn: &str) -> rusqlite::Result<Option<String>> {
        tx.query_row("SELECT state FROM txns WHERE txn = ?1", [txn], |r| r.get(0))
            .optional()
    }

    /// Business work inside `txn` starts: `f` records the tentative work.
    /// Refused once the transaction is decided.
    pub fn work<T>(
        &self,
        txn: &str,
        deadline_ms: u64,
        f: impl FnOnce(&Transaction) -> rusqlite::Result<Result<T, String>>,
    ) -> Result<Result<T, String>, String> {
        self.with_tx(|tx| {
            match Self::state(tx, txn)?.as_deref() {
                None => {
                    tx.execute(
                        "INSERT INTO txns (txn, state, deadline_ms) VALUES (?1, 'working', ?2)",
                        params![txn, deadline_ms as i64],
                    )?;
                }
                Some("working") => {}
                Some(s) => return Ok(Err(format!("transaction {txn} is already {s}"))),
            }
            f(tx)
        })
    }

    pub fn prepare(&self, txn: &str) -> Result<Vote, String> {
        self.with_tx(|tx| {
            let vote = match Self::state(tx, txn)?.as_deref() {
                // No work of this transaction here (never done, or lost): a
                // yes would commit work nobody can see. Refused, and
                // remembered so that a late business call is refused too.
                None => {
                    tx.execute(
                        "INSERT INTO txns (txn, state, deadline_ms) VALUES (?1, 'aborted', 0)",
                        [txn],
                    )?;
                    Vote::Abort(format!("unknown transaction {txn}: no work of it here"))
                }
                Some("aborted") => Vote::Abort("transaction already aborted".into()),
                Some("prepared") | Some("committed") => Vote::Commit,
                Some(_) => match self.ledger.prepare(tx, txn)? {
                    Ok(true) => {
                        tx.execute("UPDATE txns SET state = 'prepared' WHERE txn = ?1", [txn])?;
                        Vote::Commit
                    }
                    Ok(false) => {
                        tx.execute("UPDATE txns SET state = 'committed' WHERE txn = ?1", [txn])?;
                        Vote::ReadOnly
                    }
                    Err(reason) => {
                        self.ledger.abort(tx, txn)?;
                        tx.execute("UPDATE txns SET state = 'aborted' WHERE txn = ?1", [txn])?;
                        Vote::Abort(reason)
                    }
                },
            };
            Ok(vote)
        })
    }

    /// Commit: idempotent; a commit of an aborted transaction is refused.
    pub fn commit(&self, txn: &str) -> Result<Result<(), String>, String> {
        self.with_tx(|tx| {
            Ok(match Self::state(tx, txn)?.as_deref() {
                Some("prepared") => {
                    self.ledger.commit(tx, txn)?;
                    tx.execute("UPDATE txns SET state = 'committed' WHERE txn = ?1", [txn])?;
                    Ok(())
                }
                Some("aborted") => Err(format!("transaction {txn} was aborted here")),
                // Work never prepared cannot be committed: the coordinator
                // decided without this participant's yes.
                Some("working") => Err(format!("transaction {txn} was never prepared here")),
                // committed already (a read-only vote included), or no work
                // of it here at all: nothing to do
                _ => Ok(()),
            })
        })
    }

    /// Abort: idempotent; an unknown transaction is remembered as aborted so
    /// a late prepare is refused; a committed one cannot be aborted.
    pub fn abort(&self, txn: &str) -> Result<Result<(), String>, String> {
        self.with_tx(|tx| {
            Ok(match Self::state(tx, txn)?.as_deref() {
                Some("committed") => Err(format!("transaction {txn} was committed here")),
                Some("aborted") => Ok(()),
                Some(_) => {
                    self.ledger.abort(tx, txn)?;
                    tx.execute("UPDATE txns SET state = 'aborted' WHERE txn = ?1", [txn])?;
                    Ok(())
                }
                None => {
                    tx.execute(
                        "INSERT INTO txns (txn, state, deadline_ms) VALUES (?1, 'aborted', 0)",
                        [txn],
                    )?;
                    Ok(())
                }
            })
        })
    }

    /// Transactions held prepared (for recovery after a restart), with deadlines.
    pub fn prepared(&self) -> Result<Vec<(String, u64)>, String> {
        self.with_tx(|tx| {
            let mut st =
                tx.prepare("SELECT txn, deadline_ms FROM txns WHERE state = 'prepared'")?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            rows.collect()
        })
    }

    /// Releases tentative work never asked to prepare by its deadline
    /// (presumed abort). Returns how many were released.
    /// Selected and released in one database transaction, so a prepare
    /// cannot slip in between: prepared work is never released here.
    pub fn release_expired(&self, now_ms: u64) -> Result<usize, String> {
        self.with_tx(|tx| {
            let expired: Vec<String> = {
                let mut st = tx
                    .prepare("SELECT txn FROM txns WHERE state = 'working' AND deadline_ms < ?1")?;
                let rows = st.query_map([now_ms as i64], |r| r.get::<_, String>(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for t in &expired {
                self.ledger.abort(tx, t)?;
                tx.execute(
                    "UPDATE txns SET state = 'aborted' WHERE txn = ?1 AND state = 'working'",
                    [t],
                )?;
            }
            Ok(expired.len())
        })
    }

    /// Counts of transactions by state.
    pub fn counts(&self) -> Result<Vec<(String, i64)>, String> {
        self.with_tx(|tx| {
            let mut st =
                tx.prepare("SELECT state, count(*) FROM txns GROUP BY state ORDER BY state")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }
}
