//! How the secret cache paces its Secrets Manager calls after a failure, so that a fleet of
//! sidecars that failed together does not retry together.
//!
//! - [`full_jitter`] and [`Schedule`]: the wait after a failed fetch is drawn uniformly from zero
//!   to a window that grows with each failure in a row ("full jitter", AWS's guidance on backoff).
//!   A ±10 % jitter on a doubling delay keeps a fleet in step: every sidecar that failed in the
//!   same second retries in the same second, and the storm repeats. Full jitter spreads the
//!   retries over the whole window.
//! - [`ThrottleGate`]: one per process, shared by every cache entry. Once Secrets Manager throttles
//!   a call, no entry calls it again before a jittered instant, drawn from a window that starts at
//!   6 s and grows by half while the throttling lasts ([`AFTER_THROTTLE`]); the 401 path does not
//!   call it either. A sidecar with several secrets thus makes one retry round, not one per secret.
//!   The SDK does not retry throttled calls itself (see [`crate::secrets::aws`]): one throttled
//!   call is one call, and the gate decides when the next one goes.
//!
//! Why a throttle starts at a longer window than other failures: a throttle says the account's
//! quota (shared by every sidecar and every other app in the account and region) is spent right
//! now, and a retry within a second mostly spends more of it. Timeouts and resets are more often
//! local and brief, so their window starts at 1 s ([`AFTER_FAILURE`]). The throttle window grows
//! by half rather than doubling: in `benches/fleet` (300 sidecars, a quota of 50 calls/s), a
//! second throttle is rare and a doubled window only stretched the last sidecars' wait.

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// How a backoff window grows: `first` after the first failure, times `growth` after each next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// The window after the first failure.
    pub first: Duration,
    /// The factor from one window to the next.
    pub growth: f64,
}

/// After a failure other than a throttle: 1 s, 2 s, 4 s...
pub const AFTER_FAILURE: Schedule = Schedule {
    first: Duration::from_secs(1),
    growth: 2.0,
};
/// After a throttle: 6 s, 9 s, 13.5 s...
pub const AFTER_THROTTLE: Schedule = Schedule {
    first: Duration::from_secs(6),
    growth: 1.5,
};
/// The largest window while an entry has no value yet (its routes answer 503 until a fetch works).
pub const UNLOADED_CAP: Duration = Duration::from_secs(10);
/// An entry that has a value retries within a window of up to twice its refresh interval, capped
/// at twice this: on average no more often than it refreshes when all is well.
pub const LOADED_CAP_INTERVAL: Duration = Duration::from_secs(300);

impl Schedule {
    /// The window after `failures` failures in a row (1 for the first), at most `cap`.
    pub fn window(&self, failures: u32, cap: Duration) -> Duration {
        let steps = failures.saturating_sub(1).min(60) as i32;
        Duration::try_from_secs_f64(self.first.as_secs_f64() * self.growth.powi(steps))
            .unwrap_or(cap)
            .min(cap)
    }
}

/// A wait drawn uniformly from `[0, window]`.
pub fn full_jitter(window: Duration) -> Duration {
    window.mul_f64(rand::rng().random_range(0.0..=1.0))
}

/// The largest window for an entry: [`UNLOADED_CAP`] without a value, else twice its refresh
/// interval (at most twice [`LOADED_CAP_INTERVAL`]).
pub fn cap(loaded: bool, interval: Duration) -> Duration {
    if loaded {
        interval.min(LOADED_CAP_INTERVAL).saturating_mul(2)
    } else {
        UNLOADED_CAP
    }
}

/// The process-wide pause after Secrets Manager throttles a call (see the module docs).
#[derive(Debug, Default)]
pub struct ThrottleGate {
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    /// Throttled rounds in a row: calls in flight together count once.
    streak: u32,
    /// When the last throttle was recorded.
    last: Option<Instant>,
    /// No call starts before this.
    until: Option<Instant>,
}

impl ThrottleGate {
    /// Records that a call started at `started` was throttled. The first throttle of a round
    /// closes the gate for a wait drawn from the round's window (at most `cap`); a call that was
    /// already in flight then is part of that round and leaves the draw alone, so that every
    /// entry of the process calls again at the same instant, as one round. Returns the wait left.
    pub fn throttled(&self, started: Instant, cap: Duration) -> Duration {
        let now = Instant::now();
        let Ok(mut s) = self.state.lock() else {
            return full_jitter(AFTER_THROTTLE.window(1, cap));
        };
        let same_round = s.last.is_some_and(|t| started < t);
        if !same_round || s.until.is_none() {
            s.streak = s.streak.saturating_add(1);
            s.until = Some(now + full_jitter(AFTER_THROTTLE.window(s.streak, cap)));
        }
        s.last = Some(now);
        s.until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }

    /// Records that Secrets Manager answered without throttling: the gate opens, the next
    /// throttle starts a new streak.
    pub fn answered(&self) {
        if let Ok(mut s) = self.state.lock() {
            *s = GateState::default();
        }
    }

    /// How long the gate stays closed from now; `None` when calls may go.
    pub fn closed_for(&self) -> Option<Duration> {
        let s = self.state.lock().ok()?;
        let left = s.until?.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Throttled rounds in a row so far.
    pub fn streak(&self) -> u32 {
        self.state.lock().map(|s| s.streak).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_grow_up_to_the_cap() {
        let caps = cap(false, Duration::from_secs(30));
        let w: Vec<u64> = (1..=5)
            .map(|n| AFTER_FAILURE.window(n, caps).as_millis() as u64)
            .collect();
        assert_eq!(w, vec![1000, 2000, 4000, 8000, 10000]);
        let w: Vec<u64> = (1..=4)
            .map(|n| AFTER_THROTTLE.window(n, caps).as_millis() as u64)
            .collect();
        assert_eq!(w, vec![6000, 9000, 10000, 10000]);
        // With a value: up to twice the refresh interval, at most 10 min.
        assert_eq!(cap(true, Duration::from_secs(30)), Duration::from_secs(60));
        assert_eq!(
            cap(true, Duration::from_secs(3600)),
            Duration::from_secs(600)
        );
        // No overflow, however long the failures last.
        let huge = Duration::from_secs(u64::MAX);
        assert!(AFTER_FAILURE.window(u32::MAX, huge) <= huge);
        assert_eq!(
            AFTER_THROTTLE.window(40, cap(true, huge)),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_window() {
        let w = Duration::from_secs(10);
        let draws: Vec<Duration> = (0..2000).map(|_| full_jitter(w)).collect();
        assert!(draws.iter().all(|d| *d <= w));
        // Each tenth of the window gets about a tenth of the draws (binomial: 200 ± 4 sd).
        for tenth in 0..10 {
            let lo = w.mul_f64(f64::from(tenth) / 10.0);
            let hi = w.mul_f64(f64::from(tenth + 1) / 10.0);
            let n = draws.iter().filter(|d| **d >= lo && **d < hi).count();
            assert!((120..=280).contains(&n), "tenth {tenth}: {n} draws");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_together_count_as_one_throttled_round() {
        let gate = ThrottleGate::default();
        let cap = UNLOADED_CAP;
        let started = Instant::now();
        tokio::time::advance(Duration::from_millis(20)).await;
        let first = gate.throttled(started, cap);
        assert!(first <= AFTER_THROTTLE.first);
        // Another secret's call, started before that throttle was recorded: same round.
        gate.throttled(started, cap);
        assert_eq!(gate.streak(), 1);
        let left = gate.closed_for().unwrap_or_default();
        assert!(left <= AFTER_THROTTLE.first);
        // A call started after it: the next round, a wider window.
        tokio::time::advance(Duration::from_millis(10)).await;
        let next = Instant::now();
        assert!(gate.throttled(next, cap) <= Duration::from_secs(9));
        assert_eq!(gate.streak(), 2);
        gate.answered();
        assert_eq!(gate.streak(), 0);
        assert_eq!(gate.closed_for(), None);
    }
}
