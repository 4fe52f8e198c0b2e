//! Looking at queues: status, ls, ages.

use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dirq::admin::{HistoryCounts, MessageInfo};
use dirq::piper::PiperInfo;
use dirq::queue::Counts;
use dirq::{DirectoryQueue, State};
use serde_json::json;

use crate::args::StateArg;
use crate::human;
use crate::output::{quiet_broken_pipe, stdout_error, CliResult, ExitStatus};

use super::Opener;

/// States that hold messages (not `tmp/`), in the order they are shown.
const MESSAGE_STATES: [State; 6] = [
    State::Incoming,
    State::Pending,
    State::Deferred,
    State::Hold,
    State::Chained,
    State::Errors,
];

/// The queues `dirq status` reports on: those named, then every queue under each
/// spool root, found again at each refresh so that new queues show up.
pub(crate) struct Targets<'a> {
    pub(crate) opener: &'a Opener,
    pub(crate) named: Vec<DirectoryQueue>,
    pub(crate) spools: &'a [PathBuf],
    /// The library's default when `None`.
    pub(crate) depth: Option<usize>,
}

impl Targets<'_> {
    /// The queues, and the errors of finding or opening some of them.
    fn resolve(&self) -> (Vec<DirectoryQueue>, Vec<dirq::Error>) {
        let mut queues = self.named.clone();
        let mut problems = Vec::new();
        for root in self.spools {
            let mut found = dirq::spool::queues(root);
            if let Some(depth) = self.depth {
                found = found.max_depth(depth);
            }
            for item in found {
                match item.and_then(|found| self.opener.inspect(found.path())) {
                    Ok(queue) => queues.push(queue),
                    Err(e) => problems.push(e),
                }
            }
        }
        (queues, problems)
    }
}

/// Shows every queue it can; a queue that cannot be found, opened or read is reported
/// on standard error (in the frame, with `--watch`) and makes the exit status 1.
pub(crate) fn status(targets: &Targets<'_>, json: bool, watch: Option<Duration>) -> CliResult {
    let Some(every) = watch else {
        let (text, problems) = render_status(targets, json);
        write_out_text(&text)?;
        if problems.is_empty() {
            return Ok(());
        }
        for problem in &problems {
            crate::print_error_chain(problem);
        }
        return Err(Box::new(ExitStatus(1)));
    };
    let clear = io::stdout().is_terminal();
    loop {
        let (text, problems) = render_status(targets, json);
        let mut frame = String::new();
        if clear {
            frame.push_str("\x1b[H\x1b[2J"); // cursor home, clear screen
        }
        let _ = writeln!(
            frame,
            "every {}: dirq status    {}",
            human::duration(every),
            crate::human::clock(SystemTime::now())
        );
        frame.push_str(&text);
        // In the frame, not on standard error: the next refresh would clear it away.
        for problem in &problems {
            let _ = writeln!(frame, "error: {}", one_line(problem));
        }
        if !clear {
            frame.push('\n');
        }
        write_out_text(&frame)?;
        std::thread::sleep(every);
    }
}

/// An error and its causes on one line, `: `-separated.
fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(line, ": {cause}");
        source = cause.source();
    }
    line
}

pub(crate) fn write_out_text(text: &str) -> CliResult {
    let mut out = io::stdout().lock();
    quiet_broken_pipe(out.write_all(text.as_bytes()).and_then(|()| out.flush()))
        .map_err(stdout_error)?;
    Ok(())
}

struct Row<'q> {
    queue: &'q DirectoryQueue,
    counts: Counts,
    bytes: Vec<(State, u64)>,
    oldest: Option<Duration>,
    pipers: Vec<PiperInfo>,
    /// Outcomes of the last hour, from the queue's history.
    hour: HistoryCounts,
}

/// The period `status` counts outcomes over.
const HOUR: Duration = Duration::from_secs(3600);

fn gather(queue: &DirectoryQueue) -> Result<Row<'_>, dirq::Error> {
    let mut bytes = Vec::new();
    for state in MESSAGE_STATES {
        bytes.push((state, queue.size(state)?));
    }
    Ok(Row {
        queue,
        counts: queue.counts()?,
        bytes,
        oldest: queue.oldest_age()?,
        pipers: dirq::admin::pipers(queue)?,
        hour: dirq::admin::history_counts(queue, SystemTime::now() - HOUR)?,
    })
}

fn render_status(targets: &Targets<'_>, json: bool) -> (String, Vec<dirq::Error>) {
    let (queues, mut problems) = targets.resolve();
    let mut rows = Vec::new();
    for queue in &queues {
        match gather(queue) {
            Ok(row) => rows.push(row),
            Err(e) => problems.push(e),
        }
    }
    let mut text = String::new();
    if json {
        for row in &rows {
            let c = &row.counts;
            let line = json!({
                "queue": row.queue.root().to_string_lossy(),
                "incoming": c.incoming, "pending": c.pending, "errors": c.errors,
                "tmp": c.tmp, "deferred": c.deferred, "hold": c.hold, "chained": c.chained,
                "bytes": row.bytes.iter().map(|(s, b)| (s.as_str().to_owned(), json!(b))).collect::<serde_json::Map<_, _>>(),
                "oldest_age_s": row.oldest.map(|d| d.as_secs_f64()),
                "pipers": row.pipers.iter().map(piper_json).collect::<Vec<_>>(),
                "last_hour": {
                    "ok": row.hour.ok, "fail": row.hour.failed, "timeout": row.hour.timed_out,
                    "retried": row.hour.retried, "released": row.hour.released,
                    "cancelled": row.hour.cancelled,
                },
            });
            let _ = writeln!(text, "{line}");
        }
        return (text, problems);
    }
    let _ = writeln!(
        text,
        "{:<30} {:>9} {:>8} {:>8} {:>6} {:>7} {:>7} {:>5} {:>10} {:>8}",
        "QUEUE",
        "INCOMING",
        "PENDING",
        "DEFERRED",
        "HOLD",
        "CHAINED",
        "ERRORS",
        "TMP",
        "BYTES",
        "OLDEST"
    );
    for row in &rows {
        let c = &row.counts;
        let waiting: u64 = row
            .bytes
            .iter()
            .filter(|(s, _)| *s != State::Errors)
            .map(|(_, b)| b)
            .sum();
        let _ = writeln!(
            text,
            "{:<30} {:>9} {:>8} {:>8} {:>6} {:>7} {:>7} {:>5} {:>10} {:>8}",
            row.queue.root().display(),
            c.incoming,
            c.pending,
            c.deferred,
            c.hold,
            c.chained,
            c.errors,
            c.tmp,
            human::size(waiting),
            row.oldest.map_or_else(|| "-".to_owned(), human::duration)
        );
        let h = &row.hour;
        if *h != HistoryCounts::default() {
            let _ = writeln!(
                text,
                "  last hour: {} ok, {} fail, {} timeout, {} retried, {} released, {} cancelled",
                h.ok, h.failed, h.timed_out, h.retried, h.released, h.cancelled
            );
        }
        for piper in &row.pipers {
            let _ = writeln!(text, "  {}", piper_line(piper));
        }
    }
    (text, problems)
}

pub(crate) fn piper_json(piper: &PiperInfo) -> serde_json::Value {
    json!({
        "stage": piper.stage,
        "pid": piper.pid,
        "host": piper.host,
        "live": piper.live,
        "state": if piper.live { piper.state.as_str() } else { "stale" },
        "paused": piper.live && piper.state.starts_with("paused"),
        "started": piper.started,
        "heartbeat": piper.heartbeat,
        "workers": piper.workers,
        "stats": piper.stats,
        "rates": piper.rates,
        "counters": piper.counters,
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
    if !piper.counters.is_empty() {
        // A bridge (`dirq bridge out|in`): its own counters say more than a stage's.
        let counters: Vec<String> = piper
            .counters
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        return format!(
            "{} pid {}@{}: {}, {:.1}/s done; {}",
            piper.stage,
            piper.pid,
            piper.host,
            piper.state,
            piper.rates.done,
            counters.join(", ")
        );
    }
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

pub(crate) fn ls(queue: &DirectoryQueue, state: Option<StateArg>, json: bool) -> CliResult {
    let states = match state {
        Some(StateArg::Incoming) => vec![State::Incoming],
        Some(StateArg::Pending) => vec![State::Pending],
        Some(StateArg::Errors) => vec![State::Errors],
        Some(StateArg::Tmp) => vec![State::Tmp],
        Some(StateArg::Deferred) => vec![State::Deferred],
        Some(StateArg::Hold) => vec![State::Hold],
        None => MESSAGE_STATES.to_vec(),
    };
    let mut lines = Vec::new();
    for state in states {
        for info in dirq::admin::list(queue, state)? {
            lines.push(if json {
                ls_json(&info)
            } else {
                ls_human(&info)
            });
        }
    }
    let mut out = io::stdout().lock();
    let written = lines.iter().try_for_each(|line| writeln!(out, "{line}"));
    quiet_broken_pipe(written).map_err(stdout_error)?;
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
    match info.state {
        State::Deferred => line["not_before"] = json!(info.not_before.map(unix_seconds)),
        State::Hold => line["held"] = json!(true),
        State::Pending => line["owner_pid"] = json!(info.owner),
        State::Errors => {
            let failure = info.failure.as_ref();
            line["reason"] = json!(failure.and_then(|f| f.reason.clone()));
            if let Some(code) = failure.and_then(|f| f.exit_code) {
                line["exit_code"] = json!(code);
            }
        }
        _ => {}
    }
    if !info.regular {
        line["regular"] = json!(false);
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
        let _ = write!(line, "  attempts: {attempts}");
    }
    if let Some(when) = info.not_before {
        let wait = when.duration_since(SystemTime::now()).unwrap_or_default();
        let _ = write!(line, "  due in {}", human::duration(wait));
    }
    if info.state == State::Pending {
        match info.owner {
            Some(pid) => {
                let _ = write!(line, "  owner: pid {pid}");
            }
            None => line.push_str("  owner: none (orphan; dirq recover requeues it)"),
        }
    }
    if let Some(reason) = info.failure.as_ref().and_then(|f| f.reason.as_deref()) {
        let _ = write!(line, "  reason: {reason}");
    }
    line
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub(crate) fn ages(queues: &[DirectoryQueue]) -> CliResult {
    let mut text = String::new();
    let _ = write!(text, "{:<24} {:>7}", "", "T");
    for limit in dirq::admin::AGE_BUCKETS_MINUTES {
        let _ = write!(text, " {limit:>6}");
    }
    let _ = writeln!(text, " {:>6}", "1280+");
    for queue in queues {
        let _ = writeln!(text, "{}", queue.root().display());
        for state in MESSAGE_STATES {
            let histogram = dirq::admin::age_histogram(&dirq::admin::ages(queue, state)?);
            let _ = write!(
                text,
                "  {:<22} {:>7}",
                state.as_str(),
                histogram.iter().sum::<u64>()
            );
            for count in histogram {
                let _ = write!(text, " {count:>6}");
            }
            text.push('\n');
        }
    }
    write_out_text(&text)
}
