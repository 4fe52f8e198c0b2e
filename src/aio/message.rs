//! [`AsyncMessage`]: a claimed message whose terminals run off the reactor (see the
//! module docs of `aio`, "Where the file work runs").

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;

use super::{blocking, file_work, lane};
use crate::error::{Error, Result};
use crate::format::id::MessageId;
use crate::queue::{DirectoryQueue, FailureDetails, Message, Retried};

/// A message claimed through an [`AsyncQueue`](super::AsyncQueue): the async face of a
/// [`Message`], with the same consuming terminals, each run off the
/// reactor: on tokio's blocking pool, or in place for a queue that syncs nothing (see the
/// module docs, "Where the file work runs").
///
/// # Dropping without a terminal
///
/// Unlike a sync [`Message`] (which stays in `pending/` until a recovery), a dropped
/// `AsyncMessage` is **released**: it goes back to `incoming/` for another claim,
/// counting the attempt. A future cancelled while it held the message (a `select!`, a
/// timeout, an aborted task) thus gives it back at once. The release runs on the
/// blocking pool and the dropper does not wait for it; outside a runtime, or when a
/// runtime shutting down drops the release unrun, it runs in place. If the process
/// dies first, the message stays in `pending/` for
/// [`recover`](DirectoryQueue::recover), as a sync [`Message`] would.
///
/// # Cancellation
///
/// A terminal, once its future has been polled, runs to completion even if the future
/// is dropped; a message it hands back is then released.
#[must_use = "a claimed message is released when dropped; commit, forward, fail or retry it"]
pub struct AsyncMessage {
    /// `None` once a terminal took it. Shared only with reads under way on the
    /// blocking pool (`bytes`, `json`, `attempts`), which end on their own.
    message: Option<Arc<Message>>,
    id: MessageId,
}

impl AsyncMessage {
    pub(super) fn new(message: Message) -> AsyncMessage {
        AsyncMessage {
            id: message.id().clone(),
            message: Some(Arc::new(message)),
        }
    }

    /// The message id (its file name).
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// The sync message, for its accessors (`path`, `size`, `queue`). Its reads block:
    /// call them on the blocking pool.
    pub fn as_sync(&self) -> &Message {
        self.claimed()
    }

    /// Another handle on the message, for a read on the blocking pool.
    fn shared(&self) -> Arc<Message> {
        Arc::clone(self.claimed())
    }

    fn claimed(&self) -> &Arc<Message> {
        self.message
            .as_ref()
            .expect("a message is only taken by a terminal, which consumes self")
    }

    /// Reads the whole message; see [`Message::bytes`].
    ///
    /// # Errors
    ///
    /// As [`Message::bytes`].
    pub async fn bytes(&self) -> Result<Vec<u8>> {
        let message = self.shared();
        blocking(move || message.bytes()).await
    }

    /// Reads the message as JSON; see [`Message::json`].
    ///
    /// # Errors
    ///
    /// As [`Message::json`].
    pub async fn json<T: DeserializeOwned + Send + 'static>(&self) -> Result<T> {
        let message = self.shared();
        blocking(move || message.json()).await
    }

    /// How many times the message has been claimed, this claim included; see
    /// [`Message::attempts`].
    ///
    /// # Errors
    ///
    /// As [`Message::attempts`].
    pub async fn attempts(&self) -> Result<u32> {
        let message = self.shared();
        blocking(move || message.attempts()).await
    }

    /// Deletes the message: processing is done. See [`Message::commit`].
    ///
    /// # Errors
    ///
    /// As [`Message::commit`]; a message handed back is in the [`TerminalError`].
    ///
    /// # Durability
    ///
    /// As [`Message::commit`].
    pub async fn commit(self) -> Result<(), TerminalError> {
        self.terminal(Message::commit).await
    }

    /// Hands the message to the next queue (an [`AsyncQueue`](super::AsyncQueue) or a
    /// [`DirectoryQueue`]); see [`Message::forward`].
    ///
    /// # Errors
    ///
    /// As [`Message::forward`].
    ///
    /// # Durability
    ///
    /// As [`Message::forward`].
    pub async fn forward(self, next: impl AsRef<DirectoryQueue>) -> Result<(), TerminalError> {
        let next = next.as_ref().clone();
        self.terminal(move |m| m.forward(&next)).await
    }

    /// Moves the message to `errors/` with `reason` in its sidecar; see
    /// [`Message::fail`].
    ///
    /// # Errors
    ///
    /// As [`Message::fail`].
    ///
    /// # Durability
    ///
    /// As [`Message::fail`].
    pub async fn fail(self, reason: impl Into<String>) -> Result<(), TerminalError> {
        let reason = reason.into();
        self.terminal(move |m| m.fail(reason)).await
    }

    /// Like [`fail`](AsyncMessage::fail), with more details in the sidecar; see
    /// [`Message::fail_with`].
    ///
    /// # Errors
    ///
    /// As [`Message::fail_with`].
    ///
    /// # Durability
    ///
    /// As [`Message::fail_with`].
    pub async fn fail_with(
        self,
        reason: impl Into<String>,
        details: FailureDetails,
    ) -> Result<(), TerminalError> {
        let reason = reason.into();
        self.terminal(move |m| m.fail_with(reason, details)).await
    }

    /// Defers the message until `not_before`; see [`Message::retry_at`].
    ///
    /// # Errors
    ///
    /// As [`Message::retry_at`].
    ///
    /// # Durability
    ///
    /// As [`Message::retry_at`].
    pub async fn retry_at(
        self,
        reason: impl Into<String>,
        not_before: SystemTime,
    ) -> Result<(), TerminalError> {
        let reason = reason.into();
        self.terminal(move |m| m.retry_at(reason, not_before)).await
    }

    /// Puts the message back into `incoming/`; see [`Message::release`].
    ///
    /// # Errors
    ///
    /// As [`Message::release`].
    ///
    /// # Durability
    ///
    /// As [`Message::release`].
    pub async fn release(self) -> Result<(), TerminalError> {
        self.terminal(Message::release).await
    }

    /// Asks for another attempt later, with the queue's backoff, or dead-letters the
    /// message after the last attempt; see [`Message::retry`].
    ///
    /// # Errors
    ///
    /// As [`Message::retry`].
    ///
    /// # Durability
    ///
    /// As [`Message::retry`].
    pub async fn retry(self, reason: impl Into<String>) -> Result<Retried, TerminalError> {
        let reason = reason.into();
        self.terminal(move |m| m.retry(reason)).await
    }

    /// Runs a sync terminal on the blocking pool. A message it hands back becomes an
    /// `AsyncMessage` there, so that it is released if this future is gone.
    async fn terminal<T, F>(mut self, terminal: F) -> Result<T, TerminalError>
    where
        F: FnOnce(Message) -> Result<T, crate::queue::TerminalError> + Send + 'static,
        T: Send + 'static,
    {
        let Some(message) = self.message.take() else {
            unreachable!("a message is only taken by a terminal, which consumes self");
        };
        let lane = lane(message.queue());
        file_work(lane, move || {
            terminal(unshared(message)).map_err(|e| {
                let (error, message) = e.into_parts();
                TerminalError {
                    error,
                    message: message.map(AsyncMessage::new),
                }
            })
        })
        .await
    }
}

/// The message alone, once the reads still under way on the blocking pool are done
/// (they hold the other references, and end without waiting for anything).
fn unshared(mut message: Arc<Message>) -> Message {
    loop {
        match Arc::try_unwrap(message) {
            Ok(message) => return message,
            Err(shared) => {
                message = shared;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

impl Drop for AsyncMessage {
    fn drop(&mut self) {
        let Some(message) = self.message.take() else {
            return;
        };
        tracing::debug!(id = %self.id, "message dropped without a terminal; releasing it");
        let release = Release(Some(message));
        match tokio::runtime::Handle::try_current() {
            // The dropper does not wait; `Release` runs even if the pool drops the task
            // unrun (a runtime shutting down cancels queued blocking work).
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(release))),
            Err(_) => drop(release),
        }
    }
}

/// Releases a dropped message when it is itself dropped: on the blocking pool when the
/// task runs, or where the pool drops the task unrun (a runtime shutting down), so
/// that a dropped [`AsyncMessage`] never stays in `pending/` while this process lives.
struct Release(Option<Arc<Message>>);

impl Drop for Release {
    fn drop(&mut self) {
        let Some(message) = self.0.take() else {
            return;
        };
        let message = unshared(message);
        let id = message.id().clone();
        if let Err(e) = message.release() {
            tracing::warn!(%id, error = %e.error(), "cannot release a dropped message");
        }
    }
}

impl fmt::Debug for AsyncMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncMessage")
            .field("id", &self.id)
            .field("claimed", &self.message.is_some())
            .finish()
    }
}

/// A terminal of an [`AsyncMessage`] that failed: the error, and the message when the
/// terminal did not take effect (still claimed, so another terminal can be tried;
/// released if dropped). See [`crate::queue::TerminalError`].
pub struct TerminalError {
    error: Error,
    message: Option<AsyncMessage>,
}

impl TerminalError {
    /// What went wrong.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The message, if the terminal did not take effect.
    pub fn message(&self) -> Option<&AsyncMessage> {
        self.message.as_ref()
    }

    /// Takes the message back, if the terminal did not take effect.
    pub fn into_message(self) -> Option<AsyncMessage> {
        self.message
    }

    /// Splits into the error and the message (if it was handed back).
    pub fn into_parts(self) -> (Error, Option<AsyncMessage>) {
        (self.error, self.message)
    }

    /// Keeps only the error; a handed-back message is dropped, and so released.
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
