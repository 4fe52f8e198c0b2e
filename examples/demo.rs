//! A pipeline at work: `cargo run --release --example demo`.
//!
//! ```text
//! producer ──▶ input ──[parse ×2]──▶ parsed ──[enrich ×2]──▶ enriched ──[sink]
//!                 └──▶ errors/ (malformed events, with a reason)
//! ```
//!
//! Every queue is a directory under a temporary directory; every stage is a
//! [`Piper`]. `parse` forwards valid events by rename and fails the rest into
//! `errors/`; `enrich` adds a field and emits a new message, retrying events whose
//! lookup fails (with backoff), and survives a bug that panics on one event; the sink
//! is slow, so `enrich` pauses when `enriched/` holds 300 events (backpressure) and
//! resumes when it drains. At the end the demo checks that every valid event arrived
//! exactly once. Pass `--keep` to keep the queues and look at them with `dirq`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dirq::piper::{Emit, Outcome, Piper, StageResult};
use dirq::queue::RetryPolicy;
use dirq::{DirectoryQueue, Message, State};

const EVENTS: usize = 5_000;
const MALFORMED_EVERY: usize = 97;
const FLAKY_EVERY: usize = 53;
const BUGGY_EVENT: usize = 4_242;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keep = std::env::args().any(|a| a == "--keep");
    // One line instead of a backtrace: the Piper contains the panic and retries.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        println!(
            "  !! a stage panicked ({what}); the Piper retries that message with a fresh stage"
        );
    }));
    let root = std::env::temp_dir().join(format!("dirq-demo-{}", std::process::id()));
    println!(
        "dirq demo: a 3-stage pipeline of Pipers in {}\n",
        root.display()
    );
    let retries = RetryPolicy::builder()
        .initial(Duration::from_millis(100))
        .max_attempts(5)
        .build()?;
    let open = |name: &str| {
        DirectoryQueue::builder(root.join(name))
            .retry_policy(retries)
            .open()
    };
    let (input, parsed, enriched) = (open("input")?, open("parsed")?, open("enriched")?);

    let parse = Piper::builder("parse")
        .input(&input)
        .output("parsed", &parsed)
        .workers(2)
        .stage(|m: &Message| -> StageResult {
            m.json::<serde_json::Value>()?; // malformed: fails with the decoder's reason
            Ok(Outcome::Forward)
        })
        .build()?;
    let panicked_once = Arc::new(AtomicBool::new(false));
    let enrich = Piper::builder("enrich")
        .input(&parsed)
        .output("enriched", &enriched)
        .workers(2)
        .out_limit(300)
        .stage(move |m: &Message| -> StageResult {
            let mut event: serde_json::Value = m.json()?;
            let n: usize = event["ID"].as_str().unwrap_or("0").parse()?;
            if n == BUGGY_EVENT && !panicked_once.swap(true, Ordering::SeqCst) {
                panic!("a bug in the enricher (event {n})");
            }
            if n % FLAKY_EVERY == 0 && m.attempts()? == 1 {
                return Ok(Outcome::Retry("geo lookup timed out".into()));
            }
            event["Country"] = "CZ".into();
            Ok(Outcome::Emit(vec![Emit::json(&event)?]))
        })
        .build()?;
    let delivered = Arc::new(Mutex::new(HashSet::new()));
    let duplicates = Arc::new(Mutex::new(0usize));
    let (seen, dups) = (Arc::clone(&delivered), Arc::clone(&duplicates));
    let sink = Piper::builder("sink")
        .input(&enriched)
        .stage(move |m: &Message| -> StageResult {
            thread::sleep(Duration::from_micros(300)); // a slow database
            let event: serde_json::Value = m.json()?;
            let id = event["ID"].as_str().unwrap_or_default().to_owned();
            if !seen.lock().map_err(|_| "poisoned")?.insert(id) {
                *dups.lock().map_err(|_| "poisoned")? += 1;
            }
            Ok(Outcome::Commit)
        })
        .build()?;

    let handles = [parse.handle(), enrich.handle(), sink.handle()];
    let start = Instant::now();
    let runners: Vec<_> = [parse, enrich, sink]
        .into_iter()
        .map(|piper| thread::spawn(move || piper.run()))
        .collect();
    let producer = {
        let input = input.clone();
        thread::spawn(move || -> Result<(), dirq::Error> {
            for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(100) {
                input.enqueue_batch(chunk.iter().map(|&i| event(i)))?;
                thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
    };

    let expected = EVENTS - EVENTS.div_ceil(MALFORMED_EVERY);
    println!(
        "  {:>6}  {:>17}  {:>17}  {:>17}  {:>9}",
        "time", "input", "parsed", "enriched", "delivered"
    );
    println!(
        "  {:>6}  {:>17}  {:>17}  {:>17}",
        "", "wait/pend/err/def", "wait/pend/err/def", "wait/pend/err/def"
    );
    let mut was_paused = false;
    loop {
        thread::sleep(Duration::from_millis(250));
        let done = delivered.lock().map_err(|_| "poisoned")?.len();
        let mut line = format!("  {:>5.2}s  ", start.elapsed().as_secs_f64());
        for queue in [&input, &parsed, &enriched] {
            let c = queue.counts()?;
            line.push_str(&format!(
                "{:>17}  ",
                format!("{}/{}/{}/{}", c.incoming, c.pending, c.errors, c.deferred)
            ));
        }
        line.push_str(&format!("{done:>9}"));
        let paused = handles[1].is_paused();
        if paused != was_paused {
            line.push_str(if paused {
                "   << enrich paused: enriched/ is full"
            } else {
                "   >> enrich resumed"
            });
            was_paused = paused;
        }
        println!("{line}");
        if done >= expected || start.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    producer.join().map_err(|_| "the producer panicked")??;
    for handle in &handles {
        handle.shutdown();
    }
    let mut stats = Vec::new();
    for runner in runners {
        stats.push(runner.join().map_err(|_| "a piper panicked")??);
    }

    let delivered = delivered.lock().map_err(|_| "poisoned")?.len();
    let duplicates = *duplicates.lock().map_err(|_| "poisoned")?;
    let failed = input.counts()?.errors;
    println!(
        "\ndelivered {delivered} events exactly once ({duplicates} duplicates) and {failed} malformed ones \
         to errors/, in {:.2}s",
        start.elapsed().as_secs_f64()
    );
    for (name, s) in ["parse", "enrich", "sink"].iter().zip(&stats) {
        println!(
            "  {name:<6} claimed {:>5}  forwarded {:>5}  emitted {:>5}  failed {:>3}  retried {:>3}  \
             panics {}  paused {:.1}s",
            s.claimed, s.forwarded, s.emitted, s.failed, s.retried, s.panics, s.paused_ms as f64 / 1000.0
        );
    }
    if let Some(info) = dirq::admin::list(&input, State::Errors)?.first() {
        let reason = info
            .failure
            .as_ref()
            .and_then(|f| f.reason.clone())
            .unwrap_or_default();
        println!("one failure: errors/{}\n  reason: {reason}", info.id);
    }
    if duplicates > 0 || delivered + failed != EVENTS {
        return Err("the pipeline lost or duplicated events".into());
    }
    finish(&root, keep)
}

fn event(i: usize) -> String {
    if i % MALFORMED_EVERY == 0 {
        return format!("{{\"ID\": \"{i:06}\", \"Category\": [\"Recon.Scanning\"");
    }
    format!(
        "{{\"ID\": \"{i:06}\", \"Category\": [\"Recon.Scanning\"], \"Source\": [{{\"IP4\": [\"192.0.2.{}\"]}}]}}",
        i % 250
    )
}

fn finish(root: &Path, keep: bool) -> Result<(), Box<dyn std::error::Error>> {
    if keep {
        println!("\nThe queues are kept. Look at them with the dirq command, for example:");
        println!(
            "  cargo build --release && target/release/dirq status {}/*",
            root.display()
        );
        println!(
            "  target/release/dirq ls --state errors {}",
            root.join("input").display()
        );
        println!("  rm -r {}    # when done", root.display());
    } else {
        std::fs::remove_dir_all(root)?;
        println!("\n(queues removed; run with --keep to inspect them with the dirq command)");
    }
    Ok(())
}
