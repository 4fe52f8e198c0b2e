//! Idempotent enqueue: publishing a message under a given id only if the queue holds
//! no message with that id in any state and does not remember finishing one
//! (docs/protocol.md, "seen/ and idempotent enqueue").

use std::collections::HashSet;
use std::io;

use super::publish::{empty, is_blank, settle, write_new, TmpFile};
use super::seen::{self, Remembered};
use super::Shared;
use crate::error::{Error, Operation, Result};
use crate::format::deferred::parse_deferred_name;
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
    let found = match find_elsewhere(inner, &[id]) {
        Ok(mut found) => found.pop().flatten(),
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

/// Publishes each item as [`answer_early`] and [`publish_once`] do for one, with the
/// work shared: the turns of all ids are taken at once (each lock file once, in name
/// order) and held throughout, `seen/` is looked at twice and `deferred/` scanned once
/// for the whole batch, the files are synced together and `incoming/` once. An item
/// that cannot be written (blank, a write error) gets its error and the others go on;
/// an error that concerns the batch (a lock, a look, a sync) is the call's, and then
/// nothing of the batch stays in the queue unless a claimer took it already.
pub(crate) fn publish_batch_once<B: AsRef<[u8]>>(
    inner: &Shared,
    items: &[(MessageId, B)],
) -> Result<Vec<Result<Enqueued>>> {
    let turns = seen::lock_ids(inner, items.iter().map(|(id, _)| id))?;
    let mut answers: Vec<Option<Result<Enqueued>>> = items.iter().map(|_| None).collect();
    // Steps 1 and 2: what is remembered or waiting in incoming/ costs no file.
    let remembered = Remembered::look(inner)?;
    for (answer, (id, bytes)) in answers.iter_mut().zip(items) {
        if is_blank(bytes.as_ref()) {
            *answer = Some(Err(empty(inner)));
        } else if remembered.contains(id)? {
            *answer = Some(Ok(Enqueued::AlreadyFinished));
        } else if inner.find(State::Incoming, id)?.is_some() {
            *answer = Some(Ok(Enqueued::AlreadyQueued(State::Incoming)));
        }
    }
    drop(remembered);
    // Step 3: written, then synced together.
    let mut written = Vec::new();
    for (i, (id, bytes)) in items.iter().enumerate() {
        if answers[i].is_some() {
            continue;
        }
        match write_new(inner, bytes.as_ref(), Some(id)) {
            Ok(mut tmp) => {
                tmp.fix_id(id);
                written.push((i, tmp));
            }
            Err(error) => answers[i] = Some(Err(error)),
        }
    }
    TmpFile::sync_many(inner, written.iter().map(|(_, tmp)| tmp))?;
    // Step 4.
    let mut held = Vec::with_capacity(written.len());
    for (i, tmp) in written {
        match tmp.rename_held(&items[i].0) {
            Ok(Some((lock, identity))) => held.push((i, lock, identity)),
            Ok(None) => answers[i] = Some(Ok(Enqueued::AlreadyQueued(State::Incoming))),
            Err(error) => answers[i] = Some(Err(error)),
        }
    }
    // Step 5.
    let ids: Vec<&MessageId> = held.iter().map(|(i, _, _)| &items[*i].0).collect();
    let found = match find_elsewhere(inner, &ids) {
        Ok(found) => found,
        Err(error) => {
            for (i, lock, identity) in held {
                if let Err(e) = take_back(inner, &items[i].0, &identity, lock) {
                    tracing::warn!(error = %e, "cannot take back a message after a failed check");
                }
            }
            return Err(error);
        }
    };
    // Step 6.
    let mut stored = Vec::with_capacity(held.len());
    for ((i, lock, identity), found) in held.into_iter().zip(found) {
        let id = &items[i].0;
        let Some(found) = found else {
            drop(lock);
            stored.push((i, (id.clone(), id.as_os_str().to_os_string())));
            continue;
        };
        answers[i] = Some(match take_back(inner, id, &identity, lock) {
            Ok(true) => Ok(found),
            Ok(false) => {
                tracing::warn!(%id, "a second message with this id was claimed before it could be taken back");
                Ok(Enqueued::Stored)
            }
            Err(error) => Err(error),
        });
    }
    let incoming = inner.dir(State::Incoming);
    let synced = inner.syncer().changed(&[incoming]);
    let (indexes, names): (Vec<usize>, Vec<_>) = stored.into_iter().unzip();
    settle(incoming, names, synced)?;
    drop(turns);
    for i in indexes {
        answers[i] = Some(Ok(Enqueued::Stored));
    }
    Ok(answers
        .into_iter()
        .map(|answer| answer.expect("every item of the batch was answered above"))
        .collect())
}

/// Where else the queue has each of `ids`, checked in [`ELSEWHERE`]'s order (one
/// state for all ids, then the next), then `seen/`, looked at only now (see
/// [`Remembered`]).
fn find_elsewhere(inner: &Shared, ids: &[&MessageId]) -> Result<Vec<Option<Enqueued>>> {
    let mut found: Vec<Option<Enqueued>> = vec![None; ids.len()];
    for state in ELSEWHERE {
        // deferred/ names carry a due time: one scan for all, not one per id.
        let deferred = match state {
            State::Deferred => Some(deferred_ids(inner)?),
            _ => None,
        };
        for (found, id) in found.iter_mut().zip(ids) {
            if found.is_some() {
                continue;
            }
            let there = match &deferred {
                Some(deferred) => deferred.contains(*id),
                None => inner.find(state, id)?.is_some(),
            };
            if there {
                *found = Some(Enqueued::AlreadyQueued(state));
            }
        }
    }
    let remembered = Remembered::look(inner)?;
    for (found, id) in found.iter_mut().zip(ids) {
        if found.is_none() && remembered.contains(id)? {
            *found = Some(Enqueued::AlreadyFinished);
        }
    }
    Ok(found)
}

/// The ids waiting in `deferred/`.
fn deferred_ids(inner: &Shared) -> Result<HashSet<MessageId>> {
    let mut ids = HashSet::new();
    let Some(dir) = inner.state_dir(State::Deferred) else {
        return Ok(ids);
    };
    dir.dir
        .scan(&mut Vec::new(), |entry| {
            if let Some((_, id)) = parse_deferred_name(entry.name) {
                ids.insert(id);
            }
        })
        .map_err(|e| Error::io(Operation::Scan, &dir.path, e))?;
    Ok(ids)
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
