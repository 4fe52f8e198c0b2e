//! Reading a queue's history (`history/*.jsonl`, written by Pipers) and job logs.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Operation, Result};
use crate::format::history::{
    log_name, rotated_time, HistoryOutcome, HistoryRecord, CURRENT, HISTORY_DIR, LOGS_DIR,
};
use crate::sys::Dir;
use crate::{DirectoryQueue, MessageId};

/// Which history lines [`history`] returns; every field left at its default matches
/// every line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryFilter {
    /// Only lines written at or after this time.
    pub since: Option<SystemTime>,
    /// Only lines with this outcome.
    pub outcome: Option<HistoryOutcome>,
    /// Only lines about this message id.
    pub id: Option<String>,
}

impl HistoryFilter {
    fn matches(&self, record: &HistoryRecord) -> bool {
        self.outcome.is_none_or(|o| o == record.outcome)
            && self.id.as_ref().is_none_or(|id| *id == record.id)
            && self
                .since
                .is_none_or(|since| record.when().is_some_and(|t| t >= since))
    }
}

/// Counts of outcomes in a queue's history over a period; see [`history_counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryCounts {
    /// Committed, forwarded or emitted: done with.
    pub ok: u64,
    /// Failed or dead-lettered into `errors/` (timeouts not included).
    pub failed: u64,
    /// Timed out into `errors/`.
    pub timed_out: u64,
    /// Deferred for another attempt.
    pub retried: u64,
    /// Released or stopped: back in `incoming/` unprocessed.
    pub released: u64,
    /// Cancelled into `errors/` by an operator.
    pub cancelled: u64,
}

/// The lines of `queue`'s history that `filter` matches, oldest file first (rotated
/// files by their names, then `current.jsonl`), each file in the order its lines were
/// written. A queue without a history has none.
///
/// Lines that are not complete JSON records are skipped: the incomplete last line a
/// crash can leave, or a line a reader caught half written. A rotation while this
/// reads may hide the lines written after it began.
///
/// # Errors
///
/// [`Error::Io`] naming the history directory or a file in it that cannot be read.
pub fn history(queue: &DirectoryQueue, filter: &HistoryFilter) -> Result<Vec<HistoryRecord>> {
    let mut found = Vec::new();
    visit_history(queue, filter, &mut |record| {
        found.push(record);
        ControlFlow::Continue(())
    })?;
    Ok(found)
}

/// Calls `visit` with each line of `queue`'s history that `filter` matches, in the
/// order [`history`] returns them, without holding them all in memory (a history can
/// hold millions of lines); stops early when `visit` returns
/// [`ControlFlow::Break`].
///
/// # Errors
///
/// As [`history`].
pub fn visit_history(
    queue: &DirectoryQueue,
    filter: &HistoryFilter,
    visit: &mut dyn FnMut(HistoryRecord) -> ControlFlow<()>,
) -> Result<()> {
    read(queue, filter.since, &mut |record| {
        if filter.matches(&record) {
            visit(record)
        } else {
            ControlFlow::Continue(())
        }
    })
}

/// Counts the outcomes in `queue`'s history since `since` (what `dirq status` shows
/// for the last hour), reading only the files that can hold lines that recent.
///
/// # Errors
///
/// As [`history`].
pub fn history_counts(queue: &DirectoryQueue, since: SystemTime) -> Result<HistoryCounts> {
    let mut counts = HistoryCounts::default();
    let filter = HistoryFilter {
        since: Some(since),
        ..HistoryFilter::default()
    };
    visit_history(queue, &filter, &mut |record| {
        let counter = match record.outcome {
            o if o.is_ok() => &mut counts.ok,
            HistoryOutcome::TimedOut => &mut counts.timed_out,
            o if o.is_failure() => &mut counts.failed,
            HistoryOutcome::Retried => &mut counts.retried,
            HistoryOutcome::Cancelled => &mut counts.cancelled,
            _ => &mut counts.released,
        };
        *counter += 1;
        ControlFlow::Continue(())
    })?;
    Ok(counts)
}

/// The job log of message `id` (`history/logs/<id>.log`, written by a
/// [`CommandStage`](crate::piper::CommandStage) with
/// [`log_output`](crate::piper::CommandStageBuilder::log_output)): each attempt's
/// standard output and standard error after a header line.
///
/// # Errors
///
/// [`Error::Io`] naming the log's path, of kind [`io::ErrorKind::NotFound`] when the
/// message has no log (never run with logs on, or removed by the history's
/// rotation).
pub fn job_log(queue: &DirectoryQueue, id: &MessageId) -> Result<Vec<u8>> {
    let path = queue
        .root()
        .join(HISTORY_DIR)
        .join(LOGS_DIR)
        .join(log_name(id.as_os_str()));
    let mut bytes = Vec::new();
    // Opened through the queue's own directories, not following a symlink planted
    // there.
    Dir::open(queue.root())
        .and_then(|root| root.open_child(OsStr::new(HISTORY_DIR)))
        .and_then(|dir| dir.open_child(OsStr::new(LOGS_DIR)))
        .and_then(|logs| logs.open_read(&log_name(id.as_os_str())))
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(|e| Error::io(Operation::Read, &path, e))?;
    Ok(bytes)
}

/// A rotated file can hold lines written a little after the next file's first line (a
/// writer notices a rotation within a second); this much is allowed for.
const ROTATION_LAG: Duration = Duration::from_secs(60);

/// Calls `each` with every complete record of the files that can hold lines written
/// at or after `since` (all files when `None`), oldest first, until it breaks.
fn read(
    queue: &DirectoryQueue,
    since: Option<SystemTime>,
    each: &mut dyn FnMut(HistoryRecord) -> ControlFlow<()>,
) -> Result<()> {
    let path = queue.root().join(HISTORY_DIR);
    let io = |e, p: PathBuf| Error::io(Operation::Read, p, e);
    // Opened from the root without following a symlink planted as history/.
    let dir =
        match Dir::open(queue.root()).and_then(|root| root.open_child(OsStr::new(HISTORY_DIR))) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e, path)),
        };
    // IMPORTANT: current.jsonl is opened before the directory is listed. A rotation
    // between the two then shows the file opened under its rotated name as well (same
    // inode, read once); the other order could miss the rotated file altogether.
    let current = match dir.open_read(OsStr::new(CURRENT)) {
        Ok(file) => Some(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e, path.join(CURRENT))),
    };
    let current_stat = current
        .as_ref()
        .map(crate::sys::stat_file)
        .transpose()
        .map_err(|e| io(e, path.join(CURRENT)))?;
    let mut rotated = Vec::new();
    let mut buf = Vec::new();
    dir.scan(&mut buf, |entry| {
        if let Some(first) = rotated_time(entry.name) {
            rotated.push((entry.name.to_os_string(), first));
        }
    })
    .map_err(|e| io(e, path.clone()))?;
    rotated.sort();
    for i in 0..rotated.len() {
        // File i holds lines up to the first line of file i + 1 (and a little after).
        let next_first = rotated.get(i + 1).map(|(_, t)| *t);
        if let (Some(since), Some(next)) = (since, next_first) {
            if next + ROTATION_LAG < since {
                continue;
            }
        }
        let name = &rotated[i].0;
        let file = match dir.open_read(name) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // pruned meanwhile
            Err(e) => return Err(io(e, path.join(name))),
        };
        if let Some(current) = &current_stat {
            let st = crate::sys::stat_file(&file).map_err(|e| io(e, path.join(name)))?;
            if st.same_file(current) {
                continue; // read below, as current.jsonl
            }
        }
        if read_lines(file, since, each)
            .map_err(|e| io(e, path.join(name)))?
            .is_break()
        {
            return Ok(());
        }
    }
    if let Some(file) = current {
        // The last file: whether it broke off or not, the read is over.
        let _ = read_lines(file, since, each).map_err(|e| io(e, path.join(CURRENT)))?;
    }
    Ok(())
}

/// Calls `each` with the record of every complete line of `file`; a last line without
/// its `\n` is incomplete (a crash, or a write under way) and skipped, as is any line
/// that is not a record.
fn read_lines(
    mut file: File,
    since: Option<SystemTime>,
    each: &mut dyn FnMut(HistoryRecord) -> ControlFlow<()>,
) -> io::Result<ControlFlow<()>> {
    let start = match since {
        Some(since) => start_of(&file, since)?,
        None => 0,
    };
    file.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::with_capacity(512);
    if start > 0 {
        reader.read_until(b'\n', &mut line)?; // the end of a line before `start`
    }
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 || line.last() != Some(&b'\n') {
            return Ok(ControlFlow::Continue(()));
        }
        if let Some(record) = parse_line(&line[..line.len() - 1]) {
            if each(record).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
    }
}

/// Below this size a file is read whole; above, [`start_of`] skips what is older.
const SEEK_ABOVE: u64 = 256 * 1024;

/// An offset of `file` before which every line is older than `since` (give or take
/// [`ROTATION_LAG`]), found by bisection: lines are appended in time order, but for
/// the batches of several writers, which are less than a second apart. 0 for a small
/// file, or when a line in the way cannot be read as a record.
fn start_of(file: &File, since: SystemTime) -> io::Result<u64> {
    let size = crate::sys::stat_file(file)?.size;
    if size < SEEK_ABOVE {
        return Ok(0);
    }
    let (mut lo, mut hi) = (0u64, size);
    let mut buf = vec![0u8; 8 * 1024];
    while hi - lo > SEEK_ABOVE / 4 {
        let mid = lo + (hi - lo) / 2;
        let n = crate::sys::read_at(file, &mut buf, mid)?;
        let chunk = &buf[..n];
        // The first whole line after `mid`.
        let Some(begin) = chunk.iter().position(|&b| b == b'\n').map(|i| i + 1) else {
            return Ok(lo);
        };
        let Some(len) = chunk[begin..].iter().position(|&b| b == b'\n') else {
            return Ok(lo);
        };
        let Some(time) = parse_line(&chunk[begin..begin + len]).and_then(|r| r.when()) else {
            return Ok(lo);
        };
        if time + ROTATION_LAG < since {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// The record of a line. A line that does not parse may be the incomplete last line of
/// a crashed writer followed by the next writer's whole line (appended after it, no
/// `\n` between them): the record that starts last in it is tried too, so a crash
/// costs its own line only.
fn parse_line(line: &[u8]) -> Option<HistoryRecord> {
    if let Some(record) = HistoryRecord::parse(line) {
        return Some(record);
    }
    const START: &[u8] = b"{\"id\":";
    let at = line
        .windows(START.len())
        .rposition(|w| w == START)
        .filter(|&at| at > 0)?;
    HistoryRecord::parse(&line[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_file_is_read_from_about_since() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut text = String::new();
        for i in 0..20_000u64 {
            let time = crate::format::meta::rfc3339(start + Duration::from_secs(i));
            text.push_str(&format!(
                r#"{{"id":"m{i}","outcome":"committed","time":"{time}","attempts":1,"duration_ms":1,"piper":"p","pid":1,"host":"h"}}"#
            ));
            text.push('\n');
        }
        std::fs::write(&path, &text).unwrap();
        let since = start + Duration::from_secs(19_000);
        let offset = start_of(&File::open(&path).unwrap(), since).unwrap();
        assert!(
            offset > 0 && offset < text.len() as u64 * 19 / 20,
            "{offset}"
        );
        let mut ids = Vec::new();
        let _ = read_lines(File::open(&path).unwrap(), Some(since), &mut |r| {
            if r.when().unwrap() >= since {
                ids.push(r.id)
            }
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(ids.len(), 1000);
        assert_eq!(ids[0], "m19000");
    }

    #[test]
    fn a_line_glued_to_a_crashed_fragment_is_recovered() {
        let whole = br#"{"id":"b","outcome":"committed","time":"2026-11-30T21:00:00.000000Z","attempts":1,"duration_ms":3,"piper":"p","pid":1,"host":"h"}"#;
        let mut glued = br#"{"id":"a","outcome":"fai"#.to_vec();
        glued.extend_from_slice(whole);
        assert_eq!(parse_line(&glued).map(|r| r.id), Some("b".to_owned()));
        assert_eq!(parse_line(br#"{"id":"a","outc"#), None);
    }
}
