//! Concurrency and rate limits, as the policy's `limit` rules say.
//!
//! Counters are keyed by the limit rule and the scope key (tenant id, feature,
//! model or provider name) and survive reloads as long as the rule text is
//! the same. Rates use a sliding approximation over two fixed windows, which
//! is cheap and never lets more than the limit through within one window.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Above this many keys per kind, idle keys are dropped before adding one.
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Default)]
pub struct Limiters {
    concurrency: Mutex<HashMap<String, Arc<AtomicU32>>>,
    rates: Mutex<HashMap<String, Arc<Mutex<Window>>>>,
}

/// Holds a concurrency slot until dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct Window {
    len: Duration,
    start: Instant,
    current: u64,
    previous: u64,
}

impl Limiters {
    /// Take one of `max` slots for `key`, or `None` when all are taken.
    pub fn acquire(&self, key: &str, max: u32) -> Option<Slot> {
        let counter = {
            let Ok(mut map) = self.concurrency.lock() else {
                return None;
            };
            if map.len() >= MAX_KEYS && !map.contains_key(key) {
                // Keys can come from clients (feature tags): forget idle ones.
                map.retain(|_, c| c.load(Ordering::Acquire) > 0);
            }
            map.entry(key.to_string()).or_default().clone()
        };
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(counter);
        (prev < max).then_some(slot)
    }

    /// Count `amount` against `limit` per `window` for `key`; false (and
    /// nothing counted) when it would pass the limit. Returns the time until
    /// the current window ends, for `Retry-After`.
    pub fn charge(
        &self,
        key: &str,
        amount: u64,
        limit: u64,
        window: Duration,
        now: Instant,
    ) -> Result<(), Duration> {
        let w = {
            let Ok(mut map) = self.rates.lock() else {
                return Ok(());
            };
            if map.len() >= MAX_KEYS && !map.contains_key(key) {
                // Windows that ended long ago hold nothing worth keeping.
                map.retain(|_, w| {
                    w.lock().is_ok_and(|w| {
                        now.saturating_duration_since(w.start) < w.len.saturating_mul(2)
                    })
                });
            }
            map.entry(key.to_string())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(Window {
                        len: window,
                        start: now,
                        current: 0,
                        previous: 0,
                    }))
                })
                .clone()
        };
        let Ok(mut w) = w.lock() else { return Ok(()) };
        let len = window.max(Duration::from_millis(1));
        let mut elapsed = now.saturating_duration_since(w.start);
        if elapsed >= len {
            let windows = elapsed.as_nanos() / len.as_nanos();
            w.previous = if windows == 1 { w.current } else { 0 };
            w.current = 0;
            w.start += len * u32::try_from(windows).unwrap_or(u32::MAX);
            elapsed = now.saturating_duration_since(w.start);
        }
        let weight = 1.0 - elapsed.as_secs_f64() / len.as_secs_f64();
        let estimate = w.current as f64 + w.previous as f64 * weight;
        if estimate + amount as f64 > limit as f64 {
            return Err(w.wait_for_room(len, elapsed, amount, limit));
        }
        w.current += amount;
        Ok(())
    }
}

impl Window {
    /// How long until `amount` fits under `limit` as [`Limiters::charge`]
    /// will count it then, if nothing else is charged meanwhile: the time
    /// the client is told to wait (`Retry-After`).
    ///
    /// Not merely the end of the current window: the previous window's count
    /// fades out linearly through the next one, so a client told to come back
    /// when a full window ends would be refused again at once (with a limit
    /// of 3 a minute, until 20 s into the next minute).
    fn wait_for_room(&self, len: Duration, elapsed: Duration, amount: u64, limit: u64) -> Duration {
        let len_s = len.as_secs_f64();
        let elapsed_s = elapsed.as_secs_f64();
        let room = limit as f64 - amount as f64;
        let current = self.current as f64;
        let previous = self.previous as f64;
        let secs = if room < 0.0 {
            // More than the whole limit: no wait makes it fit.
            len_s - elapsed_s
        } else if current > room {
            // Not in this window: in the next one this window's count is the
            // previous one, and must fade to `room`.
            (len_s - elapsed_s) + len_s * (1.0 - room / current)
        } else if previous > 0.0 {
            // In this window, once the previous window's share fades to what
            // is left of `room`.
            len_s * (1.0 - (room - current) / previous) - elapsed_s
        } else {
            0.0
        };
        // A millisecond more, so float rounding never lands a hair too early.
        Duration::from_secs_f64(secs.clamp(0.0, 2.0 * len_s)) + Duration::from_millis(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_slots_come_back_on_drop() {
        let l = Limiters::default();
        let a = l.acquire("m", 2).unwrap();
        let _b = l.acquire("m", 2).unwrap();
        assert!(l.acquire("m", 2).is_none());
        drop(a);
        assert!(l.acquire("m", 2).is_some());
    }

    #[test]
    fn rates_refuse_past_the_limit_and_recover() {
        let l = Limiters::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(1);
        for _ in 0..3 {
            l.charge("t", 1, 3, w, t0).unwrap();
        }
        assert!(l.charge("t", 1, 3, w, t0).is_err());
        assert!(l.charge("t", 1, 3, w, t0 + Duration::from_secs(3)).is_ok());
    }

    #[test]
    fn retry_after_is_when_a_request_passes_again() {
        // (limit, window, charges before, when refused): a client that waits
        // exactly as told must pass, and one that comes back a second
        // earlier is still refused (the wait is not padded).
        let w = Duration::from_secs(60);
        let s = Duration::from_secs;
        let cases: [(u64, &[Duration], Duration); 4] = [
            // A full window: before, the wait ended with the window and the
            // retry met the previous window's count, refused again.
            (3, &[s(0), s(0), s(0)], s(1)),
            (10, &[s(0); 10], s(30)),
            // Full because of the previous window's fading share.
            (4, &[s(0), s(0), s(0), s(0)], s(62)),
            (2, &[s(59), s(59)], s(70)),
        ];
        for (limit, charges, refused_at) in cases {
            let l = Limiters::default();
            let t0 = Instant::now();
            for at in charges {
                l.charge("t", 1, limit, w, t0 + *at).unwrap();
            }
            let wait = l.charge("t", 1, limit, w, t0 + refused_at).unwrap_err();
            let probe = Limiters::default();
            for at in charges {
                probe.charge("t", 1, limit, w, t0 + *at).unwrap();
            }
            assert!(
                probe
                    .charge("t", 1, limit, w, t0 + refused_at + wait - s(1))
                    .is_err(),
                "limit {limit}: a second before the {wait:?} wait it already passes"
            );
            assert!(
                l.charge("t", 1, limit, w, t0 + refused_at + wait).is_ok(),
                "limit {limit}: refused again after waiting the {wait:?} it was told"
            );
        }
    }

    #[test]
    fn client_chosen_keys_cannot_grow_the_tables_forever() {
        let l = Limiters::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(1);
        for i in 0..(MAX_KEYS * 2) {
            drop(l.acquire(&format!("feature:{i}"), 5));
            l.charge(
                &format!("feature:{i}"),
                1,
                5,
                w,
                t0 + w * 3 * (i / MAX_KEYS) as u32,
            )
            .unwrap();
        }
        assert!(l.concurrency.lock().unwrap().len() <= MAX_KEYS);
        assert!(l.rates.lock().unwrap().len() <= MAX_KEYS + 1);
    }
}
