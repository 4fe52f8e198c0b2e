//! The names inside `seen/`: the record of recently finished message ids that
//! idempotent enqueues consult (see docs/protocol.md, "seen/ and idempotent enqueue").
//!
//! ```text
//! seen/.ttl            how long finished ids are remembered, in seconds ("3600\n");
//!                      missing: nothing is remembered
//! seen/.lock-NN        lock files: enqueue_with_id calls whose ids hash to NN take turns
//! seen/<end>/<id>      an empty record file: <id> finished before <end> (Unix seconds)
//!                      and at or after <end> minus the bucket width
//! ```
//!
//! A bucket expires as a whole once its end is more than the time to live ago, so
//! expired records are removed without reading a single record's time. Pure: nothing
//! here touches the disk.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::id::MessageId;

/// The directory name under the queue root.
pub(crate) const SEEN_DIR: &str = "seen";

/// The file in `seen/` that holds the time to live.
pub(crate) const TTL_FILE: &str = ".ttl";

/// How many lock files `enqueue_with_id` spreads its ids over. Two ids that share one
/// only wait for each other's check, a few system calls.
pub(crate) const LOCK_SHARDS: u32 = 64;

/// How many buckets one time to live spans: a lookup reads at most one more than this.
const BUCKETS_PER_TTL: u64 = 8;

/// The lock file for `id`'s enqueues: `.lock-NN`, chosen by a hash of the id that is
/// the same in every process and every build (FNV-1a, not std's randomised hasher).
pub(crate) fn lock_name(id: &MessageId) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for &byte in id.as_os_str().as_encoded_bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!(".lock-{:02}", hash % LOCK_SHARDS)
}

/// The width of one bucket for `ttl`, in whole seconds (at least 1).
pub(crate) fn bucket_width(ttl: Duration) -> u64 {
    ttl.as_secs().div_ceil(BUCKETS_PER_TTL).max(1)
}

/// The end of the bucket that a record made at `now` goes in: the first multiple of the
/// width after `now`.
pub(crate) fn bucket_end(now: SystemTime, ttl: Duration) -> u64 {
    let width = bucket_width(ttl);
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    (secs / width + 1) * width
}

/// The end of the bucket named `name`, if it is a bucket's name (decimal digits).
pub(crate) fn parse_bucket(name: &OsStr) -> Option<u64> {
    let bytes = name.as_encoded_bytes();
    if bytes.is_empty() || bytes.len() > 20 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Whether the bucket ending at `end` holds only records older than `ttl` at `now`.
pub(crate) fn is_expired(end: u64, ttl: Duration, now: SystemTime) -> bool {
    let end = UNIX_EPOCH + Duration::from_secs(end);
    now.duration_since(end).is_ok_and(|age| age >= ttl)
}

/// The content of [`TTL_FILE`].
pub(crate) fn format_ttl(ttl: Duration) -> String {
    format!("{}\n", ttl.as_secs())
}

/// The time to live in [`TTL_FILE`]'s content; `None` when it is not a number of
/// seconds or is zero.
pub(crate) fn parse_ttl(text: &[u8]) -> Option<Duration> {
    let secs: u64 = std::str::from_utf8(text).ok()?.trim().parse().ok()?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_are_stable_and_spread() {
        let id = MessageId::new("order-17").unwrap();
        assert_eq!(lock_name(&id), lock_name(&id.clone()));
        let names: std::collections::HashSet<String> = (0..1000)
            .map(|n| lock_name(&MessageId::new(format!("m{n}")).unwrap()))
            .collect();
        assert_eq!(names.len(), LOCK_SHARDS as usize);
        assert!(names
            .iter()
            .all(|n| n.starts_with(".lock-") && n.len() == 8));
    }

    #[test]
    fn a_record_stays_at_least_the_ttl_and_at_most_one_bucket_more() {
        let ttl = Duration::from_secs(80);
        assert_eq!(bucket_width(ttl), 10);
        let made = UNIX_EPOCH + Duration::from_secs(1_000_005);
        let end = bucket_end(made, ttl);
        assert_eq!(end, 1_000_010);
        assert!(!is_expired(end, ttl, made + ttl));
        assert!(is_expired(end, ttl, made + ttl + Duration::from_secs(5)));
        assert_eq!(bucket_width(Duration::from_secs(1)), 1);
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_bucket(OsStr::new("1000010")), Some(1_000_010));
        assert_eq!(parse_bucket(OsStr::new(".lock-01")), None);
        assert_eq!(parse_bucket(OsStr::new("")), None);
        assert_eq!(
            parse_ttl(format_ttl(Duration::from_secs(3600)).as_bytes()),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_ttl(b"0\n"), None);
        assert_eq!(parse_ttl(b"soon"), None);
    }
}
