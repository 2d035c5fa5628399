//! The embedded store: one SQLite file in WAL mode.
//!
//! Every operation is one `BEGIN IMMEDIATE` transaction, so it is atomic
//! against other threads and against other processes on the same file.
//! `synchronous = NORMAL`: a committed transaction survives the process
//! being killed (`kill -9`: the WAL is in the OS page cache) but may be lost
//! on power failure; `FULL` would fsync every commit for that.
//!
//! Tables:
//! - `counters (key, period_start) -> spent`;
//! - `reservations (id, key, period_start) -> amount, expires_ms`: live
//!   reservations; expired rows are ignored and swept by the next reserve;
//! - `ledger (id PRIMARY KEY, ...)`: one row per settled attempt. The unique
//!   id is what makes a replayed settle a no-op. `WITHOUT ROWID`, so an insert
//!   writes two B-trees (the rows by id, the time index) instead of three;
//!   databases created before keep their rowid table and work the same.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{Balance, BudgetStore, Charge, Counter, LedgerEntry, Refusal, Reservation, StateError};
use crate::ir::Micros;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS counters (
    key TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, period_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT NOT NULL,
    key TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (id, key, period_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_by_counter ON reservations (key, period_start, expires_ms);
CREATE TABLE IF NOT EXISTS ledger (
    id TEXT PRIMARY KEY NOT NULL,
    ts_ms INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    feature TEXT,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    actual INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_by_time ON ledger (ts_ms);
";

pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteStore {
    /// Open (and create) the store at `path`; its directory is created too.
    pub fn open(path: &Path) -> Result<SqliteStore, StateError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StateError::Backend(format!("cannot create `{}`: {e}", dir.display()))
                })?;
            }
        }
        let conn = Connection::open(path)
            .map_err(|e| StateError::Backend(format!("cannot open `{}`: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Gateways started together on a new file race to switch it to WAL
        // and create the tables, and the switch can answer "database is
        // locked" at once, without waiting out the busy timeout (seen in CI:
        // two test servers on one fresh file). Try again for as long.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let set_up = conn
                .pragma_update(None, "journal_mode", "WAL")
                .and_then(|()| conn.pragma_update(None, "synchronous", "NORMAL"))
                .and_then(|()| conn.execute_batch(SCHEMA));
            match set_up {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let store = SqliteStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        };
        // A spool left where earlier versions kept it is replayed, not lost.
        let old = old_spool_dir_of(path);
        if old.is_dir() {
            super::spool::recover(&old, &store)?;
        }
        Ok(store)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StateError> {
        self.conn
            .lock()
            .map_err(|_| StateError::Backend("sqlite connection poisoned".into()))
    }
}

/// The spool directory of the database at `path`, named by its canonical
/// path, so the gateway and `routeplane usage` find the same one however the
/// config was named (see [`super::spool::local_dir`]).
pub fn spool_dir_of(path: &Path) -> PathBuf {
    let canonical = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir).ok().map(|d| d.join(name))
        }
        _ => None,
    };
    let key = canonical
        .or_else(|| std::path::absolute(path).ok())
        .unwrap_or_else(|| path.to_path_buf());
    super::spool::local_dir("sqlite", &key.to_string_lossy())
}

/// Where the spool used to live, next to the database: replayed at open.
fn old_spool_dir_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".ledger-spool");
    PathBuf::from(s)
}

fn balance_in(conn: &Connection, c: &Counter, now_ms: i64) -> Result<Balance, StateError> {
    let spent: Option<i64> = row(
        conn,
        "SELECT spent FROM counters WHERE key = ?1 AND period_start = ?2",
        params![c.key, c.period_start],
        |r| r.get(0),
    )
    .optional()?;
    let reserved: i64 = row(
        conn,
        "SELECT COALESCE(SUM(amount), 0) FROM reservations
         WHERE key = ?1 AND period_start = ?2 AND expires_ms > ?3",
        params![c.key, c.period_start, now_ms],
        |r| r.get(0),
    )?;
    Ok(Balance {
        spent: to_u64(spent.unwrap_or(0)),
        reserved: to_u64(reserved),
    })
}

/// Run a statement through the connection's statement cache: parsing the
/// SQL again for every request costs more than running it.
fn exec(conn: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(p)
}

fn row<T>(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(p, f)
}

const INSERT_ENTRY: &str = "INSERT OR IGNORE INTO ledger
     (id, ts_ms, tenant, feature, model, input_tokens, output_tokens, estimated, actual)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// Insert a ledger entry; false when its id is already there.
fn insert_entry(conn: &Connection, e: &LedgerEntry) -> Result<bool, StateError> {
    insert_with(&mut conn.prepare_cached(INSERT_ENTRY)?, e)
}

/// [`insert_entry`] with the statement already prepared: a batch looks the
/// statement up once, not once an entry.
fn insert_with(
    stmt: &mut rusqlite::CachedStatement<'_>,
    e: &LedgerEntry,
) -> Result<bool, StateError> {
    let n = stmt.execute(params![
        e.id,
        e.ts_ms,
        e.tenant,
        e.feature,
        e.model,
        to_i64(e.input_tokens),
        to_i64(e.output_tokens),
        to_i64(e.estimated),
        to_i64(e.actual)
    ])?;
    Ok(n == 1)
}

impl BudgetStore for SqliteStore {
    fn reserve(
        &self,
        id: &str,
        charges: &[Charge],
        amount: Micros,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Reservation, StateError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for ch in charges {
            exec(
                &tx,
                "DELETE FROM reservations WHERE key = ?1 AND period_start = ?2 AND expires_ms <= ?3",
                params![ch.counter.key, ch.counter.period_start, now_ms],
            )?;
            let b = balance_in(&tx, &ch.counter, now_ms)?;
            if b.spent.saturating_add(b.reserved).saturating_add(amount) > ch.limit {
                // Dropping `tx` rolls back.
                return Err(StateError::Refused(Box::new(Refusal {
                    counter: ch.counter.clone(),
                    limit: ch.limit,
                    balance: b,
                    amount,
                })));
            }
        }
        let expires_ms = now_ms.saturating_add(ttl_ms);
        for ch in charges {
            exec(
                &tx,
                "INSERT OR REPLACE INTO reservations (id, key, period_start, amount, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    id,
                    ch.counter.key,
                    ch.counter.period_start,
                    to_i64(amount),
                    expires_ms
                ],
            )?;
        }
        tx.commit()?;
        Ok(Reservation {
            id: id.to_string(),
            counters: charges.iter().map(|c| c.counter.clone()).collect(),
            amount,
            expires_ms,
        })
    }

    fn record(&self, entries: &[LedgerEntry]) -> Result<(), StateError> {
        // One transaction for the whole batch: one WAL append instead of many.
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(INSERT_ENTRY)?;
            for e in entries {
                insert_with(&mut stmt, e)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn settle(&self, r: &Reservation, e: &LedgerEntry) -> Result<bool, StateError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        exec(&tx, "DELETE FROM reservations WHERE id = ?1", params![r.id])?;
        let fresh = insert_entry(&tx, e)?;
        if fresh {
            for c in &r.counters {
                exec(
                    &tx,
                    "INSERT INTO counters (key, period_start, spent) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key, period_start) DO UPDATE SET spent = spent + excluded.spent",
                    params![c.key, c.period_start, to_i64(e.actual)],
                )?;
            }
        }
        tx.commit()?;
        Ok(fresh)
    }

    fn release(&self, r: &Reservation) -> Result<(), StateError> {
        let conn = self.lock()?;
        exec(
            &conn,
            "DELETE FROM reservations WHERE id = ?1",
            params![r.id],
        )?;
        Ok(())
    }

    fn balance(&self, c: &Counter, now_ms: i64) -> Result<Balance, StateError> {
        let conn = self.lock()?;
        balance_in(&conn, c, now_ms)
    }

    fn open_reservations(&self, now_ms: i64) -> Result<usize, StateError> {
        let conn = self.lock()?;
        let n: i64 = row(
            &conn,
            "SELECT COUNT(DISTINCT id) FROM reservations WHERE expires_ms > ?1",
            params![now_ms],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// In `/dev/shm`, named by the database's path ([`spool_dir_of`]).
    fn spool_dir(&self) -> Option<PathBuf> {
        Some(spool_dir_of(&self.path))
    }

    fn trim_ledger(&self, before_ms: i64, batch: usize) -> Result<usize, StateError> {
        let conn = self.lock()?;
        // Oldest first through `ledger_by_time`; one short transaction a batch.
        let gone = conn
            .prepare_cached(
                "DELETE FROM ledger WHERE id IN
               (SELECT id FROM ledger WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2)",
            )?
            .execute(params![before_ms, i64::try_from(batch).unwrap_or(i64::MAX)])?;
        Ok(gone)
    }

    fn ledger(&self, since_ms: Option<i64>) -> Result<Vec<LedgerEntry>, StateError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare(
            "SELECT id, ts_ms, tenant, feature, model, input_tokens, output_tokens, estimated, actual
             FROM ledger WHERE ts_ms >= ?1 ORDER BY ts_ms, id",
        )?;
        let rows = stmt.query_map(params![since_ms.unwrap_or(i64::MIN)], |r| {
            Ok(LedgerEntry {
                id: r.get(0)?,
                ts_ms: r.get(1)?,
                tenant: r.get(2)?,
                feature: r.get(3)?,
                model: r.get(4)?,
                input_tokens: to_u64(r.get(5)?),
                output_tokens: to_u64(r.get(6)?),
                estimated: to_u64(r.get(7)?),
                actual: to_u64(r.get(8)?),
            })
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gateways started together on a database that does not exist yet (a
    /// fresh deploy of replicas, two test servers) all open it.
    #[test]
    fn processes_opening_a_new_database_together_all_get_it() {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("s{round}.db"));
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
            let opened: Vec<_> = (0..6)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        SqliteStore::open(&path).map(|_| ())
                    })
                })
                .collect();
            for t in opened {
                if let Err(e) = t.join().unwrap() {
                    panic!("round {round}: {e}");
                }
            }
        }
    }
}
