//! Measures how fast an idle Piper wakes up, and what it costs to wait:
//! `cargo run --release --example wakeup [-- --dir DIR] [--samples N] [--idle-secs S]`.
//!
//! 1. Wake-up latency: a Piper with one worker waits on an empty queue; a message is
//!    enqueued after a random pause (so the worker is asleep), and the time from the
//!    enqueue's return (the acknowledgement) to the start of the stage is recorded.
//!    Prints p50, p90, p99 and the maximum.
//! 2. Idle cost: the same Piper waits on the empty queue for a while; prints the CPU
//!    time the process used meanwhile, as a share of one core.
//!
//! The last line is a JSON summary.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use dirq::piper::{Outcome, Piper, StageResult};
use dirq::{DirectoryQueue, Durability, Message, MessageId};

fn option<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User plus system CPU time of this process, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // Clock ticks are 1/100 s on Linux.
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let samples: usize = option(&args, "--samples", 1000);
    let idle_secs: u64 = option(&args, "--idle-secs", 10);
    let scratch = tempfile::tempdir()?;
    let root = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map_or_else(
            || scratch.path().join("q"),
            |d| std::path::PathBuf::from(d).join("wakeup-q"),
        );
    let queue = DirectoryQueue::builder(&root)
        .durability(Durability::None)
        .open()?;

    let acknowledged: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
    let (tx, rx) = mpsc::channel();
    let tx = Arc::new(Mutex::new(tx));
    let acks = Arc::clone(&acknowledged);
    let piper = Piper::builder("wakeup")
        .input(&queue)
        .workers(1)
        .advertise(false)
        .stage(move |m: &Message| -> StageResult {
            let started = Instant::now();
            let acked = acks.lock().map_err(|_| "poisoned")?.remove(m.id());
            if let Some(acked) = acked {
                tx.lock().map_err(|_| "poisoned")?.send(started - acked)?;
            }
            Ok(Outcome::Commit)
        })
        .build()?;
    let handle = piper.handle();
    let runner = std::thread::spawn(move || piper.run());

    let mut latencies = Vec::with_capacity(samples);
    let mut gap = 0x9e37_79b9u64;
    for _ in 0..samples + 10 {
        // 2 to 20 ms: long enough for the worker to fall asleep.
        gap ^= gap << 13;
        gap ^= gap >> 7;
        gap ^= gap << 17;
        std::thread::sleep(Duration::from_millis(2 + gap % 19));
        let mut acks = acknowledged.lock().map_err(|_| "poisoned")?;
        let id = queue.enqueue(b"wake up")?;
        acks.insert(id, Instant::now());
        drop(acks);
        latencies.push(rx.recv_timeout(Duration::from_secs(10))?);
    }
    latencies.drain(..10); // warm-up: the first wait adds the watch
    latencies.sort();
    let (p50, p90, p99, max) = (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        *latencies.last().ok_or("no samples")?,
    );
    println!(
        "wake-up latency, enqueue acknowledged -> stage starts, {samples} samples: \
         p50 {p50:?}, p90 {p90:?}, p99 {p99:?}, max {max:?}"
    );

    let before = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (cpu, wall) = (cpu_time() - before.0, before.1.elapsed());
    let share = cpu.as_secs_f64() / wall.as_secs_f64() * 100.0;
    println!("idle Piper on an empty queue: {cpu:?} of CPU in {wall:.1?} = {share:.3} % of a core");

    handle.shutdown();
    runner.join().map_err(|_| "the piper panicked")??;
    println!(
        "{}",
        serde_json::json!({
            "samples": samples, "p50_us": p50.as_micros(), "p90_us": p90.as_micros(),
            "p99_us": p99.as_micros(), "max_us": max.as_micros(),
            "idle_cpu_percent": share, "idle_secs": wall.as_secs_f64(),
        })
    );
    Ok(())
}
