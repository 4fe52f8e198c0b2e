//! The failure sidecar `errors/<id>.meta`: why a message is in `errors/`.

use std::ffi::{OsStr, OsString};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::id::META_SUFFIX;
use super::state::State;

/// What the failure sidecar `errors/<id>.meta` says about a failed message.
///
/// dirq writes every field. Sidecars written by Mentat (whose daemons may write any
/// JSON object, or none) are read leniently: missing fields are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FailureInfo {
    /// Why the message failed, e.g. `"timeout"` or `"symbolic link in incoming/"`.
    #[serde(default)]
    pub reason: Option<String>,
    /// When it failed, RFC 3339 in UTC (`2026-11-22T07:52:00.123456Z`).
    #[serde(default)]
    pub time: Option<String>,
    /// Host of the process that failed it.
    #[serde(default)]
    pub host: Option<String>,
    /// Process that failed it.
    #[serde(default)]
    pub pid: Option<u32>,
    /// How many times the message had been claimed, this claim included (0 for entries
    /// quarantined before any claim).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// State directory the message was moved from (`pending`, or `incoming` for
    /// quarantined entries).
    #[serde(default)]
    pub from: Option<String>,
    /// Exit code of the command that failed it (`dirq exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The end of that command's standard error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
}

/// Details of a failure beyond its reason, kept in the sidecar; see
/// [`Message::fail_with`](crate::Message::fail_with).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailureDetails {
    /// Exit code of a command that failed.
    pub exit_code: Option<i32>,
    /// The end of its standard error.
    pub stderr: Option<String>,
}

impl FailureDetails {
    /// Details with an exit code and the end of standard error.
    pub fn new(exit_code: Option<i32>, stderr: Option<String>) -> FailureDetails {
        FailureDetails { exit_code, stderr }
    }
}

impl FailureInfo {
    /// A sidecar for a failure happening now in this process.
    pub(crate) fn now(reason: String, attempts: u32, from: State) -> FailureInfo {
        FailureInfo {
            reason: Some(reason),
            time: Some(rfc3339(SystemTime::now())),
            host: Some(crate::sys::hostname()),
            pid: Some(crate::sys::pid()),
            attempts: Some(attempts),
            from: Some(from.as_str().to_owned()),
            exit_code: None,
            stderr: None,
        }
    }

    /// Adds `details` to the sidecar.
    pub(crate) fn with(mut self, details: FailureDetails) -> FailureInfo {
        self.exit_code = details.exit_code;
        self.stderr = details.stderr;
        self
    }
}

/// The sidecar's file name for the entry `name` in `errors/`: `<name>.meta`, or, when
/// that would exceed 255 bytes, a prefix of the name plus a hash of all of it, so that a
/// reader can always compute it from the id.
pub(crate) fn sidecar_name(name: &OsStr) -> OsString {
    let bytes = name.as_encoded_bytes();
    if bytes.len() + META_SUFFIX.len() <= 255 {
        let mut out = name.to_os_string();
        out.push(META_SUFFIX);
        return out;
    }
    // FNV-1a: stable across Rust versions, unlike std's hashers.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let prefix = String::from_utf8_lossy(&bytes[..200]).replace('\u{fffd}', "_");
    OsString::from(format!("{prefix}.{hash:016x}{META_SUFFIX}"))
}

/// Formats a time as RFC 3339 in UTC with microseconds.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_763_797_920_123_456);
        assert_eq!(rfc3339(t), "2025-11-22T07:52:00.123456Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
    }

    #[test]
    fn sidecar_names_stay_within_255_bytes() {
        assert_eq!(sidecar_name(OsStr::new("a.msg")), OsStr::new("a.msg.meta"));
        let long = "x".repeat(255);
        let name = sidecar_name(OsStr::new(&long));
        assert!(name.len() <= 255, "{}", name.len());
        assert_eq!(name, sidecar_name(OsStr::new(&long)));
        assert_ne!(name, sidecar_name(OsStr::new(&"y".repeat(255))));
    }

    #[test]
    fn mentat_style_sidecars_parse_leniently() {
        let info: FailureInfo = serde_json::from_str(r#"{"reason": "bad", "extra": 1}"#).unwrap();
        assert_eq!(info.reason.as_deref(), Some("bad"));
        assert_eq!(info.pid, None);
    }
}
