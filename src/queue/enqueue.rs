//! Enqueueing: new messages into `incoming/` (or `deferred/`), one at a time or in a
//! batch behind one barrier.

use std::io::Read;
use std::time::SystemTime;

use serde::Serialize;

use super::DirectoryQueue;
use crate::engine::group::next_turn;
use crate::engine::publish::{empty, publish_batch, write_new, Destination, TmpFile};
use crate::error::{Error, Operation, Result};
use crate::format::group::Group;
use crate::format::id::MessageId;
use crate::format::state::State;

/// What [`DirectoryQueue::enqueue_with_id`] found, and so whether it stored the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Enqueued {
    /// The message was stored under the id, in `incoming/`.
    Stored,
    /// A message with this id is already in the queue, in this state; nothing was
    /// written.
    AlreadyQueued(State),
    /// A message with this id was finished (committed, forwarded or deleted) recently
    /// enough that the queue still remembers it in `seen/`; nothing was written.
    AlreadyFinished,
}

impl Enqueued {
    /// Whether this call stored the message (and not an earlier one).
    pub fn is_stored(self) -> bool {
        self == Enqueued::Stored
    }
}

impl DirectoryQueue {
    /// Enqueues `bytes` as a new message and returns its id.
    ///
    /// The message is written to `tmp/` under its id (exclusive create), synced, and
    /// published by an atomic rename into `incoming/`, where consumers see it complete
    /// or not at all.
    ///
    /// # Errors
    ///
    /// - [`Error::EmptyMessage`] for empty or whitespace-only bytes (Mentat treats
    ///   those as errors); nothing is written.
    /// - [`Error::Io`] naming the path for any system error (`ENOSPC`, `EDQUOT`,
    ///   `EIO`, ...). The file in `tmp/` is removed and nothing appears in `incoming/`;
    ///   if the final directory sync fails, the just-published message is taken back
    ///   out of `incoming/` unless a consumer already claimed it.
    ///
    /// # Durability
    ///
    /// `Full`: the file and `incoming/` are synced before this returns. `Batch`: the
    /// file is synced, `incoming/` at the next [`sync`](DirectoryQueue::sync).
    /// `None`: nothing is synced.
    pub fn enqueue(&self, bytes: impl AsRef<[u8]>) -> Result<MessageId> {
        write_new(self.engine(), bytes.as_ref(), None)?.publish(Destination::Incoming)
    }

    /// Enqueues `bytes` for delivery at `not_before`: the message waits in `deferred/`
    /// and moves to `incoming/` when a claimer of the queue finds it due. A time not in
    /// the future delivers at once.
    ///
    /// # Errors
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue); [`Error::Layout`] when the queue has no
    /// `deferred/` (opened without permission to create it).
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue), with `deferred/` in place of `incoming/`.
    pub fn enqueue_at(&self, bytes: impl AsRef<[u8]>, not_before: SystemTime) -> Result<MessageId> {
        let tmp = write_new(self.engine(), bytes.as_ref(), None)?;
        if not_before <= SystemTime::now() {
            return tmp.publish(Destination::Incoming);
        }
        tmp.publish(Destination::Deferred(not_before))
    }

    /// Enqueues `bytes` under a given id, so that a producer that may repeat itself
    /// (after a crash, a redelivery by a broker) cannot make a duplicate: the id is the
    /// idempotency key. Returns what it found; only [`Enqueued::Stored`] wrote anything.
    ///
    /// # Errors
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue). Finding the id already there is not an
    /// error but an [`Enqueued`] answer.
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue).
    pub fn enqueue_with_id(&self, id: &MessageId, bytes: impl AsRef<[u8]>) -> Result<Enqueued> {
        let mut tmp = write_new(self.engine(), bytes.as_ref(), Some(id))?;
        tmp.fix_id(id);
        match tmp.publish(Destination::Incoming) {
            Ok(_) => Ok(Enqueued::Stored),
            Err(Error::Duplicate { .. }) => Ok(Enqueued::AlreadyQueued(State::Incoming)),
            Err(e) => Err(e),
        }
    }

    /// Enqueues `value` serialised as JSON.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] with [`Operation::Encode`] when `value` cannot be serialised;
    /// otherwise as [`enqueue`](DirectoryQueue::enqueue).
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue).
    pub fn enqueue_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<MessageId> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            Error::json(
                Operation::Encode,
                &self.engine().dir(State::Incoming).path,
                e,
            )
        })?;
        self.enqueue(bytes)
    }

    /// Enqueues everything `reader` yields, streamed through a 64 KiB buffer: a message
    /// of any size needs no more memory than that.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Read`] naming the queue's `tmp/` file when the
    /// reader fails; otherwise as [`enqueue`](DirectoryQueue::enqueue). The partial file
    /// is removed in every case.
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue).
    pub fn enqueue_reader(&self, reader: impl Read) -> Result<MessageId> {
        self.enqueue_reader_to(reader, Destination::Incoming)
    }

    /// Enqueues everything `reader` yields, streamed as by
    /// [`enqueue_reader`](DirectoryQueue::enqueue_reader), for delivery at
    /// `not_before`, as [`enqueue_at`](DirectoryQueue::enqueue_at) does: the message
    /// waits in `deferred/`, and a time not in the future delivers at once.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use dirq::{DirectoryQueue, State};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let queue = DirectoryQueue::open(dir.path().join("q"))?;
    /// let in_ten_minutes = SystemTime::now() + Duration::from_secs(600);
    /// queue.enqueue_reader_at(&b"later"[..], in_ten_minutes)?;
    /// assert_eq!(queue.count(State::Deferred)?, 1);
    /// assert!(queue.try_claim()?.is_none(), "not due yet");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`enqueue_reader`](DirectoryQueue::enqueue_reader); [`Error::Layout`] when
    /// the queue has no `deferred/` (opened without permission to create it).
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue), with `deferred/` in place of
    /// `incoming/` when the time is in the future.
    pub fn enqueue_reader_at(
        &self,
        reader: impl Read,
        not_before: SystemTime,
    ) -> Result<MessageId> {
        // The time is compared once the bytes are in: a slow reader can make a due
        // time pass meanwhile, and a message already due goes straight to incoming/.
        self.enqueue_reader_to(reader, Destination::Deferred(not_before))
    }

    /// Enqueues `bytes` as a new member of `group` and returns its id, which names the
    /// group (see [`Group`]).
    ///
    /// - When a member fails (moved to `errors/` by a failure, a dead letter after
    ///   the last retry, a timeout or an expiry), every member still waiting
    ///   (`incoming/`, `deferred/`, `hold/`, `chained/`) moves to `errors/` with
    ///   reason `cancelled: <id> failed: <reason>`; members being processed finish.
    ///   [`admin::requeue_group`](crate::admin::requeue_group) brings the group back.
    /// - In an [ordered](Group::ordered) group, the member waits in `chained/` until
    ///   every member before it has been committed or forwarded (none is in
    ///   `incoming/`, `pending/`, `deferred/`, `hold/` or `errors/`), then moves to
    ///   `incoming/`. Members are ordered by id, that is by when they were enqueued.
    ///
    /// Both hold across processes and crashes: recovery ([`recover`](DirectoryQueue::recover))
    /// completes a cancellation or a turn that a crash interrupted. Mentat readers see
    /// members as ordinary messages in `incoming/`, and never a chain member before its
    /// turn.
    ///
    /// ```
    /// use dirq::{DirectoryQueue, State};
    /// use dirq::queue::Group;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let queue = DirectoryQueue::open(dir.path().join("q"))?;
    /// let chain = Group::ordered("nightly")?;
    /// let first = queue.enqueue_in_group(&chain, b"extract")?;
    /// let second = queue.enqueue_in_group(&chain, b"load")?;
    /// assert_eq!(queue.count(State::Chained)?, 1, "load waits for extract");
    /// let message = queue.try_claim()?.expect("extract");
    /// assert_eq!(message.id(), &first);
    /// message.commit()?;
    /// assert_eq!(queue.try_claim()?.expect("load, now").id(), &second);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue); [`Error::Layout`] for an ordered group
    /// when the queue has no `chained/` (opened without permission to create it).
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue), with `chained/` in place of `incoming/`
    /// for an ordered group; a member let in at once is synced into `incoming/` as the
    /// mode says.
    pub fn enqueue_in_group(&self, group: &Group, bytes: impl AsRef<[u8]>) -> Result<MessageId> {
        self.enqueue_reader_in_group(group, bytes.as_ref())
    }

    /// Streams what `reader` yields into a new member of `group`, as
    /// [`enqueue_reader`](DirectoryQueue::enqueue_reader) does; see
    /// [`enqueue_in_group`](DirectoryQueue::enqueue_in_group).
    ///
    /// # Errors
    ///
    /// As [`enqueue_in_group`](DirectoryQueue::enqueue_in_group).
    ///
    /// # Durability
    ///
    /// As [`enqueue_in_group`](DirectoryQueue::enqueue_in_group).
    pub fn enqueue_reader_in_group(
        &self,
        group: &Group,
        mut reader: impl Read,
    ) -> Result<MessageId> {
        let inner = self.engine();
        let id = MessageId::from_name(
            group
                .member_name(&MessageId::generate().to_string())
                .as_ref(),
        );
        let mut tmp = TmpFile::create(inner, Some(&id))?;
        tmp.fix_id(&id);
        tmp.copy_from(&mut reader)?;
        if tmp.is_blank() {
            return Err(empty(inner));
        }
        if !group.is_ordered() {
            return tmp.publish(Destination::Incoming);
        }
        let id = tmp.publish(Destination::Chained)?;
        next_turn(inner, group)?;
        Ok(id)
    }

    fn enqueue_reader_to(
        &self,
        mut reader: impl Read,
        destination: Destination,
    ) -> Result<MessageId> {
        let mut tmp = TmpFile::create(self.engine(), None)?;
        tmp.copy_from(&mut reader)?;
        if tmp.is_blank() {
            return Err(empty(self.engine()));
        }
        match destination {
            Destination::Deferred(at) if at <= SystemTime::now() => {
                tmp.publish(Destination::Incoming)
            }
            destination => tmp.publish(destination),
        }
    }

    /// Enqueues many messages behind one durability barrier (group commit) and returns
    /// their ids in order.
    ///
    /// All files are written first, then synced, then published, then `incoming/` is
    /// synced once. Throughput with full durability is therefore many times that of
    /// single enqueues.
    ///
    /// # Errors
    ///
    /// - [`Error::EmptyMessage`] or an I/O error before publishing: nothing is
    ///   published and every `tmp/` file is removed.
    /// - [`Error::PartialBatch`] when publishing stopped part-way: it lists the ids
    ///   that were published (and remain, synced as far as possible); the rest are
    ///   removed.
    ///
    /// # Durability
    ///
    /// `Full` and `Batch`: every file and `incoming/` are synced before this returns.
    /// `None`: nothing is synced.
    pub fn enqueue_batch<I>(&self, items: I) -> Result<Vec<MessageId>>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        publish_batch(self.engine(), items)
    }
}
