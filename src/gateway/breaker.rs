//! Circuit breakers: closed, open, half-open.
//!
//! A breaker opens after `failures` failures within `window`; after
//! `cooldown` it lets exactly one probe through (half-open); the probe's
//! success closes it, its failure opens it again. Breakers are kept per
//! model and per provider by name, so they survive policy reloads.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::engine::BreakerState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures: u32,
    pub window: Duration,
    pub cooldown: Duration,
}

#[derive(Debug)]
enum State {
    Closed { recent: VecDeque<Instant> },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// One breaker. A short critical section per attempt; never held across I/O.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
}

/// What `try_acquire` granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Closed: go ahead.
    Normal,
    /// Half-open: this attempt is the one probe.
    Probe,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: Mutex::new(State::Closed {
                recent: VecDeque::new(),
            }),
        }
    }
}

impl Breaker {
    pub fn state(&self, now: Instant) -> BreakerState {
        let Ok(s) = self.state.lock() else {
            return BreakerState::Closed;
        };
        match &*s {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if now >= *until => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether an attempt may go through now; `None` means the breaker is open.
    pub fn try_acquire(&self, now: Instant) -> Option<Permit> {
        let Ok(mut s) = self.state.lock() else {
            return Some(Permit::Normal);
        };
        match &mut *s {
            State::Closed { .. } => Some(Permit::Normal),
            State::Open { until } => {
                if now >= *until {
                    *s = State::HalfOpen { probing: true };
                    Some(Permit::Probe)
                } else {
                    None
                }
            }
            State::HalfOpen { probing } => {
                if *probing {
                    None
                } else {
                    *probing = true;
                    Some(Permit::Probe)
                }
            }
        }
    }

    pub fn record(&self, cfg: &BreakerConfig, ok: bool, now: Instant) {
        let Ok(mut s) = self.state.lock() else { return };
        match &mut *s {
            State::Closed { recent } => {
                if ok {
                    return;
                }
                recent.push_back(now);
                while recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > cfg.window)
                {
                    recent.pop_front();
                }
                if recent.len() >= cfg.failures as usize {
                    *s = State::Open {
                        until: now + cfg.cooldown,
                    };
                }
            }
            State::HalfOpen { .. } => {
                *s = if ok {
                    State::Closed {
                        recent: VecDeque::new(),
                    }
                } else {
                    State::Open {
                        until: now + cfg.cooldown,
                    }
                };
            }
            // A late result from before the breaker opened changes nothing.
            State::Open { .. } => {}
        }
    }

    /// A probe that got no verdict gives its turn back (through [`Probes`]).
    fn release_probe(&self) {
        if let Ok(mut s) = self.state.lock() {
            if let State::HalfOpen { probing } = &mut *s {
                *probing = false;
            }
        }
    }
}

/// The probes one attempt holds (its model's breaker, its provider's, or
/// both, when half-open). Dropping it gives back a probe that got no
/// verdict: a request whose future is dropped mid-probe (the client left, a
/// limit or the budget refused the attempt, the server stops) must not leave
/// its breaker half-open with the probe taken, shut for good. After a
/// verdict (`record`) the breaker is closed or open again, and giving the
/// probe back changes nothing.
#[derive(Default)]
pub struct Probes(Vec<Arc<Breaker>>);

impl Probes {
    /// Hold `permit` of `breaker` when it is the probe (nothing for `Normal`).
    pub fn hold(&mut self, permit: Permit, breaker: &Arc<Breaker>) {
        if permit == Permit::Probe {
            self.0.push(Arc::clone(breaker));
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for b in &self.0 {
            b.release_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_dropped_without_a_verdict_gives_its_turn_back() {
        let cfg = BreakerConfig {
            failures: 1,
            window: Duration::from_secs(10),
            cooldown: Duration::from_millis(10),
        };
        let b = Arc::new(Breaker::default());
        let t0 = Instant::now();
        b.record(&cfg, false, t0);
        let later = t0 + Duration::from_millis(20);
        let probe = b.try_acquire(later).unwrap();
        assert_eq!(probe, Permit::Probe);
        assert_eq!(b.try_acquire(later), None, "one probe at a time");
        // The request holding the probe goes away with no verdict.
        let mut gone = Probes::default();
        gone.hold(probe, &b);
        gone.hold(Permit::Normal, &b);
        drop(gone);
        assert_eq!(b.try_acquire(later), Some(Permit::Probe));
        // A verdict stands: giving the probe back afterwards changes nothing.
        let mut held = Probes::default();
        held.hold(Permit::Probe, &b);
        b.record(&cfg, true, later);
        drop(held);
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn opens_after_failures_in_window_then_probes_once() {
        let cfg = BreakerConfig {
            failures: 3,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
        };
        let b = Breaker::default();
        let t0 = Instant::now();
        b.record(&cfg, false, t0);
        b.record(&cfg, false, t0 + Duration::from_secs(1));
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.record(&cfg, false, t0 + Duration::from_secs(2));
        let t = t0 + Duration::from_secs(2);
        assert_eq!(b.state(t), BreakerState::Open);
        assert_eq!(b.try_acquire(t), None);
        let later = t + Duration::from_secs(6);
        assert_eq!(b.try_acquire(later), Some(Permit::Probe));
        assert_eq!(b.try_acquire(later), None, "one probe at a time");
        b.record(&cfg, true, later);
        assert_eq!(b.try_acquire(later), Some(Permit::Normal));
    }

    #[test]
    fn failures_outside_the_window_do_not_count() {
        let cfg = BreakerConfig {
            failures: 2,
            window: Duration::from_secs(1),
            cooldown: Duration::from_secs(5),
        };
        let b = Breaker::default();
        let t0 = Instant::now();
        b.record(&cfg, false, t0);
        b.record(&cfg, false, t0 + Duration::from_secs(3));
        assert_eq!(b.state(t0 + Duration::from_secs(3)), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let cfg = BreakerConfig {
            failures: 1,
            window: Duration::from_secs(1),
            cooldown: Duration::from_secs(1),
        };
        let b = Breaker::default();
        let t0 = Instant::now();
        b.record(&cfg, false, t0);
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(b.try_acquire(t1), Some(Permit::Probe));
        b.record(&cfg, false, t1);
        assert_eq!(b.state(t1), BreakerState::Open);
    }
}
