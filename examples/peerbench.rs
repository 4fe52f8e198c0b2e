//! Benchmark driver for `../shared/peers` (see its README, "The driver contract"):
//! runs the harness's queue operations through dirq's public API and prints one JSON
//! line, so that dirq is measured beside Mentat's `mentat.dirq` and the raw-syscall
//! floor in one run.
//!
//! ```text
//! cargo build --release --example peerbench
//! ../shared/peers/run-peers.sh --dirq-bin target/release/examples/peerbench --only-dirq
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dirq::{DirectoryQueue, Durability, State};
use serde_json::json;

const PAYLOAD_LEN: usize = 200;

/// The harness's 200-byte JSON message for id `id` (byte for byte as `limit`'s).
fn payload(id: u64) -> Vec<u8> {
    let mut s = format!(
        "{{\"ID\":\"{id:010}\",\"DetectTime\":\"2024-05-01T12:00:00Z\",\"Category\":[\"Test\"],\
         \"Node\":[{{\"Name\":\"cz.cesnet.bench\",\"Type\":[\"Relay\"]}}],\"Pad\":\""
    );
    let pad = PAYLOAD_LEN - s.len() - 2;
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s.into_bytes()
}

fn parse_id(bytes: &[u8]) -> Result<u64, String> {
    let digits = bytes
        .get(7..17)
        .ok_or_else(|| format!("message of {} bytes has no id", bytes.len()))?;
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad id bytes {digits:?}"))
}

type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args(HashMap<String, String>);

impl Args {
    /// Refuses any key the command does not know: an argument the harness passes and
    /// the driver ignores would silently measure something else.
    fn only(&self, command: &str, known: &[&str]) -> Fallible<()> {
        let mut unknown: Vec<&str> = self
            .0
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        Err(format!(
            "{command} does not know {} (it takes {})",
            unknown
                .iter()
                .map(|k| format!("{k}="))
                .collect::<Vec<_>>()
                .join(", "),
            known
                .iter()
                .map(|k| format!("{k}="))
                .collect::<Vec<_>>()
                .join(" ")
        )
        .into())
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn path(&self, key: &str) -> Fallible<PathBuf> {
        Ok(PathBuf::from(
            self.get(key)
                .ok_or_else(|| format!("missing argument {key}="))?,
        ))
    }
    fn num(&self, key: &str, default: u64) -> Fallible<u64> {
        match self.get(key) {
            Some(v) => Ok(v
                .parse()
                .map_err(|_| format!("{key}= must be an integer, not {v:?}"))?),
            None => Ok(default),
        }
    }
    fn cap(&self) -> Fallible<Duration> {
        match self.get("cap") {
            Some(v) => {
                let secs: f64 = v
                    .parse()
                    .map_err(|_| format!("cap= must be seconds, not {v:?}"))?;
                Ok(Duration::from_secs_f64(secs.min(1e6)))
            }
            None => Ok(Duration::from_secs(1_000_000)),
        }
    }
    fn durable(&self) -> Fallible<bool> {
        Ok(self.num("durable", 0)? != 0)
    }
    fn batch(&self) -> Fallible<u64> {
        match self.num("batch", 1)? {
            0 => Err("batch= must be at least 1".into()),
            k => Ok(k),
        }
    }
    /// The durability mode for the per-message operations: batch=K > 1 defers directory
    /// syncs to a `sync()` every K messages (group commit).
    fn durability(&self) -> Fallible<Durability> {
        Ok(match (self.durable()?, self.batch()?) {
            (false, _) => Durability::None,
            (true, 1) => Durability::Full,
            (true, _) => Durability::Batch,
        })
    }
}

fn open(path: &PathBuf, durability: Durability) -> Fallible<DirectoryQueue> {
    Ok(DirectoryQueue::builder(path)
        .durability(durability)
        .open()?)
}

fn enqueue(args: &Args) -> Fallible<serde_json::Value> {
    let n = args.num("n", 10_000)?;
    let start = args.num("start", 0)?;
    let batch = args.batch()?;
    let durable = args.durable()?;
    let durability = if durable {
        Durability::Full
    } else {
        Durability::None
    };
    let queue = open(&args.path("q")?, durability)?;
    let cap = args.cap()?;
    let t0 = Instant::now();
    let mut done = 0;
    while done < n && t0.elapsed() < cap {
        if durable && batch > 1 {
            let k = batch.min(n - done);
            let payloads: Vec<Vec<u8>> = (0..k).map(|i| payload(start + done + i)).collect();
            queue.enqueue_batch(&payloads)?;
            done += k;
        } else {
            queue.enqueue(payload(start + done))?;
            done += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(json!({"op": "enqueue", "n": n, "done": done, "secs": secs,
              "rate": done as f64 / secs, "capped": done < n, "durable": durable}))
}

/// What one consumer thread did.
#[derive(Default)]
struct Worker {
    ids: Vec<u64>,
    collisions: u64,
    first: Option<Duration>,
}

fn dequeue(args: &Args) -> Fallible<serde_json::Value> {
    let q = args.path("q")?;
    let threads = match args.num("threads", 1)? {
        0 => return Err("threads= must be at least 1".into()),
        t => t,
    };
    let max = args.num("max", u64::MAX)?;
    let batch = args.batch()?;
    let work = Duration::from_micros(args.num("work_us", 0)?);
    let durability = args.durability()?;
    let cap = args.cap()?;
    // Each thread is an independent consumer with its own handle, as a separate worker
    // process would be: its own scans, its own claims, real races.
    let queues = (0..threads)
        .map(|_| open(&q, durability))
        .collect::<Fallible<Vec<_>>>()?;
    let reserved = AtomicU64::new(0);
    let t0 = Instant::now();
    let workers: Vec<Fallible<Worker>> = thread::scope(|scope| {
        let handles: Vec<_> = queues
            .iter()
            .map(|queue| {
                scope.spawn(|| {
                    let limits = Limits {
                        max,
                        batch,
                        work,
                        t0,
                        cap,
                    };
                    consume(queue, &reserved, &limits)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("consumer thread panicked".into()))
            })
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let workers = workers.into_iter().collect::<Fallible<Vec<_>>>()?;
    let mut ids: Vec<u64> = workers.iter().flat_map(|w| w.ids.iter().copied()).collect();
    let done = ids.len() as u64;
    ids.sort_unstable();
    ids.dedup();
    let distinct = ids.len() as u64;
    let counts = DirectoryQueue::open(&q)?.counts()?;
    let remaining = (counts.incoming + counts.pending) as u64;
    let loss = match args.get("expect") {
        Some(e) => json!(e.parse::<i64>()? - distinct as i64 - remaining as i64),
        None => serde_json::Value::Null,
    };
    let first = workers.iter().filter_map(|w| w.first).min();
    let first_secs = first.map_or(0.0, |f| f.as_secs_f64());
    let steady = if done > 1 && first.is_some() {
        (done - 1) as f64 / (secs - first_secs)
    } else {
        0.0
    };
    Ok(json!({
        "op": "dequeue", "threads": threads, "done": done, "secs": secs,
        "rate": done as f64 / secs, "steady_rate": steady, "first_ms": first_secs * 1e3,
        "collisions": workers.iter().map(|w| w.collisions).sum::<u64>(),
        "dups": done - distinct, "loss": loss, "remaining": remaining,
        "per_worker": workers.iter().map(|w| w.ids.len()).collect::<Vec<_>>(),
        "capped": remaining > 0 && done < max, "durable": durability != Durability::None,
    }))
}

/// What bounds one consumer thread.
struct Limits {
    /// Messages all threads together may claim.
    max: u64,
    /// Messages per durability barrier.
    batch: u64,
    /// Processing time per message, between its read and its commit (`work_us=`).
    work: Duration,
    t0: Instant,
    cap: Duration,
}

/// Claims, reads and commits until the queue is empty, `max` is reached (all threads
/// together) or the cap has passed; with batch=K, syncs every K commits. With
/// `work_us=W`, each message is processed for W µs after its read, holding no lock of
/// the queue; with batch=K as well, up to K messages are claimed, processed one after
/// the other and then committed under one barrier, as the contract says.
fn consume(queue: &DirectoryQueue, reserved: &AtomicU64, limits: &Limits) -> Fallible<Worker> {
    let mut worker = Worker::default();
    let mut unsynced = 0;
    let per_round = if limits.work.is_zero() {
        1
    } else {
        limits.batch
    };
    let mut claimed = Vec::new();
    while limits.t0.elapsed() < limits.cap {
        while (claimed.len() as u64) < per_round {
            // Reserve a slot before claiming, so that no more than max are ever claimed.
            if reserved.fetch_add(1, Ordering::Relaxed) >= limits.max {
                break;
            }
            match queue.try_claim()? {
                Some(message) => claimed.push(message),
                None => {
                    reserved.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        if claimed.is_empty() {
            break;
        }
        for message in &claimed {
            worker.ids.push(parse_id(&message.bytes()?)?);
            if !limits.work.is_zero() {
                thread::sleep(limits.work);
            }
        }
        for message in claimed.drain(..) {
            message.commit()?;
            unsynced += 1;
            if unsynced == limits.batch {
                queue.sync()?;
                unsynced = 0;
            }
        }
        worker.first.get_or_insert_with(|| limits.t0.elapsed());
    }
    queue.sync()?;
    worker.collisions = queue.claim_stats().collisions;
    Ok(worker)
}

fn pipeline(args: &Args) -> Fallible<serde_json::Value> {
    if let Some(mode) = args.get("mode") {
        if mode != "move" {
            return Err(format!(
                "mode={mode} is not supported: dirq forwards by rename (mode=move)"
            )
            .into());
        }
    }
    let durability = args.durability()?;
    let batch = args.batch()?;
    let max = args.num("max", u64::MAX)?;
    let src = open(&args.path("src")?, durability)?;
    let dst = open(&args.path("dst")?, durability)?;
    let cap = args.cap()?;
    let t0 = Instant::now();
    let mut done = 0;
    let mut unsynced = 0;
    while done < max && t0.elapsed() < cap {
        let Some(message) = src.try_claim()? else {
            break;
        };
        parse_id(&message.bytes()?)?;
        message.forward(&dst)?;
        done += 1;
        unsynced += 1;
        if unsynced == batch {
            src.sync()?;
            unsynced = 0;
        }
    }
    src.sync()?;
    let secs = t0.elapsed().as_secs_f64();
    let left = src.counts()?;
    Ok(
        json!({"op": "pipeline", "mode": "move", "done": done, "secs": secs,
              "rate": done as f64 / secs,
              "capped": left.incoming + left.pending > 0 && done < max,
              "durable": durability != Durability::None}),
    )
}

fn count(args: &Args) -> Fallible<serde_json::Value> {
    let queue = DirectoryQueue::open(args.path("q")?)?;
    let n = queue.count(State::Incoming)? + queue.count(State::Pending)?;
    Ok(json!({"op": "count", "n": n}))
}

fn run() -> Fallible<serde_json::Value> {
    let mut argv = std::env::args().skip(1);
    let command = argv
        .next()
        .ok_or("usage: peerbench <enqueue|dequeue|pipeline|count> key=value...")?;
    let mut map = HashMap::new();
    for arg in argv {
        let (k, v) = arg
            .split_once('=')
            .ok_or_else(|| format!("argument {arg:?} is not key=value"))?;
        map.insert(k.to_owned(), v.to_owned());
    }
    let args = Args(map);
    type Command = fn(&Args) -> Fallible<serde_json::Value>;
    let (known, command_fn): (&[&str], Command) = match command.as_str() {
        "enqueue" => (&["q", "n", "start", "durable", "batch", "cap"], enqueue),
        "dequeue" => (
            &[
                "q", "threads", "max", "expect", "durable", "batch", "cap", "work_us",
            ],
            dequeue,
        ),
        "pipeline" => (
            &["src", "dst", "mode", "max", "durable", "batch", "cap"],
            pipeline,
        ),
        "count" => (&["q"], count),
        other => return Err(format!("unknown command {other:?}").into()),
    };
    args.only(&command, known)?;
    command_fn(&args)
}

fn main() -> ExitCode {
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("peerbench: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
