//! The child processes of the torture cases: this same executable run with
//! `--role NAME ARGS...`. Each role prints what it acknowledged on standard output, one
//! line per acknowledgement, written before it goes on (standard output is
//! line-buffered), so that a parent that kills it knows exactly what was acknowledged.

use std::io::Write;
use std::time::Duration;

use dirq::piper::{BreakerPolicy, Emit, Outcome, Piper, PiperBuilder};
use dirq::queue::RetryPolicy;
use dirq::{DirectoryQueue, Durability, Message};

use crate::inventory::payload;

type RoleResult = Result<(), Box<dyn std::error::Error>>;

pub fn main(args: &[String]) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["produce", queue, first, count, size, pause_ms] => produce(
            queue,
            first.parse().unwrap_or(0),
            count.parse().unwrap_or(0),
            size.parse().unwrap_or(200),
            Duration::from_millis(pause_ms.parse().unwrap_or(0)),
        ),
        ["stage", input, output, workers, max_attempts, how @ ..] => stage(
            input,
            output,
            workers.parse().unwrap_or(1),
            max_attempts.parse().unwrap_or(5),
            how.first() == Some(&"emit"),
        ),
        #[cfg(feature = "tokio")]
        ["async-stage", input, output, in_flight, max_attempts] => async_stage(
            input,
            output,
            in_flight.parse().unwrap_or(1),
            max_attempts.parse().unwrap_or(5),
        ),
        ["hold", queue, count] => hold(queue, count.parse().unwrap_or(1)),
        ["crashpoint", rest @ ..] => crate::crash_points::child(rest),
        ["powercut", rest @ ..] => crate::power_cut::child(rest),
        ["gcpipe", rest @ ..] => crate::group_commit::child(rest),
        ["drain", rest @ ..] => crate::scale::child(rest),
        _ => Err(format!("unknown role {args:?}").into()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            let mut text = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("role {args:?} failed: {text}");
            1
        }
    }
}

/// Opens (creating) a queue with full durability and `max_attempts`.
pub fn open(path: &str, max_attempts: u32) -> dirq::Result<DirectoryQueue> {
    DirectoryQueue::builder(path)
        .durability(Durability::Full)
        .retry_policy(
            RetryPolicy::builder()
                .initial(Duration::from_millis(20))
                .max_delay(Duration::from_millis(200))
                .max_attempts(max_attempts)
                .build()?,
        )
        .open()
}

/// Enqueues payloads `first..first + count`, printing `SEQ ID` once each is
/// acknowledged, pausing between them.
fn produce(queue: &str, first: u64, count: u64, size: usize, pause: Duration) -> RoleResult {
    let queue = open(queue, 5)?;
    let mut out = std::io::stdout().lock();
    for seq in first..first + count {
        let id = queue.enqueue(payload(seq, size))?;
        writeln!(out, "{seq} {id}")?;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    Ok(())
}

/// A Piper named `name` over `input` with `workers` threads, until SIGTERM, and
/// whether it forwards (to `output`; `-`: nowhere, its stage commits). No breaker, and
/// no backpressure: the sink of a test pipeline is not drained.
fn piper(
    name: &str,
    input: &str,
    output: &str,
    workers: usize,
    max_attempts: u32,
) -> Result<(PiperBuilder, bool), Box<dyn std::error::Error>> {
    let input = open(input, max_attempts)?;
    let mut builder = Piper::builder(name);
    builder
        .input(&input)
        .workers(workers)
        .handle_signals(true)
        .breaker(&BreakerPolicy::disabled())
        .recover_interval(Duration::from_millis(500))
        .out_limit(1 << 30)
        .drain_timeout(Duration::from_secs(10));
    let forward = output != "-";
    if forward {
        builder.output("next", &open(output, max_attempts)?);
    }
    Ok((builder, forward))
}

/// A Piper forwarding from `input` to `output` (committing when `output` is `-`; with
/// `emit`, publishing a copy into `output` and committing the original) with `workers`
/// threads until SIGTERM, recovering its input at start. Messages whose
/// bytes start with `poison-` misbehave: `poison-error` fails the stage, `poison-panic`
/// panics in it and `poison-kill` kills the whole process with SIGKILL.
fn stage(input: &str, output: &str, workers: usize, max_attempts: u32, emit: bool) -> RoleResult {
    let (mut builder, forward) = piper("torture", input, output, workers, max_attempts)?;
    builder.stage(move |message: &Message| -> dirq::piper::StageResult {
        let bytes = message.bytes()?;
        if bytes.starts_with(b"poison-error") {
            return Err("poison: the stage rejects this message".into());
        }
        if bytes.starts_with(b"poison-panic") {
            panic!("poison: the stage panics on this message");
        }
        if bytes.starts_with(b"poison-kill") {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
        Ok(match (forward, emit) {
            (true, true) => Outcome::Emit(vec![Emit::new(bytes)]),
            (true, false) => Outcome::Forward,
            (false, _) => Outcome::Commit,
        })
    });
    let stats = builder.build()?.run()?;
    eprintln!("stage ended: {stats:?}");
    Ok(())
}

/// Forwards after waiting 0 to 4 ms on the runtime (from the message's id, so that
/// futures finish out of order); commits when there is no next queue.
#[cfg(feature = "tokio")]
struct Waiter {
    forward: bool,
}

#[cfg(feature = "tokio")]
impl dirq::piper::AsyncStage for Waiter {
    async fn process(&self, message: &Message) -> dirq::piper::StageResult {
        let _bytes = message.bytes()?;
        let spread = message
            .id()
            .to_string()
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        tokio::time::sleep(Duration::from_micros(spread % 4000)).await;
        Ok(if self.forward {
            Outcome::Forward
        } else {
            Outcome::Commit
        })
    }
}

/// As [`stage`], with an async stage: one worker, up to `in_flight` futures on the
/// Piper's own runtime, until SIGTERM.
#[cfg(feature = "tokio")]
fn async_stage(input: &str, output: &str, in_flight: usize, max_attempts: u32) -> RoleResult {
    let (mut builder, forward) = piper("torture-async", input, output, 1, max_attempts)?;
    builder.async_stage(Waiter { forward }, in_flight);
    let stats = builder.build()?.run()?;
    eprintln!("async stage ended: {stats:?}");
    Ok(())
}

/// Claims `count` messages and holds them, printing `claimed SEQ` for each; then
/// enqueues standard input as one streamed message, printing `writing` when its
/// temporary file exists (locked) and `enqueued` when it is published; then commits
/// the claims and prints `done`. Killed or stopped while it reads its input, it leaves
/// owned (or orphaned) claims and a temporary file behind.
fn hold(queue: &str, count: usize) -> RoleResult {
    let queue = open(queue, 1000)?;
    let mut claims = Vec::new();
    while claims.len() < count {
        let message = queue.try_claim()?.ok_or("not enough messages to hold")?;
        println!("claimed {}", crate::inventory::parse(&message.bytes()?)?);
        claims.push(message);
    }
    queue.enqueue_reader(Announced {
        inner: std::io::stdin().lock(),
        announced: false,
    })?;
    println!("enqueued");
    for message in claims {
        message.commit()?;
    }
    println!("done");
    Ok(())
}

/// A reader that prints `writing` the first time it is read from.
struct Announced<R> {
    inner: R,
    announced: bool,
}

impl<R: std::io::Read> std::io::Read for Announced<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.announced {
            self.announced = true;
            println!("writing");
        }
        self.inner.read(buf)
    }
}
