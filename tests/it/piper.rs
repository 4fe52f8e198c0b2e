//! Pipers: outcomes, retries, hold, delay, expiry, timeouts, the breaker, poison
//! messages, backpressure, shutdown, priorities, liveness; and whole pipelines of
//! processes (the `pipeline` example).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use dirq::piper::{
    BreakerPolicy, Emit, Outcome, Piper, PiperBuilder, PiperHandle, PiperStats, StageResult,
    TimeoutAction,
};
use dirq::queue::RetryPolicy;
use dirq::{DirectoryQueue, Message, MessageId, State};

use crate::util::{assert_succeeded, example, names_in, signal, tempdir, wait_until, TestQueue};

const LONG: Duration = Duration::from_secs(60);

/// A Piper running on a thread of its own; shut down (and joined) when dropped.
struct Running {
    handle: PiperHandle,
    thread: Option<JoinHandle<dirq::Result<PiperStats>>>,
}

impl Running {
    fn start(builder: &mut PiperBuilder) -> Running {
        let piper = builder.build().expect("a valid Piper");
        let handle = piper.handle();
        let thread = std::thread::spawn(move || piper.run());
        Running {
            handle,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> PiperStats {
        self.handle.shutdown();
        let thread = self.thread.take().expect("running");
        thread
            .join()
            .expect("the piper thread")
            .expect("run succeeds")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.handle.force();
            let _ = thread.join();
        }
    }
}

fn body(m: &Message) -> String {
    String::from_utf8(m.bytes().unwrap()).unwrap()
}

fn quick_retry(root: &std::path::Path, attempts: u32) -> DirectoryQueue {
    DirectoryQueue::builder(root)
        .retry_policy(
            RetryPolicy::builder()
                .initial(Duration::from_millis(20))
                .jitter(0.0)
                .max_attempts(attempts)
                .build()
                .unwrap(),
        )
        .open()
        .unwrap()
}

#[test]
fn bad_settings_are_config_errors_naming_the_setter() {
    let t = TestQueue::new();
    let next = t.sibling("next");
    let base = || {
        let mut builder = Piper::builder("checked");
        builder
            .input(&t.queue)
            .output("next", &next)
            .stage(|_: &Message| -> StageResult { Ok(Outcome::Commit) });
        builder
    };
    let field = |builder: &PiperBuilder| match builder.build() {
        Ok(_) => None,
        Err(dirq::Error::Config { field, .. }) => Some(field),
        Err(other) => panic!("not a config error: {other}"),
    };
    let ms = Duration::from_millis;
    type Set = fn(&mut PiperBuilder) -> &mut PiperBuilder;
    let cases: [(&str, Set); 14] = [
        ("workers", |b| b.workers(0)),
        ("workers", |b| b.workers(PiperBuilder::MAX_WORKERS + 1)),
        ("workers", |b| b.workers(usize::MAX)),
        ("out_limit", |b| b.out_limit(0)),
        ("out_resume", |b| b.out_limit(10).out_resume(11)),
        ("out_limit_bytes", |b| b.out_limit_bytes(0)),
        ("out_resume_bytes", |b| b.out_resume_bytes(10)),
        ("out_resume_bytes", |b| {
            b.out_limit_bytes(10).out_resume_bytes(11)
        }),
        ("timeout", |b| b.timeout(Duration::ZERO)),
        ("resume_wait", |b| b.resume_wait(Duration::ZERO)),
        ("stats_interval", |b| b.stats_interval(Duration::ZERO)),
        ("recover_interval", |b| b.recover_interval(Duration::ZERO)),
        ("breaker.cooldown", |b| {
            b.breaker(BreakerPolicy::default().cooldown(Duration::ZERO))
        }),
        ("output", |b| b.output("next", &TestQueue::new().queue)),
    ];
    for (want, set) in cases {
        let mut builder = base();
        set(&mut builder);
        assert_eq!(field(&builder), Some(want), "{builder:?}");
    }
    let error = base().workers(0).build().unwrap_err().to_string();
    assert_eq!(
        error,
        r#"invalid workers of Piper "checked": must be from 1 to 1024"#
    );
    assert_eq!(
        field(
            Piper::builder("no input").stage(|_: &Message| -> StageResult { Ok(Outcome::Commit) })
        ),
        Some("input")
    );
    assert_eq!(
        field(Piper::builder("no stage").input(&t.queue)),
        Some("stage")
    );
    // The edges of each range are fine.
    let mut edges = base();
    edges
        .workers(PiperBuilder::MAX_WORKERS)
        .out_limit(1)
        .out_resume(1)
        .out_limit_bytes(1)
        .out_resume_bytes(1)
        .timeout(ms(1))
        .resume_wait(ms(1))
        .stats_interval(ms(1))
        .recover_interval(ms(1))
        .drain_timeout(Duration::ZERO);
    assert_eq!(field(&edges), None);
    // An unset limit is no limit: the bad values above are taken back.
    let mut undone = base();
    undone
        .timeout(Duration::ZERO)
        .no_timeout()
        .out_resume_bytes(10)
        .no_out_limit_bytes();
    assert_eq!(field(&undone), None);
}

#[test]
fn outcomes_forward_fan_out_route_emit_and_commit() {
    let t = TestQueue::new();
    let (a, b) = (t.sibling("a"), t.sibling("b"));
    let all = t.queue.enqueue(b"all").unwrap();
    let only_b = t.queue.enqueue(b"only-b").unwrap();
    let emit = t.queue.enqueue(b"emit").unwrap();
    t.queue.enqueue(b"drop").unwrap();
    let running = Running::start(
        Piper::builder("router")
            .input(&t.queue)
            .output("a", &a)
            .output("b", &b)
            .stage(|m: &Message| -> StageResult {
                Ok(match body(m).as_str() {
                    "all" => Outcome::Forward,
                    "only-b" => Outcome::ForwardTo("b".into()),
                    "emit" => Outcome::Emit(vec![Emit::new("first"), Emit::new("second").to("a")]),
                    _ => Outcome::Commit,
                })
            }),
    );
    wait_until(LONG, "every message handled", || {
        t.queue.counts().unwrap().unfinished() == 0
    });
    let stats = running.stop();
    assert_eq!(
        (
            stats.claimed,
            stats.forwarded,
            stats.committed,
            stats.emitted
        ),
        (4, 2, 2, 3)
    );
    let emitted_0 = format!("{emit}.0");
    let emitted_1 = format!("{emit}.1");
    let mut want_a = vec![all.to_string(), emitted_0.clone(), emitted_1];
    want_a.sort();
    assert_eq!(names_in(a.path(State::Incoming)), want_a);
    let mut want_b = vec![all.to_string(), only_b.to_string(), emitted_0];
    want_b.sort();
    assert_eq!(names_in(b.path(State::Incoming)), want_b);
    assert_eq!(
        dirq::admin::peek(&b, &all).unwrap().1,
        b"all",
        "fan-out copies the message"
    );
}

#[test]
fn retry_backs_off_and_dead_letters_after_the_last_attempt() {
    let t = TestQueue::new();
    let queue = quick_retry(t.root(), 3);
    let flaky = queue.enqueue(b"flaky").unwrap();
    let hopeless = queue.enqueue(b"hopeless").unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let running = Running::start(Piper::builder("retrier").input(&queue).stage(
        move |m: &Message| -> StageResult {
            let attempts = m.attempts()?;
            log.lock()
                .unwrap()
                .push((body(m), attempts, Instant::now()));
            if body(m) == "flaky" && attempts == 2 {
                return Ok(Outcome::Commit);
            }
            Ok(Outcome::Retry(format!("backend down (attempt {attempts})")))
        },
    ));
    // What finished means: one commit and one dead letter. A count of unfinished
    // messages is no proof while the Piper runs: it misses a retry on its way from
    // deferred/ to incoming/ (see DirectoryQueue::counts).
    wait_until(LONG, "one message committed and one dead-lettered", || {
        let stats = running.handle.stats();
        stats.committed == 1 && stats.dead_lettered == 1
    });
    let stats = running.stop();
    assert_eq!(queue.counts().unwrap().unfinished(), 0, "at rest");
    let seen = seen.lock().unwrap();
    // Everything the stage saw, for the failure messages below.
    let log: Vec<(&str, u32)> = seen.iter().map(|(b, a, _)| (b.as_str(), *a)).collect();
    assert_eq!(
        (stats.retried, stats.dead_lettered, stats.committed),
        (3, 1, 1),
        "{stats:?} {log:?}"
    );
    let failure = dirq::admin::failure(&queue, &hopeless).unwrap().unwrap();
    assert_eq!(
        failure.reason.as_deref(),
        Some("backend down (attempt 3)"),
        "{log:?}"
    );
    assert_eq!(failure.attempts, Some(3), "{log:?}");
    assert!(
        dirq::admin::failure(&queue, &flaky).unwrap().is_none(),
        "{log:?}"
    );
    // Backoff: the attempts of the hopeless message are at least 20 ms, then 40 ms apart.
    let times: Vec<Instant> = seen
        .iter()
        .filter(|(b, ..)| b == "hopeless")
        .map(|(.., t)| *t)
        .collect();
    assert_eq!(times.len(), 3, "{log:?}");
    let gaps = [times[1] - times[0], times[2] - times[1]];
    assert!(
        gaps[0] >= Duration::from_millis(18) && gaps[1] >= Duration::from_millis(38),
        "gaps {gaps:?}, {log:?}"
    );
}

#[test]
fn retry_after_waits_its_own_delay_and_dead_letters_with_its_reason() {
    let t = TestQueue::new();
    // The queue's backoff (20 ms) is far shorter than the stage's own delay.
    let queue = quick_retry(t.root(), 2);
    let id = queue.enqueue(b"later").unwrap();
    let delay = Duration::from_millis(300);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let running = Running::start(Piper::builder("later").input(&queue).stage(
        move |m: &Message| -> StageResult {
            let attempts = m.attempts()?;
            log.lock().unwrap().push(Instant::now());
            Ok(Outcome::RetryAfter(
                format!("busy (attempt {attempts})"),
                delay,
            ))
        },
    ));
    // errors/ is final; "nothing unfinished" can be read while the message moves
    // from deferred/ to incoming/ (see the test above).
    wait_until(LONG, "the message to be dead-lettered", || {
        queue.counts().unwrap().errors == 1
    });
    let stats = running.stop();
    assert_eq!((stats.retried, stats.dead_lettered), (1, 1), "{stats:?}");
    let times = seen.lock().unwrap();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] - times[0] >= delay,
        "retried after {:?}",
        times[1] - times[0]
    );
    let failure = dirq::admin::failure(&queue, &id).unwrap().unwrap();
    assert_eq!(failure.reason.as_deref(), Some("busy (attempt 2)"));
}

#[test]
fn durations_too_long_to_add_wait_forever_instead_of_panicking() {
    let t = TestQueue::new();
    let next = t.sibling("next");
    let later = t.queue.enqueue(b"later").unwrap();
    let command = t.queue.enqueue(b"command").unwrap();
    let mut forever = dirq::piper::CommandStage::builder("true", [] as [&str; 0]);
    let forever = forever
        .forward(true)
        .timeout(Duration::MAX)
        .kill_grace(Duration::MAX)
        .build()
        .unwrap();
    let mut breaker = BreakerPolicy::disabled();
    breaker.max_failures(1_000).cooldown(Duration::MAX);
    let running = Running::start(
        Piper::builder("patient")
            .input(&t.queue)
            .output("next", &next)
            .timeout(Duration::MAX)
            .drain_timeout(Duration::MAX)
            .resume_wait(Duration::MAX)
            .out_limit(1)
            .breaker(&breaker)
            .stage(move |m: &Message| -> StageResult {
                if body(m) == "later" {
                    return Ok(Outcome::RetryAfter("not now".into(), Duration::MAX));
                }
                let mut stage = forever.clone();
                dirq::piper::Stage::process(&mut stage, m)
            }),
    );
    wait_until(LONG, "both messages handled and intake paused", || {
        let deferred = t
            .queue
            .ids(State::Deferred)
            .unwrap()
            .any(|id| id.unwrap() == later);
        deferred
            && t.queue.counts().unwrap().pending == 0
            && t.queue.count(State::Incoming).unwrap() == 0
            && running.handle.is_paused()
    });
    let stats = running.stop();
    // The forwarded message filled `next` (out_limit 1): intake paused, with a
    // resume_wait too long to add, until the shutdown woke it.
    assert_eq!(
        (stats.retried, stats.forwarded, stats.panics),
        (1, 1, 0),
        "{stats:?}"
    );
    assert!(next
        .ids(State::Incoming)
        .unwrap()
        .any(|id| id.unwrap() == command));
}

#[test]
fn held_and_delayed_messages_wait_for_release_and_their_time() {
    let t = TestQueue::new();
    let held = t.queue.enqueue(b"held").unwrap();
    dirq::admin::hold(&t.queue, &held).unwrap();
    // "now" is the older of the two: on a machine slow enough to start the Piper after
    // the due time, it still comes first.
    t.queue.enqueue(b"now").unwrap();
    let due = SystemTime::now() + Duration::from_millis(300);
    t.queue.enqueue_at(b"delayed", due).unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = Arc::new(Mutex::new(tx));
    let running = Running::start(Piper::builder("waiter").input(&t.queue).stage(
        move |m: &Message| -> StageResult {
            tx.lock()
                .unwrap()
                .send((body(m), SystemTime::now()))
                .unwrap();
            Ok(Outcome::Commit)
        },
    ));
    let (first, _) = rx.recv_timeout(LONG).unwrap();
    assert_eq!(first, "now");
    let (second, at) = rx.recv_timeout(LONG).unwrap();
    assert_eq!(second, "delayed");
    assert!(at >= due, "processed before its time");
    // The held message, the oldest of the three, was passed over (it would have come
    // first) and waits in hold/, where no claimer looks.
    assert_eq!(
        t.queue.ids(State::Hold).unwrap().next().unwrap().unwrap(),
        held
    );
    assert!(rx.try_recv().is_err(), "the held message was processed");
    dirq::admin::unhold(&t.queue, &held).unwrap();
    assert_eq!(rx.recv_timeout(LONG).unwrap().0, "held");
    running.stop();
}

#[test]
fn expired_messages_go_to_errors_unprocessed() {
    let t = TestQueue::new();
    // Its id says it was born in 2023: older than the maximum age, however fast or slow
    // the test runs.
    let old = MessageId::new("1700000000.000000001.test.1.00000001.msg").unwrap();
    t.queue.enqueue_with_id(&old, b"old").unwrap();
    t.queue.enqueue(b"fresh").unwrap();
    let strict = DirectoryQueue::builder(t.root())
        .max_age(Duration::from_secs(3600))
        .open()
        .unwrap();
    let processed = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&processed);
    let running = Running::start(Piper::builder("fresh-only").input(&strict).stage(
        move |m: &Message| -> StageResult {
            log.lock().unwrap().push(body(m));
            Ok(Outcome::Commit)
        },
    ));
    wait_until(LONG, "both handled", || {
        t.queue.counts().unwrap().unfinished() == 0
    });
    let stats = running.stop();
    assert_eq!(*processed.lock().unwrap(), vec!["fresh".to_owned()]);
    assert_eq!(stats.expired, 1);
    assert_eq!(
        dirq::admin::failure(&t.queue, &old)
            .unwrap()
            .unwrap()
            .reason
            .as_deref(),
        Some("expired")
    );
}

#[test]
fn a_hung_stage_is_timed_out_and_its_worker_replaced() {
    for action in [TimeoutAction::Fail, TimeoutAction::Retry] {
        let t = TestQueue::new();
        // A retried message stays in deferred/ until the test has looked.
        let queue = DirectoryQueue::builder(t.root())
            .retry_policy(
                RetryPolicy::builder()
                    .initial(Duration::from_secs(3600))
                    .max_delay(Duration::from_secs(3600))
                    .build()
                    .unwrap(),
            )
            .open()
            .unwrap();
        let hung = queue.enqueue(b"hang").unwrap();
        for i in 0..5 {
            queue.enqueue(format!("ok {i}")).unwrap();
        }
        let (release, hold) = mpsc::channel::<()>();
        let hold = Arc::new(Mutex::new(hold));
        let done = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&done);
        let running = Running::start(
            Piper::builder("hangs")
                .input(&queue)
                .workers(1)
                // Long enough that the quick messages never reach it on a loaded
                // machine: the hung one is the only timeout.
                .timeout(Duration::from_secs(2))
                .on_timeout(action)
                .stage(move |m: &Message| -> StageResult {
                    if body(m) == "hang" {
                        // Stuck until the test lets go (long after the timeout).
                        let _ = hold.lock().unwrap().recv_timeout(LONG);
                        return Ok(Outcome::Commit);
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok(Outcome::Commit)
                }),
        );
        // The only worker is stuck; a replacement processes the rest.
        wait_until(LONG, "the other messages to be processed", || {
            done.load(Ordering::SeqCst) == 5
        });
        let state = if action == TimeoutAction::Fail {
            State::Errors
        } else {
            State::Deferred
        };
        wait_until(LONG, "the hung message to be moved", || {
            t.queue.ids(state).unwrap().any(|id| id.unwrap() == hung)
        });
        if action == TimeoutAction::Fail {
            let failure = dirq::admin::failure(&t.queue, &hung).unwrap().unwrap();
            assert_eq!(failure.reason.as_deref(), Some("timeout"));
        }
        // Let the stuck stage return: its Commit must be discarded.
        release.send(()).unwrap();
        let stats = running.stop();
        assert_eq!(stats.timeouts, 1, "{action:?}");
        assert!(
            t.queue.ids(state).unwrap().any(|id| id.unwrap() == hung),
            "{action:?}: outcome discarded"
        );
        assert_eq!(t.queue.counts().unwrap().pending, 0);
    }
}

#[test]
fn the_breaker_pauses_intake_and_a_probe_resumes_it() {
    let t = TestQueue::new();
    for i in 0..20 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    let healthy = Arc::new(AtomicBool::new(false));
    let is_healthy = Arc::clone(&healthy);
    let running = Running::start(
        Piper::builder("breaks")
            .input(&t.queue)
            .workers(1)
            .breaker(
                BreakerPolicy::disabled()
                    .max_failures(3)
                    // Long enough that this thread sees it open before its probe.
                    .cooldown(Duration::from_secs(1)),
            )
            .stage(move |_: &Message| -> StageResult {
                if is_healthy.load(Ordering::SeqCst) {
                    Ok(Outcome::Commit)
                } else {
                    Err("database unreachable".into())
                }
            }),
    );
    wait_until(LONG, "the breaker to open", || running.handle.is_paused());
    assert_eq!(
        t.queue.counts().unwrap().errors,
        3,
        "only the failures before it opened"
    );
    // After the cooldown one message goes through as a probe; it fails, and the breaker
    // opens again (for twice as long) rather than letting the queue through.
    wait_until(LONG, "a failed probe to open it again", || {
        t.queue.counts().unwrap().errors >= 4 && running.handle.is_paused()
    });
    healthy.store(true, Ordering::SeqCst);
    wait_until(LONG, "a probe to close it and the rest to flow", || {
        t.queue.counts().unwrap().unfinished() == 0
    });
    assert!(!running.handle.is_paused());
    // One failed probe per cooldown, and the cooldowns double: a breaker that held
    // failed 4 (5 if this thread was late by a whole cooldown). One that did not
    // failed the queue.
    let errors = t.queue.counts().unwrap().errors;
    assert!(
        (4..10).contains(&errors),
        "{errors} failed: the breaker did not hold"
    );
    running.stop();
}

#[test]
fn a_panicking_stage_dead_letters_the_poison_message_and_survives() {
    let t = TestQueue::new();
    let queue = quick_retry(t.root(), 3);
    let poison = queue.enqueue(b"poison").unwrap();
    for i in 0..10 {
        queue.enqueue(format!("fine {i}")).unwrap();
    }
    let running = Running::start(Piper::builder("fragile").input(&queue).workers(2).stage(
        |m: &Message| -> StageResult {
            if body(m) == "poison" {
                panic!("cannot digest this");
            }
            Ok(Outcome::Commit)
        },
    ));
    wait_until(LONG, "everything handled and counted", || {
        queue.counts().unwrap().unfinished() == 0 && running.handle.stats().dead_lettered == 1
    });
    let stats = running.handle.stats();
    assert_eq!(
        (stats.panics, stats.committed, stats.dead_lettered),
        (3, 10, 1)
    );
    let failure = dirq::admin::failure(&queue, &poison).unwrap().unwrap();
    let reason = failure.reason.unwrap();
    assert!(reason.contains("panicked: cannot digest this"), "{reason}");
    // Still alive and working.
    queue.enqueue(b"after").unwrap();
    wait_until(LONG, "a message after the poison", || {
        queue.counts().unwrap().unfinished() == 0
    });
    running.stop();
}

#[test]
fn backpressure_bounds_the_next_queue_and_resumes_promptly() {
    const LIMIT: usize = 40;
    const LOW: usize = 20;
    const WORKERS: usize = 2;
    let t = TestQueue::new();
    let next = t.sibling("next");
    let payloads: Vec<String> = (0..400).map(|i| format!("m{i}")).collect();
    t.queue.enqueue_batch(&payloads).unwrap();
    let running = Running::start(
        Piper::builder("upstream")
            .input(&t.queue)
            .output("next", &next)
            .workers(WORKERS)
            .out_limit(LIMIT)
            .out_resume(LOW)
            .stage(|_: &Message| -> StageResult { Ok(Outcome::Forward) }),
    );
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (next, peak, stop) = (next.clone(), Arc::clone(&peak), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(next.count(State::Incoming).unwrap(), Ordering::SeqCst);
            }
        })
    };
    // Nothing downstream yet: the upstream fills `next` to its limit and pauses.
    wait_until(LONG, "intake to pause", || running.handle.is_paused());
    let paused_at = next.count(State::Incoming).unwrap();
    // A downstream burst takes it below the low watermark; measure how soon intake resumes.
    let mut drained = 0;
    while next.count(State::Incoming).unwrap() >= LOW {
        next.try_claim().unwrap().unwrap().commit().unwrap();
        drained += 1;
    }
    let below_low = Instant::now();
    // What arrived in next, taken or not, only grows. Without a resume at most one
    // message per worker (claimed before the pause) arrives after it; with one, the
    // Piper refills next to its limit, which it may reach before anyone looks.
    wait_until(LONG, "intake to resume", || {
        drained + next.count(State::Incoming).unwrap() > paused_at + WORKERS
    });
    let resumed_after = below_low.elapsed();
    // Then a slow, steady downstream until everything went through.
    let mut delivered = drained;
    while delivered < 400 {
        let message = next.claim_timeout(LONG).unwrap();
        let message = message.unwrap_or_else(|| panic!("{delivered} of 400 arrived"));
        message.commit().unwrap();
        delivered += 1;
    }
    stop.store(true, Ordering::SeqCst);
    monitor.join().unwrap();
    let stats = running.stop();
    let peak = peak.load(Ordering::SeqCst);
    eprintln!(
        "backpressure: limit {LIMIT}, low {LOW}, {WORKERS} workers: paused at {paused_at}, \
         peak {peak} seen in next, resumed {resumed_after:?} after the level fell below low, \
         paused {} ms in all",
        stats.paused_ms
    );
    assert!(
        peak <= LIMIT + WORKERS,
        "next held {peak} > {LIMIT} + {WORKERS}"
    );
    assert!(
        resumed_after < Duration::from_secs(5),
        "resumed only after {resumed_after:?}"
    );
    assert_eq!(stats.forwarded, 400);
}

#[test]
fn shutdown_finishes_in_flight_messages_and_loses_nothing() {
    let t = TestQueue::new();
    let next = t.sibling("next");
    for i in 0..20 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    // Each stage waits at the gate, which opens after the shutdown request: the two
    // messages in flight then are the ones to finish, however slow this machine is.
    let (open_gate, gate) = mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let running = Running::start(
        Piper::builder("slow")
            .input(&t.queue)
            .output("next", &next)
            .workers(2)
            .stage(move |_: &Message| -> StageResult {
                let _ = gate.lock().unwrap().recv_timeout(LONG);
                Ok(Outcome::Forward)
            }),
    );
    wait_until(LONG, "work in progress", || {
        running.handle.stats().in_flight == 2
    });
    running.handle.shutdown();
    drop(open_gate);
    let start = Instant::now();
    let stats = running.stop();
    eprintln!("shutdown with 2 in flight took {:?}", start.elapsed());
    assert_eq!(stats.forwarded, 2, "the messages in flight, and only those");
    assert_eq!(t.queue.counts().unwrap().pending, 0);
    let moved = next.counts().unwrap().incoming;
    assert_eq!(moved as u64, stats.forwarded);
    assert_eq!(
        moved + t.queue.counts().unwrap().incoming,
        20,
        "nothing lost"
    );
}

#[test]
fn a_piper_stopped_before_it_runs_starts_nothing() {
    let t = TestQueue::new();
    t.queue.enqueue(b"untouched").unwrap();
    let piper = Piper::builder("never")
        .input(&t.queue)
        .stage(|_: &Message| -> StageResult { panic!("no message may be processed") })
        .build()
        .unwrap();
    piper.handle().shutdown();
    let stats = piper
        .run()
        .expect("a stop before the start is not an error");
    assert_eq!(stats.claimed, 0);
    assert_eq!(t.queue.counts().unwrap().incoming, 1);
    assert!(
        dirq::admin::pipers(&t.queue).unwrap().is_empty(),
        "it never advertised itself"
    );
}

#[test]
fn a_drain_that_runs_out_of_time_releases_the_message() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"forever").unwrap();
    let (_keep, hold) = mpsc::channel::<()>();
    let hold = Arc::new(Mutex::new(hold));
    let running = Running::start(
        Piper::builder("stuck")
            .input(&t.queue)
            .drain_timeout(Duration::from_millis(200))
            .stage(move |_: &Message| -> StageResult {
                let _ = hold.lock().unwrap().recv_timeout(LONG);
                Ok(Outcome::Commit)
            }),
    );
    wait_until(LONG, "the message in progress", || {
        running.handle.stats().in_flight == 1
    });
    running.stop();
    assert_eq!(names_in(&t.path(State::Incoming)), vec![id.to_string()]);
    assert_eq!(
        dirq::admin::list(&t.queue, State::Incoming).unwrap()[0].attempts,
        Some(1)
    );
}

#[test]
fn inputs_are_read_in_strict_priority_order() {
    let t = TestQueue::new();
    let low = t.sibling("low");
    for i in 0..10 {
        low.enqueue(format!("low {i}")).unwrap();
        t.queue.enqueue(format!("high {i}")).unwrap();
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&order);
    let running = Running::start(
        Piper::builder("prioritised")
            .input(&t.queue)
            .input(&low)
            .workers(1)
            .stage(move |m: &Message| -> StageResult {
                log.lock().unwrap().push(body(m));
                Ok(Outcome::Commit)
            }),
    );
    wait_until(LONG, "both inputs drained", || {
        t.queue.counts().unwrap().unfinished() + low.counts().unwrap().unfinished() == 0
    });
    running.stop();
    let order = order.lock().unwrap();
    assert!(
        order[..10].iter().all(|b| b.starts_with("high")),
        "{order:?}"
    );
}

/// Regression: a Piper's file was visible before anything was written in it (and
/// empty again for a moment at each heartbeat), so readers listed a live Piper with no
/// name: `dirq metrics` once missed `dirq_piper_up{stage="metered"}`.
#[test]
fn a_piper_is_never_listed_without_its_name() {
    for _ in 0..20 {
        let t = TestQueue::new();
        let running = Running::start(
            Piper::builder("named")
                .input(&t.queue)
                .stage(|_: &Message| -> StageResult { Ok(Outcome::Commit) }),
        );
        let mut listed = Vec::new();
        wait_until(LONG, "the Piper to advertise itself", || {
            listed = dirq::admin::pipers(&t.queue).unwrap();
            !listed.is_empty()
        });
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].stage.as_str(), listed[0].live), ("named", true));
        running.stop();
    }
}

#[test]
fn a_running_piper_advertises_itself_and_dead_ones_are_stale() {
    let t = TestQueue::new();
    // A file left by a dead Piper: nobody holds its lock.
    let pipers = t.root().join("pipers");
    std::fs::create_dir_all(&pipers).unwrap();
    std::fs::write(pipers.join("dead.json"), br#"{"stage": "ghost", "pid": 1}"#).unwrap();
    let stale = dirq::admin::pipers(&t.queue).unwrap();
    assert_eq!(stale.len(), 1);
    assert!(!stale[0].live && stale[0].stage == "ghost");

    let running = Running::start(
        Piper::builder("visible")
            .input(&t.queue)
            .workers(3)
            .stage(|_: &Message| -> StageResult { Ok(Outcome::Commit) }),
    );
    wait_until(LONG, "the Piper to advertise itself", || {
        dirq::admin::pipers(&t.queue)
            .unwrap()
            .iter()
            .any(|p| p.stage == "visible")
    });
    let infos = dirq::admin::pipers(&t.queue).unwrap();
    assert_eq!(infos.len(), 1, "the dead Piper's file was removed at start");
    let me = &infos[0];
    assert!(me.live);
    assert_eq!(
        (me.pid, me.workers, me.state.as_str()),
        (std::process::id(), 3, "running")
    );
    running.stop();
    assert!(
        dirq::admin::pipers(&t.queue).unwrap().is_empty(),
        "removed when it stops"
    );
}

/// Runs the `pipeline` example's coordinator and returns its JSON summary.
fn pipeline(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(example("pipeline"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pipeline {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a summary line");
    serde_json::from_str(last).unwrap()
}

#[test]
fn three_stages_of_two_processes_deliver_each_message_exactly_once() {
    let dir = tempdir();
    let root = dir.path().join("pipeline");
    let summary = pipeline(&[
        "--messages",
        "10000",
        "--processes",
        "2",
        "--workers",
        "2",
        "--durability",
        "none",
        "--dir",
        root.to_str().unwrap(),
    ]);
    eprintln!("three-stage pipeline: {summary}");
    assert_eq!(summary["delivered"], summary["expected"]);
    assert_eq!(summary["expected"], 9990);
    assert_eq!(
        (summary["duplicates"].as_u64(), summary["missing"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(summary["left_over"], 0);
}

#[test]
fn sigterm_under_load_drains_exits_0_and_loses_nothing() {
    let t = TestQueue::new();
    let dir = t.dir.path();
    let input = DirectoryQueue::open(dir.join("input")).unwrap();
    let parsed = DirectoryQueue::open(dir.join("parsed")).unwrap();
    let events: Vec<String> = (0..300).map(|i| format!("{{\"ID\": \"{i}\"}}")).collect();
    input.enqueue_batch(&events).unwrap();
    let stage = || {
        std::process::Command::new(example("pipeline"))
            .args([
                "stage",
                "parse",
                "--workers",
                "4",
                // Slow enough that 300 messages outlast the test's reaction to
                // the first 20 on a loaded machine.
                "--delay-ms",
                "50",
                "--dir",
            ])
            .arg(dir)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };

    // One signal: drain and exit 0.
    let child = stage();
    wait_until(LONG, "processing under way", || {
        parsed.counts().unwrap().incoming >= 20
    });
    signal(child.id(), "HUP"); // logged and ignored
    signal(child.id(), "USR1"); // logs a statistics line
    signal(child.id(), "TERM");
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took longer than the drain timeout"
    );
    assert!(stderr.contains("SIGHUP ignored"), "{stderr}");
    assert!(stderr.contains("statistics"), "{stderr}");
    assert_eq!(
        input.counts().unwrap().pending,
        0,
        "nothing left in pending/"
    );
    let (done, waiting) = (
        parsed.counts().unwrap().incoming,
        input.counts().unwrap().incoming,
    );
    assert_eq!(done + waiting, 300, "nothing lost");
    assert!(waiting > 0, "stopped under load");

    // Two signals: in-flight messages go back at once.
    let child = stage();
    wait_until(LONG, "processing under way again", || {
        parsed.counts().unwrap().incoming > done
    });
    signal(child.id(), "TERM");
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert_succeeded(&out, "the stage");
    assert_eq!(input.counts().unwrap().pending, 0);
    let total = parsed.counts().unwrap().incoming + input.counts().unwrap().incoming;
    assert_eq!(total, 300, "nothing lost after a forced stop");
}

#[test]
fn dirq_status_shows_live_pipers_and_marks_dead_ones_stale() {
    let t = TestQueue::new();
    let pipers = t.root().join("pipers");
    std::fs::create_dir_all(&pipers).unwrap();
    let running = Running::start(
        Piper::builder("watched")
            .input(&t.queue)
            .stage(|_: &Message| -> StageResult { Ok(Outcome::Commit) }),
    );
    wait_until(LONG, "the Piper to advertise itself", || {
        !dirq::admin::pipers(&t.queue).unwrap().is_empty()
    });
    // Left behind by a Piper that died (nobody holds its lock).
    std::fs::write(
        pipers.join("dead.json"),
        br#"{"stage": "ghost", "pid": 4242, "host": "h"}"#,
    )
    .unwrap();
    let q = t.root().to_str().unwrap();
    let status: serde_json::Value =
        serde_json::from_str(crate::util::run_ok(&["status", "--json", q]).trim()).unwrap();
    let listed = status["pipers"].as_array().unwrap();
    let live = listed
        .iter()
        .find(|p| p["stage"] == "watched")
        .expect("the live Piper");
    assert_eq!(
        (live["live"].as_bool(), live["state"].as_str()),
        (Some(true), Some("running"))
    );
    assert_eq!(live["pid"], std::process::id());
    let ghost = listed
        .iter()
        .find(|p| p["stage"] == "ghost")
        .expect("the stale file");
    assert_eq!(
        (ghost["live"].as_bool(), ghost["state"].as_str()),
        (Some(false), Some("stale"))
    );
    let human = crate::util::run_ok(&["status", q]);
    assert!(human.contains("piper watched pid"), "{human}");
    assert!(human.contains("piper ghost pid 4242@h: stale"), "{human}");
    running.stop();
}

#[test]
fn a_byte_limit_pauses_intake_too() {
    const WORKERS: usize = 2;
    let t = TestQueue::new();
    let next = t.sibling("next");
    let body = "x".repeat(100);
    for _ in 0..100 {
        t.queue.enqueue(&body).unwrap();
    }
    let running = Running::start(
        Piper::builder("bytes")
            .input(&t.queue)
            .output("next", &next)
            .workers(WORKERS)
            .out_limit_bytes(2_000)
            .out_resume_bytes(1_000)
            .stage(|_: &Message| -> StageResult { Ok(Outcome::Forward) }),
    );
    wait_until(LONG, "intake to pause on bytes", || {
        running.handle.is_paused()
    });
    let held = next.size(State::Incoming).unwrap();
    assert!((2_000..=2_200).contains(&held), "next holds {held} bytes");
    let paused_at = next.count(State::Incoming).unwrap();
    // Drain below the low byte watermark: intake resumes, and may well pause again
    // before anyone looks. So what is watched is what arrived in next, taken or not:
    // more than the one message per worker that can land after a pause without it.
    let mut drained = 0;
    while next.size(State::Incoming).unwrap() >= 1_000 {
        next.try_claim().unwrap().unwrap().commit().unwrap();
        drained += 1;
    }
    wait_until(LONG, "intake to resume", || {
        drained + next.count(State::Incoming).unwrap() > paused_at + WORKERS
    });
    running.stop();
}
