//! Storing a message under the id it carries: the one place the bridge calls the
//! queue's idempotent enqueue, and what it makes of the answer.

use crate::queue::Enqueued;
use crate::{DirectoryQueue, MessageId};

/// What became of a message an inbound bridge stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    /// Stored now.
    New,
    /// Already there (waiting, running or failed) or already finished (a `seen/`
    /// record): a redelivery or a republish, absorbed.
    Duplicate,
}

/// Stores `bytes` under `id` in `queue`, exactly once.
pub(super) fn store(queue: &DirectoryQueue, id: &MessageId, bytes: &[u8]) -> crate::Result<Stored> {
    match queue.enqueue_with_id(id, bytes)? {
        Enqueued::Stored => Ok(Stored::New),
        _ => Ok(Stored::Duplicate),
    }
}
