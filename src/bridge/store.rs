//! Storing messages under the ids they carry: the one place the bridge calls the
//! queue's idempotent enqueue, and what it makes of the answers.

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

/// Stores each `(id, bytes)` of a pulled batch in `queue` under its id, exactly once,
/// through one batched idempotent enqueue: an answer per item, or the batch's error
/// (a lock, a look, a sync), after which none of it is to be acked.
pub(super) fn store_batch<B: AsRef<[u8]>>(
    queue: &DirectoryQueue,
    items: &[(MessageId, B)],
) -> crate::Result<Vec<crate::Result<Stored>>> {
    let answers = queue.enqueue_batch_with_id(items)?;
    Ok(answers
        .into_iter()
        .map(|answer| {
            answer.map(|found| match found {
                Enqueued::Stored => Stored::New,
                _ => Stored::Duplicate,
            })
        })
        .collect())
}
