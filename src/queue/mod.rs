//! The queue API: [`DirectoryQueue`], its builder and [`Message`], the claimed
//! message, over the engine.
//!
//! Children, one family of methods each: `builder` (opening with settings), `enqueue`,
//! `claim`, `message` (the terminals of a claimed message), `inspect` (counts and
//! ids), `recover`. This layer imports `sys`, `format` and `engine`, never `admin` or
//! `piper`.

mod builder;
mod claim;
mod enqueue;
mod inspect;
mod message;
mod recover;

use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use builder::QueueBuilder;
pub use enqueue::Enqueued;
pub use inspect::{Counts, Ids};
pub use message::{Message, MessageReader, Retried, TerminalError};
pub use recover::RecoverReport;

pub use crate::engine::retry::{RetryPolicy, RetryPolicyBuilder};
pub use crate::format::group::{Group, InvalidGroup};
pub use crate::format::meta::{FailureDetails, FailureInfo};

use std::time::Instant;

use crate::engine::config::Config;
use crate::engine::durability::Durability;
use crate::engine::publish::{publish_copy, SyncWhen};
use crate::engine::wake::{Interest, Wake};
use crate::engine::Shared;
use crate::error::Result;
use crate::format::id::MessageId;
use crate::format::state::State;
pub(crate) use crate::sys::ArrivalsWatch;

/// A message queue kept as a directory, shared by any number of processes.
///
/// A handle is cheap to clone and safe to share between threads; clones share one
/// directory snapshot, so threads of one process claiming through clones of one handle
/// never race each other for the same message. Separate handles (or processes) race
/// safely: each message goes to exactly one claimer.
///
/// See the [crate documentation](crate) for the protocol and its guarantees.
#[derive(Clone)]
pub struct DirectoryQueue {
    shared: Arc<Shared>,
}

/// Claim statistics of one queue handle (all its clones together), since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimStats {
    /// Messages claimed.
    pub claimed: u64,
    /// Claim attempts lost to another claimer (wasted work, not errors).
    pub collisions: u64,
    /// Entries of `incoming/` moved to `errors/` because they were not claimable
    /// messages (symlinks, FIFOs, empty files, ...).
    pub quarantined: u64,
    /// Claimed messages older than the [maximum age](crate::QueueBuilder::max_age),
    /// moved to `errors/` with reason `expired` instead of being returned.
    pub expired: u64,
    /// Directory scans of `incoming/`.
    pub scans: u64,
}

impl DirectoryQueue {
    /// Opens the queue at `root` with default settings, creating it if it is missing.
    ///
    /// # Errors
    ///
    /// As [`QueueBuilder::open`].
    pub fn open(root: impl AsRef<Path>) -> Result<DirectoryQueue> {
        DirectoryQueue::builder(root).open()
    }

    /// Starts configuring a queue at `root`.
    pub fn builder(root: impl AsRef<Path>) -> QueueBuilder {
        QueueBuilder::new(root.as_ref().to_path_buf())
    }

    pub(crate) fn open_with(root: &Path, config: Config) -> Result<DirectoryQueue> {
        Ok(DirectoryQueue {
            shared: Arc::new(Shared::open(root, config)?),
        })
    }

    /// The root directory, as given when opening.
    pub fn root(&self) -> &Path {
        self.shared.root()
    }

    /// The path of a state directory (`<root>/incoming`, ...).
    pub fn path(&self, state: State) -> &Path {
        self.shared.path(state)
    }

    /// The durability mode of this handle.
    pub fn durability(&self) -> Durability {
        self.shared.syncer().mode()
    }

    /// Claim statistics of this handle and its clones.
    pub fn claim_stats(&self) -> ClaimStats {
        let c = self.shared.counters();
        ClaimStats {
            claimed: c.claimed.load(Ordering::Relaxed),
            collisions: c.collisions.load(Ordering::Relaxed),
            quarantined: c.quarantined.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            scans: c.scans.load(Ordering::Relaxed),
        }
    }

    /// Makes every operation done through this handle so far durable: the barrier of
    /// [`Durability::Batch`] (group commit). In the other modes there is nothing to do.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) with [`Operation::Sync`](crate::error::Operation::Sync) when a directory cannot be synced; the
    /// operations since the previous `sync` may then not survive a crash.
    ///
    /// # Durability
    ///
    /// Syncs each directory changed since the previous call, including the `incoming/`
    /// of queues that messages were forwarded into.
    pub fn sync(&self) -> Result<()> {
        self.shared.syncer().flush()
    }

    /// A new handle on the same directories with the same settings, but its own
    /// snapshot, wake-ups, statistics and batch of unsynced changes, whose directory
    /// syncs wait for [`sync`](Self::sync) unless the mode is [`Durability::None`]: a
    /// Piper's handles, shared by its workers and nobody else, and synced by its
    /// group-commit barrier once per batch (`piper/commit.rs`).
    pub(crate) fn reopen_deferring_syncs(&self) -> DirectoryQueue {
        let durability = match self.durability() {
            Durability::None => Durability::None,
            _ => Durability::Batch,
        };
        DirectoryQueue {
            shared: Arc::new(self.shared.reopen(durability)),
        }
    }

    /// The engine behind this handle, for the operator tools, which work on any
    /// state directory. Its fields are private; it offers methods only.
    pub(crate) fn engine(&self) -> &Shared {
        &self.shared
    }

    // The interface Pipers use besides the public API.

    /// Makes sure this handle's watch reports `interest` in `incoming/`; `true` when
    /// the watch is new (what happened before it sent no event: look again first).
    pub(crate) fn watch(&self, interest: Interest) -> bool {
        self.shared
            .wake()
            .prepare(self.shared.path(State::Incoming), interest)
    }

    /// What wakes this handle's idle claimers (see `wake::wait_any`).
    pub(crate) fn waker(&self) -> &Wake {
        self.shared.wake()
    }

    /// When an idle claimer of this handle should look again.
    pub(crate) fn next_wake(&self, now: Instant) -> Instant {
        self.shared.next_wake(now)
    }

    /// A new, non-blocking watch on `incoming/` for arrivals, for a reactor to poll
    /// (the async claimers of `aio`); `None` where events cannot be trusted or are not
    /// available, so that the caller polls at the rescan interval instead.
    #[cfg_attr(not(feature = "tokio"), expect(dead_code, reason = "used by aio only"))]
    pub(crate) fn arrivals_watch(&self) -> Option<ArrivalsWatch> {
        if !self.shared.wake().events() {
            return None;
        }
        let dir = self.shared.path(State::Incoming);
        match ArrivalsWatch::new(dir) {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "no arrival events; polling only");
                None
            }
        }
    }

    /// The retry policy the queue was opened with.
    pub(crate) fn retry_policy(&self) -> &RetryPolicy {
        &self.shared.config().retry
    }

    /// Publishes a copy of `reader` into `incoming/` under exactly `id` (a Piper's
    /// copy to a second output). The file is synced before it is published;
    /// `incoming/` is synced as this handle's mode says, like an enqueue's, and not at
    /// once in [`Durability::Batch`]: the Piper's barrier syncs it before the original
    /// leaves its queue.
    pub(crate) fn publish_copy(&self, id: &MessageId, reader: impl std::io::Read) -> Result<()> {
        publish_copy(
            self.shared.syncer(),
            &self.shared,
            id,
            reader,
            SyncWhen::ByMode,
        )
    }

    /// Whether two handles refer to the same queue directory.
    pub fn same_queue(&self, other: &DirectoryQueue) -> bool {
        self.shared.identity() == other.shared.identity()
    }
}

impl AsRef<DirectoryQueue> for DirectoryQueue {
    fn as_ref(&self) -> &DirectoryQueue {
        self
    }
}

impl fmt::Debug for DirectoryQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectoryQueue")
            .field("root", &self.shared.root())
            .field("durability", &self.shared.syncer().mode())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn creates_layout_with_exact_mode() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/q");
        let q = DirectoryQueue::builder(&root)
            .dir_mode(0o770)
            .open()
            .unwrap();
        for state in State::ALL {
            let meta = std::fs::metadata(q.path(state)).unwrap();
            assert!(meta.is_dir());
            assert_eq!(meta.permissions().mode() & 0o7777, 0o770, "{state}");
        }
    }

    #[test]
    fn refuses_symlinked_state_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("q");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), root.join("incoming")).unwrap();
        match DirectoryQueue::open(&root) {
            Err(Error::Layout { path, reason }) => {
                assert_eq!(path, root.join("incoming"));
                assert!(reason.contains("symbolic link"), "{reason}");
            }
            other => panic!("expected a layout error, got {other:?}"),
        }
    }

    #[test]
    fn refuses_state_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("q");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("pending"), b"").unwrap();
        let err = DirectoryQueue::open(&root).unwrap_err();
        assert!(err.to_string().contains("pending"), "{err}");
        assert!(matches!(err, Error::Layout { .. }));
    }

    #[test]
    fn missing_queue_without_create_is_a_layout_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = DirectoryQueue::builder(tmp.path().join("nope"))
            .create(false)
            .open()
            .unwrap_err();
        assert!(matches!(err, Error::Layout { .. }), "{err:?}");
    }

    #[test]
    fn bad_settings_are_errors_not_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let mut builder = DirectoryQueue::builder(tmp.path());
        assert!(matches!(
            builder.dir_mode(0o444).open(),
            Err(Error::Config { .. })
        ));
        builder
            .dir_mode(0o775)
            .rescan_interval(std::time::Duration::ZERO);
        assert!(matches!(builder.open(), Err(Error::Config { .. })));
    }
}
