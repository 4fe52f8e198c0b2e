//! Async stages (feature `tokio`): [`AsyncStage`], run by a Piper's workers with many
//! messages in flight each, on a tokio runtime. Only the stage's future runs on the
//! runtime; claims and outcomes stay on the worker threads, through the same code as a
//! sync stage's, so everything a sync Piper guarantees holds unchanged.

use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Runtime};
use tokio::sync::watch;

use super::{lock, Failed, Outcome, Stage, StageResult};
use crate::error::{Error, Operation, Result};
use crate::{Message, MessageId};

/// A stage whose processing is a future: run by a [`Piper`](crate::piper::Piper) set up
/// with [`PiperBuilder::async_stage`](crate::piper::PiperBuilder::async_stage), with up
/// to a given number of messages in flight per worker, on a tokio runtime.
///
/// One instance is shared by every worker and every message in flight (hence `&self`
/// and `Sync`): keep per-message state in the future, and shared state (a connection
/// pool, a client) in the stage.
///
/// The future must not block its thread: file and CPU-heavy work goes to
/// [`spawn_blocking`](tokio::task::spawn_blocking). A poll of the future that holds its
/// runtime thread for more than a second is logged as a warning naming the stage and
/// the message, and counted in
/// [`PiperStats::runtime_stalls`](crate::piper::PiperStats::runtime_stalls).
///
/// What the future returns is carried out as a [`Stage`](crate::piper::Stage)'s
/// [`Outcome`](crate::piper::Outcome) is. At the Piper's
/// [timeout](crate::piper::PiperBuilder::timeout) the future is dropped and the message
/// failed with reason `timeout` (or retried, per
/// [`on_timeout`](crate::piper::PiperBuilder::on_timeout)); a future that panics retries
/// its message. [`Message::bytes`] reads the file in place; for a large message,
/// read it on the blocking pool.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use dirq::{DirectoryQueue, Message};
/// use dirq::piper::{AsyncStage, Outcome, Piper, StageResult};
///
/// struct Slow;
///
/// impl AsyncStage for Slow {
///     async fn process(&self, message: &Message) -> StageResult {
///         let _bytes = message.bytes()?;
///         tokio::time::sleep(Duration::from_millis(10)).await; // a call to a service
///         Ok(Outcome::Forward)
///     }
/// }
///
/// let dir = tempfile::tempdir().expect("a temporary directory");
/// let input = DirectoryQueue::open(dir.path().join("input"))?;
/// let output = DirectoryQueue::open(dir.path().join("output"))?;
/// for _ in 0..20 {
///     input.enqueue(b"{}")?;
/// }
/// let piper = Piper::builder("slow")
///     .input(&input)
///     .output("next", &output)
///     .async_stage(Slow, 64) // up to 64 messages in flight
///     .build()?;
/// let handle = piper.handle();
/// let runner = std::thread::spawn(move || piper.run());
/// let deadline = std::time::Instant::now() + Duration::from_secs(60);
/// while handle.stats().forwarded < 20 {
///     assert!(std::time::Instant::now() < deadline, "forwarded within a minute");
///     std::thread::sleep(Duration::from_millis(10));
/// }
/// handle.shutdown();
/// let stats = runner.join().expect("the piper thread")?;
/// assert_eq!(stats.forwarded, 20);
/// # Ok::<(), dirq::Error>(())
/// ```
pub trait AsyncStage: Send + Sync + 'static {
    /// Processes one message.
    ///
    /// # Errors
    ///
    /// Any error: the message is moved to `errors/` with the error chain as its reason.
    fn process(&self, message: &Message) -> impl Future<Output = StageResult> + Send;

    /// Called after a message of this stage went to `errors/`, whatever the way, as
    /// [`Stage::on_failed`] is for a sync stage: a failure outcome or an error of
    /// [`process`](Self::process), a dead letter after the last retry (a future that
    /// kept retrying or panicking, or a message whose process died on it), or the
    /// Piper's [timeout](crate::piper::PiperBuilder::timeout). For alerting.
    ///
    /// It runs on the worker thread that carries out the outcomes, not on the runtime,
    /// after the move: it may block briefly (a log line, a short command), but the
    /// outcomes of the worker's other futures wait meanwhile. A panic in it is logged
    /// and ignored. Default: nothing.
    fn on_failed(&self, failure: &Failed) {
        let _ = failure;
    }
}

/// The sync face of an async stage that each worker holds: what the worker calls where
/// it would call a sync stage, which only ever happens for
/// [`on_failed`](Stage::on_failed) (the worker runs the futures, never `process`).
pub(super) struct Facade<S>(pub(super) Arc<S>);

impl<S: AsyncStage> Stage for Facade<S> {
    fn process(&mut self, _message: &Message) -> StageResult {
        Ok(Outcome::Stop("the Piper's stage is async".to_owned()))
    }

    fn on_failed(&mut self, failure: &Failed) {
        self.0.on_failed(failure);
    }
}

/// How long one poll of a stage's future may hold its thread before it is reported.
const STALL: Duration = Duration::from_secs(1);

/// How a stage's future ended.
pub(super) enum Done {
    Finished(StageResult),
    /// It panicked; the panic's message.
    Panicked(String),
    /// The Piper's timeout dropped it.
    TimedOut,
    /// The end of a drain (or a forced stop) dropped it.
    Stopped,
}

/// What one future runs under.
pub(super) struct Control {
    pub(super) timeout: Option<Duration>,
    /// Turns true when in-flight futures must stop.
    pub(super) stop: watch::Receiver<bool>,
    pub(super) name: Arc<str>,
    pub(super) stalls: Arc<AtomicU64>,
}

type Boxed = Pin<Box<dyn Future<Output = (Message, Done)> + Send>>;

/// A stage with its type erased: a message in, a future that gives it back with how
/// its processing ended.
pub(super) type Run = Arc<dyn Fn(Message, Control) -> Boxed + Send + Sync>;

/// Erases `stage`'s type (the trait returns `impl Future`, so it has no `dyn` form).
pub(super) fn erase<S: AsyncStage>(stage: Arc<S>) -> Run {
    Arc::new(move |message: Message, control: Control| -> Boxed {
        let stage = Arc::clone(&stage);
        Box::pin(async move {
            let done = {
                let guarded = Guarded {
                    inner: Box::pin(stage.process(&message)),
                    id: message.id().clone(),
                    name: Arc::clone(&control.name),
                    stalls: Arc::clone(&control.stalls),
                };
                controlled(guarded, control).await
            };
            (message, done)
        })
    })
}

/// Runs `future` until it ends, the timeout passes or `stop` turns true.
async fn controlled<F>(future: F, control: Control) -> Done
where
    F: Future<Output = std::result::Result<StageResult, String>>,
{
    let mut stop = control.stop;
    let mut future = pin!(future);
    let mut stopped = pin!(async move {
        if stop.wait_for(|stop| *stop).await.is_err() {
            // The worker is gone: nobody will ask to stop.
            std::future::pending::<()>().await;
        }
    });
    let raced = poll_fn(|cx| {
        if let Poll::Ready(result) = future.as_mut().poll(cx) {
            return Poll::Ready(match result {
                Ok(result) => Done::Finished(result),
                Err(panic) => Done::Panicked(panic),
            });
        }
        if stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Done::Stopped);
        }
        Poll::Pending
    });
    match control.timeout {
        Some(timeout) => tokio::time::timeout(timeout, raced)
            .await
            .unwrap_or(Done::TimedOut),
        None => raced.await,
    }
}

/// A stage's future, each poll timed (a poll over [`STALL`] blocked its runtime thread)
/// and its panics caught.
struct Guarded<F> {
    inner: Pin<Box<F>>,
    id: MessageId,
    name: Arc<str>,
    stalls: Arc<AtomicU64>,
}

impl<F: Future<Output = StageResult>> Future for Guarded<F> {
    type Output = std::result::Result<StageResult, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let started = Instant::now();
        let polled = catch_unwind(AssertUnwindSafe(|| this.inner.as_mut().poll(cx)));
        let took = started.elapsed();
        if took >= STALL {
            this.stalls.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                stage = %this.name,
                id = %this.id,
                blocked_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                "an async stage blocked its runtime thread; move blocking work to spawn_blocking"
            );
        }
        match polled {
            Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(super::panic_message(panic.as_ref()))),
        }
    }
}

/// A Piper's async stage and its runtime.
pub(super) struct Mode {
    pub(super) run: Run,
    /// Futures in flight per worker, at most.
    pub(super) in_flight: usize,
    /// The runtime the user gave.
    given: Option<Handle>,
    /// The runtime the Piper made for itself, while it runs.
    own: Mutex<Option<Runtime>>,
}

impl Mode {
    pub(super) fn new(run: Run, in_flight: usize, given: Option<Handle>) -> Mode {
        Mode {
            run,
            in_flight,
            given,
            own: Mutex::new(None),
        }
    }

    /// Makes the Piper's own runtime, unless it was given one.
    pub(super) fn start(&self, name: &str) -> Result<()> {
        if self.given.is_some() {
            return Ok(());
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name(format!("dirq-{name}-rt"))
            .build()
            .map_err(|e| Error::io(Operation::StartThread, "the async stage's runtime", e))?;
        *lock(&self.own) = Some(runtime);
        Ok(())
    }

    /// The runtime to spawn on; `None` once the Piper's own one is shut down.
    pub(super) fn handle(&self) -> Option<Handle> {
        self.given
            .clone()
            .or_else(|| lock(&self.own).as_ref().map(|r| r.handle().clone()))
    }

    /// Shuts the Piper's own runtime down, without waiting for futures of abandoned
    /// workers.
    pub(super) fn stop(&self) {
        if let Some(runtime) = lock(&self.own).take() {
            runtime.shutdown_background();
        }
    }
}
