//! A claimed message and the terminals that end its claim.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

use serde::de::DeserializeOwned;

use super::DirectoryQueue;
use crate::engine::group;
use crate::engine::publish::{publish_copy, SyncWhen};
use crate::engine::quarantine::{move_to_errors, Moved};
use crate::engine::seen;
use crate::error::{Error, Operation, Result};
use crate::format::attempts;
use crate::format::deferred::deferred_name;
use crate::format::id::MessageId;
use crate::format::meta::{FailureDetails, FailureInfo};
use crate::format::state::State;
use crate::sys;
use crate::sys::lock::Locked;

/// A message claimed from a queue: it is in `pending/`, and this process owns it.
///
/// Ownership is an exclusive `flock` on the file, held by this value. It ends with one
/// of the terminals, which consume the message:
///
/// - [`commit`](Message::commit): done, delete it;
/// - [`forward`](Message::forward): hand it to the next queue;
/// - [`fail`](Message::fail): move it to `errors/` with a reason;
/// - [`release`](Message::release): put it back into `incoming/` for another try;
/// - [`retry`](Message::retry): try again later, with backoff, or give up into `errors/`
///   after the last attempt.
///
/// A terminal that fails hands the message back inside its [`TerminalError`] whenever
/// the message did not move, so it is never lost track of.
///
/// # Dropping without a terminal
///
/// Dropping a message without a terminal (a panic, an early return) logs a warning and
/// releases the lock, leaving the file in `pending/`. It is not lost: the next
/// [`recover`](DirectoryQueue::recover) of the queue sees that nobody holds its lock
/// and requeues it, counting the attempt.
#[must_use = "a claimed message stays in pending/ until it is committed, forwarded, failed or released"]
pub struct Message {
    queue: DirectoryQueue,
    id: MessageId,
    path: PathBuf,
    size: u64,
    /// The open message file; its lock is the claim. Unlocked and closed when the
    /// message drops, so the claim ends with the terminal, not when the last process
    /// forked meanwhile execs (see [`Locked`]).
    file: Locked,
    /// Claims completed before this one, read lazily.
    previous_attempts: OnceLock<u32>,
    /// A terminal took effect; `Drop` has nothing to report.
    done: bool,
}

impl Message {
    pub(crate) fn claimed(
        queue: DirectoryQueue,
        id: MessageId,
        file: Locked,
        size: u64,
    ) -> Message {
        let path = queue.engine().dir(State::Pending).join(id.as_os_str());
        Message {
            queue,
            id,
            path,
            size,
            file,
            previous_attempts: OnceLock::new(),
            done: false,
        }
    }

    /// The message id (its file name).
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// Where the message is now: `<queue>/pending/<id>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes when it was claimed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The queue it was claimed from.
    pub fn queue(&self) -> &DirectoryQueue {
        &self.queue
    }

    /// How many times the message has been claimed in this queue, this claim included
    /// (so at least 1). Releases, failures and recoveries of a dead owner's claim are
    /// counted; the count survives crashes and restarts.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Metadata`] when the count cannot be read.
    pub fn attempts(&self) -> Result<u32> {
        if let Some(previous) = self.previous_attempts.get() {
            return Ok(previous + 1);
        }
        let previous = attempts::read(&self.file, self.queue.engine().identity())
            .map_err(|e| Error::io(Operation::Metadata, &self.path, e))?;
        Ok(*self.previous_attempts.get_or_init(|| previous) + 1)
    }

    /// Reads the whole message.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Read`].
    pub fn bytes(&self) -> Result<Vec<u8>> {
        let read_error = |e| Error::io(Operation::Read, &self.path, e);
        let expected = usize::try_from(self.size).map_err(|_| {
            read_error(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "message too large",
            ))
        })?;
        // One byte more than expected, so that a single read both fills the buffer and
        // proves the end of the file (a short read of a regular file means end of file).
        let mut buf = vec![0u8; expected + 1];
        let mut filled = 0;
        loop {
            let n =
                sys::read_at(&self.file, &mut buf[filled..], filled as u64).map_err(read_error)?;
            filled += n;
            if n == 0 || filled < buf.len() {
                break;
            }
            buf.resize(buf.len() * 2, 0);
        }
        buf.truncate(filled);
        Ok(buf)
    }

    /// Reads the message as JSON.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when it cannot be read, [`Error::Json`] with
    /// [`Operation::Decode`] when it is not valid JSON for `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        let bytes = self.bytes()?;
        serde_json::from_slice(&bytes).map_err(|e| Error::json(Operation::Decode, &self.path, e))
    }

    /// A reader over the message bytes, from the start. Readers do not share a
    /// position, so several may be used one after another.
    pub fn reader(&self) -> MessageReader<'_> {
        MessageReader {
            file: &self.file,
            position: 0,
        }
    }

    /// Deletes the message: processing is done. When the queue
    /// [remembers finished ids](crate::QueueBuilder::remember_finished), a record of
    /// the id is written to `seen/` first.
    ///
    /// # Errors
    ///
    /// A [`TerminalError`] holding the message when it could not be deleted (or its
    /// `seen/` record could not be written), or without it when it was deleted but the
    /// directory sync failed.
    ///
    /// # Durability
    ///
    /// [`Durability::Full`](crate::Durability::Full): `pending/` is synced (and
    /// `incoming/` where one fsync does not commit the whole journal), so the message
    /// cannot come back after a crash. `Batch`: at the next
    /// [`sync`](DirectoryQueue::sync). `None`: never.
    pub fn commit(self) -> Result<(), TerminalError> {
        let queue = self.queue.clone();
        let inner = queue.engine();
        let pending = inner.dir(State::Pending);
        // IMPORTANT: the record first. A crash between the two leaves a record of a
        // message that is still here; the other order could let a copy in again.
        if let Err(error) = seen::remember(inner, &self.id) {
            return Err(self.kept(error));
        }
        if let Err(e) = pending.dir.unlink(self.id.as_os_str()) {
            let error = Error::io(Operation::Commit, &self.path, e);
            return Err(self.kept(error));
        }
        let dirs = [inner.dir(State::Incoming), pending];
        let synced = group::sync_leaving(inner, &self.id, &dirs);
        self.finish(synced)
    }

    /// Hands the message to the next queue: it appears in `next`'s `incoming/` under the
    /// same id.
    ///
    /// Within one filesystem this is a single rename: exactly once, even across a
    /// crash. Across filesystems the message is copied into `next`'s `tmp/`, synced,
    /// published, and only then deleted here: a crash between publishing and deleting
    /// leaves it in both queues, so across filesystems a forward is at-least-once.
    /// When this queue [remembers finished ids](crate::QueueBuilder::remember_finished),
    /// a record of the id is written to its `seen/` first.
    ///
    /// # Errors
    ///
    /// A [`TerminalError`] holding the message when it did not move, for example
    /// [`Error::Duplicate`] when `next` already has a message with this id (its
    /// `seen/` record, if one was written, stays: it only refuses a second copy). Without it
    /// when the message moved but the directory sync failed.
    ///
    /// # Durability
    ///
    /// By this queue's mode (not `next`'s). `Full`: `next`'s `incoming/` is synced (and
    /// this queue's `pending/` and `incoming/` where one fsync does not commit the whole
    /// journal). `Batch`: at this queue's next [`sync`](DirectoryQueue::sync), except that
    /// a cross-filesystem copy is always synced before the original is deleted.
    pub fn forward(self, next: &DirectoryQueue) -> Result<(), TerminalError> {
        let queue = self.queue.clone();
        let inner = queue.engine();
        let pending = inner.dir(State::Pending);
        let target = next.engine().dir(State::Incoming);
        let name = self.id.as_os_str();
        // The id leaves this queue for good, as by a commit: recorded first.
        if let Err(error) = seen::remember(inner, &self.id) {
            return Err(self.kept(error));
        }
        match pending.dir.rename_noreplace(name, &target.dir, name) {
            Ok(()) => {
                let dirs = [inner.dir(State::Incoming), pending, target];
                let synced = group::sync_leaving(inner, &self.id, &dirs);
                self.finish(synced)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let error = Error::Duplicate {
                    op: Operation::Forward,
                    path: target.join(name),
                    id: self.id.clone(),
                };
                Err(self.kept(error))
            }
            Err(e) if sys::is_cross_device(&e) => self.copy_forward(next),
            Err(e) => {
                let error = Error::moving(Operation::Forward, &self.path, target.join(name), e);
                Err(self.kept(error))
            }
        }
    }

    /// The cross-filesystem forward: copy, sync, publish, then delete the original.
    fn copy_forward(self, next: &DirectoryQueue) -> Result<(), TerminalError> {
        let queue = self.queue.clone();
        let inner = queue.engine();
        let copied = publish_copy(
            inner.syncer(),
            next.engine(),
            &self.id,
            self.reader(),
            SyncWhen::Now,
        );
        if let Err(error) = copied {
            return Err(self.kept(error));
        }
        let pending = inner.dir(State::Pending);
        if let Err(e) = pending.dir.unlink(self.id.as_os_str()) {
            // The copy is published: the message is now in both queues. Handing it back
            // lets the caller commit or release it; either way it was delivered once.
            let error = Error::io(Operation::Forward, &self.path, e);
            return Err(self.kept(error));
        }
        let dirs = [inner.dir(State::Incoming), pending];
        let synced = group::sync_leaving(inner, &self.id, &dirs);
        self.finish(synced)
    }

    /// Moves the message to `errors/`, with a `<id>.meta` JSON sidecar holding
    /// `reason`, the time, host, process id and attempt count.
    ///
    /// If `errors/` already holds an entry with this id (a message failed before and
    /// never requeued), the message is stored as `<id>~1` (or the next free number).
    ///
    /// # Errors
    ///
    /// A [`TerminalError`] holding the message when it did not move; without it when it
    /// moved but the directory sync failed.
    ///
    /// # Durability
    ///
    /// The sidecar is always durable before the message appears in `errors/` (except
    /// with [`Durability::None`](crate::Durability::None)). The move is synced like
    /// [`commit`](Message::commit).
    pub fn fail(self, reason: impl Into<String>) -> Result<(), TerminalError> {
        self.fail_with(reason, FailureDetails::default())
    }

    /// Like [`fail`](Message::fail), with more details in the sidecar (a command's exit
    /// code and the end of its standard error).
    ///
    /// # Errors
    ///
    /// As [`fail`](Message::fail).
    ///
    /// # Durability
    ///
    /// As [`fail`](Message::fail).
    pub fn fail_with(
        self,
        reason: impl Into<String>,
        details: FailureDetails,
    ) -> Result<(), TerminalError> {
        let attempts = self.record_attempt();
        let info = FailureInfo::now(reason.into(), attempts, State::Pending).with(details);
        let queue = self.queue.clone();
        let inner = queue.engine();
        match move_to_errors(
            inner,
            State::Pending,
            self.id.as_os_str(),
            &info,
            Operation::Fail,
        ) {
            Ok(Moved::To { synced, .. }) => {
                if synced.is_ok() {
                    group::after_failure(inner, &self.id, info.reason.as_deref().unwrap_or(""));
                }
                self.finish(synced)
            }
            Ok(Moved::Gone) => {
                let error = Error::io(
                    Operation::Fail,
                    &self.path,
                    io::Error::new(io::ErrorKind::NotFound, "the message left pending/"),
                );
                Err(self.kept(error))
            }
            Err(error) => Err(self.kept(error)),
        }
    }

    /// Puts the message back into `incoming/` so that it is claimed again (by anyone),
    /// counting this claim as an attempt.
    ///
    /// # Errors
    ///
    /// A [`TerminalError`] holding the message when it did not move (for example
    /// [`Error::Duplicate`] when `incoming/` already has a message with this id);
    /// without it when it moved but the directory sync failed.
    ///
    /// # Durability
    ///
    /// Like [`commit`](Message::commit), for `incoming/`.
    pub fn release(self) -> Result<(), TerminalError> {
        self.record_attempt();
        let queue = self.queue.clone();
        let inner = queue.engine();
        let pending = inner.dir(State::Pending);
        let incoming = inner.dir(State::Incoming);
        let name = self.id.as_os_str();
        match pending.dir.rename_noreplace(name, &incoming.dir, name) {
            Ok(()) => {
                let synced = inner.syncer().changed(&[pending, incoming]);
                self.finish(synced)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let error = Error::Duplicate {
                    op: Operation::Release,
                    path: incoming.join(name),
                    id: self.id.clone(),
                };
                Err(self.kept(error))
            }
            Err(e) => {
                let error = Error::moving(Operation::Release, &self.path, incoming.join(name), e);
                Err(self.kept(error))
            }
        }
    }

    /// Asks for another attempt later: the message waits in `deferred/` for a backoff
    /// delay (see [`RetryPolicy`](crate::queue::RetryPolicy), set with
    /// [`QueueBuilder::retry_policy`](crate::QueueBuilder::retry_policy)) and then
    /// returns to `incoming/`. If this was the last attempt allowed, the message goes to
    /// `errors/` with `reason` instead (a dead letter).
    ///
    /// # Errors
    ///
    /// As [`retry_at`](Message::retry_at) or [`fail`](Message::fail).
    ///
    /// # Durability
    ///
    /// As [`retry_at`](Message::retry_at) or [`fail`](Message::fail).
    pub fn retry(self, reason: impl Into<String>) -> Result<Retried, TerminalError> {
        let reason = reason.into();
        let attempts = self.attempts().unwrap_or(1);
        let policy = self.queue.engine().config().retry;
        if attempts >= policy.max_attempts() {
            return self.fail(reason).map(|()| Retried::DeadLettered);
        }
        let when = SystemTime::now() + policy.jittered(attempts, crate::sys::random::unit());
        self.retry_at(reason, when)
            .map(|()| Retried::Deferred(when))
    }

    /// Defers the message until `not_before`: it waits in `deferred/` and then returns
    /// to `incoming/`. This claim counts as an attempt and `reason` is remembered as the
    /// last failure. No attempt limit applies (see [`retry`](Message::retry)).
    ///
    /// # Errors
    ///
    /// A [`TerminalError`] holding the message when it did not move (for example
    /// [`Error::Layout`] when the queue has no `deferred/`, having been opened without
    /// permission to create it); without it when it moved but the directory sync failed.
    ///
    /// # Durability
    ///
    /// Like [`commit`](Message::commit), for `deferred/`.
    pub fn retry_at(
        self,
        reason: impl Into<String>,
        not_before: SystemTime,
    ) -> Result<(), TerminalError> {
        self.record_attempt();
        if let Err(e) = attempts::write_reason(&self.file, &reason.into()) {
            tracing::debug!(id = %self.id, error = %e, "cannot store the retry reason");
        }
        let queue = self.queue.clone();
        let inner = queue.engine();
        let deferred = match inner.require(State::Deferred) {
            Ok(deferred) => deferred,
            Err(error) => return Err(self.kept(error)),
        };
        let pending = inner.dir(State::Pending);
        let name = deferred_name(&self.id, not_before);
        match pending
            .dir
            .rename_noreplace(self.id.as_os_str(), &deferred.dir, &name)
        {
            Ok(()) => {
                let synced =
                    inner
                        .syncer()
                        .changed(&[inner.dir(State::Incoming), pending, deferred]);
                self.finish(synced)
            }
            Err(e) => {
                let error = Error::moving(Operation::Defer, &self.path, deferred.join(&name), e);
                Err(self.kept(error))
            }
        }
    }

    /// Why the previous attempt asked for a retry, if one did.
    pub fn last_retry_reason(&self) -> Option<String> {
        attempts::read_reason(&self.file).ok().flatten()
    }

    /// Gives the message up without touching it, for a supervisor that has already
    /// moved it on behalf of this claim (a timed-out stage); the lock is released
    /// quietly.
    pub(crate) fn abandon(mut self) {
        self.done = true;
    }

    /// Stores this claim in the attempt count before the message leaves our hands;
    /// returns the count. A count that cannot be stored is logged, not fatal: it
    /// never justifies keeping the message from moving on.
    fn record_attempt(&self) -> u32 {
        let attempts = self.attempts().unwrap_or_else(|e| {
            tracing::debug!(id = %self.id, error = %e, "cannot read attempt count");
            1
        });
        if let Err(e) = attempts::write(&self.file, self.queue.engine().identity(), attempts) {
            tracing::debug!(id = %self.id, error = %e, "cannot store attempt count");
        }
        attempts
    }

    /// The terminal took effect; `synced` says whether it was made durable.
    fn finish(mut self, synced: Result<()>) -> Result<(), TerminalError> {
        self.done = true;
        synced.map_err(|error| TerminalError {
            error,
            message: None,
        })
    }

    /// The terminal did not take effect: hand the message back.
    fn kept(self, error: Error) -> TerminalError {
        TerminalError {
            error,
            message: Some(Box::new(self)),
        }
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(
                id = %self.id,
                path = %self.path.display(),
                "message dropped without commit, forward, fail or release; \
                 it stays in pending/ until recover() requeues it"
            );
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// What [`Message::retry`] did with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retried {
    /// Deferred: it returns to `incoming/` at this time.
    Deferred(SystemTime),
    /// That was the last attempt allowed: it is in `errors/` with the reason.
    DeadLettered,
}

/// Reads a claimed message from the start; see [`Message::reader`].
#[derive(Debug)]
pub struct MessageReader<'a> {
    file: &'a File,
    position: u64,
}

impl Read for MessageReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = sys::read_at(self.file, buf, self.position)?;
        self.position += n as u64;
        Ok(n)
    }
}

/// A terminal ([`Message::commit`], [`forward`](Message::forward),
/// [`fail`](Message::fail), [`release`](Message::release)) that failed.
///
/// When the message did not move it is handed back ([`TerminalError::into_message`]),
/// still claimed, so the caller can try another terminal. When it moved but the move
/// could not be made durable (a failed fsync), there is no message to hand back: the
/// operation is visible now but might not survive a crash.
pub struct TerminalError {
    error: Error,
    message: Option<Box<Message>>,
}

impl TerminalError {
    pub(crate) fn new(error: Error, message: Option<Message>) -> TerminalError {
        TerminalError {
            error,
            message: message.map(Box::new),
        }
    }

    /// What went wrong.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The message, if the terminal did not take effect.
    pub fn message(&self) -> Option<&Message> {
        self.message.as_deref()
    }

    /// Takes the message back, if the terminal did not take effect.
    pub fn into_message(self) -> Option<Message> {
        self.message.map(|m| *m)
    }

    /// Splits into the error and the message (if it was handed back).
    pub fn into_parts(self) -> (Error, Option<Message>) {
        (self.error, self.message.map(|m| *m))
    }

    /// Keeps only the error; a handed-back message is dropped, and so stays in
    /// `pending/` for [`recover`](DirectoryQueue::recover).
    pub fn into_error(self) -> Error {
        self.error
    }
}

impl fmt::Display for TerminalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl fmt::Debug for TerminalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TerminalError")
            .field("error", &self.error)
            .field("message", &self.message.as_ref().map(|m| &m.id))
            .finish()
    }
}

impl std::error::Error for TerminalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl From<TerminalError> for Error {
    fn from(e: TerminalError) -> Error {
        e.into_error()
    }
}
