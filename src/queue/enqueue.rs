//! Enqueueing: new messages into `incoming/` (or `deferred/`), one at a time or in a
//! batch behind one barrier.

use std::io::Read;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::DirectoryQueue;
use crate::engine::group::next_turn;
pub use crate::engine::idempotent::Enqueued;
use crate::engine::idempotent::{answer_early, publish_batch_once, publish_once};
use crate::engine::publish::{empty, is_blank, publish_batch, write_new, Destination, TmpFile};
use crate::error::{Error, Operation, Result};
use crate::format::group::Group;
use crate::format::id::MessageId;
use crate::format::state::State;

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

    /// Enqueues `bytes` under a given id unless the queue already has a message with
    /// this id or remembers finishing one: the id is the idempotency key of a producer
    /// that may repeat itself (after a crash, or a broker's redelivery). Returns what it
    /// found; only [`Enqueued::Stored`] wrote anything.
    ///
    /// ```
    /// use dirq::{DirectoryQueue, Enqueued, MessageId, State};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let queue = DirectoryQueue::open(dir.path().join("q"))?;
    /// let id = MessageId::new("order-17")?;
    /// assert_eq!(queue.enqueue_with_id(&id, b"ship it")?, Enqueued::Stored);
    /// let claimed = queue.try_claim()?.expect("the order");
    /// assert_eq!(
    ///     queue.enqueue_with_id(&id, b"ship it")?,
    ///     Enqueued::AlreadyQueued(State::Pending)
    /// );
    /// # drop(claimed);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// The message is written and synced in `tmp/`, then, while calls for the same id
    /// take turns (a lock file in `seen/`, shared by the ids that hash to it), renamed
    /// to `incoming/<id>` without replacing anything, still locked so that no claimer
    /// takes it yet; then `pending/`, `deferred/`, `hold/`, `chained/`, `errors/` and
    /// `seen/` are checked in that order, and the new file is taken back out if one
    /// has the id. Moves between those states only go forward in that order, and no
    /// message can enter `incoming/` while the new file holds the name, so a message
    /// that moves during the check is found where it went.
    ///
    /// A finished message is refused only while the queue
    /// [remembers finished ids](crate::QueueBuilder::remember_finished); otherwise its
    /// id is new again once it has left.
    ///
    /// What is not covered (docs/protocol.md, "seen/ and idempotent enqueue"):
    /// - A message with this id that was enqueued by anything else than
    ///   `enqueue_with_id` (a plain publish that names its file itself, a Mentat
    ///   writer) does not take turns; it is still found, unless it arrives in
    ///   `incoming/` after the check.
    /// - A claimer that does not lock (a Mentat reader) may claim the new file during
    ///   the check; if the check then finds another copy, both are kept and this
    ///   returns [`Enqueued::Stored`].
    /// - In `errors/`, only a message under its own id is found, not one stored as
    ///   `<id>~N` beside an earlier failure.
    /// - [`Enqueued::AlreadyQueued`] can name a message that another writer of the
    ///   same id has published but whose `incoming/` sync is still to come, if that
    ///   writer did not use `enqueue_with_id`.
    ///
    /// # Errors
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue), and [`Error::Io`] with
    /// [`Operation::Remember`] when `seen/` (its lock files, its records) cannot be
    /// created or read. Finding the id is not an error but an [`Enqueued`] answer.
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue): `Full` syncs the file and `incoming/`
    /// before this returns; the id's turn ends only after that, so that a later call
    /// that answers [`Enqueued::AlreadyQueued`] names a durable message.
    pub fn enqueue_with_id(&self, id: &MessageId, bytes: impl AsRef<[u8]>) -> Result<Enqueued> {
        if is_blank(bytes.as_ref()) {
            return Err(empty(self.engine()));
        }
        self.enqueue_reader_with_id(id, bytes.as_ref())
    }

    /// Streams what `reader` yields into a message under a given id, as
    /// [`enqueue_reader`](DirectoryQueue::enqueue_reader) does, unless the queue
    /// already has the id; see [`enqueue_with_id`](DirectoryQueue::enqueue_with_id).
    /// When the id is found before anything is written (remembered as finished, or
    /// waiting in `incoming/`), `reader` is not read at all.
    ///
    /// # Errors
    ///
    /// As [`enqueue_with_id`](DirectoryQueue::enqueue_with_id), and as
    /// [`enqueue_reader`](DirectoryQueue::enqueue_reader) when the reader fails.
    ///
    /// # Durability
    ///
    /// As [`enqueue_with_id`](DirectoryQueue::enqueue_with_id).
    pub fn enqueue_reader_with_id(
        &self,
        id: &MessageId,
        mut reader: impl Read,
    ) -> Result<Enqueued> {
        let inner = self.engine();
        if let Some(answer) = answer_early(inner, id)? {
            return Ok(answer);
        }
        let mut tmp = TmpFile::create(inner, Some(id))?;
        tmp.fix_id(id);
        tmp.copy_from(&mut reader)?;
        if tmp.is_blank() {
            return Err(empty(inner));
        }
        publish_once(inner, tmp, id)
    }

    /// Enqueues several messages, each under its own id, as
    /// [`enqueue_with_id`](DirectoryQueue::enqueue_with_id) does for one, and returns
    /// an answer per item, in order. The work is shared: the turns of all the ids are
    /// taken at once and held until the end, `seen/` is looked at twice and
    /// `deferred/` scanned once for the whole batch, the files are synced together and
    /// `incoming/` once. What the protocol guarantees and does not is that of
    /// `enqueue_with_id`; an id that appears twice in `items` is stored once, and the
    /// second answers [`Enqueued::AlreadyQueued`].
    ///
    /// ```
    /// use dirq::{DirectoryQueue, Enqueued, MessageId, State};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let queue = DirectoryQueue::open(dir.path().join("q"))?;
    /// let (a, b) = (MessageId::new("order-1")?, MessageId::new("order-2")?);
    /// queue.enqueue_with_id(&a, b"first")?;
    /// let answers = queue.enqueue_batch_with_id(&[(a, "again"), (b, "second")])?;
    /// assert_eq!(answers[0].as_ref().ok(), Some(&Enqueued::AlreadyQueued(State::Incoming)));
    /// assert_eq!(answers[1].as_ref().ok(), Some(&Enqueued::Stored));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// An item's own error is its answer: [`Error::EmptyMessage`] for blank bytes,
    /// [`Error::Io`] when its file cannot be written or published; the other items go
    /// on. The call fails as a whole, with nothing of the batch left in the queue
    /// unless a claimer already took it, when what concerns the batch fails:
    /// [`Error::Io`] with [`Operation::Remember`] for `seen/` (its lock files, its
    /// records), a scan of a state directory, or a sync (then, as for
    /// [`enqueue_batch`](DirectoryQueue::enqueue_batch), [`Error::PartialBatch`] names
    /// what a claimer took meanwhile).
    ///
    /// # Durability
    ///
    /// As [`enqueue_batch`](DirectoryQueue::enqueue_batch): the files are synced
    /// before they are published, and `incoming/` once after, as the mode says; the
    /// turns end only after that.
    pub fn enqueue_batch_with_id<B: AsRef<[u8]>>(
        &self,
        items: &[(MessageId, B)],
    ) -> Result<Vec<Result<Enqueued>>> {
        publish_batch_once(self.engine(), items)
    }

    /// How long the queue remembers the ids of finished messages (see
    /// [`QueueBuilder::remember_finished`](crate::QueueBuilder::remember_finished)), as
    /// this handle last read its setting, at most a second ago; `None` when it does
    /// not.
    pub fn remembers_finished(&self) -> Option<Duration> {
        self.engine().seen().ttl(self.engine().root_dir())
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
