//! The shared store: Redis, for several gateway replicas.
//!
//! Every operation is one Lua script, so Redis runs it atomically: no other
//! replica's reserve can interleave between the check and the increment.
//! Per counter four keys (`{p}` is the prefix, `c` the counter's
//! `<key>@<period start>`):
//! - `{p}s:c` spent (integer micros);
//! - `{p}r:c` sum of live reservations;
//! - `{p}z:c` sorted set of reservation ids by expiry;
//! - `{p}a:c` hash of reservation id -> amount.
//!
//! Expired reservations are swept by the script that next touches the
//! counter. The ledger is the hash `{p}ledger` (id -> JSON entry); `HSETNX`
//! on it is what makes a replayed settle a no-op. The sorted set
//! `{p}ledger:t` (id by the entry's `ts_ms`) is its index by time, for
//! trimming old entries (`state.ledger_retention`). Rate windows are fixed
//! windows `{p}rate:<key>@<window index>` that expire by themselves.

use std::sync::Mutex;
use std::time::Duration;

use redis::{Client, Connection, Script};

use super::{Balance, BudgetStore, Charge, Counter, LedgerEntry, Refusal, Reservation, StateError};
use crate::ir::Micros;

const PREFIX: &str = "routeplane:";

/// Sweep expired reservations of one counter (keys r, z, a at offset `o`).
const SWEEP: &str = r"
local function sweep(o, now)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[o + 3], '-inf', now)
  for _, m in ipairs(expired) do
    local a = tonumber(redis.call('HGET', KEYS[o + 4], m) or '0')
    redis.call('DECRBY', KEYS[o + 2], a)
    redis.call('HDEL', KEYS[o + 4], m)
    redis.call('ZREM', KEYS[o + 3], m)
  end
end
";

/// KEYS: 4 per counter (s, r, z, a). ARGV: id, amount, now, expires, limit per counter.
const RESERVE: &str = r"
local id, amount, now, exp = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local n = #KEYS / 4
for i = 0, n - 1 do
  local o = i * 4
  sweep(o, now)
  local spent = tonumber(redis.call('GET', KEYS[o + 1]) or '0')
  local resv = tonumber(redis.call('GET', KEYS[o + 2]) or '0')
  if spent + resv + amount > tonumber(ARGV[5 + i]) then
    return {0, i, spent, resv}
  end
end
for i = 0, n - 1 do
  local o = i * 4
  if redis.call('ZADD', KEYS[o + 3], exp, id) == 1 then
    redis.call('HSET', KEYS[o + 4], id, amount)
    redis.call('INCRBY', KEYS[o + 2], amount)
  end
end
return {1, 0, 0, 0}
";

/// Drop reservation `id` from counter at offset `o`.
const DROP: &str = r"
local function drop(o, id)
  local a = redis.call('HGET', KEYS[o + 4], id)
  if a then
    redis.call('DECRBY', KEYS[o + 2], tonumber(a))
    redis.call('HDEL', KEYS[o + 4], id)
    redis.call('ZREM', KEYS[o + 3], id)
  end
end
";

/// KEYS: ledger, its time index, then 4 per counter. ARGV: id, actual,
/// entry JSON, the entry's ts_ms.
const SETTLE: &str = r"
local id, actual = ARGV[1], tonumber(ARGV[2])
local fresh = redis.call('HSETNX', KEYS[1], id, ARGV[3])
if fresh == 1 then
  redis.call('ZADD', KEYS[2], ARGV[4], id)
end
local n = (#KEYS - 2) / 4
for i = 0, n - 1 do
  local o = 2 + i * 4
  drop(o, id)
  if fresh == 1 then
    redis.call('INCRBY', KEYS[o + 1], actual)
  end
end
return fresh
";

/// KEYS: ledger, its time index. ARGV: before (ms), batch size.
/// Returns how many entries went.
const TRIM: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return #ids
";

/// KEYS: 4 per counter. ARGV: id.
const RELEASE: &str = r"
local n = #KEYS / 4
for i = 0, n - 1 do
  drop(i * 4, ARGV[1])
end
return 1
";

/// KEYS: 4 for one counter. ARGV: now.
const BALANCE: &str = r"
sweep(0, tonumber(ARGV[1]))
return {tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0')}
";

/// KEYS: the window key. ARGV: amount, limit, ttl ms. Returns 1 or the ms left.
const RATE: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 1 then ttl = 1 end
  return {0, ttl}
end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, 0}
";

pub struct RedisStore {
    client: Client,
    /// The local spool directory (see [`RedisStore::spool_dir`]).
    spool: std::path::PathBuf,
    /// Idle connections; a request takes one and puts it back.
    pool: Mutex<Vec<Connection>>,
    reserve: Script,
    settle: Script,
    trim: Script,
    release: Script,
    balance: Script,
    rate: Script,
}

fn counter_keys(c: &Counter) -> [String; 4] {
    let id = format!("{}@{}", c.key, c.period_start);
    [
        format!("{PREFIX}s:{id}"),
        format!("{PREFIX}r:{id}"),
        format!("{PREFIX}z:{id}"),
        format!("{PREFIX}a:{id}"),
    ]
}

/// The ledger spool of a gateway on this Redis: a local directory, as the
/// spool is what survives this process dying before Redis has the entries.
/// `/dev/shm/routeplane-ledger-spool-redis-<hash of the url>` (see
/// [`super::spool::local_dir`]): the url may hold a password, so only a hash
/// of it names the directory. Replicas on one host
/// share it (one slot each); the next gateway started on the host with the
/// same url, or `routeplane usage`, replays what a killed one left.
pub fn spool_dir_for(url: &str) -> std::path::PathBuf {
    super::spool::local_dir("redis", url)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl RedisStore {
    /// Connect to `url` (`redis://127.0.0.1:6379/0`) and check the server answers.
    pub fn open(url: &str) -> Result<RedisStore, StateError> {
        let client = Client::open(url)
            .map_err(|e| StateError::Backend(format!("redis url `{url}`: {e}")))?;
        let s = RedisStore {
            client,
            spool: spool_dir_for(url),
            pool: Mutex::new(Vec::new()),
            reserve: Script::new(&format!("{SWEEP}{RESERVE}")),
            settle: Script::new(&format!("{DROP}{SETTLE}")),
            trim: Script::new(TRIM),
            release: Script::new(&format!("{DROP}{RELEASE}")),
            balance: Script::new(&format!("{SWEEP}{BALANCE}")),
            rate: Script::new(RATE),
        };
        let mut c = s.conn()?;
        let _: String = redis::cmd("PING").query(&mut c)?;
        s.put(c);
        Ok(s)
    }

    fn conn(&self) -> Result<Connection, StateError> {
        if let Some(c) = self.pool.lock().ok().and_then(|mut p| p.pop()) {
            return Ok(c);
        }
        let c = self
            .client
            .get_connection_with_timeout(Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        c.set_write_timeout(Some(Duration::from_secs(2)))?;
        Ok(c)
    }

    fn put(&self, c: Connection) {
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < 64 {
                p.push(c);
            }
        }
    }

    /// Run `f` on a pooled connection; a connection that failed is not reused.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StateError> {
        let mut c = self.conn()?;
        let r = f(&mut c)?;
        self.put(c);
        Ok(r)
    }
}

impl BudgetStore for RedisStore {
    fn reserve(
        &self,
        id: &str,
        charges: &[Charge],
        amount: Micros,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Reservation, StateError> {
        let expires_ms = now_ms.saturating_add(ttl_ms);
        let mut inv = self.reserve.prepare_invoke();
        for ch in charges {
            for k in counter_keys(&ch.counter) {
                inv.key(k);
            }
        }
        inv.arg(id).arg(amount).arg(now_ms).arg(expires_ms);
        for ch in charges {
            inv.arg(ch.limit);
        }
        let (ok, i, spent, reserved): (i64, i64, i64, i64) = self.with(|c| inv.invoke(c))?;
        if ok != 1 {
            let ch = usize::try_from(i)
                .ok()
                .and_then(|i| charges.get(i))
                .ok_or_else(|| StateError::Backend("redis: bad reserve answer".into()))?;
            return Err(StateError::Refused(Box::new(Refusal {
                counter: ch.counter.clone(),
                limit: ch.limit,
                balance: Balance {
                    spent: to_u64(spent),
                    reserved: to_u64(reserved),
                },
                amount,
            })));
        }
        Ok(Reservation {
            id: id.to_string(),
            counters: charges.iter().map(|c| c.counter.clone()).collect(),
            amount,
            expires_ms,
        })
    }

    fn settle(&self, r: &Reservation, e: &LedgerEntry) -> Result<bool, StateError> {
        let json = serde_json::to_string(e)
            .map_err(|err| StateError::Backend(format!("ledger entry: {err}")))?;
        let mut inv = self.settle.prepare_invoke();
        inv.key(format!("{PREFIX}ledger"));
        inv.key(format!("{PREFIX}ledger:t"));
        for c in &r.counters {
            for k in counter_keys(c) {
                inv.key(k);
            }
        }
        inv.arg(&e.id).arg(e.actual).arg(json).arg(e.ts_ms);
        let fresh: i64 = self.with(|c| inv.invoke(c))?;
        Ok(fresh == 1)
    }

    fn release(&self, r: &Reservation) -> Result<(), StateError> {
        let mut inv = self.release.prepare_invoke();
        for c in &r.counters {
            for k in counter_keys(c) {
                inv.key(k);
            }
        }
        inv.arg(&r.id);
        let _: i64 = self.with(|c| inv.invoke(c))?;
        Ok(())
    }

    fn balance(&self, c: &Counter, now_ms: i64) -> Result<Balance, StateError> {
        let mut inv = self.balance.prepare_invoke();
        for k in counter_keys(c) {
            inv.key(k);
        }
        inv.arg(now_ms);
        let (spent, reserved): (i64, i64) = self.with(|c| inv.invoke(c))?;
        Ok(Balance {
            spent: to_u64(spent),
            reserved: to_u64(reserved),
        })
    }

    fn open_reservations(&self, now_ms: i64) -> Result<usize, StateError> {
        let keys: Vec<String> = self.with(|c| {
            let mut keys = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{PREFIX}z:*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                keys.extend(batch);
                if next == 0 {
                    return Ok(keys);
                }
                cursor = next;
            }
        })?;
        let mut ids = std::collections::HashSet::new();
        for k in keys {
            let live: Vec<String> = self.with(|c| {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&k)
                    .arg(format!("({now_ms}"))
                    .arg("+inf")
                    .query(c)
            })?;
            ids.extend(live);
        }
        Ok(ids.len())
    }

    fn spool_dir(&self) -> Option<std::path::PathBuf> {
        Some(self.spool.clone())
    }

    fn trim_ledger(&self, before_ms: i64, batch: usize) -> Result<usize, StateError> {
        let mut inv = self.trim.prepare_invoke();
        inv.key(format!("{PREFIX}ledger"))
            .key(format!("{PREFIX}ledger:t"))
            .arg(before_ms)
            .arg(batch);
        let gone: i64 = self.with(|c| inv.invoke(c))?;
        Ok(usize::try_from(gone).unwrap_or(0))
    }

    fn ledger(&self, since_ms: Option<i64>) -> Result<Vec<LedgerEntry>, StateError> {
        let all: Vec<(String, String)> = self.with(|c| {
            redis::cmd("HGETALL")
                .arg(format!("{PREFIX}ledger"))
                .query(c)
        })?;
        let mut out = Vec::with_capacity(all.len());
        for (_, json) in all {
            let e: LedgerEntry = serde_json::from_str(&json)
                .map_err(|err| StateError::Backend(format!("ledger entry: {err}")))?;
            if since_ms.is_none_or(|t| e.ts_ms >= t) {
                out.push(e);
            }
        }
        out.sort_by(|a, b| a.ts_ms.cmp(&b.ts_ms).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    fn charge_rate(
        &self,
        key: &str,
        amount: u64,
        limit: u64,
        window_ms: u64,
        now_ms: i64,
    ) -> Option<Result<(), u64>> {
        let window = window_ms.max(1);
        let index = to_u64(now_ms) / window;
        let mut inv = self.rate.prepare_invoke();
        inv.key(format!("{PREFIX}rate:{key}@{index}"))
            .arg(amount)
            .arg(limit)
            .arg(window);
        match self.with(|c| inv.invoke::<(i64, i64)>(c)) {
            Ok((1, _)) => Some(Ok(())),
            Ok((_, wait)) => Some(Err(to_u64(wait))),
            Err(e) => {
                // Fail open: a Redis outage must not stop all traffic; it is logged.
                tracing::warn!("shared rate limit unavailable: {e}");
                None
            }
        }
    }
}
