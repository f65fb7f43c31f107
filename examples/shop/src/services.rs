//! The three services' ledgers. Amounts are integer cents.

use crate::participant::Ledger;
use rusqlite::{params, OptionalExtension, Transaction};

/// Seed customers: (name, balance in cents). Some are poor, so payments fail.
pub const CUSTOMERS: &[(&str, i64)] = &[
    ("alice", 1_000_000),
    ("bob", 300_000),
    ("carol", 3_000),
    ("dave", 0),
];

/// Seed catalogue: (sku, stock, price in cents). Some are scarce.
pub const SKUS: &[(&str, i64, i64)] = &[
    ("widget", 1_000, 2_500),
    ("gadget", 100, 9_900),
    ("gizmo", 3, 15_000),
    ("unobtainium", 0, 100_000),
];

/// A participant's tentative work as holds against balances, written once
/// for payment (money held against accounts) and inventory (units reserved
/// against stock): a business call adds a `pending` hold; prepare turns it
/// `held` if the balance, less what is already held, covers it (else the
/// shortfall reason is the vote); commit applies it (`done`); abort releases
/// it. Table and column names are this module's constants, never input.
struct Holds {
    /// The holds table: (txn, key, qty, state).
    table: &'static str,
    key: &'static str,
    qty: &'static str,
    /// The balances table: (key, balance).
    balances: &'static str,
    balance: &'static str,
    /// The state of an applied hold.
    done: &'static str,
    /// The abort vote's reason when the balance does not cover a hold.
    short: &'static str,
}

const PAYMENT_HOLDS: Holds = Holds {
    table: "holds",
    key: "customer",
    qty: "amount",
    balances: "accounts",
    balance: "balance",
    done: "charged",
    short: "insufficient_funds",
};

const INVENTORY_HOLDS: Holds = Holds {
    table: "reservations",
    key: "sku",
    qty: "qty",
    balances: "stock",
    balance: "available",
    done: "shipped",
    short: "out_of_stock",
};

impl Holds {
    /// A business call's tentative work (added to the transaction's hold).
    fn hold(&self, tx: &Transaction, txn: &str, key: &str, qty: i64) -> rusqlite::Result<()> {
        let Holds {
            table,
            key: k,
            qty: q,
            ..
        } = self;
        tx.execute(
            &format!(
                "INSERT INTO {table} (txn, {k}, {q}, state) VALUES (?1, ?2, ?3, 'pending')
                 ON CONFLICT (txn) DO UPDATE SET {q} = {q} + excluded.{q}"
            ),
            params![txn, key, qty],
        )?;
        Ok(())
    }

    fn prepare(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<Result<bool, String>> {
        let Holds {
            table,
            key,
            qty,
            balances,
            balance,
            ..
        } = self;
        let hold: Option<(String, i64)> = tx
            .query_row(
                &format!("SELECT {key}, {qty} FROM {table} WHERE txn = ?1 AND state = 'pending'"),
                [txn],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((k, amount)) = hold else {
            return Ok(Ok(false));
        };
        let available: i64 = tx.query_row(
            &format!(
                "SELECT b.{balance} - COALESCE((SELECT sum({qty}) FROM {table} h
                     WHERE h.{key} = b.{key} AND h.state = 'held'), 0)
                 FROM {balances} b WHERE b.{key} = ?1"
            ),
            [&k],
            |r| r.get(0),
        )?;
        if available < amount {
            return Ok(Err(self.short.to_string()));
        }
        tx.execute(
            &format!("UPDATE {table} SET state = 'held' WHERE txn = ?1"),
            [txn],
        )?;
        Ok(Ok(true))
    }

    fn commit(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<()> {
        let Holds {
            table,
            key,
            qty,
            balances,
            balance,
            done,
            ..
        } = self;
        tx.execute(
            &format!(
                "UPDATE {balances} SET {balance} = {balance} - (SELECT {qty} FROM {table} WHERE txn = ?1)
                 WHERE {key} = (SELECT {key} FROM {table} WHERE txn = ?1 AND state = 'held')"
            ),
            [txn],
        )?;
        tx.execute(
            &format!("UPDATE {table} SET state = '{done}' WHERE txn = ?1 AND state = 'held'"),
            [txn],
        )?;
        Ok(())
    }

    fn abort(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<()> {
        let table = self.table;
        tx.execute(
            &format!(
                "UPDATE {table} SET state = 'released' WHERE txn = ?1 AND state IN ('pending', 'held')"
            ),
            [txn],
        )?;
        Ok(())
    }
}

/// `Ledger` for a service whose tentative work is `Holds`: its schema and
/// seed, and prepare/commit/abort from its holds.
macro_rules! holds_ledger {
    ($service:ident, $holds:expr, $schema:expr, |$tx:ident| $seed:block) => {
        impl Ledger for $service {
            fn schema(&self) -> &'static str {
                $schema
            }
            fn seed(&self, $tx: &Transaction) -> rusqlite::Result<()> $seed
            fn prepare(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<Result<bool, String>> {
                $holds.prepare(tx, txn)
            }
            fn commit(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<()> {
                $holds.commit(tx, txn)
            }
            fn abort(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<()> {
                $holds.abort(tx, txn)
            }
        }
    };
}

pub struct Payment;

holds_ledger!(
    Payment,
    PAYMENT_HOLDS,
    "CREATE TABLE IF NOT EXISTS accounts (
            customer TEXT PRIMARY KEY,
            balance INTEGER NOT NULL CHECK (balance >= 0));
         CREATE TABLE IF NOT EXISTS holds (
            txn TEXT PRIMARY KEY,
            customer TEXT NOT NULL,
            amount INTEGER NOT NULL CHECK (amount > 0),
            state TEXT NOT NULL CHECK (state IN ('pending', 'held', 'charged', 'released')));",
    |tx| {
        for (c, b) in CUSTOMERS {
            tx.execute(
                "INSERT INTO accounts (customer, balance) VALUES (?1, ?2)",
                params![c, b],
            )?;
        }
        Ok(())
    }
);

impl Payment {
    /// Business call: a tentative charge. `Err` for an unknown customer.
    pub fn charge(
        tx: &Transaction,
        txn: &str,
        customer: &str,
        amount: i64,
    ) -> rusqlite::Result<Result<(), String>> {
        let known: bool = tx.query_row(
            "SELECT count(*) > 0 FROM accounts WHERE customer = ?1",
            [customer],
            |r| r.get(0),
        )?;
        if !known {
            return Ok(Err(format!("unknown customer {customer:?}")));
        }
        if amount <= 0 {
            return Ok(Err("amount must be positive".into()));
        }
        PAYMENT_HOLDS.hold(tx, txn, customer, amount)?;
        Ok(Ok(()))
    }

    pub fn balance(tx: &Transaction, customer: &str) -> rusqlite::Result<Option<i64>> {
        tx.query_row(
            "SELECT balance FROM accounts WHERE customer = ?1",
            [customer],
            |r| r.get(0),
        )
        .optional()
    }
}

pub struct Inventory;

holds_ledger!(
    Inventory,
    INVENTORY_HOLDS,
    "CREATE TABLE IF NOT EXISTS stock (
            sku TEXT PRIMARY KEY,
            available INTEGER NOT NULL CHECK (available >= 0),
            price INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS reservations (
            txn TEXT PRIMARY KEY,
            sku TEXT NOT NULL,
            qty INTEGER NOT NULL CHECK (qty > 0),
            state TEXT NOT NULL CHECK (state IN ('pending', 'held', 'shipped', 'released')));",
    |tx| {
        for (sku, stock, price) in SKUS {
            tx.execute(
                "INSERT INTO stock (sku, available, price) VALUES (?1, ?2, ?3)",
                params![sku, stock, price],
            )?;
        }
        Ok(())
    }
);

impl Inventory {
    /// Business call: a tentative reservation; returns the unit price.
    pub fn reserve(
        tx: &Transaction,
        txn: &str,
        sku: &str,
        qty: i64,
    ) -> rusqlite::Result<Result<i64, String>> {
        let price: Option<i64> = tx
            .query_row("SELECT price FROM stock WHERE sku = ?1", [sku], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(price) = price else {
            return Ok(Err(format!("unknown sku {sku:?}")));
        };
        if qty <= 0 {
            return Ok(Err("qty must be positive".into()));
        }
        INVENTORY_HOLDS.hold(tx, txn, sku, qty)?;
        Ok(Ok(price))
    }

    pub fn stock(tx: &Transaction, sku: &str) -> rusqlite::Result<Option<(i64, i64)>> {
        tx.query_row(
            "SELECT available, price FROM stock WHERE sku = ?1",
            [sku],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
    }
}

pub struct Order;

impl Ledger for Order {
    fn schema(&self) -> &'static str {
        "CREATE TABLE IF NOT EXISTS orders (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            txn TEXT NOT NULL UNIQUE,
            customer TEXT NOT NULL,
            sku TEXT NOT NULL,
            qty INTEGER NOT NULL,
            amount INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'confirmed', 'cancelled')));"
    }
    fn seed(&self, _tx: &Transaction) -> rusqlite::Result<()> {
        Ok(())
    }
    fn prepare(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<Result<bool, String>> {
        let pending: bool = tx.query_row(
            "SELECT count(*) > 0 FROM orders WHERE txn = ?1 AND state = 'pending'",
            [txn],
            |r| r.get(0),
        )?;
        Ok(Ok(pending))
    }
    fn commit(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<()> {
        tx.execute(
            "UPDATE orders SET state = 'confirmed' WHERE txn = ?1 AND state = 'pending'",
            [txn],
        )?;
        Ok(())
    }
    fn abort(&self, tx: &Transaction, txn: &str) -> rusqlite::Result<()> {
        tx.execute(
            "UPDATE orders SET state = 'cancelled' WHERE txn = ?1 AND state = 'pending'",
            [txn],
        )?;
        Ok(())
    }
}

impl Order {
    /// Business call: the pending order row; returns its id.
    pub fn create(
        tx: &Transaction,
        txn: &str,
        customer: &str,
        sku: &str,
        qty: i64,
        amount: i64,
    ) -> rusqlite::Result<i64> {
        tx.execute(
            "INSERT INTO orders (txn, customer, sku, qty, amount, state) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
            params![txn, customer, sku, qty, amount],
        )?;
        Ok(tx.last_insert_rowid())
    }

    pub fn get(tx: &Transaction, id: i64) -> rusqlite::Result<Option<serde_json::Value>> {
        tx.query_row(
            "SELECT id, txn, customer, sku, qty, amount, state FROM orders WHERE id = ?1",
            [id],
            |r| {
                Ok(serde_json::json!({
                    "order_id": r.get::<_, i64>(0)?, "txn": r.get::<_, String>(1)?,
                    "customer": r.get::<_, String>(2)?, "sku": r.get::<_, String>(3)?,
                    "qty": r.get::<_, i64>(4)?, "amount": r.get::<_, i64>(5)?,
                    "state": r.get::<_, String>(6)?,
                }))
            },
        )
        .optional()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::participant::{Participant, Vote};

    const T1: &str = "0af7651916cd43dd8448eb211c80319c";
    const T2: &str = "1af7651916cd43dd8448eb211c80319c";

    #[test]
    fn payment_holds_commit_and_release() {
        let p = Participant::open(":memory:", Payment).unwrap();
        let r = p
            .work(T1, 10, |tx| Payment::charge(tx, T1, "alice", 400_000))
            .unwrap();
        assert_eq!(r, Ok(()));
        assert_eq!(p.prepare(T1).unwrap(), Vote::Commit);
        // A second charge that fits only without the first hold: refused.
        p.work(T2, 10, |tx| Payment::charge(tx, T2, "alice", 700_000))
            .unwrap()
            .unwrap();
        assert_eq!(
            p.prepare(T2).unwrap(),
            Vote::Abort("insufficient_funds".into())
        );
        assert_eq!(p.commit(T1).unwrap(), Ok(()));
        assert_eq!(p.commit(T1).unwrap(), Ok(()), "idempotent");
        let bal = p.with_tx(|tx| Payment::balance(tx, "alice")).unwrap();
        assert_eq!(bal, Some(600_000));
        assert_eq!(
            p.abort(T1).unwrap(),
            Err(format!("transaction {T1} was committed here"))
        );
        assert_eq!(p.abort(T2).unwrap(), Ok(()));
        let r = p
            .work(T2, 10, |tx| Payment::charge(tx, T2, "alice", 1))
            .unwrap();
        assert_eq!(r, Err(format!("transaction {T2} is already aborted")));
        let r = p
            .work("t3", 10, |tx| Payment::charge(tx, "t3", "mallory", 1))
            .unwrap();
        assert_eq!(r, Err("unknown customer \"mallory\"".into()));
    }

    #[test]
    fn abort_before_prepare_refuses_the_late_prepare() {
        let p = Participant::open(":memory:", Inventory).unwrap();
        assert_eq!(p.abort(T1).unwrap(), Ok(()), "unknown txn: presumed abort");
        assert_eq!(
            p.prepare(T1).unwrap(),
            Vote::Abort("transaction already aborted".into())
        );
        assert_eq!(
            p.prepare(T2).unwrap(),
            Vote::Abort(format!("unknown transaction {T2}: no work of it here")),
            "never worked here: a yes would commit work nobody can see"
        );
        let late = p
            .work(T2, 10, |tx| Inventory::reserve(tx, T2, "gizmo", 1))
            .unwrap();
        assert_eq!(late, Err(format!("transaction {T2} is already aborted")));
    }

    #[test]
    fn a_commit_of_unprepared_work_is_refused() {
        let p = Participant::open(":memory:", Inventory).unwrap();
        p.work(T1, 10, |tx| Inventory::reserve(tx, T1, "gizmo", 1))
            .unwrap()
            .unwrap();
        assert_eq!(
            p.commit(T1).unwrap(),
            Err(format!("transaction {T1} was never prepared here"))
        );
        assert_eq!(p.prepare(T1).unwrap(), Vote::Commit, "still preparable");
        assert_eq!(p.commit(T1).unwrap(), Ok(()));
        assert_eq!(p.commit(T2).unwrap(), Ok(()), "nothing of it here");
    }

    #[test]
    fn inventory_reserves_scarce_stock_once() {
        let p = Participant::open(":memory:", Inventory).unwrap();
        let price = p
            .work(T1, 10, |tx| Inventory::reserve(tx, T1, "gizmo", 2))
            .unwrap()
            .unwrap();
        assert_eq!(price, 15_000);
        p.work(T2, 10, |tx| Inventory::reserve(tx, T2, "gizmo", 2))
            .unwrap()
            .unwrap();
        assert_eq!(p.prepare(T1).unwrap(), Vote::Commit);
        assert_eq!(p.prepare(T2).unwrap(), Vote::Abort("out_of_stock".into()));
        assert_eq!(p.commit(T1).unwrap(), Ok(()));
        assert_eq!(
            p.with_tx(|tx| Inventory::stock(tx, "gizmo")).unwrap(),
            Some((1, 15_000))
        );
        assert_eq!(p.prepared().unwrap(), vec![]);
    }

    #[test]
    fn unprepared_work_is_released_at_its_deadline() {
        let p = Participant::open(":memory:", Order).unwrap();
        p.work(T1, 100, |tx| {
            Order::create(tx, T1, "alice", "widget", 1, 2_500).map(Ok)
        })
        .unwrap()
        .unwrap();
        assert_eq!(p.release_expired(99).unwrap(), 0);
        assert_eq!(p.release_expired(101).unwrap(), 1);
        let o = p.with_tx(|tx| Order::get(tx, 1)).unwrap().unwrap();
        assert_eq!(o["state"], "cancelled");
        // Prepared work past its deadline is the coordinator's to decide.
        p.work(T2, 100, |tx| {
            Order::create(tx, T2, "alice", "widget", 1, 2_500).map(Ok)
        })
        .unwrap()
        .unwrap();
        assert_eq!(p.prepare(T2).unwrap(), Vote::Commit);
        assert_eq!(p.release_expired(1_000).unwrap(), 0);
        assert_eq!(p.prepared().unwrap(), vec![(T2.to_string(), 100)]);
    }
}
