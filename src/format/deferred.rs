//! Names in `deferred/`: `<not-before>@<id>`.
//!
//! `<not-before>` is the due time as `SSSSSSSSSS.NNNNNNNNN` (seconds and nanoseconds
//! since the epoch, fixed width). The time is in the name so that finding what is due
//! takes one directory read and no `stat`, an operator sees it with `ls`, and it needs
//! no extended attributes.

use std::ffi::{OsStr, OsString};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::id::MessageId;

/// Length of the `SSSSSSSSSS.NNNNNNNNN` prefix.
const TIME_LEN: usize = 20;
const SEPARATOR: u8 = b'@';

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
}
