//! The bridge between directory queues and NATS JetStream (feature `nats`): hops from
//! one host's queue to another's, and one logical queue served by workers on many
//! hosts, without a network protocol of dirq's own.
//!
//! - [`setup`] creates (or checks) a work-queue file stream and its durable pull
//!   consumer. The stream `NAME` takes the subject `dirq.NAME` ([`BridgeConfig::subject`]).
//! - [`Outbound`] claims messages from a queue and publishes each with the header
//!   `Nats-Msg-Id` set to its dirq id, many in flight. It commits a message only after
//!   the server's PubAck; a publish that fails is retried with the same id.
//! - [`Inbound`] pulls from the stream's consumer in batches, stores each batch's
//!   messages under the ids they carry with
//!   [`DirectoryQueue::enqueue_batch_with_id`], syncs the batch per the
//!   queue's [`Durability`](crate::Durability), and acks only then. A message that
//!   arrives again (a redelivery) finds its id already queued or finished and is acked
//!   without being stored twice.
//!
//! Both run until [`StopHandle::stop`], then drain: they take nothing new, finish what
//! is in flight within the drain timeout, and give back (release, or leave unacked for
//! redelivery) what they could not finish. Both reconnect with backoff, pause while
//! their queue is over its high watermark ([`Inbound`]) or has nothing to send
//! ([`Outbound`]), and advertise themselves like a Piper under their queue's `pipers/`,
//! so `dirq status` and `dirq metrics` show their liveness, rates, lag and counters.
//!
//! # Guarantees
//!
//! At least once across the hop, with the dirq id as the idempotency key, and no
//! duplicate at the destination queue: the stream drops a republished id within its
//! `duplicate_window`, and the destination queue refuses an id it holds or has
//! finished recently (its `seen/` records). What covers each failure window is in
//! `docs/scale-out.md`.
//!
//! Not guaranteed: order across the hop (batches are published and stored in claim
//! order, but retries and redeliveries reorder); exactly-once for an id whose `seen/`
//! record has expired at the destination; durability of PubAck'd messages on a single
//! NATS 2.9 node in a power loss (it syncs every two minutes; use three replicas).
//!
//! # Runtime
//!
//! [`Outbound::run`], [`Inbound::run`] and [`setup`] block: each makes a small tokio
//! runtime of its own. No type of the NATS client appears in this module's API.

mod config;
mod error;
mod inbound;
mod nats;
mod outbound;
mod report;
mod setup;
mod stop;
mod store;

pub use config::BridgeConfig;
pub use error::BridgeError;
pub use inbound::Inbound;
pub use outbound::Outbound;
pub use report::BridgeStats;
pub use setup::{setup, SetupReport};
pub use stop::StopHandle;

#[cfg(doc)]
use crate::DirectoryQueue;

/// The small multi-threaded runtime a bridge's `run` makes for itself: the bridge's
/// async work takes little CPU, and file I/O goes to the runtime's blocking pool.
fn runtime(thread_name: &str) -> Result<tokio::runtime::Runtime, BridgeError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(thread_name)
        .enable_all()
        .build()
        .map_err(BridgeError::Runtime)
}
