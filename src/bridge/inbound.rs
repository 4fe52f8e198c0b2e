//! The inbound bridge: from a stream's consumer into a queue.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::Message as NatsMessage;
use futures_util::{FutureExt, StreamExt};

use super::config::BridgeConfig;
use super::error::BridgeError;
use super::nats::{self, backoff, consumer_target, Connection, MSG_ID_HEADER};
use super::report::{BridgeStats, Counters, Liveness};
use super::setup::{consumer, existing_stream};
use super::stop::StopHandle;
use super::store::{store_batch, Stored};
use crate::{DirectoryQueue, MessageId, State};

/// How long a backlog count stays good while intake runs.
const RECOUNT: Duration = Duration::from_millis(250);
/// How often a paused bridge counts its queue again.
const PAUSED_POLL: Duration = Duration::from_millis(50);

/// How long an inbound bridge waits on one pull with nothing arriving before it makes
/// a new one.
const IDLE_REPULL: Duration = Duration::from_secs(5);

/// Store batches one pull asks for.
const PULL_AHEAD: usize = 4;

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const DRAINING: u8 = 2;
const CONNECTING: u8 = 3;

/// Pulls messages from a stream's durable consumer and stores each in a queue under the
/// id it carries (`Nats-Msg-Id`); acks each only once it is stored and synced.
///
/// ```no_run
/// use dirq::bridge::{BridgeConfig, Inbound};
/// use dirq::DirectoryQueue;
///
/// let queue = DirectoryQueue::open("/var/spool/dirq/in")?;
/// let bridge = Inbound::new(queue, BridgeConfig::new("nats://10.0.0.2:4222", "orders"));
/// let stats = bridge.run()?;
/// println!("{} stored, {} duplicates absorbed", stats.stored, stats.duplicates);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Exactly one copy at the destination
///
/// The server redelivers what it did not see acked: after a crash of the bridge, a
/// lost connection, or a server crash (an ack is not kept across one). A redelivered
/// message finds its id already in the queue, or finished and remembered in `seen/`,
/// and is acked without being stored again ([`BridgeStats::duplicates`]). The queue
/// must remember finished ids for that
/// ([`QueueBuilder::remember_finished`](crate::QueueBuilder::remember_finished), best
/// set before its workers open it, which otherwise follow within about a second;
/// `dirq bridge in` sets one day where the queue has no setting); without it, only
/// copies still in the queue are caught, and `run` logs a warning.
///
/// # Backpressure
///
/// While the queue's `incoming/` holds the high watermark or more, the bridge pulls
/// nothing; it resumes below the low one. Each pull asks for four batches; messages
/// the client had fetched ahead when it paused come back later as redeliveries, and
/// are absorbed.
pub struct Inbound {
    queue: DirectoryQueue,
    config: BridgeConfig,
    stop: StopHandle,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("queue", &self.queue.root())
            .field("url", &self.config.url)
            .field("stream", &self.config.stream)
            .field("consumer", &self.config.consumer)
            .finish_non_exhaustive()
    }
}

/// An inbound bridge's state while it runs.
struct Run<'a> {
    bridge: &'a Inbound,
    /// The queue handle the bridge stores through, syncing once per batch.
    local: DirectoryQueue,
    counters: Arc<Counters>,
    state: Arc<AtomicU8>,
    /// `incoming/`'s count, and when it was taken, plus what was stored since.
    backlog: usize,
    counted: Option<Instant>,
}

impl Inbound {
    /// A bridge from the consumer of `config` into `queue`.
    pub fn new(queue: DirectoryQueue, config: BridgeConfig) -> Inbound {
        Inbound {
            queue,
            config,
            stop: StopHandle::default(),
        }
    }

    /// The handle that stops [`run`](Self::run).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Runs until stopped, then drains: it stores and acks the batch in hand, naks what
    /// the client had fetched ahead (the server delivers it again at once, to another
    /// bridge if there is one), and returns its counters.
    ///
    /// # Errors
    ///
    /// [`BridgeError::Config`] for bad settings; [`BridgeError::Queue`] when the queue
    /// cannot be advertised in; [`BridgeError::Runtime`]. A NATS server that is down
    /// or a consumer not (yet) there is not an error: the bridge waits and retries. A
    /// message that cannot be stored (a full disk, say) is not acked; the server
    /// delivers it again later.
    ///
    /// # Durability
    ///
    /// A message is acked only after its file and the queue's `incoming/` are synced
    /// as the queue's mode asks ([`Durability::Full`](crate::Durability::Full) and
    /// `Batch`: synced, once per batch; `None`: not synced).
    pub fn run(&self) -> Result<BridgeStats, BridgeError> {
        self.config.check()?;
        if self.queue.remembers_finished().is_none() {
            tracing::warn!(
                queue = %self.queue.root().display(),
                "bridge in: the queue does not remember finished ids (seen/): a message \
                 redelivered after it was processed would be stored again; see \
                 QueueBuilder::remember_finished"
            );
        }
        let runtime = super::runtime("dirq-bridge-in")?;
        runtime.block_on(self.run_async())
    }

    async fn run_async(&self) -> Result<BridgeStats, BridgeError> {
        let config = &self.config;
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| format!("bridge-in {}", config.stream));
        let Connection { js, disconnects } = nats::connect(config, &name).await?;
        let counters = Arc::new(Counters::default());
        let state = Arc::new(AtomicU8::new(CONNECTING));
        let mut liveness = Liveness::create(&self.queue, &name, false, consumer_target(config))?;
        let snapshot = Counters::snapshots(&counters, &disconnects);
        // The consumer, once the server and it are there.
        let mut attempt = 0;
        let consumer = loop {
            let found = match existing_stream(&js, config).await {
                Ok(stream) => consumer(&stream, config, false).await,
                Err(e) => Err(e),
            };
            match found {
                Ok((consumer, _)) => break consumer,
                Err(e) => {
                    tracing::warn!(error = %crate_chain(&e), "bridge in: waiting for the consumer");
                    liveness.beat(&snapshot(), "connecting");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff(attempt)) => {}
                () = self.stop.stopped() => return Ok(snapshot()),
            }
            attempt += 1;
        };
        state.store(RUNNING, Ordering::Relaxed);
        // The heartbeat: lag (the consumer's num_pending) and the advert, every second.
        let heartbeat = {
            let counters = Arc::clone(&counters);
            let state = Arc::clone(&state);
            let consumer = consumer.clone();
            let snapshot = snapshot.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    if let Ok(Ok(info)) =
                        tokio::time::timeout(Duration::from_secs(1), consumer.get_info()).await
                    {
                        counters.lag.store(info.num_pending, Ordering::Relaxed);
                    }
                    let label = match state.load(Ordering::Relaxed) {
                        RUNNING => "running",
                        PAUSED => "paused (backpressure)",
                        DRAINING => "draining",
                        _ => "connecting",
                    };
                    liveness.beat(&snapshot(), label);
                }
            })
        };
        let mut run = Run {
            bridge: self,
            local: self.queue.reopen_deferring_syncs(),
            counters: Arc::clone(&counters),
            state,
            backlog: 0,
            counted: None,
        };
        let result = run.pull_loop(&consumer).await;
        heartbeat.abort();
        let _ = heartbeat.await;
        result.map(|()| snapshot())
    }
}

impl Run<'_> {
    async fn pull_loop(&mut self, consumer: &PullConsumer) -> Result<(), BridgeError> {
        let config = &self.bridge.config;
        let stop = &self.bridge.stop;
        let mut attempt = 0;
        while !stop.is_stopped() {
            self.wait_for_room().await?;
            if stop.is_stopped() {
                break;
            }
            let stream = consumer
                .stream()
                // Pulls of several store batches: one pull per store batch left the
                // bridge waiting on the server (3,500/s against 6,400/s with 4).
                .max_messages_per_batch(config.batch.saturating_mul(PULL_AHEAD))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await;
            let mut messages = match stream {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %e, "bridge in: cannot pull; retrying");
                    self.sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
            };
            self.state.store(RUNNING, Ordering::Relaxed);
            loop {
                let first = tokio::select! {
                    next = messages.next() => next,
                    () = stop.stopped() => break,
                    // IMPORTANT: after a server restart a pull can be lost without the
                    // client noticing for a long time: the multi-host test saw a
                    // redelivery wait minutes for a pull that no longer existed. An idle
                    // bridge therefore pulls afresh now and then; a message delivered to
                    // the abandoned pull meanwhile comes back after the ack wait.
                    () = tokio::time::sleep(IDLE_REPULL) => {
                        tracing::debug!("bridge in: idle, pulling afresh");
                        break;
                    }
                };
                let mut batch = match first {
                    Some(Ok(message)) => vec![message],
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "bridge in: pull failed; pulling again");
                        self.sleep(backoff(attempt)).await;
                        attempt += 1;
                        break;
                    }
                    None => break,
                };
                attempt = 0;
                while batch.len() < config.batch {
                    match messages.next().now_or_never() {
                        Some(Some(Ok(message))) => batch.push(message),
                        _ => break,
                    }
                }
                self.store_and_ack(batch).await;
                if self.over_high_watermark()? {
                    break;
                }
            }
            if stop.is_stopped() {
                self.state.store(DRAINING, Ordering::Relaxed);
                // What the client fetched ahead: nak it, so the server delivers it again
                // at once instead of after the ack wait.
                while let Some(Some(Ok(message))) = messages.next().now_or_never() {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
            }
        }
        self.state.store(DRAINING, Ordering::Relaxed);
        self.local.sync().map_err(BridgeError::Queue)
    }

    /// Stores a batch (on the blocking pool, sending progress acks while that takes
    /// long), then acks what was stored or found already there.
    async fn store_and_ack(&mut self, batch: Vec<NatsMessage>) {
        let counters = Arc::clone(&self.counters);
        let n = batch.len() as u64;
        Counters::add(&counters.in_flight, n);
        let stream = self.bridge.config.stream.clone();
        let mut items = Vec::with_capacity(batch.len());
        for message in &batch {
            let info = message.info().ok();
            if info.as_ref().is_some_and(|i| i.delivered > 1) {
                Counters::add(&counters.redeliveries, 1);
            }
            let keyed = message
                .headers
                .as_ref()
                .and_then(|h| h.get(MSG_ID_HEADER))
                .and_then(|v| MessageId::new(v.as_str()).ok());
            let id = match keyed {
                Some(id) => id,
                None => {
                    // Without a usable id, the stream sequence keys it: redeliveries of
                    // this message are still absorbed, a second publish of it is not.
                    Counters::add(&counters.unkeyed, 1);
                    let seq = info.as_ref().map_or(0, |i| i.stream_sequence);
                    match MessageId::new(format!("nats-{stream}-{seq:020}")) {
                        Ok(id) => id,
                        Err(_) => MessageId::generate(),
                    }
                }
            };
            items.push((id, message.payload.clone()));
        }
        let local = self.local.clone();
        let mut storing = tokio::task::spawn_blocking(move || {
            let results = store_batch(&local, &items)?;
            local.sync()?;
            Ok::<_, crate::Error>(results)
        });
        let every = self.bridge.config.ack_wait / 3;
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let outcome = loop {
            tokio::select! {
                done = &mut storing => break done,
                _ = progress.tick() => {
                    for message in &batch {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    Counters::add(&counters.progress_acks, n);
                }
            }
        };
        let results = match outcome {
            Ok(Ok(results)) => results,
            Ok(Err(e)) => {
                // Not stored, or perhaps not durably: not acked. Redelivered, each is
                // stored then, or finds its id already queued and is acked.
                tracing::warn!(error = %e, "bridge in: cannot store the batch; not acking it");
                for message in &batch {
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
                counters.in_flight.fetch_sub(n, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "bridge in: store task failed; the server will redeliver");
                counters.in_flight.fetch_sub(n, Ordering::Relaxed);
                return;
            }
        };
        for (message, result) in batch.iter().zip(results) {
            match result {
                Ok(stored) => {
                    match stored {
                        Stored::New => {
                            Counters::add(&counters.stored, 1);
                            self.backlog += 1;
                        }
                        Stored::Duplicate => Counters::add(&counters.duplicates, 1),
                    }
                    if let Err(e) = message.ack().await {
                        // Stored; the server delivers it again and it is absorbed then.
                        tracing::warn!(error = %e, "bridge in: cannot ack a stored message");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bridge in: cannot store a message; the server will redeliver it");
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
            }
        }
        counters.in_flight.fetch_sub(n, Ordering::Relaxed);
    }

    /// Whether `incoming/` reached the high watermark: counted again when the estimate
    /// (last count plus what was stored since) gets there or the count is old.
    fn over_high_watermark(&mut self) -> Result<bool, BridgeError> {
        let high = self.bridge.config.high_watermark;
        let stale = self.counted.is_none_or(|t| t.elapsed() >= RECOUNT);
        if stale || self.backlog >= high {
            self.backlog = self.count()?;
            self.counted = Some(Instant::now());
        }
        Ok(self.backlog >= high)
    }

    /// While over the high watermark: paused until below the low one (or stopped).
    async fn wait_for_room(&mut self) -> Result<(), BridgeError> {
        if !self.over_high_watermark()? {
            return Ok(());
        }
        let low = self.bridge.config.low_watermark;
        self.state.store(PAUSED, Ordering::Relaxed);
        tracing::info!(count = self.backlog, "bridge in: queue full, pausing");
        let since = Instant::now();
        while !self.bridge.stop.is_stopped() {
            self.sleep(PAUSED_POLL).await;
            self.backlog = self.count()?;
            self.counted = Some(Instant::now());
            if self.backlog < low {
                break;
            }
        }
        let paused = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        Counters::add(&self.counters.paused_ms, paused);
        tracing::info!(count = self.backlog, "bridge in: resuming");
        self.state.store(RUNNING, Ordering::Relaxed);
        Ok(())
    }

    /// `incoming/`'s count: a directory read, off the reactor's own work (the runtime
    /// is multi-threaded, so another thread keeps polling meanwhile).
    fn count(&self) -> crate::Result<usize> {
        tokio::task::block_in_place(|| self.local.count(State::Incoming))
    }

    async fn sleep(&self, duration: Duration) {
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            () = self.bridge.stop.stopped() => {}
        }
    }
}

/// An error and its causes on one line.
fn crate_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
