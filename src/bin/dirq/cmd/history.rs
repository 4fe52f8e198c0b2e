//! `dirq history` and `dirq log`: what Pipers recorded in a queue's `history/`.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::time::{Duration, SystemTime};

use dirq::admin::{HistoryFilter, HistoryOutcome, HistoryRecord};
use dirq::{DirectoryQueue, MessageId};

use crate::output::{quiet_broken_pipe, stdout_error, CliResult};

pub(crate) fn history(
    queue: &DirectoryQueue,
    since: Option<Duration>,
    outcome: Option<HistoryOutcome>,
    id: Option<String>,
    json: bool,
) -> CliResult {
    let mut filter = HistoryFilter::default();
    filter.since = since.map(|d| SystemTime::now() - d);
    filter.outcome = outcome;
    filter.id = id;
    // Streamed: a history can hold millions of lines, and `| head` stops the read.
    let mut out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let mut failed = None;
    let mut write = |text: &str| match writeln!(out, "{text}") {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            failed = Some(e);
            ControlFlow::Break(())
        }
    };
    if !json {
        let _ = write(&format!(
            "{:<24} {:<13} {:>3} {:>9}  {:<20} {:<40}  REASON",
            "TIME", "OUTCOME", "TRY", "DURATION", "PIPER", "ID"
        ));
    }
    dirq::admin::visit_history(queue, &filter, &mut |record| {
        if json {
            match serde_json::to_string(&record) {
                Ok(line) => write(&line),
                Err(_) => ControlFlow::Continue(()),
            }
        } else {
            write(&human_line(&record))
        }
    })?;
    let result = match failed {
        Some(e) => Err(e),
        None => out.flush(),
    };
    quiet_broken_pipe(result).map_err(stdout_error)?;
    Ok(())
}

fn human_line(record: &HistoryRecord) -> String {
    // 2026-11-30T21:09:52.123456Z → 2026-11-30 21:09:52.123
    let time = record
        .time
        .get(..23)
        .map_or_else(|| record.time.clone(), |t| t.replacen('T', " ", 1));
    let mut line = format!(
        "{:<24} {:<13} {:>3} {:>9}  {:<20} {:<40}",
        time,
        record.outcome.as_str(),
        record.attempts,
        crate::human::duration(Duration::from_millis(record.duration_ms)),
        format!("{}[{}]", record.piper, record.pid),
        record.id
    );
    if let Some(reason) = &record.reason {
        let _ = write!(line, "  {reason}");
    }
    if let Some(code) = record.exit_code {
        let _ = write!(line, " (exit code {code})");
    }
    line.trim_end().to_owned()
}

pub(crate) fn log(queue: &DirectoryQueue, id: &OsStr) -> CliResult {
    let id = MessageId::new(id)?;
    let bytes = match dirq::admin::job_log(queue, &id) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "no job log for message {id} in queue {}: it was not run with \
                 --log-output (log_output = true), or its log was removed with the \
                 history it was older than",
                queue.root().display()
            )
            .into())
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = io::stdout().lock();
    quiet_broken_pipe(out.write_all(&bytes).and_then(|()| out.flush())).map_err(stdout_error)?;
    Ok(())
}
