//! Message lifecycle beyond claim and commit: attempts, retry with backoff and dead
//! letters, delayed delivery, hold, expiry.

use std::time::{Duration, SystemTime};

use dirq::queue::{Retried, RetryPolicy};
use dirq::{DirectoryQueue, Error, MessageId, State};

use crate::util::{names_in, TestQueue};

fn quick_retries(t: &TestQueue, attempts: u32) -> DirectoryQueue {
    DirectoryQueue::builder(t.root())
        .retry_policy(
            RetryPolicy::builder()
                .initial(Duration::from_millis(50))
                .factor(2.0)
                .jitter(0.0)
                .max_attempts(attempts)
                .build()
                .unwrap(),
        )
        .open()
        .unwrap()
}

#[test]
fn retry_backs_off_then_dead_letters_with_the_last_reason() {
    let t = TestQueue::new();
    let queue = quick_retries(&t, 3);
    let id = queue.enqueue(b"flaky").unwrap();
    // 50 ms, then 100 ms (no jitter).
    let delays = [Duration::from_millis(50), Duration::from_millis(100)];
    // A message the check below claimed, when this thread was slower than the backoff.
    let mut early = None;
    for attempt in 1..=3u32 {
        let message = early.take().unwrap_or_else(|| wait_for_claim(&queue));
        assert_eq!(message.id(), &id);
        assert_eq!(message.attempts().unwrap(), attempt);
        let before = SystemTime::now();
        let retried = message.retry(format!("backend busy ({attempt})")).unwrap();
        let after = SystemTime::now();
        match retried {
            Retried::Deferred(when) => {
                assert!(attempt < 3);
                // `when` is the delay after some moment between `before` and `after`.
                let delay = delays[attempt as usize - 1];
                let slack = Duration::from_millis(1);
                assert!(
                    when + slack >= before + delay && when <= after + delay + slack,
                    "attempt {attempt}: due {:?} after the retry began, {:?} after it ended",
                    when.duration_since(before),
                    when.duration_since(after)
                );
                // It waits in deferred/; incoming/ stays clean.
                assert!(names_in(&t.path(State::Incoming)).is_empty());
                // Not claimable before its time (a slow thread may find it due already).
                match queue.try_claim().unwrap() {
                    None => assert_eq!(queue.counts().unwrap().deferred, 1),
                    Some(message) => {
                        assert!(SystemTime::now() >= when, "claimed before its time");
                        early = Some(message);
                    }
                }
            }
            Retried::DeadLettered => assert_eq!(attempt, 3),
            other => panic!("unexpected {other:?}"),
        }
    }
    let failure = dirq::admin::failure(&queue, &id)
        .unwrap()
        .expect("a dead letter has a sidecar");
    assert_eq!(failure.reason.as_deref(), Some("backend busy (3)"));
    assert_eq!(failure.attempts, Some(3));
    assert_eq!(queue.counts().unwrap().unfinished(), 0);
}

fn wait_for_claim(queue: &DirectoryQueue) -> dirq::Message {
    queue
        .claim_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("the message came back in time")
}

#[test]
fn the_retry_reason_survives_until_the_next_attempt() {
    let t = TestQueue::new();
    let queue = quick_retries(&t, 5);
    queue.enqueue(b"x").unwrap();
    let first = queue.try_claim().unwrap().unwrap();
    assert_eq!(first.last_retry_reason(), None);
    first.retry("database down").unwrap();
    let second = wait_for_claim(&queue);
    assert_eq!(second.last_retry_reason().as_deref(), Some("database down"));
    second.commit().unwrap();
}

#[test]
fn delayed_delivery_waits_for_its_time() {
    let t = TestQueue::new();
    // What is proven needs the claimer to block before the due time; on a machine too
    // slow for that, the same again with a longer delay.
    for delay in [300, 1_000, 3_000, 10_000].map(Duration::from_millis) {
        let due = SystemTime::now() + delay;
        let id = t.queue.enqueue_at(b"later", due).unwrap();
        // Only claimers move it out of deferred/, whatever the time.
        let listed = dirq::admin::list(&t.queue, State::Deferred).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);
        assert!(listed[0].not_before.is_some());
        let ids: Vec<_> = t
            .queue
            .ids(State::Deferred)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, vec![id.clone()]);
        assert_eq!(
            dirq::admin::peek(&t.queue, &id).unwrap(),
            (State::Deferred, b"later".to_vec())
        );

        // Never claimable before its time.
        let early = t.queue.try_claim().unwrap();
        let blocked = SystemTime::now();
        let message = match early {
            Some(message) => message,
            // A blocked claimer wakes by itself when the message falls due: no event
            // marks it.
            None => t
                .queue
                .claim_timeout(Duration::from_secs(30))
                .unwrap()
                .expect("the delayed message in time"),
        };
        assert!(SystemTime::now() >= due, "claimed before its time");
        assert_eq!(message.id(), &id);
        message.commit().unwrap();
        if blocked < due {
            eprintln!("delayed message claimed {delay:?} after it was enqueued");
            // A time in the past delivers at once.
            t.queue.enqueue_at(b"now", SystemTime::UNIX_EPOCH).unwrap();
            assert_eq!(t.queue.counts().unwrap().incoming, 1);
            return;
        }
        eprintln!("the claimer began after the due time; again with a longer delay");
    }
    panic!("the claimer never began before the due time");
}

#[test]
fn held_messages_are_never_claimed_until_released() {
    let t = TestQueue::new();
    let held = t.queue.enqueue(b"held").unwrap();
    let other = t.queue.enqueue(b"other").unwrap();
    assert_eq!(dirq::admin::hold(&t.queue, &held).unwrap(), State::Incoming);
    let message = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(message.id(), &other);

    // A claimed message cannot be held.
    let err = dirq::admin::hold(&t.queue, &other).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ResourceBusy, "{err}");
    message.commit().unwrap();
    assert!(t.queue.try_claim().unwrap().is_none());
    assert_eq!(t.queue.counts().unwrap().hold, 1);
    assert_eq!(
        dirq::admin::hold(&t.queue, &other).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );

    dirq::admin::unhold(&t.queue, &held).unwrap();
    let message = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(message.id(), &held);
    message.commit().unwrap();

    // A deferred message can be held too (and loses its due time).
    let later = t
        .queue
        .enqueue_at(b"later", SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    assert_eq!(
        dirq::admin::hold(&t.queue, &later).unwrap(),
        State::Deferred
    );
    dirq::admin::unhold(&t.queue, &later).unwrap();
    assert_eq!(t.queue.try_claim().unwrap().unwrap().id(), &later);
}

#[test]
fn expired_messages_go_to_errors_instead_of_being_processed() {
    let t = TestQueue::new();
    // Its id says it was born in 2023: older than the maximum age, however fast or slow
    // the test runs.
    let old = MessageId::new("1700000000.000000001.test.1.00000001.msg").unwrap();
    t.queue.enqueue_with_id(&old, b"stale").unwrap();
    let strict = DirectoryQueue::builder(t.root())
        .max_age(Duration::from_secs(3600))
        .open()
        .unwrap();
    let fresh = t.queue.enqueue(b"fresh").unwrap();
    let message = strict.try_claim().unwrap().expect("the fresh message");
    assert_eq!(message.id(), &fresh);
    message.commit().unwrap();
    assert_eq!(strict.claim_stats().expired, 1);
    let failure = dirq::admin::failure(&strict, &old).unwrap().unwrap();
    assert_eq!(failure.reason.as_deref(), Some("expired"));
}

#[test]
fn attempts_show_in_listings() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"again and again").unwrap();
    for _ in 0..2 {
        t.queue.try_claim().unwrap().unwrap().release().unwrap();
    }
    let listed = dirq::admin::list(&t.queue, State::Incoming).unwrap();
    assert_eq!((&listed[0].id, listed[0].attempts), (&id, Some(2)));
    let message = t.queue.try_claim().unwrap().unwrap();
    let listed = dirq::admin::list(&t.queue, State::Pending).unwrap();
    assert_eq!(
        listed[0].attempts,
        Some(3),
        "a pending message counts its current claim"
    );
    assert_eq!(message.attempts().unwrap(), 3);
    message.fail("enough").unwrap();
    let listed = dirq::admin::list(&t.queue, State::Errors).unwrap();
    assert_eq!(listed[0].attempts, Some(3));
}

#[test]
fn a_forwarded_message_starts_the_next_queue_at_attempt_one() {
    let t = TestQueue::new();
    let next = t.sibling("next");
    t.queue.enqueue(b"hop").unwrap();
    t.queue.try_claim().unwrap().unwrap().release().unwrap();
    let message = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(message.attempts().unwrap(), 2);
    message.forward(&next).unwrap();
    assert_eq!(next.try_claim().unwrap().unwrap().attempts().unwrap(), 1);
}

#[test]
fn lifecycle_directories_are_optional_for_read_only_openers() {
    // A queue made by Mentat has no deferred/ or hold/; inspecting it must not create them.
    let dir = crate::util::tempdir();
    let root = dir.path().join("mentat-queue");
    for state in ["tmp", "incoming", "pending", "errors"] {
        std::fs::create_dir_all(root.join(state)).unwrap();
    }
    let queue = DirectoryQueue::builder(&root).create(false).open().unwrap();
    assert_eq!(queue.counts().unwrap(), dirq::queue::Counts::default());
    assert!(dirq::admin::list(&queue, State::Deferred)
        .unwrap()
        .is_empty());
    assert!(!root.join("deferred").exists() && !root.join("hold").exists());
    let id = dirq::MessageId::new("m.msg").unwrap();
    assert!(matches!(
        dirq::admin::hold(&queue, &id),
        Err(Error::Layout { .. })
    ));
}

/// Regression: `try_claim` returned `None` right after the same thread released the only
/// message, when another thread was spawning a process at that moment. The child's copy
/// of the descriptor table kept the released message's `flock` until its `exec`, so the
/// message looked owned. Spawning is what the test harness's other tests (and any
/// Piper running commands) do all the time.
#[test]
fn a_released_message_is_claimable_while_another_thread_spawns_processes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let t = TestQueue::new();
    let id = t.queue.enqueue(b"again").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let spawner = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut spawned = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let status = std::process::Command::new("true")
                    .status()
                    .expect("run true");
                assert!(status.success());
                spawned += 1;
            }
            spawned
        })
    };
    let mut missed = 0;
    let rounds = 500;
    for _ in 0..rounds {
        match t.queue.try_claim().unwrap() {
            Some(message) => message.release().unwrap(),
            None => {
                missed += 1;
                // Still there, and claimable once the child has exec'd.
                wait_for_claim(&t.queue).release().unwrap();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let spawned = spawner.join().unwrap();
    assert!(spawned > 0, "no process was spawned during the claims");
    assert_eq!(
        missed, 0,
        "try_claim missed the released message {missed} times in {rounds} \
         while {spawned} processes were spawned"
    );
    let message = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(message.id(), &id);
    assert_eq!(message.attempts().unwrap(), rounds + 1);
    message.commit().unwrap();
}
