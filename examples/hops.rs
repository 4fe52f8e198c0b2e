//! Measures a pipeline of forwarding Pipers against the raw floor's move rate:
//! `cargo run --release --example hops [-- --dir DIR] [--messages N] [--hops H]
//! [--workers W] [--durability none|batch|full] [--commit-batch N] [--commit-delay MS]
//! [--size BYTES] [--processes] [--rate R]`.
//!
//! H Pipers, one per hop, move every message along `q0 → q1 → … → qH`, each reading
//! the message as the floor does and forwarding it by rename. `--commit-batch` and
//! `--commit-delay` set every hop's group commit (`PiperBuilder::commit_batch` and
//! `commit_delay`; unset, the library's defaults); they matter unless the durability is
//! `none`, and `--commit-batch 1` is a sync after every message. Two kinds of run:
//!
//! - **Throughput** (the default): `q0` is filled with N messages (not timed), then the
//!   clock runs from the start of the Pipers until the last hop has forwarded the N-th
//!   message. `rate` is messages through the whole pipeline per second: compare it with
//!   the floor's `pipeline mode=move` rate divided by H (benches/peers.sh does). No
//!   latency is reported: every message of a pre-filled queue waits behind the ones
//!   before it, so its age at the end is queueing delay, growing with N, not what the
//!   pipeline adds.
//! - **Latency** (`--rate R`): the queues start empty and, while the hops run, a
//!   producer thread enqueues N messages on a fixed schedule of R a second (open loop:
//!   a late enqueue does not push the later ones back). Each message carries its
//!   enqueue time, wall-clock nanoseconds since the UNIX epoch, little-endian in its
//!   first 8 bytes (the payload stays `--size` bytes). A sink in this process claims
//!   from `qH`, records now minus the stamp, and commits. `p50_ms`, `p99_ms` and
//!   `max_ms` are those end-to-end latencies; `rate` is what arrived per second, R if
//!   the pipeline keeps up. Choose R below the pipeline's throughput to measure
//!   latency at that load, above it to see the queue grow. A message counts as
//!   arrived when the sink can claim it: a hop's forward is a rename that is visible
//!   at once, and its group commit makes it durable up to one batch later.
//!
//! The last line is a JSON summary; `synced_batches` lists, per hop, the batches its
//! group commit had synced when it had forwarded the N-th message (forwarded / synced
//! is the mean batch size).
//!
//! The Pipers run in this process, one thread each (with W workers), or with
//! `--processes` each in a process of its own (this program, `hop I ...`), as
//! production pipelines run.

use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dirq::piper::{Outcome, Piper, PiperHandle, PiperStats, StageResult};
use dirq::{DirectoryQueue, Durability, Message};

type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The stamp's size: a u64 of nanoseconds.
const STAMP: usize = 8;
/// A paced run gives up when nothing arrives for this long.
const STALL: Duration = Duration::from_secs(60);

struct Options {
    dir: PathBuf,
    messages: u64,
    hops: usize,
    workers: usize,
    durability: String,
    /// Unset: the library's default.
    commit_batch: Option<usize>,
    /// Milliseconds, as given; unset: the library's default.
    commit_delay: Option<String>,
    size: usize,
    processes: bool,
    /// Messages per second for a latency run; unset: a throughput run.
    rate: Option<f64>,
}

fn parse(args: &[String]) -> Fallible<Options> {
    let mut options = Options {
        dir: std::env::temp_dir().join(format!("dirq-hops-{}", std::process::id())),
        messages: 20_000,
        hops: 3,
        workers: 1,
        durability: "none".to_owned(),
        commit_batch: None,
        commit_delay: None,
        size: 200,
        processes: false,
        rate: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => options.dir = PathBuf::from(value()?),
            "--messages" => options.messages = value()?.parse()?,
            "--hops" => options.hops = value()?.parse()?,
            "--workers" => options.workers = value()?.parse()?,
            "--durability" => options.durability = value()?.clone(),
            "--commit-batch" => options.commit_batch = Some(value()?.parse()?),
            "--commit-delay" => {
                let ms = value()?;
                delay(ms)?;
                options.commit_delay = Some(ms.clone());
            }
            "--size" => options.size = value()?.parse()?,
            "--processes" => options.processes = true,
            "--rate" => options.rate = Some(value()?.parse()?),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if options.hops == 0 {
        return Err("--hops must be at least 1".into());
    }
    if options.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number of messages a second".into());
    }
    if options.rate.is_some() && options.size < STAMP {
        return Err(format!("--rate needs --size of at least {STAMP} bytes for the stamp").into());
    }
    Ok(options)
}

/// `--commit-delay`'s milliseconds (fractions allowed).
fn delay(ms: &str) -> Fallible<Duration> {
    ms.parse::<f64>()
        .ok()
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
        .ok_or_else(|| format!("--commit-delay wants milliseconds, not {ms:?}").into())
}

fn open(dir: &Path, index: usize, durability: &str) -> Fallible<DirectoryQueue> {
    let durability = match durability {
        "none" => Durability::None,
        "batch" => Durability::Batch,
        "full" => Durability::Full,
        other => return Err(format!("unknown durability {other:?}").into()),
    };
    Ok(DirectoryQueue::builder(dir.join(format!("q{index}")))
        .durability(durability)
        .open()?)
}

/// The Piper of hop `index`, from `q{index}` to `q{index+1}`.
fn hop(options: &Options, index: usize) -> Fallible<Piper> {
    let from = open(&options.dir, index, &options.durability)?;
    let to = open(&options.dir, index + 1, &options.durability)?;
    let mut builder = Piper::builder(format!("hop{index}"));
    builder
        .input(&from)
        .output("next", &to)
        .workers(options.workers)
        .out_limit(usize::MAX / 2)
        .advertise(false)
        .handle_signals(false)
        .stage(move |m: &Message| -> StageResult {
            // Read the message, as the floor does.
            let bytes = m.bytes()?;
            std::hint::black_box(bytes);
            Ok(Outcome::Forward)
        });
    if let Some(n) = options.commit_batch {
        builder.commit_batch(n);
    }
    if let Some(ms) = &options.commit_delay {
        builder.commit_delay(delay(ms)?);
    }
    Ok(builder.build()?)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A hop in a process of its own, and what it printed once done.
struct HopProcess {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Its statistics when it had forwarded `--messages`.
    done: Option<serde_json::Value>,
}

impl HopProcess {
    fn wait_done(&mut self) -> Fallible<&serde_json::Value> {
        if self.done.is_none() {
            let line = self.lines.next().ok_or("a hop ended early")??;
            self.done = Some(serde_json::from_str(&line)?);
        }
        self.done.as_ref().ok_or_else(|| "no statistics".into())
    }
}

/// A hop runs until killed: on every way out, error paths included.
impl Drop for HopProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running hops: Pipers in threads of this process, or child processes.
enum Hops {
    Threads(Vec<PiperHandle>, Vec<JoinHandle<dirq::Result<PiperStats>>>),
    Processes(Vec<HopProcess>),
}

impl Hops {
    fn start(options: &Options) -> Fallible<Hops> {
        if !options.processes {
            let pipers: Vec<Piper> = (0..options.hops)
                .map(|i| hop(options, i))
                .collect::<Fallible<_>>()?;
            let handles = pipers.iter().map(Piper::handle).collect();
            let runners = pipers
                .into_iter()
                .map(|piper| std::thread::spawn(move || piper.run()))
                .collect();
            return Ok(Hops::Threads(handles, runners));
        }
        let exe = std::env::current_exe()?;
        let mut hops = Vec::new();
        for index in 0..options.hops {
            let mut command = Command::new(&exe);
            command
                .args(["hop", &index.to_string(), "--dir"])
                .arg(&options.dir)
                .args(["--workers", &options.workers.to_string()])
                .args(["--durability", &options.durability])
                .args(["--messages", &options.messages.to_string()]);
            if let Some(n) = options.commit_batch {
                command.args(["--commit-batch", &n.to_string()]);
            }
            if let Some(ms) = &options.commit_delay {
                command.args(["--commit-delay", ms]);
            }
            let mut child = command.stdout(Stdio::piped()).spawn()?;
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let lines = BufReader::new(stdout).lines();
            hops.push(HopProcess {
                child,
                lines,
                done: None,
            });
        }
        // Each hop says when its Piper is built.
        for hop in &mut hops {
            hop.lines
                .next()
                .ok_or("a hop ended before it was ready")??;
        }
        Ok(Hops::Processes(hops))
    }

    /// Waits until the last hop has forwarded `messages`.
    fn wait_last(&mut self, messages: u64) -> Fallible<()> {
        match self {
            Hops::Threads(handles, _) => {
                let last = handles.last().ok_or("no hops")?;
                while last.stats().forwarded < messages {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Hops::Processes(hops) => {
                hops.last_mut().ok_or("no hops")?.wait_done()?;
            }
        }
        Ok(())
    }

    /// Each hop's synced batches once it has forwarded every message, and stops the
    /// hops.
    fn stop(self, messages: u64) -> Fallible<Vec<u64>> {
        match self {
            Hops::Threads(handles, runners) => {
                let mut batches = Vec::new();
                for handle in &handles {
                    while handle.stats().forwarded < messages {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    batches.push(handle.stats().synced_batches);
                    handle.shutdown();
                }
                for runner in runners {
                    runner.join().map_err(|_| "a Piper panicked")??;
                }
                Ok(batches)
            }
            // Dropping a hop kills it.
            Hops::Processes(mut hops) => hops
                .iter_mut()
                .map(|hop| Ok(hop.wait_done()?["synced_batches"].as_u64().unwrap_or(0)))
                .collect(),
        }
    }
}

/// Enqueues `messages` stamped messages into `queue` at `rate` a second, on a fixed
/// schedule from `start`.
fn produce(queue: &DirectoryQueue, options: &Options, rate: f64, start: Instant) -> Fallible<()> {
    let mut payload = vec![b'x'; options.size];
    for k in 0..options.messages {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        payload[..STAMP].copy_from_slice(&now_nanos().to_le_bytes());
        queue.enqueue(&payload)?;
    }
    Ok(())
}

/// Claims `messages` from `queue` and returns their end-to-end latencies, sorted.
fn sink(queue: &DirectoryQueue, messages: u64) -> Fallible<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(messages as usize);
    while (latencies.len() as u64) < messages {
        let Some(message) = queue.claim_timeout(STALL)? else {
            return Err(format!(
                "nothing arrived for {STALL:?} after {} messages",
                latencies.len()
            )
            .into());
        };
        let bytes = message.bytes()?;
        let now = now_nanos();
        let stamp = u64::from_le_bytes(bytes[..STAMP].try_into()?);
        latencies.push(Duration::from_nanos(now.saturating_sub(stamp)));
        message.commit().map_err(|e| e.into_parts().0)?;
    }
    latencies.sort();
    Ok(latencies)
}

fn percentile_ms(sorted: &[Duration], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let index = ((last as f64) * p).round() as usize;
    Some(sorted[index.min(last)].as_secs_f64() * 1000.0)
}

fn run(options: &Options) -> Fallible<serde_json::Value> {
    let _ = std::fs::remove_dir_all(&options.dir);
    for index in 0..=options.hops {
        open(&options.dir, index, &options.durability)?;
    }
    let first = open(&options.dir, 0, "none")?;
    let last = open(&options.dir, options.hops, "none")?;
    let Some(rate) = options.rate else {
        let payload = vec![b'x'; options.size];
        let mut left = options.messages;
        while left > 0 {
            let n = left.min(1000);
            first.enqueue_batch((0..n).map(|_| payload.as_slice()))?;
            left -= n;
        }
        // As before the latency mode: the clock includes starting the hops.
        let start = Instant::now();
        let mut hops = Hops::start(options)?;
        hops.wait_last(options.messages)?;
        let secs = start.elapsed().as_secs_f64();
        let batches = hops.stop(options.messages)?;
        let arrived = last.counts()?.incoming as u64;
        return Ok(summary(options, secs, arrived, &batches, &[]));
    };
    let hops = Hops::start(options)?;
    let start = Instant::now();
    let latencies = std::thread::scope(|scope| {
        let producer = scope.spawn(|| produce(&first, options, rate, start));
        let latencies = sink(&last, options.messages);
        let produced = producer.join().map_err(|_| "the producer panicked")?;
        produced.and(latencies)
    })?;
    let secs = start.elapsed().as_secs_f64();
    let batches = hops.stop(options.messages)?;
    Ok(summary(
        options,
        secs,
        latencies.len() as u64,
        &batches,
        &latencies,
    ))
}

fn summary(
    options: &Options,
    secs: f64,
    arrived: u64,
    batches: &[u64],
    latencies: &[Duration],
) -> serde_json::Value {
    serde_json::json!({
        "messages": options.messages, "hops": options.hops, "workers": options.workers,
        "durability": options.durability, "commit_batch": options.commit_batch,
        "commit_delay_ms": options.commit_delay.as_deref().map(|ms| delay(ms).ok()
            .map(|d| d.as_secs_f64() * 1000.0)),
        "size": options.size, "processes": options.processes,
        "offered_rate": options.rate, "arrived": arrived, "secs": secs,
        "rate": options.messages as f64 / secs,
        "p50_ms": percentile_ms(latencies, 0.5), "p99_ms": percentile_ms(latencies, 0.99),
        "max_ms": percentile_ms(latencies, 1.0), "synced_batches": batches,
    })
}

/// One hop as a process of its own: `hops hop I --dir DIR ...`. Prints `ready` once its
/// Piper is built and a JSON line of statistics once it has forwarded `--messages`
/// messages, and runs until killed.
fn run_hop(index: usize, options: &Options) -> Fallible<()> {
    let piper = hop(options, index)?;
    let handle = piper.handle();
    let messages = options.messages;
    println!("ready");
    std::thread::spawn(move || {
        let mut stats = handle.stats();
        while stats.forwarded < messages {
            std::thread::sleep(Duration::from_millis(5));
            stats = handle.stats();
        }
        println!(
            "{}",
            serde_json::json!({"forwarded": stats.forwarded, "synced_batches": stats.synced_batches})
        );
    });
    piper.run()?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("hop") => args
            .get(1)
            .ok_or_else(|| "hop needs an index".into())
            .and_then(|i| Ok(i.parse::<usize>()?))
            .and_then(|i| run_hop(i, &parse(&args[2..])?)),
        _ => parse(&args).and_then(|options| {
            let value = run(&options)?;
            let _ = std::fs::remove_dir_all(&options.dir);
            println!("{value}");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hops: {e}");
            ExitCode::FAILURE
        }
    }
}
