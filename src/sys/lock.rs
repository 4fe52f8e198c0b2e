//! Message ownership through `flock`, kept behind one small module.
//!
//! `fs2` predates std's own `File::lock` (Rust 1.89); it is called fully qualified so
//! that the two never collide. `flock` locks follow the inode across renames and are
//! released by the kernel when the owning process dies, which is what makes them the
//! owner marker of a claimed message (see `docs/protocol.md`, "Ownership").

use std::fs::File;
use std::io;

/// Tries to take the exclusive lock on `file` without blocking.
///
/// Returns `Ok(false)` when another open file description holds it: a live owner.
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    match fs2::FileExt::try_lock_exclusive(file) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Releases the lock before the file is closed.
pub(crate) fn unlock(file: &File) -> io::Result<()> {
    fs2::FileExt::unlock(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_file_description_cannot_lock() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let a = File::open(tmp.path()).unwrap();
        let b = File::open(tmp.path()).unwrap();
        assert!(try_lock(&a).unwrap());
        assert!(!try_lock(&b).unwrap());
        drop(a);
        assert!(try_lock(&b).unwrap());
    }
}
