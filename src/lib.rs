//! Durable, multi-process message queues kept as plain directories: the filer
//! protocol of CESNET's Mentat, made crash-proof.
//!
//! A queue is a directory with four state directories. Any number of processes and
//! threads enqueue into it and claim from it at once; each message goes to exactly
//! one claimer, nothing acknowledged is lost in a crash, and an operator can see and
//! repair everything with `ls` and the `dirq` command.
//!
//! ```text
//! QUEUE/
//!   tmp/        files being written; never read by consumers
//!   incoming/   complete messages, ready to be claimed (nothing else ever appears here)
//!   pending/    claimed messages, each owned by the live process holding its lock
//!   errors/     failed messages, each with an <id>.meta JSON sidecar saying why
//! ```
//!
//! # Protocol
//!
//! ```text
//!            enqueue                 claim                commit
//!   tmp/ ───────────────▶ incoming/ ───────▶ pending/ ──────────────▶ (deleted)
//!                            ▲  ▲              │  │ forward
//!                            │  └── release ───┘  └─────────▶ next queue's incoming/
//!                            │     or recover     │ fail
//!                            └──── requeue ── errors/ ◀┘
//! ```
//!
//! - [`DirectoryQueue::enqueue`] writes `tmp/X` (exclusive create), syncs it, and
//!   renames it to `incoming/X`.
//! - [`DirectoryQueue::claim`] opens `incoming/X` without following symlinks, takes an
//!   exclusive `flock` on it, checks the name still names the locked file, and renames
//!   it to `pending/X`. The returned [`Message`] keeps the lock: a message in
//!   `pending/` whose lock anyone can take has a dead owner.
//! - [`Message::commit`] deletes it, [`Message::forward`] renames it into the next
//!   queue's `incoming/`, [`Message::fail`] moves it to `errors/` with a `.meta`
//!   sidecar, [`Message::release`] puts it back.
//! - [`DirectoryQueue::recover`] requeues messages of dead owners and removes
//!   abandoned temporary files.
//! - [`Message::retry`] defers a message with backoff into `deferred/` (a dead letter in
//!   `errors/` after the last attempt); [`DirectoryQueue::enqueue_at`] delays delivery;
//!   [`admin::hold`] keeps a message in `hold/` until [`admin::unhold`].
//!
//! A [`Piper`](piper::Piper) runs a [`Stage`](piper::Stage) over input queues and feeds
//! output queues, with backpressure, retries, timeouts, a failure breaker, graceful
//! shutdown on SIGTERM, statistics and liveness: the building block of multi-process
//! pipelines.
//!
//! # Modules
//!
//! The root holds what a first program needs: [`DirectoryQueue`], [`QueueBuilder`],
//! [`Message`], [`MessageId`], [`State`], [`Durability`], [`Error`] and [`Result`].
//! The rest lives in public modules:
//!
//! - [`queue`]: the secondary types of the queue API (counts, statistics, the retry
//!   policy, failure details, a message's reader and terminal errors);
//! - [`piper`]: stages over queues, with backpressure, retries and liveness;
//! - [`admin`]: the operator's tools (listing, hold, requeue, delete, purge, check and
//!   repair, and cancelling a running message);
//! - [`error`]: the error type and what it carries;
//! - `aio` (feature `tokio`): the queue API for tokio, `AsyncQueue` and
//!   `AsyncMessage`, waiting on the runtime's reactor and doing file I/O on its
//!   blocking pool.
//! - `serve` (feature `serve`): the HTTP API and web console of `dirq serve` over
//!   every queue under a spool root.
//!
//! The full specification, with every system call, fsync and crash case, is in
//! `docs/protocol.md`.
//!
//! # Example
//!
//! ```
//! use dirq::DirectoryQueue;
//!
//! let dir = tempfile::tempdir().expect("a temporary directory");
//! let parsed = DirectoryQueue::open(dir.path().join("parsed"))?;
//! let input = DirectoryQueue::open(dir.path().join("input"))?;
//!
//! let id = input.enqueue(br#"{"event": "login"}"#)?;
//!
//! // A worker (often another process) claims the oldest message...
//! let message = input.try_claim()?.expect("one message is waiting");
//! assert_eq!(message.id(), &id);
//! let event: serde_json::Value = message.json()?;
//! assert_eq!(event["event"], "login");
//! // ...and hands it to the next stage, under the same id.
//! message.forward(&parsed)?;
//!
//! assert_eq!(parsed.counts()?.incoming, 1);
//! assert_eq!(input.counts()?.pending, 0);
//! # Ok::<(), dirq::Error>(())
//! ```
//!
//! # Durability
//!
//! Each handle has a [`Durability`] mode. [`Durability::Full`] (the default) makes
//! every acknowledged operation survive power loss: a message file is synced before it
//! is published, and every directory an operation changed is synced before it returns.
//! [`Durability::Batch`] defers directory syncs to [`DirectoryQueue::sync`] (group
//! commit), and [`DirectoryQueue::enqueue_batch`] publishes many messages behind one
//! barrier in any mode. [`Durability::None`] never syncs, like Mentat. Every mutating
//! method says under `# Durability` what it syncs.
//!
//! Delivery guarantees:
//!
//! - No acknowledged message is ever lost: not by a process crash, and, in `Full`
//!   mode, not by power loss with honest hardware.
//! - A forward within one filesystem is exactly-once. Across filesystems it is
//!   copy-then-delete and so at-least-once.
//! - Processing is at-least-once after a crash: a message whose worker died is
//!   requeued and processed again. Without crashes no message is processed twice.
//! - The id is stable across stages and serves as the idempotency key.
//!
//! # Multiple processes
//!
//! Any number of processes may enqueue, claim and recover on one queue at once.
//! Ownership is by kernel lock (`flock`), not by pid files or clocks: it is immune to
//! pid reuse and clock jumps, and a stopped (`SIGSTOP`) worker keeps its messages.
//! Claimers that lose a race move on silently; claimers that keep colliding spread
//! apart. Run [`DirectoryQueue::recover`] at start and periodically in long-running
//! consumers.
//!
//! Mentat's daemons take no locks. A queue shared with them needs an [orphan
//! grace](QueueBuilder::orphan_grace) longer than their processing time, or recovery
//! would requeue what they are working on.
//!
//! # Platform behavior
//!
//! Linux is the primary platform: `renameat2(RENAME_NOREPLACE)`, inotify wake-ups
//! through `notify`, and the fsync policy that knows ext4 and xfs commit their whole
//! journal on any fsync. Other Unix systems work with `link` + `unlink` in place of
//! `RENAME_NOREPLACE` where needed. On other platforms the crate builds, and every
//! operation returns [`std::io::ErrorKind::Unsupported`].
//!
//! # Known problems
//!
//! - **NFS** has no `RENAME_NOREPLACE` (link + unlink is used), no inotify (claimers
//!   poll every rescan interval), caches attributes, and may lose `flock` locks after a
//!   partition: run one host's workers per queue, or accept duplicates after network
//!   failures. See `docs/protocol.md` and `docs/scale-out.md`.
//! - **Filesystem events are hints.** inotify can overflow and some filesystems
//!   (FUSE, NFS) send none; a claimer then finds new messages at its next rescan.
//! - **The async API** (`aio`, feature `tokio`) is for Unix (its wake-up is an
//!   `AsyncFd`); it polls at the rescan interval off Linux. Each operation is a hop to
//!   the blocking pool, which costs more than the operation itself when nothing is
//!   synced ([`Durability::None`]).
//! - **Cross-filesystem forwards** are at-least-once (copy, sync, publish, delete).
//! - **Attempt counts** need user extended attributes; where the filesystem has none,
//!   every claim counts as the first.
//! - **Foreign names** without a recognisable creation time are claimed before timed
//!   ones, in byte order.

// One call needs `unsafe`: sync_file_range(2), which no safe wrapper offers
// (sys/unix.rs, `write_back_and_wait`). Everything else is safe code.
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![warn(
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms,
    clippy::unwrap_used
)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

// The layers, bottom up: sys, format, error, engine, queue; on top admin, piper
// and spool. Each imports only from the layers below it (docs/architecture.md).
pub mod admin;
#[cfg(feature = "tokio")]
pub mod aio;
#[cfg(feature = "nats")]
pub mod bridge;
mod engine;
pub mod error;
mod format;
pub mod piper;
pub mod queue;
#[cfg(feature = "serve")]
pub mod serve;
pub mod spool;
mod sys;

pub use engine::durability::Durability;
pub use error::{Error, Result};
pub use format::id::MessageId;
pub use format::state::State;
pub use queue::Enqueued;
pub use queue::{DirectoryQueue, Message, QueueBuilder};

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
