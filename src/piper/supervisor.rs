//! The thread that runs [`Piper::run`](super::Piper::run): starts the workers, then
//! watches them (timeouts, operators' cancel requests), publishes liveness, logs
//! statistics, recovers the inputs, and drains at shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::alert::Alerts;
use super::cancel::Watcher;
use super::commit::Finish;
use super::error_chain;
use super::liveness::{epoch_ms, Advert, PiperInfo};
use super::stats::{Counters, PiperStats};
use super::takeover::{take_over, Action};
use super::worker;
use super::{
    later, lock, Failed, HistoryLine, Shared, TimeoutAction, DRAINING, FORCED, NOT_STARTED, RUNNING,
};
use crate::error::{Error, Result};
use crate::format::history::HistoryOutcome;
use crate::format::meta::rfc3339;
use crate::sys::{self, ProcessSignal};

/// How often the supervisor looks around.
const TICK: Duration = Duration::from_millis(50);
const HEARTBEAT: Duration = Duration::from_secs(2);
const RATE_SAMPLE: Duration = Duration::from_secs(1);

pub(super) fn run(shared: &Arc<Shared>) -> Result<PiperStats> {
    // Piper::run consumes the Piper, so this is its only run; the state is already
    // past NOT_STARTED only when a handle asked it to stop before it started.
    if shared
        .run_state
        .compare_exchange(NOT_STARTED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        tracing::info!(stage = %shared.name, "piper stopped before it started");
        return Ok(shared.stats());
    }
    *lock(&shared.supervisor) = Some(std::thread::current());
    for input in &shared.inputs {
        input.recover()?;
    }
    let mut advert = if shared.config.advertise {
        Some(Advert::create(&shared.inputs, &info(shared, RUNNING))?)
    } else {
        None
    };
    let _signals = if shared.config.signals {
        let handle = super::PiperHandle {
            shared: Arc::clone(shared),
        };
        let mut received = 0;
        let watch = sys::watch_signals(move |signal| on_signal(&handle, signal, &mut received))
            .map_err(|e| Error::io(crate::error::Operation::Watch, "process signals", e))?;
        Some(watch)
    } else {
        None
    };
    if shared.alert_policy.is_enabled() {
        *lock(&shared.alerts) = Some(Alerts::start(&shared.alert_policy)?);
    }
    #[cfg(feature = "tokio")]
    if let Some(mode) = &shared.async_mode {
        mode.start(&shared.name)?;
    }
    let committer = start_committer(shared)?;
    for _ in 0..shared.config.workers {
        worker::spawn(shared);
    }
    tracing::info!(
        stage = %shared.name,
        workers = shared.config.workers,
        inputs = ?shared.inputs.iter().map(|q| q.root().display().to_string()).collect::<Vec<_>>(),
        outputs = ?shared.outputs.iter().map(|o| o.name.clone()).collect::<Vec<_>>(),
        "piper started"
    );

    let mut clock = Clock::new();
    let mut cancels = Watcher::new();
    let mut drain_deadline = None;
    loop {
        let now = Instant::now();
        let state = shared.state();
        check_timeouts(shared, state);
        cancels.tick(shared, now);
        for journal in &shared.history {
            journal.flush_due();
        }
        clock.account_pause(shared, now);
        if due(&mut clock.last_rate, RATE_SAMPLE, now) {
            lock(&shared.rates).record(shared.stats());
        }
        if let Some(advert) = advert.as_mut() {
            if due(&mut clock.last_heartbeat, HEARTBEAT, now) {
                advert.update(&info(shared, state));
            }
        }
        if due(&mut clock.last_stats, shared.config.stats_interval, now) {
            log_stats(shared);
        }
        if state == RUNNING && due(&mut clock.last_watch, WATCH, now) {
            watch_inputs(shared);
        }
        if state == RUNNING && due(&mut clock.last_recover, shared.config.recover_interval, now) {
            for input in &shared.inputs {
                if let Err(e) = input.recover() {
                    tracing::warn!(stage = %shared.name, error = %error_chain(&e), "cannot recover input");
                }
            }
        }
        if state >= DRAINING {
            let deadline = *drain_deadline.get_or_insert_with(|| {
                tracing::info!(stage = %shared.name, "stopping intake; draining in-flight messages");
                if let Some(advert) = advert.as_mut() {
                    advert.update(&info(shared, state));
                }
                later(now, drain_timeout(shared))
            });
            if state == FORCED || now >= deadline {
                release_in_flight(shared);
                break;
            }
            if lock(&shared.workers).live == 0 {
                break;
            }
        }
        std::thread::park_timeout(TICK);
    }
    let finished: Vec<_> = {
        let mut workers = lock(&shared.workers);
        let (done, stuck): (Vec<_>, Vec<_>) =
            workers.handles.drain(..).partition(|h| h.is_finished());
        if !stuck.is_empty() {
            tracing::warn!(stage = %shared.name, threads = stuck.len(), "abandoning worker threads stuck in their stage");
        }
        done
    };
    for handle in finished {
        let _ = handle.join();
    }
    if let Some(barrier) = &shared.barrier {
        barrier.finish(shared, committer);
    }
    #[cfg(feature = "tokio")]
    if let Some(mode) = &shared.async_mode {
        mode.stop();
    }
    // The summaries still due go out before run returns.
    let alerts = lock(&shared.alerts).take();
    if let Some(alerts) = alerts {
        alerts.stop();
    }
    for journal in &shared.history {
        journal.flush();
    }
    let stats = shared.stats();
    tracing::info!(stage = %shared.name, ?stats, "piper stopped");
    if let Some(reason) = lock(&shared.stopped).take() {
        return Err(Error::config(
            format_args!("Piper {:?}", shared.name),
            "stage",
            reason,
        ));
    }
    Ok(stats)
}

/// How long the supervisor waits for the workers to drain. The workers of an async
/// stage keep the drain timeout themselves and then stop their futures and release
/// their messages: the supervisor gives them a few seconds more for that.
fn drain_timeout(shared: &Shared) -> Duration {
    #[cfg(feature = "tokio")]
    if shared.async_mode.is_some() {
        return shared
            .config
            .drain_timeout
            .saturating_add(Duration::from_secs(5));
    }
    shared.config.drain_timeout
}

/// Starts the group commit's thread, when there is one.
fn start_committer(shared: &Arc<Shared>) -> Result<Option<JoinHandle<()>>> {
    if shared.barrier.is_none() {
        return Ok(None);
    }
    let committer = Arc::clone(shared);
    std::thread::Builder::new()
        .name(format!("dirq-{}-commit", shared.name))
        .spawn(move || {
            if let Some(barrier) = &committer.barrier {
                barrier.run(&committer);
            }
        })
        .map(Some)
        .map_err(|e| Error::io(crate::error::Operation::StartThread, "the group commit", e))
}

/// What the supervisor did last, and when.
struct Clock {
    last_rate: Instant,
    last_heartbeat: Instant,
    last_stats: Instant,
    last_recover: Instant,
    last_pause_check: Instant,
    last_watch: Instant,
}

impl Clock {
    fn new() -> Clock {
        let now = Instant::now();
        Clock {
            last_rate: now,
            // Heartbeat at once, so that status shows the Piper from the start.
            last_heartbeat: now - HEARTBEAT,
            last_stats: now,
            last_recover: now,
            last_pause_check: now,
            last_watch: now,
        }
    }
}

/// How often a Piper with alert limits looks at its inputs' oldest messages and at the
/// other Pipers on them.
const WATCH: Duration = Duration::from_secs(10);

/// The monitoring alerts of the policy's limits: an input whose oldest waiting message
/// is older than the age limit; another Piper on an input whose liveness file is older
/// than the silence limit.
fn watch_inputs(shared: &Shared) {
    let policy = &shared.alert_policy;
    if !policy.is_enabled() {
        return;
    }
    for input in &shared.inputs {
        match super::alert::queue_alerts(input, policy, &shared.name) {
            Ok(found) => found.into_iter().for_each(|alert| shared.raise(alert)),
            Err(e) => {
                tracing::debug!(stage = %shared.name, error = %error_chain(&e), "cannot check an input for alerts")
            }
        }
    }
}

/// Whether `every` has passed since `last`; if so, `last` becomes now.
fn due(last: &mut Instant, every: Duration, now: Instant) -> bool {
    if now.duration_since(*last) < every {
        return false;
    }
    *last = now;
    true
}

impl Clock {
    fn account_pause(&mut self, shared: &Shared, now: Instant) {
        let elapsed = now.duration_since(self.last_pause_check);
        self.last_pause_check = now;
        if shared.pause_reason().is_some() {
            let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
            Counters::add(&shared.counters.paused_ms, ms);
        }
    }
}

/// Fails (or retries) messages processed for longer than the timeout, and starts a
/// worker in place of each stuck one.
fn check_timeouts(shared: &Arc<Shared>, state: u8) {
    let Some(timeout) = shared.config.timeout else {
        return;
    };
    let overdue: Vec<_> = lock(&shared.jobs)
        .iter()
        .filter(|job| job.started.elapsed() >= timeout)
        .cloned()
        .collect();
    for job in overdue {
        if !job.take_over() {
            continue; // it finished just now
        }
        let action = match shared.config.on_timeout {
            TimeoutAction::Retry => Action::Retry("timeout"),
            _ => Action::Fail("timeout"),
        };
        let queue = &shared.inputs[job.input];
        match take_over(queue, &job.id, action) {
            Ok((attempt, failed)) => {
                tracing::warn!(stage = %shared.name, id = %job.id, ?timeout, "processing timed out");
                let line = HistoryLine {
                    outcome: if failed {
                        HistoryOutcome::TimedOut
                    } else {
                        HistoryOutcome::Retried
                    },
                    attempts: attempt,
                    started: Some(job.started),
                    reason: Some("timeout".to_owned()),
                    exit_code: None,
                };
                shared.record(job.input, &job.id, line);
                if failed {
                    tell_failed(
                        shared,
                        Failed {
                            id: job.id.clone(),
                            queue: queue.root().to_path_buf(),
                            reason: "timeout".to_owned(),
                            attempt,
                            exit_code: None,
                            dead_letter: action != Action::Fail("timeout"),
                        },
                    );
                }
            }
            Err(e) => {
                tracing::warn!(stage = %shared.name, id = %job.id, error = %error_chain(&e), "cannot move a timed-out message; recovery will requeue it when this process ends")
            }
        }
        if let Some(barrier) = &shared.barrier {
            barrier.hand(shared, Finish::Done);
        }
        let counters = &shared.counters;
        Counters::add(&counters.timeouts, 1);
        Counters::add(
            if action == Action::Fail("timeout") {
                &counters.failed
            } else {
                &counters.retried
            },
            1,
        );
        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(transition) = lock(&shared.breaker).record(true, Instant::now()) {
            worker::log_transition(shared, transition);
        }
        // The stuck thread ends when its stage returns; keep the worker count.
        lock(&shared.workers).live -= 1;
        if state == RUNNING {
            worker::spawn(shared);
        }
    }
}

/// Runs [`Stage::on_failed`](super::Stage::on_failed) for a message the supervisor
/// failed, on a fresh stage instance in a thread of its own: the stuck worker still
/// has its stage, and the hook must not hold up the supervisor's watch.
fn tell_failed(shared: &Arc<Shared>, failed: Failed) {
    shared.alert_failed(&failed);
    let factory = Arc::clone(&shared.factory);
    let name = shared.name.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("dirq-{}-on-failed", shared.name))
        .spawn(move || {
            let mut stage = factory();
            worker::tell_failed(&name, stage.as_mut(), &failed);
        });
    if let Err(e) = spawned {
        tracing::warn!(stage = %shared.name, error = %e, "cannot start a thread for on_failed");
    }
}

/// At the end of a drain (or a forced stop): puts every message still being processed
/// back into `incoming/`.
fn release_in_flight(shared: &Shared) {
    let jobs: Vec<_> = lock(&shared.jobs).clone();
    for job in jobs {
        if !job.take_over() {
            continue;
        }
        match take_over(&shared.inputs[job.input], &job.id, Action::Release) {
            Ok((attempts, _)) => {
                tracing::warn!(stage = %shared.name, id = %job.id, "released a message still in progress at shutdown");
                let line = HistoryLine {
                    outcome: HistoryOutcome::Released,
                    attempts,
                    started: Some(job.started),
                    reason: Some("shutdown".to_owned()),
                    exit_code: None,
                };
                shared.record(job.input, &job.id, line);
            }
            Err(e) => {
                tracing::warn!(stage = %shared.name, id = %job.id, error = %error_chain(&e), "cannot release a message at shutdown; recovery will requeue it")
            }
        }
        shared.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        lock(&shared.workers).live -= 1;
    }
}

fn on_signal(handle: &super::PiperHandle, signal: ProcessSignal, received: &mut u32) {
    let stage = &handle.shared.name;
    match signal {
        ProcessSignal::Terminate | ProcessSignal::Interrupt => {
            *received += 1;
            if *received == 1 {
                tracing::info!(stage = %stage, ?signal, "shutting down: finishing in-flight messages (signal again to stop now)");
                handle.shutdown();
            } else {
                tracing::warn!(stage = %stage, ?signal, "stopping now: releasing in-flight messages");
                handle.force();
            }
        }
        ProcessSignal::Statistics => log_stats(&handle.shared),
        ProcessSignal::Hangup => {
            tracing::info!(stage = %stage, "SIGHUP ignored: a Piper has no configuration to reload");
        }
    }
}

fn log_stats(shared: &Shared) {
    let s = shared.stats();
    let r = lock(&shared.rates).rates();
    tracing::info!(
        stage = %shared.name,
        claimed = s.claimed,
        committed = s.committed,
        forwarded = s.forwarded,
        emitted = s.emitted,
        failed = s.failed,
        retried = s.retried,
        dead_lettered = s.dead_lettered,
        expired = s.expired,
        timeouts = s.timeouts,
        cancelled = s.cancelled,
        panics = s.panics,
        wasted_claims = s.wasted_claims,
        paused_ms = s.paused_ms,
        in_flight = s.in_flight,
        claimed_per_s = r.claimed,
        done_per_s = r.done,
        failed_per_s = r.failed,
        state = shared.pause_reason().unwrap_or("running"),
        "statistics"
    );
}

fn info(shared: &Shared, state: u8) -> PiperInfo {
    let now = SystemTime::now();
    PiperInfo {
        stage: shared.name.clone(),
        host: sys::hostname(),
        pid: sys::pid(),
        started: rfc3339(shared.started),
        heartbeat: rfc3339(now),
        heartbeat_ms: epoch_ms(now),
        state: if state >= DRAINING {
            "draining"
        } else {
            shared.pause_reason().unwrap_or("running")
        }
        .to_owned(),
        workers: shared.config.workers,
        inputs: shared
            .inputs
            .iter()
            .map(|q| q.root().display().to_string())
            .collect(),
        outputs: shared
            .outputs
            .iter()
            .map(|o| (o.name.clone(), o.gauge.queue().root().display().to_string()))
            .collect(),
        stats: shared.stats(),
        rates: lock(&shared.rates).rates(),
        cancellable: shared.cancellable(),
        counters: std::collections::BTreeMap::new(),
        live: true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use super::*;
    use crate::piper::{Outcome, Piper, Stage, StageResult};
    use crate::{DirectoryQueue, Message};

    /// Sticks in `process` until `release` is set; records what `on_failed` is told.
    struct Stuck {
        release: Arc<AtomicBool>,
        told: Arc<Mutex<Vec<Failed>>>,
    }

    impl Stage for Stuck {
        fn process(&mut self, _: &Message) -> StageResult {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !self.release.load(Ordering::Acquire) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(Outcome::Commit)
        }

        fn on_failed(&mut self, failed: &Failed) {
            lock(&self.told).push(failed.clone());
        }
    }

    #[test]
    fn a_timeout_taken_over_by_the_supervisor_tells_on_failed() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let input = DirectoryQueue::open(dir.path().join("q")).expect("open queue");
        let id = input.enqueue(b"stuck").expect("enqueue");
        let release = Arc::new(AtomicBool::new(false));
        let told = Arc::new(Mutex::new(Vec::new()));
        let (r, t) = (Arc::clone(&release), Arc::clone(&told));
        let piper = Piper::builder("stuck")
            .input(&input)
            .timeout(Duration::from_millis(50))
            .advertise(false)
            .stage_factory(move || Stuck {
                release: Arc::clone(&r),
                told: Arc::clone(&t),
            })
            .build()
            .expect("a valid Piper");
        let handle = piper.handle();
        let runner = std::thread::spawn(move || piper.run());
        let deadline = Instant::now() + Duration::from_secs(60);
        while lock(&told).is_empty() {
            assert!(Instant::now() < deadline, "on_failed was not called");
            std::thread::sleep(Duration::from_millis(5));
        }
        release.store(true, Ordering::Release);
        handle.shutdown();
        let stats = runner.join().expect("the piper thread").expect("run");
        assert_eq!(stats.timeouts, 1);
        let told = lock(&told);
        assert_eq!(told.len(), 1);
        assert_eq!(told[0].id, id);
        assert_eq!(told[0].reason, "timeout");
        assert_eq!(told[0].queue, input.root());
        assert_eq!((told[0].attempt, told[0].dead_letter), (1, false));
    }
}
