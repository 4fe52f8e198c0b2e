//! What a stage is: a function from one claimed message to an outcome.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::cancel::Cancellation;
use crate::error::{Error, Operation};
use crate::{Message, MessageId};

/// The error a stage may return; it fails the message with the error's text (and
/// causes) as the reason.
pub type StageError = Box<dyn std::error::Error + Send + Sync>;

/// What [`Stage::process`] returns.
pub type StageResult = Result<Outcome, StageError>;

/// One processing step of a pipeline, run by a [`Piper`](crate::piper::Piper) on each
/// message it claims.
///
/// Each worker thread has its own instance (see
/// [`PiperBuilder::stage`](crate::piper::PiperBuilder::stage) and
/// [`stage_factory`](crate::piper::PiperBuilder::stage_factory)), so a stage may keep state
/// such as a database connection without locking. Closures
/// `FnMut(&Message) -> StageResult` are stages.
///
/// The stage only looks at the message; the Piper carries out the [`Outcome`]. An
/// `Err` fails the message with the error as the reason; a panic retries it (a
/// message that keeps panicking is dead-lettered after the maximum attempts) and the
/// worker starts over with a fresh stage instance.
pub trait Stage: Send {
    /// Processes one message.
    ///
    /// # Errors
    ///
    /// Any error: the message is moved to `errors/` with the error chain as its reason.
    fn process(&mut self, message: &Message) -> StageResult;

    /// Processes one message that the operator may cancel while it runs (`dirq
    /// cancel`, [`admin::cancel_timeout`](crate::admin::cancel_timeout)): the Piper calls this, not
    /// [`process`](Self::process). A stage that runs long overrides it and polls
    /// [`cancel.is_cancelled()`](Cancellation::is_cancelled), returning early when it
    /// turns true; [`CommandStage`](crate::piper::CommandStage) kills its command's
    /// process group.
    ///
    /// Once the message is cancelled, what this returns is not carried out: the
    /// message goes to `errors/` with reason
    /// [`CANCELLED_REASON`](crate::piper::CANCELLED_REASON) (and
    /// [`on_failed`](Self::on_failed) is called), or back to `incoming/` when the
    /// operator asked for a requeue. The cancel wins even over
    /// [`Outcome::Commit`]: nothing a cancelled stage produced is committed. A stage
    /// that ignores the cancel delays it until it returns (or until the Piper's
    /// [timeout](crate::piper::PiperBuilder::timeout) takes the message over).
    ///
    /// # Errors
    ///
    /// As [`process`](Self::process). Default: calls `process`, so a stage that does
    /// not override this is cancelled when it returns.
    fn process_cancellable(&mut self, message: &Message, cancel: &Cancellation) -> StageResult {
        let _ = cancel;
        self.process(message)
    }

    /// Called after a message of this stage went to `errors/`, whatever the way: a
    /// failure outcome or error of [`process`](Self::process), a dead letter after
    /// the last retry (a stage that kept retrying or panicking, or a message whose
    /// process died on it), a stage timeout ([`Outcome::TimedOut`]), or the Piper's
    /// own [timeout](crate::piper::PiperBuilder::timeout), or an operator's cancel
    /// (reason [`CANCELLED_REASON`](crate::piper::CANCELLED_REASON)). For alerting:
    /// [`CommandStage`](crate::piper::CommandStage) runs its
    /// [`on_fail`](crate::piper::CommandStageBuilder::on_fail) hook here.
    ///
    /// It runs on the worker that processed the message, after the move; when the
    /// Piper's timeout took the message over, on a fresh instance from the stage
    /// factory, in a thread of its own. A panic in it is logged and ignored. Default:
    /// nothing.
    fn on_failed(&mut self, failure: &Failed) {
        let _ = failure;
    }
}

/// A message that went to `errors/`; see [`Stage::on_failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failed {
    /// The message's id.
    pub id: MessageId,
    /// The root of the input queue it was in (its `errors/` holds it now).
    pub queue: PathBuf,
    /// The reason in its sidecar.
    pub reason: String,
    /// The attempt that failed, this one included (1 for the first).
    pub attempt: u32,
    /// The exit code of a command that failed, when there is one.
    pub exit_code: Option<i32>,
    /// Whether it was dead-lettered: retried until its last attempt.
    pub dead_letter: bool,
}

impl<F> Stage for F
where
    F: FnMut(&Message) -> StageResult + Send,
{
    fn process(&mut self, message: &Message) -> StageResult {
        self(message)
    }
}

/// What to do with a processed message.
///
/// A variant that takes a reason takes it first: `Fail(reason)`,
/// `FailWith(reason, details)`, `Retry(reason)`, `RetryAfter(reason, delay)`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Outcome {
    /// Pass the same message on, under the same id: renamed into the first output, and
    /// copied into each other output (fan-out).
    Forward,
    /// Pass the same message on to the named output only.
    ForwardTo(String),
    /// Replace the message by zero or more new ones (each to every output, or to the
    /// one it names), then delete it. Emitted messages get ids derived from the
    /// original's, so that a re-run after a crash does not duplicate those still
    /// waiting downstream.
    Emit(Vec<Emit>),
    /// Delete the message: processing is done.
    Commit,
    /// Move the message to `errors/` with this reason.
    Fail(String),
    /// Move the message to `errors/` with this reason and more details in its sidecar.
    FailWith(String, crate::queue::FailureDetails),
    /// Try again later, with the input queue's backoff; after the last attempt the
    /// message goes to `errors/` with this reason.
    Retry(String),
    /// Try again after this delay instead of the backoff's; after the last attempt
    /// the message goes to `errors/` with this reason.
    RetryAfter(String, Duration),
    /// The stage gave up on the message because processing it ran too long (as
    /// [`CommandStage`](crate::piper::CommandStage) does at its timeout): move it to
    /// `errors/` with reason `timeout` and these details, and count it in
    /// [`PiperStats::timeouts`](crate::piper::PiperStats::timeouts) as well as in
    /// `failed`.
    TimedOut(crate::queue::FailureDetails),
    /// The stage cannot work at all, whatever the message (a
    /// [`CommandStage`](crate::piper::CommandStage) whose command cannot be started):
    /// put the message back into `incoming/` unprocessed and stop the Piper. Other
    /// workers finish their messages, and [`Piper::run`](crate::piper::Piper::run)
    /// returns [`Error::Config`] (field `stage`) with this reason.
    Stop(String),
}

/// A new message emitted by a stage; see [`Outcome::Emit`].
#[derive(Clone)]
pub struct Emit {
    pub(crate) bytes: Vec<u8>,
    pub(crate) output: Option<String>,
}

impl Emit {
    /// A message with these bytes, for every output.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Emit {
        Emit {
            bytes: bytes.into(),
            output: None,
        }
    }

    /// A message holding `value` as JSON, for every output.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] with [`Operation::Encode`] when `value` cannot be serialised.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Emit, Error> {
        serde_json::to_vec(value)
            .map(Emit::new)
            .map_err(|e| Error::json(Operation::Encode, "emitted message", e))
    }

    /// Sends this message to the named output only.
    pub fn to(mut self, output: impl Into<String>) -> Emit {
        self.output = Some(output.into());
        self
    }
}

impl fmt::Debug for Emit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emit")
            .field("size", &self.bytes.len())
            .field("output", &self.output)
            .finish()
    }
}
