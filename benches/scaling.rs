//! How cost grows with message size, with the number of claiming threads, and along a
//! pipeline of Pipers; each beside a raw `std::fs` baseline measured in the same run.
//!
//! ```text
//! cargo bench --bench scaling                   # everything
//! cargo bench --bench scaling -- message_size   # one group
//! ```
//!
//! Durability none throughout: these measure what dirq adds to the filesystem's own
//! work (durable costs are fsync counts; see benches/queue.rs and benches/peers.sh).
//! Queues live under the target directory.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dirq::piper::{Outcome, Piper, StageResult};
use dirq::{DirectoryQueue, Durability, Message};

mod common;

use common::scratch;

fn queue(dir: &Path) -> DirectoryQueue {
    common::queue(dir, Durability::None)
}

fn fill(queue: &DirectoryQueue, n: u64, size: usize) {
    let payload = vec![b'x'; size];
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        queue
            .enqueue_batch((0..k).map(|_| payload.as_slice()))
            .expect("fill");
        left -= k;
    }
}

/// The raw round trip: create and write in tmp/, rename into incoming/, rename to
/// pending/, read, unlink.
fn raw_round_trip(dir: &Path, seq: &mut u64, payload: &[u8], buf: &mut Vec<u8>) {
    *seq += 1;
    let name = format!("{seq}.msg");
    let (tmp, incoming, pending) = (
        dir.join("tmp").join(&name),
        dir.join("incoming").join(&name),
        dir.join("pending").join(&name),
    );
    File::create(&tmp)
        .and_then(|mut f| f.write_all(payload))
        .expect("raw write");
    fs::rename(&tmp, &incoming).expect("raw publish");
    fs::rename(&incoming, &pending).expect("raw claim");
    buf.clear();
    File::open(&pending)
        .and_then(|mut f| f.read_to_end(buf))
        .expect("raw read");
    fs::remove_file(&pending).expect("raw commit");
}

/// Enqueue, claim, read and commit one message of 200 B, 64 KiB and 16 MiB.
fn message_size(c: &mut Criterion) {
    let mut group = c.benchmark_group("message_size");
    for size in [200usize, 64 << 10, 16 << 20] {
        let label = match size {
            200 => "200 B".to_owned(),
            s if s < 1 << 20 => format!("{} KiB", s >> 10),
            s => format!("{} MiB", s >> 20),
        };
        group.throughput(Throughput::Bytes(size as u64));
        if size >= 1 << 20 {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(10));
        }
        let payload = vec![b'x'; size];
        let dir = scratch(&format!("size-raw-{size}"));
        for sub in ["tmp", "incoming", "pending"] {
            fs::create_dir_all(dir.join(sub)).expect("raw layout");
        }
        let (mut seq, mut buf) = (0, Vec::new());
        group.bench_function(BenchmarkId::new("raw std::fs", &label), |b| {
            b.iter(|| raw_round_trip(&dir, &mut seq, &payload, &mut buf));
        });
        let q = queue(&scratch(&format!("size-dirq-{size}")));
        group.bench_function(BenchmarkId::new("dirq", &label), |b| {
            b.iter(|| {
                q.enqueue(&payload).expect("enqueue");
                let message = q.try_claim().expect("claim").expect("a message");
                std::hint::black_box(message.bytes().expect("read"));
                message.commit().expect("commit");
            });
        });
    }
    group.finish();
}

/// Claim, read and commit from one queue with 1, 2 and 4 threads of one handle.
fn workers(c: &mut Criterion) {
    let mut group = c.benchmark_group("workers");
    group.throughput(Throughput::Elements(1));
    for threads in [1usize, 2, 4] {
        let q = queue(&scratch(&format!("workers-{threads}")));
        group.bench_function(BenchmarkId::new("dirq claim+commit", threads), |b| {
            b.iter_custom(|iters| {
                fill(&q, iters, 200);
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..threads {
                        scope.spawn(|| {
                            while let Some(message) = q.try_claim().expect("claim") {
                                std::hint::black_box(message.bytes().expect("read"));
                                message.commit().expect("commit");
                            }
                        });
                    }
                });
                start.elapsed()
            });
        });
    }
    group.finish();
}

/// Moves every message of `from` through `hops` queues, as the floor does: rename to
/// pending/, read, rename into the next queue's incoming/; one thread.
fn raw_hops(root: &Path, hops: usize) {
    let mut buf = Vec::new();
    for hop in 0..hops {
        let from = root.join(format!("q{hop}"));
        let to = root.join(format!("q{}", hop + 1)).join("incoming");
        for entry in fs::read_dir(from.join("incoming")).expect("list") {
            let name = entry.expect("entry").file_name();
            let pending = from.join("pending").join(&name);
            fs::rename(from.join("incoming").join(&name), &pending).expect("claim");
            buf.clear();
            File::open(&pending)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .expect("read");
            fs::rename(&pending, to.join(&name)).expect("move");
        }
    }
}

/// Three hops: the floor moving every message through three queues in one thread,
/// against three Pipers (one worker each) forwarding concurrently.
fn pipeline(c: &mut Criterion) {
    const HOPS: usize = 3;
    let mut group = c.benchmark_group("pipeline");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    let root = scratch("hops");
    let queues: Vec<DirectoryQueue> = (0..=HOPS)
        .map(|i| queue(&root.join(format!("q{i}"))))
        .collect();
    let drain_last = |q: &DirectoryQueue| {
        while let Some(message) = q.try_claim().expect("claim") {
            message.commit().expect("commit");
        }
    };
    group.bench_function("raw std::fs, 3 hops in one thread", |b| {
        b.iter_custom(|iters| {
            fill(&queues[0], iters, 200);
            let start = Instant::now();
            raw_hops(&root, HOPS);
            let elapsed = start.elapsed();
            drain_last(&queues[HOPS]);
            elapsed
        });
    });
    group.bench_function("dirq, 3 Pipers", |b| {
        b.iter_custom(|iters| {
            fill(&queues[0], iters, 200);
            let forwarded = Arc::new(AtomicU64::new(0));
            let pipers: Vec<Piper> = (0..HOPS)
                .map(|i| {
                    let last = i + 1 == HOPS;
                    let forwarded = Arc::clone(&forwarded);
                    Piper::builder(format!("hop{i}"))
                        .input(&queues[i])
                        .output("next", &queues[i + 1])
                        .out_limit(usize::MAX / 2)
                        .advertise(false)
                        .handle_signals(false)
                        .stage(move |m: &Message| -> StageResult {
                            std::hint::black_box(m.bytes()?);
                            if last {
                                forwarded.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Outcome::Forward)
                        })
                        .build()
                        .expect("build a Piper")
                })
                .collect();
            let handles: Vec<_> = pipers.iter().map(Piper::handle).collect();
            let start = Instant::now();
            let runners: Vec<_> = pipers
                .into_iter()
                .map(|p| std::thread::spawn(move || p.run()))
                .collect();
            // The last hop counts before its forward completes: wait for its Piper's
            // own count of forwards.
            let last = handles.last().expect("a hop");
            while last.stats().forwarded < iters {
                std::thread::sleep(Duration::from_millis(1));
            }
            let elapsed = start.elapsed();
            for handle in &handles {
                handle.shutdown();
            }
            for runner in runners {
                runner.join().expect("a Piper panicked").expect("Piper");
            }
            assert_eq!(forwarded.load(Ordering::Relaxed), iters);
            drain_last(&queues[HOPS]);
            elapsed
        });
    });
    group.finish();
}

criterion_group!(benches, message_size, workers, pipeline);
criterion_main!(benches);
