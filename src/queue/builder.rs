//! Opening a queue with settings other than the defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::config::Config;
use crate::engine::durability::Durability;
use crate::engine::retry::RetryPolicy;
use crate::error::{Error, Result};
use crate::DirectoryQueue;

/// Opens a [`DirectoryQueue`] with non-default settings.
///
/// ```
/// use std::time::Duration;
/// use dirq::{DirectoryQueue, Durability};
///
/// let dir = tempfile::tempdir()?;
/// let queue = DirectoryQueue::builder(dir.path().join("q"))
///     .durability(Durability::Batch)
///     .rescan_interval(Duration::from_millis(250))
///     .open()?;
/// assert_eq!(queue.durability(), Durability::Batch);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct QueueBuilder {
    root: PathBuf,
    config: Config,
}

impl QueueBuilder {
    pub(crate) fn new(root: PathBuf) -> QueueBuilder {
        QueueBuilder {
            root,
            config: Config::default(),
        }
    }

    /// Whether to create the root and any missing state directory.
    ///
    /// Default: `true`.
    pub fn create(&mut self, create: bool) -> &mut Self {
        self.config.create = create;
        self
    }

    /// Permission bits of directories the queue creates. They are applied exactly
    /// (the umask does not narrow them), as Mentat's `queue_in_perms` does.
    ///
    /// Default: `0o775`. Must include `0o700`.
    pub fn dir_mode(&mut self, mode: u32) -> &mut Self {
        self.config.dir_mode = mode;
        self
    }

    /// Permission bits of message files the queue creates, narrowed by the umask.
    ///
    /// Default: `0o664`. Must include `0o600`.
    pub fn file_mode(&mut self, mode: u32) -> &mut Self {
        self.config.file_mode = mode;
        self
    }

    /// What mutating operations sync before they return.
    ///
    /// Default: [`Durability::Full`].
    pub fn durability(&mut self, durability: Durability) -> &mut Self {
        self.config.durability = durability;
        self
    }

    /// How often a blocked [`claim`](DirectoryQueue::claim) rescans `incoming/` when
    /// no filesystem event woke it (events can be missed, and on NFS there are none).
    ///
    /// Where events work, an idle claimer claims the names they carry and reads the
    /// directory at this interval only as a check; on a directory that takes long to
    /// read (one that once held millions of names) it checks less often, at most 0.1 %
    /// of the time (see `docs/protocol.md` §5.3).
    ///
    /// Default: 1 s. Must not be zero.
    pub fn rescan_interval(&mut self, interval: Duration) -> &mut Self {
        self.config.rescan_interval = interval;
        self
    }

    /// How long an unlocked message must have been in `pending/` before
    /// [`recover`](DirectoryQueue::recover) treats its owner as dead. Mentat's daemons
    /// take no locks, so a queue shared with them needs a grace longer than their
    /// longest processing time.
    ///
    /// Default: 0 (an unlocked pending message is orphaned at once).
    pub fn orphan_grace(&mut self, grace: Duration) -> &mut Self {
        self.config.orphan_grace = grace;
        self
    }

    /// How old an unlocked file in `tmp/` must be before
    /// [`recover`](DirectoryQueue::recover) removes it, and how old a hidden file in
    /// `incoming/` must be before it is quarantined.
    ///
    /// Default: 1 hour.
    pub fn tmp_max_age(&mut self, age: Duration) -> &mut Self {
        self.config.tmp_max_age = age;
        self
    }

    /// The longest a message may wait: a claimed message older than this (by the time
    /// in its id, or else its modification time) is moved to `errors/` with reason
    /// `expired` instead of being returned (a batch server's admissible delay).
    ///
    /// Default: none (messages never expire; see [`no_max_age`](Self::no_max_age)).
    /// Must not be zero.
    pub fn max_age(&mut self, age: Duration) -> &mut Self {
        self.config.max_age = Some(age);
        self
    }

    /// Messages never expire: undoes [`max_age`](Self::max_age). The default.
    pub fn no_max_age(&mut self) -> &mut Self {
        self.config.max_age = None;
        self
    }

    /// How [`Message::retry`](crate::Message::retry) spaces attempts and when it gives
    /// up.
    ///
    /// Default: [`RetryPolicy::default`] (1 s, doubling, at most 10 minutes, 5 attempts).
    pub fn retry_policy(&mut self, policy: RetryPolicy) -> &mut Self {
        self.config.retry = policy;
        self
    }

    /// Makes the queue remember the ids of finished messages for `ttl`, so that
    /// [`enqueue_with_id`](DirectoryQueue::enqueue_with_id) refuses an id that was
    /// already processed and removed ([`Enqueued::AlreadyFinished`](crate::Enqueued)),
    /// and not only one still in the queue. `Duration::ZERO` turns it off.
    ///
    /// This is a setting of the queue, not of the handle: it is stored in the queue
    /// (`seen/.ttl`) when the queue is opened, and every handle opened afterwards, in
    /// any process, honours it; a handle opened before reads it again when its last
    /// reading is a second old, and so follows within about a second (a commit in
    /// that second leaves no record). Set it when the queue is made (`dirq init
    /// --seen-ttl`), before workers start.
    ///
    /// The cost: while it is on, each commit, forward or delete first creates an empty
    /// record file in `seen/` (synced first where the filesystem does not keep the
    /// order), and `seen/` holds one file per id finished within the last `ttl` (and
    /// at most an eighth of `ttl` more). Expired records are removed by writers, a few
    /// at a time, and by [`recover`](DirectoryQueue::recover).
    ///
    /// ```
    /// use std::time::Duration;
    /// use dirq::{DirectoryQueue, Enqueued, MessageId};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let queue = DirectoryQueue::builder(dir.path().join("q"))
    ///     .remember_finished(Duration::from_secs(3600))
    ///     .open()?;
    /// let id = MessageId::new("order-17")?;
    /// assert_eq!(queue.enqueue_with_id(&id, b"ship it")?, Enqueued::Stored);
    /// queue.try_claim()?.expect("the order").commit()?;
    /// assert_eq!(queue.enqueue_with_id(&id, b"ship it")?, Enqueued::AlreadyFinished);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// Default: the queue's stored setting, which is off in a new queue. Whole
    /// seconds: a `ttl` under one second (other than zero) is refused at
    /// [`open`](Self::open).
    pub fn remember_finished(&mut self, ttl: Duration) -> &mut Self {
        self.config.remember_finished = Some(ttl);
        self
    }

    /// Opens the queue, creating its layout if allowed.
    ///
    /// # Errors
    ///
    /// - [`Error::Config`] for a setting out of range.
    /// - [`Error::Layout`] when the root or a state directory exists but is a symbolic
    ///   link, not a directory, or on a different filesystem than the root; or when it
    ///   is missing and creation is off.
    /// - [`Error::Io`] when a directory cannot be created or opened.
    pub fn open(&self) -> Result<DirectoryQueue> {
        self.check()?;
        DirectoryQueue::open_with(&self.root, self.config.clone())
    }

    /// Checks the settings as [`open`](Self::open) does, without touching the
    /// filesystem: for a tool that validates a configuration before anything starts
    /// (`dirq run --check`).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a setting out of range, naming it.
    pub fn check(&self) -> Result<()> {
        let target = format!("queue {}", self.root.display());
        let bad = |field: &'static str, reason: String| Err(Error::config(&target, field, reason));
        let c = &self.config;
        if c.dir_mode & !0o7777 != 0 || c.dir_mode & 0o700 != 0o700 {
            return bad(
                "dir_mode",
                format!(
                    "directory mode {:#o} must be at most 0o7777 and include 0o700",
                    c.dir_mode
                ),
            );
        }
        if c.file_mode & !0o7777 != 0 || c.file_mode & 0o600 != 0o600 {
            return bad(
                "file_mode",
                format!(
                    "file mode {:#o} must be at most 0o7777 and include 0o600",
                    c.file_mode
                ),
            );
        }
        if c.rescan_interval.is_zero() {
            return bad("rescan_interval", "must not be zero".to_owned());
        }
        if c.max_age.is_some_and(|age| age.is_zero()) {
            return bad(
                "max_age",
                "must not be zero (every message would expire)".to_owned(),
            );
        }
        if c.remember_finished
            .is_some_and(|ttl| !ttl.is_zero() && ttl < Duration::from_secs(1))
        {
            return bad(
                "remember_finished",
                "must be zero (off) or at least one second".to_owned(),
            );
        }
        Ok(())
    }

    /// The root directory this builder opens.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
