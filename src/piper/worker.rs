//! A worker thread: claim by input priority, process, carry out the outcome.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::alert::AlertKind;
use super::backpressure::Change;
use super::breaker::Transition;
use super::cancel::{self, Answer as CancelAnswer, Cancellation, CANCELLED_REASON};
use super::commit::{self, fall_back, Finish};
use super::stats::Counters;
use super::{
    error_chain, later, lock, panic_message, Failed, HistoryLine, Job, Outcome, Shared, Stage,
    JOB_RUNNING,
};
use crate::engine::wake::{self, Interest};
use crate::error::{Error, Result};
use crate::format::history::HistoryOutcome;
use crate::queue::{FailureDetails, Retried, TerminalError};
use crate::{DirectoryQueue, Message, MessageId};

/// Why a worker's loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Exit {
    /// Intake stopped.
    Stopped,
    /// Its stage overran the timeout and a new worker took its place.
    Replaced,
}

/// What became of one processed message, for the worker.
#[derive(Debug, PartialEq, Eq)]
enum Processed {
    /// Handled; go on with the next.
    Done,
    /// The outcome could not be carried out (a storage error, most likely): back off
    /// before the next message, since the same error (and often the same message,
    /// released again) would follow at once.
    Troubled,
    /// The supervisor took it over after a timeout; this worker was replaced.
    TakenOver,
}

/// A message whose async stage's future ended, sent back to its worker.
#[cfg(feature = "tokio")]
struct Landed {
    input: usize,
    message: Message,
    done: super::async_stage::Done,
    started: Instant,
}

/// Starts one more worker thread.
pub(super) fn spawn(shared: &Arc<Shared>) {
    let mut workers = lock(&shared.workers);
    let id = workers.next_id;
    workers.next_id += 1;
    let name = format!("dirq-{}-{id}", shared.name);
    let worker_shared = Arc::clone(shared);
    match std::thread::Builder::new()
        .name(name)
        .spawn(move || run(&worker_shared))
    {
        Ok(handle) => {
            workers.live += 1;
            workers.handles.push(handle);
        }
        Err(e) => tracing::error!(stage = %shared.name, error = %e, "cannot start a worker thread"),
    }
}

fn run(shared: &Arc<Shared>) {
    let exit = Worker::new(shared).run();
    let mut workers = lock(&shared.workers);
    if exit == Exit::Stopped {
        workers.live -= 1;
    }
    drop(workers);
    tracing::debug!(stage = %shared.name, ?exit, "worker ended");
}

struct Worker<'a> {
    shared: &'a Shared,
    stage: Box<dyn Stage>,
    /// Consecutive errors (claims or outcomes that failed), for backing off instead of
    /// spinning.
    errors: u32,
    /// While paused by backpressure: when an output asked to be counted again.
    ask_again: Option<Instant>,
    /// The worker of an async stage: rung by each of its futures that ends, so that
    /// the outcome is carried out at once without waking other waiters.
    bell: Option<Arc<wake::Bell>>,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Shared) -> Worker<'a> {
        Worker {
            shared,
            stage: (shared.factory)(),
            errors: 0,
            ask_again: None,
            bell: None,
        }
    }

    fn run(&mut self) -> Exit {
        #[cfg(feature = "tokio")]
        if let Some(mode) = &self.shared.async_mode {
            return self.run_async(mode);
        }
        while self.shared.intake_open() {
            let seen = wake::generation();
            if !self.admit() {
                self.wait_for_outputs(seen);
                continue;
            }
            match self.claim() {
                Ok(Some((input, message))) => {
                    if !self.shared.intake_open() {
                        // Shutdown raced with the claim: it has not started, so put it back.
                        if let Err(e) = message.release() {
                            tracing::warn!(error = %e, "cannot release a message at shutdown");
                        }
                        break;
                    }
                    match self.process(input, message) {
                        Processed::Done => self.errors = 0,
                        Processed::Troubled => self.back_off(seen),
                        Processed::TakenOver => return Exit::Replaced,
                    }
                }
                Ok(None) => {
                    self.errors = 0;
                    lock(&self.shared.breaker).cancel_probe();
                    self.wait_for_input(seen);
                }
                Err(e) => {
                    lock(&self.shared.breaker).cancel_probe();
                    tracing::warn!(stage = %self.shared.name, error = %error_chain(&e), "cannot claim");
                    self.back_off(seen);
                }
            }
        }
        Exit::Stopped
    }

    /// The loop of a worker of an async stage: claims while fewer than `in_flight`
    /// futures run, spawns each on the runtime, and carries out the outcomes they send
    /// back here. A future that ends rings this worker's bell, which wakes this thread
    /// and no other (a sync stage's end wakes nobody either). After an outcome or a
    /// claim that failed, it claims nothing for the back-off time, as a sync worker
    /// would wait, but goes on carrying out the outcomes of the futures that end. At
    /// shutdown it claims no more, waits for the futures in flight until the drain
    /// timeout (or a forced stop), then stops them and releases their messages.
    #[cfg(feature = "tokio")]
    fn run_async(&mut self, mode: &super::async_stage::Mode) -> Exit {
        use super::async_stage::Control;
        use super::{DRAINING, RUNNING};
        use std::sync::mpsc;

        let shared = self.shared;
        let name: Arc<str> = Arc::from(shared.name.as_str());
        let bell = Arc::new(wake::Bell::default());
        self.bell = Some(Arc::clone(&bell));
        let (landed_tx, landed_rx) = mpsc::channel::<Landed>();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut in_flight = 0usize;
        let mut drain_until: Option<Instant> = None;
        // After an error: no claim before this.
        let mut paused_until: Option<Instant> = None;
        loop {
            let seen = wake::generation();
            while let Ok(landed) = landed_rx.try_recv() {
                in_flight -= 1;
                match self.land(landed) {
                    Processed::Done => self.errors = 0,
                    Processed::Troubled => paused_until = Some(self.pause()),
                    // Only a sync stage's thread is taken over.
                    Processed::TakenOver => {}
                }
            }
            let state = shared.state();
            if state != RUNNING {
                if in_flight == 0 {
                    break;
                }
                let now = Instant::now();
                let until =
                    *drain_until.get_or_insert_with(|| later(now, shared.config.drain_timeout));
                if state > DRAINING || now >= until {
                    let _ = stop_tx.send(true);
                }
                let tick = later(now, Duration::from_millis(100));
                let until = if *stop_tx.borrow() {
                    tick
                } else {
                    tick.min(until)
                };
                wake::wait_any_or(&[], seen, until, &bell);
                continue;
            }
            if let Some(until) = paused_until {
                if Instant::now() < until {
                    wake::wait_any_or(&[], seen, until, &bell);
                    continue;
                }
                paused_until = None;
            }
            if in_flight >= mode.in_flight {
                let until = later(Instant::now(), Duration::from_secs(1));
                wake::wait_any_or(&[], seen, until, &bell);
                continue;
            }
            if !self.admit() {
                self.wait_for_outputs(seen);
                continue;
            }
            match self.claim() {
                Ok(Some((input, message))) => {
                    let Some(runtime) = mode.handle() else {
                        let _ = message.release();
                        break;
                    };
                    let counters = &shared.counters;
                    Counters::add(&counters.claimed, 1);
                    counters.in_flight.fetch_add(1, Ordering::Relaxed);
                    let attempts = message.attempts().unwrap_or(1);
                    if attempts > shared.inputs[input].retry_policy().max_attempts() {
                        // As in process: the process died on its earlier attempts.
                        let reason = message
                            .last_retry_reason()
                            .unwrap_or_else(|| "the process handling it died".to_owned());
                        let reason = format!("{reason} (gave up after {} attempts)", attempts - 1);
                        let processed =
                            self.apply_outcome(input, message, Outcome::Fail(reason), true, None);
                        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                        if processed == Processed::Troubled {
                            paused_until = Some(self.pause());
                        }
                        continue;
                    }
                    let started = Instant::now();
                    let future = (mode.run)(
                        message,
                        Control {
                            timeout: shared.config.timeout,
                            stop: stop_rx.clone(),
                            name: Arc::clone(&name),
                            stalls: Arc::clone(&counters.runtime_stalls),
                        },
                    );
                    let landed = landed_tx.clone();
                    let bell = Arc::clone(&bell);
                    runtime.spawn(async move {
                        let (message, done) = future.await;
                        let _ = landed.send(Landed {
                            input,
                            message,
                            done,
                            started,
                        });
                        bell.ring();
                    });
                    in_flight += 1;
                }
                Ok(None) => {
                    self.errors = 0;
                    lock(&shared.breaker).cancel_probe();
                    self.wait_for_input(seen);
                }
                Err(e) => {
                    lock(&shared.breaker).cancel_probe();
                    tracing::warn!(stage = %shared.name, error = %error_chain(&e), "cannot claim");
                    paused_until = Some(self.pause());
                }
            }
        }
        Exit::Stopped
    }

    /// Carries out how an async stage's future ended. `Troubled` when the outcome (or
    /// the release at shutdown) could not be carried out.
    #[cfg(feature = "tokio")]
    fn land(&mut self, landed: Landed) -> Processed {
        use super::async_stage::Done;
        use super::TimeoutAction;

        let shared = self.shared;
        let counters = &shared.counters;
        let Landed {
            input,
            message,
            done,
            started,
        } = landed;
        let outcome = match done {
            Done::Finished(Ok(outcome)) => outcome,
            Done::Finished(Err(e)) => Outcome::Fail(error_chain(e.as_ref())),
            Done::Panicked(panic) => {
                Counters::add(&counters.panics, 1);
                Outcome::Retry(format!("stage panicked: {panic}"))
            }
            Done::TimedOut => {
                tracing::warn!(stage = %shared.name, id = %message.id(), timeout = ?shared.config.timeout, "processing timed out");
                match shared.config.on_timeout {
                    TimeoutAction::Retry => {
                        Counters::add(&counters.timeouts, 1);
                        Outcome::Retry("timeout".to_owned())
                    }
                    _ => Outcome::TimedOut(FailureDetails::default()),
                }
            }
            Done::Stopped => {
                let id = message.id().clone();
                let attempts = message.attempts().unwrap_or(1);
                let mut processed = Processed::Done;
                match message.release() {
                    Ok(()) => {
                        tracing::warn!(stage = %shared.name, %id, "released a message still in progress at shutdown");
                        let line = HistoryLine {
                            outcome: HistoryOutcome::Released,
                            attempts,
                            started: Some(started),
                            reason: Some("shutdown".to_owned()),
                            exit_code: None,
                        };
                        shared.record(input, &id, line);
                    }
                    Err(e) => {
                        let (error, _message) = e.into_parts();
                        tracing::warn!(stage = %shared.name, %id, error = %error_chain(&error), "cannot release a message at shutdown; recovery will requeue it");
                        processed = Processed::Troubled;
                    }
                }
                let _ = shared.finish(Finish::Done);
                counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                return processed;
            }
        };
        let processed = self.apply_outcome(input, message, outcome, false, Some(started));
        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        processed
    }

    /// Waits after an error, exponentially longer (10 ms to 5 s) the more errors came
    /// in a row, instead of spinning on it. Shutdown cuts the wait short.
    fn back_off(&mut self, seen: u64) {
        let until = self.pause();
        wake::wait_any(&[], seen, until);
    }

    /// Counts one more error in a row; until when to claim nothing: 10 ms, doubling
    /// with each error in a row, up to 5 s.
    fn pause(&mut self) -> Instant {
        self.errors += 1;
        let backoff = Duration::from_millis(10 << self.errors.min(9)).min(Duration::from_secs(5));
        later(Instant::now(), backoff)
    }

    /// Sleeps as [`wake::wait_any`], or, for the worker of an async stage, until its
    /// bell rings too.
    fn sleep(&self, wakes: &[&wake::Wake], seen: u64, until: Instant) {
        match &self.bell {
            Some(bell) => wake::wait_any_or(wakes, seen, until, bell),
            None => wake::wait_any(wakes, seen, until),
        }
    }

    /// Whether intake may go on: the failure breaker and every output's backpressure.
    fn admit(&mut self) -> bool {
        let shared = self.shared;
        let mut open = true;
        self.ask_again = None;
        for output in &shared.outputs {
            match output.gauge.admit() {
                Ok(admission) => {
                    open &= admission.open;
                    log_change(&shared.name, &output.name, admission.change);
                    if let Some(at) = admission.ask_again {
                        self.ask_again = Some(self.ask_again.map_or(at, |a| a.min(at)));
                    }
                }
                Err(e) => {
                    tracing::warn!(output = %output.name, error = %error_chain(&e), "cannot count output")
                }
            }
        }
        open && lock(&shared.breaker).admit(Instant::now())
    }

    /// Claims from the inputs in priority order.
    fn claim(&self) -> Result<Option<(usize, Message)>> {
        let mut first_error = None;
        for (i, input) in self.shared.inputs.iter().enumerate() {
            match input.try_claim() {
                Ok(Some(message)) => return Ok(Some((i, message))),
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(None), Err)
    }

    /// Sleeps until something may have arrived in an input, a deferred message falls
    /// due, or the rescan interval passes.
    fn wait_for_input(&self, seen: u64) {
        let inputs = &self.shared.inputs;
        let mut fresh_watch = false;
        for input in inputs {
            fresh_watch |= input.watch(Interest::Arrivals);
        }
        if fresh_watch {
            return; // events before the watch were missed: scan again first
        }
        let now = Instant::now();
        let until = inputs
            .iter()
            .map(|q| q.next_wake(now))
            .min()
            .unwrap_or(now + Duration::from_secs(1));
        let wakes: Vec<_> = inputs.iter().map(DirectoryQueue::waker).collect();
        self.sleep(&wakes, seen, until);
    }

    /// Sleeps while intake is paused, until an output's `incoming/` changes (downstream
    /// claims) or the fallback timer.
    fn wait_for_outputs(&self, seen: u64) {
        let outputs = &self.shared.outputs;
        let mut fresh_watch = false;
        for output in outputs {
            let queue = output.gauge.queue();
            fresh_watch |= queue.watch(Interest::Departures);
        }
        if fresh_watch {
            return;
        }
        let wakes: Vec<_> = outputs.iter().map(|o| o.gauge.queue().waker()).collect();
        let fallback = later(Instant::now(), self.shared.config.resume_wait);
        self.sleep(
            &wakes,
            seen,
            self.ask_again.map_or(fallback, |at| at.min(fallback)),
        );
    }

    /// Runs the stage on one message and carries out its outcome.
    fn process(&mut self, input: usize, message: Message) -> Processed {
        let shared = self.shared;
        let counters = &shared.counters;
        Counters::add(&counters.claimed, 1);
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        let queue = &shared.inputs[input];
        let attempts = message.attempts().unwrap_or(1);
        let allowed = queue.retry_policy().max_attempts();
        if attempts > allowed {
            // Earlier attempts ended without an outcome: the process died on it (a
            // poison message that crashes the worker). Dead-letter, do not crash again.
            let reason = message
                .last_retry_reason()
                .unwrap_or_else(|| "the process handling it died".to_owned());
            let reason = format!("{reason} (gave up after {} attempts)", attempts - 1);
            let processed = self.apply_outcome(input, message, Outcome::Fail(reason), true, None);
            counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            return processed;
        }
        let job = Arc::new(Job {
            id: message.id().clone(),
            input,
            started: Instant::now(),
            state: Arc::new(std::sync::atomic::AtomicU8::new(JOB_RUNNING)),
        });
        lock(&shared.jobs).push(Arc::clone(&job));
        let cancel = Cancellation::of(&job.state);
        let result = catch_unwind(AssertUnwindSafe(|| {
            self.stage.process_cancellable(&message, &cancel)
        }));
        // IMPORTANT: this exchange decides between the stage's outcome and an
        // operator's cancel. Once it succeeded, the supervisor no longer cancels the
        // job; once the supervisor marked it cancelled, it fails, and the outcome is
        // never carried out nor handed to the group commit.
        let finished = job.finish();
        lock(&shared.jobs).retain(|j| !Arc::ptr_eq(j, &job));
        if !finished {
            if let Some(requeue) = job.cancelled() {
                let details = match result {
                    Ok(Ok(Outcome::FailWith(_, details) | Outcome::TimedOut(details))) => details,
                    Err(_) => {
                        // A stage that panicked is not reused, cancelled or not.
                        Counters::add(&counters.panics, 1);
                        self.stage = (shared.factory)();
                        FailureDetails::default()
                    }
                    _ => FailureDetails::default(),
                };
                let processed = self.cancel(input, message, requeue, details, job.started);
                counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                return processed;
            }
            // The supervisor timed it out, moved the message on and started a new
            // worker: discard this outcome and end this thread. (A cancel it had
            // begun, if any, is over.)
            cancel::end(&shared.inputs[input], message.id());
            message.abandon();
            return Processed::TakenOver;
        }
        let outcome = match result {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => Outcome::Fail(error_chain(e.as_ref())),
            Err(panic) => {
                Counters::add(&counters.panics, 1);
                self.stage = (shared.factory)();
                Outcome::Retry(format!("stage panicked: {}", panic_message(panic.as_ref())))
            }
        };
        let processed = self.apply_outcome(input, message, outcome, false, Some(job.started));
        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        processed
    }

    /// Carries out an outcome, counts it, and tells the breaker. `Troubled` when the
    /// outcome could not be carried out.
    fn apply_outcome(
        &mut self,
        input: usize,
        message: Message,
        outcome: Outcome,
        dead_letter: bool,
        started: Option<Instant>,
    ) -> Processed {
        let shared = self.shared;
        let counters = &shared.counters;
        let id = message.id().clone();
        let mut line = HistoryLine {
            outcome: HistoryOutcome::Committed,
            attempts: message.attempts().unwrap_or(1),
            started,
            reason: None,
            exit_code: None,
        };
        line.set(&outcome, dead_letter);
        let mut failed = false;
        // What to tell the stage's on_failed once the message is in errors/.
        let mut notice: Option<Failed> = None;
        let applied: Result<Finish, TerminalError> = match outcome {
            Outcome::Forward => self.forward(message, None),
            Outcome::ForwardTo(name) => self.forward(message, Some(&name)),
            Outcome::Emit(emits) => self.emit(message, emits),
            Outcome::Commit => message.commit().map(|()| {
                Counters::add(&counters.committed, 1);
                Finish::Done
            }),
            Outcome::Fail(reason) => {
                failed = true;
                notice = Some(failed_notice(&message, &reason, None, dead_letter));
                self.fail(message, reason, FailureDetails::default(), dead_letter)
                    .map(|()| Finish::Done)
            }
            Outcome::FailWith(reason, details) => {
                failed = true;
                notice = Some(failed_notice(
                    &message,
                    &reason,
                    details.exit_code,
                    dead_letter,
                ));
                self.fail(message, reason, details, dead_letter)
                    .map(|()| Finish::Done)
            }
            Outcome::TimedOut(details) => {
                failed = true;
                notice = Some(failed_notice(
                    &message,
                    "timeout",
                    details.exit_code,
                    dead_letter,
                ));
                self.fail(message, "timeout".to_owned(), details, dead_letter)
                    .map(|()| {
                        Counters::add(&counters.timeouts, 1);
                        Finish::Done
                    })
            }
            Outcome::Stop(reason) => {
                tracing::error!(stage = %shared.name, %id, %reason, "the stage cannot work: putting the message back and stopping");
                shared.stop_with(reason);
                message.release().map(|()| Finish::Done)
            }
            Outcome::Retry(reason) => {
                failed = true;
                let last = failed_notice(&message, &reason, None, true);
                message.retry(reason).map(|r| {
                    if r == Retried::DeadLettered {
                        notice = Some(last);
                        line.outcome = HistoryOutcome::DeadLettered;
                    }
                    self.count_retry(r);
                    Finish::Done
                })
            }
            Outcome::RetryAfter(reason, delay) => {
                failed = true;
                let last = message.attempts().unwrap_or(1)
                    >= message.queue().retry_policy().max_attempts();
                let retried = if last {
                    notice = Some(failed_notice(&message, &reason, None, true));
                    line.outcome = HistoryOutcome::DeadLettered;
                    message
                        .fail(reason)
                        .map(|()| self.count_retry(Retried::DeadLettered))
                } else {
                    // A delay too long to add (Duration::MAX) waits a century
                    // rather than panicking.
                    let now = std::time::SystemTime::now();
                    let when = now.checked_add(delay).unwrap_or(now + super::CENTURY);
                    message
                        .retry_at(reason, when)
                        .map(|()| self.count_retry(Retried::Deferred(when)))
                };
                retried.map(|()| Finish::Done)
            }
        };
        // What is left (removing an input whose results were published) waits for the
        // group commit's sync of the outputs.
        let applied = applied.and_then(|finish| shared.finish(finish));
        let processed = if applied.is_ok() {
            Processed::Done
        } else {
            Processed::Troubled
        };
        if let Err(e) = applied {
            notice = None;
            let (error, message) = e.into_parts();
            failed = true;
            tracing::warn!(stage = %shared.name, %id, error = %error_chain(&error), "cannot carry out the outcome");
            // fall_back fails it (or, failing that, releases it): recorded as failed.
            line.outcome = HistoryOutcome::Failed;
            line.reason = Some(format!(
                "cannot carry out the stage's outcome: {}",
                error_chain(&error)
            ));
            if let Some(message) = message {
                fall_back(message, &error, counters);
            }
        }
        shared.record(input, &id, line);
        if let Some(transition) = lock(&shared.breaker).record(failed, Instant::now()) {
            log_transition(shared, transition);
        }
        if let Some(notice) = notice {
            shared.alert_failed(&notice);
            tell_failed(&shared.name, self.stage.as_mut(), &notice);
        }
        processed
    }

    /// Carries out an operator's cancel: the message to `errors/` with reason
    /// [`CANCELLED_REASON`] (`details` from what the stage returned, such as a killed
    /// command's standard error), or back to `incoming/` with `requeue`; then answers
    /// the request. Not a failure for the breaker: the stage did nothing wrong.
    fn cancel(
        &mut self,
        input: usize,
        message: Message,
        requeue: bool,
        details: FailureDetails,
        started: Instant,
    ) -> Processed {
        let shared = self.shared;
        let counters = &shared.counters;
        let id = message.id().clone();
        let line = HistoryLine {
            outcome: if requeue {
                HistoryOutcome::Released
            } else {
                HistoryOutcome::Cancelled
            },
            attempts: message.attempts().unwrap_or(1),
            started: Some(started),
            reason: Some(CANCELLED_REASON.to_owned()),
            exit_code: details.exit_code,
        };
        let (applied, notice, answer) = if requeue {
            (message.release(), None, CancelAnswer::Incoming)
        } else {
            let notice = failed_notice(&message, CANCELLED_REASON, details.exit_code, false);
            let failed = message
                .fail_with(CANCELLED_REASON, details)
                .map(|()| Counters::add(&counters.failed, 1));
            (failed, Some(notice), CancelAnswer::Errors)
        };
        lock(&shared.breaker).cancel_probe();
        let applied = applied.and_then(|()| shared.finish(Finish::Done));
        match applied {
            Ok(()) => {
                Counters::add(&counters.cancelled, 1);
                tracing::info!(stage = %shared.name, %id, ?answer, "cancelled");
                shared.record(input, &id, line);
                cancel::answer(&shared.inputs[input], &id, answer);
                cancel::end(&shared.inputs[input], &id);
                if let Some(notice) = notice {
                    tell_failed(&shared.name, self.stage.as_mut(), &notice);
                }
                Processed::Done
            }
            Err(e) => {
                let (error, message) = e.into_parts();
                tracing::warn!(stage = %shared.name, %id, error = %error_chain(&error), "cannot carry out a cancel");
                if let Some(message) = message {
                    fall_back(message, &error, counters);
                }
                cancel::end(&shared.inputs[input], &id);
                Processed::Troubled
            }
        }
    }

    fn fail(
        &self,
        message: Message,
        reason: String,
        details: FailureDetails,
        dead_letter: bool,
    ) -> Result<(), TerminalError> {
        let counters = &self.shared.counters;
        message.fail_with(reason, details)?;
        Counters::add(&counters.failed, 1);
        if dead_letter {
            Counters::add(&counters.dead_lettered, 1);
        }
        Ok(())
    }

    fn count_retry(&self, retried: Retried) {
        let counters = &self.shared.counters;
        match retried {
            Retried::Deferred(_) => Counters::add(&counters.retried, 1),
            _ => {
                Counters::add(&counters.failed, 1);
                Counters::add(&counters.dead_lettered, 1);
            }
        }
    }

    /// Passes the message on: to the named output, or renamed into the first output and
    /// copied (streamed, same id) into every other one. The rename waits for the group
    /// commit when there are copies: they must be durable before the original goes.
    fn forward(&self, message: Message, only: Option<&str>) -> Result<Finish, TerminalError> {
        let outputs = &self.shared.outputs;
        let size = message.size();
        let targets: Vec<usize> = match only {
            Some(name) => (0..outputs.len())
                .filter(|&i| outputs[i].name == name)
                .collect(),
            None => (0..outputs.len()).collect(),
        };
        let Some((first, others)) = targets.split_first() else {
            let reason = match only {
                Some(name) => {
                    format!("the stage forwarded to {name:?}, which is not an output of this Piper")
                }
                None => "the stage forwarded, but this Piper has no outputs".to_owned(),
            };
            return Err(TerminalError::new(
                stage_error(&self.shared.name, reason),
                Some(message),
            ));
        };
        if others.is_empty() {
            commit::remove(self.shared, message, Some(*first))?;
            return Ok(Finish::Done);
        }
        for &output in others {
            let output = &outputs[output];
            match output
                .gauge
                .queue()
                .publish_copy(message.id(), message.reader())
            {
                // Already there: a copy made by an attempt that crashed after it.
                Ok(()) | Err(Error::Duplicate { .. }) => output.gauge.added(size),
                Err(e) => return Err(TerminalError::new(e, Some(message))),
            }
        }
        Ok(Finish::Forward(message, *first))
    }

    /// Publishes the emitted messages (ids derived from the original's); the original
    /// is deleted once they are durable (by the group commit).
    fn emit(&self, message: Message, emits: Vec<super::Emit>) -> Result<Finish, TerminalError> {
        let shared = self.shared;
        let total = emits.len();
        for (k, emit) in emits.into_iter().enumerate() {
            let targets: Vec<&super::Output> = match &emit.output {
                Some(name) => shared.outputs.iter().filter(|o| &o.name == name).collect(),
                None => shared.outputs.iter().collect(),
            };
            if targets.is_empty() {
                let reason = match &emit.output {
                    Some(name) => format!(
                        "the stage emitted to {name:?}, which is not an output of this Piper"
                    ),
                    None => "the stage emitted, but this Piper has no outputs".to_owned(),
                };
                return Err(TerminalError::new(
                    stage_error(&shared.name, reason),
                    Some(message),
                ));
            }
            for output in targets {
                let queue = output.gauge.queue();
                let id = emitted_id(message.id(), k, total, queue, message.queue());
                // Already there, or already finished there: a copy made by an attempt
                // that crashed after it.
                match queue.enqueue_with_id(&id, &emit.bytes) {
                    Ok(_) => output.gauge.added(emit.bytes.len() as u64),
                    Err(e) => return Err(TerminalError::new(e, Some(message))),
                }
                Counters::add(&shared.counters.emitted, 1);
            }
        }
        Ok(Finish::Commit(message))
    }
}

impl HistoryLine {
    /// What the history says of `outcome`, before it is carried out; a retry that
    /// turns out to be the last is changed to a dead letter by the caller.
    fn set(&mut self, outcome: &Outcome, dead_letter: bool) {
        let failed = if dead_letter {
            HistoryOutcome::DeadLettered
        } else {
            HistoryOutcome::Failed
        };
        let (kind, reason, exit_code) = match outcome {
            Outcome::Forward | Outcome::ForwardTo(_) => (HistoryOutcome::Forwarded, None, None),
            Outcome::Emit(_) => (HistoryOutcome::Emitted, None, None),
            Outcome::Commit => (HistoryOutcome::Committed, None, None),
            Outcome::Fail(reason) => (failed, Some(reason.clone()), None),
            Outcome::FailWith(reason, details) => (failed, Some(reason.clone()), details.exit_code),
            Outcome::TimedOut(details) => (
                HistoryOutcome::TimedOut,
                Some("timeout".to_owned()),
                details.exit_code,
            ),
            Outcome::Stop(reason) => (HistoryOutcome::Stopped, Some(reason.clone()), None),
            Outcome::Retry(reason) | Outcome::RetryAfter(reason, _) => {
                (HistoryOutcome::Retried, Some(reason.clone()), None)
            }
        };
        self.outcome = kind;
        self.reason = reason;
        self.exit_code = exit_code;
    }
}

/// What [`Stage::on_failed`] is told about `message` failing with `reason`.
fn failed_notice(
    message: &Message,
    reason: &str,
    exit_code: Option<i32>,
    dead_letter: bool,
) -> Failed {
    Failed {
        id: message.id().clone(),
        queue: message.queue().root().to_path_buf(),
        reason: reason.to_owned(),
        attempt: message.attempts().unwrap_or(1),
        exit_code,
        dead_letter,
    }
}

/// Calls the stage's [`Stage::on_failed`]; a panic in it is logged, not passed on.
pub(super) fn tell_failed(name: &str, stage: &mut dyn Stage, failed: &Failed) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| stage.on_failed(failed))) {
        tracing::warn!(stage = %name, id = %failed.id, panic = %panic_message(panic.as_ref()), "on_failed panicked");
    }
}

/// The id of the `k`-th of `total` messages emitted from `parent` into `target`: the
/// parent's own id when it emits one message, `<parent>.<k>` otherwise. Deterministic,
/// so that a re-run after a crash finds what the first run published. A fresh id when
/// the target is the parent's own queue (where the parent's id is still in use) or the
/// derived id would not be valid.
fn emitted_id(
    parent: &MessageId,
    k: usize,
    total: usize,
    target: &DirectoryQueue,
    source: &DirectoryQueue,
) -> MessageId {
    if target.same_queue(source) {
        return MessageId::generate();
    }
    if total == 1 {
        return parent.clone();
    }
    let mut name = parent.as_os_str().to_os_string();
    name.push(format!(".{k}"));
    MessageId::new(name).unwrap_or_else(|_| MessageId::generate())
}

/// A stage named an output its Piper does not have.
fn stage_error(stage: &str, reason: String) -> Error {
    Error::config(format_args!("Piper {stage:?}"), "output", reason)
}

fn log_change(stage: &str, output: &str, change: Option<Change>) {
    match change {
        Some(Change::Paused { count, bytes }) => {
            tracing::info!(
                stage,
                output,
                count,
                bytes,
                "backpressure: output is full, pausing intake"
            );
        }
        Some(Change::Resumed { count, bytes }) => {
            tracing::info!(
                stage,
                output,
                count,
                bytes,
                "backpressure: output drained, resuming intake"
            );
        }
        None => {}
    }
}

/// Logs a breaker transition and raises its alert (about the first input).
pub(super) fn log_transition(shared: &Shared, transition: Transition) {
    let stage = shared.name.as_str();
    let (kind, reason) = match transition {
        Transition::Opened {
            failures,
            outcomes,
            cooldown,
        } => {
            let reason = format!(
                "failure breaker open: {failures} of the last {outcomes} messages failed; \
                 pausing intake for {cooldown:?} before trying one message"
            );
            tracing::error!(
                stage,
                failures,
                outcomes,
                cooldown_s = cooldown.as_secs_f64(),
                "{reason}"
            );
            (AlertKind::BreakerOpen, reason)
        }
        Transition::Closed => {
            let reason = "failure breaker closed: a probe succeeded, resuming intake".to_owned();
            tracing::info!(stage, "{reason}");
            (AlertKind::BreakerClosed, reason)
        }
    };
    if let Some(input) = shared.inputs.first() {
        shared.alert(kind, input.root(), reason, None);
    }
}
