//! Group commit: the one barrier of a Piper. Workers hand it every outcome they carry
//! out; it closes a batch at a size or a deadline and syncs each directory the batch
//! touched once. An input message whose results were published into outputs (emitted,
//! or copied to other outputs) is removed only by the barrier, after those results are
//! durable: after a power cut, a message is either still upstream or durably
//! downstream (docs/protocol.md §6.7).
//!
//! The Piper's queue handles defer their directory syncs
//! ([`DirectoryQueue::reopen_deferring_syncs`]), so nothing else syncs a directory
//! while it runs; in [`Durability::None`](crate::Durability::None) there is no barrier
//! and workers do everything themselves.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::stats::Counters;
use super::{error_chain, Shared};
use crate::error::{Error, Result};
use crate::queue::TerminalError;
use crate::{DirectoryQueue, Message};

/// What is left to do for one outcome once its batch is synced.
pub(super) enum Finish {
    /// Nothing: the worker carried the outcome out (a commit, a failure, a retry, a
    /// forward by rename, a release). It only counts towards the batch, whose sync
    /// makes it durable.
    Done,
    /// The message's results are in the outputs: delete it once they are durable.
    Commit(Message),
    /// Copies are in the other outputs: rename the message into output `usize` once
    /// they are durable.
    Forward(Message, usize),
}

/// The barrier: outcomes waiting for the next batch's sync.
pub(super) struct Barrier {
    max_outcomes: usize,
    max_delay: Duration,
    batch: Mutex<Batch>,
    /// Signalled when the first outcome of a batch arrives, when a batch is full and
    /// at shutdown.
    arrived: Condvar,
    /// Signalled when the committer takes a batch: workers waiting for room go on.
    room: Condvar,
}

#[derive(Default)]
struct Batch {
    /// Outcomes handed over since the last batch was taken.
    outcomes: usize,
    /// The removals among them.
    finishes: Vec<Finish>,
    /// When the first of them arrived.
    opened: Option<Instant>,
    /// No more batches: the committer takes what is left and ends, and later outcomes
    /// (a worker abandoned in its stage that returns after all) are committed by the
    /// thread that hands them over.
    closed: bool,
}

impl Barrier {
    pub(super) fn new(max_outcomes: usize, max_delay: Duration) -> Barrier {
        Barrier {
            max_outcomes,
            max_delay,
            batch: Mutex::new(Batch::default()),
            arrived: Condvar::new(),
            room: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Batch> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands an outcome over. Waits while the batch is full and not yet taken (the
    /// committer's sync is the pipeline's pace). After [`close`](Self::close), commits
    /// it at once in this thread.
    pub(super) fn hand(&self, shared: &Shared, finish: Finish) {
        let mut batch = self.lock();
        while batch.outcomes >= self.max_outcomes && !batch.closed {
            batch = self
                .room
                .wait(batch)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if batch.closed {
            drop(batch);
            commit(shared, 1, vec![finish]);
            return;
        }
        batch.outcomes += 1;
        if !matches!(finish, Finish::Done) {
            batch.finishes.push(finish);
        }
        if batch.opened.is_none() {
            batch.opened = Some(Instant::now());
            self.arrived.notify_one();
        } else if batch.outcomes >= self.max_outcomes {
            self.arrived.notify_one();
        }
    }

    /// Ends the committer's loop once it has committed what is waiting.
    fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_all();
        self.room.notify_all();
    }

    /// Closes the barrier, waits for the committer (`thread`) to commit what was
    /// handed over, then syncs what the Piper changed since (messages released at
    /// shutdown).
    pub(super) fn finish(&self, shared: &Shared, thread: Option<std::thread::JoinHandle<()>>) {
        self.close();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        if let Err(e) = sync_all(shared.queues()) {
            tracing::error!(stage = %shared.name, error = %error_chain(&e), "cannot sync at shutdown; the last outcomes may not survive a power cut");
        }
    }

    /// The committer: takes each batch when it is full or its deadline passed, and
    /// commits it. Returns after [`close`](Self::close), with nothing left waiting.
    pub(super) fn run(&self, shared: &Shared) {
        while let Some((outcomes, finishes)) = self.next_batch() {
            // A panic must not stop the barrier: workers would wait for room forever.
            // The batch's messages are dropped, which releases them.
            let committed = catch_unwind(AssertUnwindSafe(|| commit(shared, outcomes, finishes)));
            if committed.is_err() {
                tracing::error!(stage = %shared.name, outcomes, "group commit: panicked while committing a batch; its messages were released");
            }
        }
    }

    fn next_batch(&self) -> Option<(usize, Vec<Finish>)> {
        let mut batch = self.lock();
        loop {
            let Some(opened) = batch.opened else {
                if batch.closed {
                    return None;
                }
                batch = self
                    .arrived
                    .wait(batch)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let now = Instant::now();
            let deadline = super::later(opened, self.max_delay);
            if batch.outcomes >= self.max_outcomes || batch.closed || now >= deadline {
                break;
            }
            batch = self
                .arrived
                .wait_timeout(batch, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let outcomes = std::mem::take(&mut batch.outcomes);
        let finishes = std::mem::take(&mut batch.finishes);
        batch.opened = None;
        self.room.notify_all();
        Some((outcomes, finishes))
    }
}

/// Commits one batch: the outputs' directories first (the results), then the removals
/// that waited for them, then every directory the batch changed.
fn commit(shared: &Shared, outcomes: usize, finishes: Vec<Finish>) {
    let results = sync_all(shared.outputs.iter().map(|o| o.gauge.queue()));
    if let Err(e) = &results {
        tracing::error!(
            stage = %shared.name,
            error = %error_chain(e),
            "group commit: cannot sync the outputs; the messages whose results are there \
             stay in their inputs and will be processed again"
        );
    }
    for finish in finishes {
        match (finish, &results) {
            (Finish::Done, _) => {}
            (Finish::Commit(message) | Finish::Forward(message, _), Err(_)) => {
                let id = message.id().clone();
                if let Err(e) = message.release() {
                    tracing::warn!(stage = %shared.name, %id, error = %error_chain(e.error()), "cannot release the message; recovery will requeue it");
                }
            }
            (Finish::Commit(message), Ok(())) => carry_out(shared, message, None),
            (Finish::Forward(message, output), Ok(())) => carry_out(shared, message, Some(output)),
        }
    }
    match sync_all(shared.queues()) {
        Ok(()) => Counters::add(&shared.counters.synced_batches, 1),
        Err(e) => tracing::error!(
            stage = %shared.name,
            outcomes,
            error = %error_chain(&e),
            "group commit: cannot sync; the batch's outcomes may not survive a power cut"
        ),
    }
}

/// Removes an input message whose results are durable: deletes it (`output` None) or
/// renames it into an output, and counts it. What cannot be done is failed or
/// released (see [`fall_back`]).
pub(super) fn carry_out(shared: &Shared, message: Message, output: Option<usize>) {
    if let Err(e) = remove(shared, message, output) {
        let (error, message) = e.into_parts();
        tracing::warn!(stage = %shared.name, error = %error_chain(&error), "cannot carry out the outcome");
        if let Some(message) = message {
            fall_back(message, &error, &shared.counters);
        }
    }
}

/// [`carry_out`] without the fallback.
pub(super) fn remove(
    shared: &Shared,
    message: Message,
    output: Option<usize>,
) -> Result<(), TerminalError> {
    let counters = &shared.counters;
    match output {
        None => message
            .commit()
            .map(|()| Counters::add(&counters.committed, 1)),
        Some(index) => {
            let gauge = &shared.outputs[index].gauge;
            let size = message.size();
            message.forward(gauge.queue())?;
            gauge.added(size);
            Counters::add(&counters.forwarded, 1);
            Ok(())
        }
    }
}

/// Syncs every queue, going on past a failure; the first error.
fn sync_all<'a>(queues: impl Iterator<Item = &'a DirectoryQueue>) -> Result<()> {
    let mut first = Ok(());
    for queue in queues {
        if let Err(e) = queue.sync() {
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

/// A terminal could not be carried out and handed the message back: fail it with the
/// error, or failing that release it, or failing that leave it to recovery.
pub(super) fn fall_back(message: Message, error: &Error, counters: &Counters) {
    match message.fail(format!(
        "cannot carry out the stage's outcome: {}",
        error_chain(error)
    )) {
        Ok(()) => Counters::add(&counters.failed, 1),
        Err(e) => {
            if let Some(message) = e.into_message() {
                if let Err(e) = message.release() {
                    tracing::warn!(error = %e, "cannot release the message either; recovery will requeue it");
                }
            }
        }
    }
}
