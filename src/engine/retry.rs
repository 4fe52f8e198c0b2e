//! How a message that asks to be retried is retried: backoff, jitter, and the attempt
//! after which it becomes a dead letter.

use std::time::Duration;

use crate::error::{Error, Result};

/// How a message that asks to be retried is retried.
///
/// The delay before attempt `n + 1` is `initial * factor^(n - 1)`, capped at
/// `max_delay`, then moved by up to `jitter` (a fraction) either way so that messages
/// that failed together do not come back together. After `max_attempts` attempts the
/// message goes to `errors/` with its last reason (a dead letter).
///
/// ```
/// use std::time::Duration;
/// use dirq::queue::RetryPolicy;
///
/// let policy = RetryPolicy::builder()
///     .initial(Duration::from_millis(500))
///     .max_attempts(3)
///     .build()?;
/// assert_eq!(policy.max_attempts(), 3);
/// assert_eq!(policy.delay(2), Duration::from_secs(1));
///
/// // Nonsense is refused, not clamped.
/// let err = RetryPolicy::builder().max_attempts(0).build().unwrap_err();
/// assert!(err.to_string().contains("max_attempts"), "{err}");
/// # Ok::<(), dirq::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    initial: Duration,
    factor: f64,
    max_delay: Duration,
    max_attempts: u32,
    jitter: f64,
}

impl Default for RetryPolicy {
    /// 1 s initial delay, doubling, at most 10 minutes, 5 attempts, ±20 % jitter.
    fn default() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(600),
            max_attempts: 5,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Starts a policy from the [defaults](RetryPolicy::default).
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            policy: RetryPolicy::default(),
        }
    }

    /// Attempts before a message is dead-lettered into `errors/`.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay after the `attempts`-th attempt failed, before jitter.
    pub fn delay(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(1000) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.powi(exponent);
        Duration::try_from_secs_f64(secs)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// The delay with jitter applied; `unit` is a random number in `[0, 1)`.
    pub(crate) fn jittered(&self, attempts: u32, unit: f64) -> Duration {
        let base = self.delay(attempts).as_secs_f64();
        let spread = base * self.jitter * (2.0 * unit - 1.0);
        Duration::try_from_secs_f64((base + spread).max(0.0))
            .unwrap_or(Duration::ZERO)
            .min(self.max_delay)
    }
}

/// Configures a [`RetryPolicy`]; every setting is checked by [`build`](Self::build).
#[derive(Debug, Clone)]
pub struct RetryPolicyBuilder {
    policy: RetryPolicy,
}

impl RetryPolicyBuilder {
    /// Delay before the first retry. Default: 1 s.
    pub fn initial(&mut self, delay: Duration) -> &mut Self {
        self.policy.initial = delay;
        self
    }

    /// Growth of the delay per attempt; a finite number of at least 1. Default: 2.
    pub fn factor(&mut self, factor: f64) -> &mut Self {
        self.policy.factor = factor;
        self
    }

    /// Longest delay; at least the initial delay. Default: 10 minutes.
    pub fn max_delay(&mut self, delay: Duration) -> &mut Self {
        self.policy.max_delay = delay;
        self
    }

    /// Attempts before a message is dead-lettered into `errors/`; at least 1.
    /// Default: 5.
    pub fn max_attempts(&mut self, attempts: u32) -> &mut Self {
        self.policy.max_attempts = attempts;
        self
    }

    /// Random spread of each delay, as a fraction from 0 to 1. Default: 0.2.
    pub fn jitter(&mut self, jitter: f64) -> &mut Self {
        self.policy.jitter = jitter;
        self
    }

    /// Checks the settings and makes the policy.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the field: `max_attempts` of 0, a `factor` below 1 or
    /// not finite, a `jitter` outside 0 to 1, or a `max_delay` below `initial`.
    pub fn build(&self) -> Result<RetryPolicy> {
        let p = self.policy;
        let bad = |field, reason: String| Err(Error::config("retry policy", field, reason));
        if p.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1".to_owned());
        }
        if !(p.factor.is_finite() && p.factor >= 1.0) {
            return bad(
                "factor",
                format!("must be a number of at least 1, not {}", p.factor),
            );
        }
        if !(0.0..=1.0).contains(&p.jitter) {
            return bad("jitter", format!("must be from 0 to 1, not {}", p.jitter));
        }
        if p.max_delay < p.initial {
            return bad(
                "max_delay",
                format!(
                    "{:?} is shorter than the initial delay {:?}",
                    p.max_delay, p.initial
                ),
            );
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(1), Duration::from_secs(1));
        assert_eq!(policy.delay(2), Duration::from_secs(2));
        assert_eq!(policy.delay(4), Duration::from_secs(8));
        assert_eq!(policy.delay(30), Duration::from_secs(600));
        assert_eq!(policy.delay(u32::MAX), Duration::from_secs(600));
        for unit in [0.0, 0.5, 0.999] {
            let d = policy.jittered(3, unit).as_secs_f64();
            assert!((3.2..=4.8).contains(&d), "{d}");
        }
        assert!(policy.jittered(40, 0.999) <= Duration::from_secs(600));
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let field = |b: &RetryPolicyBuilder| match b.build() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(
            field(RetryPolicy::builder().max_attempts(0)),
            "max_attempts"
        );
        assert_eq!(field(RetryPolicy::builder().factor(0.5)), "factor");
        assert_eq!(field(RetryPolicy::builder().factor(f64::NAN)), "factor");
        assert_eq!(field(RetryPolicy::builder().jitter(1.5)), "jitter");
        assert_eq!(
            field(
                RetryPolicy::builder()
                    .initial(Duration::from_secs(5))
                    .max_delay(Duration::from_secs(1))
            ),
            "max_delay"
        );
        assert_eq!(
            RetryPolicy::builder().build().unwrap(),
            RetryPolicy::default()
        );
    }
}
