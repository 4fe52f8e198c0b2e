//! Editing a waiting message's content before anyone processes it (the X3 batch
//! server's "edit the parameters before the task starts").

use std::io;

use crate::engine::publish;
use crate::error::{Error, Operation, Result};
use crate::{DirectoryQueue, MessageId, State};

/// The states a message may be edited in: waiting, not claimed.
const EDITABLE: [State; 3] = [State::Incoming, State::Deferred, State::Hold];

/// Replaces the content of the waiting message `id` (in `incoming/`, `deferred/` or
/// `hold/`) by `bytes`, under the same id and in the same state (a deferred message
/// keeps its due time, a held one stays held). Returns that state.
///
/// The replacement is atomic: the new content is written and synced beside the queue
/// (in `tmp/`), then swapped with the old file in one `renameat2(RENAME_EXCHANGE)`.
/// A worker or Mentat reader that claims the message sees either the old content or
/// the new, never a mix; after a crash at any point the message exists exactly once,
/// with one or the other. Its attempt count is kept.
///
/// # Errors
///
/// Nothing is changed when:
/// - [`Error::Io`] with kind `ResourceBusy`: the message is claimed (in `pending/`),
///   also when it was claimed while the new content was being written;
/// - [`Error::Io`] with kind `NotFound`: no waiting message has this id;
/// - [`Error::EmptyMessage`]: `bytes` is blank (whitespace only), which the protocol
///   does not allow;
/// - [`Error::Move`] with kind `Unsupported`: the filesystem has no
///   `RENAME_EXCHANGE` (NFS, most FUSE).
///
/// # Durability
///
/// `Full`: the new file and both directories are synced before it returns. `Batch`:
/// at the next [`sync`](DirectoryQueue::sync). `None`: never.
pub fn replace(queue: &DirectoryQueue, id: &MessageId, bytes: &[u8]) -> Result<State> {
    let inner = queue.engine();
    // A message can move between looks (a deferred one falling due, a hold or release
    // by another operator) without being claimed: look again a few times.
    for _ in 0..4 {
        let mut moved = false;
        for state in EDITABLE {
            if inner.state_dir(state).is_none() {
                continue;
            }
            let Some(name) = inner.find(state, id)? else {
                continue;
            };
            match publish::replace(inner, state, &name, &mut &bytes[..]) {
                Ok(()) => return Ok(state),
                Err(Error::Move { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    moved = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if !moved {
            break;
        }
    }
    Err(super::not_waiting(
        queue,
        Operation::Edit,
        inner.dir(State::Incoming).join(id.as_os_str()),
        id,
        "the message is claimed by a worker; only a waiting message can be edited",
        "no message with this id is waiting (incoming, deferred or hold)",
    ))
}
