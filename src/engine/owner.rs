//! Taking ownership of a directory entry: the step that claim, recovery and the purge
//! of `tmp/` share (docs/protocol.md, section 3).

use std::ffi::OsStr;
use std::io;

use super::StateDir;
use crate::sys::lock::{self, Locked};
use crate::sys::{self, EntryKind, FileStat};

/// The outcome of [`lock_entry`].
pub(crate) enum Entry {
    /// The file is ours: locked, and still under its name.
    Locked(Locked, FileStat),
    /// Someone else holds its lock: a live owner or another claimer.
    Held,
    /// The name is gone, or names another file now: someone moved it on.
    Gone,
    /// Not a regular file (a symlink found by `O_NOFOLLOW`, or what `fstat` says).
    NotRegular(EntryKind),
}

/// Opens `name` in `dir` without following a symlink or blocking, locks it, and checks
/// that the name still names the locked file.
///
/// IMPORTANT: the check comes after the lock. A process that opened the file just
/// before its owner moved it on and closed it would otherwise lock a file that is no
/// longer there and then act on whatever has that name now.
pub(crate) fn lock_entry(dir: &StateDir, name: &OsStr) -> io::Result<Entry> {
    let file = match dir.dir.open_read(name) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Entry::Gone),
        Err(e) if sys::is_symlink_refusal(&e) => return Ok(Entry::NotRegular(EntryKind::Symlink)),
        Err(e) => return Err(e),
    };
    let st = sys::stat_file(&file)?;
    if st.kind != EntryKind::File {
        return Ok(Entry::NotRegular(st.kind));
    }
    if !lock::try_lock(&file)? {
        return Ok(Entry::Held);
    }
    // From here on, every way out unlocks (see Locked).
    let file = Locked::new(file);
    match dir.dir.stat_at(name) {
        Ok(now) if now.same_file(&st) => Ok(Entry::Locked(file, st)),
        Ok(_) => Ok(Entry::Gone),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Entry::Gone),
        Err(e) => Err(e),
    }
}
