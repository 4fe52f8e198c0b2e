//! A stage that retries: `cargo run --release --example retry`.
//!
//! Events are sent to a flaky backend that fails a third of the calls (with a reason).
//! The stage asks for a retry each time; the queue's backoff spaces the attempts
//! (50 ms, 100 ms, 200 ms, ...). Events the backend always rejects are dead-lettered
//! into `errors/` after the fourth attempt, with the last reason.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirq::piper::{Outcome, Piper, StageResult};
use dirq::queue::RetryPolicy;
use dirq::{DirectoryQueue, Message, State};

const EVENTS: usize = 60;

/// The flaky backend: rejects every 13th event always, and fails a third of the
/// other calls, depending on the event and the attempt.
fn backend(event: &str, attempt: u32) -> Result<(), String> {
    let n: usize = event.trim_start_matches("event-").parse().unwrap_or(0);
    if n % 13 == 0 && n > 0 {
        return Err(format!("backend rejects {event}: malformed source address"));
    }
    let mut hasher = DefaultHasher::new();
    (event, attempt).hash(&mut hasher);
    if hasher.finish() % 3 == 0 {
        return Err("backend busy (HTTP 503)".to_owned());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let events = DirectoryQueue::builder(dir.path().join("events"))
        .retry_policy(
            RetryPolicy::builder()
                .initial(Duration::from_millis(50))
                .factor(2.0)
                .max_attempts(4)
                .build()?,
        )
        .open()?;
    for i in 0..EVENTS {
        events.enqueue(format!("event-{i}"))?;
    }
    println!("{EVENTS} events; the backend fails a third of the calls and rejects every 13th event outright");

    let delivered = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&delivered);
    let piper = Piper::builder("deliver")
        .input(&events)
        .workers(4)
        .breaker(&dirq::piper::BreakerPolicy::disabled())
        .stage(move |message: &Message| -> StageResult {
            let event = String::from_utf8_lossy(&message.bytes()?).into_owned();
            let attempt = message.attempts()?;
            match backend(&event, attempt) {
                Ok(()) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                    if attempt > 1 {
                        println!("  {event}: delivered on attempt {attempt}");
                    }
                    Ok(Outcome::Commit)
                }
                Err(reason) => Ok(Outcome::Retry(reason)),
            }
        })
        .build()?;
    let handle = piper.handle();
    let start = Instant::now();
    let runner = std::thread::spawn(move || piper.run());
    while events.counts()?.unfinished() > 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    handle.shutdown();
    let stats = runner.join().map_err(|_| "the piper panicked")??;

    println!(
        "\nin {:.2}s: {} delivered, {} retries, {} dead letters",
        start.elapsed().as_secs_f64(),
        delivered.load(Ordering::Relaxed),
        stats.retried,
        stats.dead_lettered
    );
    for info in dirq::admin::list(&events, State::Errors)? {
        let failure = info.failure.unwrap_or_default();
        println!(
            "  errors/{}  after {} attempts: {}",
            info.id,
            failure.attempts.unwrap_or(0),
            failure.reason.unwrap_or_default()
        );
    }
    assert_eq!(
        delivered.load(Ordering::Relaxed) + stats.dead_lettered as usize,
        EVENTS
    );
    Ok(())
}
