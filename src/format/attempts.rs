//! The attempt counter: how many times a message has been claimed in one queue.
//!
//! The count lives in the extended attribute `user.dirq.attempts` of the message file,
//! so it travels with the inode through every rename and never puts anything but
//! messages into `incoming/` (Mentat readers see nothing). Its value is
//! `"<count> <dev>:<ino>"`, where `dev:ino` identifies the queue root that counted:
//! a message forwarded into another queue starts that queue's count from zero without
//! the forward having to touch the attribute, so a forward stays a bare rename.
//!
//! The count is written only when a claim ends without the message leaving the queue
//! (release, failure, recovery of a dead owner's message); a claim itself writes
//! nothing, and a message reads its count lazily.
//!
//! On filesystems without user extended attributes (some FUSE and NFS setups) the
//! count is not persisted: every claim reports attempt 1. This is documented in the
//! crate's known problems.

use std::fs::File;
use std::io;

const ATTRIBUTE: &str = "user.dirq.attempts";

/// Identity of the queue that counts, `(st_dev, st_ino)` of its root directory.
pub(crate) type QueueIdentity = (u64, u64);

/// Claims of `file` completed so far in the queue `identity`.
pub(crate) fn read(file: &File, identity: QueueIdentity) -> io::Result<u32> {
    let Some(value) = crate::sys::get_xattr(file, ATTRIBUTE)? else {
        return Ok(0);
    };
    Ok(parse(&value, identity).unwrap_or(0))
}

/// Records that `count` claims of `file` have completed in the queue `identity`.
/// Returns `false` when the filesystem cannot store the count.
pub(crate) fn write(file: &File, identity: QueueIdentity, count: u32) -> io::Result<bool> {
    crate::sys::set_xattr(file, ATTRIBUTE, format(identity, count).as_bytes())
}

const REASON: &str = "user.dirq.reason";

/// Stores why the last attempt failed, for the dead letter of a message whose later
/// attempts end in a crash. Returns `false` when the filesystem cannot store it.
pub(crate) fn write_reason(file: &File, reason: &str) -> io::Result<bool> {
    // Extended attributes are small; a long reason is cut at a character boundary.
    let mut end = reason.len().min(1024);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    crate::sys::set_xattr(file, REASON, &reason.as_bytes()[..end])
}

/// Why the last attempt failed, if it was recorded.
pub(crate) fn read_reason(file: &File) -> io::Result<Option<String>> {
    Ok(crate::sys::get_xattr_sized(file, REASON, 1024)?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Forgets the count and the last reason (a requeue that starts over).
pub(crate) fn reset(file: &File) -> io::Result<()> {
    crate::sys::remove_xattr(file, ATTRIBUTE)?;
    crate::sys::remove_xattr(file, REASON)
}

fn format(identity: QueueIdentity, count: u32) -> String {
    format!("{count} {}:{}", identity.0, identity.1)
}

fn parse(value: &[u8], identity: QueueIdentity) -> Option<u32> {
    let text = std::str::from_utf8(value).ok()?;
    let (count, owner) = text.split_once(' ')?;
    let (dev, ino) = owner.split_once(':')?;
    if (dev.parse().ok()?, ino.parse().ok()?) != identity {
        return None;
    }
    count.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_belongs_to_one_queue() {
        let value = format((7, 42), 3);
        assert_eq!(parse(value.as_bytes(), (7, 42)), Some(3));
        assert_eq!(parse(value.as_bytes(), (7, 43)), None);
        assert_eq!(parse(b"garbage", (7, 42)), None);
    }

    #[test]
    fn round_trip_through_the_file() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let file = tmp.as_file();
        assert_eq!(read(file, (1, 2)).unwrap(), 0);
        if !write(file, (1, 2), 4).unwrap() {
            eprintln!("skipped: no user xattrs in the temporary directory");
            return;
        }
        assert_eq!(read(file, (1, 2)).unwrap(), 4);
        assert_eq!(read(file, (9, 9)).unwrap(), 0);
    }
}
