//! One function per subcommand: open queues, call the library, print.

use std::error::Error as StdError;
use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use dirq::{DirectoryQueue, Durability, Message, MessageId, MessageInfo, PiperInfo, State};
use serde_json::json;

use crate::args::{Cli, Command, DurabilityArg, StateArg};
use crate::human;

pub(crate) type CliResult = Result<(), Box<dyn StdError + Send + Sync>>;

/// An error with what the command was doing, for causes that do not say it themselves.
#[derive(Debug)]
struct Context {
    what: String,
    source: io::Error,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl StdError for Context {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.source)
    }
}

/// For listings: a reader that stopped reading (`dirq ls | head`) is not an error.
fn quiet_broken_pipe(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn context(what: impl Into<String>) -> impl FnOnce(io::Error) -> Context {
    move |source| Context {
        what: what.into(),
        source,
    }
}

pub(crate) fn run(cli: Cli) -> CliResult {
    let durability = match cli.durability {
        DurabilityArg::Full => Durability::Full,
        DurabilityArg::Batch => Durability::Batch,
        DurabilityArg::None => Durability::None,
    };
    let opener = Opener { durability };
    match cli.command {
        Command::Init { queues, mode } => {
            for queue in queues {
                DirectoryQueue::builder(&queue).dir_mode(mode).open()?;
            }
            Ok(())
        }
        Command::Push { queue, files } => push(&opener.open(&queue, true)?, &files),
        Command::Take {
            queue,
            count,
            to,
            wait,
            null,
        } => {
            let queue = opener.open(&queue, false)?;
            let next = to.map(|to| opener.open(&to, true)).transpose()?;
            take(
                &queue,
                next.as_ref(),
                count,
                wait,
                if null { b'\0' } else { b'\n' },
            )
        }
        Command::Status { queues, json } => {
            let queues = queues
                .iter()
                .map(|q| opener.open(q, false))
                .collect::<Result<Vec<_>, _>>()?;
            status(&queues, json)
        }
        Command::Ls { queue, state, json } => ls(&opener.open(&queue, false)?, state, json),
        Command::Cat { queue, id } => cat(&opener.open(&queue, false)?, &id),
        Command::Recover { queues, grace } => {
            for path in queues {
                let queue = DirectoryQueue::builder(&path)
                    .create(false)
                    .durability(durability)
                    .orphan_grace(grace.unwrap_or(Duration::ZERO))
                    .open()?;
                let report = queue.recover()?;
                queue.sync()?;
                println!(
                    "{}: requeued {}, left {} with live owners, {} within grace, removed {} from tmp/, \
                     quarantined {}, removed {} duplicate names",
                    path.display(),
                    report.requeued,
                    report.owned,
                    report.within_grace,
                    report.tmp_removed,
                    report.quarantined,
                    report.duplicates_removed
                );
            }
            Ok(())
        }
    }
}

/// Opens queues with the command line's durability.
struct Opener {
    durability: Durability,
}

impl Opener {
    fn open(&self, path: &Path, create: bool) -> Result<DirectoryQueue, dirq::Error> {
        DirectoryQueue::builder(path)
            .create(create)
            .durability(self.durability)
            .open()
    }
}

fn push(queue: &DirectoryQueue, files: &[std::ffi::OsString]) -> CliResult {
    let stdin_only = [std::ffi::OsString::from("-")];
    let files = if files.is_empty() {
        &stdin_only[..]
    } else {
        files
    };
    let mut out = io::stdout().lock();
    for file in files {
        let id = if file == OsStr::new("-") {
            queue.enqueue_reader(io::stdin().lock())?
        } else {
            let input = std::fs::File::open(file).map_err(context(format!(
                "failed to open input file {}",
                Path::new(file).display()
            )))?;
            queue.enqueue_reader(input)?
        };
        writeln!(out, "{id}").map_err(context("failed to write to standard output"))?;
    }
    queue.sync()?;
    Ok(())
}

fn take(
    queue: &DirectoryQueue,
    next: Option<&DirectoryQueue>,
    count: u64,
    wait: Option<Duration>,
    separator: u8,
) -> CliResult {
    let mut out = io::stdout().lock();
    let mut taken = 0;
    while taken < count {
        let claimed = match (taken, wait) {
            (0, Some(wait)) => queue.claim_timeout(wait)?,
            _ => queue.try_claim()?,
        };
        let Some(message) = claimed else { break };
        match next {
            Some(next) => {
                let id = message.id().clone();
                message.forward(next)?;
                writeln!(out, "{id}").map_err(context("failed to write to standard output"))?;
            }
            None => print_then_commit(message, &mut out, separator)?,
        }
        taken += 1;
    }
    queue.sync()?;
    Ok(())
}

/// Writes the message and its separator, and commits it only once they are out; a
/// message that could not be written goes back to `incoming/`.
fn print_then_commit(message: Message, out: &mut impl Write, separator: u8) -> CliResult {
    let written = io::copy(&mut message.reader(), out)
        .and_then(|_| out.write_all(&[separator]))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        let id = message.id().clone();
        if let Err(release) = message.release() {
            tracing::warn!(%id, error = %release, "cannot release message");
        }
        return Err(Box::new(context(format!(
            "failed to write message {id} to standard output; it was put back"
        ))(e)));
    }
    message.commit()?;
    Ok(())
}

fn status(queues: &[DirectoryQueue], json: bool) -> CliResult {
    let mut out = io::stdout().lock();
    let write_error = context("failed to write to standard output");
    let mut rows = Vec::new();
    for queue in queues {
        rows.push((queue, queue.counts()?, queue.oldest_age()?, queue.pipers()?));
    }
    let result = (|| {
        if json {
            for (queue, counts, oldest, pipers) in &rows {
                let line = json!({
                    "queue": queue.root().to_string_lossy(),
                    "incoming": counts.incoming,
                    "pending": counts.pending,
                    "errors": counts.errors,
                    "tmp": counts.tmp,
                    "deferred": counts.deferred,
                    "hold": counts.hold,
                    "oldest_age_s": oldest.map(|d| d.as_secs_f64()),
                    "pipers": pipers.iter().map(piper_json).collect::<Vec<_>>(),
                });
                writeln!(out, "{line}")?;
            }
            return Ok(());
        }
        writeln!(
            out,
            "{:<30} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>8}",
            "QUEUE", "INCOMING", "PENDING", "ERRORS", "DEFERRED", "HOLD", "TMP", "OLDEST"
        )?;
        for (queue, counts, oldest, pipers) in &rows {
            writeln!(
                out,
                "{:<30} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>8}",
                queue.root().display(),
                counts.incoming,
                counts.pending,
                counts.errors,
                counts.deferred,
                counts.hold,
                counts.tmp,
                oldest.map_or_else(|| "-".to_owned(), human::duration)
            )?;
            for piper in pipers {
                writeln!(out, "  {}", piper_line(piper))?;
            }
        }
        Ok(())
    })();
    quiet_broken_pipe(result).map_err(|e| Box::new(write_error(e)) as _)
}

fn piper_json(piper: &PiperInfo) -> serde_json::Value {
    json!({
        "stage": piper.stage,
        "pid": piper.pid,
        "host": piper.host,
        "live": piper.live,
        "state": if piper.live { piper.state.as_str() } else { "stale" },
        "started": piper.started,
        "heartbeat": piper.heartbeat,
        "workers": piper.workers,
        "stats": piper.stats,
        "rates": piper.rates,
    })
}

fn piper_line(piper: &PiperInfo) -> String {
    if !piper.live {
        return format!(
            "piper {} pid {}@{}: stale (the process is gone; last heartbeat {})",
            piper.stage, piper.pid, piper.host, piper.heartbeat
        );
    }
    let s = &piper.stats;
    format!(
        "piper {} pid {}@{}: {}, {} workers, {:.1}/s done, {:.1}/s failing; \
         {} claimed, {} failed, {} retried, {} in flight",
        piper.stage,
        piper.pid,
        piper.host,
        piper.state,
        piper.workers,
        piper.rates.done,
        piper.rates.failed,
        s.claimed,
        s.failed,
        s.retried,
        s.in_flight
    )
}

fn ls(queue: &DirectoryQueue, state: Option<StateArg>, json: bool) -> CliResult {
    let states = match state {
        Some(StateArg::Incoming) => vec![State::Incoming],
        Some(StateArg::Pending) => vec![State::Pending],
        Some(StateArg::Errors) => vec![State::Errors],
        Some(StateArg::Tmp) => vec![State::Tmp],
        Some(StateArg::Deferred) => vec![State::Deferred],
        Some(StateArg::Hold) => vec![State::Hold],
        None => vec![
            State::Incoming,
            State::Pending,
            State::Deferred,
            State::Hold,
            State::Errors,
        ],
    };
    let mut lines = Vec::new();
    for state in states {
        for info in queue.list(state)? {
            lines.push(if json {
                ls_json(&info)
            } else {
                ls_human(&info)
            });
        }
    }
    let mut out = io::stdout().lock();
    let written = lines.iter().try_for_each(|line| writeln!(out, "{line}"));
    quiet_broken_pipe(written).map_err(context("failed to write to standard output"))?;
    Ok(())
}

fn ls_json(info: &MessageInfo) -> String {
    let mut line = json!({
        "id": info.id.as_os_str().to_string_lossy(),
        "state": info.state.as_str(),
        "size": info.size,
        "age_s": info.age.map(|d| d.as_secs_f64()),
        "attempts": info.attempts,
    });
    if let Some(when) = info.not_before {
        line["not_before"] = json!(unix_seconds(when));
    }
    if info.state == State::Errors {
        line["reason"] = json!(info.failure.as_ref().and_then(|f| f.reason.clone()));
    }
    line.to_string()
}

fn ls_human(info: &MessageInfo) -> String {
    let mut line = format!(
        "{:<8} {:>10} {:>7}  {}",
        info.state,
        human::size(info.size),
        info.age.map_or_else(|| "-".to_owned(), human::duration),
        info.id
    );
    if !info.regular {
        line.push_str("  (not a regular file)");
    }
    if let Some(attempts) = info.attempts.filter(|&a| a > 0) {
        line.push_str(&format!("  attempts: {attempts}"));
    }
    if let Some(when) = info.not_before {
        let wait = when
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        line.push_str(&format!("  due in {}", human::duration(wait)));
    }
    if let Some(reason) = info.failure.as_ref().and_then(|f| f.reason.as_deref()) {
        line.push_str("  reason: ");
        line.push_str(reason);
    }
    line
}

fn unix_seconds(time: std::time::SystemTime) -> f64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn cat(queue: &DirectoryQueue, id: &OsStr) -> CliResult {
    let id = MessageId::new(id)?;
    let (_, bytes) = queue.peek(&id)?;
    let mut out = io::stdout().lock();
    quiet_broken_pipe(out.write_all(&bytes).and_then(|()| out.flush()))
        .map_err(context("failed to write to standard output"))?;
    Ok(())
}
