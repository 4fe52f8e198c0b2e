//! A small pipeline at work: `cargo run --release --example demo`.
//!
//! ```text
//! producer ──▶ input ──[parse ×2]──▶ parsed ──[enrich ×2]──▶ enriched ──[sink]──▶ done
//!                 └──▶ errors/ (malformed events, with a reason)
//! ```
//!
//! Every queue is a directory under a temporary directory. The producer writes security
//! events (some malformed); two `parse` workers forward the valid ones by rename and
//! fail the rest into `errors/`; two `enrich` workers add a field and emit a new
//! message; a sink counts what arrives. One `enrich` worker "crashes" holding a
//! message, and recovery hands it to the other. At the end the demo checks that every
//! valid event arrived exactly once. Pass `--keep` to keep the queues and look at them
//! with the `dirq` command.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use dirq::{DirectoryQueue, Durability, State};

const EVENTS: usize = 5_000;
const MALFORMED_EVERY: usize = 97;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keep = std::env::args().any(|a| a == "--keep");
    let root = std::env::temp_dir().join(format!("dirq-demo-{}", std::process::id()));
    println!("dirq demo: a 3-stage pipeline in {}\n", root.display());
    let open = |name: &str| {
        DirectoryQueue::builder(root.join(name))
            .durability(Durability::Full)
            .open()
    };
    let (input, parsed, enriched) = (open("input")?, open("parsed")?, open("enriched")?);

    let producing = AtomicBool::new(true);
    let delivered = Mutex::new(HashSet::new());
    let duplicates = AtomicUsize::new(0);
    let crashed_once = AtomicBool::new(false);
    let start = Instant::now();

    thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
        // Producer: events in batches of 50, one durability barrier per batch.
        s.spawn(|| {
            for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(50) {
                let events: Vec<String> = chunk.iter().map(|&i| event(i)).collect();
                input.enqueue_batch(&events).expect("enqueue");
            }
            producing.store(false, Ordering::SeqCst);
        });
        // parse ×2: valid JSON moves on by rename (same id); the rest is failed.
        for _ in 0..2 {
            let (input, parsed) = (DirectoryQueue::open(input.root()).expect("open"), &parsed);
            s.spawn(move || {
                while let Some(message) = claim(&input) {
                    match message.json::<serde_json::Value>() {
                        Ok(_) => message.forward(parsed).expect("forward"),
                        Err(e) => {
                            let reason = format!(
                                "invalid JSON: {}",
                                std::error::Error::source(&e)
                                    .map_or(e.to_string(), |c| c.to_string())
                            );
                            message.fail(reason).expect("fail");
                        }
                    }
                }
            });
        }
        // enrich ×2: add a field, emit the enriched event as a new message, then commit.
        for worker in 0..2 {
            let (parsed, enriched, crashed_once) = (
                DirectoryQueue::open(parsed.root()).expect("open"),
                &enriched,
                &crashed_once,
            );
            s.spawn(move || {
                while let Some(message) = claim(&parsed) {
                    if worker == 1 && !crashed_once.swap(true, Ordering::SeqCst) {
                        // Simulate a worker dying mid-message: no terminal. The message
                        // stays in pending/, unlocked, until recovery requeues it.
                        println!(
                            "  !! enrich worker {worker} crashes holding {}",
                            message.id()
                        );
                        drop(message);
                        continue;
                    }
                    let mut value: serde_json::Value = message.json().expect("parsed JSON");
                    value["Country"] = "CZ".into();
                    enriched.enqueue_json(&value).expect("emit");
                    message.commit().expect("commit");
                }
            });
        }
        // sink: count each event id once.
        s.spawn(|| {
            let enriched = DirectoryQueue::open(enriched.root()).expect("open");
            while let Some(message) = claim(&enriched) {
                let value: serde_json::Value = message.json().expect("enriched JSON");
                let id = value["ID"].as_str().unwrap_or_default().to_owned();
                if !delivered.lock().expect("lock").insert(id) {
                    duplicates.fetch_add(1, Ordering::Relaxed);
                }
                message.commit().expect("commit");
            }
        });
        // The operator's view, and periodic recovery (as a long-running stage would do).
        let expected = EVENTS - EVENTS.div_ceil(MALFORMED_EVERY);
        let mut last_recover = Instant::now();
        println!(
            "  {:>6}  {:>15}  {:>15}  {:>15}  {:>9}",
            "time", "input", "parsed", "enriched", "delivered"
        );
        println!(
            "  {:>6}  {:>15}  {:>15}  {:>15}",
            "", "wait/pend/err", "wait/pend/err", "wait/pend/err"
        );
        loop {
            thread::sleep(Duration::from_millis(250));
            let done = delivered.lock().expect("lock").len();
            println!(
                "  {:>5.2}s  {}",
                start.elapsed().as_secs_f64(),
                status_line(&[&input, &parsed, &enriched], done)?
            );
            if last_recover.elapsed() > Duration::from_secs(1) {
                let report = parsed.recover()?;
                if report.requeued > 0 {
                    println!(
                        "  >> recover(): requeued {} message(s) of a dead worker",
                        report.requeued
                    );
                }
                last_recover = Instant::now();
            }
            if done >= expected && !producing.load(Ordering::SeqCst) {
                STOP.store(true, Ordering::SeqCst);
                break;
            }
            if start.elapsed() > Duration::from_secs(120) {
                STOP.store(true, Ordering::SeqCst);
                return Err("the pipeline did not finish within 2 minutes".into());
            }
        }
        Ok(())
    })?;

    let delivered = delivered.into_inner()?.len();
    let failed = input.counts()?.errors;
    println!("\ndelivered {delivered} events exactly once ({} duplicates), {failed} malformed events in errors/, in {:.2}s",
        duplicates.load(Ordering::Relaxed), start.elapsed().as_secs_f64());
    if let Some(info) = input.list(State::Errors)?.first() {
        let reason = info
            .failure
            .as_ref()
            .and_then(|f| f.reason.clone())
            .unwrap_or_default();
        println!("one of them: errors/{}  reason: {reason}", info.id);
    }
    assert_eq!(
        duplicates.load(Ordering::Relaxed),
        0,
        "no event may arrive twice"
    );
    assert_eq!(
        delivered + failed,
        EVENTS,
        "every event is delivered or failed"
    );
    finish(&root, keep)
}

/// Stops the workers once the operator loop has seen everything arrive.
static STOP: AtomicBool = AtomicBool::new(false);

/// Waits for a message, giving up once the demo is over.
fn claim(queue: &DirectoryQueue) -> Option<dirq::Message> {
    while !STOP.load(Ordering::SeqCst) {
        if let Some(message) = queue
            .claim_timeout(Duration::from_millis(100))
            .expect("claim")
        {
            return Some(message);
        }
    }
    None
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

fn status_line(queues: &[&DirectoryQueue], delivered: usize) -> Result<String, dirq::Error> {
    let mut line = String::new();
    for queue in queues {
        let c = queue.counts()?;
        line.push_str(&format!(
            "{:>15}  ",
            format!("{}/{}/{}", c.incoming, c.pending, c.errors)
        ));
    }
    line.push_str(&format!("{delivered:>9}"));
    Ok(line)
}

fn finish(root: &Path, keep: bool) -> Result<(), Box<dyn std::error::Error>> {
    let dirq = PathBuf::from("target/release/dirq");
    if keep {
        println!("\nThe queues are kept. Look at them with the dirq command, for example:");
        println!(
            "  cargo build --release && {} status {}/*",
            dirq.display(),
            root.display()
        );
        println!(
            "  {} ls --state errors {}",
            dirq.display(),
            root.join("input").display()
        );
        println!("  rm -r {}    # when done", root.display());
    } else {
        std::fs::remove_dir_all(root)?;
        println!("\n(queues removed; run with --keep to inspect them with the dirq command)");
    }
    Ok(())
}
