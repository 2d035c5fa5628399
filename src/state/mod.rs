//! Where spend lives: budget counters, reservations and the spend ledger.
//!
//! One trait, [`BudgetStore`], three backends:
//! - [`sqlite`]: the embedded default (one file, WAL), survives restarts and
//!   `kill -9`;
//! - [`redis`]: shared by several gateway replicas, every operation one Lua
//!   script so it is atomic on the server; also shared rate-limit windows;
//! - [`memory`]: unit tests only.
//!
//! The semantics every backend keeps (the shared suite in `tests` checks them):
//! - `reserve` is all-or-nothing over every counter a request is charged to
//!   (tenant, feature, tenant×feature budgets). INVARIANT: for every counter,
//!   spent + live reservations never exceed its limit after a reserve.
//! - A reservation carries an expiry; expired ones no longer count, so a
//!   gateway that crashed with reservations in flight frees them by itself.
//! - `settle` moves a reservation to spent at the actual cost and writes the
//!   ledger entry in the same transaction. The ledger's key is the
//!   reservation id (request id + attempt), so settling twice (a replay)
//!   never counts twice.
//! - `release` drops a reservation without spending.
//!
//! Counters are keyed by a budget key (period, scope and scope value, see
//! [`crate::budget`]) and the start of the period, so a new period starts at
//! zero without anyone resetting anything.

pub mod memory;
pub mod period;
pub mod redis;
pub mod spool;
pub mod sqlite;

#[cfg(test)]
mod crash;
#[cfg(test)]
mod suite;

use serde::{Deserialize, Serialize};

use crate::ir::Micros;

/// One budget counter: a budget key and the start of its current period (Unix ms).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Counter {
    pub key: String,
    pub period_start: i64,
}

/// A counter and the limit it must stay under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    pub counter: Counter,
    pub limit: Micros,
}

/// Reserved money, until settled, released or expired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Unique per attempt: `<decision id>/<attempt>`.
    pub id: String,
    pub counters: Vec<Counter>,
    pub amount: Micros,
    pub expires_ms: i64,
}

/// What a counter holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub spent: Micros,
    /// Live (unexpired) reservations.
    pub reserved: Micros,
}

/// A reservation that would have passed a limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub counter: Counter,
    pub limit: Micros,
    pub balance: Balance,
    pub amount: Micros,
}

/// One settled request attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The reservation id; unique.
    pub id: String,
    pub ts_ms: i64,
    pub tenant: String,
    pub feature: Option<String>,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub estimated: Micros,
    pub actual: Micros,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the budget `{}` would be exceeded", .0.counter.key)]
    Refused(Box<Refusal>),
    #[error("state backend: {0}")]
    Backend(String),
}

impl From<rusqlite::Error> for StateError {
    fn from(e: rusqlite::Error) -> Self {
        StateError::Backend(format!("sqlite: {e}"))
    }
}

impl From<::redis::RedisError> for StateError {
    fn from(e: ::redis::RedisError) -> Self {
        StateError::Backend(format!("redis: {e}"))
    }
}

/// Storage of budget counters, reservations and the spend ledger.
pub trait BudgetStore: Send + Sync {
    /// Reserve `amount` against every charge, all or nothing. `Err(Refused)`
    /// names the first counter that would pass its limit; nothing is reserved then.
    fn reserve(
        &self,
        id: &str,
        charges: &[Charge],
        amount: Micros,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Reservation, StateError>;

    /// Turn the reservation into spend at `entry.actual` and record `entry`
    /// (whose id must be the reservation's). Returns false when the entry
    /// was already recorded: nothing is counted again.
    fn settle(&self, r: &Reservation, entry: &LedgerEntry) -> Result<bool, StateError>;

    /// Record entries that were reserved against no budget (ledger only),
    /// skipping ids already there.
    fn record(&self, entries: &[LedgerEntry]) -> Result<(), StateError> {
        for e in entries {
            let r = Reservation {
                id: e.id.clone(),
                counters: Vec::new(),
                amount: 0,
                expires_ms: 0,
            };
            self.settle(&r, e)?;
        }
        Ok(())
    }

    /// Drop the reservation without spending.
    fn release(&self, r: &Reservation) -> Result<(), StateError>;

    /// Spent and live reservations of a counter.
    fn balance(&self, c: &Counter, now_ms: i64) -> Result<Balance, StateError>;

    /// Ledger entries at or after `since_ms`, oldest first.
    fn ledger(&self, since_ms: Option<i64>) -> Result<Vec<LedgerEntry>, StateError>;

    /// Delete up to `batch` ledger entries from before `before_ms`, oldest
    /// first; how many went. Budget counters are not touched: what was spent
    /// stays counted. Callers loop until fewer than `batch` go, so that no
    /// call holds the store for long.
    fn trim_ledger(&self, before_ms: i64, batch: usize) -> Result<usize, StateError>;

    /// How many reservations are live (not settled, released or expired) at
    /// `now_ms`, over every counter: a reservation charged to several
    /// budgets counts once. For tests and operators: after every request
    /// has finished it must be zero.
    fn open_reservations(&self, now_ms: i64) -> Result<usize, StateError>;

    /// Where the ledger spool of this store lives (see [`spool`]): the
    /// directory ledger-only entries are appended to before the background
    /// writer records them. `None`: no spool, they are recorded at once.
    fn spool_dir(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Count `amount` against a rate window shared by every gateway using
    /// this store. `None`: the store is not shared, use the local limiter.
    /// `Some(Err(wait_ms))`: refused until the window ends.
    fn charge_rate(
        &self,
        _key: &str,
        _amount: u64,
        _limit: u64,
        _window_ms: u64,
        _now_ms: i64,
    ) -> Option<Result<(), u64>> {
        None
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Which backend, from the gateway config's `state:` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Sqlite(std::path::PathBuf),
    Redis(String),
}

/// Open the configured store.
pub fn open(b: &Backend) -> Result<std::sync::Arc<dyn BudgetStore>, StateError> {
    Ok(match b {
        Backend::Memory => std::sync::Arc::new(memory::MemoryStore::default()),
        Backend::Sqlite(path) => std::sync::Arc::new(sqlite::SqliteStore::open(path)?),
        Backend::Redis(url) => std::sync::Arc::new(redis::RedisStore::open(url)?),
    })
}
