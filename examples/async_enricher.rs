//! An async stage that waits on a slow service:
//! `cargo run --release --features tokio --example async_enricher`.
//!
//! ```text
//! input ──[enrich: 1 worker, 256 calls in flight]──▶ enriched
//!                │  one TCP call per message
//!                ▼
//!        lookup service on 127.0.0.1 (10 ms a call, served by this example)
//! ```
//!
//! A sync Piper would need a thread per call in flight; here one worker thread claims
//! and carries out outcomes while the calls wait on tokio's reactor. The example checks
//! that every message came out enriched exactly once, and prints its rate.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use dirq::piper::{AsyncStage, Emit, Outcome, Piper, StageResult};
use dirq::{DirectoryQueue, Message, State};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const MESSAGES: usize = 3_000;
const IN_FLIGHT: usize = 256;
const CALL: Duration = Duration::from_millis(10);

/// The slow service: reads a line, waits 10 ms, answers `<line> enriched`.
async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tokio::time::sleep(CALL).await;
                if write
                    .write_all(format!("{line} enriched\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

/// Calls the service for each message and emits its answer.
struct Enrich {
    service: std::net::SocketAddr,
}

impl AsyncStage for Enrich {
    async fn process(&self, message: &Message) -> StageResult {
        let text = String::from_utf8(message.bytes()?)?;
        let stream = TcpStream::connect(self.service).await?;
        let (read, mut write) = stream.into_split();
        write.write_all(format!("{text}\n").as_bytes()).await?;
        let Some(answer) = BufReader::new(read).lines().next_line().await? else {
            // The service went away: try the message again later.
            return Ok(Outcome::Retry(
                "the service closed the connection".to_owned(),
            ));
        };
        Ok(Outcome::Emit(vec![Emit::new(answer)]))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let service = listener.local_addr()?;
    runtime.spawn(serve(listener));

    let dir = tempfile::tempdir()?;
    let input = DirectoryQueue::open(dir.path().join("input"))?;
    let enriched = DirectoryQueue::open(dir.path().join("enriched"))?;
    for i in 0..MESSAGES {
        input.enqueue(format!("event {i}").as_bytes())?;
    }

    let piper = Piper::builder("enrich")
        .input(&input)
        .output("enriched", &enriched)
        .workers(1)
        .advertise(false)
        .runtime(runtime.handle().clone())
        .async_stage(Enrich { service }, IN_FLIGHT)
        .build()?;
    let handle = piper.handle();
    let started = Instant::now();
    let runner = std::thread::spawn(move || piper.run());
    let deadline = started + Duration::from_secs(30);
    loop {
        let stats = handle.stats();
        if stats.emitted as usize >= MESSAGES {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {} of {MESSAGES} enriched in 30 s", stats.emitted).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();
    handle.shutdown();
    let stats = runner.join().map_err(|_| "the piper thread panicked")??;

    // Every event came out enriched, once.
    let mut seen = HashSet::new();
    while let Some(message) = enriched.try_claim()? {
        let text = String::from_utf8(message.bytes()?)?;
        assert!(text.ends_with(" enriched"), "{text:?}");
        assert!(seen.insert(text), "a duplicate");
        message.commit()?;
    }
    assert_eq!(seen.len(), MESSAGES);
    assert_eq!(input.count(State::Errors)?, 0);
    let rate = MESSAGES as f64 / elapsed.as_secs_f64();
    println!(
        "enriched {MESSAGES} messages in {:.2} s: {rate:.0} messages/s with {IN_FLIGHT} calls of {} ms in flight \
         on one worker (a sync worker does at most {:.0}/s); runtime stalls: {}",
        elapsed.as_secs_f64(),
        CALL.as_millis(),
        1.0 / CALL.as_secs_f64(),
        stats.runtime_stalls
    );
    Ok(())
}
