//! The outbound bridge: from a queue to a stream.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::config::BridgeConfig;
use super::error::BridgeError;
use super::nats::{self, backoff, stream_target, Connection};
use super::report::{BridgeStats, Counters, Liveness};
use super::stop::StopHandle;
use crate::{DirectoryQueue, Message, State};

/// How long one claim waits for a message before the bridge looks at its stop flag.
const CLAIM_WAIT: Duration = Duration::from_millis(200);

/// Claims messages from a queue and publishes them to a stream, each with
/// `Nats-Msg-Id` set to its dirq id; commits each only after the stream acknowledged
/// it.
///
/// ```no_run
/// use dirq::bridge::{BridgeConfig, Outbound};
/// use dirq::DirectoryQueue;
///
/// let queue = DirectoryQueue::open("/var/spool/dirq/out")?;
/// let bridge = Outbound::new(queue, BridgeConfig::new("nats://10.0.0.2:4222", "orders"));
/// let stop = bridge.stop_handle(); // stop.stop() from a signal handler drains it
/// let stats = bridge.run()?;
/// println!("{} published", stats.published);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # At least once, without duplicates downstream
///
/// A message is claimed (moved to `pending/`), published, and committed once its
/// PubAck arrives. A publish that fails or times out is retried with the same id until
/// it is acknowledged; if the bridge dies first, the message stays in `pending/` and
/// the next run (which calls [`recover`](DirectoryQueue::recover)) publishes it again.
/// The stream drops an id it holds within its duplicate window; the destination's
/// [`enqueue_with_id`](DirectoryQueue::enqueue_with_id) absorbs the rest.
pub struct Outbound {
    queue: DirectoryQueue,
    config: BridgeConfig,
    stop: StopHandle,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("queue", &self.queue.root())
            .field("url", &self.config.url)
            .field("stream", &self.config.stream)
            .finish_non_exhaustive()
    }
}

/// What the batch tasks share.
struct Shared {
    js: async_nats::jetstream::Context,
    subject: String,
    queue: DirectoryQueue,
    counters: Arc<Counters>,
    stop: StopHandle,
}

impl Outbound {
    /// A bridge from `queue` to the stream of `config`.
    pub fn new(queue: DirectoryQueue, config: BridgeConfig) -> Outbound {
        Outbound {
            queue,
            config,
            stop: StopHandle::default(),
        }
    }

    /// The handle that stops [`run`](Self::run).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Runs until stopped, then drains: claims nothing new, waits for the PubAcks of
    /// what is in flight (up to the drain timeout), commits those, and releases the
    /// messages whose publish failed back into `incoming/`.
    ///
    /// # Errors
    ///
    /// [`BridgeError::Config`] for bad settings; [`BridgeError::Queue`] when the queue
    /// cannot be recovered, claimed from or advertised in; [`BridgeError::Runtime`].
    /// A NATS server that is down is not an error: the bridge waits and reconnects.
    ///
    /// # Durability
    ///
    /// Commits are synced per batch by the queue's mode; a commit lost in a crash makes
    /// the message go out again under the same id, which the stream or the destination
    /// drops.
    pub fn run(&self) -> Result<BridgeStats, BridgeError> {
        self.config.check()?;
        self.queue.recover()?;
        let runtime = super::runtime("dirq-bridge-out")?;
        runtime.block_on(self.run_async())
    }

    async fn run_async(&self) -> Result<BridgeStats, BridgeError> {
        let config = &self.config;
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| format!("bridge-out {}", config.stream));
        let Connection { js, disconnects } = nats::connect(config, &name).await?;
        let counters = Arc::new(Counters::default());
        let mut liveness = Liveness::create(&self.queue, &name, true, stream_target(config))?;
        let shared = Arc::new(Shared {
            js,
            subject: config.subject(),
            queue: self.queue.reopen_deferring_syncs(),
            counters: Arc::clone(&counters),
            stop: self.stop.clone(),
        });
        let snapshot = Counters::snapshots(&counters, &disconnects);
        // The heartbeat: lag (the queue's incoming/) and the advert, every second.
        let heartbeat = {
            let queue = self.queue.clone();
            let counters = Arc::clone(&counters);
            let stop = self.stop.clone();
            let snapshot = snapshot.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let q = queue.clone();
                    if let Ok(Ok(n)) =
                        tokio::task::spawn_blocking(move || q.count(State::Incoming)).await
                    {
                        counters
                            .lag
                            .store(n as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    let state = if stop.is_stopped() {
                        "draining"
                    } else {
                        "running"
                    };
                    liveness.beat(&snapshot(), state);
                }
            })
        };
        let batches = config.in_flight.div_ceil(config.batch).max(1);
        let permits = Arc::new(Semaphore::new(batches));
        let mut tasks = JoinSet::new();
        let mut result = Ok(());
        while !self.stop.is_stopped() {
            let permit = tokio::select! {
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = self.stop.stopped() => break,
            };
            let queue = shared.queue.clone();
            let batch = config.batch;
            let claimed = tokio::task::spawn_blocking(move || claim_batch(&queue, batch))
                .await
                .map_err(|e| BridgeError::Runtime(std::io::Error::other(e)));
            match claimed {
                Ok(Ok(claimed)) if claimed.is_empty() => {}
                Ok(Ok(claimed)) => {
                    Counters::add(&counters.claimed, claimed.len() as u64);
                    tasks.spawn(send_batch(Arc::clone(&shared), claimed, permit));
                }
                Ok(Err(e)) => {
                    result = Err(BridgeError::Queue(e));
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            while tasks.try_join_next().is_some() {}
        }
        // Drain: every batch task ends by itself once its PubAcks arrived or, stopped,
        // after one failed attempt (it releases what failed).
        self.stop.stop();
        let drain = config.drain_timeout + nats::REQUEST_TIMEOUT;
        if tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tracing::warn!(
                "bridge out: in-flight batches did not finish within the drain timeout; \
                 their messages stay in pending/ until recover()"
            );
            tasks.abort_all();
        }
        if let Err(e) = shared.queue.sync() {
            result = result.and(Err(BridgeError::Queue(e)));
        }
        heartbeat.abort();
        let _ = heartbeat.await;
        result.map(|()| snapshot())
    }
}

/// Claims up to `batch` messages, waiting up to [`CLAIM_WAIT`] for the first, and reads
/// them. A message that cannot be read goes to `errors/`.
fn claim_batch(queue: &DirectoryQueue, batch: usize) -> crate::Result<Vec<(Message, Bytes)>> {
    let mut out = Vec::new();
    let Some(first) = queue.claim_timeout(CLAIM_WAIT)? else {
        return Ok(out);
    };
    let mut next = Some(first);
    while let Some(message) = next.take() {
        match message.bytes() {
            Ok(bytes) => out.push((message, Bytes::from(bytes))),
            Err(e) => {
                tracing::warn!(id = %message.id(), error = %e, "bridge out: unreadable message, moved to errors/");
                if let Err(e) = message.fail(format!("bridge out: cannot read the message: {e}")) {
                    tracing::warn!(error = %e.error(), "bridge out: cannot move an unreadable message to errors/");
                }
            }
        }
        if out.len() < batch {
            next = queue.try_claim()?;
        }
    }
    Ok(out)
}

/// Publishes one batch, retrying failures with the same ids, and commits what the
/// stream acknowledged.
async fn send_batch(
    shared: Arc<Shared>,
    mut pending: Vec<(Message, Bytes)>,
    _permit: OwnedSemaphorePermit,
) {
    let counters = &shared.counters;
    let mut attempt = 0;
    loop {
        let n = pending.len() as u64;
        Counters::add(&counters.in_flight, n);
        let mut acks = Vec::with_capacity(pending.len());
        for (message, bytes) in &pending {
            let publish = PublishMessage::build()
                .payload(bytes.clone())
                .message_id(message.id().to_string());
            acks.push(
                shared
                    .js
                    .send_publish(shared.subject.clone(), publish)
                    .await,
            );
        }
        let mut acked = Vec::with_capacity(pending.len());
        let mut failed = Vec::new();
        let mut last_error = None;
        for ((message, bytes), ack) in pending.into_iter().zip(acks) {
            let result = match ack {
                Ok(future) => future.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(puback) => {
                    if puback.duplicate {
                        Counters::add(&counters.republished, 1);
                    }
                    acked.push(message);
                }
                Err(e) => {
                    last_error = Some(e);
                    failed.push((message, bytes));
                }
            }
        }
        counters
            .in_flight
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        if !acked.is_empty() {
            let queue = shared.queue.clone();
            let count = acked.len() as u64;
            let committed = tokio::task::spawn_blocking(move || {
                for message in acked {
                    if let Err(e) = message.commit() {
                        // Published but still here: it goes out again under the same
                        // id, and the stream or the destination drops the copy.
                        tracing::warn!(error = %e.error(), "bridge out: cannot commit a published message");
                    }
                }
                queue.sync()
            })
            .await;
            match committed {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "bridge out: cannot sync commits"),
                Err(e) => tracing::warn!(error = %e, "bridge out: commit task failed"),
            }
            Counters::add(&counters.published, count);
        }
        if failed.is_empty() {
            return;
        }
        Counters::add(&counters.publish_retries, failed.len() as u64);
        tracing::warn!(
            count = failed.len(),
            error = last_error.as_deref().unwrap_or(""),
            "bridge out: publish failed; retrying with the same ids"
        );
        if shared.stop.is_stopped() {
            release(&shared, failed).await;
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff(attempt)) => {}
            () = shared.stop.stopped() => {}
        }
        attempt += 1;
        pending = failed;
    }
}

/// Gives unpublished messages back to the queue.
async fn release(shared: &Shared, messages: Vec<(Message, Bytes)>) {
    let count = messages.len() as u64;
    let released = tokio::task::spawn_blocking(move || {
        for (message, _) in messages {
            if let Err(e) = message.release() {
                tracing::warn!(error = %e.error(), "bridge out: cannot release a message");
            }
        }
    })
    .await;
    if released.is_ok() {
        Counters::add(&shared.counters.released, count);
    }
}
