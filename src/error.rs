//! The crate's error type.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use crate::format::id::InvalidId;
use crate::format::id::MessageId;
pub use crate::format::state::ParseStateError;

/// What the queue was doing when an error happened; part of every [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Opening a queue or one of its state directories.
    Open,
    /// Creating a state directory.
    CreateDir,
    /// Creating a message file in `tmp/`.
    Create,
    /// Writing message bytes.
    Write,
    /// An `fsync` of a file or directory.
    Sync,
    /// Publishing a finished message into `incoming/`.
    Publish,
    /// Reading a state directory.
    Scan,
    /// Claiming a message from `incoming/`.
    Claim,
    /// Reading a message's bytes.
    Read,
    /// Decoding a message (JSON).
    Decode,
    /// Encoding a value as a message (JSON).
    Encode,
    /// Committing (deleting) a claimed message.
    Commit,
    /// Forwarding a claimed message into the next queue.
    Forward,
    /// Moving a claimed message to `errors/`.
    Fail,
    /// Returning a claimed message to `incoming/`.
    Release,
    /// Deferring a claimed message into `deferred/` for a retry.
    Defer,
    /// Moving a deferred message that fell due into `incoming/`.
    Deliver,
    /// Moving a message into `hold/`.
    Hold,
    /// Moving a held message back to `incoming/`.
    Unhold,
    /// Moving a failed message from `errors/` back to `incoming/`.
    Requeue,
    /// Replacing a waiting message's content under the same id.
    Edit,
    /// Cancelling the waiting members of a group whose member failed, or letting the
    /// next member of an ordered group into `incoming/`.
    Group,
    /// Deleting a message (and its sidecar) on an operator's request.
    Delete,
    /// Removing old failed messages and temporary files.
    Purge,
    /// Taking a timed-out message back from a worker that overran its time.
    TakeOver,
    /// Requeuing an orphaned message or removing a stale temporary file.
    Recover,
    /// Moving a hostile or unreadable entry out of the way.
    Quarantine,
    /// Looking up a file's metadata.
    Stat,
    /// Reading or writing a message's bookkeeping (attempts, `.meta`).
    Metadata,
    /// Watching a directory for changes.
    Watch,
    /// Starting a thread of a Piper.
    StartThread,
    /// Asking a Piper to stop processing a message it owns (`dirq cancel`).
    Cancel,
    /// Recording a finished message's id in `seen/`, looking one up there, or
    /// removing expired records.
    Remember,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Open => "open",
            Operation::CreateDir => "create directory",
            Operation::Create => "create",
            Operation::Write => "write",
            Operation::Sync => "fsync",
            Operation::Publish => "publish",
            Operation::Scan => "scan",
            Operation::Claim => "claim",
            Operation::Read => "read",
            Operation::Decode => "decode",
            Operation::Encode => "encode",
            Operation::Commit => "commit",
            Operation::Forward => "forward",
            Operation::Fail => "fail",
            Operation::Release => "release",
            Operation::Defer => "defer",
            Operation::Deliver => "deliver deferred",
            Operation::Hold => "hold",
            Operation::Unhold => "unhold",
            Operation::Requeue => "requeue",
            Operation::Edit => "edit",
            Operation::Group => "update group of",
            Operation::Delete => "delete",
            Operation::Purge => "purge",
            Operation::TakeOver => "take over",
            Operation::Recover => "recover",
            Operation::Quarantine => "quarantine",
            Operation::Stat => "stat",
            Operation::Metadata => "update metadata of",
            Operation::Watch => "watch",
            Operation::StartThread => "start thread",
            Operation::Cancel => "cancel",
            Operation::Remember => "remember finished id in",
        })
    }
}

/// Every error the crate returns. Each variant names the operation and the path(s).
///
/// The text of an underlying error is not repeated in `Display`; it is reachable
/// through [`std::error::Error::source`], so that printing the chain shows each cause
/// once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call on one path failed.
    #[error("failed to {op} {}", path.display())]
    Io {
        /// What the queue was doing.
        op: Operation,
        /// The file or directory involved.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Moving a file from one path to another failed.
    #[error("failed to {op} {} to {}", from.display(), to.display())]
    Move {
        /// What the queue was doing.
        op: Operation,
        /// Where the file was.
        from: PathBuf,
        /// Where it was to go.
        to: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A message id given to the API is not acceptable as a file name in a queue.
    ///
    /// Ids are checked before any path exists, so the id itself stands in for the path.
    #[error("invalid message id {id:?}: {reason}")]
    InvalidId {
        /// The rejected id, lossily converted to UTF-8.
        id: String,
        /// What was expected, e.g. "message id must not contain '/'".
        reason: &'static str,
    },
    /// The directory does not have the shape of a queue and was not changed.
    #[error("failed to open queue {}: {reason}", path.display())]
    Layout {
        /// The offending path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is missing or out of range: of a queue's builder, a retry policy, a
    /// Piper or a command stage. Nothing was opened, started or changed.
    #[error("invalid {field} of {target}: {reason}")]
    Config {
        /// What was being configured: `queue /var/spool/q`, `Piper "parse"`, ...
        target: String,
        /// The setting, named as its setter is (`workers`, `max_attempts`, ...).
        field: &'static str,
        /// What the value must be, e.g. "must be at least 1".
        reason: String,
    },
    /// A message could not be encoded or decoded as JSON.
    #[error("failed to {op} {} as JSON", path.display())]
    Json {
        /// [`Operation::Encode`] or [`Operation::Decode`].
        op: Operation,
        /// The message file (for encoding: the queue's `incoming/`).
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: JsonError,
    },
    /// An empty or whitespace-only message, which Mentat treats as an error.
    #[error("failed to {op} {}: message is empty or only whitespace", path.display())]
    EmptyMessage {
        /// What the queue was doing.
        op: Operation,
        /// The queue or message path.
        path: PathBuf,
    },
    /// A message with this id already exists where it was to go.
    #[error("failed to {op} {}: a message with id {id} already exists there", path.display())]
    Duplicate {
        /// What the queue was doing.
        op: Operation,
        /// The path that already exists.
        path: PathBuf,
        /// The message id.
        id: MessageId,
    },
    /// An operator's request about one message was refused or not answered: the
    /// message is not in a state the request applies to, its owner cannot honour it, or
    /// the owner did not answer in time. Nothing was changed by the refusal itself.
    #[error("failed to {op} message {id} in {}: {reason}", queue.display())]
    Refused {
        /// What was asked ([`Operation::Cancel`]).
        op: Operation,
        /// The queue's root.
        queue: PathBuf,
        /// The message id.
        id: MessageId,
        /// Why, and what to do instead (e.g. "it is waiting in incoming/: use dirq
        /// delete or hold").
        reason: String,
    },
    /// A batch enqueue failed after some of its messages were already published.
    ///
    /// The published messages are visible to consumers; re-enqueuing them would make
    /// duplicates.
    #[error(
        "failed to enqueue batch into {}: {} of {total} messages were published before the error",
        path.display(),
        published.len()
    )]
    PartialBatch {
        /// The queue's `incoming/` directory.
        path: PathBuf,
        /// Ids of the messages that were published (and synced as far as possible).
        published: Vec<MessageId>,
        /// Size of the batch.
        total: usize,
        /// The error that stopped the batch.
        #[source]
        source: Box<Error>,
    },
}

/// A JSON encoding or decoding error (wraps the JSON library's error type, which is
/// not part of this crate's public API).
#[derive(Debug)]
pub struct JsonError(serde_json::Error);

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for JsonError {}

impl JsonError {
    /// Line of the input where decoding failed (1-based; 0 for encoding errors).
    pub fn line(&self) -> usize {
        self.0.line()
    }

    /// Column of the input where decoding failed (1-based; 0 for encoding errors).
    pub fn column(&self) -> usize {
        self.0.column()
    }
}

impl From<InvalidId> for Error {
    fn from(e: InvalidId) -> Error {
        Error::InvalidId {
            id: e.id().to_owned(),
            reason: e.reason(),
        }
    }
}

impl Error {
    pub(crate) fn io(op: Operation, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A setting rejected before anything was opened or started.
    pub(crate) fn config(
        target: impl fmt::Display,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Error {
        Error::Config {
            target: target.to_string(),
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn moving(
        op: Operation,
        from: impl Into<PathBuf>,
        to: impl Into<PathBuf>,
        source: io::Error,
    ) -> Error {
        Error::Move {
            op,
            from: from.into(),
            to: to.into(),
            source,
        }
    }

    pub(crate) fn json(
        op: Operation,
        path: impl Into<PathBuf>,
        source: serde_json::Error,
    ) -> Error {
        Error::Json {
            op,
            path: path.into(),
            source: JsonError(source),
        }
    }

    /// The path the error is about; for a failed move, the source path.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Layout { path, .. }
            | Error::Json { path, .. }
            | Error::EmptyMessage { path, .. }
            | Error::Duplicate { path, .. }
            | Error::PartialBatch { path, .. } => Some(path),
            Error::Refused { queue, .. } => Some(queue),
            Error::Move { from, .. } => Some(from),
            Error::InvalidId { .. } | Error::Config { .. } => None,
        }
    }

    /// The operation that failed, where there is one.
    pub fn operation(&self) -> Option<Operation> {
        match self {
            Error::Io { op, .. }
            | Error::Move { op, .. }
            | Error::Json { op, .. }
            | Error::EmptyMessage { op, .. }
            | Error::Duplicate { op, .. }
            | Error::Refused { op, .. } => Some(*op),
            Error::PartialBatch { .. } => Some(Operation::Publish),
            Error::InvalidId { .. } | Error::Layout { .. } | Error::Config { .. } => None,
        }
    }

    /// The underlying system error, if the error came from a system call.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { source, .. } | Error::Move { source, .. } => Some(source),
            Error::PartialBatch { source, .. } => source.io_error(),
            _ => None,
        }
    }

    /// The closest [`io::ErrorKind`]: the system error's kind, or the kind that
    /// describes the problem (`InvalidInput` for a bad id, `AlreadyExists` for a
    /// duplicate, `InvalidData` for undecodable or empty messages).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Io { source, .. } | Error::Move { source, .. } => source.kind(),
            Error::PartialBatch { source, .. } => source.kind(),
            Error::InvalidId { .. } | Error::Config { .. } => io::ErrorKind::InvalidInput,
            Error::Layout { .. } | Error::Json { .. } | Error::EmptyMessage { .. } => {
                io::ErrorKind::InvalidData
            }
            Error::Duplicate { .. } => io::ErrorKind::AlreadyExists,
            Error::Refused { .. } => io::ErrorKind::Other,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn display_names_operation_and_path_but_not_the_cause() {
        let e = Error::io(
            Operation::Write,
            "/q/tmp/x",
            io::Error::from_raw_os_error(28),
        );
        assert_eq!(e.to_string(), "failed to write /q/tmp/x");
        assert!(e.source().unwrap().to_string().contains("No space left"));
        assert_eq!(e.path(), Some(Path::new("/q/tmp/x")));
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::StorageFull);
    }

    #[test]
    fn move_names_both_paths() {
        let e = Error::moving(
            Operation::Claim,
            "/q/incoming/a",
            "/q/pending/a",
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert_eq!(
            e.to_string(),
            "failed to claim /q/incoming/a to /q/pending/a"
        );
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }
}
