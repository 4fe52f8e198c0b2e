//! The async API (`dirq::aio`, feature `tokio`): the sync tests' mirror, wake-ups by
//! another process, many idle claimers on few threads, and cancellation under load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirq::aio::{AsyncMessage, AsyncQueue};
use dirq::queue::Retried;
use dirq::{DirectoryQueue, Durability, MessageId, State};

use crate::util::{run_with_input, wait_until, TestQueue};

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn async_queue(t: &TestQueue) -> AsyncQueue {
    AsyncQueue::from(t.queue.clone())
}

/// `t`'s queue opened again in `Durability::None`: no syncs, and on a multi-thread
/// runtime its file work runs in place.
fn unsynced(t: &TestQueue) -> DirectoryQueue {
    DirectoryQueue::builder(t.root())
        .durability(Durability::None)
        .open()
        .unwrap()
}

/// `t`'s queue opened again with an hour-long rescan: only an event or a due time can
/// wake its claimers within a test.
fn without_rescan(t: &TestQueue) -> DirectoryQueue {
    DirectoryQueue::builder(t.root())
        .rescan_interval(Duration::from_secs(3600))
        .open()
        .unwrap()
}

/// Threads of this process now (`Threads:` of /proc/self/status).
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Threads of this process named `name` (their `comm`): a runtime's threads, its
/// blocking pool included, apart from those of the other tests running beside.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[test]
fn enqueue_claim_commit_round_trip() {
    let t = TestQueue::new();
    let q = async_queue(&t);
    current_thread().block_on(async {
        let id = q.enqueue(b"hello".to_vec()).await.unwrap();
        let message = q.claim().await.unwrap();
        assert_eq!(message.id(), &id);
        assert_eq!(message.bytes().await.unwrap(), b"hello");
        assert_eq!(message.attempts().await.unwrap(), 1);
        assert_eq!(t.names(State::Pending), [id.to_string()]);
        message.commit().await.unwrap();
    });
    assert!(t.names(State::Pending).is_empty());
    assert!(t.names(State::Incoming).is_empty());
}

#[test]
fn claims_oldest_first_and_batches_keep_order() {
    let t = TestQueue::new();
    let q = async_queue(&t);
    current_thread().block_on(async {
        let ids = q
            .enqueue_batch((0..20).map(|i| format!("m{i}")).collect::<Vec<_>>())
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Some(message) = q.try_claim().await.unwrap() {
            assert_eq!(
                message.bytes().await.unwrap(),
                format!("m{}", seen.len()).as_bytes()
            );
            seen.push(message.id().clone());
            message.commit().await.unwrap();
        }
        assert_eq!(seen, ids);
    });
}

#[test]
fn forward_to_an_async_or_a_sync_queue_keeps_the_id() {
    let t = TestQueue::new();
    let q = async_queue(&t);
    let next_sync = t.sibling("next-sync");
    let next_async = AsyncQueue::from(t.sibling("next-async"));
    current_thread().block_on(async {
        let a = q.enqueue(b"a".to_vec()).await.unwrap();
        let b = q.enqueue(b"b".to_vec()).await.unwrap();
        q.claim().await.unwrap().forward(&next_async).await.unwrap();
        q.claim().await.unwrap().forward(&next_sync).await.unwrap();
        assert_eq!(next_async.claim().await.unwrap().id(), &a);
        assert_eq!(next_sync.count(State::Incoming).unwrap(), 1);
        assert_eq!(next_sync.try_claim().unwrap().unwrap().id(), &b);
    });
}

#[test]
fn fail_writes_the_sidecar_with_the_reason() {
    let t = TestQueue::new();
    let q = async_queue(&t);
    let id = current_thread().block_on(async {
        let id = q.enqueue(b"bad".to_vec()).await.unwrap();
        q.claim().await.unwrap().fail("cannot parse").await.unwrap();
        id
    });
    assert_eq!(
        t.names(State::Errors),
        [id.to_string(), format!("{id}.meta")]
    );
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path(State::Errors).join(format!("{id}.meta"))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["reason"], "cannot parse");
    assert_eq!(meta["attempts"], 1);
}

#[test]
fn retry_defers_and_release_returns_counting_attempts() {
    let t = TestQueue::new();
    let q = async_queue(&t);
    current_thread().block_on(async {
        let id = q.enqueue(b"again".to_vec()).await.unwrap();
        q.claim().await.unwrap().release().await.unwrap();
        assert_eq!(t.names(State::Incoming), [id.to_string()]);
        let message = q.claim().await.unwrap();
        assert_eq!(message.attempts().await.unwrap(), 2);
        match message.retry("busy").await.unwrap() {
            Retried::Deferred(_) => {}
            other => panic!("expected a deferral, got {other:?}"),
        }
        assert!(t.names(State::Incoming).is_empty());
        assert!(t.names(State::Pending).is_empty());
        assert_eq!(t.queue.count(State::Deferred).unwrap(), 1);
    });
}

#[test]
fn json_delayed_enqueue_fail_with_and_retry_at() {
    let t = TestQueue::new();
    let q = async_queue(&t);
    current_thread().block_on(async {
        let id = q
            .enqueue_json(&serde_json::json!({"user": "alice"}))
            .await
            .unwrap();
        let message = q.claim().await.unwrap();
        assert_eq!(message.id(), &id);
        let value: serde_json::Value = message.json().await.unwrap();
        assert_eq!(value["user"], "alice");
        let later = std::time::SystemTime::now() + Duration::from_secs(3600);
        message.retry_at("later", later).await.unwrap();
        assert_eq!(t.queue.count(State::Deferred).unwrap(), 1);

        q.enqueue_at(b"soon".to_vec(), std::time::SystemTime::now())
            .await
            .unwrap();
        let message = q
            .claim_deadline(Instant::now() + Duration::from_secs(20))
            .await
            .unwrap()
            .expect("the message due now");
        assert_eq!(message.bytes().await.unwrap(), b"soon");
        message
            .fail_with("no", dirq::queue::FailureDetails::default())
            .await
            .unwrap();
        assert_eq!(t.queue.count(State::Errors).unwrap(), 1);
    });
}

#[test]
fn claim_timeout_returns_none_on_an_empty_queue() {
    let t = TestQueue::new();
    let q = async_queue(&t);
    current_thread().block_on(async {
        let start = Instant::now();
        let claimed = q.claim_timeout(Duration::from_millis(200)).await.unwrap();
        assert!(claimed.is_none());
        assert!(start.elapsed() >= Duration::from_millis(200));
    });
}

#[test]
fn idle_claimer_is_woken_by_another_process_push() {
    let t = TestQueue::new();
    // An hour-long rescan: only the inotify event, through the reactor, can wake the
    // claimer before the deadline.
    let claimer = without_rescan(&t);
    let stats = claimer.clone();
    let q = AsyncQueue::from(claimer);
    let root = t.root().to_str().unwrap().to_owned();
    current_thread().block_on(async move {
        let waiting = tokio::spawn(async move { q.claim_timeout(Duration::from_secs(60)).await });
        let scanned = tokio::task::spawn_blocking(move || {
            wait_until(Duration::from_secs(10), "the claimer's first scan", || {
                stats.claim_stats().scans >= 1
            });
        });
        scanned.await.unwrap();
        let start = Instant::now();
        let pushed = tokio::task::spawn_blocking(move || run_with_input(&["push", &root], b"wake"));
        assert!(pushed.await.unwrap().status.success());
        let message = waiting
            .await
            .unwrap()
            .unwrap()
            .expect("woken with a message");
        assert!(start.elapsed() < Duration::from_secs(30));
        assert_eq!(message.bytes().await.unwrap(), b"wake");
        message.commit().await.unwrap();
    });
}

#[test]
fn idle_claimer_wakes_when_a_deferred_message_falls_due() {
    let t = TestQueue::new();
    // No event announces a due time and the rescan is an hour away: only next_wake can
    // bring the claimer back in time.
    let q = AsyncQueue::from(without_rescan(&t));
    let due = std::time::SystemTime::now() + Duration::from_millis(300);
    let id = t.queue.enqueue_at(b"later", due).unwrap();
    current_thread().block_on(async {
        let start = Instant::now();
        let message = q
            .claim_timeout(Duration::from_secs(20))
            .await
            .unwrap()
            .expect("the deferred message, once due");
        assert_eq!(message.id(), &id);
        assert!(start.elapsed() < Duration::from_secs(10));
        message.commit().await.unwrap();
    });
}

/// Regression guard for the herd's skipped looks: a look that found the queue empty
/// must not make a later claim miss what arrived since.
#[test]
fn a_claim_after_an_empty_look_sees_what_arrived_since() {
    let t = TestQueue::new();
    let q = AsyncQueue::from(without_rescan(&t));
    current_thread().block_on(async {
        for round in 0..20 {
            let empty = q.claim_timeout(Duration::from_millis(5)).await.unwrap();
            assert!(empty.is_none(), "round {round}");
            let id = t.queue.enqueue(format!("{round}")).unwrap();
            let start = Instant::now();
            let message = q
                .claim_timeout(Duration::from_secs(20))
                .await
                .unwrap()
                .expect("the new message");
            assert!(start.elapsed() < Duration::from_secs(10), "round {round}");
            assert_eq!(message.id(), &id);
            message.commit().await.unwrap();
        }
    });
}

#[test]
fn dropped_message_goes_back_to_incoming() {
    let t = TestQueue::new();
    dropped_message_is_released(&t, async_queue(&t));
}

/// The same without syncs.
#[test]
fn dropped_message_goes_back_to_incoming_without_syncs() {
    let t = TestQueue::new();
    let queue = unsynced(&t);
    dropped_message_is_released(&t, AsyncQueue::from(queue));
}

fn dropped_message_is_released(t: &TestQueue, q: AsyncQueue) {
    let id = current_thread().block_on(async {
        let id = q.enqueue(b"dropped".to_vec()).await.unwrap();
        let message = q.claim().await.unwrap();
        drop(message);
        id
    });
    // The release ran on the blocking pool, or where the runtime's shutdown dropped it.
    wait_until(Duration::from_secs(10), "the release", || {
        t.names(State::Incoming) == [id.to_string()]
    });
    assert!(t.names(State::Pending).is_empty());
    let again = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(again.attempts().unwrap(), 2, "the drop counted the attempt");
    again.commit().unwrap();
}

#[test]
fn messages_stream_yields_claims_in_order() {
    use std::future::poll_fn;
    use std::pin::Pin;

    use futures_core::Stream;

    let t = TestQueue::new();
    let q = async_queue(&t);
    current_thread().block_on(async {
        let ids = q.enqueue_batch(vec![b"1", b"2", b"3"]).await.unwrap();
        let mut stream = q.messages();
        for id in &ids {
            let message: AsyncMessage = poll_fn(|cx| Pin::new(&mut stream).poll_next(cx))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(message.id(), id);
            message.commit().await.unwrap();
        }
    });
}

/// A thousand idle claimers on one thread: no thread per waiter, and every one gets a
/// message once they arrive.
#[test]
fn a_thousand_waiting_claimers_use_few_threads() {
    const CLAIMERS: usize = 1000;
    let t = TestQueue::new();
    let q = async_queue(&t);
    // Named, so that its threads (the blocking pool's included) can be told from
    // those of the other tests of this binary, running beside this one.
    const NAME: &str = "aio-thousand";
    // The blocking pool is capped well below the number of claimers: a design that
    // parked a pool thread per waiting claimer could then not get all of them served
    // (the 60 s timeout below fails), and the count after the commits does not depend
    // on how slow a loaded machine makes each fsync (tokio's default cap is 512).
    const POOL: usize = 64;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name(NAME)
        .max_blocking_threads(POOL)
        .enable_all()
        .build()
        .unwrap();
    let process_before = threads();
    runtime.block_on(async {
        let mut claimers = Vec::new();
        for _ in 0..CLAIMERS {
            let q = q.clone();
            claimers.push(tokio::spawn(async move {
                let message = q.claim().await.unwrap();
                let id = message.id().clone();
                message.commit().await.unwrap();
                id
            }));
        }
        // Let every claimer look once and go to sleep (it does not matter for
        // correctness when the messages come; this is to count the sleepers' threads).
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The blocking pool's threads that ran the first looks: at most one per lane
        // (4), since a claimer that gets its lane after another's look found the queue
        // empty skips its own (3 or 4 measured with both cores busy; 12 to 27 before
        // that skip). The runtime's own thread is the test's, not named.
        let waiting = threads_named(NAME);
        eprintln!(
            "{CLAIMERS} waiting claimers: {waiting} runtime threads, process {process_before} -> {}",
            threads()
        );
        assert!(
            waiting <= 8,
            "{CLAIMERS} waiting claimers took {waiting} threads"
        );
        let producer = AsyncQueue::from(DirectoryQueue::open(t.root()).unwrap());
        let ids = producer
            .enqueue_batch((0..CLAIMERS).map(|i| i.to_string()).collect::<Vec<_>>())
            .await
            .unwrap();
        let mut claimed = Vec::new();
        for claimer in claimers {
            claimed.push(
                tokio::time::timeout(Duration::from_secs(60), claimer)
                    .await
                    .expect("every claimer gets a message")
                    .unwrap(),
            );
        }
        claimed.sort();
        let mut ids = ids;
        ids.sort();
        assert_eq!(claimed, ids);
        // Commits use the blocking pool too, a thread per fsync under way, up to the
        // cap: every claimer was served by far fewer threads than claimers.
        let working = threads_named(NAME);
        eprintln!("after {CLAIMERS} claims and commits: {working} runtime threads");
        assert!(
            working <= POOL,
            "{working} threads while the claimers worked"
        );
    });
}

/// A small PRNG for the cancellation test (xorshift; the seed is printed on failure).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Claims cancelled at random points (timeouts, races against a timer, aborted tasks)
/// while producers enqueue: every message is committed exactly once, and nothing is
/// left in `pending/` or `incoming/`.
#[test]
fn cancelled_claims_never_lose_or_strand_a_message() {
    let t = TestQueue::new();
    cancel_claims_at_random(&t.queue);
}

/// The same without syncs, where claims and releases are fastest and so race most.
#[test]
fn cancelled_claims_never_lose_or_strand_a_message_without_syncs() {
    let t = TestQueue::new();
    let queue = unsynced(&t);
    cancel_claims_at_random(&queue);
}

/// Without syncs, on a multi-thread runtime, the file work runs in place
/// (`block_in_place`) and never makes the task wait: a task looping over round trips
/// must still let the other tasks of its only worker run.
#[test]
fn in_place_file_work_lets_other_tasks_run() {
    const ROUNDS: usize = 3_000;
    let t = TestQueue::new();
    let queue = unsynced(&t);
    let q = AsyncQueue::from(queue);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticks_during = runtime.block_on(async {
        let ticker = {
            let ticks = Arc::clone(&ticks);
            tokio::spawn(async move {
                loop {
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        let ticks = Arc::clone(&ticks);
        let ticked = move || ticks.load(std::sync::atomic::Ordering::Relaxed);
        let rounds = tokio::spawn(async move {
            // Enqueues, then commits: neither waits on anything but its file work.
            let start = ticked();
            let mut ids = Vec::new();
            for i in 0..ROUNDS {
                ids.push(q.enqueue(format!("round {i}")).await.unwrap());
            }
            let during_enqueues = ticked() - start;
            let mut messages = Vec::new();
            for id in &ids {
                let message = q.try_claim().await.unwrap().expect("a message");
                assert_eq!(message.id(), id);
                messages.push(message);
            }
            let start = ticked();
            for message in messages {
                message.commit().await.unwrap();
            }
            (during_enqueues, ticked() - start)
        });
        let during = rounds.await.unwrap();
        ticker.abort();
        during
    });
    assert!(
        ticks_during.0 > 0 && ticks_during.1 > 0,
        "the other task of the worker starved while {ROUNDS} enqueues and commits ran \
         in place: it ran {ticks_during:?} times"
    );
    assert!(t.names(State::Incoming).is_empty());
    assert!(t.names(State::Pending).is_empty());
}

fn cancel_claims_at_random(queue: &DirectoryQueue) {
    const MESSAGES: usize = 400;
    const CONSUMERS: u64 = 8;
    let q = AsyncQueue::from(queue.clone());
    let committed: Arc<Mutex<HashMap<MessageId, usize>>> = Arc::default();
    // Messages claimed more than once: released by a cancelled claim (or a drop).
    let released = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let produced = runtime.block_on(async {
        let producer = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for round in 0..MESSAGES / 10 {
                    let batch: Vec<String> = (0..10).map(|i| format!("{round}-{i}")).collect();
                    ids.extend(q.enqueue_batch(batch).await.unwrap());
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
                ids
            })
        };
        let mut consumers = Vec::new();
        for c in 0..CONSUMERS {
            let q = q.clone();
            let committed = Arc::clone(&committed);
            let released = Arc::clone(&released);
            consumers.push(tokio::spawn(async move {
                let mut rng = Rng(seed.wrapping_mul(c + 1) | 1);
                let deadline = Instant::now() + Duration::from_secs(120);
                while committed.lock().unwrap().len() < MESSAGES {
                    assert!(Instant::now() < deadline, "stuck; seed {seed}");
                    let tiny = Duration::from_micros(rng.below(3000));
                    let claimed = match rng.below(3) {
                        0 => tokio::time::timeout(tiny, q.claim())
                            .await
                            .ok()
                            .map(Result::unwrap),
                        1 => {
                            let claim = q.claim();
                            let timer = tokio::time::sleep(tiny);
                            tokio::pin!(claim, timer);
                            std::future::poll_fn(|cx| {
                                use std::future::Future;
                                use std::task::Poll;
                                if let Poll::Ready(m) = claim.as_mut().poll(cx) {
                                    return Poll::Ready(Some(m.unwrap()));
                                }
                                timer.as_mut().poll(cx).map(|()| None)
                            })
                            .await
                        }
                        _ => {
                            let task = {
                                let q = q.clone();
                                tokio::spawn(async move { q.claim().await })
                            };
                            tokio::time::sleep(tiny).await;
                            task.abort();
                            match task.await {
                                Ok(m) => Some(m.unwrap()),
                                Err(e) => {
                                    assert!(e.is_cancelled(), "{e}");
                                    None
                                }
                            }
                        }
                    };
                    if let Some(message) = claimed {
                        if message.attempts().await.unwrap() > 1 {
                            released.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        let id = message.id().clone();
                        message.commit().await.unwrap();
                        *committed.lock().unwrap().entry(id).or_default() += 1;
                    }
                }
            }));
        }
        for consumer in consumers {
            consumer.await.unwrap();
        }
        producer.await.unwrap()
    });
    drop(runtime);
    let committed = committed.lock().unwrap();
    assert_eq!(committed.len(), MESSAGES, "seed {seed}");
    for id in &produced {
        assert_eq!(
            committed.get(id),
            Some(&1),
            "{id} committed once; seed {seed}"
        );
    }
    queue.recover().unwrap();
    let counts = queue.counts().unwrap();
    assert_eq!((counts.incoming, counts.pending), (0, 0), "seed {seed}");
    eprintln!(
        "{MESSAGES} messages, {} claimed again after a cancelled claim released them",
        released.load(std::sync::atomic::Ordering::Relaxed)
    );
}
