//! Deferred delivery: messages that wait in `deferred/` until a time, for a retry's
//! backoff or a delayed enqueue, and the promotion of those that fell due.

use std::ffi::OsStr;
use std::io;
use std::mem::MaybeUninit;
use std::time::SystemTime;

use super::scan::DirStamp;
use super::{Shared, StateDir};
use crate::error::{Error, Operation, Result};
use crate::format::deferred::parse_deferred_name;
use crate::format::id::MessageId;
use crate::format::state::State;

/// When `deferred/` next needs a look, as remembered by one queue handle.
#[derive(Debug, Default)]
pub(crate) struct DeferredClock {
    /// The earliest due time seen at the last look; `None` when nothing was waiting.
    next_due: Option<SystemTime>,
    /// `deferred/` as it was at the last look; a change means new entries.
    stamp: Option<DirStamp>,
    looked: bool,
}

impl DeferredClock {
    /// The earliest due time known, for a claimer deciding how long to sleep.
    pub(crate) fn next_due(&self) -> Option<SystemTime> {
        self.next_due
    }
}

/// Moves every due message from `deferred/` to `incoming/`, if `deferred/` changed or
/// something fell due since the last look. Returns how many moved.
///
/// Several processes may do this at once: each rename happens once, the others find
/// the name gone.
pub(crate) fn promote_due(
    inner: &Shared,
    clock: &mut DeferredClock,
    buf: &mut Vec<MaybeUninit<u8>>,
) -> Result<usize> {
    let Some(deferred) = inner.state_dir(State::Deferred) else {
        return Ok(0);
    };
    let now = SystemTime::now();
    let stamp = if inner.family.is_local() {
        deferred.dir.stat().ok().map(|st| DirStamp::of(&st))
    } else {
        None
    };
    let due = clock.next_due.is_some_and(|t| t <= now);
    if clock.looked && !due && stamp.is_some() && stamp == clock.stamp {
        return Ok(0);
    }
    let mut waiting = Vec::new();
    deferred
        .dir
        .scan(buf, |entry| waiting.push(entry.name.to_os_string()))
        .map_err(|e| Error::io(Operation::Scan, &deferred.path, e))?;
    let incoming = inner.dir(State::Incoming);
    let mut next_due = None;
    let mut moved = 0;
    for name in waiting {
        let Some((when, id)) = parse_deferred_name(&name) else {
            continue; // not ours; `dirq check` reports it
        };
        if when > now {
            next_due = Some(next_due.map_or(when, |n: SystemTime| n.min(when)));
            continue;
        }
        if deliver(deferred, incoming, &name, &id)? {
            moved += 1;
        }
    }
    if moved > 0 {
        inner.syncer.changed(&[deferred, incoming])?;
        tracing::debug!(moved, "deferred messages fell due");
    }
    // Only a stamp old enough to be trusted lets the next look be skipped.
    clock.stamp = stamp.filter(DirStamp::settled);
    clock.next_due = next_due;
    clock.looked = true;
    Ok(moved)
}

/// Moves the deferred entry `name`, of the message `id`, to `incoming/` under its id.
/// `Ok(true)` when it moved; `Ok(false)` when it was gone (another process delivered
/// it) or `incoming/` already holds the id (logged; it stays deferred). The caller
/// records the change for the sync.
pub(crate) fn deliver(
    deferred: &StateDir,
    incoming: &StateDir,
    name: &OsStr,
    id: &MessageId,
) -> Result<bool> {
    match deferred
        .dir
        .rename_noreplace(name, &incoming.dir, id.as_os_str())
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            tracing::warn!(%id, "cannot deliver deferred message: incoming/ has a message with the same id");
            Ok(false)
        }
        Err(e) => Err(Error::moving(
            Operation::Deliver,
            deferred.join(name),
            incoming.join(id.as_os_str()),
            e,
        )),
    }
}
