//! A per-token rate limiter whose state is one number, so it can live in Envoy shared data and be
//! updated with compare-and-swap by any worker.
//!
//! Algorithm: GCRA (generic cell rate algorithm), the exact form of a token bucket. The state is
//! the theoretical arrival time (TAT, in microseconds): when the bucket would be full again. With
//! a limit of L units per window W, each unit advances the TAT by T = W / L (rounded up to a
//! microsecond), and a request of `cost` units fits when
//! `max(TAT, now) + cost × T − now ≤ L × T`: a burst of exactly L units passes at once, then one
//! more every T. Token counts charged after a response may push the TAT past that bound; requests
//! are then refused until it has drained, and `retry_after_secs` is exactly that wait, rounded up.

use crate::codec::{Reader, Writer};

const VERSION: u8 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateWindow {
    /// Theoretical arrival time, unix microseconds; 0 = never used.
    tat_us: i64,
}

/// Emission interval in microseconds, rounded up so L intervals never undercut the window.
fn interval_us(window_ms: u64, limit: u64) -> i64 {
    let window_us = u128::from(window_ms) * 1000;
    let t = window_us.div_ceil(u128::from(limit.max(1))).max(1);
    i64::try_from(t).unwrap_or(i64::MAX)
}

fn now_us(now_ms: i64) -> i64 {
    now_ms.saturating_mul(1000)
}

impl RateWindow {
    pub fn new() -> Self {
        RateWindow::default()
    }

    fn tat_after(&self, now_ms: i64, window_ms: u64, limit: u64, cost: u64) -> i64 {
        let t = interval_us(window_ms, limit);
        let cost = i64::try_from(cost).unwrap_or(i64::MAX);
        self.tat_us
            .max(now_us(now_ms))
            .saturating_add(cost.saturating_mul(t))
    }

    fn capacity_us(window_ms: u64, limit: u64) -> i64 {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        limit.saturating_mul(interval_us(window_ms, limit.unsigned_abs()))
    }

    pub fn would_allow(&self, now_ms: i64, window_ms: u64, limit: u64, cost: u64) -> bool {
        if limit == 0 {
            return false;
        }
        let new_tat = self.tat_after(now_ms, window_ms, limit, cost);
        new_tat.saturating_sub(now_us(now_ms)) <= Self::capacity_us(window_ms, limit)
    }

    /// Charges `cost` units, unconditionally (see the module docs).
    pub fn add(&mut self, now_ms: i64, window_ms: u64, limit: u64, cost: u64) {
        if limit == 0 || cost == 0 {
            return;
        }
        self.tat_us = self.tat_after(now_ms, window_ms, limit, cost);
    }

    /// Whole seconds until `would_allow` becomes true; at least 1 while refused, 0 if allowed now.
    pub fn retry_after_secs(&self, now_ms: i64, window_ms: u64, limit: u64, cost: u64) -> u64 {
        if self.would_allow(now_ms, window_ms, limit, cost) {
            return 0;
        }
        if limit == 0 || cost > limit {
            // Never fits: tell the client to come back after a whole window.
            return window_ms.div_ceil(1000).max(1);
        }
        let t = interval_us(window_ms, limit);
        let cost = i64::try_from(cost).unwrap_or(i64::MAX);
        let wait_us = self
            .tat_us
            .saturating_add(cost.saturating_mul(t))
            .saturating_sub(Self::capacity_us(window_ms, limit))
            .saturating_sub(now_us(now_ms));
        u64::try_from(wait_us)
            .unwrap_or(0)
            .div_ceil(1_000_000)
            .max(1)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(VERSION);
        w.i64(self.tat_us);
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Option<RateWindow> {
        let mut r = Reader::new(data, VERSION)?;
        let tat_us = r.i64()?;
        r.is_done().then_some(RateWindow { tat_us })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: u64 = 60_000;
    const T0: i64 = 1_795_548_089_000;

    fn take(w: &mut RateWindow, now: i64, limit: u64) -> bool {
        let ok = w.would_allow(now, MIN, limit, 1);
        if ok {
            w.add(now, MIN, limit, 1);
        }
        ok
    }

    #[test]
    fn a_burst_of_exactly_the_limit_then_refill() {
        let mut w = RateWindow::new();
        assert_eq!((0..25).filter(|_| take(&mut w, T0, 10)).count(), 10);
        // One unit refills every 6 s.
        assert_eq!(w.retry_after_secs(T0, MIN, 10, 1), 6);
        assert!(!take(&mut w, T0 + 5_999, 10));
        assert!(take(&mut w, T0 + 6_000, 10));
        assert!(!take(&mut w, T0 + 6_000, 10));
        // After a whole idle window the full burst is back, not more.
        assert_eq!(
            (0..25)
                .filter(|_| take(&mut w, T0 + 6_000 + 60_000, 10))
                .count(),
            10
        );
    }

    #[test]
    fn limits_that_do_not_divide_the_window() {
        let mut w = RateWindow::new();
        assert_eq!((0..10).filter(|_| take(&mut w, T0, 7)).count(), 7);
        // 60 / 7 = 8.571.. s: retry after 9 s, and at 8.572 s one more fits.
        assert_eq!(w.retry_after_secs(T0, MIN, 7, 1), 9);
        assert!(!take(&mut w, T0 + 8_571, 7));
        assert!(take(&mut w, T0 + 8_572, 7));
    }

    #[test]
    fn tokens_charged_after_the_fact_push_into_debt() {
        let mut w = RateWindow::new();
        assert!(w.would_allow(T0, MIN, 1000, 1));
        w.add(T0, MIN, 1000, 1200);
        assert!(!w.would_allow(T0, MIN, 1000, 1));
        // 1200 units charged against 1000/min: room for one more unit after 12.06 s.
        assert_eq!(w.retry_after_secs(T0, MIN, 1000, 1), 13);
        assert!(!w.would_allow(T0 + 12_059, MIN, 1000, 1));
        assert!(w.would_allow(T0 + 12_060, MIN, 1000, 1));
    }

    #[test]
    fn edge_cases_never_grant_extra() {
        let mut w = RateWindow::new();
        assert!(!w.would_allow(T0, MIN, 0, 1));
        assert!(w.retry_after_secs(T0, MIN, 0, 1) >= 1);
        assert!(!w.would_allow(T0, MIN, 5, 6));
        assert_eq!(w.retry_after_secs(T0, MIN, 5, 6), 60);
        for _ in 0..5 {
            assert!(take(&mut w, T0, 5));
        }
        // The clock going backwards does not refill the bucket.
        assert!(!take(&mut w, T0 - 3_600_000, 5));
        w.add(T0, MIN, 5, u64::MAX);
        assert!(!w.would_allow(T0 + 1_000_000, MIN, 5, 1));
        assert!(w.retry_after_secs(T0, MIN, 5, 1) >= 1);
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let mut w = RateWindow::new();
        w.add(T0, MIN, 10, 3);
        assert_eq!(RateWindow::decode(&w.encode()), Some(w.clone()));
        assert_eq!(RateWindow::decode(&[]), None);
        assert_eq!(RateWindow::decode(&[9, 0, 0]), None);
        let mut long = w.encode();
        long.push(0);
        assert_eq!(RateWindow::decode(&long), None);
    }

    proptest! {
        /// Over any sequence of requests, the units granted in [start, end] never exceed the
        /// burst plus the refill of the elapsed time.
        #[test]
        fn never_more_than_burst_plus_refill(
            limit in 1u64..50,
            steps in proptest::collection::vec((0i64..5_000, 1u64..4), 1..200),
        ) {
            let mut w = RateWindow::new();
            let mut now = T0;
            let mut granted = 0u64;
            for (dt, cost) in steps {
                now += dt;
                if w.would_allow(now, MIN, limit, cost) {
                    w.add(now, MIN, limit, cost);
                    granted += cost;
                }
            }
            let elapsed = u64::try_from(now - T0).unwrap();
            prop_assert!(granted <= limit + elapsed * limit / MIN + 1);
        }
    }
}
