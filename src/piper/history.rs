//! Writing a queue's history (`<queue>/history/`, format in `format::history`) and
//! its job logs.
//!
//! - **One `write(2)` per batch of whole lines** on an `O_APPEND` descriptor (see
//!   [`Journal`]): the kernel appends each write whole, so lines of several workers and
//!   processes never interleave. No fsync: a crash of the process loses the lines of
//!   its last 100 ms at most (the batch not yet written), a power cut also those not
//!   yet written back, and either can leave at most its last line incomplete, which
//!   readers skip.
//! - **Rotation** by size and age, by whoever writes: under the lock file
//!   `history/.lock` (`flock`, tried without waiting: a process that finds it taken
//!   lets the holder rotate), `current.jsonl` is renamed to the time of its first line.
//!   Writers that still hold the old descriptor go on appending to the renamed file
//!   until they notice (they compare the inode of `current.jsonl` with theirs every
//!   second, and whenever they think the size limit is reached), so no line is lost.
//!   The oldest rotated files beyond the number kept are removed, and with them the job
//!   logs older than the history that is left.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Operation, Result};
use crate::format::history::{
    self as format, HistoryRecord, RecordRef, CURRENT, HISTORY_DIR, LOCK, LOGS_DIR,
};
use crate::sys::{self, lock, Dir, FileStat};
use crate::DirectoryQueue;

/// How often a writer looks whether `current.jsonl` was rotated or is due.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A batch of lines is written once it holds this many lines...
const BATCH_LINES: usize = 64;
/// ... or this many bytes ...
const BATCH_BYTES: usize = 32 * 1024;
/// ... or its first line waited this long (the supervisor looks every 50 ms).
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// When the history is rotated, and how much of it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rotation {
    /// Rotate once `current.jsonl` holds this many bytes.
    pub(crate) max_bytes: u64,
    /// Rotate once its first line is this old.
    pub(crate) max_age: Duration,
    /// Rotated files kept; older ones are removed.
    pub(crate) keep: usize,
}

/// The history of one input queue, shared by the workers of a Piper.
///
/// Lines are batched: kept in memory and appended together, with one `write(2)`, once
/// [`BATCH_LINES`] or [`BATCH_BYTES`] are waiting or the first waited [`FLUSH_AFTER`]
/// ([`flush_due`](Journal::flush_due), from the supervisor), and at the end of the
/// run. One write per line cost a Piper committing on tmpfs about 5 % of its
/// throughput; a batch costs a fraction of that. A batch is whole lines only, so the
/// guarantee is the same: lines of several writers never interleave.
#[derive(Debug)]
pub(crate) struct Journal {
    root: PathBuf,
    dir_mode: u32,
    file_mode: u32,
    rotation: Rotation,
    state: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    dir: Option<Dir>,
    file: Option<File>,
    /// The inode of `file`, to notice a rotation by another process.
    stat: Option<FileStat>,
    /// Time of the first line of the open file, once known.
    first: Option<SystemTime>,
    /// Bytes in the file at the last check, plus those this process wrote since.
    size: u64,
    checked: Option<Instant>,
    /// Whole lines not yet written, and how many.
    batch: Vec<u8>,
    lines: usize,
    /// When the first of them was added.
    since: Option<Instant>,
    /// Whether a failure to write was logged already (one warning, not one per batch).
    warned: bool,
}

impl Journal {
    pub(crate) fn new(queue: &DirectoryQueue, rotation: Rotation) -> Journal {
        let config = queue.engine().config();
        Journal {
            root: queue.root().to_path_buf(),
            dir_mode: config.dir_mode,
            file_mode: config.file_mode,
            rotation,
            state: Mutex::new(Open::default()),
        }
    }

    /// Adds `record`'s line to the batch, and writes the batch when it is due. A
    /// failure is logged (once until a write succeeds), never passed on: the history
    /// must not stop a pipeline.
    pub(crate) fn write(&self, record: &RecordRef<'_>) {
        // Serialised before the lock: workers wait for each other only to copy it.
        let mut line = Vec::with_capacity(256);
        record.append_line(&mut line);
        let mut open = super::lock(&self.state);
        if open.batch.is_empty() {
            open.since = Some(Instant::now());
        }
        open.batch.extend_from_slice(&line);
        open.lines += 1;
        if open.lines >= BATCH_LINES
            || open.batch.len() >= BATCH_BYTES
            || open.since.is_some_and(|t| t.elapsed() >= FLUSH_AFTER)
        {
            self.flush_locked(&mut open);
        }
    }

    /// Writes the batch if its first line waited [`FLUSH_AFTER`].
    pub(crate) fn flush_due(&self) {
        let mut open = super::lock(&self.state);
        if open.since.is_some_and(|t| t.elapsed() >= FLUSH_AFTER) {
            self.flush_locked(&mut open);
        }
    }

    /// Writes whatever the batch holds.
    pub(crate) fn flush(&self) {
        let mut open = super::lock(&self.state);
        if !open.batch.is_empty() {
            self.flush_locked(&mut open);
        }
    }

    fn flush_locked(&self, open: &mut Open) {
        let mut batch = std::mem::take(&mut open.batch);
        open.lines = 0;
        open.since = None;
        match self.append(open, &batch) {
            Ok(()) => open.warned = false,
            Err(e) if !open.warned => {
                open.warned = true;
                tracing::warn!(queue = %self.root.display(), error = %e, "cannot write the history");
            }
            Err(_) => {}
        }
        // Closed between batches: a file held open for writing would make the
        // filesystem refuse `mount -o remount,ro` (EBUSY) for as long as the Piper runs.
        // Reopening costs an openat and an fstat per batch of up to BATCH_LINES lines.
        open.file = None;
        batch.clear();
        open.batch = batch; // keeps its allocation
    }

    /// Appends `bytes` (whole lines) to `current.jsonl`, reopened or rotated first when
    /// due.
    fn append(&self, open: &mut Open, bytes: &[u8]) -> io::Result<()> {
        let due = open.checked.is_none_or(|at| at.elapsed() >= CHECK_EVERY)
            || open.size + bytes.len() as u64 >= self.rotation.max_bytes;
        if due || open.file.is_none() {
            self.check(open)?;
        }
        let file = open
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("no file"))?;
        // IMPORTANT: one write of whole lines. Two writes (or a BufWriter flushing a
        // partial buffer) could interleave with another writer's lines; O_APPEND makes
        // the kernel append each write whole.
        let written = (&*file).write(bytes)?;
        open.size += written as u64;
        if open.first.is_none() {
            open.first = Some(SystemTime::now());
        }
        if written == bytes.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {} bytes", bytes.len()),
            ))
        }
    }

    /// Reopens `current.jsonl` if it is not the file held, and rotates it if due.
    fn check(&self, open: &mut Open) -> io::Result<()> {
        open.checked = Some(Instant::now());
        if open.dir.is_none() {
            open.dir = Some(open_or_create(&self.root, HISTORY_DIR, self.dir_mode)?);
        }
        let dir = open
            .dir
            .as_ref()
            .ok_or_else(|| io::Error::other("no dir"))?;
        let current = OsStr::new(CURRENT);
        let on_disk = match dir.stat_at(current) {
            Ok(st) => Some(st),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let same = matches!((&open.stat, &on_disk), (Some(a), Some(b)) if a.same_file(b));
        if !same || open.file.is_none() {
            let file = dir.open_append(current, self.file_mode)?;
            let st = sys::stat_file(&file)?;
            if !same {
                open.first = None;
            }
            open.file = Some(file);
            open.stat = Some(st);
            open.size = st.size;
        } else if let Some(st) = on_disk {
            open.size = st.size;
        }
        if open.first.is_none() && open.size > 0 {
            open.first = first_time(dir).ok().flatten();
        }
        let old = open
            .first
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= self.rotation.max_age);
        if open.size >= self.rotation.max_bytes || old {
            if let Err(e) = rotate(dir, &self.history_path(), self.file_mode, &self.rotation) {
                tracing::warn!(queue = %self.root.display(), error = %e, "cannot rotate the history");
            }
            // Whoever rotated, the file to write to now is the new current.jsonl.
            let file = dir.open_append(current, self.file_mode)?;
            let st = sys::stat_file(&file)?;
            open.file = Some(file);
            open.stat = Some(st);
            open.first = None;
            open.size = st.size;
        }
        Ok(())
    }

    fn history_path(&self) -> PathBuf {
        self.root.join(HISTORY_DIR)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Rotates `current.jsonl` if it is still due once the lock is held, then removes
/// what is beyond `rotation.keep`. Does nothing when another process holds the lock.
fn rotate(dir: &Dir, path: &Path, file_mode: u32, rotation: &Rotation) -> io::Result<()> {
    let lock_file = dir.open_append(OsStr::new(LOCK), file_mode)?;
    if !lock::try_lock(&lock_file)? {
        return Ok(()); // another process is rotating
    }
    let _locked = lock::Locked::new(lock_file);
    // Another process may have rotated between our look and the lock: look again.
    let st = match dir.stat_at(OsStr::new(CURRENT)) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let first = first_time(dir)?.unwrap_or(st.mtime);
    let old = first.elapsed().is_ok_and(|age| age >= rotation.max_age);
    if st.size < rotation.max_bytes && !old {
        return Ok(());
    }
    let base = format::rotated_name(first);
    let mut name = base.clone();
    for n in 1.. {
        match dir.rename_noreplace(OsStr::new(CURRENT), dir, OsStr::new(&name)) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100 => {
                name = base.replace(format::SUFFIX, &format!("-{n}{}", format::SUFFIX));
            }
            Err(e) => return Err(e),
        }
    }
    tracing::debug!(history = %path.display(), rotated = %name, "history rotated");
    prune(dir, rotation.keep)
}

/// Removes the oldest rotated files beyond `keep`, and the job logs not modified since
/// the first line of the history that is left.
fn prune(dir: &Dir, keep: usize) -> io::Result<()> {
    let mut rotated = Vec::new();
    let mut buf = Vec::new();
    dir.scan(&mut buf, |entry| {
        if let Some(time) = format::rotated_time(entry.name) {
            rotated.push((time, entry.name.to_os_string()));
        }
    })?;
    rotated.sort();
    let excess = rotated.len().saturating_sub(keep);
    for (_, name) in rotated.drain(..excess) {
        dir.unlink(&name)?;
    }
    let Some(&(oldest, _)) = rotated.first() else {
        return Ok(());
    };
    let logs = match dir.open_child(OsStr::new(LOGS_DIR)) {
        Ok(logs) => logs,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    logs.scan(&mut buf, |entry| names.push(entry.name.to_os_string()))?;
    for name in names {
        match logs.stat_at(&name) {
            Ok(st) if st.mtime < oldest => {
                let _ = logs.unlink(&name);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The time of the first record in `current.jsonl` (within its first 64 KiB); `None`
/// when there is none.
fn first_time(dir: &Dir) -> io::Result<Option<SystemTime>> {
    let file = dir.open_read(OsStr::new(CURRENT))?;
    let mut head = Vec::with_capacity(1024);
    file.take(64 * 1024).read_to_end(&mut head)?;
    // The first line that is a record: a crash may have left a fragment before it.
    Ok(head
        .split(|&b| b == b'\n')
        .filter_map(HistoryRecord::parse)
        .find_map(|r| r.when()))
}

/// Opens the directory `name` under `parent`, creating it with `mode` if missing.
fn open_or_create(parent: &Path, name: &str, mode: u32) -> io::Result<Dir> {
    let parent_dir = Dir::open(parent)?;
    open_child_or_create(&parent_dir, name, mode)
}

fn open_child_or_create(parent: &Dir, name: &str, mode: u32) -> io::Result<Dir> {
    match parent.open_child(OsStr::new(name)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match parent.mkdir(OsStr::new(name), mode) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            parent.open_child(OsStr::new(name))
        }
        other => other,
    }
}

/// Appends one attempt's `text` to the job log of message `id` of `queue`
/// (`history/logs/<id>.log`), keeping the log within `limit` bytes: past it, the log
/// keeps its head and its tail with a marker line between them.
pub(crate) fn append_job_log(
    queue: &DirectoryQueue,
    id: &OsStr,
    text: &[u8],
    limit: u64,
) -> Result<()> {
    let config = queue.engine().config();
    let logs_path = queue.root().join(HISTORY_DIR).join(LOGS_DIR);
    let name = format::log_name(id);
    let path = logs_path.join(&name);
    let io = |e| Error::io(Operation::Write, &path, e);
    let history = open_or_create(queue.root(), HISTORY_DIR, config.dir_mode).map_err(io)?;
    let logs = open_child_or_create(&history, LOGS_DIR, config.dir_mode).map_err(io)?;
    let file = logs.open_append(&name, config.file_mode).map_err(io)?;
    let size = sys::stat_file(&file).map_err(io)?.size;
    if size + text.len() as u64 <= limit {
        return (&file).write_all(text).map_err(io);
    }
    // Over the limit: rewrite it whole, head and tail kept, through a temporary name
    // and a rename, so a reader never sees a half-written log. One message has one
    // owner at a time, so no other writer appends meanwhile.
    let mut all = Vec::with_capacity((size as usize).saturating_add(text.len()));
    logs.open_read(&name)
        .and_then(|mut f| f.read_to_end(&mut all))
        .map_err(io)?;
    all.extend_from_slice(text);
    let capped = cap(&all, limit as usize);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(".new");
    let _ = logs.unlink(&tmp_name);
    let mut tmp = logs.create_new(&tmp_name, config.file_mode).map_err(io)?;
    tmp.write_all(&capped).map_err(io)?;
    drop(tmp);
    logs.rename_replace(&tmp_name, &logs, &name).map_err(io)
}

/// `bytes` within `limit`: its head and its tail, with a marker line saying how much
/// was left out between them.
pub(crate) fn cap(bytes: &[u8], limit: usize) -> Vec<u8> {
    if bytes.len() <= limit {
        return bytes.to_vec();
    }
    let marker_room = 80;
    let keep = limit.saturating_sub(marker_room);
    let (head, tail) = (keep / 2, keep - keep / 2);
    let skipped = bytes.len() - head - tail;
    let mut out = Vec::with_capacity(limit);
    out.extend_from_slice(&bytes[..head]);
    out.extend_from_slice(format!("\n[dirq: {skipped} bytes left out]\n").as_bytes());
    out.extend_from_slice(&bytes[bytes.len() - tail..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_logs_keep_head_and_tail() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let capped = cap(&bytes, 1000);
        assert!(capped.len() <= 1000, "{}", capped.len());
        assert!(capped.starts_with(&bytes[..400]));
        assert!(capped.ends_with(&bytes[bytes.len() - 400..]));
        assert!(String::from_utf8_lossy(&capped).contains("bytes left out]"));
        assert_eq!(cap(b"short", 1000), b"short");
    }
}
