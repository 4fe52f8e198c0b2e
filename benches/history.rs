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
const ROUNDS: usize = 15;

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
        .measurement_time(Duration::from_secs(5));
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
    // alternately, the order swapped every round (so that the drift of a shared
    // machine hits both), median throughput of each. The process's CPU time per
    // message is reported too: it does not count what other processes take from us.
    let _ = std::fs::remove_dir_all(root.join("q/history"));
    let (mut rates, mut cpu) = ([Vec::new(), Vec::new()], [0.0f64; 2]);
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for history in order {
            fill(&queue, MESSAGES);
            let before = cpu_seconds();
            let wall = run_piper(&queue, MESSAGES, history);
            cpu[usize::from(history)] += cpu_seconds() - before;
            rates[usize::from(history)].push(MESSAGES as f64 / wall.as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut rates[0]), median(&mut rates[1]));
    let per_message = |s: f64| s * 1e6 / (MESSAGES as f64 * ROUNDS as f64);
    println!(
        "history: Piper commit, {MESSAGES} messages, 2 workers, durability none, {}, \
         median of {ROUNDS}: history on {on:.0}/s, off {off:.0}/s, throughput on/off x{:.3}; \
         CPU per message on {:.1} us, off {:.1} us, on/off x{:.3}",
        if root.starts_with("/dev/shm") {
            "tmpfs"
        } else {
            "target dir"
        },
        on / off,
        per_message(cpu[1]),
        per_message(cpu[0]),
        cpu[1] / cpu[0]
    );
}

/// User and system CPU time of this process so far, in seconds (Linux: from
/// `/proc/self/stat`, in clock ticks of 1/100 s; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

criterion_group!(benches, history_cost);
criterion_main!(benches);
