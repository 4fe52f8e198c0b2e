//! The async queue API on tokio (feature `tokio`): [`AsyncQueue`] and
//! [`AsyncMessage`], over the sync [`DirectoryQueue`].
//!
//! Nothing here blocks a runtime thread: every file operation (claim, read, rename,
//! sync) runs on tokio's blocking pool through [`spawn_blocking`](tokio::task::spawn_blocking),
//! at most 4 claims of one queue at a time, with one exception below. An idle claimer does not
//! hold a thread either: it waits on an inotify descriptor of `incoming/` registered
//! with the runtime's reactor (one per queue, shared by all its waiters), on the same
//! events as sync claimers, and rescans at the queue's
//! [rescan interval](crate::QueueBuilder::rescan_interval) and when a deferred message
//! falls due, in case an event was missed (events are a hint; the scan decides).
//!
//! # Runtime
//!
//! The runtime needs its I/O and time drivers (`enable_all()`, which
//! `#[tokio::main]` does). An [`AsyncQueue`] registers its watch with the runtime in
//! which it first waits: use it within that runtime.
//!
//! # Where the file work runs
//!
//! A queue in [`Durability::None`](crate::Durability::None) syncs nothing: its
//! enqueues, claims and terminals are a few renames and unlinks of microseconds, less
//! than the two thread wake-ups of a trip to the blocking pool and back (which made a
//! task's round trip run at a third of a thread's). On a multi-thread runtime those
//! run through [`block_in_place`](tokio::task::block_in_place) instead: tokio first
//! hands the worker's other tasks (and the reactor, if that thread drives it) to
//! another thread, then the task's own thread does the work and goes on. What that
//! costs: other futures polled by the same task (in a `join!`, a `select!`, a
//! `FuturesUnordered`) wait for those microseconds. Reads of a message's body, every
//! operation of a queue that syncs, and everything on a current-thread runtime (where
//! `block_in_place` is not allowed) use the blocking pool.
//!
//! # Cancellation
//!
//! Every future of this module may be dropped at any await point without losing a
//! message:
//!
//! - a claim ([`claim`](AsyncQueue::claim), [`claim_timeout`](AsyncQueue::claim_timeout),
//!   [`try_claim`](AsyncQueue::try_claim), the [`messages`](AsyncQueue::messages)
//!   stream) either claimed nothing, or the message it claimed is released back into
//!   `incoming/`, counting the attempt;
//! - a terminal ([`commit`](AsyncMessage::commit) and the others) that has started
//!   runs to completion on the blocking pool; if it failed and handed the message back,
//!   that message is released;
//! - an enqueue that has started completes: the message is published, but its id is
//!   not returned.
//!
//! A release that a runtime shutting down drops unrun is done in place by the thread
//! that drops it. If the process dies first, the message stays in `pending/`, and the
//! next [`recover`](DirectoryQueue::recover) requeues it, as for a sync
//! [`Message`](crate::Message) dropped without a terminal.

mod message;
mod stream;
mod wake;

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use message::{AsyncMessage, TerminalError};
pub use stream::Messages;

use crate::error::{Error, Operation, Result};
use crate::format::id::MessageId;
use crate::format::state::State;
use crate::queue::DirectoryQueue;
use wake::AsyncWake;

/// How many claims of one queue run on the blocking pool at once. A thousand idle
/// claimers woken by one arrival would otherwise ask the pool for a thousand threads;
/// one claim takes microseconds, so a few lanes keep up.
const BLOCKING_CLAIMS: usize = 4;

/// A [`DirectoryQueue`] for async code: the same queue, the same protocol, other
/// processes and sync handles included; its futures do their file I/O on tokio's
/// blocking pool and wait for messages on the reactor.
///
/// Cheap to clone; clones share the sync handle, its snapshot and one watch.
///
/// # Example
///
/// ```
/// use dirq::{DirectoryQueue, aio::AsyncQueue};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> dirq::Result<()> {
/// let dir = tempfile::tempdir().expect("tempdir");
/// let queue = AsyncQueue::from(DirectoryQueue::open(dir.path().join("q"))?);
/// let id = queue.enqueue(b"hello".to_vec()).await?;
/// let message = queue.claim().await?;          // waits for a message; no thread parked
/// assert_eq!(message.id(), &id);
/// assert_eq!(message.bytes().await?, b"hello");
/// message.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AsyncQueue {
    inner: Arc<Inner>,
}

struct Inner {
    queue: DirectoryQueue,
    /// Created in the runtime of the first claimer that waits.
    wake: OnceLock<AsyncWake>,
    /// Lanes of the blocking pool for claims ([`BLOCKING_CLAIMS`]).
    claims: Arc<Semaphore>,
}

impl From<DirectoryQueue> for AsyncQueue {
    fn from(queue: DirectoryQueue) -> AsyncQueue {
        AsyncQueue {
            inner: Arc::new(Inner {
                queue,
                wake: OnceLock::new(),
                claims: Arc::new(Semaphore::new(BLOCKING_CLAIMS)),
            }),
        }
    }
}

impl AsRef<DirectoryQueue> for AsyncQueue {
    fn as_ref(&self) -> &DirectoryQueue {
        &self.inner.queue
    }
}

impl AsyncQueue {
    /// The sync handle underneath, for what this type does not offer (counts,
    /// listings, recovery).
    pub fn sync_queue(&self) -> &DirectoryQueue {
        &self.inner.queue
    }

    /// Adds a message; see [`DirectoryQueue::enqueue`].
    ///
    /// If this future is dropped once it has started, the message is still published.
    ///
    /// # Errors
    ///
    /// As [`DirectoryQueue::enqueue`].
    ///
    /// # Durability
    ///
    /// As [`DirectoryQueue::enqueue`].
    pub async fn enqueue(&self, bytes: impl AsRef<[u8]> + Send + 'static) -> Result<MessageId> {
        let queue = self.inner.queue.clone();
        file_work(lane(&queue), move || queue.enqueue(bytes)).await
    }

    /// Adds a message under a given id unless the queue has it or remembers it; see
    /// [`DirectoryQueue::enqueue_with_id`].
    ///
    /// If this future is dropped once it has started, the call still completes.
    ///
    /// # Errors
    ///
    /// As [`DirectoryQueue::enqueue_with_id`].
    ///
    /// # Durability
    ///
    /// As [`DirectoryQueue::enqueue_with_id`].
    pub async fn enqueue_with_id(
        &self,
        id: MessageId,
        bytes: impl AsRef<[u8]> + Send + 'static,
    ) -> Result<crate::queue::Enqueued> {
        let queue = self.inner.queue.clone();
        file_work(lane(&queue), move || queue.enqueue_with_id(&id, bytes)).await
    }

    /// Adds a message that waits in `deferred/` until `not_before`; see
    /// [`DirectoryQueue::enqueue_at`].
    ///
    /// # Errors
    ///
    /// As [`DirectoryQueue::enqueue_at`].
    ///
    /// # Durability
    ///
    /// As [`DirectoryQueue::enqueue_at`].
    pub async fn enqueue_at(
        &self,
        bytes: impl AsRef<[u8]> + Send + 'static,
        not_before: SystemTime,
    ) -> Result<MessageId> {
        let queue = self.inner.queue.clone();
        file_work(lane(&queue), move || queue.enqueue_at(bytes, not_before)).await
    }

    /// Adds `value` as a JSON message; see [`DirectoryQueue::enqueue_json`]. The value
    /// is serialized before the file work moves to the blocking pool.
    ///
    /// # Errors
    ///
    /// As [`DirectoryQueue::enqueue_json`].
    ///
    /// # Durability
    ///
    /// As [`DirectoryQueue::enqueue_json`].
    pub async fn enqueue_json<T: serde::Serialize + ?Sized>(&self, value: &T) -> Result<MessageId> {
        let queue = self.inner.queue.clone();
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Error::json(Operation::Encode, queue.path(State::Incoming), e))?;
        file_work(lane(&queue), move || queue.enqueue(bytes)).await
    }

    /// Adds several messages at once, syncing once for all; see
    /// [`DirectoryQueue::enqueue_batch`].
    ///
    /// # Errors
    ///
    /// As [`DirectoryQueue::enqueue_batch`].
    ///
    /// # Durability
    ///
    /// As [`DirectoryQueue::enqueue_batch`].
    pub async fn enqueue_batch<I>(&self, items: I) -> Result<Vec<MessageId>>
    where
        I: IntoIterator + Send + 'static,
        I::Item: AsRef<[u8]>,
    {
        let queue = self.inner.queue.clone();
        file_work(lane(&queue), move || queue.enqueue_batch(items)).await
    }

    /// Claims the oldest message in `incoming/` if there is one, without waiting for
    /// one to arrive; see [`DirectoryQueue::try_claim`].
    ///
    /// # Cancellation
    ///
    /// Dropping the future never strands a message: the claim runs on the blocking
    /// pool, and a message it claimed for a future that is gone is released.
    ///
    /// # Errors
    ///
    /// As [`DirectoryQueue::try_claim`].
    ///
    /// # Durability
    ///
    /// As [`DirectoryQueue::try_claim`].
    pub async fn try_claim(&self) -> Result<Option<AsyncMessage>> {
        self.look(None).await
    }

    /// One claim attempt, off the reactor (see [`file_work`]), through a lane. With `Some(events)`,
    /// skipped (`None`) when a look that began at that event count or later, perhaps
    /// while this one waited for its lane, found nothing; a look that finds nothing
    /// says so.
    async fn look(&self, events: Option<u64>) -> Result<Option<AsyncMessage>> {
        let permit = Arc::clone(&self.inner.claims)
            .acquire_owned()
            .await
            .expect("the claim semaphore is never closed");
        let wake = self.inner.wake.get();
        if let (Some(wake), Some(events)) = (wake, events) {
            if wake.looked_empty(events) {
                return Ok(None);
            }
        }
        let queue = self.inner.queue.clone();
        // IMPORTANT: the message becomes an AsyncMessage on the blocking thread, before
        // it is handed over: if this future is gone by then, dropping the result
        // releases the message instead of leaving it in pending/.
        let claimed = file_work(lane(&queue), move || {
            queue.try_claim().map(|m| m.map(AsyncMessage::new))
        })
        .await;
        // Held until the result is back, not just until the claim returned on the
        // pool: by then its thread is idle again, so the next claim reuses it rather
        // than asking tokio for a new one. (A dropped future frees its lane early.)
        drop(permit);
        if let (Some(wake), Some(events), Ok(None)) = (wake, events, &claimed) {
            wake.found_empty(events);
        }
        claimed
    }

    /// Claims the oldest message, waiting as long as it takes for one to arrive,
    /// without holding a thread while it waits.
    ///
    /// # Cancellation
    ///
    /// Cancel-safe: dropped at any await point (a `select!`, a timeout, an aborted
    /// task), the future either claimed nothing or its message is released back into
    /// `incoming/` (counting the attempt), never left in `pending/`.
    ///
    /// # Errors
    ///
    /// As [`DirectoryQueue::try_claim`].
    ///
    /// # Durability
    ///
    /// As [`DirectoryQueue::try_claim`].
    pub async fn claim(&self) -> Result<AsyncMessage> {
        loop {
            if let Some(message) = self.claim_until(None).await? {
                return Ok(message);
            }
        }
    }

    /// Claims the oldest message, waiting at most `timeout` for one; `None` when none
    /// came.
    ///
    /// # Cancellation
    ///
    /// As [`claim`](AsyncQueue::claim).
    ///
    /// # Errors
    ///
    /// As [`DirectoryQueue::try_claim`].
    ///
    /// # Durability
    ///
    /// As [`DirectoryQueue::try_claim`].
    pub async fn claim_timeout(&self, timeout: Duration) -> Result<Option<AsyncMessage>> {
        match std::time::Instant::now().checked_add(timeout) {
            Some(deadline) => self.claim_deadline(deadline).await,
            None => self.claim().await.map(Some),
        }
    }

    /// Claims the oldest message, waiting until `deadline` for one; `None` when none
    /// came.
    ///
    /// # Cancellation
    ///
    /// As [`claim`](AsyncQueue::claim).
    ///
    /// # Errors
    ///
    /// As [`DirectoryQueue::try_claim`].
    ///
    /// # Durability
    ///
    /// As [`DirectoryQueue::try_claim`].
    pub async fn claim_deadline(
        &self,
        deadline: std::time::Instant,
    ) -> Result<Option<AsyncMessage>> {
        self.claim_until(Some(Instant::from_std(deadline))).await
    }

    /// The claimed messages, one after another, as a [`Stream`](futures_core::Stream)
    /// that waits like [`claim`](AsyncQueue::claim). It never ends; an error is an item
    /// and the stream goes on.
    ///
    /// Dropping the stream while it waits is safe, as dropping a `claim()` future is.
    pub fn messages(&self) -> Messages {
        Messages::new(self.clone())
    }

    /// The claim loop: look, then wait for an arrival, a rescan or a due time.
    async fn claim_until(&self, deadline: Option<Instant>) -> Result<Option<AsyncMessage>> {
        let wake = self.wake();
        let mut seen = wake.subscribe();
        // Whether the last wake-up was a timer's (rescan, due time): then look even if
        // another waiter's look just found nothing, since the point is to look anew.
        let mut timer = false;
        loop {
            // Marked seen before looking, so an arrival during the look wakes us.
            seen.borrow_and_update();
            let events = wake.events();
            if let Some(message) = self.look((!timer).then_some(events)).await? {
                return Ok(Some(message));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            let next = Instant::from_std(self.inner.queue.next_wake(now.into_std()));
            let until = deadline.map_or(next, |d| d.min(next));
            timer = first_of(
                async {
                    // An error means the sender is gone, which it is not while we
                    // borrow it; either way, looking again is right.
                    let _ = seen.changed().await;
                    false
                },
                async {
                    wake.arrival().await;
                    false
                },
                async {
                    tokio::time::sleep_until(until).await;
                    true
                },
            )
            .await;
        }
    }

    fn wake(&self) -> &AsyncWake {
        self.inner
            .wake
            .get_or_init(|| AsyncWake::new(self.inner.queue.arrivals_watch()))
    }
}

impl fmt::Debug for AsyncQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncQueue")
            .field("queue", &self.inner.queue)
            .finish_non_exhaustive()
    }
}

/// Waits for the first of three futures and returns its output, dropping the others
/// (`select!` without the `macros` feature).
async fn first_of<T>(
    a: impl Future<Output = T>,
    b: impl Future<Output = T>,
    c: impl Future<Output = T>,
) -> T {
    let (mut a, mut b, mut c) = (pin!(a), pin!(b), pin!(c));
    poll_fn(|cx| {
        for poll in [
            a.as_mut().poll(cx),
            b.as_mut().poll(cx),
            c.as_mut().poll(cx),
        ] {
            if poll.is_ready() {
                return poll;
            }
        }
        Poll::Pending
    })
    .await
}

/// Where a queue's file work runs; see the module's docs, "Where the file work runs".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// tokio's blocking pool.
    Pool,
    /// The task's own thread, through `block_in_place`, where the runtime allows it.
    InPlace,
}

/// The lane for `queue`'s enqueues, claims and terminals: in place when nothing is
/// synced, so that the work is shorter than a trip to the pool.
fn lane(queue: &DirectoryQueue) -> Lane {
    if queue.durability() == crate::Durability::None {
        Lane::InPlace
    } else {
        Lane::Pool
    }
}

/// Runs `work` in `lane` and waits for it: in place only on a multi-thread runtime,
/// the only kind that can hand its worker's other tasks over; on the pool otherwise.
async fn file_work<T, F>(lane: Lane, work: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let in_place = lane == Lane::InPlace
        && tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if in_place {
        let done = tokio::task::block_in_place(work);
        // Work done in place never made the task wait: without this, a loop of such
        // operations would not yield, and other tasks of its worker would starve.
        tokio::task::consume_budget().await;
        return done;
    }
    blocking(work).await
}

/// Runs `work` on the blocking pool and waits for it. Its panic is resumed here; if
/// the runtime shuts down before it ran, this future never completes (the runtime is
/// dropping it anyway).
async fn blocking<T, F>(work: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => std::future::pending().await,
    }
}
