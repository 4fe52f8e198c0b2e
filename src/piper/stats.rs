//! Counters of a running Piper, and rates over a recent window.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Counters of one Piper since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PiperStats {
    /// Messages claimed.
    pub claimed: u64,
    /// Messages deleted after processing ([`Outcome::Commit`](crate::piper::Outcome::Commit),
    /// and originals of [`Outcome::Emit`](crate::piper::Outcome::Emit)).
    pub committed: u64,
    /// Messages passed on unchanged.
    pub forwarded: u64,
    /// New messages emitted.
    pub emitted: u64,
    /// Messages moved to `errors/` (stage failures, timeouts failed, dead letters).
    pub failed: u64,
    /// Messages deferred for another attempt.
    pub retried: u64,
    /// Messages dead-lettered after their last attempt (also counted in `failed`).
    pub dead_lettered: u64,
    /// Messages that were too old and went to `errors/` unprocessed.
    pub expired: u64,
    /// Messages whose processing exceeded a timeout: the Piper's (its supervisor took
    /// them over) or the stage's own ([`Outcome::TimedOut`](crate::piper::Outcome::TimedOut),
    /// as a [`CommandStage`](crate::piper::CommandStage)'s timeout returns).
    pub timeouts: u64,
    /// Messages the operator cancelled while they were processed (`dirq cancel`):
    /// those moved to `errors/` are also counted in `failed`, those put back into
    /// `incoming/` in nothing else.
    pub cancelled: u64,
    /// Stage panics.
    pub panics: u64,
    /// Claims lost to other claimers.
    pub wasted_claims: u64,
    /// Milliseconds intake was paused (backpressure or the failure breaker).
    pub paused_ms: u64,
    /// Messages being processed right now.
    pub in_flight: u64,
    /// Batches of outcomes the group commit synced (see
    /// [`PiperBuilder::commit_batch`](crate::piper::PiperBuilder::commit_batch)).
    pub synced_batches: u64,
    /// Polls of an async stage's future (`AsyncStage`, feature `tokio`) that held their
    /// runtime thread for more than a second (each is logged as a warning): a stage
    /// that blocks its runtime by mistake.
    pub runtime_stalls: u64,
}

/// Per-second rates over the last few seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PiperRates {
    /// Claims per second.
    pub claimed: f64,
    /// Messages finished (committed, forwarded or emitted from) per second.
    pub done: f64,
    /// Failures (including retries) per second.
    pub failed: f64,
}

/// The live counters, updated by workers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) claimed: AtomicU64,
    pub(crate) committed: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) emitted: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) paused_ms: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) synced_batches: AtomicU64,
    /// Shared with the futures of an async stage, which count their stalls.
    pub(crate) runtime_stalls: std::sync::Arc<AtomicU64>,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot; `expired` and `wasted_claims` come from the input queues.
    pub(crate) fn snapshot(&self, expired: u64, wasted_claims: u64) -> PiperStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PiperStats {
            claimed: get(&self.claimed),
            committed: get(&self.committed),
            forwarded: get(&self.forwarded),
            emitted: get(&self.emitted),
            failed: get(&self.failed),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            expired,
            timeouts: get(&self.timeouts),
            cancelled: get(&self.cancelled),
            panics: get(&self.panics),
            wasted_claims,
            paused_ms: get(&self.paused_ms),
            in_flight: get(&self.in_flight),
            synced_batches: get(&self.synced_batches),
            runtime_stalls: get(&self.runtime_stalls),
        }
    }
}

/// Samples of the counters, one a second or so, for rates over a sliding window.
#[derive(Debug, Default)]
pub(crate) struct RateWindow {
    samples: VecDeque<(Instant, PiperStats)>,
}

/// How far back rates look.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl RateWindow {
    pub(crate) fn record(&mut self, stats: PiperStats) {
        let now = Instant::now();
        self.samples.push_back((now, stats));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    pub(crate) fn rates(&self) -> PiperRates {
        let (Some((t0, a)), Some((t1, b))) = (self.samples.front(), self.samples.back()) else {
            return PiperRates::default();
        };
        let secs = t1.duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return PiperRates::default();
        }
        let per_second = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
        let done = |s: &PiperStats| s.committed + s.forwarded;
        PiperRates {
            claimed: per_second(a.claimed, b.claimed),
            done: per_second(done(a), done(b)),
            failed: per_second(a.failed + a.retried, b.failed + b.retried),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_two_samples() {
        let mut window = RateWindow::default();
        assert_eq!(window.rates(), PiperRates::default());
        window.record(PiperStats::default());
        assert_eq!(window.rates(), PiperRates::default());
    }
}
