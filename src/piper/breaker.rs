//! The failure breaker: when a stage keeps failing, stop feeding it messages instead of
//! burning the whole queue into `errors/`.
//!
//! Closed (normal) → open when failures in the window pass a count or a rate → after a
//! cooldown, half-open: one message is let through as a probe → closed if it succeeds,
//! open again (with twice the cooldown, at most 10 minutes) if it fails.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::later;

/// When the failure breaker of a [`Piper`](crate::piper::Piper) opens: a plain value, set
/// with `&mut self` setters and given to
/// [`PiperBuilder::breaker`](crate::piper::PiperBuilder::breaker), whose
/// [`build`](crate::piper::PiperBuilder::build) checks it.
///
/// ```
/// use std::time::Duration;
/// use dirq::{DirectoryQueue, Message};
/// use dirq::piper::{BreakerPolicy, Outcome, Piper, StageResult};
///
/// let dir = tempfile::tempdir().expect("a temporary directory");
/// let input = DirectoryQueue::open(dir.path().join("input"))?;
/// // Pause intake for 10 s after 3 failures within a minute, whatever the rate.
/// let piper = Piper::builder("careful")
///     .input(&input)
///     .breaker(BreakerPolicy::disabled().max_failures(3).cooldown(Duration::from_secs(10)))
///     .stage(|_: &Message| -> StageResult { Ok(Outcome::Commit) })
///     .build()?;
///
/// // Bad values are refused when the Piper is built, naming the setting.
/// let error = Piper::builder("careless")
///     .input(&input)
///     .breaker(BreakerPolicy::default().max_failure_rate(1.5))
///     .stage(|_: &Message| -> StageResult { Ok(Outcome::Commit) })
///     .build()
///     .unwrap_err();
/// assert!(matches!(error, dirq::Error::Config { field: "breaker.max_failure_rate", .. }));
/// # Ok::<(), dirq::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    max_failures: Option<u32>,
    max_failure_rate: Option<f64>,
    min_samples: u32,
    window: Duration,
    cooldown: Duration,
}

impl Default for BreakerPolicy {
    /// Opens when at least half of at least 20 outcomes in the last minute were
    /// failures (failed, retried, timed out or panicked); cooldown 30 s.
    fn default() -> BreakerPolicy {
        BreakerPolicy {
            max_failures: None,
            max_failure_rate: Some(0.5),
            min_samples: 20,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
        }
    }
}

impl BreakerPolicy {
    /// A breaker that never opens, unless a limit is set on it afterwards
    /// ([`max_failures`](Self::max_failures), [`max_failure_rate`](Self::max_failure_rate)).
    pub fn disabled() -> BreakerPolicy {
        BreakerPolicy {
            max_failures: None,
            max_failure_rate: None,
            ..BreakerPolicy::default()
        }
    }

    /// Opens when this many failures (at least 1) happen within the window, whatever
    /// the rate. Default: no count limit.
    pub fn max_failures(&mut self, failures: u32) -> &mut Self {
        self.max_failures = Some(failures);
        self
    }

    /// Opens when this fraction (more than 0, at most 1) of the outcomes within the
    /// window are failures, once there are at least
    /// [`min_samples`](Self::min_samples) of them. Default: 0.5; none for
    /// [`disabled`](Self::disabled).
    pub fn max_failure_rate(&mut self, rate: f64) -> &mut Self {
        self.max_failure_rate = Some(rate);
        self
    }

    /// How many outcomes (at least 1) the window must hold before the failure rate
    /// counts. Default: 20.
    pub fn min_samples(&mut self, samples: u32) -> &mut Self {
        self.min_samples = samples;
        self
    }

    /// The window failures are counted over; more than zero. Default: 60 s.
    pub fn window(&mut self, window: Duration) -> &mut Self {
        self.window = window;
        self
    }

    /// How long intake stays paused before a probe; more than zero. A probe that fails
    /// doubles it, up to 10 minutes. Default: 30 s.
    pub fn cooldown(&mut self, cooldown: Duration) -> &mut Self {
        self.cooldown = cooldown;
        self
    }

    /// The first setting out of range: its name, as [`Error::Config`](crate::Error)
    /// gives it, and why.
    pub(crate) fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.max_failures == Some(0) {
            return Err(("breaker.max_failures", "must be at least 1"));
        }
        if self
            .max_failure_rate
            .is_some_and(|rate| !(rate > 0.0 && rate <= 1.0))
        {
            return Err((
                "breaker.max_failure_rate",
                "must be more than 0 and at most 1",
            ));
        }
        if self.min_samples == 0 {
            return Err(("breaker.min_samples", "must be at least 1"));
        }
        if self.window.is_zero() {
            return Err(("breaker.window", "must be more than zero"));
        }
        if self.cooldown.is_zero() {
            return Err((
                "breaker.cooldown",
                "must be more than zero (a zero cooldown never pauses intake)",
            ));
        }
        Ok(())
    }
}

const MAX_COOLDOWN: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant, cooldown: Duration },
    HalfOpen { probing: bool, cooldown: Duration },
}

/// What changed when an outcome was recorded, for the Piper to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    Opened {
        failures: usize,
        outcomes: usize,
        cooldown: Duration,
    },
    Closed,
}

/// How many slices the window is counted in: outcomes are counted per slice, so the
/// breaker costs the same per message at any rate and holds at most this many counts.
/// An outcome leaves the window up to one slice (1/64 of it) late.
const SLICES: u32 = 64;

/// Outcomes and failures within the window, counted per slice of time.
#[derive(Debug, Default)]
struct Window {
    /// (start of the slice, outcomes, failures), oldest first.
    slices: VecDeque<(Instant, usize, usize)>,
    outcomes: usize,
    failures: usize,
}

impl Window {
    fn record(&mut self, failed: bool, now: Instant, window: Duration) {
        while let Some(&(start, outcomes, failures)) = self.slices.front() {
            if now.saturating_duration_since(start) <= window {
                break;
            }
            self.slices.pop_front();
            self.outcomes -= outcomes;
            self.failures -= failures;
        }
        let slice = window / SLICES;
        match self.slices.back_mut() {
            Some((start, outcomes, failures)) if now.saturating_duration_since(*start) < slice => {
                *outcomes += 1;
                *failures += usize::from(failed);
            }
            _ => self.slices.push_back((now, 1, usize::from(failed))),
        }
        self.outcomes += 1;
        self.failures += usize::from(failed);
    }

    fn clear(&mut self) {
        *self = Window::default();
    }
}

#[derive(Debug)]
pub(crate) struct Breaker {
    policy: BreakerPolicy,
    /// Recent outcomes.
    outcomes: Window,
    state: State,
}

impl Breaker {
    pub(crate) fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            outcomes: Window::default(),
            state: State::Closed,
        }
    }

    /// Whether a worker may take a message now. In the half-open state only one probe
    /// at a time is let through.
    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until, cooldown } if now >= until => {
                self.state = State::HalfOpen {
                    probing: true,
                    cooldown,
                };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { probing: true, .. } => false,
            State::HalfOpen { cooldown, .. } => {
                self.state = State::HalfOpen {
                    probing: true,
                    cooldown,
                };
                true
            }
        }
    }

    /// A worker that was admitted found nothing to process: its probe did not happen.
    pub(crate) fn cancel_probe(&mut self) {
        if let State::HalfOpen { cooldown, .. } = self.state {
            self.state = State::HalfOpen {
                probing: false,
                cooldown,
            };
        }
    }

    /// Whether intake is paused by the breaker.
    pub(crate) fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed)
    }

    /// Records one processing outcome.
    pub(crate) fn record(&mut self, failed: bool, now: Instant) -> Option<Transition> {
        match self.state {
            State::HalfOpen { cooldown, .. } => {
                if failed {
                    let cooldown = cooldown.saturating_mul(2).min(MAX_COOLDOWN);
                    self.state = State::Open {
                        until: later(now, cooldown),
                        cooldown,
                    };
                    return Some(Transition::Opened {
                        failures: 1,
                        outcomes: 1,
                        cooldown,
                    });
                }
                self.state = State::Closed;
                self.outcomes.clear();
                return Some(Transition::Closed);
            }
            State::Open { .. } => return None,
            State::Closed => {}
        }
        self.outcomes.record(failed, now, self.policy.window);
        let (failures, outcomes) = (self.outcomes.failures, self.outcomes.outcomes);
        let by_count = self
            .policy
            .max_failures
            .is_some_and(|max| failures >= max as usize);
        let by_rate = self.policy.max_failure_rate.is_some_and(|rate| {
            outcomes >= self.policy.min_samples as usize
                && failures as f64 >= rate * outcomes as f64
        });
        if !(failed && (by_count || by_rate)) {
            return None;
        }
        let cooldown = self.policy.cooldown;
        self.state = State::Open {
            until: later(now, cooldown),
            cooldown,
        };
        Some(Transition::Opened {
            failures,
            outcomes,
            cooldown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_count_probes_after_cooldown_and_closes_on_success() {
        let policy = *BreakerPolicy::disabled()
            .max_failures(3)
            .cooldown(Duration::from_secs(10));
        let mut b = Breaker::new(policy);
        let t0 = Instant::now();
        assert_eq!(b.record(true, t0), None);
        assert_eq!(b.record(false, t0), None);
        assert_eq!(b.record(true, t0), None);
        assert!(matches!(
            b.record(true, t0),
            Some(Transition::Opened { failures: 3, .. })
        ));
        assert!(!b.admit(t0 + Duration::from_secs(5)));
        // Half-open: one probe at a time.
        assert!(b.admit(t0 + Duration::from_secs(11)));
        assert!(!b.admit(t0 + Duration::from_secs(11)));
        assert_eq!(
            b.record(false, t0 + Duration::from_secs(12)),
            Some(Transition::Closed)
        );
        assert!(b.admit(t0 + Duration::from_secs(12)));
    }

    #[test]
    fn a_failed_probe_doubles_the_cooldown() {
        let mut b = Breaker::new(
            *BreakerPolicy::disabled()
                .max_failures(1)
                .cooldown(Duration::from_secs(10)),
        );
        let t0 = Instant::now();
        b.record(true, t0);
        assert!(b.admit(t0 + Duration::from_secs(10)));
        assert!(matches!(
            b.record(true, t0 + Duration::from_secs(10)),
            Some(Transition::Opened { cooldown, .. }) if cooldown == Duration::from_secs(20)
        ));
        assert!(!b.admit(t0 + Duration::from_secs(29)));
        assert!(b.admit(t0 + Duration::from_secs(31)));
    }

    #[test]
    fn rate_needs_enough_samples_and_a_cancelled_probe_frees_the_slot() {
        // A zero cooldown (refused by PiperBuilder::build) probes at once.
        let mut b = Breaker::new(*BreakerPolicy::default().cooldown(Duration::ZERO));
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.record(true, t0), None, "fewer than 20 outcomes");
        }
        for _ in 0..9 {
            b.record(false, t0);
        }
        assert!(b.record(true, t0).is_some(), "11 of 20 failed");
        assert!(b.admit(t0));
        b.cancel_probe();
        assert!(b.admit(t0), "the slot is free again");
    }

    #[test]
    fn outcomes_leave_the_window_and_counting_stays_bounded() {
        let window = Duration::from_secs(60);
        let policy = *BreakerPolicy::disabled().max_failures(10).window(window);
        let mut b = Breaker::new(policy);
        let t0 = Instant::now();
        // 9 failures, then a million successes over two minutes: the failures age out.
        for _ in 0..9 {
            assert_eq!(b.record(true, t0), None);
        }
        for i in 0..1_000_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 120);
            assert_eq!(b.record(false, now), None);
        }
        assert!(
            b.outcomes.slices.len() <= SLICES as usize + 1,
            "{} slices",
            b.outcomes.slices.len()
        );
        assert_eq!(b.outcomes.failures, 0, "the early failures left the window");
        // Within one window, the 10th failure still opens it.
        let late = t0 + Duration::from_secs(200);
        for _ in 0..9 {
            assert_eq!(b.record(true, late), None);
        }
        assert!(matches!(
            b.record(true, late + window / 2),
            Some(Transition::Opened { failures: 10, .. })
        ));
    }

    #[test]
    fn bad_settings_are_named() {
        let field = |policy: &BreakerPolicy| policy.check().err().map(|(field, _)| field);
        assert_eq!(field(&BreakerPolicy::default()), None);
        assert_eq!(field(&BreakerPolicy::disabled()), None);
        type Set = fn(&mut BreakerPolicy) -> &mut BreakerPolicy;
        let cases: [(&str, Set); 7] = [
            ("breaker.max_failures", |p| p.max_failures(0)),
            ("breaker.max_failure_rate", |p| p.max_failure_rate(0.0)),
            ("breaker.max_failure_rate", |p| p.max_failure_rate(1.01)),
            ("breaker.max_failure_rate", |p| p.max_failure_rate(f64::NAN)),
            ("breaker.min_samples", |p| p.min_samples(0)),
            ("breaker.window", |p| p.window(Duration::ZERO)),
            ("breaker.cooldown", |p| p.cooldown(Duration::ZERO)),
        ];
        for (want, set) in cases {
            assert_eq!(field(set(&mut BreakerPolicy::default())), Some(want));
        }
        assert_eq!(
            field(
                BreakerPolicy::disabled()
                    .max_failures(1)
                    .max_failure_rate(1.0)
            ),
            None
        );
    }

    #[test]
    fn a_cooldown_too_long_to_add_does_not_panic() {
        let mut b = Breaker::new(
            *BreakerPolicy::disabled()
                .max_failures(1)
                .cooldown(Duration::MAX),
        );
        let t0 = Instant::now();
        assert!(b.record(true, t0).is_some());
        assert!(!b.admit(t0 + Duration::from_secs(3600 * 24 * 365)));
    }

    #[test]
    fn disabled_never_opens() {
        let mut b = Breaker::new(BreakerPolicy::disabled());
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(b.record(true, t0), None);
        }
        assert!(!b.is_open());
    }
}
