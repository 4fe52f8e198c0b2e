//! Throughput of the queue operations, each beside a raw `std::fs` baseline measured in
//! the same run (the minimal syscall sequence, as `../shared/peers/limit` does it), so
//! that results read as ratios, not absolute times.
//!
//! ```text
//! cargo bench --bench queue                 # everything
//! cargo bench --bench queue -- enqueue      # one group
//! ```
//!
//! Queues live under the target directory. Durable cells measure that filesystem's
//! fsync; compare them with their own baseline only.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use dirq::{DirectoryQueue, Durability};

mod common;

use common::{queue, scratch};

const PAYLOAD: &[u8; 200] = &[b'x'; 200];

/// The raw baseline: tmp/ and incoming/ made by hand, std::fs calls only.
struct Raw {
    tmp: PathBuf,
    incoming: PathBuf,
    pending: PathBuf,
    incoming_dir: File,
    next: u64,
}

impl Raw {
    fn new(dir: &Path) -> Raw {
        for sub in ["tmp", "incoming", "pending"] {
            fs::create_dir_all(dir.join(sub)).expect("raw layout");
        }
        Raw {
            tmp: dir.join("tmp"),
            incoming: dir.join("incoming"),
            pending: dir.join("pending"),
            incoming_dir: File::open(dir.join("incoming")).expect("open incoming"),
            next: 0,
        }
    }

    fn enqueue(&mut self, durable: bool) -> String {
        self.next += 1;
        let name = format!("{}.msg", self.next);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.tmp.join(&name))
            .expect("create");
        f.write_all(PAYLOAD).expect("write");
        if durable {
            f.sync_data().expect("fsync");
        }
        drop(f);
        fs::rename(self.tmp.join(&name), self.incoming.join(&name)).expect("rename");
        if durable {
            self.incoming_dir.sync_all().expect("fsync dir");
        }
        name
    }

    fn claim_commit(&self, name: &str) {
        let pending = self.pending.join(name);
        fs::rename(self.incoming.join(name), &pending).expect("rename");
        let mut buf = Vec::with_capacity(256);
        File::open(&pending)
            .expect("open")
            .read_to_end(&mut buf)
            .expect("read");
        fs::remove_file(&pending).expect("unlink");
    }
}

/// Fills `q` with `iters` messages (untimed), then times claiming, reading and ending
/// each with `terminal`.
fn time_claims(q: &DirectoryQueue, iters: u64, terminal: impl Fn(dirq::Message)) -> Duration {
    let filler = queue(q.root(), Durability::None);
    for _ in 0..iters {
        filler.enqueue(PAYLOAD).expect("fill");
    }
    let start = Instant::now();
    for _ in 0..iters {
        let m = q.try_claim().expect("claim").expect("a message");
        m.bytes().expect("read");
        terminal(m);
    }
    start.elapsed()
}

fn modes() -> [(Durability, &'static str, bool); 2] {
    [
        (Durability::None, "none", false),
        (Durability::Full, "full", true),
    ]
}

/// Settings for the cells that fsync: each sample takes milliseconds, not microseconds.
fn fewer_samples(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
}

fn enqueue(c: &mut Criterion) {
    let mut group = c.benchmark_group("enqueue");
    group.throughput(Throughput::Elements(1));
    for (durability, name, durable) in modes() {
        if durable {
            fewer_samples(&mut group);
        }
        let mut raw = Raw::new(&scratch(&format!("enqueue-raw-{name}")));
        group.bench_function(BenchmarkId::new("raw std::fs", name), |b| {
            b.iter(|| raw.enqueue(durable))
        });
        let q = queue(&scratch(&format!("enqueue-dirq-{name}")), durability);
        group.bench_function(BenchmarkId::new("dirq", name), |b| {
            b.iter(|| q.enqueue(PAYLOAD).expect("enqueue"))
        });
    }
    group.finish();
}

fn enqueue_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("enqueue_batch");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    let batch: Vec<&[u8]> = vec![PAYLOAD; 64];
    group.throughput(Throughput::Elements(64));
    let mut raw = Raw::new(&scratch("batch-raw"));
    group.bench_function("raw std::fs, 64 durable enqueues", |b| {
        b.iter(|| {
            for _ in 0..64 {
                raw.enqueue(true);
            }
        })
    });
    let q = queue(&scratch("batch-dirq-single"), Durability::Full);
    group.bench_function("dirq full, 64 single enqueues", |b| {
        b.iter(|| {
            for _ in 0..64 {
                q.enqueue(PAYLOAD).expect("enqueue");
            }
        })
    });
    let q = queue(&scratch("batch-dirq"), Durability::Full);
    group.bench_function("dirq full, enqueue_batch of 64", |b| {
        b.iter(|| q.enqueue_batch(&batch).expect("enqueue batch"))
    });
    group.finish();
}

fn claim_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("claim_commit");
    group.throughput(Throughput::Elements(1));
    for (durability, name, durable) in modes() {
        if durable {
            fewer_samples(&mut group);
        }
        let dir = scratch(&format!("claim-raw-{name}"));
        let mut raw = Raw::new(&dir);
        group.bench_function(BenchmarkId::new("raw std::fs", name), |b| {
            b.iter_custom(|iters| {
                let names: Vec<String> = (0..iters).map(|_| raw.enqueue(false)).collect();
                let start = Instant::now();
                for n in &names {
                    raw.claim_commit(n);
                    if durable {
                        File::open(&raw.pending)
                            .and_then(|d| d.sync_all())
                            .expect("fsync dir");
                    }
                }
                start.elapsed()
            })
        });
        let q = queue(&scratch(&format!("claim-dirq-{name}")), durability);
        group.bench_function(BenchmarkId::new("dirq", name), |b| {
            b.iter_custom(|iters| time_claims(&q, iters, |m| m.commit().expect("commit")))
        });
    }
    group.finish();
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    group.throughput(Throughput::Elements(1));
    for (durability, name, durable) in modes() {
        if durable {
            fewer_samples(&mut group);
        }
        let raw_dir = scratch(&format!("forward-raw-{name}"));
        let mut raw = Raw::new(&raw_dir.join("a"));
        let raw_next = Raw::new(&raw_dir.join("b"));
        group.bench_function(BenchmarkId::new("raw std::fs", name), |b| {
            b.iter_custom(|iters| {
                let names: Vec<String> = (0..iters).map(|_| raw.enqueue(false)).collect();
                let start = Instant::now();
                for n in &names {
                    let pending = raw.pending.join(n);
                    fs::rename(raw.incoming.join(n), &pending).expect("claim");
                    let mut buf = Vec::with_capacity(256);
                    File::open(&pending)
                        .expect("open")
                        .read_to_end(&mut buf)
                        .expect("read");
                    fs::rename(&pending, raw_next.incoming.join(n)).expect("forward");
                    if durable {
                        raw_next.incoming_dir.sync_all().expect("fsync dir");
                    }
                }
                start.elapsed()
            })
        });
        let dir = scratch(&format!("forward-dirq-{name}"));
        let q = queue(&dir.join("a"), durability);
        let next = queue(&dir.join("b"), durability);
        group.bench_function(BenchmarkId::new("dirq", name), |b| {
            b.iter_custom(|iters| time_claims(&q, iters, |m| m.forward(&next).expect("forward")))
        });
    }
    group.finish();
}

/// Messages per call in the batch cells of [`idempotent`].
const BATCH_WITH_ID: usize = 256;

/// `enqueue_with_id` (new ids; an id already waiting) against a plain `enqueue` in the
/// same run, and a commit that writes its `seen/` record against one that does not.
fn idempotent(c: &mut Criterion) {
    let mut group = c.benchmark_group("enqueue_with_id");
    group.throughput(Throughput::Elements(1));
    for (durability, name, durable) in modes() {
        if durable {
            fewer_samples(&mut group);
        }
        let q = queue(&scratch(&format!("idem-plain-{name}")), durability);
        group.bench_function(BenchmarkId::new("enqueue", name), |b| {
            b.iter(|| q.enqueue(PAYLOAD).expect("enqueue"))
        });
        let q = queue(&scratch(&format!("idem-new-{name}")), durability);
        let mut n = 0u64;
        group.bench_function(BenchmarkId::new("enqueue_with_id, new id", name), |b| {
            b.iter(|| {
                n += 1;
                let id = dirq::MessageId::new(format!("id-{n}")).expect("id");
                q.enqueue_with_id(&id, PAYLOAD).expect("enqueue_with_id")
            })
        });
        // Per message (throughput 256 per iteration): a plain batch beside the
        // idempotent one, new ids.
        group.throughput(Throughput::Elements(BATCH_WITH_ID as u64));
        let q = queue(&scratch(&format!("idem-batch-plain-{name}")), durability);
        group.bench_function(BenchmarkId::new("enqueue_batch of 256", name), |b| {
            b.iter(|| {
                q.enqueue_batch((0..BATCH_WITH_ID).map(|_| PAYLOAD))
                    .expect("enqueue_batch")
            })
        });
        let q = queue(&scratch(&format!("idem-batch-{name}")), durability);
        group.bench_function(
            BenchmarkId::new("enqueue_batch_with_id of 256, new ids", name),
            |b| {
                b.iter(|| {
                    let items: Vec<(dirq::MessageId, &[u8])> = (0..BATCH_WITH_ID)
                        .map(|_| {
                            n += 1;
                            let id = dirq::MessageId::new(format!("id-{n}")).expect("id");
                            (id, &PAYLOAD[..])
                        })
                        .collect();
                    q.enqueue_batch_with_id(&items)
                        .expect("enqueue_batch_with_id")
                })
            },
        );
        group.throughput(Throughput::Elements(1));
        let q = queue(&scratch(&format!("idem-again-{name}")), durability);
        let id = dirq::MessageId::new("waiting").expect("id");
        q.enqueue_with_id(&id, PAYLOAD).expect("first");
        group.bench_function(BenchmarkId::new("enqueue_with_id, id waiting", name), |b| {
            b.iter(|| q.enqueue_with_id(&id, PAYLOAD).expect("enqueue_with_id"))
        });
        for (remember, label) in [(false, "claim+commit"), (true, "claim+commit, remembering")] {
            let dir = scratch(&format!("idem-commit-{remember}-{name}"));
            let mut builder = DirectoryQueue::builder(&dir);
            builder.durability(durability);
            if remember {
                builder.remember_finished(Duration::from_secs(3600));
            }
            let q = builder.open().expect("open");
            group.bench_function(BenchmarkId::new(label, name), |b| {
                b.iter_custom(|iters| time_claims(&q, iters, |m| m.commit().expect("commit")))
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    enqueue,
    enqueue_batch,
    claim_commit,
    forward,
    idempotent
);
criterion_main!(benches);
