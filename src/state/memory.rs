//! In-memory store, for unit tests: one mutex over everything.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::{Balance, BudgetStore, Charge, Counter, LedgerEntry, Refusal, Reservation, StateError};
use crate::ir::Micros;

#[derive(Default)]
struct Inner {
    spent: HashMap<Counter, Micros>,
    reservations: HashMap<String, Reservation>,
    ledger: BTreeMap<String, LedgerEntry>,
}

impl Inner {
    fn balance(&self, c: &Counter, now_ms: i64) -> Balance {
        let reserved = self
            .reservations
            .values()
            .filter(|r| r.expires_ms > now_ms && r.counters.contains(c))
            .map(|r| r.amount)
            .sum();
        Balance {
            spent: self.spent.get(c).copied().unwrap_or(0),
            reserved,
        }
    }
}

#[derive(Default)]
pub struct MemoryStore(Mutex<Inner>);

impl MemoryStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StateError> {
        self.0
            .lock()
            .map_err(|_| StateError::Backend("memory store poisoned".into()))
    }
}

impl BudgetStore for MemoryStore {
    fn reserve(
        &self,
        id: &str,
        charges: &[Charge],
        amount: Micros,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Reservation, StateError> {
        let mut s = self.lock()?;
        s.reservations.retain(|_, r| r.expires_ms > now_ms);
        for ch in charges {
            let b = s.balance(&ch.counter, now_ms);
            if b.spent.saturating_add(b.reserved).saturating_add(amount) > ch.limit {
                return Err(StateError::Refused(Box::new(Refusal {
                    counter: ch.counter.clone(),
                    limit: ch.limit,
                    balance: b,
                    amount,
                })));
            }
        }
        let r = Reservation {
            id: id.to_string(),
            counters: charges.iter().map(|c| c.counter.clone()).collect(),
            amount,
            expires_ms: now_ms.saturating_add(ttl_ms),
        };
        s.reservations.insert(id.to_string(), r.clone());
        Ok(r)
    }

    fn settle(&self, r: &Reservation, entry: &LedgerEntry) -> Result<bool, StateError> {
        let mut s = self.lock()?;
        s.reservations.remove(&r.id);
        if s.ledger.contains_key(&entry.id) {
            return Ok(false);
        }
        s.ledger.insert(entry.id.clone(), entry.clone());
        for c in &r.counters {
            let v = s.spent.entry(c.clone()).or_default();
            *v = v.saturating_add(entry.actual);
        }
        Ok(true)
    }

    fn release(&self, r: &Reservation) -> Result<(), StateError> {
        self.lock()?.reservations.remove(&r.id);
        Ok(())
    }

    fn balance(&self, c: &Counter, now_ms: i64) -> Result<Balance, StateError> {
        Ok(self.lock()?.balance(c, now_ms))
    }

    fn open_reservations(&self, now_ms: i64) -> Result<usize, StateError> {
        Ok(self
            .lock()?
            .reservations
            .values()
            .filter(|r| r.expires_ms > now_ms)
            .count())
    }

    fn trim_ledger(&self, before_ms: i64, batch: usize) -> Result<usize, StateError> {
        let mut s = self.lock()?;
        let mut old: Vec<(i64, String)> = s
            .ledger
            .values()
            .filter(|e| e.ts_ms < before_ms)
            .map(|e| (e.ts_ms, e.id.clone()))
            .collect();
        old.sort_unstable();
        old.truncate(batch);
        for (_, id) in &old {
            s.ledger.remove(id);
        }
        Ok(old.len())
    }

    fn ledger(&self, since_ms: Option<i64>) -> Result<Vec<LedgerEntry>, StateError> {
        let s = self.lock()?;
        let mut v: Vec<LedgerEntry> = s
            .ledger
            .values()
            .filter(|e| since_ms.is_none_or(|t| e.ts_ms >= t))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.ts_ms.cmp(&b.ts_ms).then_with(|| a.id.cmp(&b.id)));
        Ok(v)
    }
}
