//! Cancelling a running message: the operator's side of the request channel of
//! [`piper`](crate::piper) (docs/protocol.md, section 6.10).

use std::ffi::OsStr;
use std::io;
use std::time::{Duration, Instant};

use crate::error::{Error, Operation, Result};
use crate::piper::{self, CancelAnswer, CancelRequest};
use crate::sys::{self, EntryKind};
use crate::{DirectoryQueue, MessageId, State};

/// Where [`cancel_timeout`] sends a cancelled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CancelTo {
    /// To `errors/`, with reason [`CANCELLED_REASON`](crate::piper::CANCELLED_REASON)
    /// in its sidecar, like any failure (the stage's
    /// [`on_failed`](crate::piper::Stage::on_failed) runs).
    #[default]
    Errors,
    /// Back to `incoming/`, to be processed again. Not a failure: no reason is
    /// recorded, and the cancelled run counts as an attempt, as a
    /// [`release`](crate::Message::release) does.
    Incoming,
}

/// How often the requester looks for the Piper's answer.
const POLL: Duration = Duration::from_millis(20);

/// Makes the Piper processing the message `id` abandon it, and waits at most `wait`
/// for it to say where the message went; see [`cancel_deadline`].
///
/// # Errors
///
/// As [`cancel_deadline`].
///
/// # Durability
///
/// As [`cancel_deadline`].
pub fn cancel_timeout(
    queue: &DirectoryQueue,
    id: &MessageId,
    to: CancelTo,
    wait: Duration,
) -> Result<State> {
    let deadline = crate::piper::later(Instant::now(), wait);
    cancel_deadline(queue, id, to, deadline)
}

/// Makes the Piper processing the message `id` abandon it, and waits until `deadline`
/// for it to say where the message went: [`State::Errors`] or [`State::Incoming`],
/// as `to` asks.
///
/// The owner is the process holding the lock on `pending/<id>` (docs/protocol.md,
/// section 3), read from the kernel's lock table, so this works only on the host that
/// runs the owner. It must be a [`Piper`](crate::piper::Piper) that advertises itself
/// under this queue ([`pipers`](super::pipers)). The request is a file in
/// `<queue>/pipers/cancel/` naming that process, which only it acts on: its stage is
/// told through [`Cancellation`](crate::piper::Cancellation) (a
/// [`CommandStage`](crate::piper::CommandStage) kills its command's process group),
/// and whatever the stage returns afterwards, the message goes to `to`.
///
/// # Errors
///
/// [`Error::Refused`] (with [`Operation::Cancel`]), nothing changed, when:
///
/// - there is no message `id`, or it is not running: waiting in `incoming/`,
///   `deferred/` or `hold/`, or already in `errors/`;
/// - it is in `pending/` but nobody owns it (its owner died: `dirq recover`
///   requeues it);
/// - its owner is not a Piper advertising itself here (a `dirq take`, a program
///   claiming through the library), or one that does not honour cancel requests;
/// - its processing ended before the cancel reached it (its outcome was carried out);
/// - no answer came by `deadline`: the request is withdrawn (a cancel the Piper had
///   already begun still completes), or the Piper ended meanwhile.
///
/// [`Error::Io`] when the queue or the request file cannot be read or written.
///
/// # Durability
///
/// The request file is not synced: a request lost in a crash was not acted on. The
/// message's move is made durable by the Piper's group commit, as any outcome.
pub fn cancel_deadline(
    queue: &DirectoryQueue,
    id: &MessageId,
    to: CancelTo,
    deadline: Instant,
) -> Result<State> {
    let refused = |reason: String| Error::Refused {
        op: Operation::Cancel,
        queue: queue.root().to_path_buf(),
        id: id.clone(),
        reason,
    };
    let owner = owner(queue, id).map_err(|why| why.into_error(&refused))?;
    let piper = piper::read_adverts(queue.root())?
        .into_iter()
        .find(|p| p.live && p.pid == owner);
    match piper {
        None => {
            return Err(refused(format!(
                "it is claimed by process {owner}, which is not a Piper reading this queue \
                 (no live advert in pipers/), so nothing would act on a cancel: stop that \
                 process instead"
            )))
        }
        Some(p) if !p.cancellable => {
            return Err(refused(format!(
                "it is processed by Piper {:?} (pid {owner}), whose dirq is too old to \
                 honour cancel requests",
                p.stage
            )))
        }
        Some(_) => {}
    }
    let request = CancelRequest::new(to == CancelTo::Incoming, owner);
    let name = id.as_os_str();
    let path = piper::cancel_dir_path(queue.root()).join(name);
    let io = |e| Error::io(Operation::Cancel, &path, e);
    let dir = piper::open_cancel_dir(queue, true)
        .map_err(io)?
        .ok_or_else(|| io(io::ErrorKind::NotFound.into()))?;
    piper::write_cancel(&dir, name, &request, queue.engine().config().file_mode).map_err(io)?;
    let ours = |found: &CancelRequest| {
        found.requested_ms == request.requested_ms && found.by == request.by
    };
    let mut next_alive_check = Instant::now();
    loop {
        match piper::read_cancel(&dir, name) {
            Ok(Some(found)) if ours(&found) => {
                if let Some(answer) = found.result {
                    let _ = piper::remove_cancel(&dir, name);
                    return match answer {
                        CancelAnswer::Errors => Ok(State::Errors),
                        CancelAnswer::Incoming => Ok(State::Incoming),
                        CancelAnswer::Finished => Err(refused(
                            "its processing ended before the cancel reached it, and its \
                             outcome was carried out"
                                .to_owned(),
                        )),
                    };
                }
            }
            // Replaced by another operator's request: theirs is answered instead.
            Ok(Some(_)) => {
                return Err(refused(
                    "another cancel request for it replaced this one".to_owned(),
                ))
            }
            Ok(None) => {
                return Err(refused(format!(
                    "the request was removed before the Piper (pid {owner}) answered: it has \
                     probably ended, and dirq recover requeues what it left"
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {}
            Err(e) => return Err(io(e)),
        }
        let now = Instant::now();
        if now >= next_alive_check {
            next_alive_check = now + Duration::from_millis(500);
            if !sys::process_alive(owner) {
                let _ = piper::remove_cancel(&dir, name);
                return Err(refused(format!(
                    "the Piper (pid {owner}) ended before it answered; dirq recover requeues \
                     what it left"
                )));
            }
        }
        if now >= deadline {
            // One last look: the answer may have come just now.
            if let Ok(Some(found)) = piper::read_cancel(&dir, name) {
                if found.result.is_some() && ours(&found) {
                    continue;
                }
            }
            let _ = piper::remove_cancel(&dir, name);
            return Err(refused(format!(
                "no answer from the Piper (pid {owner}) in time; the request was withdrawn \
                 (its stage may not stop when cancelled: a cancel already under way still \
                 completes)"
            )));
        }
        std::thread::sleep(POLL.min(deadline.saturating_duration_since(now)));
    }
}

/// Why the message has no owner to ask.
enum NoOwner {
    Waiting(State),
    Failed,
    Missing,
    Orphan,
    Io(Error),
}

impl NoOwner {
    fn into_error(self, refused: &impl Fn(String) -> Error) -> Error {
        match self {
            NoOwner::Waiting(state) => refused(format!(
                "it is waiting in {state}/, not running: use dirq delete or hold"
            )),
            NoOwner::Failed => {
                refused("it is not running: it already failed and is in errors/".to_owned())
            }
            NoOwner::Missing => refused("there is no such message".to_owned()),
            NoOwner::Orphan => refused(
                "it is in pending/ but nobody owns it (its owner died): dirq recover requeues it"
                    .to_owned(),
            ),
            NoOwner::Io(e) => e,
        }
    }
}

/// The pid holding the lock on `pending/<id>`.
fn owner(queue: &DirectoryQueue, id: &MessageId) -> std::result::Result<u32, NoOwner> {
    let engine = queue.engine();
    let pending = engine.dir(State::Pending);
    let name: &OsStr = id.as_os_str();
    match pending.dir.stat_at(name) {
        Ok(st) if st.kind == EntryKind::File => {
            return sys::lock_owners(st.dev)
                .get(&st.ino)
                .copied()
                .ok_or(NoOwner::Orphan)
        }
        Ok(_) => return Err(NoOwner::Missing),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(NoOwner::Io(Error::io(
                Operation::Stat,
                pending.join(name),
                e,
            )))
        }
    }
    for state in [State::Incoming, State::Deferred, State::Hold] {
        if engine.find(state, id).map_err(NoOwner::Io)?.is_some() {
            return Err(NoOwner::Waiting(state));
        }
    }
    if engine
        .find(State::Errors, id)
        .map_err(NoOwner::Io)?
        .is_some()
    {
        return Err(NoOwner::Failed);
    }
    Err(NoOwner::Missing)
}

/// Removes the stale cancel requests of `queue`: those whose owner process is gone
/// (its message is recovered like any dead owner's), and answers whose requester is
/// gone. `dirq recover` runs it; running Pipers do the same as they go. Returns how
/// many it removed.
///
/// # Errors
///
/// [`Error::Io`] when the request directory cannot be read.
///
/// # Durability
///
/// Nothing is synced: a removal undone by a crash is redone next time.
pub fn remove_stale_cancels(queue: &DirectoryQueue) -> Result<usize> {
    piper::remove_stale_cancels(queue)
        .map_err(|e| Error::io(Operation::Recover, piper::cancel_dir_path(queue.root()), e))
}
