//! The async API against the sync one, each ratio measured in the same run (issue 15
//! point 5; figures in `docs/performance.md`):
//!
//! 1. **Slow stage**: a Piper whose stage waits 10 ms per message, as an async stage
//!    (`tokio::time::sleep`, 256 in flight, one worker) and as a sync stage
//!    (`thread::sleep`, 4 workers): messages per second of each, and the CPU time each
//!    used (from `/proc/self/stat`). Target: async ≥ 20x.
//! 2. **Wake-up**: an idle claimer, woken by an enqueue from another thread after a
//!    random pause; the time from the enqueue's return to the claim's return, sync
//!    (`claim`, a parked thread) and async (`AsyncQueue::claim` on a multi-threaded
//!    runtime), samples interleaved. Target: async p99 ≤ 1.5x sync p99.
//! 3. **Round trip**: enqueue, claim and commit, one after another, in one thread
//!    (sync) and in one task (async), for each durability mode; then the same with 8
//!    threads against 8 tasks; the two sides take turns in 10 slices. Target: async
//!    ≥ 0.8x sync.
//!
//! ```text
//! cargo bench --features tokio --bench async               # everything
//! cargo bench --features tokio --bench async -- roundtrip  # sections whose name matches
//! ```
//!
//! Queues live under the target directory; durable rounds measure its fsync.

use std::future::Future;
use std::time::{Duration, Instant};

use dirq::aio::AsyncQueue;
use dirq::piper::{AsyncStage, Outcome, Piper, StageResult};
use dirq::{DirectoryQueue, Durability, Message};

mod common;

use common::{queue, scratch};

const PAYLOAD: &[u8; 200] = &[b'x'; 200];
const STAGE_WAIT: Duration = Duration::from_millis(10);

fn main() {
    // `cargo bench` passes `--bench`; the other arguments select sections.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f));
    println!(
        "async bench: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    if wanted("stage") {
        slow_stage();
    }
    if wanted("wakeup") {
        wakeup();
    }
    if wanted("roundtrip") {
        for durability in [Durability::None, Durability::Batch, Durability::Full] {
            roundtrip(durability);
        }
    }
}

/// The 1-minute load average, to say how busy the machine was.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let first = text.split_whitespace().next().unwrap_or("?");
    format!("load average {first} at start")
}

/// User plus system CPU time of this process so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime, the 14th and 15th fields (the 12th and 13th after the name).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // Clock ticks are 1/100 s on Linux.
    Duration::from_millis(ticks * 10)
}

struct AsyncWait;

impl AsyncStage for AsyncWait {
    async fn process(&self, _message: &Message) -> StageResult {
        tokio::time::sleep(STAGE_WAIT).await;
        Ok(Outcome::Commit)
    }
}

/// Runs `piper` until it has committed `count` messages of `input`; messages per second
/// and CPU seconds used.
fn drive(builder: &mut dirq::piper::PiperBuilder, count: u64) -> (f64, f64) {
    let piper = builder.build().expect("build the piper");
    let handle = piper.handle();
    let cpu = cpu_time();
    let start = Instant::now();
    let runner = std::thread::spawn(move || piper.run());
    let deadline = Instant::now() + Duration::from_secs(300);
    while handle.stats().committed < count {
        assert!(
            Instant::now() < deadline,
            "the piper stalled: {:?}",
            handle.stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu).as_secs_f64();
    handle.shutdown();
    runner
        .join()
        .expect("the piper thread")
        .expect("the piper ran");
    (count as f64 / seconds, cpu)
}

fn filled(name: &str, count: u64) -> DirectoryQueue {
    let q = queue(&scratch(name), Durability::None);
    let mut left = count;
    while left > 0 {
        let n = left.min(1000);
        q.enqueue_batch(vec![PAYLOAD.as_slice(); n as usize])
            .expect("fill");
        left -= n;
    }
    q
}

fn slow_stage() {
    const SYNC_MESSAGES: u64 = 800;
    const ASYNC_MESSAGES: u64 = 20_000;
    println!("\n## stage: 10 ms per message (Durability::None queues)");
    let input = filled("async-stage-sync", SYNC_MESSAGES);
    let (sync_rate, sync_cpu) = drive(
        Piper::builder("sync")
            .input(&input)
            .advertise(false)
            .history(false)
            .workers(4)
            .stage(|_: &Message| -> StageResult {
                std::thread::sleep(STAGE_WAIT);
                Ok(Outcome::Commit)
            }),
        SYNC_MESSAGES,
    );
    let input = filled("async-stage-async", ASYNC_MESSAGES);
    let (async_rate, async_cpu) = drive(
        Piper::builder("async")
            .input(&input)
            .advertise(false)
            .history(false)
            .async_stage(AsyncWait, 256),
        ASYNC_MESSAGES,
    );
    println!(
        "sync, 4 workers:        {sync_rate:>8.0} msg/s, {sync_cpu:.2} CPU s for {SYNC_MESSAGES} \
         ({:.0} µs CPU per message)",
        sync_cpu * 1e6 / SYNC_MESSAGES as f64
    );
    println!(
        "async, 256 in flight:   {async_rate:>8.0} msg/s, {async_cpu:.2} CPU s for {ASYNC_MESSAGES} \
         ({:.0} µs CPU per message)",
        async_cpu * 1e6 / ASYNC_MESSAGES as f64
    );
    verdict(
        "async / sync messages per second",
        async_rate / sync_rate,
        ">=",
        20.0,
    );
}

fn verdict(what: &str, ratio: f64, op: &str, target: f64) {
    let met = if op == ">=" {
        ratio >= target
    } else {
        ratio <= target
    };
    println!(
        "RATIO {what}: {ratio:.2} (target {op} {target}: {})",
        if met { "met" } else { "MISSED" }
    );
}

/// A pause the waiter is surely asleep through, varied so that the enqueue falls at
/// any point of the waiter's sleep.
fn pause(i: usize) -> Duration {
    Duration::from_micros(3_000 + (i as u64 * 7_919) % 7_000)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let rank = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[rank]
}

fn wakeup() {
    const SAMPLES: usize = 300;
    println!("\n## wakeup: enqueue's return to claim's return, {SAMPLES} samples each");
    let sync_q = queue(&scratch("async-wake-sync"), Durability::None);
    let async_q = queue(&scratch("async-wake-async"), Durability::None);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let aq = AsyncQueue::from(async_q.clone());
    let mut sync_samples = Vec::with_capacity(SAMPLES);
    let mut async_samples = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        // Sync: a thread parked in claim().
        let waiter = {
            let q = sync_q.clone();
            std::thread::spawn(move || {
                let message = q.claim().expect("claim");
                let at = Instant::now();
                message.commit().expect("commit");
                at
            })
        };
        std::thread::sleep(pause(i));
        sync_q.enqueue(PAYLOAD).expect("enqueue");
        let enqueued = Instant::now();
        let claimed = waiter.join().expect("the sync waiter");
        sync_samples.push(claimed.saturating_duration_since(enqueued));

        // Async: a task waiting in AsyncQueue::claim().
        let waiter = {
            let aq = aq.clone();
            runtime.spawn(async move {
                let message = aq.claim().await.expect("claim");
                let at = Instant::now();
                message.commit().await.expect("commit");
                at
            })
        };
        std::thread::sleep(pause(i + 1));
        async_q.enqueue(PAYLOAD).expect("enqueue");
        let enqueued = Instant::now();
        let claimed = runtime.block_on(waiter).expect("the async waiter");
        async_samples.push(claimed.saturating_duration_since(enqueued));
    }
    let report = |name: &str, samples: &mut Vec<Duration>| {
        let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
        println!(
            "{name}: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            samples.last().map_or(0.0, |d| d.as_secs_f64() * 1e6)
        );
        p99
    };
    let sync_p99 = report("sync  claim()", &mut sync_samples);
    let async_p99 = report("async claim()", &mut async_samples);
    verdict(
        "async / sync wake-up p99",
        async_p99.as_secs_f64() / sync_p99.as_secs_f64(),
        "<=",
        1.5,
    );
}

/// Enqueue, claim, commit, `rounds` times in a row on `q`.
fn sync_rounds(q: &DirectoryQueue, rounds: usize) {
    for _ in 0..rounds {
        q.enqueue(PAYLOAD).expect("enqueue");
        let message = q.try_claim().expect("claim").expect("a message");
        message.commit().expect("commit");
    }
}

async fn async_rounds(q: &AsyncQueue, rounds: usize) {
    for _ in 0..rounds {
        q.enqueue(PAYLOAD).await.expect("enqueue");
        let message = q.try_claim().await.expect("claim").expect("a message");
        message.commit().await.expect("commit");
    }
}

/// Seconds taken by `tasks` concurrent loops of `rounds` round trips in all, sync
/// (threads) and async (tasks on a 2-thread runtime), each on a queue of its own. The
/// machine is shared and its load changes by the second: the two sides take turns in
/// `slices` short runs, going first in turn.
fn roundtrip_pair(durability: Durability, tasks: usize, rounds: usize) -> (f64, f64) {
    const SLICES: usize = 10;
    let name = format!("{durability:?}").to_lowercase();
    let sync_q = queue(&scratch(&format!("async-rt-sync-{name}")), durability);
    let async_q = AsyncQueue::from(queue(
        &scratch(&format!("async-rt-async-{name}")),
        durability,
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    // Warm-up: directories, the blocking pool, page cache.
    sync_rounds(&sync_q, rounds / 10 + 1);
    runtime.block_on(async_rounds(&async_q, rounds / 10 + 1));

    let per_task = rounds / tasks / SLICES;
    let run_sync = || {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..tasks {
                s.spawn(|| sync_rounds(&sync_q, per_task));
            }
        });
        start.elapsed().as_secs_f64()
    };
    let run_async = || {
        let start = Instant::now();
        runtime.block_on(join_all((0..tasks).map(|_| {
            let q = async_q.clone();
            async move { async_rounds(&q, per_task).await }
        })));
        start.elapsed().as_secs_f64()
    };
    let (mut sync_seconds, mut async_seconds) = (0.0, 0.0);
    for slice in 0..SLICES {
        if slice % 2 == 0 {
            sync_seconds += run_sync();
            async_seconds += run_async();
        } else {
            async_seconds += run_async();
            sync_seconds += run_sync();
        }
    }
    let messages = (per_task * tasks * SLICES) as f64;
    (messages / sync_seconds, messages / async_seconds)
}

/// Runs the futures as tasks and waits for all.
async fn join_all<F>(futures: impl Iterator<Item = F>)
where
    F: Future<Output = ()> + Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    for handle in handles {
        handle.await.expect("a task");
    }
}

fn roundtrip(durability: Durability) {
    let rounds = match durability {
        Durability::None => 20_000,
        Durability::Batch => 2_000,
        _ => 800,
    };
    println!("\n## roundtrip: enqueue + claim + commit, {durability:?}");
    for tasks in [1, 8] {
        let (sync_rate, async_rate) = roundtrip_pair(durability, tasks, rounds);
        println!(
            "{tasks} {}: sync {sync_rate:>8.0} msg/s, async {async_rate:>8.0} msg/s",
            if tasks == 1 {
                "thread/task "
            } else {
                "threads/tasks"
            }
        );
        verdict(
            &format!("async / sync round trips, {durability:?}, {tasks} at once"),
            async_rate / sync_rate,
            ">=",
            0.8,
        );
    }
}
