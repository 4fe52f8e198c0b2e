//! Pipers running an `AsyncStage` (feature `tokio`): many messages in flight on one
//! worker, outcomes, the timeout dropping the future, drains, a stage that blocks its
//! runtime, `on_failed`, and the back-off after outcomes that fail.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use dirq::piper::{
    AsyncStage, BreakerPolicy, Emit, Failed, Outcome, Piper, PiperBuilder, PiperHandle, PiperStats,
    StageResult, TimeoutAction,
};
use dirq::queue::RetryPolicy;
use dirq::{DirectoryQueue, Message, State};

use crate::util::{wait_until, TestQueue};

const LONG: Duration = Duration::from_secs(60);

/// Sleeps `delay` on the runtime, counting how many run at once, then forwards.
struct Sleeper(Arc<Seen>);

#[derive(Default)]
struct Seen {
    delay: Duration,
    now: AtomicUsize,
    max: AtomicUsize,
}

impl AsyncStage for Sleeper {
    async fn process(&self, _message: &Message) -> StageResult {
        let seen = &self.0;
        let now = seen.now.fetch_add(1, Ordering::SeqCst) + 1;
        seen.max.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(seen.delay).await;
        seen.now.fetch_sub(1, Ordering::SeqCst);
        Ok(Outcome::Forward)
    }
}

/// Decides by the message's text: `fail`, `retry`, `emit` (two messages), `error`,
/// `panic`; anything else commits.
struct ByText;

impl AsyncStage for ByText {
    async fn process(&self, message: &Message) -> StageResult {
        let text = String::from_utf8(message.bytes()?)?;
        tokio::task::yield_now().await;
        Ok(match text.as_str() {
            "fail" => Outcome::Fail("said so".to_owned()),
            "retry" => Outcome::Retry("later".to_owned()),
            "emit" => Outcome::Emit(vec![Emit::new("a"), Emit::new("b")]),
            "error" => return Err("an error".into()),
            "panic" => panic!("a bug in the stage"),
            _ => Outcome::Commit,
        })
    }
}

fn start(piper: Piper) -> (PiperHandle, JoinHandle<dirq::Result<PiperStats>>) {
    let handle = piper.handle();
    (handle, std::thread::spawn(move || piper.run()))
}

fn stop(handle: &PiperHandle, runner: JoinHandle<dirq::Result<PiperStats>>) -> PiperStats {
    handle.shutdown();
    runner.join().expect("the piper thread").expect("run")
}

#[test]
fn one_worker_runs_many_futures_at_once_and_forwards_each_message_once() {
    let t = TestQueue::new();
    let output = t.sibling("out");
    let mut ids = Vec::new();
    for i in 0..500 {
        ids.push(
            t.queue
                .enqueue(format!("{i}").as_bytes())
                .unwrap()
                .to_string(),
        );
    }
    let stage = Arc::new(Seen {
        delay: Duration::from_millis(10),
        ..Seen::default()
    });
    let piper = Piper::builder("sleeper")
        .input(&t.queue)
        .output("out", &output)
        .workers(1)
        .advertise(false)
        .async_stage(Sleeper(Arc::clone(&stage)), 64)
        .build()
        .unwrap();
    let (handle, runner) = start(piper);
    wait_until(LONG, "500 messages forwarded", || {
        handle.stats().forwarded == 500
    });
    let stats = stop(&handle, runner);
    assert_eq!(
        (
            stats.claimed,
            stats.forwarded,
            stats.failed,
            stats.in_flight
        ),
        (500, 500, 0, 0)
    );
    let max = stage.max.load(Ordering::SeqCst);
    assert!(max > 8, "at most {max} futures ran at once");
    assert!(max <= 64, "{max} futures ran at once, over in_flight");
    let forwarded = crate::util::names_in(output.path(State::Incoming));
    ids.sort();
    assert_eq!(forwarded, ids, "each message forwarded once, under its id");
    for state in [State::Incoming, State::Pending, State::Errors] {
        assert!(t.names(state).is_empty(), "{state:?} is not empty");
    }
}

#[test]
fn outcomes_emit_fail_retry_and_error() {
    let t = TestQueue::new();
    let output = t.sibling("out");
    for text in ["emit", "fail", "retry", "error", "panic", "commit"] {
        t.queue.enqueue(text.as_bytes()).unwrap();
    }
    let piper = Piper::builder("bytext")
        .input(&t.queue)
        .output("out", &output)
        .advertise(false)
        .async_stage(ByText, 8)
        .build()
        .unwrap();
    let (handle, runner) = start(piper);
    wait_until(LONG, "six outcomes", || {
        let s = handle.stats();
        s.committed + s.failed + s.retried == 6
    });
    let stats = stop(&handle, runner);
    assert_eq!(
        (stats.committed, stats.emitted, stats.failed, stats.retried),
        (2, 2, 2, 2)
    );
    assert_eq!((stats.panics, stats.in_flight), (1, 0));
    assert_eq!(output.count(State::Incoming).unwrap(), 2);
    // Two messages and their sidecars.
    assert_eq!(t.names(State::Errors).len(), 4);
    // The retry and the panic.
    assert_eq!(t.names(State::Deferred).len(), 2);
}

/// Waits for the release flag, or forever.
struct Forever {
    dropped: Arc<AtomicUsize>,
}

struct CountDrop(Arc<AtomicUsize>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl AsyncStage for Forever {
    async fn process(&self, _message: &Message) -> StageResult {
        let _guard = CountDrop(Arc::clone(&self.dropped));
        std::future::pending::<()>().await;
        Ok(Outcome::Commit)
    }
}

/// Starts a `Forever` Piper (in flight 4) on `t`'s queue, with `configure` applied;
/// also returns how many of its futures have been dropped.
fn start_forever(
    t: &TestQueue,
    configure: impl FnOnce(&mut PiperBuilder),
) -> (
    PiperHandle,
    JoinHandle<dirq::Result<PiperStats>>,
    Arc<AtomicUsize>,
) {
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut builder = Piper::builder("forever");
    builder.input(&t.queue).advertise(false);
    configure(&mut builder);
    let piper = builder
        .async_stage(
            Forever {
                dropped: Arc::clone(&dropped),
            },
            4,
        )
        .build()
        .unwrap();
    let (handle, runner) = start(piper);
    (handle, runner, dropped)
}

#[test]
fn the_timeout_drops_the_future_and_fails_the_message() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"slow").unwrap();
    let (handle, runner, dropped) = start_forever(&t, |b| {
        b.timeout(Duration::from_millis(100));
    });
    wait_until(LONG, "a timeout", || handle.stats().timeouts == 1);
    let stats = stop(&handle, runner);
    assert_eq!((stats.timeouts, stats.failed, stats.in_flight), (1, 1, 0));
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the future was dropped");
    let failure = dirq::admin::failure(&t.queue, &id)
        .unwrap()
        .expect("a failure sidecar");
    assert_eq!(failure.reason.as_deref(), Some("timeout"));
}

#[test]
fn a_timeout_can_retry_the_message_instead() {
    let t = TestQueue::new();
    t.queue.enqueue(b"slow").unwrap();
    let (handle, runner, dropped) = start_forever(&t, |b| {
        b.timeout(Duration::from_millis(100))
            .on_timeout(TimeoutAction::Retry);
    });
    wait_until(LONG, "a timeout", || handle.stats().timeouts == 1);
    let stats = stop(&handle, runner);
    assert_eq!((stats.timeouts, stats.retried, stats.failed), (1, 1, 0));
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the future was dropped");
    assert_eq!(t.names(State::Deferred).len(), 1);
}

/// Waits until `go` is set, then commits.
struct Gate {
    go: Arc<AtomicBool>,
    started: Arc<AtomicUsize>,
}

impl AsyncStage for Gate {
    async fn process(&self, _message: &Message) -> StageResult {
        self.started.fetch_add(1, Ordering::SeqCst);
        while !self.go.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Outcome::Commit)
    }
}

#[test]
fn shutdown_waits_for_the_futures_in_flight() {
    let t = TestQueue::new();
    for _ in 0..20 {
        t.queue.enqueue(b"x").unwrap();
    }
    let go = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let piper = Piper::builder("gate")
        .input(&t.queue)
        .advertise(false)
        .async_stage(
            Gate {
                go: Arc::clone(&go),
                started: Arc::clone(&started),
            },
            10,
        )
        .build()
        .unwrap();
    let (handle, runner) = start(piper);
    wait_until(LONG, "10 futures started", || {
        started.load(Ordering::SeqCst) == 10
    });
    handle.shutdown();
    // The drain is under way: nothing more is claimed, and the ten still run.
    wait_until(LONG, "the drain to start", || {
        handle.stats().in_flight == 10 && t.queue.count(State::Pending).unwrap() == 10
    });
    go.store(true, Ordering::SeqCst);
    let stats = runner.join().expect("the piper thread").expect("run");
    assert_eq!(
        (stats.claimed, stats.committed, stats.in_flight),
        (10, 10, 0)
    );
    assert_eq!(t.queue.count(State::Incoming).unwrap(), 10);
    assert_eq!(t.queue.count(State::Pending).unwrap(), 0);
}

#[test]
fn a_drain_that_runs_out_of_time_releases_the_futures_messages() {
    let t = TestQueue::new();
    for _ in 0..3 {
        t.queue.enqueue(b"x").unwrap();
    }
    let (handle, runner, dropped) = start_forever(&t, |b| {
        b.drain_timeout(Duration::from_millis(200));
    });
    wait_until(LONG, "three in flight", || handle.stats().in_flight == 3);
    let stats = stop(&handle, runner);
    assert_eq!((stats.claimed, stats.in_flight), (3, 0));
    assert_eq!(dropped.load(Ordering::SeqCst), 3);
    assert_eq!(t.queue.count(State::Incoming).unwrap(), 3);
    assert_eq!(t.queue.count(State::Pending).unwrap(), 0);
}

/// Blocks its runtime thread for 2 s: the mistake the Piper reports.
struct Blocking;

impl AsyncStage for Blocking {
    async fn process(&self, _message: &Message) -> StageResult {
        std::thread::sleep(Duration::from_secs(2));
        Ok(Outcome::Commit)
    }
}

#[test]
fn a_stage_that_blocks_its_runtime_is_reported() {
    let t = TestQueue::new();
    t.queue.enqueue(b"x").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let piper = Piper::builder("blocking")
        .input(&t.queue)
        .advertise(false)
        .runtime(runtime.handle().clone())
        .async_stage(Blocking, 4)
        .build()
        .unwrap();
    let (handle, runner) = start(piper);
    wait_until(LONG, "the message committed", || {
        handle.stats().committed == 1
    });
    let stats = stop(&handle, runner);
    assert_eq!(stats.runtime_stalls, 1);
    drop(runtime);
}

#[test]
fn backpressure_pauses_an_async_stage_within_in_flight_of_the_limit() {
    let t = TestQueue::new();
    let output = t.sibling("out");
    for _ in 0..60 {
        t.queue.enqueue(b"x").unwrap();
    }
    let stage = Arc::new(Seen::default());
    let piper = Piper::builder("sleeper")
        .input(&t.queue)
        .output("out", &output)
        .out_limit(10)
        .advertise(false)
        .async_stage(Sleeper(Arc::clone(&stage)), 8)
        .build()
        .unwrap();
    let (handle, runner) = start(piper);
    wait_until(LONG, "intake paused by backpressure", || {
        handle.is_paused() && handle.stats().in_flight == 0
    });
    // Admission is checked before each claim: the futures claimed while the output was
    // under its limit may finish after it filled, at most in_flight of them.
    let waiting = output.count(State::Incoming).unwrap();
    assert!((10..=18).contains(&waiting), "{waiting} in the output");
    // Downstream drains: intake resumes and everything goes through.
    let mut drained = 0;
    wait_until(LONG, "all 60 through", || {
        while let Ok(Some(message)) = output.try_claim() {
            message.commit().unwrap();
            drained += 1;
        }
        drained == 60
    });
    let stats = stop(&handle, runner);
    assert_eq!((stats.forwarded, stats.in_flight), (60, 0));
}

#[test]
fn in_flight_must_be_at_least_one() {
    let t = TestQueue::new();
    let error = Piper::builder("none")
        .input(&t.queue)
        .async_stage(ByText, 0)
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("async_stage"), "{error}");
}

/// As [`ByText`] (with `sleep`: waits forever, for the timeout), recording what
/// `on_failed` is told.
struct Reporting {
    failed: Arc<Mutex<Vec<Failed>>>,
}

impl AsyncStage for Reporting {
    async fn process(&self, message: &Message) -> StageResult {
        if message.bytes()? == b"sleep" {
            std::future::pending::<()>().await;
        }
        ByText.process(message).await
    }

    fn on_failed(&self, failure: &Failed) {
        self.failed.lock().unwrap().push(failure.clone());
    }
}

#[test]
fn on_failed_hears_of_failures_errors_timeouts_and_dead_letters() {
    let t = TestQueue::new();
    let queue = DirectoryQueue::builder(t.root())
        .retry_policy(
            RetryPolicy::builder()
                .initial(Duration::from_millis(10))
                .jitter(0.0)
                .max_attempts(2)
                .build()
                .unwrap(),
        )
        .open()
        .unwrap();
    let mut ids = std::collections::HashMap::new();
    for text in ["fail", "error", "sleep", "retry", "commit"] {
        ids.insert(queue.enqueue(text.as_bytes()).unwrap(), text);
    }
    let failed = Arc::new(Mutex::new(Vec::new()));
    let piper = Piper::builder("reporting")
        .input(&queue)
        .advertise(false)
        .timeout(Duration::from_millis(200))
        .async_stage(
            Reporting {
                failed: Arc::clone(&failed),
            },
            8,
        )
        .build()
        .unwrap();
    let (handle, runner) = start(piper);
    wait_until(LONG, "four failures told and one commit", || {
        failed.lock().unwrap().len() == 4 && handle.stats().committed == 1
    });
    let stats = stop(&handle, runner);
    assert_eq!((stats.failed, stats.dead_lettered), (4, 1), "{stats:?}");
    let mut told: Vec<(&str, String, u32, bool)> = failed
        .lock()
        .unwrap()
        .iter()
        .map(|f| (ids[&f.id], f.reason.clone(), f.attempt, f.dead_letter))
        .collect();
    told.sort();
    assert_eq!(
        told,
        [
            ("error", "an error".to_owned(), 1, false),
            ("fail", "said so".to_owned(), 1, false),
            ("retry", "later".to_owned(), 2, true),
            ("sleep", "timeout".to_owned(), 1, false),
        ]
    );
    for f in failed.lock().unwrap().iter() {
        assert_eq!(f.queue, t.root(), "the input's root");
    }
}

#[test]
fn an_outcome_that_cannot_be_carried_out_backs_the_worker_off() {
    let t = TestQueue::new();
    let output = t.sibling("out");
    for _ in 0..40 {
        t.queue.enqueue(b"emit").unwrap();
    }
    let piper = Piper::builder("troubled")
        .input(&t.queue)
        .output("out", &output)
        .advertise(false)
        // The breaker would pause intake too, which is not what this test is about.
        .breaker(&BreakerPolicy::disabled())
        .async_stage(ByText, 4)
        .build()
        .unwrap();
    // The output is gone: every emit fails, and the Piper moves its message to
    // errors/. Without a back-off the worker would burn all 40 at once.
    std::fs::remove_dir_all(output.root()).unwrap();
    let (handle, runner) = start(piper);
    // The pauses double from 20 ms: the ninth error in a row comes after 5 s.
    wait_until(LONG, "nine outcomes that failed", || {
        handle.stats().failed >= 9
    });
    // Nine errors in a row: no claim for 5 s, while the few still in flight (at most
    // 3: each failed outcome stops the claims) land. A measurement window, not a
    // synchronisation: a worker that does not back off fails all 40 in it.
    let window = std::time::Instant::now();
    while window.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = handle.stats();
    assert!(
        stats.failed <= 12 && stats.claimed <= 12,
        "the worker did not back off: {stats:?}"
    );
    assert!(t.queue.count(State::Incoming).unwrap() >= 28);
    let stats = stop(&handle, runner);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(
        stats.claimed, stats.failed,
        "each claimed message failed once"
    );
    assert_eq!(
        t.queue.count(State::Pending).unwrap(),
        0,
        "nothing stranded"
    );
}
