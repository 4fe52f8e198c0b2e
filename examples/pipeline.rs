//! A three-stage pipeline of separate processes: `cargo run --release --example pipeline`.
//!
//! ```text
//! input ──[parse]──▶ parsed ──[enrich]──▶ enriched ──[sink]──▶ archive
//!   │                             ▲  ▲
//!   └─▶ errors/ (malformed)     two processes share this stage (more with --processes)
//! ```
//!
//! The coordinator (this program without arguments) makes the queues, starts every
//! stage as a process of its own (this program, `stage NAME`), feeds the input, waits
//! until the archive holds every valid event, stops the stages with SIGTERM (they
//! drain and exit 0), and checks that each event arrived exactly once. The last line
//! of its output is a JSON summary.
//!
//! ```text
//! pipeline [--messages N] [--processes P] [--workers W] [--durability full|batch|none] [--dir DIR]
//! pipeline stage parse|enrich|sink --dir DIR [--workers W] [--durability ...] [--delay-ms MS]
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use dirq::piper::{Emit, Outcome, Piper, StageResult};
use dirq::{DirectoryQueue, Durability, Message, State};

type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const STAGES: [&str; 3] = ["parse", "enrich", "sink"];
const MALFORMED_EVERY: usize = 1000;

struct Options {
    messages: usize,
    processes: usize,
    workers: usize,
    durability: String,
    dir: Option<PathBuf>,
    delay_ms: u64,
}

fn parse_options(args: &[String]) -> Fallible<Options> {
    let mut options = Options {
        messages: 10_000,
        processes: 2,
        workers: 2,
        durability: "full".to_owned(),
        dir: None,
        delay_ms: 0,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--messages" => options.messages = value()?.parse()?,
            "--processes" => options.processes = value()?.parse()?,
            "--workers" => options.workers = value()?.parse()?,
            "--durability" => options.durability = value()?.clone(),
            "--dir" => options.dir = Some(PathBuf::from(value()?)),
            "--delay-ms" => options.delay_ms = value()?.parse()?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(options)
}

fn durability(name: &str) -> Fallible<Durability> {
    match name {
        "full" => Ok(Durability::Full),
        "batch" => Ok(Durability::Batch),
        "none" => Ok(Durability::None),
        other => Err(format!("unknown durability {other:?}").into()),
    }
}

fn open(dir: &Path, name: &str, options: &Options) -> Fallible<DirectoryQueue> {
    Ok(DirectoryQueue::builder(dir.join(name))
        .durability(durability(&options.durability)?)
        .open()?)
}

/// One stage process: a Piper with signal handling, until SIGTERM.
fn stage(name: &str, options: &Options) -> Fallible<()> {
    let dir = options.dir.as_deref().ok_or("stage needs --dir")?;
    let (input, output) = match name {
        "parse" => ("input", "parsed"),
        "enrich" => ("parsed", "enriched"),
        "sink" => ("enriched", "archive"),
        other => return Err(format!("unknown stage {other:?}").into()),
    };
    let delay = Duration::from_millis(options.delay_ms);
    let mut builder = Piper::builder(name);
    builder
        .input(&open(dir, input, options)?)
        .output("next", &open(dir, output, options)?)
        .workers(options.workers)
        // The archive is where events end; nothing downstream drains it.
        .out_limit(if name == "sink" { usize::MAX } else { 5000 })
        .handle_signals(true)
        .drain_timeout(Duration::from_secs(10));
    match name {
        // Valid JSON moves on unchanged (a rename); anything else fails with the reason.
        "parse" => builder.stage(move |m: &Message| -> StageResult {
            std::thread::sleep(delay);
            m.json::<serde_json::Value>()?;
            Ok(Outcome::Forward)
        }),
        // Adds a field: a new message, under the same id.
        "enrich" => builder.stage(move |m: &Message| -> StageResult {
            std::thread::sleep(delay);
            let mut event: serde_json::Value = m.json()?;
            event["Node"] = serde_json::json!([{"Name": "cz.example.enricher", "Type": ["Relay"]}]);
            Ok(Outcome::Emit(vec![Emit::json(&event)?]))
        }),
        _ => builder.stage(move |_: &Message| -> StageResult {
            std::thread::sleep(delay);
            Ok(Outcome::Forward)
        }),
    };
    let stats = builder.build()?.run()?;
    eprintln!("{name}[{}]: {stats:?}", std::process::id());
    Ok(())
}

fn event(i: usize) -> String {
    if i % MALFORMED_EVERY == MALFORMED_EVERY - 1 {
        return format!("{{\"ID\": \"{i:08}\", \"Category\": [\"Recon.Scanning\"");
    }
    format!(
        "{{\"ID\": \"{i:08}\", \"Category\": [\"Recon.Scanning\"], \"Source\": [{{\"IP4\": [\"192.0.2.{}\"]}}]}}",
        i % 250
    )
}

/// The coordinator: queues, stage processes, input, checks.
fn coordinate(options: &Options) -> Fallible<serde_json::Value> {
    let scratch;
    let dir = match &options.dir {
        Some(dir) => dir.clone(),
        None => {
            scratch = std::env::temp_dir().join(format!("dirq-pipeline-{}", std::process::id()));
            scratch.clone()
        }
    };
    let queues: HashMap<&str, DirectoryQueue> = ["input", "parsed", "enriched", "archive"]
        .into_iter()
        .map(|name| Ok((name, open(&dir, name, options)?)))
        .collect::<Fallible<_>>()?;
    println!(
        "pipeline in {}: {} messages, {} processes x {} workers per stage, durability {}",
        dir.display(),
        options.messages,
        options.processes,
        options.workers,
        options.durability
    );
    let mut children = Stages(Vec::new());
    for name in STAGES {
        for _ in 0..options.processes {
            children.0.push((name, spawn_stage(name, &dir, options)?));
        }
    }
    let expected = (0..options.messages)
        .filter(|i| i % MALFORMED_EVERY != MALFORMED_EVERY - 1)
        .count();
    let start = Instant::now();
    let input = &queues["input"];
    for chunk in (0..options.messages).collect::<Vec<_>>().chunks(500) {
        input.enqueue_batch(chunk.iter().map(|&i| event(i)))?;
    }
    let archive = &queues["archive"];
    let deadline = start + Duration::from_secs(600);
    let mut last_report = Instant::now();
    while archive.count(State::Incoming)? < expected {
        if Instant::now() > deadline {
            return Err("the pipeline did not deliver everything within 10 minutes".into());
        }
        children.check()?;
        if last_report.elapsed() > Duration::from_secs(1) {
            println!(
                "  {:>6.1}s  {}",
                start.elapsed().as_secs_f64(),
                progress(&queues)?
            );
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = start.elapsed().as_secs_f64();
    println!("  {secs:>6.1}s  {}", progress(&queues)?);

    // SIGTERM: every stage drains and exits 0.
    for (_, child) in &children.0 {
        signal(child, "TERM")?;
    }
    let mut failed_exits = Vec::new();
    for (name, child) in std::mem::take(&mut children.0) {
        let status = child.wait_with_output()?.status;
        if !status.success() {
            failed_exits.push(format!("{name}: {status}"));
        }
    }
    let verdict = verify(&queues, options.messages, expected)?;
    let rate = expected as f64 / secs;
    println!(
        "delivered {} of {expected} valid events in {secs:.2}s ({rate:.0} events/s end to end); \
         {} duplicates, {} missing; {} malformed in errors/",
        verdict.delivered, verdict.duplicates, verdict.missing, verdict.malformed
    );
    if options.dir.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    if !failed_exits.is_empty() {
        return Err(format!("stages did not exit cleanly: {failed_exits:?}").into());
    }
    Ok(serde_json::json!({
        "messages": options.messages, "expected": expected, "delivered": verdict.delivered,
        "duplicates": verdict.duplicates, "missing": verdict.missing, "malformed": verdict.malformed,
        "left_over": verdict.left_over, "secs": secs, "rate": rate,
        "processes": options.processes, "workers": options.workers, "durability": options.durability,
    }))
}

/// The stage processes; any still running when this is dropped (the coordinator
/// failed) are killed, so that nothing outlives it.
struct Stages(Vec<(&'static str, Child)>);

impl Stages {
    /// Fails if a stage process has exited: a pipeline with a dead stage never finishes.
    fn check(&mut self) -> Fallible<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                return Err(format!("the {name} stage exited early ({status})").into());
            }
        }
        Ok(())
    }
}

impl Drop for Stages {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_stage(name: &str, dir: &Path, options: &Options) -> Fallible<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args(["stage", name, "--dir"])
        .arg(dir)
        .args(["--workers", &options.workers.to_string()])
        .args(["--durability", &options.durability])
        .args(["--delay-ms", &options.delay_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?)
}

fn signal(child: &Child, name: &str) -> Fallible<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{name} {} failed", child.id()).into())
    }
}

fn progress(queues: &HashMap<&str, DirectoryQueue>) -> Fallible<String> {
    let mut line = String::new();
    for name in ["input", "parsed", "enriched", "archive"] {
        let c = queues[name].counts()?;
        line.push_str(&format!("{name} {}/{}  ", c.incoming, c.pending));
    }
    Ok(line.trim_end().to_owned())
}

struct Verdict {
    delivered: usize,
    duplicates: usize,
    missing: usize,
    malformed: usize,
    left_over: usize,
}

/// Reads the archive: each event id once, none missing; nothing left anywhere else.
fn verify(
    queues: &HashMap<&str, DirectoryQueue>,
    messages: usize,
    expected: usize,
) -> Fallible<Verdict> {
    let archive = &queues["archive"];
    let mut seen = HashMap::new();
    for id in archive.ids(State::Incoming)? {
        let (_, bytes) = dirq::admin::peek(archive, &id?)?;
        let event: serde_json::Value = serde_json::from_slice(&bytes)?;
        let key = event["ID"].as_str().unwrap_or_default().to_owned();
        *seen.entry(key).or_insert(0usize) += 1;
    }
    let duplicates = seen.values().map(|n| n - 1).sum();
    let missing = (0..messages)
        .filter(|i| i % MALFORMED_EVERY != MALFORMED_EVERY - 1)
        .filter(|i| !seen.contains_key(&format!("{i:08}")))
        .count();
    let mut left_over = 0;
    for name in ["input", "parsed", "enriched"] {
        let c = queues[name].counts()?;
        left_over += c.incoming + c.pending + c.deferred;
    }
    Ok(Verdict {
        delivered: seen.len().min(expected),
        duplicates,
        missing,
        malformed: queues["input"].counts()?.errors,
        left_over,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DIRQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("stage") => parse_options(&args[2.min(args.len())..])
            .and_then(|options| stage(args.get(1).map_or("", String::as_str), &options)),
        _ => parse_options(&args).and_then(|options| {
            let summary = coordinate(&options)?;
            println!("{summary}");
            let clean =
                summary["duplicates"] == 0 && summary["missing"] == 0 && summary["left_over"] == 0;
            if clean {
                Ok(())
            } else {
                Err("the pipeline lost or duplicated messages".into())
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipeline: {e}");
            ExitCode::FAILURE
        }
    }
}
