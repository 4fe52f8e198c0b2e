//! Acting on a message whose worker is stuck in its stage (a timeout, or a drain that
//! ran out of time). The worker still holds the message and its lock; the supervisor
//! moves the file by name, which needs no lock, and the worker discards the message
//! when its stage returns. Only the supervisor acts: the job's state decides who.

use std::io;
use std::time::SystemTime;

use crate::engine::quarantine::{move_to_errors, Moved};
use crate::error::{Error, Operation, Result};
use crate::format::attempts;
use crate::format::deferred::deferred_name;
use crate::format::meta::FailureInfo;
use crate::{DirectoryQueue, MessageId, State};

/// What to do with the stuck worker's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// To `errors/` with this reason.
    Fail(&'static str),
    /// To `deferred/` with backoff, or `errors/` after the last attempt.
    Retry(&'static str),
    /// Back to `incoming/` (the shutdown did not wait for it).
    Release,
}

/// Carries out `action` on the message `id` in `queue`'s `pending/`: its attempt count,
/// and whether it went to `errors/`.
pub(super) fn take_over(
    queue: &DirectoryQueue,
    id: &MessageId,
    action: Action,
) -> Result<(u32, bool)> {
    let inner = queue.engine();
    let pending = inner.dir(State::Pending);
    let name = id.as_os_str();
    let path = pending.join(name);
    // Opened only to update the attempt count; the stuck worker keeps its lock.
    let file = pending
        .dir
        .open_read(name)
        .map_err(|e| Error::io(Operation::Recover, &path, e))?;
    let attempts = attempts::read(&file, inner.identity()).unwrap_or(0) + 1;
    let _ = attempts::write(&file, inner.identity(), attempts);
    let allowed = inner.config().retry.max_attempts();
    let (target, destination) = match action {
        Action::Fail(reason) => {
            return fail(queue, id, reason, attempts).map(|()| (attempts, true))
        }
        Action::Retry(reason) if attempts >= allowed => {
            return fail(queue, id, reason, attempts).map(|()| (attempts, true))
        }
        Action::Retry(reason) => {
            let _ = attempts::write_reason(&file, reason);
            let delay = inner
                .config()
                .retry
                .jittered(attempts, crate::sys::random::unit());
            let deferred = inner.require(State::Deferred)?;
            (deferred, deferred_name(id, SystemTime::now() + delay))
        }
        Action::Release => (inner.dir(State::Incoming), name.to_os_string()),
    };
    pending
        .dir
        .rename_noreplace(name, &target.dir, &destination)
        .map_err(|e| Error::moving(Operation::TakeOver, &path, target.join(&destination), e))?;
    inner
        .syncer()
        .changed(&[pending, target])
        .map(|()| (attempts, false))
}

fn fail(queue: &DirectoryQueue, id: &MessageId, reason: &str, attempts: u32) -> Result<()> {
    let inner = queue.engine();
    let info = FailureInfo::now(reason.to_owned(), attempts, State::Pending);
    match move_to_errors(
        inner,
        State::Pending,
        id.as_os_str(),
        &info,
        Operation::Fail,
    )? {
        Moved::To { synced, .. } => {
            synced?;
            crate::engine::group::after_failure(inner, id, reason);
            Ok(())
        }
        Moved::Gone => Err(Error::io(
            Operation::Fail,
            inner.dir(State::Pending).join(id.as_os_str()),
            io::Error::new(io::ErrorKind::NotFound, "the message left pending/"),
        )),
    }
}
