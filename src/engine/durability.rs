//! Durability modes and the fsync policy that carries them out.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use super::StateDir;
use crate::error::{Error, Operation, Result};
use crate::format::state::State;
use crate::sys::FsFamily;

/// How much a mutating operation syncs before it returns.
///
/// Every mutating method documents, under `# Durability`, what it syncs in each mode.
///
/// In a [`Piper`](crate::piper::Piper), `Full` and `Batch` mean the same: group commit,
/// with `Full`'s guarantee for what flows through the pipeline (results are durable
/// before their input leaves its queue); see
/// [`PiperBuilder::commit_batch`](crate::piper::PiperBuilder::commit_batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Every acknowledged operation survives a crash or power loss (with honest
    /// hardware): message files are synced before they are published, and every
    /// directory whose entries an operation changed is synced before it returns.
    ///
    /// On ext4 with a journal and on xfs, one directory fsync commits the whole journal,
    /// so one fsync per operation covers every directory it changed; on other
    /// filesystems (btrfs, ext4 without a journal, ...) each changed directory is synced.
    #[default]
    Full,
    /// Group commit: message files are still synced before they are published (so a
    /// crash never leaves a partial message in `incoming/`), but directory syncs are
    /// deferred until [`DirectoryQueue::sync`](crate::DirectoryQueue::sync), which
    /// covers everything done through this handle since the previous call.
    /// [`DirectoryQueue::enqueue_batch`](crate::DirectoryQueue::enqueue_batch) syncs
    /// its batch before returning.
    ///
    /// A crash can undo operations acknowledged since the last `sync`: a message can
    /// come back to `incoming/` and be processed again, and an enqueue can be lost.
    Batch,
    /// No fsync at all: Mentat's behaviour. For queues on tmpfs, and for users who
    /// accept losing recent operations in a power loss. A process crash still loses
    /// nothing.
    None,
}

/// Carries out the durability mode of one queue handle.
#[derive(Debug)]
pub(crate) struct Syncer {
    mode: Durability,
    /// One directory fsync commits every earlier metadata change (jbd2, xfs log), or
    /// fsync costs nothing (tmpfs).
    journal_wide: bool,
    /// A journal commit flushes the device cache and orders data written back before
    /// it (jbd2, xfs): see [`Syncer::file`].
    journal_orders_data: bool,
    /// Directories changed since the last [`Syncer::flush`] (batch mode).
    dirty: Mutex<Vec<Arc<StateDir>>>,
}

impl Syncer {
    pub(crate) fn new(mode: Durability, family: FsFamily) -> Syncer {
        Syncer {
            mode,
            journal_wide: matches!(family, FsFamily::Journaled | FsFamily::Memory),
            journal_orders_data: family == FsFamily::Journaled,
            dirty: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn mode(&self) -> Durability {
        self.mode
    }

    /// Makes the bytes of a message file durable before it is published, unless the
    /// mode is [`Durability::None`]. Without this a crash can publish a 0-byte message
    /// (docs/protocol.md §4).
    ///
    /// The caller publishes the file by a rename and then syncs (or, in batch mode,
    /// later flushes) the directory before it acknowledges anything. On a journaled
    /// filesystem (ext4 with jbd2, xfs) that directory sync is a journal commit, and a
    /// commit flushes the device's write cache before its commit record: so here the
    /// bytes are only written back and waited for (`sync_file_range`), and the commit
    /// that makes the rename durable makes them durable too. Any other commit that could
    /// carry the rename (a periodic one) comes after the wait as well, so the rename can
    /// never be durable without the bytes. This saves a journal commit and a cache
    /// flush per message: 64 of them in a batch of 64. Elsewhere, `fdatasync`.
    pub(crate) fn file(&self, file: &File, path: &Path) -> Result<()> {
        let synced = match self.mode {
            Durability::None => return Ok(()),
            _ if self.journal_orders_data => crate::sys::write_back_and_wait(file),
            _ => file.sync_data(),
        };
        synced.map_err(|e| Error::io(Operation::Sync, path, e))
    }

    /// Makes the bytes of many message files durable (group commit). Writeback of all
    /// of them is started first, so the per-file syncs that follow overlap instead of
    /// each waiting for its own allocation, write and journal commit.
    pub(crate) fn files<'a>(
        &self,
        files: impl Iterator<Item = (&'a File, &'a Path)> + Clone,
    ) -> Result<()> {
        if self.mode == Durability::None {
            return Ok(());
        }
        for (file, _) in files.clone() {
            crate::sys::start_writeback(file);
        }
        for (file, path) in files {
            self.file(file, path)?;
        }
        Ok(())
    }

    /// Records that the entries of `dirs` changed, the most recently changed last, and
    /// syncs them as the mode requires: now ([`Durability::Full`]), at the next flush
    /// ([`Durability::Batch`]) or never.
    pub(crate) fn changed(&self, dirs: &[&Arc<StateDir>]) -> Result<()> {
        match self.mode {
            Durability::Full => self.sync_dirs(dirs),
            Durability::Batch => {
                let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
                for dir in dirs {
                    if !dirty.iter().any(|d| Arc::ptr_eq(d, dir)) {
                        dirty.push(Arc::clone(dir));
                    }
                }
                Ok(())
            }
            Durability::None => Ok(()),
        }
    }

    /// Like [`Syncer::changed`], but syncs now in batch mode too: for steps whose
    /// durability must precede the next step (a cross-filesystem copy must be durable
    /// before its source is deleted; a batch enqueue is acknowledged on return).
    pub(crate) fn changed_now(&self, dirs: &[&Arc<StateDir>]) -> Result<()> {
        match self.mode {
            Durability::Full | Durability::Batch => self.sync_dirs(dirs),
            Durability::None => Ok(()),
        }
    }

    /// Makes `dir`'s entries durable before a later step becomes visible, where the
    /// filesystem does not already order them (used to make a failure's `.meta`
    /// durable before the message appears in `errors/`). On a journaled filesystem,
    /// metadata changes commit in order, so nothing needs to be done.
    pub(crate) fn order_before_next(&self, dir: &Arc<StateDir>) -> Result<()> {
        if self.mode == Durability::None || self.journal_wide {
            return Ok(());
        }
        dir.sync()
    }

    /// Makes every change recorded since the last flush durable (batch mode).
    ///
    /// Where one fsync does not commit the whole journal, each recorded directory is
    /// synced. On a journal-wide filesystem one commit per filesystem is enough, but
    /// which recorded directory carries the newest transaction is unknown: several
    /// threads changed them, and a directory changed again since (by the next batch)
    /// would make a second fsync commit again. So the flush makes a change of its own,
    /// after every recorded one (it touches one of the directories), and syncs that
    /// directory: one journal commit per filesystem, whatever the number of
    /// directories.
    pub(crate) fn flush(&self) -> Result<()> {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner));
        // An fsync error is reported once (Linux marks the failed pages clean), so a
        // failed directory is not kept for a retry that would falsely succeed: the
        // caller learns that everything since the previous flush is of unknown
        // durability.
        if self.journal_wide && dirty.len() > 1 {
            return commit_journals(&dirty);
        }
        for dir in &dirty {
            dir.sync()?;
        }
        Ok(())
    }

    fn sync_dirs(&self, dirs: &[&Arc<StateDir>]) -> Result<()> {
        if self.journal_wide {
            // The last directory changed carries the newest journal transaction;
            // committing it commits every earlier change too.
            if let Some(last) = dirs.last() {
                last.sync()?;
            }
            return Ok(());
        }
        for (i, dir) in dirs.iter().enumerate() {
            if !dirs[..i].iter().any(|d| Arc::ptr_eq(d, dir)) {
                dir.sync()?;
            }
        }
        Ok(())
    }
}

/// One journal commit per filesystem among `dirs`, covering every change made to them
/// before the call (see [`Syncer::flush`]). A directory whose filesystem cannot be told
/// or that cannot be touched (no write permission) is synced as it is.
///
/// A `pending/` is touched where there is one: the times of `incoming/` and
/// `deferred/` tell claimers whether to read them again.
fn commit_journals(dirs: &[Arc<StateDir>]) -> Result<()> {
    let is_pending = |d: &&Arc<StateDir>| {
        d.path.file_name() == Some(std::ffi::OsStr::new(State::Pending.as_str()))
    };
    let (pending, others): (Vec<&Arc<StateDir>>, Vec<&Arc<StateDir>>) =
        dirs.iter().partition(is_pending);
    let mut committed: Vec<u64> = Vec::new();
    for dir in pending.into_iter().chain(others) {
        let Ok(st) = dir.dir.stat() else {
            dir.sync()?;
            continue;
        };
        if committed.contains(&st.dev) {
            continue;
        }
        if dir.dir.touch().is_err() {
            dir.sync()?;
            continue;
        }
        dir.sync()?;
        committed.push(st.dev);
    }
    Ok(())
}
