//! Recovery: requeue messages whose owner died, remove stale temporary files.

use std::ffi::OsStr;
use std::io;
use std::time::{Duration, SystemTime};

use super::DirectoryQueue;
use crate::engine::group;
use crate::engine::owner::{lock_entry, Entry};
use crate::engine::quarantine::quarantine;
use crate::engine::seen;
use crate::error::{Error, Operation, Result};
use crate::format::attempts;
use crate::format::id::MessageId;
use crate::format::state::State;
use crate::sys::EntryKind;

/// The most expired `seen/` records one recovery pass removes: a bounded pause for a
/// worker that recovers at start.
const SEEN_SWEEP_BUDGET: usize = 65_536;

/// What one [`recover`](DirectoryQueue::recover) pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoverReport {
    /// Messages of dead owners moved back to `incoming/`.
    pub requeued: usize,
    /// Pending messages left alone because their owner is alive (holds the lock).
    pub owned: usize,
    /// Unlocked pending messages left alone because they are younger than the
    /// orphan grace age.
    pub within_grace: usize,
    /// Pending names removed because the same file was also in `incoming/` (a
    /// rename half-undone by a crash).
    pub duplicates_removed: usize,
    /// Files removed from `tmp/`.
    pub tmp_removed: usize,
    /// Entries moved to `errors/` because they were not messages.
    pub quarantined: usize,
    /// Waiting members of failed groups moved to `errors/`: a cancellation that a
    /// crash interrupted, completed (see
    /// [`enqueue_in_group`](DirectoryQueue::enqueue_in_group)).
    pub cancelled: usize,
    /// Members of ordered groups let into `incoming/`: a turn that a crash
    /// interrupted, given.
    pub let_in: usize,
    /// Expired records of finished ids removed from `seen/` (at most
    /// 65,536 per pass; see [`QueueBuilder::remember_finished`](crate::QueueBuilder::remember_finished)).
    pub seen_removed: usize,
}

impl DirectoryQueue {
    /// Requeues messages whose owner is gone and removes temporary files whose writer
    /// is gone.
    ///
    /// - `pending/`: a message whose lock anyone can take has no live owner. If it
    ///   has been in `pending/` for at least the [orphan
    ///   grace](crate::QueueBuilder::orphan_grace), it moves back to `incoming/` and
    ///   the dead owner's claim is counted as an attempt. A live owner, even a stopped
    ///   one, holds its lock and is never robbed.
    /// - `tmp/`: files older than [`tmp_max_age`](crate::QueueBuilder::tmp_max_age)
    ///   whose lock anyone can take are removed, as are names that a crash left beside
    ///   an already published message.
    /// - `incoming/`: hidden files (names starting with `.`) older than `tmp_max_age`
    ///   are quarantined: no writer finished them.
    /// - Groups: the waiting members of a group with a failed member in `errors/` are
    ///   cancelled, and each ordered group with members in `chained/` gets its next
    ///   member let in if none is current (see
    ///   [`enqueue_in_group`](DirectoryQueue::enqueue_in_group)).
    /// - `seen/`: expired records of finished ids are removed, at most 65,536 per
    ///   pass, and all of them when the queue no longer remembers finished ids.
    ///
    /// Recovery is idempotent, and any number of processes may run it at once: each
    /// orphan is requeued exactly once, because the recoverer holds its lock while it
    /// moves it. Long-running consumers should run it at start and periodically.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] naming the path when a directory cannot be read or an entry cannot
    /// be moved. Entries handled before the error stay handled.
    ///
    /// # Durability
    ///
    /// `Full`: `incoming/` and `pending/` are synced once, at the end, before this
    /// returns. `Batch`: at the next [`sync`](DirectoryQueue::sync). `None`: never.
    pub fn recover(&self) -> Result<RecoverReport> {
        let mut report = RecoverReport::default();
        let result = self
            .recover_pending(&mut report)
            .and_then(|()| {
                report.tmp_removed = self.purge_tmp(self.engine().config().tmp_max_age)?;
                Ok(())
            })
            .and_then(|()| self.recover_incoming(&mut report))
            .and_then(|()| {
                let repaired = group::repair(self.engine())?;
                report.cancelled = repaired.cancelled;
                report.let_in = repaired.let_in;
                Ok(())
            })
            .and_then(|()| {
                report.seen_removed = seen::sweep(self.engine(), SEEN_SWEEP_BUDGET)?;
                Ok(())
            });
        let inner = self.engine();
        let synced = if report.requeued + report.duplicates_removed > 0 {
            inner
                .syncer()
                .changed(&[inner.dir(State::Pending), inner.dir(State::Incoming)])
        } else {
            Ok(())
        };
        result.and(synced)?;
        if report != RecoverReport::default() {
            tracing::info!(root = %inner.root().display(), ?report, "recovered");
        }
        Ok(report)
    }

    fn recover_pending(&self, report: &mut RecoverReport) -> Result<()> {
        for (name, kind) in self.engine().dir(State::Pending).entries()? {
            self.recover_entry(&name, kind, report)?;
        }
        Ok(())
    }

    /// Requeues the pending message `name` if its owner is gone (see
    /// [`recover`](DirectoryQueue::recover)); `kind` is what the directory read said.
    pub(crate) fn recover_entry(
        &self,
        name: &OsStr,
        kind: EntryKind,
        report: &mut RecoverReport,
    ) -> Result<()> {
        let inner = self.engine();
        let pending = inner.dir(State::Pending);
        let incoming = inner.dir(State::Incoming);
        let path = || pending.join(name);
        if MessageId::is_hidden(name.as_encoded_bytes()) {
            report.quarantined +=
                usize::from(self.set_aside(State::Pending, name, "hidden file in pending/")?);
            return Ok(());
        }
        // What the directory read already says is not a file is never opened.
        let locked = if kind == EntryKind::File || kind == EntryKind::Unknown {
            lock_entry(pending, name).map_err(|e| Error::io(Operation::Recover, path(), e))?
        } else {
            Entry::NotRegular(kind)
        };
        let (file, st) = match locked {
            Entry::Locked(file, st) => (file, st),
            Entry::Held => {
                report.owned += 1;
                return Ok(());
            }
            Entry::Gone => return Ok(()),
            Entry::NotRegular(kind) => {
                let reason = format!("{} in pending/", kind.as_str());
                report.quarantined += usize::from(self.set_aside(State::Pending, name, &reason)?);
                return Ok(());
            }
        };
        // ctime is the time of the rename into pending/, that is, of the claim.
        let age = SystemTime::now()
            .duration_since(st.ctime)
            .unwrap_or(Duration::ZERO);
        if age < inner.config().orphan_grace {
            report.within_grace += 1;
            return Ok(());
        }
        let previous = attempts::read(&file, inner.identity()).unwrap_or(0);
        if let Err(e) = attempts::write(&file, inner.identity(), previous + 1) {
            tracing::debug!(path = %path().display(), error = %e, "cannot store attempt count");
        }
        match pending.dir.rename_noreplace(name, &incoming.dir, name) {
            Ok(()) => report.requeued += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match incoming.dir.stat_at(name) {
                    // The same file under both names: the pending name is the stale one.
                    Ok(other) if other.same_file(&st) => {
                        pending
                            .dir
                            .unlink(name)
                            .map_err(|e| Error::io(Operation::Recover, path(), e))?;
                        report.duplicates_removed += 1;
                    }
                    _ => {
                        let reason = "duplicate id: incoming/ holds another message with this id";
                        report.quarantined +=
                            usize::from(self.set_aside(State::Pending, name, reason)?);
                    }
                }
            }
            Err(e) => {
                return Err(Error::moving(
                    Operation::Recover,
                    path(),
                    incoming.join(name),
                    e,
                ))
            }
        }
        Ok(())
    }

    /// Removes files from `tmp/` older than `max_age` (or left beside a published
    /// twin) whose writer is gone; returns how many.
    pub(crate) fn purge_tmp(&self, max_age: Duration) -> Result<usize> {
        let mut removed = 0;
        for (name, _) in self.engine().dir(State::Tmp).entries()? {
            removed += self.purge_tmp_entry(&name, max_age)?;
        }
        Ok(removed)
    }

    /// Removes `tmp/name` if it is older than `max_age` (or left beside a published
    /// twin) and its writer is gone; 1 if it was removed.
    pub(crate) fn purge_tmp_entry(&self, name: &OsStr, max_age: Duration) -> Result<usize> {
        let tmp = self.engine().dir(State::Tmp);
        let now = SystemTime::now();
        let path = || tmp.join(name);
        let st = match tmp.dir.stat_at(name) {
            Ok(st) => st,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io(Operation::Recover, path(), e)),
        };
        let stale = now.duration_since(st.mtime).unwrap_or(Duration::ZERO) >= max_age;
        match st.kind {
            // A leftover symlink is removed (never followed); anything else that is
            // not a file is left for `dirq check` to report.
            EntryKind::Symlink if stale => return remove(tmp, name),
            EntryKind::File => {}
            _ => return Ok(0),
        }
        // A second link means the message was published and a crash undid the
        // removal of this name: it can go at once.
        if !stale && st.nlink < 2 {
            return Ok(0);
        }
        // Removed only if its writer is gone (the lock) and it is still the file
        // that was judged stale.
        match lock_entry(tmp, name).map_err(|e| Error::io(Operation::Recover, path(), e))? {
            Entry::Locked(_, now) if now.same_file(&st) => remove(tmp, name),
            _ => Ok(0),
        }
    }

    fn recover_incoming(&self, report: &mut RecoverReport) -> Result<()> {
        let inner = self.engine();
        let incoming = inner.dir(State::Incoming);
        let now = SystemTime::now();
        for (name, _) in incoming.entries()? {
            if !MessageId::is_hidden(name.as_encoded_bytes()) {
                continue;
            }
            let Ok(st) = incoming.dir.stat_at(&name) else {
                continue;
            };
            if now.duration_since(st.mtime).unwrap_or(Duration::ZERO) >= inner.config().tmp_max_age
            {
                let reason = "hidden file in incoming/ that nobody finished (not a message)";
                report.quarantined +=
                    usize::from(self.set_aside(State::Incoming, &name, reason)?);
            }
        }
        Ok(())
    }

    fn set_aside(&self, from: State, name: &OsStr, reason: &str) -> Result<bool> {
        quarantine(self.engine(), from, name, reason)
    }
}

/// Unlinks `name` from `tmp/`; 1 if it was removed, 0 if it had gone.
fn remove(tmp: &crate::engine::StateDir, name: &OsStr) -> Result<usize> {
    match tmp.dir.unlink(name) {
        Ok(()) => Ok(1),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io(Operation::Recover, tmp.join(name), e)),
    }
}
