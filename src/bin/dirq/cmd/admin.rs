//! Repairing and tidying queues: requeue, hold, unhold, flush, delete, purge, check,
//! recover; and cancel, which stops a running message.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use dirq::{DirectoryQueue, MessageId, State};

use super::Opener;
use crate::args::Selection;
use crate::output::{context, progress, stdout_error, unless_broken_pipe, CliResult, ExitStatus};

/// The ids a command acts on: given ones (`-` reads more from standard input), or with
/// `--all` every message of `all_from`.
fn selected(
    queue: &DirectoryQueue,
    select: &Selection,
    all_from: &[State],
) -> Result<Vec<MessageId>, Box<dyn std::error::Error + Send + Sync>> {
    if select.all {
        let mut ids = Vec::new();
        for &state in all_from {
            for id in queue.ids(state)? {
                ids.push(id?);
            }
        }
        ids.sort();
        return Ok(ids);
    }
    let mut ids = Vec::new();
    for arg in &select.ids {
        if arg == "-" {
            for line in io::stdin().lock().lines() {
                let line = line.map_err(context("failed to read ids from standard input"))?;
                let line = line.trim();
                if !line.is_empty() {
                    ids.push(MessageId::new(line)?);
                }
            }
        } else {
            ids.push(MessageId::new(arg)?);
        }
    }
    Ok(ids)
}

/// Applies `action` to each id with a progress bar, reporting failures one by one and
/// counting them; the command fails if any did.
fn for_each(
    ids: &[MessageId],
    verb: &str,
    mut action: impl FnMut(&MessageId) -> Result<(), dirq::Error>,
) -> CliResult {
    let bar = progress(ids.len() as u64, verb);
    let mut failed = 0;
    for id in ids {
        if let Err(e) = action(id) {
            failed += 1;
            bar.suspend(|| crate::print_error_chain(&e));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let done = ids.len() - failed;
    writeln!(io::stdout(), "{verb} {done} of {} message(s)", ids.len())
        .or_else(unless_broken_pipe)
        .map_err(stdout_error)?;
    if failed > 0 {
        return Err(format!("{failed} message(s) could not be {verb}").into());
    }
    Ok(())
}

pub(crate) fn requeue(
    queue: &DirectoryQueue,
    select: &Selection,
    older_than: Option<Duration>,
    keep_attempts: bool,
) -> CliResult {
    let mut ids = selected(queue, select, &[State::Errors])?;
    if let Some(age) = older_than {
        let now = SystemTime::now();
        let failed_long_ago = |id: &MessageId| {
            dirq::admin::info(queue, State::Errors, id)
                .ok()
                .and_then(|info| info.failed_at)
                .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= age)
        };
        ids.retain(failed_long_ago);
    }
    for_each(&ids, "requeued", |id| {
        dirq::admin::requeue(queue, id, keep_attempts)
    })
}

/// `requeue --group NAME`: the members of the group NAME in errors/, of an unordered
/// group and of an ordered one of that name alike.
pub(crate) fn requeue_group(queue: &DirectoryQueue, name: &str, keep_attempts: bool) -> CliResult {
    let mut requeued = 0;
    for group in [
        dirq::queue::Group::new(name)?,
        dirq::queue::Group::ordered(name)?,
    ] {
        requeued += dirq::admin::requeue_group(queue, &group, keep_attempts)?;
    }
    writeln!(
        io::stdout(),
        "requeued {requeued} member(s) of group {name}"
    )
    .or_else(unless_broken_pipe)
    .map_err(stdout_error)?;
    Ok(())
}

/// A queue that Mentat created has no `hold/`; `dirq init` adds it. The library's own
/// error says to open the queue with creation allowed, which an operator cannot do
/// from `dirq hold`, so the command says what to run instead, before any message.
fn require_hold(queue: &DirectoryQueue, verb: &str) -> CliResult {
    let hold = queue.path(State::Hold);
    if hold.is_dir() {
        return Ok(());
    }
    Err(format!(
        "failed to {verb} messages in {root}: {hold}/ is missing (a queue that Mentat \
         created has none); run `dirq init {root}` to add it",
        root = queue.root().display(),
        hold = hold.display(),
    )
    .into())
}

pub(crate) fn hold(queue: &DirectoryQueue, select: &Selection) -> CliResult {
    require_hold(queue, "hold")?;
    let ids = selected(queue, select, &[State::Incoming, State::Deferred])?;
    for_each(&ids, "held", |id| dirq::admin::hold(queue, id).map(drop))
}

pub(crate) fn unhold(queue: &DirectoryQueue, select: &Selection) -> CliResult {
    require_hold(queue, "unhold")?;
    let ids = selected(queue, select, &[State::Hold])?;
    for_each(&ids, "unheld", |id| dirq::admin::unhold(queue, id))
}

pub(crate) fn flush(queue: &DirectoryQueue, select: &Selection) -> CliResult {
    if select.all {
        // One read of deferred/ rather than a search of it per id.
        let moved = dirq::admin::flush_all(queue)?;
        writeln!(io::stdout(), "flushed {moved} message(s)")
            .or_else(unless_broken_pipe)
            .map_err(stdout_error)?;
        return Ok(());
    }
    let ids = selected(queue, select, &[State::Deferred])?;
    for_each(&ids, "flushed", |id| dirq::admin::flush(queue, id))
}

pub(crate) fn delete(queue: &DirectoryQueue, select: &Selection) -> CliResult {
    let ids = selected(
        queue,
        select,
        &[State::Incoming, State::Deferred, State::Hold, State::Errors],
    )?;
    for_each(&ids, "deleted", |id| {
        dirq::admin::delete(queue, id).map(drop)
    })
}

pub(crate) fn purge(
    queue: &DirectoryQueue,
    tmp_older_than: Duration,
    errors_older_than: Option<Duration>,
) -> CliResult {
    let total = queue.count(State::Tmp)?
        + errors_older_than.map_or(Ok(0), |_| queue.count(State::Errors))?;
    let bar = progress(total as u64, "purging");
    let report = dirq::admin::purge(queue, tmp_older_than, errors_older_than, &mut |n| {
        bar.set_position(n)
    })?;
    bar.finish_and_clear();
    writeln!(
        io::stdout(),
        "{}: removed {} abandoned file(s) from tmp/ and {} failed message(s) from errors/",
        queue.root().display(),
        report.tmp_removed,
        report.errors_removed
    )
    .or_else(unless_broken_pipe)
    .map_err(stdout_error)?;
    Ok(())
}

pub(crate) fn check(queue: &DirectoryQueue, repair: bool) -> CliResult {
    let total: usize = State::ALL
        .iter()
        .map(|&s| queue.count(s).unwrap_or(0))
        .sum();
    let bar = progress(total as u64, "checking");
    let problems = dirq::admin::check(queue, &mut |n| bar.set_position(n))?;
    bar.finish_and_clear();
    let mut out = io::stdout().lock();
    for problem in &problems {
        writeln!(out, "{problem}  -> {}", problem.fix)
            .or_else(unless_broken_pipe)
            .map_err(stdout_error)?;
    }
    if problems.is_empty() {
        writeln!(out, "{}: healthy", queue.root().display())
            .or_else(unless_broken_pipe)
            .map_err(stdout_error)?;
        return Ok(());
    }
    writeln!(
        out,
        "{}: {} problem(s)",
        queue.root().display(),
        problems.len()
    )
    .or_else(unless_broken_pipe)
    .map_err(stdout_error)?;
    if repair {
        let bar = progress(problems.len() as u64, "repairing");
        let report = dirq::admin::repair(queue, &problems, &mut |n| bar.set_position(n))?;
        bar.finish_and_clear();
        writeln!(
            out,
            "repaired {} ({} had gone by themselves)",
            report.fixed, report.vanished
        )
        .or_else(unless_broken_pipe)
        .map_err(stdout_error)?;
    } else {
        writeln!(
            out,
            "run dirq check --repair {} to fix them",
            queue.root().display()
        )
        .or_else(unless_broken_pipe)
        .map_err(stdout_error)?;
    }
    Err(Box::new(ExitStatus(1)))
}

pub(crate) fn recover(opener: &Opener, queues: &[PathBuf], grace: Option<Duration>) -> CliResult {
    let mut out = io::stdout().lock();
    for path in queues {
        let queue = opener.open(
            DirectoryQueue::builder(path)
                .create(false)
                .orphan_grace(grace.unwrap_or(Duration::ZERO)),
        )?;
        let report = queue.recover()?;
        let stale_cancels = dirq::admin::remove_stale_cancels(&queue)?;
        writeln!(
            out,
            "{}: requeued {}, left {} with live owners, {} within grace, removed {} from tmp/, \
             quarantined {}, removed {} duplicate names",
            path.display(),
            report.requeued,
            report.owned,
            report.within_grace,
            report.tmp_removed,
            report.quarantined,
            report.duplicates_removed
        )
        .or_else(unless_broken_pipe)
        .map_err(stdout_error)?;
        if stale_cancels > 0 {
            writeln!(
                out,
                "{}: removed {stale_cancels} stale cancel requests",
                path.display()
            )
            .or_else(unless_broken_pipe)
            .map_err(stdout_error)?;
        }
    }
    Ok(())
}

/// `dirq cancel QUEUE ID [--requeue] [--wait DUR]`.
pub(crate) fn cancel(
    queue: &DirectoryQueue,
    id: &std::ffi::OsStr,
    requeue: bool,
    wait: Duration,
) -> CliResult {
    let id = MessageId::new(id)?;
    let to = if requeue {
        dirq::admin::CancelTo::Incoming
    } else {
        dirq::admin::CancelTo::Errors
    };
    let state = dirq::admin::cancel_timeout(queue, &id, to, wait)?;
    writeln!(io::stdout().lock(), "{id}: cancelled, now in {state}/")
        .or_else(unless_broken_pipe)
        .map_err(stdout_error)?;
    Ok(())
}
