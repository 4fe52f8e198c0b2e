//! Message ids: file names in the queue, ordered by creation time.

use std::cmp::Ordering;
use std::ffi::{OsStr, OsString};
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest id. File names may be 255 bytes, but a message also needs room for the
/// names derived from its id: `deferred/<not-before>@<id>` (21 bytes more) and
/// `errors/<id>~N.meta` (up to 9 more).
pub(crate) const MAX_LEN: usize = 200;

/// Suffix of the failure sidecar `errors/<id>.meta`; reserved, so no id may end with it.
pub(crate) const META_SUFFIX: &str = ".meta";

/// The id of a message: its file name, the same in every state directory and in every
/// queue of a pipeline, so that it can serve as an idempotency key.
///
/// Ids that dirq generates look like `1763797920.123456789.myhost.4242.9f3a1c2b.msg`:
/// creation time (seconds and nanoseconds, fixed width), host, process id, a random
/// tag, and Mentat's `.msg` suffix. They are unique across hosts and processes and
/// strictly increasing within a process.
///
/// Any other valid file name found in a queue (Mentat's `host.pid.sec.usec.dev.ino.msg`,
/// or anything a foreign producer chose) is a valid id too.
///
/// # Ordering
///
/// `Ord` is FIFO order: first by the creation time encoded in the name (dirq's and
/// Mentat's formats are recognised), then by the bytes of the name. Names without a
/// recognisable time sort before all timed names, in byte order, so that they cannot be
/// starved by a steady stream of new timed messages.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MessageId {
    /// Creation time in nanoseconds since the epoch parsed from `name`; 0 when unknown.
    /// Derived from `name`, so comparing both fields is consistent with comparing names.
    time_ns: u64,
    name: Box<OsStr>,
}

impl MessageId {
    /// Checks that `id` can name a message and wraps it.
    ///
    /// # Errors
    ///
    /// [`InvalidId`] when `id` is empty, longer than 200 bytes, contains `/` or
    /// NUL, starts with `.` (which also rules out `.` and `..`), or ends with `.meta`
    /// (reserved for failure sidecars).
    pub fn new(id: impl AsRef<OsStr>) -> Result<MessageId, InvalidId> {
        let id = id.as_ref();
        if let Err(reason) = check(id.as_encoded_bytes()) {
            return Err(InvalidId {
                id: id.to_string_lossy().into_owned(),
                reason,
            });
        }
        Ok(MessageId::from_name(id))
    }

    /// Wraps a name found in a queue directory, without the API's checks.
    pub(crate) fn from_name(name: &OsStr) -> MessageId {
        MessageId {
            time_ns: parse_time_ns(name.as_encoded_bytes()),
            name: name.into(),
        }
    }

    /// Generates a new id for a message created now by this process.
    pub fn generate() -> MessageId {
        let ns = next_timestamp_ns();
        let (secs, nanos) = (ns / 1_000_000_000, ns % 1_000_000_000);
        let name = format!(
            "{secs:010}.{nanos:09}.{}.{}.{:08x}.msg",
            host_label(),
            crate::sys::pid(),
            process_tag()
        );
        MessageId {
            time_ns: ns,
            name: OsString::from(name).into_boxed_os_str(),
        }
    }

    /// The id as a file name.
    pub fn as_os_str(&self) -> &OsStr {
        &self.name
    }

    /// The id as UTF-8, if it is valid UTF-8.
    pub fn to_str(&self) -> Option<&str> {
        self.name.to_str()
    }

    /// The creation time encoded in the id, for ids in dirq's or Mentat's format.
    pub fn timestamp(&self) -> Option<SystemTime> {
        (self.time_ns != 0).then(|| UNIX_EPOCH + Duration::from_nanos(self.time_ns))
    }

    /// The first part of an id's sort key: the creation time its name encodes
    /// (nanoseconds since the epoch), or 0 for names without a recognisable time.
    pub(crate) fn time_of(name: &[u8]) -> u64 {
        parse_time_ns(name)
    }

    /// Wraps a name found in a queue directory whose [`MessageId::time_of`] is known.
    pub(crate) fn with_time(name: OsString, time_ns: u64) -> MessageId {
        debug_assert_eq!(time_ns, parse_time_ns(name.as_encoded_bytes()));
        MessageId {
            time_ns,
            name: name.into_boxed_os_str(),
        }
    }

    /// Whether a name found in a queue directory is a message at all: names starting
    /// with `.` are files in progress (rsync and editors write those), never messages.
    pub(crate) fn is_hidden(name: &[u8]) -> bool {
        name.first() == Some(&b'.')
    }
}

/// Why `name` cannot be a message id, if it cannot.
pub(crate) fn check(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("message id must not be empty")
    } else if name.len() > MAX_LEN {
        Err("message id must be at most 200 bytes long (deferred and failed messages add to the name)")
    } else if name.contains(&b'/') {
        Err("message id must not contain '/'")
    } else if name.contains(&0) {
        Err("message id must not contain NUL")
    } else if name[0] == b'.' {
        Err("message id must not start with '.'")
    } else if name.ends_with(META_SUFFIX.as_bytes()) {
        Err("message id must not end with '.meta', which names failure sidecars")
    } else {
        Ok(())
    }
}

impl Ord for MessageId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.time_ns.cmp(&other.time_ns).then_with(|| {
            self.name
                .as_encoded_bytes()
                .cmp(other.name.as_encoded_bytes())
        })
    }
}

impl PartialOrd for MessageId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Shows the id as text: control characters escaped (`\n`), bytes that are not UTF-8
/// as `\xNN`, so that one id always prints on one line.
impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.name.as_encoded_bytes().utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() || c == '\\' {
                    write!(f, "{}", c.escape_debug())?;
                } else {
                    f.write_char(c)?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// A string that cannot be a message id; see [`MessageId::new`].
///
/// Ids are checked before any path exists, so the id itself stands in for the path.
/// Converts into [`Error::InvalidId`](crate::Error::InvalidId) with `?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidId {
    id: String,
    reason: &'static str,
}

impl InvalidId {
    /// The rejected id, lossily converted to UTF-8.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What was expected, e.g. "message id must not contain '/'".
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid message id {:?}: {}", self.id, self.reason)
    }
}

impl std::error::Error for InvalidId {}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId(\"{self}\")")
    }
}

impl FromStr for MessageId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<MessageId, InvalidId> {
        MessageId::new(s)
    }
}

impl TryFrom<&str> for MessageId {
    type Error = InvalidId;

    fn try_from(s: &str) -> Result<MessageId, InvalidId> {
        MessageId::new(s)
    }
}

impl TryFrom<&OsStr> for MessageId {
    type Error = InvalidId;

    fn try_from(s: &OsStr) -> Result<MessageId, InvalidId> {
        MessageId::new(s)
    }
}

impl TryFrom<String> for MessageId {
    type Error = InvalidId;

    fn try_from(s: String) -> Result<MessageId, InvalidId> {
        MessageId::new(s)
    }
}

impl AsRef<OsStr> for MessageId {
    fn as_ref(&self) -> &OsStr {
        &self.name
    }
}

/// Parses the creation time out of dirq's `SSSSSSSSSS.NNNNNNNNN.` prefix or Mentat's
/// `host.pid.sec.usec.dev.ino.msg`. 0 when neither matches.
fn parse_time_ns(name: &[u8]) -> u64 {
    fn digits(s: &[u8]) -> Option<u64> {
        if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        s.iter().try_fold(0u64, |acc, &d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
    }
    fn combine(secs: u64, nanos: u64) -> Option<u64> {
        secs.checked_mul(1_000_000_000)?.checked_add(nanos)
    }
    // dirq: fixed-width seconds and nanoseconds first.
    if name.len() > 21 && name[10] == b'.' && name[20] == b'.' {
        if let (Some(secs), Some(nanos)) = (digits(&name[..10]), digits(&name[11..20])) {
            return combine(secs, nanos).unwrap_or(0);
        }
    }
    // Mentat: the fields counted from the end, because host names contain dots.
    let mut fields = name.rsplit(|&b| b == b'.');
    if let (Some(b"msg"), Some(ino), Some(dev), Some(usec), Some(secs), Some(pid), Some(_host)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) {
        let numeric = [ino, dev, pid].into_iter().all(|f| digits(f).is_some());
        if usec.len() == 6 && numeric {
            if let (Some(secs), Some(usec)) = (digits(secs), digits(usec)) {
                return combine(secs, usec * 1_000).unwrap_or(0);
            }
        }
    }
    0
}

/// Nanoseconds since the epoch, strictly increasing within this process even when the
/// wall clock stalls or steps back, so ids from one process are unique and ordered.
fn next_timestamp_ns() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut last = LAST.load(AtomicOrdering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(
            last,
            next,
            AtomicOrdering::Relaxed,
            AtomicOrdering::Relaxed,
        ) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// The short host name, reduced to `[A-Za-z0-9_-]` so that it never adds a dot or a
/// slash to an id.
fn host_label() -> &'static str {
    static LABEL: OnceLock<String> = OnceLock::new();
    LABEL.get_or_init(|| {
        let host = crate::sys::hostname();
        let short = host.split('.').next().unwrap_or_default();
        let label: String = short
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if label.is_empty() {
            "localhost".to_owned()
        } else {
            label
        }
    })
}

/// A random tag chosen once per process: it keeps ids unique when a pid is reused
/// while the clock has been stepped back.
fn process_tag() -> u32 {
    static TAG: OnceLock<u32> = OnceLock::new();
    *TAG.get_or_init(|| crate::sys::random::next() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_unique_and_increasing() {
        let ids: Vec<MessageId> = (0..1000).map(|_| MessageId::generate()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
        }
        for id in &ids {
            MessageId::new(id.as_os_str()).unwrap();
            assert!(id.to_str().unwrap().ends_with(".msg"));
        }
        let age = SystemTime::now()
            .duration_since(ids[0].timestamp().unwrap())
            .unwrap();
        assert!(age < Duration::from_secs(60));
    }

    #[test]
    fn bad_ids_are_rejected_with_a_reason() {
        for (bad, reason) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("..", "start with '.'"),
            (".hidden", "start with '.'"),
            ("a\0b", "NUL"),
            ("x.meta", ".meta"),
        ] {
            match MessageId::new(bad) {
                Err(e) => assert!(e.reason().contains(reason), "{e}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        // Room is left for `deferred/<time>@<id>` and `errors/<id>~N.meta`.
        assert!(MessageId::new("x".repeat(201)).is_err());
        assert!(MessageId::new("x".repeat(200)).is_ok());
    }

    #[test]
    fn mentat_ids_sort_by_their_time() {
        let older = MessageId::new("zeta.example.org.77.1700000000.000001.64769.5.msg").unwrap();
        let newer = MessageId::new("alpha.1.1700000001.000000.64769.9.msg").unwrap();
        assert!(older < newer);
        assert_eq!(
            older.timestamp().unwrap(),
            UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_001)
        );
    }

    #[test]
    fn untimed_names_come_first_in_byte_order() {
        let timed = MessageId::generate();
        let a = MessageId::new("fill.0000000002.msg").unwrap();
        let b = MessageId::new("fill.0000000010.msg").unwrap();
        assert!(a < b && b < timed);
        assert_eq!(a.timestamp(), None);
    }

    #[test]
    fn display_escapes_control_and_invalid_bytes() {
        let id = MessageId::from_name(OsStr::new("a\nb"));
        assert_eq!(id.to_string(), "a\\nb");
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let id = MessageId::from_name(OsStr::from_bytes(b"x\xffy"));
            assert_eq!(id.to_string(), "x\\xffy");
        }
    }
}
