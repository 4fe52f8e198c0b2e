//! Pipers: processes that run a [`Stage`] over input queues and feed output queues,
//! with backpressure, retries, timeouts, a failure breaker and graceful shutdown.

mod alert;
#[cfg(feature = "tokio")]
mod async_stage;
mod backpressure;
mod breaker;
mod cancel;
mod command;
mod commit;
mod history;
pub(crate) mod liveness;
mod stage;
pub(crate) mod stats;
mod supervisor;
mod takeover;
mod worker;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant, SystemTime};

pub use alert::{queue_alerts, Alert, AlertKind, AlertPolicy, Alerts};
#[cfg(feature = "tokio")]
pub use async_stage::AsyncStage;
pub use breaker::BreakerPolicy;
pub(crate) use cancel::{
    dir_path as cancel_dir_path, open_dir as open_cancel_dir, read as read_cancel,
    remove as remove_cancel, remove_stale as remove_stale_cancels, write as write_cancel,
    Answer as CancelAnswer, Request as CancelRequest,
};
pub use cancel::{Cancellation, CANCELLED_REASON};
pub use command::{CommandStage, CommandStageBuilder, EX_TEMPFAIL, ROUTE_LINE_PREFIX};
pub use liveness::PiperInfo;
pub(crate) use liveness::{read_adverts, PIPERS_DIR};
pub use stage::{Emit, Failed, Outcome, Stage, StageError, StageResult};
pub use stats::{PiperRates, PiperStats};

use crate::error::{Error, Result};
use crate::{DirectoryQueue, Durability};
use backpressure::{Gauge, Limits};
use breaker::Breaker;
use commit::{Barrier, Finish};
use history::{Journal, Rotation};
use stats::{Counters, RateWindow};

type Factory = Arc<dyn Fn() -> Box<dyn Stage> + Send + Sync>;

/// What happens to a message whose processing exceeds the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TimeoutAction {
    /// Move it to `errors/` with reason `timeout`.
    #[default]
    Fail,
    /// Retry it later with backoff (dead-lettered after the last attempt).
    Retry,
}

/// Runs a [`Stage`] over one or more input queues, feeding zero or more outputs: the
/// Piper daemon of Mentat's pipelines, and what `dirq exec` runs.
///
/// - **Inputs** are read in strict priority order: a worker takes from the first input
///   that has a message.
/// - **Outputs** are named. [`Outcome::Forward`] passes a message to every output
///   (renamed into the first, copied into the others); [`Outcome::ForwardTo`] routes it
///   to one.
/// - **Workers**: N threads in this process. Stages in several processes can share a
///   queue; each message goes to one of them.
/// - **Backpressure**: intake pauses while an output holds more than its high
///   watermark (a count, and optionally bytes) and resumes below the low one (80 % of
///   high by default), woken by the output's directory events with a timer fallback.
/// - **Timeouts**: a message processed for longer than the timeout is failed with
///   reason `timeout` (or retried) at once, and a fresh worker takes the stuck one's
///   place; the stuck thread's outcome is discarded when it returns.
/// - **Cancelling**: an operator can make the Piper abandon one running message
///   ([`admin::cancel_timeout`](crate::admin::cancel_timeout), `dirq cancel`): its stage
///   is told through [`Stage::process_cancellable`] (a [`CommandStage`] kills the
///   command's process group), and the message goes to `errors/` with reason
///   [`CANCELLED_REASON`] or back to `incoming/`, whatever the stage returns.
/// - **Failure breaker**: when too many messages fail, intake pauses (and an error is
///   logged) instead of burning the queue into `errors/`.
/// - **Shutdown**: [`PiperHandle::shutdown`] (or SIGTERM/SIGINT with
///   [`handle_signals`](PiperBuilder::handle_signals)) stops intake, lets in-flight
///   messages finish within the drain timeout, releases the rest, and returns from
///   [`run`](Piper::run). A second signal releases in-flight messages at once.
/// - **Async stages** (feature `tokio`): an `AsyncStage` set with
///   `PiperBuilder::async_stage` runs up to N futures per worker on a
///   tokio runtime, with everything above unchanged.
/// - **Liveness**: each running Piper advertises itself in `<input>/pipers/`, with its
///   counters, refreshed every 2 s ([`admin::pipers`](crate::admin::pipers)).
/// - **Recovery**: the inputs are recovered at start and every minute.
/// - **History**: each outcome is a JSON line in its input's `history/current.jsonl`
///   (on by default; see [`history`](PiperBuilder::history)), read with
///   [`admin::history`](crate::admin::history).
/// - **Group commit**: unless the inputs' mode is [`Durability::None`], one barrier
///   syncs the directories of a batch of outcomes at once (at most
///   [`commit_batch`](PiperBuilder::commit_batch) outcomes, or
///   [`commit_delay`](PiperBuilder::commit_delay) after the first). Results a stage
///   published (emitted messages, copies to other outputs) are durable before their
///   input message leaves its queue, so after a power cut every message is either
///   still upstream or durably downstream. A crash can make the Piper process again
///   the messages of the last batch that was not yet synced; they keep their ids.
///   This is what [`Durability::Full`] and [`Durability::Batch`] both mean in a
///   Piper: see [`commit_batch`](PiperBuilder::commit_batch).
///
/// ```
/// use dirq::{DirectoryQueue, Message};
/// use dirq::piper::{Outcome, Piper, StageResult};
///
/// let dir = tempfile::tempdir().expect("a temporary directory");
/// let input = DirectoryQueue::open(dir.path().join("input"))?;
/// let output = DirectoryQueue::open(dir.path().join("output"))?;
/// input.enqueue(br#"{"n": 1}"#)?;
///
/// let piper = Piper::builder("double")
///     .input(&input)
///     .output("next", &output)
///     .workers(2)
///     .stage(|message: &Message| -> StageResult {
///         let value: serde_json::Value = message.json()?;
///         let doubled = serde_json::json!({"n": value["n"].as_i64().unwrap_or(0) * 2});
///         Ok(Outcome::Emit(vec![dirq::piper::Emit::json(&doubled)?]))
///     })
///     .build()?;
/// let handle = piper.handle();
/// let runner = std::thread::spawn(move || piper.run());
/// // The next stage (here, this thread) gets the doubled message, waiting for it.
/// let doubled = output
///     .claim_timeout(std::time::Duration::from_secs(60))?
///     .expect("the doubled message within a minute");
/// assert_eq!(doubled.json::<serde_json::Value>()?["n"], 2);
/// doubled.commit()?;
/// handle.shutdown();
/// let stats = runner.join().expect("the piper thread")?;
/// assert_eq!(stats.emitted, 1);
/// # Ok::<(), dirq::Error>(())
/// ```
pub struct Piper {
    shared: Arc<Shared>,
}

/// Configures a [`Piper`]; see [`Piper::builder`].
pub struct PiperBuilder {
    name: String,
    inputs: Vec<DirectoryQueue>,
    outputs: Vec<(String, DirectoryQueue)>,
    factory: Option<Factory>,
    workers: usize,
    limit: usize,
    low: Option<usize>,
    limit_bytes: Option<u64>,
    low_bytes: Option<u64>,
    resume_wait: Duration,
    timeout: Option<Duration>,
    on_timeout: TimeoutAction,
    breaker: BreakerPolicy,
    alerts: AlertPolicy,
    drain_timeout: Duration,
    stats_interval: Duration,
    recover_interval: Duration,
    signals: bool,
    advertise: bool,
    commit_batch: usize,
    commit_delay: Duration,
    history: bool,
    rotation: Rotation,
    /// The async stage and its futures in flight per worker.
    #[cfg(feature = "tokio")]
    async_stage: Option<(async_stage::Run, usize)>,
    #[cfg(feature = "tokio")]
    runtime: Option<tokio::runtime::Handle>,
}

impl Piper {
    /// Starts configuring a Piper; `name` names the stage in logs, statistics and
    /// liveness files.
    pub fn builder(name: impl Into<String>) -> PiperBuilder {
        PiperBuilder {
            name: name.into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            factory: None,
            workers: 1,
            limit: 5000,
            low: None,
            limit_bytes: None,
            low_bytes: None,
            resume_wait: Duration::from_secs(1),
            timeout: None,
            on_timeout: TimeoutAction::Fail,
            breaker: BreakerPolicy::default(),
            alerts: AlertPolicy::new(),
            drain_timeout: Duration::from_secs(30),
            stats_interval: Duration::from_secs(60),
            recover_interval: Duration::from_secs(60),
            signals: false,
            advertise: true,
            commit_batch: PiperBuilder::DEFAULT_COMMIT_BATCH,
            commit_delay: PiperBuilder::DEFAULT_COMMIT_DELAY,
            history: true,
            rotation: Rotation {
                max_bytes: PiperBuilder::DEFAULT_HISTORY_MAX_BYTES,
                max_age: PiperBuilder::DEFAULT_HISTORY_MAX_AGE,
                keep: PiperBuilder::DEFAULT_HISTORY_KEEP,
            },
            #[cfg(feature = "tokio")]
            async_stage: None,
            #[cfg(feature = "tokio")]
            runtime: None,
        }
    }

    /// A handle to stop the Piper or read its statistics from another thread.
    pub fn handle(&self) -> PiperHandle {
        PiperHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Runs until [`PiperHandle::shutdown`] (or a signal, with
    /// [`handle_signals`](PiperBuilder::handle_signals)), then drains and returns the
    /// final statistics. Take a [`handle`](Self::handle) first to stop it from another
    /// thread. A Piper whose handle was told to stop before `run` starts nothing and
    /// returns at once.
    ///
    /// `run` consumes the Piper, so a Piper runs only once:
    ///
    /// ```compile_fail,E0382
    /// # fn twice(piper: dirq::piper::Piper) -> dirq::Result<()> {
    /// piper.run()?;
    /// piper.run()?; // error: use of moved value
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// An [`Error`] when the inputs cannot be recovered or the liveness files cannot be
    /// written at start, and [`Error::Config`] (field `stage`) when the stage stopped
    /// it with [`Outcome::Stop`]. Other errors while running are logged and do not
    /// stop it.
    pub fn run(self) -> Result<PiperStats> {
        supervisor::run(&self.shared)
    }
}

impl PiperBuilder {
    /// The most [`workers`](Self::workers) a Piper may have: threads beyond it would
    /// only contend for the same directories (run more processes instead), and a
    /// mistyped count must not exhaust the host's threads.
    pub const MAX_WORKERS: usize = 1024;

    /// The largest [`commit_batch`](Self::commit_batch): a bigger batch only means more
    /// messages to process again after a crash.
    pub const MAX_COMMIT_BATCH: usize = 65_536;

    /// The default [`commit_batch`](Self::commit_batch): outcomes per directory sync.
    pub const DEFAULT_COMMIT_BATCH: usize = 64;

    /// The default [`commit_delay`](Self::commit_delay): how long a batch stays open
    /// after its first outcome.
    pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_millis(2);

    /// Adds an input queue; inputs are read in the order they were added (strict
    /// priority). The Piper opens its own handle to the same directory, with the same
    /// settings (retry policy, maximum age, durability), except that its directory
    /// syncs are the Piper's [group commit](Self::commit_batch).
    pub fn input(&mut self, queue: &DirectoryQueue) -> &mut Self {
        self.inputs.push(queue.clone());
        self
    }

    /// Adds a named output queue. As for inputs, the Piper opens its own handle,
    /// synced by its [group commit](Self::commit_batch).
    pub fn output(&mut self, name: impl Into<String>, queue: &DirectoryQueue) -> &mut Self {
        self.outputs.push((name.into(), queue.clone()));
        self
    }

    /// The stage; each worker gets its own clone.
    pub fn stage<S: Stage + Clone + Sync + 'static>(&mut self, stage: S) -> &mut Self {
        #[cfg(feature = "tokio")]
        {
            self.async_stage = None;
        }
        self.factory = Some(Arc::new(move || Box::new(stage.clone()) as Box<dyn Stage>));
        self
    }

    /// Makes each worker's stage with `factory` (per-worker state such as a
    /// connection). A worker whose stage panicked gets a fresh one.
    pub fn stage_factory<S, F>(&mut self, factory: F) -> &mut Self
    where
        S: Stage + 'static,
        F: Fn() -> S + Send + Sync + 'static,
    {
        #[cfg(feature = "tokio")]
        {
            self.async_stage = None;
        }
        self.factory = Some(Arc::new(move || Box::new(factory()) as Box<dyn Stage>));
        self
    }

    /// The most futures in flight per worker of an
    /// [`async_stage`](Self::async_stage).
    #[cfg(feature = "tokio")]
    pub const MAX_IN_FLIGHT: usize = 65_536;

    /// An [`AsyncStage`] instead of a sync one (feature `tokio`): each worker claims
    /// messages and runs up to `in_flight` of the stage's futures at once (from 1 to
    /// [`MAX_IN_FLIGHT`](Self::MAX_IN_FLIGHT)), on the [`runtime`](Self::runtime) or,
    /// without one, a multi-threaded runtime the Piper makes for itself. One instance
    /// serves every worker and future.
    ///
    /// Claims and outcomes run on the worker threads, as for a sync stage, so retries,
    /// backpressure, the breaker, the group commit, history, statistics and drains work
    /// the same. The differences: the [`timeout`](Self::timeout) drops the future (the
    /// worker goes on; no thread is replaced), a drain that runs out of time drops the
    /// futures still in flight and releases their messages, and operators cannot
    /// cancel a single message of an async stage: its liveness file says it is not
    /// cancellable, so `dirq cancel` refuses at once.
    #[cfg(feature = "tokio")]
    pub fn async_stage<S: AsyncStage>(&mut self, stage: S, in_flight: usize) -> &mut Self {
        let stage = Arc::new(stage);
        self.async_stage = Some((async_stage::erase(Arc::clone(&stage)), in_flight));
        self.factory = Some(Arc::new(move || {
            Box::new(async_stage::Facade(Arc::clone(&stage))) as Box<dyn Stage>
        }));
        self
    }

    /// The tokio runtime an [`async_stage`](Self::async_stage) runs on (feature
    /// `tokio`); it needs its time driver (`enable_all()`). Default: the Piper makes a
    /// multi-threaded runtime when it starts and shuts it down when it stops.
    #[cfg(feature = "tokio")]
    pub fn runtime(&mut self, handle: tokio::runtime::Handle) -> &mut Self {
        self.runtime = Some(handle);
        self
    }

    /// Worker threads, from 1 to [`MAX_WORKERS`](Self::MAX_WORKERS) (1024); run more
    /// processes for more. Default: 1.
    pub fn workers(&mut self, workers: usize) -> &mut Self {
        self.workers = workers;
        self
    }

    /// High watermark: intake pauses while an output's `incoming/` holds this many
    /// messages; at least 1. Default: 5000 (Mentat's `queue_out_limit`).
    pub fn out_limit(&mut self, high: usize) -> &mut Self {
        self.limit = high;
        self
    }

    /// Low watermark: paused intake resumes below it; at most the high one. Default:
    /// 80 % of the high one.
    pub fn out_resume(&mut self, low: usize) -> &mut Self {
        self.low = Some(low);
        self
    }

    /// A byte limit besides the count: intake also pauses while an output's
    /// `incoming/` holds this many bytes; at least 1. Counting bytes costs a `stat` per
    /// waiting message, at most every 10 ms while paused. Default: no byte limit.
    pub fn out_limit_bytes(&mut self, high: u64) -> &mut Self {
        self.limit_bytes = Some(high);
        self
    }

    /// No byte limit, and no byte watermark: undoes
    /// [`out_limit_bytes`](Self::out_limit_bytes) and
    /// [`out_resume_bytes`](Self::out_resume_bytes). The default.
    pub fn no_out_limit_bytes(&mut self) -> &mut Self {
        self.limit_bytes = None;
        self.low_bytes = None;
        self
    }

    /// Low byte watermark: intake paused by the byte limit resumes below it; at most
    /// the byte limit, and only with one. Default: 80 % of the byte limit.
    pub fn out_resume_bytes(&mut self, low: u64) -> &mut Self {
        self.low_bytes = Some(low);
        self
    }

    /// How long a paused Piper waits for a filesystem event before counting its
    /// outputs again anyway; more than zero. Default: 1 s.
    pub fn resume_wait(&mut self, wait: Duration) -> &mut Self {
        self.resume_wait = wait;
        self
    }

    /// Longest processing time of one message; more than zero. Default: no limit
    /// (see [`no_timeout`](Self::no_timeout)).
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = Some(timeout);
        self
    }

    /// No limit on a message's processing time: undoes [`timeout`](Self::timeout).
    /// The default.
    pub fn no_timeout(&mut self) -> &mut Self {
        self.timeout = None;
        self
    }

    /// What a timeout does to the message. Default: [`TimeoutAction::Fail`].
    pub fn on_timeout(&mut self, action: TimeoutAction) -> &mut Self {
        self.on_timeout = action;
        self
    }

    /// When the failure breaker opens; checked by [`build`](Self::build). Default:
    /// [`BreakerPolicy::default`] (half of at least 20 outcomes within a minute failed;
    /// cooldown 30 s).
    pub fn breaker(&mut self, policy: &BreakerPolicy) -> &mut Self {
        self.breaker = *policy;
        self
    }

    /// Where the Piper's alerts go: a message failed or dead-lettered, a timeout, the
    /// breaker opening and closing, and (with the policy's limits) an input's oldest
    /// message over an age or another Piper on an input gone silent. Storms are folded
    /// into summaries; see [`Alerts`]. Default: no alerts.
    pub fn alerts(&mut self, policy: &AlertPolicy) -> &mut Self {
        self.alerts = policy.clone();
        self
    }

    /// How long a shutdown waits for in-flight messages before releasing them; zero
    /// releases them at once. Default: 30 s.
    pub fn drain_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.drain_timeout = timeout;
        self
    }

    /// How often a statistics line is logged (at info level); more than zero.
    /// Default: 60 s.
    pub fn stats_interval(&mut self, interval: Duration) -> &mut Self {
        self.stats_interval = interval;
        self
    }

    /// How often the inputs are recovered (messages of dead workers requeued); more
    /// than zero. Default: 60 s.
    pub fn recover_interval(&mut self, interval: Duration) -> &mut Self {
        self.recover_interval = interval;
        self
    }

    /// Whether [`Piper::run`] handles SIGTERM and SIGINT (drain, then a second signal
    /// releases in-flight messages at once), SIGUSR1 (log statistics) and SIGHUP
    /// (logged and ignored). For the process's main Piper; the handlers stay installed
    /// after `run` returns. Default: `false`.
    pub fn handle_signals(&mut self, handle: bool) -> &mut Self {
        self.signals = handle;
        self
    }

    /// Whether the Piper advertises itself in `<input>/pipers/`. Default: `true`.
    pub fn advertise(&mut self, advertise: bool) -> &mut Self {
        self.advertise = advertise;
        self
    }

    /// Group commit: the most outcomes one directory sync of the Piper's barrier
    /// covers, from 1 to [`MAX_COMMIT_BATCH`](Self::MAX_COMMIT_BATCH). Default: 64.
    ///
    /// Unless the inputs' mode is [`Durability::None`], workers hand every outcome to
    /// one barrier. It closes a batch when it holds this many outcomes or
    /// [`commit_delay`](Self::commit_delay) after its first, syncs each directory the
    /// batch changed once, and only then removes the input messages whose results
    /// (emitted messages, copies to further outputs) it waited for. Workers go on with
    /// the next message meanwhile; they wait only while a full batch is not yet taken.
    ///
    /// The guarantee is [`Durability::Full`]'s for a pipeline: nothing a producer was
    /// told is durable is lost, and after a power cut each message is either upstream
    /// or durably downstream, never half-written. What a crash can undo is the last
    /// unsynced batch: its messages come back to their input and are processed again,
    /// under the same ids (a downstream duplicate is refused by id, or processed
    /// twice by a stage with side effects). `1` syncs after every outcome, the
    /// per-message fsync of earlier versions, with the same guarantee at a fraction
    /// of the speed.
    pub fn commit_batch(&mut self, outcomes: usize) -> &mut Self {
        self.commit_batch = outcomes;
        self
    }

    /// Group commit: how long a batch stays open after its first outcome before the
    /// barrier syncs it, however few outcomes it holds; zero syncs as soon as the
    /// barrier is free (what arrived during the previous sync is the next batch).
    /// Default: 2 ms. See [`commit_batch`](Self::commit_batch).
    pub fn commit_delay(&mut self, delay: Duration) -> &mut Self {
        self.commit_delay = delay;
        self
    }

    /// Whether the Piper writes each outcome to its input queue's history,
    /// `<input>/history/current.jsonl`: one JSON line per outcome (id, outcome, time,
    /// attempts, processing time, reason, Piper name and pid), appended in batches of
    /// whole lines, one `write(2)` each (at 64 lines, or 100 ms after the first), and
    /// never synced. A crash of the process loses at most the lines of its last 100
    /// ms, a power cut also those not yet written back; either leaves at most one
    /// incomplete last line, which readers skip. The line
    /// is written when the worker carries out the outcome, before the
    /// [group commit](Self::commit_batch) syncs it: after a power cut, a message whose
    /// outcome was undone is processed again and gets a second line. Read it with
    /// [`admin::history`](crate::admin::history) or `dirq history`. Default: `true`.
    ///
    /// It is a setting of the Piper, not of the queue, because the Piper is what writes
    /// it: each stage of a pipeline can turn it off for itself, and a queue read by
    /// Mentat daemons or other tools costs nothing.
    pub fn history(&mut self, enabled: bool) -> &mut Self {
        self.history = enabled;
        self
    }

    /// The default [`history_max_bytes`](Self::history_max_bytes): 64 MiB.
    pub const DEFAULT_HISTORY_MAX_BYTES: u64 = 64 << 20;
    /// The default [`history_max_age`](Self::history_max_age): one day.
    pub const DEFAULT_HISTORY_MAX_AGE: Duration = Duration::from_secs(86_400);
    /// The default [`history_keep`](Self::history_keep): 7 rotated files.
    pub const DEFAULT_HISTORY_KEEP: usize = 7;

    /// The history is rotated (`current.jsonl` renamed after the time of its first
    /// line) once it holds this many bytes; at least 1. Several processes may write
    /// and rotate one history: rotation takes a lock file, and writers reopen
    /// `current.jsonl` within a second of a rotation (lines written meanwhile go to the
    /// rotated file, none is lost). Default: 64 MiB.
    pub fn history_max_bytes(&mut self, bytes: u64) -> &mut Self {
        self.rotation.max_bytes = bytes;
        self
    }

    /// The history is rotated once its first line is this old; more than zero.
    /// Default: one day.
    pub fn history_max_age(&mut self, age: Duration) -> &mut Self {
        self.rotation.max_age = age;
        self
    }

    /// Rotated history files kept; older ones are removed, and with them the job logs
    /// (see [`CommandStageBuilder::log_output`]) older than the oldest file kept.
    /// Default: 7.
    pub fn history_keep(&mut self, files: usize) -> &mut Self {
        self.rotation.keep = files;
        self
    }

    /// Checks the settings and makes the Piper.
    ///
    /// # Errors
    ///
    /// [`Error::Config`], naming the setter, when there is no input or stage, two
    /// outputs share a name, or a setting is out of the range its setter states: no
    /// worker or more than [`MAX_WORKERS`](Self::MAX_WORKERS), a watermark of zero or a
    /// low one above its high one, a low byte watermark without a byte limit, a zero
    /// timeout, interval, history size or age, or a setting of the
    /// [breaker](Self::breaker) (field
    /// `breaker.<setter>`).
    pub fn build(&self) -> Result<Piper> {
        let target = format!("Piper {:?}", self.name);
        let bad = |field: &'static str, reason: &str| Err(Error::config(&target, field, reason));
        let Some(factory) = self.factory.clone() else {
            return bad("stage", "no stage was given");
        };
        if self.inputs.is_empty() {
            return bad("input", "no input queue was given");
        }
        if !(1..=Self::MAX_COMMIT_BATCH).contains(&self.commit_batch) {
            return bad(
                "commit_batch",
                &format!("must be from 1 to {}", Self::MAX_COMMIT_BATCH),
            );
        }
        if !(1..=Self::MAX_WORKERS).contains(&self.workers) {
            return bad(
                "workers",
                &format!("must be from 1 to {}", Self::MAX_WORKERS),
            );
        }
        #[cfg(feature = "tokio")]
        if let Some((_, in_flight)) = &self.async_stage {
            if !(1..=Self::MAX_IN_FLIGHT).contains(in_flight) {
                return bad(
                    "async_stage",
                    &format!("in_flight must be from 1 to {}", Self::MAX_IN_FLIGHT),
                );
            }
        }
        for (field, value) in [
            ("resume_wait", Some(self.resume_wait)),
            ("timeout", self.timeout),
            ("stats_interval", Some(self.stats_interval)),
            ("recover_interval", Some(self.recover_interval)),
            ("history_max_age", Some(self.rotation.max_age)),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return bad(field, "must be more than zero");
            }
        }
        if self.rotation.max_bytes == 0 {
            return bad("history_max_bytes", "must be at least 1");
        }
        if let Err((field, reason)) = self.breaker.check() {
            return bad(field, reason);
        }
        if let Err((field, reason)) = self.alerts.problem() {
            return bad(field, &reason);
        }
        let mut names = HashSet::new();
        if !self.outputs.iter().all(|(name, _)| names.insert(name)) {
            return bad("output", "two outputs have the same name");
        }
        let high = self.limit;
        if high == 0 {
            return bad("out_limit", "must be at least 1");
        }
        let low = self.low.unwrap_or(high / 5 * 4 + high % 5 * 4 / 5);
        if low > high {
            return bad("out_resume", "the low watermark is above the high one");
        }
        let low_bytes = match (self.limit_bytes, self.low_bytes) {
            (Some(0), _) => return bad("out_limit_bytes", "must be at least 1"),
            (None, Some(_)) => {
                return bad("out_resume_bytes", "is set, but out_limit_bytes is not")
            }
            (Some(high), Some(low)) if low > high => {
                return bad(
                    "out_resume_bytes",
                    "the low byte watermark is above the byte limit",
                )
            }
            (Some(high), low) => Some(low.unwrap_or(high / 5 * 4)),
            (None, None) => None,
        };
        let limits = Limits {
            high,
            low,
            high_bytes: self.limit_bytes,
            low_bytes,
        };
        let inputs: Vec<DirectoryQueue> = self
            .inputs
            .iter()
            .map(DirectoryQueue::reopen_deferring_syncs)
            .collect();
        let outputs: Vec<Output> = self
            .outputs
            .iter()
            .map(|(name, queue)| Output {
                name: name.clone(),
                gauge: Gauge::new(queue.reopen_deferring_syncs(), limits),
            })
            .collect();
        let syncs = inputs
            .iter()
            .chain(outputs.iter().map(|o| o.gauge.queue()))
            .any(|q| q.durability() != Durability::None);
        let barrier = syncs.then(|| Barrier::new(self.commit_batch, self.commit_delay));
        let history = if self.history {
            inputs
                .iter()
                .map(|q| Journal::new(q, self.rotation))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Piper {
            shared: Arc::new(Shared {
                name: self.name.clone(),
                inputs,
                outputs,
                barrier,
                history,
                host: crate::sys::hostname(),
                pid: crate::sys::pid(),
                factory,
                config: Settings {
                    workers: self.workers,
                    resume_wait: self.resume_wait,
                    timeout: self.timeout,
                    on_timeout: self.on_timeout,
                    drain_timeout: self.drain_timeout,
                    stats_interval: self.stats_interval,
                    recover_interval: self.recover_interval,
                    signals: self.signals,
                    advertise: self.advertise,
                },
                counters: Counters::default(),
                breaker: Mutex::new(Breaker::new(self.breaker)),
                alert_policy: self.alerts.clone(),
                alerts: Mutex::new(None),
                run_state: AtomicU8::new(NOT_STARTED),
                jobs: Mutex::new(Vec::new()),
                workers: Mutex::new(Workers::default()),
                rates: Mutex::new(RateWindow::default()),
                supervisor: Mutex::new(None),
                started: SystemTime::now(),
                stopped: Mutex::new(None),
                #[cfg(feature = "tokio")]
                async_mode: self.async_stage.as_ref().map(|(run, in_flight)| {
                    async_stage::Mode::new(Arc::clone(run), *in_flight, self.runtime.clone())
                }),
            }),
        })
    }
}

/// Controls a running [`Piper`] from another thread.
#[derive(Clone)]
pub struct PiperHandle {
    shared: Arc<Shared>,
}

impl PiperHandle {
    /// Stops intake and lets in-flight messages finish (within the drain timeout);
    /// [`Piper::run`] then returns.
    pub fn shutdown(&self) {
        self.shared.request(DRAINING);
    }

    /// Stops at once: in-flight messages go back to `incoming/` and [`Piper::run`]
    /// returns; their stage threads are abandoned.
    pub fn force(&self) {
        self.shared.request(FORCED);
    }

    /// Counters since start.
    pub fn stats(&self) -> PiperStats {
        self.shared.stats()
    }

    /// Rates over the last seconds.
    pub fn rates(&self) -> PiperRates {
        lock(&self.shared.rates).rates()
    }

    /// Whether intake is paused (backpressure or the failure breaker).
    pub fn is_paused(&self) -> bool {
        self.shared.pause_reason().is_some()
    }
}

const NOT_STARTED: u8 = 0;
const RUNNING: u8 = 1;
const DRAINING: u8 = 2;
const FORCED: u8 = 3;

/// Settings that do not change while running.
#[derive(Debug, Clone)]
struct Settings {
    workers: usize,
    resume_wait: Duration,
    timeout: Option<Duration>,
    on_timeout: TimeoutAction,
    drain_timeout: Duration,
    stats_interval: Duration,
    recover_interval: Duration,
    signals: bool,
    advertise: bool,
}

struct Output {
    name: String,
    gauge: Gauge,
}

/// A message being processed, as the supervisor sees it.
struct Job {
    id: crate::MessageId,
    /// Index of the input queue it came from.
    input: usize,
    started: Instant,
    /// One of `JOB_*`; shared with the stage's [`Cancellation`].
    state: Arc<AtomicU8>,
}

const JOB_RUNNING: u8 = 0;
const JOB_DONE: u8 = 1;
const JOB_TAKEN: u8 = 2;
/// The operator cancelled it (to `errors/`); the worker carries that out when the
/// stage returns.
const JOB_CANCELLED: u8 = 3;
/// The operator cancelled it with requeue (back to `incoming/`).
const JOB_REQUEUE: u8 = 4;

impl Job {
    /// The worker finished: true if the supervisor had not taken the job over.
    fn finish(&self) -> bool {
        self.state
            .compare_exchange(JOB_RUNNING, JOB_DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The supervisor takes the job over: true if the worker had not finished. A
    /// cancelled job can be taken over too: a stage that does not stop when cancelled
    /// still meets the Piper's timeout (and the drain's).
    fn take_over(&self) -> bool {
        [JOB_RUNNING, JOB_CANCELLED, JOB_REQUEUE]
            .into_iter()
            .any(|from| {
                self.state
                    .compare_exchange(from, JOB_TAKEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            })
    }

    /// After [`finish`](Self::finish) failed: `Some(requeue)` when the operator
    /// cancelled the job, `None` when the supervisor took it over.
    fn cancelled(&self) -> Option<bool> {
        match self.state.load(Ordering::Acquire) {
            JOB_CANCELLED => Some(false),
            JOB_REQUEUE => Some(true),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Workers {
    /// Threads started and not yet finished or abandoned.
    live: usize,
    next_id: usize,
    handles: Vec<JoinHandle<()>>,
}

struct Shared {
    name: String,
    inputs: Vec<DirectoryQueue>,
    outputs: Vec<Output>,
    factory: Factory,
    config: Settings,
    counters: Counters,
    breaker: Mutex<Breaker>,
    alert_policy: AlertPolicy,
    /// The alert sender while the Piper runs (started by `run`, stopped at its end).
    alerts: Mutex<Option<Alerts>>,
    run_state: AtomicU8,
    jobs: Mutex<Vec<Arc<Job>>>,
    /// The group commit; none when nothing is synced ([`Durability::None`]).
    barrier: Option<Barrier>,
    /// The history of each input, by index; empty when it is off.
    history: Vec<Journal>,
    /// This host's name and this process's id, for history lines.
    host: String,
    pid: u32,
    workers: Mutex<Workers>,
    rates: Mutex<RateWindow>,
    /// The supervisor's thread, unparked when a shutdown is requested.
    supervisor: Mutex<Option<Thread>>,
    started: SystemTime,
    /// Why the stage asked to stop ([`Outcome::Stop`]); [`Piper::run`] returns it as
    /// an error.
    stopped: Mutex<Option<String>>,
    /// The async stage, when the Piper runs one.
    #[cfg(feature = "tokio")]
    async_mode: Option<async_stage::Mode>,
}

impl Shared {
    /// Whether `dirq cancel` can reach this Piper's messages: not those of an async
    /// stage, which are not registered as cancellable jobs.
    fn cancellable(&self) -> bool {
        #[cfg(feature = "tokio")]
        if self.async_mode.is_some() {
            return false;
        }
        true
    }

    fn state(&self) -> u8 {
        self.run_state.load(Ordering::Acquire)
    }

    fn intake_open(&self) -> bool {
        self.state() == RUNNING
    }

    /// Moves to a later run state (never back) and wakes everyone to notice.
    fn request(&self, state: u8) {
        self.run_state.fetch_max(state, Ordering::AcqRel);
        crate::engine::wake::wake_all();
        if let Some(thread) = lock(&self.supervisor).as_ref() {
            thread.unpark();
        }
    }

    /// Stops the Piper because its stage cannot work; the first reason is kept.
    fn stop_with(&self, reason: String) {
        lock(&self.stopped).get_or_insert(reason);
        self.request(DRAINING);
    }

    fn stats(&self) -> PiperStats {
        let (mut expired, mut wasted) = (0, 0);
        for input in &self.inputs {
            let s = input.claim_stats();
            expired += s.expired;
            wasted += s.collisions;
        }
        self.counters.snapshot(expired, wasted)
    }

    /// Raises an alert about `queue`, when alerts are on.
    fn alert(
        &self,
        kind: AlertKind,
        queue: &std::path::Path,
        reason: String,
        id: Option<&crate::MessageId>,
    ) {
        let mut alert = Alert::new(kind, &self.name, queue, reason);
        if let Some(id) = id {
            alert = alert.with_id(id.to_string());
        }
        self.raise(alert);
    }

    /// Raises `alert`, when alerts are on.
    fn raise(&self, alert: Alert) {
        if let Some(alerts) = lock(&self.alerts).as_ref() {
            alerts.raise(alert);
        }
    }

    /// Raises the alert of a message that went to `errors/`.
    fn alert_failed(&self, failed: &Failed) {
        let kind = if failed.reason == "timeout" {
            AlertKind::Timeout
        } else {
            AlertKind::Failed
        };
        let reason = if failed.dead_letter {
            format!(
                "{} (dead letter after attempt {})",
                failed.reason, failed.attempt
            )
        } else {
            failed.reason.clone()
        };
        self.alert(kind, &failed.queue, reason, Some(&failed.id));
    }

    /// Every queue handle of the Piper: its inputs, then its outputs.
    fn queues(&self) -> impl Iterator<Item = &DirectoryQueue> {
        self.inputs
            .iter()
            .chain(self.outputs.iter().map(|o| o.gauge.queue()))
    }

    /// Hands an outcome to the group commit; without one, carries out at once what is
    /// left of it.
    fn finish(&self, finish: Finish) -> std::result::Result<(), crate::queue::TerminalError> {
        match (&self.barrier, finish) {
            (Some(barrier), finish) => {
                barrier.hand(self, finish);
                Ok(())
            }
            (None, Finish::Done) => Ok(()),
            (None, Finish::Commit(message)) => commit::remove(self, message, None),
            (None, Finish::Forward(message, output)) => commit::remove(self, message, Some(output)),
        }
    }

    /// Writes a history line for message `id` of input `input`, if history is on.
    fn record(&self, input: usize, id: &crate::MessageId, line: HistoryLine) {
        let Some(journal) = self.history.get(input) else {
            return;
        };
        let time = crate::format::meta::rfc3339(SystemTime::now());
        journal.write(&crate::format::history::RecordRef {
            id: &id.as_os_str().to_string_lossy(),
            outcome: line.outcome,
            time: &time,
            attempts: line.attempts,
            duration_ms: line.started.map_or(0, |s| {
                u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX)
            }),
            reason: line.reason.as_deref(),
            exit_code: line.exit_code,
            piper: &self.name,
            pid: self.pid,
            host: &self.host,
        });
    }

    /// Why intake is paused, if it is.
    fn pause_reason(&self) -> Option<&'static str> {
        if lock(&self.breaker).is_open() {
            Some("paused (failure breaker)")
        } else if self.outputs.iter().any(|o| o.gauge.is_paused()) {
            Some("paused (backpressure)")
        } else {
            None
        }
    }
}

impl fmt::Debug for Piper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Piper")
            .field("name", &self.shared.name)
            .field("inputs", &self.shared.inputs)
            .field(
                "outputs",
                &self
                    .shared
                    .outputs
                    .iter()
                    .map(|o| &o.name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PiperHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PiperHandle")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PiperBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PiperBuilder")
            .field("name", &self.name)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// What a history line says beyond the message and the Piper; see [`Shared::record`].
struct HistoryLine {
    outcome: crate::format::history::HistoryOutcome,
    attempts: u32,
    /// When its stage started; `None` when it did not run.
    started: Option<Instant>,
    reason: Option<String>,
    exit_code: Option<i32>,
}

/// How far off [`later`] puts a time that cannot be represented.
const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + wait`, or a century on when `wait` is too long to add: a caller's way of
/// saying "as long as it takes" (`Duration::MAX` as a drain timeout or cooldown) must
/// not panic on the addition.
pub(crate) fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait).unwrap_or_else(|| now + CENTURY)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error with its causes, for reasons and logs.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The text of a panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned())
}
