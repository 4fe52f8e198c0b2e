//! What the history journal costs a pipeline: a Piper committing 20,000 messages with
//! its history on and off, measured alternately in the same run, and the ratio.
//!
//! ```text
//! cargo bench --bench history
//! ```
//!
//! Durability none, on tmpfs (`/dev/shm`) when there is one: the fastest pipeline,
//! where one more `write(2)` per message weighs most. Two workers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dirq::piper::{Outcome, Piper, StageResult};
use dirq::{DirectoryQueue, Durability, Message};

mod common;

const MESSAGES: u64 = 20_000;
const ROUNDS: usize = 5;

/// A scratch directory on tmpfs when there is one, else under the target directory.
fn scratch() -> (PathBuf, Option<tempfile::TempDir>) {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("dirq-bench-history-")
            .tempdir_in(shm)
        {
            return (dir.path().to_path_buf(), Some(dir));
        }
    }
    (common::scratch("history"), None)
}

fn fill(queue: &DirectoryQueue, n: u64) {
    let payload = [b'x'; 200];
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        queue
            .enqueue_batch((0..k).map(|_| payload.as_slice()))
            .expect("fill");
        left -= k;
    }
}

/// Commits `n` messages (already in `queue`) with one Piper; the time it took.
fn run_piper(queue: &DirectoryQueue, n: u64, history: bool) -> Duration {
    let piper = Piper::builder("bench")
        .input(queue)
        .workers(2)
        .advertise(false)
        .history(history)
        .stage(|m: &Message| -> StageResult {
            std::hint::black_box(m.id());
            Ok(Outcome::Commit)
        })
        .build()
        .expect("build a Piper");
    let handle = piper.handle();
    let start = Instant::now();
    let runner = std::thread::spawn(move || piper.run());
    while handle.stats().committed < n {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed();
    handle.shutdown();
    runner.join().expect("the Piper panicked").expect("Piper");
    elapsed
}

fn history_cost(c: &mut Criterion) {
    let (root, _guard) = scratch();
    let queue = common::queue(&root.join("q"), Durability::None);
    let mut group = c.benchmark_group("history");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for history in [false, true] {
        let label = if history { "on" } else { "off" };
        group.bench_with_input(
            BenchmarkId::new("piper commit", label),
            &history,
            |b, &h| {
                b.iter_custom(|iters| {
                    fill(&queue, iters);
                    run_piper(&queue, iters, h)
                });
            },
        );
    }
    group.finish();

    // The figure docs/performance.md quotes: whole runs of 20,000 messages, on and off
    // alternately (so that drift of a shared machine hits both), median of each.
    let _ = std::fs::remove_dir_all(root.join("q/history"));
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for history in [false, true] {
            fill(&queue, MESSAGES);
            let rate = MESSAGES as f64 / run_piper(&queue, MESSAGES, history).as_secs_f64();
            if history { &mut on } else { &mut off }.push(rate);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (on, off) = (median(&mut on), median(&mut off));
    println!(
        "history: Piper commit, {MESSAGES} messages, 2 workers, durability none, {}: \
         history on {on:.0}/s, off {off:.0}/s, ratio on/off x{:.3} (median of {ROUNDS})",
        if root.starts_with("/dev/shm") {
            "tmpfs"
        } else {
            "target dir"
        },
        on / off
    );
}

criterion_group!(benches, history_cost);
criterion_main!(benches);
