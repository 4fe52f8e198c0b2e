//! Deferred delivery: messages that wait in `deferred/` until a time, for a retry's
//! backoff or a delayed enqueue.
//!
//! A deferred message is named `<not-before>@<id>`, where `<not-before>` is the due time
//! as `SSSSSSSSSS.NNNNNNNNN` (seconds and nanoseconds since the epoch, fixed width). The
//! time is in the name so that finding what is due takes one directory read and no
//! `stat`, an operator sees it with `ls`, and it needs no extended attributes.

use std::ffi::{OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Operation, Result};
use crate::queue::Inner;
use crate::scan::DirStamp;
use crate::{MessageId, State};

/// Length of the `SSSSSSSSSS.NNNNNNNNN` prefix.
const TIME_LEN: usize = 20;
const SEPARATOR: u8 = b'@';

/// How a message that asks to be retried is retried.
///
/// The delay before attempt `n + 1` is `initial * factor^(n - 1)`, capped at
/// `max_delay`, then moved by up to `jitter` (a fraction) either way so that messages
/// that failed together do not come back together. After `max_attempts` attempts the
/// message goes to `errors/` with its last reason (a dead letter).
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
    /// Delay before the first retry. Default: 1 s.
    pub fn initial(mut self, delay: Duration) -> RetryPolicy {
        self.initial = delay;
        self
    }

    /// Growth of the delay per attempt (at least 1). Default: 2.
    pub fn factor(mut self, factor: f64) -> RetryPolicy {
        self.factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            1.0
        };
        self
    }

    /// Longest delay. Default: 10 minutes.
    pub fn max_delay(mut self, delay: Duration) -> RetryPolicy {
        self.max_delay = delay;
        self
    }

    /// Attempts before a message is dead-lettered into `errors/` (at least 1).
    /// Default: 5.
    pub fn max_attempts(mut self, attempts: u32) -> RetryPolicy {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Random spread of each delay, as a fraction (0 to 1). Default: 0.2.
    pub fn jitter(mut self, jitter: f64) -> RetryPolicy {
        self.jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Attempts before a message is dead-lettered.
    pub fn attempts_allowed(&self) -> u32 {
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

/// The name of a message deferred until `not_before` in `deferred/`.
pub(crate) fn deferred_name(id: &MessageId, not_before: SystemTime) -> OsString {
    let since = not_before
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let mut name = OsString::from(format!(
        "{:010}.{:09}@",
        since.as_secs().min(9_999_999_999),
        since.subsec_nanos()
    ));
    name.push(id.as_os_str());
    name
}

/// Splits a name in `deferred/` into its due time and id.
pub(crate) fn parse_deferred_name(name: &OsStr) -> Option<(SystemTime, MessageId)> {
    let bytes = name.as_encoded_bytes();
    if bytes.len() <= TIME_LEN + 1 || bytes[TIME_LEN] != SEPARATOR || bytes[10] != b'.' {
        return None;
    }
    let number = |digits: &[u8]| -> Option<u64> { std::str::from_utf8(digits).ok()?.parse().ok() };
    let secs = number(&bytes[..10])?;
    let nanos = number(&bytes[11..TIME_LEN])?;
    let id = name
        .to_str()
        .map(|s| &s[TIME_LEN + 1..])
        .map(OsStr::new)
        .or_else(|| {
            // Not UTF-8: split the raw name (the prefix is ASCII, so this is a boundary).
            split_os_str(name, TIME_LEN + 1)
        })?;
    let when = UNIX_EPOCH + Duration::new(secs, u32::try_from(nanos).ok()?);
    Some((when, MessageId::from_name(id)))
}

#[cfg(unix)]
fn split_os_str(name: &OsStr, at: usize) -> Option<&OsStr> {
    use std::os::unix::ffi::OsStrExt;
    Some(OsStr::from_bytes(&name.as_bytes()[at..]))
}

#[cfg(not(unix))]
fn split_os_str(_name: &OsStr, _at: usize) -> Option<&OsStr> {
    None
}

/// When `deferred/` next needs a look, as remembered by one queue handle.
#[derive(Debug, Default)]
pub(crate) struct DeferredClock {
    /// The earliest due time seen at the last look; `None` when nothing was waiting.
    next_due: Option<SystemTime>,
    /// `deferred/` as it was at the last look; a change means new entries.
    stamp: Option<DirStamp>,
    looked: bool,
}

impl DeferredClock {
    /// The earliest due time known, for a claimer deciding how long to sleep.
    pub(crate) fn next_due(&self) -> Option<SystemTime> {
        self.next_due
    }
}

/// Moves every due message from `deferred/` to `incoming/`, if `deferred/` changed or
/// something fell due since the last look. Returns how many moved.
///
/// Several processes may do this at once: each rename happens once, the others find
/// the name gone.
pub(crate) fn promote_due(
    inner: &Inner,
    clock: &mut DeferredClock,
    buf: &mut Vec<MaybeUninit<u8>>,
) -> Result<usize> {
    let Some(deferred) = inner.state_dir(State::Deferred) else {
        return Ok(0);
    };
    let now = SystemTime::now();
    let stamp = if inner.family.is_local() {
        deferred.dir.stat().ok().map(|st| DirStamp::of(&st))
    } else {
        None
    };
    let due = clock.next_due.is_some_and(|t| t <= now);
    if clock.looked && !due && stamp.is_some() && stamp == clock.stamp {
        return Ok(0);
    }
    let mut waiting = Vec::new();
    deferred
        .dir
        .scan(buf, |entry| waiting.push(entry.name.to_os_string()))
        .map_err(|e| Error::io(Operation::Scan, &deferred.path, e))?;
    let incoming = inner.dir(State::Incoming);
    let mut next_due = None;
    let mut moved = 0;
    for name in waiting {
        let Some((when, id)) = parse_deferred_name(&name) else {
            continue; // not ours; `dirq check` reports it
        };
        if when > now {
            next_due = Some(next_due.map_or(when, |n: SystemTime| n.min(when)));
            continue;
        }
        match deferred
            .dir
            .rename_noreplace(&name, &incoming.dir, id.as_os_str())
        {
            Ok(()) => moved += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                tracing::warn!(id = %id, "cannot deliver deferred message: incoming/ has a message with the same id");
            }
            Err(e) => {
                return Err(Error::moving(
                    Operation::Release,
                    deferred.join(&name),
                    incoming.join(id.as_os_str()),
                    e,
                ))
            }
        }
    }
    if moved > 0 {
        inner.syncer.changed(&[deferred, incoming])?;
        tracing::debug!(moved, "deferred messages fell due");
    }
    // Only a stamp old enough to be trusted lets the next look be skipped.
    clock.stamp = stamp.filter(DirStamp::settled);
    clock.next_due = next_due;
    clock.looked = true;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_names_round_trip() {
        let id = MessageId::generate();
        let when = UNIX_EPOCH + Duration::new(1_763_797_980, 123_456_789);
        let name = deferred_name(&id, when);
        assert!(name.to_str().unwrap().starts_with("1763797980.123456789@"));
        assert_eq!(parse_deferred_name(&name), Some((when, id)));
        assert_eq!(parse_deferred_name(OsStr::new("garbage")), None);
        assert_eq!(
            parse_deferred_name(OsStr::new("1763797980.123456789@")),
            None
        );
    }

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
        assert_eq!(RetryPolicy::default().max_attempts(0).attempts_allowed(), 1);
    }
}
