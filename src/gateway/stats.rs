//! Live per-model statistics that feed `decide`: exponentially weighted
//! averages of total latency, first-token latency and success, kept in
//! atomics so recording a result never takes a lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// Weight of the newest sample.
const ALPHA: f64 = 0.2;
/// Stored in an `AtomicU64` as `f64` bits; NaN means "no sample yet".
const EMPTY: u64 = 0x7ff8_0000_0000_0000;

#[derive(Debug)]
struct Ewma(AtomicU64);

impl Default for Ewma {
    fn default() -> Self {
        Ewma(AtomicU64::new(EMPTY))
    }
}

impl Ewma {
    fn get(&self) -> Option<f64> {
        let v = f64::from_bits(self.0.load(Ordering::Relaxed));
        (!v.is_nan()).then_some(v)
    }
    fn add(&self, sample: f64) {
        // A lost update under contention only drops one sample from an average.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                let new = if old.is_nan() {
                    sample
                } else {
                    old + ALPHA * (sample - old)
                };
                Some(new.to_bits())
            });
    }
}

#[derive(Debug, Default)]
pub struct ModelLive {
    latency_ms: Ewma,
    first_token_ms: Ewma,
    success: Ewma,
}

impl ModelLive {
    pub fn record_success(&self, latency_ms: f64, first_token_ms: Option<f64>) {
        self.latency_ms.add(latency_ms);
        if let Some(ft) = first_token_ms {
            self.first_token_ms.add(ft);
        }
        self.success.add(1.0);
    }
    pub fn record_failure(&self) {
        self.success.add(0.0);
    }
    pub fn latency_ms(&self) -> Option<f64> {
        self.latency_ms.get()
    }
    pub fn first_token_ms(&self) -> Option<f64> {
        self.first_token_ms.get()
    }
    pub fn success_rate(&self) -> Option<f64> {
        self.success.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_start_empty_and_follow_samples() {
        let m = ModelLive::default();
        assert_eq!(m.latency_ms(), None);
        m.record_success(100.0, Some(10.0));
        assert_eq!(m.latency_ms(), Some(100.0));
        m.record_success(200.0, None);
        assert_eq!(m.latency_ms(), Some(120.0));
        assert_eq!(m.first_token_ms(), Some(10.0));
        m.record_failure();
        assert!((m.success_rate().unwrap() - 0.8).abs() < 1e-9);
    }
}
