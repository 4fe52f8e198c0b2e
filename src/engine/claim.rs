//! Claiming: `incoming/X` → `pending/X`, owned through an `flock` on the file.

use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::deferred::{self, DeferredClock};
use super::owner::{lock_entry, Entry};
use super::quarantine::quarantine;
use super::scan::{self, Candidate, DirStamp, Oldest};
use super::Shared;
use crate::error::{Error, Operation, Result};
use crate::format::id::{self, MessageId};
use crate::format::state::State;
use crate::sys::{EntryKind, FileStat};

/// How many of the oldest names one scan keeps. Bigger means fewer full scans of a
/// long queue (each costs a read of the whole directory) but more memory (about
/// 80 bytes a name).
const SNAPSHOT_LIMIT: usize = 128 * 1024;

/// After this many claims lost in a row, a large snapshot is treated as stale and
/// rescanned. A small one (see [`CHEAP_RESCAN`]) is rescanned after the second loss.
const STALE_AFTER_MISSES: u32 = 16;

/// Snapshots up to this size are cheaper to rescan than to walk through another
/// claimer's trail of already taken names.
const CHEAP_RESCAN: usize = 1024;

/// How soon a claimer looks again after finding a message in `incoming/` locked by
/// someone else (a claim in progress, or a message being released): the holder lets
/// go within moments, and no event will say so.
const RECHECK_LOCKED: Duration = Duration::from_millis(2);

/// A claim call that has lost this many races gives up and reports nothing to claim.
const MAX_LOSSES_PER_CALL: usize = 64;

/// A claimer that trusts its watch spends at most 1/`VERIFY_SHARE` of its time reading
/// `incoming/` to check it (see [`Snapshot::verify_every`]).
const VERIFY_SHARE: u32 = 1000;

/// Largest jump ahead in the snapshot after losing a race (see [`Snapshot::lost`]).
const MAX_JUMP: usize = 256;

/// The names a handle is working through, oldest first, shared by its clones.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    names: Oldest,
    /// Directory stamp of the last scan that found nothing; while `incoming/` keeps this
    /// stamp, it is still empty and need not be read again.
    idle: Option<DirStamp>,
    /// When a read of `incoming/` last found it empty with the watch [armed](Wake::arm)
    /// and recording arrivals ever since: until the rescan interval has passed, the
    /// names the watch reports are all there is to claim, and `names` holds only those.
    ///
    /// [Wake::arm]: super::wake::Wake::arm
    trusted: Option<Instant>,
    /// How long the last read of `incoming/` took.
    scan_cost: Duration,
    buf: Vec<MaybeUninit<u8>>,
    misses: u32,
    /// Names this handle's threads are claiming right now. They are still in
    /// `incoming/` until their rename, so a rescan by a sibling thread would offer them
    /// again and make it collide with its own process.
    claiming: Vec<MessageId>,
    /// Set when the last claim call found a message locked by someone else: look
    /// again at this time rather than waiting for an event.
    recheck: Option<Instant>,
    /// When `deferred/` next needs a look.
    pub(crate) deferred: DeferredClock,
}

impl Snapshot {
    /// Reads `incoming/` again, after moving in whatever fell due in `deferred/`,
    /// leaving out `lost`: names this call already lost to another claimer (still in
    /// `incoming/` while their claimer renames them; offering them again would make the
    /// caller spin on them). Returns `false` when there is nothing else to claim.
    fn refill(&mut self, inner: &Shared, lost: &[MessageId]) -> Result<bool> {
        deferred::promote_due(inner, &mut self.deferred, &mut self.buf)?;
        if let Some(arrived) = self.trusted_arrivals(inner) {
            self.names = arrived;
            self.leave_out(lost);
            return Ok(!self.names.is_empty());
        }
        let incoming = inner.dir(State::Incoming);
        // Armed before the directory is looked at, so that whatever arrives after the
        // look is recorded.
        let armed = inner.wake.arm();
        let stamp = if inner.family.is_local() {
            incoming.dir.stat().ok().map(|st| DirStamp::of(&st))
        } else {
            None
        };
        if stamp.is_some() && stamp == self.idle {
            self.trust(armed);
            return Ok(false);
        }
        self.idle = None;
        inner.counters.scans.fetch_add(1, Ordering::Relaxed);
        // The drained snapshot's buffers go before the scan builds the next one.
        self.names.clear();
        let started = Instant::now();
        let found = scan::oldest(incoming, SNAPSHOT_LIMIT, &mut self.buf)
            .map_err(|e| Error::io(Operation::Scan, &incoming.path, e))?;
        self.scan_cost = started.elapsed();
        // Empty only if nothing was left out either: a name lost to a claimer that
        // holds it locked may stay, and nothing else would bring it back.
        let empty = found.is_empty();
        self.names = found;
        self.leave_out(lost);
        if empty && self.claiming.is_empty() {
            self.idle = stamp.filter(DirStamp::settled);
            self.trust(armed);
        } else if armed {
            inner.wake.disarm();
        }
        Ok(!self.names.is_empty())
    }

    /// `incoming/` was just found empty: trust the watch's arrivals from now on, if
    /// it was `armed` before the look and no sibling thread is between scan and claim.
    fn trust(&mut self, armed: bool) {
        self.trusted = (armed && self.claiming.is_empty()).then(Instant::now);
    }

    /// The names that arrived since `incoming/` was last found empty, when the watch is
    /// trusted to have reported all of them; `None` means the directory must be read.
    fn trusted_arrivals(&mut self, inner: &Shared) -> Option<Oldest> {
        let since = self.trusted.take()?;
        let names = inner.wake.arrivals()?;
        if names.is_empty() && since.elapsed() >= self.verify_every(inner) {
            // Events are hints: now and then, when idle, the directory decides.
            return None;
        }
        self.trusted = Some(since);
        Some(Oldest::of_names(&names))
    }

    /// How often a trusting claimer reads `incoming/` anyway: every rescan interval,
    /// but on a directory so long that reading it takes a while (ext4 never shrinks one
    /// that once held a million names) rarely enough that the reads take at most
    /// 1/[`VERIFY_SHARE`] of the time.
    fn verify_every(&self, inner: &Shared) -> Duration {
        inner
            .config
            .rescan_interval
            .max(self.scan_cost.saturating_mul(VERIFY_SHARE))
    }

    /// Leaves out of `names` those this handle is claiming or this call `lost`.
    fn leave_out(&mut self, lost: &[MessageId]) {
        let ids: Vec<&MessageId> = self.claiming.iter().chain(lost).collect();
        self.names.remove(&ids);
    }

    /// A message was left in `incoming/` (someone else holds its lock, or it is being
    /// published) and no arrival event will say when it can be claimed: read the
    /// directory next time.
    fn distrust(&mut self) {
        self.trusted = None;
    }

    /// A claim was lost to another claimer, which is probably working through the
    /// same names just ahead: jump a random distance ahead so the two stop colliding
    /// (the skipped names are left to it, and a later scan finds any it did not take).
    /// Many misses in a row mean the snapshot is stale.
    fn lost(&mut self) {
        self.misses += 1;
        if self.trusted.is_some() {
            // The names came from the watch: each is worth trying, none is stale.
            return;
        }
        let stale_after = if self.names.len() <= CHEAP_RESCAN {
            2
        } else {
            STALE_AFTER_MISSES
        };
        if self.misses >= stale_after {
            self.names.clear();
            self.misses = 0;
            return;
        }
        let span = self.names.len().min(MAX_JUMP) as u64;
        let jump = crate::sys::random::below(span) as usize;
        self.names.skip(jump);
    }
}

/// A message just moved to `pending/` and locked by this process.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) id: MessageId,
    /// The message file, open, holding the lock that says this process owns it.
    pub(crate) file: crate::sys::lock::Locked,
    pub(crate) size: u64,
    /// Older than the queue's maximum age: to be failed as `expired`, not processed.
    pub(crate) expired: bool,
}

/// How one claim attempt ended.
enum Attempt {
    Claimed(Claimed),
    /// Another claimer got there first.
    Lost,
    /// Someone holds the message's lock: lost too, but it may come free any moment.
    Locked,
    /// The entry was not claimable and was moved away or skipped.
    Skipped,
}

impl Shared {
    /// Claims the oldest claimable message in `incoming/`, if there is one, without
    /// blocking: `incoming/X` is locked and renamed to `pending/X`. Quarantines what
    /// is not claimable on the way; see `DirectoryQueue::try_claim`.
    pub(crate) fn try_claim(&self) -> Result<Option<Claimed>> {
        let inner = self;
        // Names lost to other claimers during this call.
        let mut lost = Vec::new();
        let mut locked = false;
        loop {
            if lost.len() >= MAX_LOSSES_PER_CALL {
                // Losing every race: let the caller wait for the others to move on.
                lock_snapshot(inner).recheck = locked.then(|| Instant::now() + RECHECK_LOCKED);
                return Ok(None);
            }
            let candidate = {
                let mut snapshot = lock_snapshot(inner);
                let next = match snapshot.names.pop_front() {
                    Some(c) => c,
                    None => {
                        let found = snapshot.refill(inner, &lost)?;
                        let next = found.then(|| snapshot.names.pop_front()).flatten();
                        let Some(next) = next else {
                            snapshot.recheck = locked.then(|| Instant::now() + RECHECK_LOCKED);
                            return Ok(None);
                        };
                        next
                    }
                };
                snapshot.claiming.push(next.id.clone());
                next
            };
            let id = candidate.id.clone();
            let attempt = self.attempt(candidate);
            lock_snapshot(inner).claiming.retain(|c| c != &id);
            let outcome = attempt?;
            match outcome {
                Attempt::Claimed(claimed) => {
                    lock_snapshot(inner).misses = 0;
                    inner.wake.busy();
                    if claimed.expired {
                        inner.counters.expired.fetch_add(1, Ordering::Relaxed);
                    } else {
                        inner.counters.claimed.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(Some(claimed));
                }
                Attempt::Lost | Attempt::Locked => {
                    let mut snapshot = lock_snapshot(inner);
                    if matches!(outcome, Attempt::Locked) {
                        locked = true;
                        snapshot.distrust();
                    }
                    inner.counters.collisions.fetch_add(1, Ordering::Relaxed);
                    snapshot.lost();
                    drop(snapshot);
                    lost.push(id);
                }
                Attempt::Skipped => {}
            }
        }
    }

    /// When a claimer with nothing to do should look again: after the rescan interval,
    /// when the next deferred message falls due, or soon if the last claim found a
    /// message locked by someone else, whichever is first.
    pub(crate) fn next_wake(&self, now: Instant) -> Instant {
        let rescan = now + self.config().rescan_interval;
        let snapshot = lock_snapshot(self);
        let due = snapshot.deferred.next_due().map(|t| {
            now + t
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        [due, snapshot.recheck]
            .into_iter()
            .flatten()
            .fold(rescan, Instant::min)
    }

    /// One attempt at claiming `candidate`, following the protocol (docs/protocol.md): open without following
    /// or blocking, lock, check that the name still names the locked inode, rename.
    fn attempt(&self, candidate: Candidate) -> Result<Attempt> {
        let inner = self;
        let incoming = inner.dir(State::Incoming);
        let pending = inner.dir(State::Pending);
        let name = candidate.id.as_os_str();
        let path = || incoming.join(name);

        if let Err(reason) = id::check(name.as_encoded_bytes()) {
            // A name no message may have (too long to defer or fail, or a sidecar's).
            return self.quarantine_incoming(name, &format!("not a message name: {reason}"));
        }
        let mut kind = candidate.kind;
        if kind == EntryKind::Unknown {
            match incoming.dir.stat_at(name) {
                Ok(st) => kind = st.kind,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Attempt::Lost),
                Err(e) => return Err(Error::io(Operation::Claim, path(), e)),
            }
        }
        if kind != EntryKind::File {
            return self.quarantine_incoming(name, &format!("{} in incoming/", kind.as_str()));
        }
        let (file, st) = match lock_entry(incoming, name)
            .map_err(|e| Error::io(Operation::Claim, path(), e))?
        {
            Entry::Locked(file, st) => (file, st),
            Entry::Held => return Ok(Attempt::Locked),
            Entry::Gone => return Ok(Attempt::Lost),
            // Replaced since the scan by something that is not a file.
            Entry::NotRegular(kind) => {
                return self.quarantine_incoming(name, &format!("{} in incoming/", kind.as_str()))
            }
        };
        if st.nlink > 1 && !self.drop_publish_leftover(name, &st)? {
            if !inner.supports_noreplace() {
                // Publishing here is link + unlink: a second link may be an enqueue
                // in progress. recover() deals with links that persist. No event will
                // say when it is done: read the directory next time.
                lock_snapshot(inner).distrust();
                return Ok(Attempt::Skipped);
            }
            return self.quarantine_incoming(
                name,
                &format!("hard-linked file ({} links) in incoming/", st.nlink),
            );
        }
        if st.size == 0 {
            return self.quarantine_incoming(name, "empty message");
        }
        match incoming.dir.rename_noreplace(name, &pending.dir, name) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Attempt::Lost),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // pending/X exists: either the same inode under both names (a crash on
                // a filesystem that lost half a rename), which we repair, or another
                // message with the same id.
                match pending.dir.stat_at(name) {
                    Ok(other) if other.same_file(&st) => {
                        incoming
                            .dir
                            .unlink(name)
                            .map_err(|e| Error::io(Operation::Claim, path(), e))?;
                    }
                    _ => {
                        return Err(Error::Duplicate {
                            op: Operation::Claim,
                            path: pending.join(name),
                            id: candidate.id,
                        })
                    }
                }
            }
            Err(e) => {
                return Err(Error::moving(
                    Operation::Claim,
                    path(),
                    pending.join(name),
                    e,
                ))
            }
        }
        tracing::trace!(id = %candidate.id, "claimed");
        let born = candidate.id.timestamp().unwrap_or(st.mtime);
        let expired = inner.config.max_age.is_some_and(|max_age| {
            SystemTime::now()
                .duration_since(born)
                .unwrap_or(Duration::ZERO)
                > max_age
        });
        Ok(Attempt::Claimed(Claimed {
            id: candidate.id,
            file,
            size: st.size,
            expired,
        }))
    }

    /// Quarantines an unclaimable entry of `incoming/`.
    fn quarantine_incoming(&self, name: &std::ffi::OsStr, reason: &str) -> Result<Attempt> {
        quarantine(self, State::Incoming, name, reason)?;
        Ok(Attempt::Skipped)
    }

    /// A message with two links whose other name is `tmp/<id>` is a publish whose
    /// removal from `tmp/` a crash undid (or a link + unlink publish in progress, whose
    /// publisher finds the name gone and is fine with it). Removes the `tmp/` name.
    /// Returns whether that accounted for the extra link.
    fn drop_publish_leftover(&self, name: &std::ffi::OsStr, st: &FileStat) -> Result<bool> {
        let tmp = self.dir(State::Tmp);
        match tmp.dir.stat_at(name) {
            Ok(other) if other.same_file(st) && st.nlink == 2 => match tmp.dir.unlink(name) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
                Err(e) => Err(Error::io(Operation::Claim, tmp.join(name), e)),
            },
            _ => Ok(false),
        }
    }
}

fn lock_snapshot(inner: &Shared) -> MutexGuard<'_, Snapshot> {
    inner
        .snapshot
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}
