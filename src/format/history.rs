//! The history journal `history/`: one JSON line per outcome, and the names of its
//! files. Pure: it reads no directory (the writer is `piper::history`, the reader
//! `admin::history`).
//!
//! ```text
//! ROOT/history/
//!   current.jsonl               appended to by every Piper of the queue
//!   20261130T210952.123Z.jsonl  rotated files, named by the time of their first line
//!   .lock                       taken (flock) by the process that rotates
//!   logs/<id>.log               job logs (dirq exec --log-output)
//! ```

use std::ffi::OsStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The directory under a queue root that holds the history. Not a state: no message
/// is ever in it.
pub(crate) const HISTORY_DIR: &str = "history";
/// The file Pipers append to.
pub(crate) const CURRENT: &str = "current.jsonl";
/// The lock file taken by the process that rotates.
pub(crate) const LOCK: &str = ".lock";
/// The directory of job logs, inside [`HISTORY_DIR`].
pub(crate) const LOGS_DIR: &str = "logs";
/// The suffix of history files.
pub(crate) const SUFFIX: &str = ".jsonl";
/// The suffix of job logs.
pub(crate) const LOG_SUFFIX: &str = ".log";

/// What became of a message, as the history records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HistoryOutcome {
    /// Deleted after processing ([`Outcome::Commit`](crate::piper::Outcome::Commit)).
    Committed,
    /// Passed on unchanged to one or more outputs.
    Forwarded,
    /// Replaced by emitted messages (the original deleted).
    Emitted,
    /// Moved to `errors/` by a failure of its stage.
    Failed,
    /// Moved to `errors/` after its last attempt (retries exhausted, or a message
    /// whose earlier attempts killed their process).
    DeadLettered,
    /// Moved to `errors/` with reason `timeout`.
    TimedOut,
    /// Deferred for another attempt.
    Retried,
    /// Put back into `incoming/` unprocessed (at shutdown, or because its outcome
    /// could not be carried out).
    Released,
    /// Put back into `incoming/` because the stage cannot work
    /// ([`Outcome::Stop`](crate::piper::Outcome::Stop)).
    Stopped,
    /// Moved to `errors/` by an operator's cancel while it ran (`dirq cancel`; with
    /// `--requeue` the line says `released`).
    Cancelled,
}

impl HistoryOutcome {
    /// Every outcome, in the order of the documentation.
    pub const ALL: [HistoryOutcome; 10] = [
        HistoryOutcome::Committed,
        HistoryOutcome::Forwarded,
        HistoryOutcome::Emitted,
        HistoryOutcome::Failed,
        HistoryOutcome::DeadLettered,
        HistoryOutcome::TimedOut,
        HistoryOutcome::Retried,
        HistoryOutcome::Released,
        HistoryOutcome::Stopped,
        HistoryOutcome::Cancelled,
    ];

    /// The name in a history line: `committed`, `dead_lettered`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryOutcome::Committed => "committed",
            HistoryOutcome::Forwarded => "forwarded",
            HistoryOutcome::Emitted => "emitted",
            HistoryOutcome::Failed => "failed",
            HistoryOutcome::DeadLettered => "dead_lettered",
            HistoryOutcome::TimedOut => "timed_out",
            HistoryOutcome::Retried => "retried",
            HistoryOutcome::Released => "released",
            HistoryOutcome::Stopped => "stopped",
            HistoryOutcome::Cancelled => "cancelled",
        }
    }

    /// The outcome named `name` (as [`as_str`](Self::as_str) spells it; `-` for `_`
    /// accepted).
    pub fn from_name(name: &str) -> Option<HistoryOutcome> {
        let name = name.replace('-', "_");
        Self::ALL.into_iter().find(|o| o.as_str() == name)
    }

    /// Whether the message was done with successfully (committed, forwarded, emitted).
    pub fn is_ok(self) -> bool {
        matches!(
            self,
            HistoryOutcome::Committed | HistoryOutcome::Forwarded | HistoryOutcome::Emitted
        )
    }

    /// Whether the message went to `errors/` (failed, dead-lettered, timed out).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            HistoryOutcome::Failed | HistoryOutcome::DeadLettered | HistoryOutcome::TimedOut
        )
    }
}

impl std::fmt::Display for HistoryOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of a queue's history: the outcome of one processing of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HistoryRecord {
    /// The message's id.
    pub id: String,
    /// What became of it.
    pub outcome: HistoryOutcome,
    /// When, RFC 3339 in UTC (`2026-11-30T21:09:52.123456Z`).
    pub time: String,
    /// Its attempt count, this attempt included (1 for the first).
    pub attempts: u32,
    /// How long its stage ran, in milliseconds.
    pub duration_ms: u64,
    /// Why it failed, was retried, released or stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The exit code of its command (`dirq exec`), when it failed with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The name of the Piper that processed it.
    pub piper: String,
    /// The process id of that Piper.
    pub pid: u32,
    /// Its host.
    #[serde(default)]
    pub host: String,
}

impl HistoryRecord {
    /// A record of `outcome` for `id`, now, in this process.
    #[cfg(test)]
    fn now(id: String, outcome: HistoryOutcome, piper: &str, host: &str) -> HistoryRecord {
        HistoryRecord {
            id,
            outcome,
            time: super::meta::rfc3339(SystemTime::now()),
            attempts: 1,
            duration_ms: 0,
            reason: None,
            exit_code: None,
            piper: piper.to_owned(),
            pid: crate::sys::pid(),
            host: host.to_owned(),
        }
    }

    #[cfg(test)]
    fn append_line(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(&mut *out, self).unwrap();
        out.push(b'\n');
    }

    /// The record of one complete line (without its `\n`); `None` when it is not one.
    pub(crate) fn parse(line: &[u8]) -> Option<HistoryRecord> {
        serde_json::from_slice(line).ok()
    }

    /// When it happened; `None` when [`time`](Self::time) is not RFC 3339 UTC.
    pub fn when(&self) -> Option<SystemTime> {
        parse_rfc3339(&self.time)
    }
}

/// A [`HistoryRecord`] borrowed from its writer: the same line, without copying the
/// strings a Piper keeps for every line (its name, its host).
#[derive(Debug, Serialize)]
pub(crate) struct RecordRef<'a> {
    pub(crate) id: &'a str,
    pub(crate) outcome: HistoryOutcome,
    pub(crate) time: &'a str,
    pub(crate) attempts: u32,
    pub(crate) duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exit_code: Option<i32>,
    pub(crate) piper: &'a str,
    pub(crate) pid: u32,
    pub(crate) host: &'a str,
}

impl RecordRef<'_> {
    /// Appends the record's line, `\n` included, to `out`; nothing if it cannot be
    /// serialised (it always can: strings and numbers only).
    pub(crate) fn append_line(&self, out: &mut Vec<u8>) {
        let start = out.len();
        if serde_json::to_writer(&mut *out, self).is_ok() {
            out.push(b'\n');
        } else {
            out.truncate(start);
        }
    }
}

/// Parses an RFC 3339 time in UTC (`Z`), as [`rfc3339`](super::meta::rfc3339) writes
/// it; fractions of any length.
pub(crate) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !text.ends_with('Z') {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<u64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let fraction = &text[19..text.len() - 1];
    let nanos = match fraction.strip_prefix('.') {
        Some(digits) if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) => {
            let mut padded = digits.chars().take(9).collect::<String>();
            while padded.len() < 9 {
                padded.push('0');
            }
            padded.parse::<u32>().ok()?
        }
        None if fraction.is_empty() => 0,
        _ => return None,
    };
    let days = days_from_civil(year, month, day)?;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: u64, month: u64, day: u64) -> Option<u64> {
    let y = if month <= 2 {
        year.checked_sub(1)?
    } else {
        year
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

/// The name of a rotated file whose first line was written at `first`:
/// `20261130T210952.123Z.jsonl`, which sorts by time.
pub(crate) fn rotated_name(first: SystemTime) -> String {
    let text = super::meta::rfc3339(first); // 2026-11-30T21:09:52.123456Z
    let compact: String = text[..23]
        .chars()
        .filter(|&c| c != '-' && c != ':')
        .collect();
    format!("{compact}Z{SUFFIX}")
}

/// The time in a rotated file's name (see [`rotated_name`]); `None` for any other name
/// (`current.jsonl` included).
pub(crate) fn rotated_time(name: &OsStr) -> Option<SystemTime> {
    let name = name.to_str()?;
    let stem = name.strip_suffix(SUFFIX)?;
    // A suffix `-N` tells apart two rotations in the same millisecond.
    let stem = stem.split_once('-').map_or(stem, |(s, _)| s);
    let b = stem.as_bytes();
    if b.len() != 20 || b[8] != b'T' || b[15] != b'.' || b[19] != b'Z' {
        return None;
    }
    parse_rfc3339(&format!(
        "{}-{}-{}T{}:{}:{}.{}Z",
        &stem[0..4],
        &stem[4..6],
        &stem[6..8],
        &stem[9..11],
        &stem[11..13],
        &stem[13..15],
        &stem[16..19]
    ))
}

/// The job log's file name for message `id`: `<id>.log`.
pub(crate) fn log_name(id: &OsStr) -> std::ffi::OsString {
    let mut name = id.to_os_string();
    name.push(LOG_SUFFIX);
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::meta::rfc3339;

    #[test]
    fn times_round_trip() {
        let t = UNIX_EPOCH + Duration::from_micros(1_796_112_000_123_456);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:01Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1))
        );
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2026-12-01T00:00:00+01:00"), None);
        let name = rotated_name(t);
        assert!(name.ends_with("Z.jsonl"), "{name}");
        let back = rotated_time(OsStr::new(&name)).expect("a rotated name");
        assert_eq!(
            back.duration_since(UNIX_EPOCH).unwrap().as_millis(),
            t.duration_since(UNIX_EPOCH).unwrap().as_millis()
        );
        assert_eq!(rotated_time(OsStr::new(CURRENT)), None);
    }

    #[test]
    fn borrowed_records_write_the_same_line() {
        let mut owned = HistoryRecord::now("a.msg".into(), HistoryOutcome::Failed, "p", "h");
        owned.exit_code = Some(2);
        let borrowed = RecordRef {
            id: &owned.id,
            outcome: owned.outcome,
            time: &owned.time,
            attempts: owned.attempts,
            duration_ms: owned.duration_ms,
            reason: owned.reason.as_deref(),
            exit_code: owned.exit_code,
            piper: &owned.piper,
            pid: owned.pid,
            host: &owned.host,
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        owned.append_line(&mut a);
        borrowed.append_line(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn lines_round_trip_and_fragments_do_not_parse() {
        let mut record = HistoryRecord::now("a.msg".into(), HistoryOutcome::DeadLettered, "p", "h");
        record.reason = Some("exit 3".into());
        let mut line = Vec::new();
        record.append_line(&mut line);
        assert_eq!(line.last(), Some(&b'\n'));
        assert!(String::from_utf8_lossy(&line).contains("\"outcome\":\"dead_lettered\""));
        assert_eq!(
            HistoryRecord::parse(&line[..line.len() - 1]),
            Some(record.clone())
        );
        assert_eq!(HistoryRecord::parse(&line[..line.len() / 2]), None);
        assert_eq!(
            HistoryOutcome::from_name("dead-lettered"),
            Some(HistoryOutcome::DeadLettered)
        );
    }
}
