//! Holding messages: an operator's way to keep a message from being claimed.

use std::io;

use crate::error::{Error, Operation, Result};
use crate::{DirectoryQueue, MessageId, State};

/// Puts the message `id` on hold: it moves from `incoming/` (or `deferred/`, where
/// it loses its due time) to `hold/`, and is never claimed until
/// [`unhold`](crate::admin::unhold) puts it back. Returns the state it was in.
///
/// # Errors
///
/// - [`Error::Io`] with kind `ResourceBusy` when the message is claimed (in
///   `pending/`): hold it once it is back, or let its worker finish.
/// - [`Error::Io`] with kind `NotFound` when no waiting message has this id.
/// - [`Error::Duplicate`] when `hold/` already holds a message with this id.
///
/// # Durability
///
/// `Full`: both directories are synced. `Batch`: at the next
/// [`sync`](DirectoryQueue::sync). `None`: never.
pub fn hold(queue: &DirectoryQueue, id: &MessageId) -> Result<State> {
    let inner = queue.engine();
    let hold = inner.require(State::Hold)?;
    for from in [State::Incoming, State::Deferred] {
        let Some(dir) = inner.state_dir(from) else {
            continue;
        };
        let Some(name) = queue.engine().find(from, id)? else {
            continue;
        };
        match dir.dir.rename_noreplace(&name, &hold.dir, id.as_os_str()) {
            Ok(()) => {
                inner.syncer().changed(&[dir, hold])?;
                return Ok(from);
            }
            // Claimed or moved meanwhile: look again below.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::Duplicate {
                    op: Operation::Hold,
                    path: hold.join(id.as_os_str()),
                    id: id.clone(),
                })
            }
            Err(e) => {
                return Err(Error::moving(
                    Operation::Hold,
                    dir.join(&name),
                    hold.join(id.as_os_str()),
                    e,
                ))
            }
        }
    }
    Err(super::not_waiting(
        queue,
        Operation::Hold,
        inner.dir(State::Incoming).join(id.as_os_str()),
        id,
        "the message is claimed by a worker",
        "no message with this id is waiting",
    ))
}

/// Takes the message `id` off hold: it moves from `hold/` back to `incoming/`.
///
/// # Errors
///
/// [`Error::Io`] with kind `NotFound` when `hold/` has no such message;
/// [`Error::Duplicate`] when `incoming/` already holds a message with this id.
///
/// # Durability
///
/// As [`hold`](crate::admin::hold).
pub fn unhold(queue: &DirectoryQueue, id: &MessageId) -> Result<()> {
    let inner = queue.engine();
    let hold = inner.require(State::Hold)?;
    let incoming = inner.dir(State::Incoming);
    let name = id.as_os_str();
    match hold.dir.rename_noreplace(name, &incoming.dir, name) {
        Ok(()) => inner.syncer().changed(&[hold, incoming]),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Error::Duplicate {
            op: Operation::Unhold,
            path: incoming.join(name),
            id: id.clone(),
        }),
        // The rename's bare "No such file or directory" does not say which name.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::io(
            Operation::Unhold,
            hold.join(name),
            io::Error::new(io::ErrorKind::NotFound, "no held message with this id"),
        )),
        Err(e) => Err(Error::moving(
            Operation::Unhold,
            hold.join(name),
            incoming.join(name),
            e,
        )),
    }
}
