//! Measures a pipeline of forwarding Pipers against the raw floor's move rate:
//! `cargo run --release --example hops [-- --dir DIR] [--messages N] [--hops H]
//! [--workers W] [--durability none|batch|full] [--size BYTES] [--processes]`.
//!
//! Queue `q0` is filled with N messages (not timed); then H Pipers, one per hop, move
//! every message along `q0 → q1 → … → qH`, each reading the message as the floor does
//! and forwarding it by rename. The clock runs from the start of the Pipers until the
//! last hop has forwarded the N-th message. The last line is a JSON summary whose
//! `rate` is messages through the whole pipeline per second: compare it with the
//! floor's `pipeline mode=move` rate divided by H (benches/peers.sh does).
//!
//! The Pipers run in this process, one thread each (with W workers), or with
//! `--processes` each in a process of its own (this program, `hop I ...`), as
//! production pipelines run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use dirq::piper::{Outcome, Piper, StageResult};
use dirq::{DirectoryQueue, Durability, Message};

type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Options {
    dir: PathBuf,
    messages: u64,
    hops: usize,
    workers: usize,
    durability: String,
    size: usize,
    processes: bool,
}

fn parse(args: &[String]) -> Fallible<Options> {
    let mut options = Options {
        dir: std::env::temp_dir().join(format!("dirq-hops-{}", std::process::id())),
        messages: 20_000,
        hops: 3,
        workers: 1,
        durability: "none".to_owned(),
        size: 200,
        processes: false,
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
            "--size" => options.size = value()?.parse()?,
            "--processes" => options.processes = true,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(options)
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
    Ok(Piper::builder(format!("hop{index}"))
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
        })
        .build()?)
}

fn run(options: &Options) -> Fallible<serde_json::Value> {
    let _ = std::fs::remove_dir_all(&options.dir);
    for index in 0..=options.hops {
        open(&options.dir, index, &options.durability)?;
    }
    let first = open(&options.dir, 0, "none")?;
    let payload = vec![b'x'; options.size];
    let mut left = options.messages;
    while left > 0 {
        let n = left.min(1000);
        first.enqueue_batch((0..n).map(|_| payload.as_slice()))?;
        left -= n;
    }
    let last = open(&options.dir, options.hops, "none")?;
    if options.processes {
        let exe = std::env::current_exe()?;
        let mut children: Vec<Child> = Vec::new();
        let start = Instant::now();
        for index in 0..options.hops {
            children.push(
                Command::new(&exe)
                    .args(["hop", &index.to_string(), "--dir"])
                    .arg(&options.dir)
                    .args(["--workers", &options.workers.to_string()])
                    .args(["--durability", &options.durability])
                    .args(["--messages", &options.messages.to_string()])
                    .stdout(Stdio::piped())
                    .spawn()?,
            );
        }
        // The last hop says when it has forwarded every message.
        let last_hop = children.last_mut().ok_or("--hops must be at least 1")?;
        let mut line = String::new();
        BufReader::new(last_hop.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        let secs = start.elapsed().as_secs_f64();
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        return Ok(summary(options, secs, last.counts()?.incoming as u64));
    }
    let pipers: Vec<Piper> = (0..options.hops)
        .map(|i| hop(options, i))
        .collect::<Fallible<_>>()?;
    let handles: Vec<_> = pipers.iter().map(Piper::handle).collect();
    let start = Instant::now();
    let runners: Vec<_> = pipers
        .into_iter()
        .map(|piper| std::thread::spawn(move || piper.run()))
        .collect();
    let last_hop = handles.last().ok_or("--hops must be at least 1")?;
    while last_hop.stats().forwarded < options.messages {
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = start.elapsed().as_secs_f64();
    for handle in &handles {
        handle.shutdown();
    }
    for runner in runners {
        runner.join().map_err(|_| "a Piper panicked")??;
    }
    Ok(summary(options, secs, last.counts()?.incoming as u64))
}

fn summary(options: &Options, secs: f64, arrived: u64) -> serde_json::Value {
    serde_json::json!({
        "messages": options.messages, "hops": options.hops, "workers": options.workers,
        "durability": options.durability, "size": options.size,
        "processes": options.processes, "arrived": arrived, "secs": secs,
        "rate": options.messages as f64 / secs,
    })
}

/// One hop as a process of its own: `hops hop I --dir DIR ...`. Prints a line once it
/// has forwarded `--messages` messages, and runs until killed.
fn run_hop(index: usize, options: &Options) -> Fallible<()> {
    let piper = hop(options, index)?;
    let handle = piper.handle();
    let messages = options.messages;
    std::thread::spawn(move || {
        while handle.stats().forwarded < messages {
            std::thread::sleep(Duration::from_millis(5));
        }
        println!("forwarded {messages}");
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
