//! Message ownership through `flock`, kept behind one small module.
//!
//! `fs2` predates std's own `File::lock` (Rust 1.89); it is called fully qualified so
//! that the two never collide. `flock` locks follow the inode across renames and are
//! released by the kernel when the owning process dies, which is what makes them the
//! owner marker of a claimed message (see `docs/protocol.md`, "Ownership").

use std::fs::File;
use std::io;
use std::ops::Deref;

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

/// Takes the exclusive lock on `file`, waiting for whoever holds it; unlocked when
/// the returned [`Locked`] is dropped. For short critical sections shared by
/// processes (an ordered group's turn), not for message ownership.
pub(crate) fn lock_waiting(file: File) -> io::Result<Locked> {
    fs2::FileExt::lock_exclusive(&file)?;
    Ok(Locked(file))
}

/// Releases the lock before the file is closed.
pub(crate) fn unlock(file: &File) -> io::Result<()> {
    fs2::FileExt::unlock(file)
}

/// A file whose lock this process took with [`try_lock`]; dropping it unlocks the file
/// before closing it.
///
/// IMPORTANT: closing is not enough to end an `flock`. The lock belongs to the open file
/// description, which lives on while any descriptor refers to it, and every `fork` (a
/// `Command::spawn` on any thread of the process) copies all descriptors into the child,
/// where the `O_CLOEXEC` copy stays until the child's `exec`. Under load that lasts
/// milliseconds, and a message released, promoted or requeued in that window still
/// looks owned: `try_claim` passed over the only message in `incoming/` right after
/// the same thread released it. `flock(LOCK_UN)` acts on the open file description,
/// so it ends the lock for the child's copy too.
#[derive(Debug)]
pub(crate) struct Locked(File);

impl Locked {
    /// Takes charge of `file`, whose lock [`try_lock`] has just taken.
    pub(crate) fn new(file: File) -> Locked {
        Locked(file)
    }
}

impl Deref for Locked {
    type Target = File;

    fn deref(&self) -> &File {
        &self.0
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        if let Err(e) = unlock(&self.0) {
            // Closing still ends the lock, once no child holds a copy of the descriptor.
            tracing::debug!(error = %e, "cannot unlock before closing");
        }
    }
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

    #[test]
    fn dropping_a_locked_file_unlocks_copies_of_its_descriptor() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let a = File::open(tmp.path()).unwrap();
        assert!(try_lock(&a).unwrap());
        // What a child forked at this moment holds until its exec.
        let inherited = a.try_clone().unwrap();
        drop(Locked::new(a));
        let b = File::open(tmp.path()).unwrap();
        assert!(try_lock(&b).unwrap(), "the lock outlived its Locked");
        drop(inherited);
    }
}
