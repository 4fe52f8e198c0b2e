//! Idempotent enqueue: publishing a message under a given id only if the queue holds
//! no message with that id in any state and does not remember finishing one
//! (docs/protocol.md, "seen/ and idempotent enqueue").

use std::io;

use super::publish::{settle, TmpFile};
use super::seen;
use super::Shared;
use crate::error::{Error, Operation, Result};
use crate::format::id::MessageId;
use crate::format::state::State;
use crate::sys::lock::Locked;
use crate::sys::FileStat;

/// What [`DirectoryQueue::enqueue_with_id`](crate::DirectoryQueue::enqueue_with_id)
/// found, and so whether it stored the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Enqueued {
    /// The message was stored under the id, in `incoming/`.
    Stored,
    /// A message with this id is already in the queue, in this state; nothing was
    /// written.
    AlreadyQueued(State),
    /// A message with this id left the queue (committed, forwarded or deleted) within
    /// the time the queue [remembers finished ids](crate::QueueBuilder::remember_finished);
    /// nothing was written.
    AlreadyFinished,
}

impl Enqueued {
    /// Whether this call stored the message (and not an earlier one).
    pub fn is_stored(self) -> bool {
        self == Enqueued::Stored
    }
}

/// The states a message can be in besides `incoming/`, in the order of the moves
/// between them: every move among them goes from an earlier one to a later one
/// (`pending/` to `deferred/` or `errors/`, `deferred/` to `hold/`, anything to
/// `errors/` by a group's cancellation), and leaving the queue comes last (`seen/`).
/// A message that moves while they are checked in this order is found where it went.
const ELSEWHERE: [State; 5] = [
    State::Pending,
    State::Deferred,
    State::Hold,
    State::Chained,
    State::Errors,
];

/// Publishes `tmp` (written, not yet synced) as `incoming/<id>` unless the id is
/// already in the queue or remembered as finished; [`answer_early`] was asked before
/// `tmp` was written (docs/protocol.md §6.12, steps 1 and 2).
///
/// 3. The file is synced as the mode says, and the id's lock is taken: concurrent
///    calls for one id, in any process, take turns.
/// 4. The file is renamed to `incoming/<id>` without replacing anything, still locked
///    so that no claimer takes it yet. `EEXIST`: the id is waiting in `incoming/`.
/// 5. The other states are checked in [`ELSEWHERE`]'s order, then `seen/`. From step
///    4 on, no other message with this id can enter `incoming/` (every move into it
///    refuses to replace), so a message that moves meanwhile only moves forward
///    in that order and is found. If one is found, the new file is taken back out.
/// 6. The file's lock goes, `incoming/` is synced as the mode says, then the id's lock
///    goes, so that a later call finds the message durable.
///
/// Step 4 is `renameat2(RENAME_NOREPLACE)`, not `link`: both answer `EEXIST` for a
/// name that is taken, but a link leaves the file with a second name in `tmp/` until
/// it is unlinked, which a claimer on a filesystem with `RENAME_NOREPLACE` takes for a
/// planted hard link, and which a crash leaves behind. Where the rename is refused
/// (NFS), it is `link` + `unlink` (`Dir::rename_noreplace`).
pub(crate) fn publish_once(inner: &Shared, tmp: TmpFile<'_>, id: &MessageId) -> Result<Enqueued> {
    tmp.sync()?;
    let turn = seen::lock_id(inner, id)?;
    let Some((held, identity)) = tmp.rename_held(id)? else {
        return Ok(Enqueued::AlreadyQueued(State::Incoming));
    };
    let found = match find_elsewhere(inner, id) {
        Ok(found) => found,
        Err(error) => {
            take_back(inner, id, &identity, held)?;
            return Err(error);
        }
    };
    if let Some(found) = found {
        if take_back(inner, id, &identity, held)? {
            return Ok(found);
        }
        // A claimer that does not lock (a Mentat reader) took the new file meanwhile:
        // it is stored, beside the other copy.
        tracing::warn!(%id, "a second message with this id was claimed before it could be taken back");
        return Ok(Enqueued::Stored);
    }
    drop(held);
    let incoming = inner.dir(State::Incoming);
    let synced = inner.syncer().changed(&[incoming]);
    let settled = settle(
        incoming,
        vec![(id.clone(), id.as_os_str().to_os_string())],
        synced,
    );
    drop(turn);
    settled.map(|_| Enqueued::Stored)
}

/// The answer for an id that is remembered as finished or is waiting in `incoming/`,
/// found before anything is written: a redelivery costs neither a file nor a sync.
/// `None` does not mean the id is new; [`publish_once`] decides that. `incoming/` is
/// looked at during the id's turn, so that a message another call is still making
/// durable is not reported yet.
pub(crate) fn answer_early(inner: &Shared, id: &MessageId) -> Result<Option<Enqueued>> {
    if seen::is_remembered(inner, id)? {
        return Ok(Some(Enqueued::AlreadyFinished));
    }
    let _turn = seen::lock_id(inner, id)?;
    Ok(inner
        .find(State::Incoming, id)?
        .map(|_| Enqueued::AlreadyQueued(State::Incoming)))
}

/// Where else the queue has `id`, checked in [`ELSEWHERE`]'s order, then `seen/`.
fn find_elsewhere(inner: &Shared, id: &MessageId) -> Result<Option<Enqueued>> {
    for state in ELSEWHERE {
        if inner.find(state, id)?.is_some() {
            return Ok(Some(Enqueued::AlreadyQueued(state)));
        }
    }
    if seen::is_remembered(inner, id)? {
        return Ok(Some(Enqueued::AlreadyFinished));
    }
    Ok(None)
}

/// Removes the just-published `incoming/<id>` again if it is still the file that was
/// published (`identity`); its lock kept every locking claimer away. Returns whether
/// it was removed.
fn take_back(inner: &Shared, id: &MessageId, identity: &FileStat, held: Locked) -> Result<bool> {
    let incoming = inner.dir(State::Incoming);
    let name = id.as_os_str();
    let removed = match incoming.dir.stat_at(name) {
        Ok(st) if st.same_file(identity) => match incoming.dir.unlink(name) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(Operation::Publish, incoming.join(name), e)),
        },
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(Operation::Publish, incoming.join(name), e)),
    };
    drop(held);
    Ok(removed)
}
