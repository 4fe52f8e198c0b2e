//! Cancelling a running message: the request channel between `dirq cancel` (or
//! [`admin::cancel_timeout`](crate::admin::cancel_timeout)) and the Piper that owns the message
//! (docs/protocol.md, section 6.10).
//!
//! A request is a small JSON file, `<queue>/pipers/cancel/<id>`, beside the liveness
//! adverts of the Pipers that read the queue. It names the pid of the owner (found
//! through the lock on `pending/<id>`, section 3), so that only that process acts on
//! it, whatever other Pipers share the queue. Every file is written under a dot name
//! that readers skip, then renamed into place, so a reader never sees half a request.
//!
//! - The owning Piper's supervisor looks at the directory every
//!   [`SCAN_EVERY`] (with its other periodic work). For a message one of its workers
//!   is processing, it marks the job cancelled: the stage is told through its
//!   [`Cancellation`] (a [`CommandStage`](super::CommandStage) kills its command's
//!   process group), and when the stage returns, whatever it returned, the worker
//!   moves the message to `errors/` with reason [`CANCELLED_REASON`] (or back to
//!   `incoming/`) instead of carrying out the outcome.
//! - The worker then answers by rewriting the request with a `result`: `errors`,
//!   `incoming`, or `finished` when the message had already been processed (its outcome
//!   was decided before the cancel arrived, and was carried out). The requester reads
//!   the answer and removes the file.
//! - Stale files are removed by any Piper reading the queue: a request whose owner
//!   process is gone, an answer whose requester is gone or that is older than
//!   [`ANSWER_KEEP`], and a file that does not parse.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::liveness::{epoch_ms, PIPERS_DIR};
use super::{lock, Shared, JOB_CANCELLED, JOB_REQUEUE, JOB_RUNNING};
use crate::format::meta::rfc3339;
use crate::sys::{self, Dir};
use crate::{DirectoryQueue, MessageId, State};

/// The directory under `<queue>/pipers/` that holds cancel requests.
pub(crate) const CANCEL_DIR: &str = "cancel";

/// The reason in the sidecar of a message cancelled into `errors/`, and the
/// `DIRQ_REASON` of a [`CommandStage`](super::CommandStage)'s on-fail hook.
pub const CANCELLED_REASON: &str = "cancelled by operator";

/// How often a Piper looks for requests: a cancel takes effect within about this long
/// (plus the stage's own time to stop).
pub(crate) const SCAN_EVERY: Duration = Duration::from_millis(200);

/// How long an answer waits for its requester before any Piper removes it.
const ANSWER_KEEP: Duration = Duration::from_secs(600);

/// Whether the [`Stage`](super::Stage) working on a message should stop: the operator
/// cancelled the message (`dirq cancel`, [`admin::cancel_timeout`](crate::admin::cancel_timeout)).
///
/// A stage that runs long polls [`is_cancelled`](Self::is_cancelled) in
/// [`Stage::process_cancellable`](super::Stage::process_cancellable) and returns early.
/// Whatever it returns then, the Piper does not carry out its outcome: the message goes
/// to `errors/` with reason [`CANCELLED_REASON`] (or back to `incoming/`). The cancel
/// wins even over a stage that returns [`Outcome::Commit`](super::Outcome::Commit)
/// afterwards; a stage whose outcome was decided first (it returned before the cancel
/// arrived) is not cancelled.
///
/// `Cancellation::default()` is never cancelled, for running a stage outside a Piper.
#[derive(Clone, Default)]
pub struct Cancellation {
    /// The job's state (`JOB_*` in the parent module), shared with the supervisor.
    state: Option<Arc<AtomicU8>>,
}

impl Cancellation {
    pub(super) fn of(state: &Arc<AtomicU8>) -> Cancellation {
        Cancellation {
            state: Some(Arc::clone(state)),
        }
    }

    /// Whether the message was cancelled: stop working on it and return.
    pub fn is_cancelled(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| matches!(s.load(Ordering::Acquire), JOB_CANCELLED | JOB_REQUEUE))
    }
}

impl std::fmt::Debug for Cancellation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancellation")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// One request, and later its answer; the JSON of `pipers/cancel/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Request {
    /// Back to `incoming/` rather than to `errors/`.
    pub(crate) requeue: bool,
    /// When it was asked, RFC 3339 UTC (for people).
    pub(crate) requested_at: String,
    /// The same, milliseconds since the epoch (for programs).
    pub(crate) requested_ms: u64,
    /// The pid of the requester.
    pub(crate) by: u32,
    /// The pid of the process that owned the message when it was asked: only it acts.
    pub(crate) owner: u32,
    /// Set by the owner when it is done: where the message went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<Answer>,
}

/// What became of a cancelled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Answer {
    /// Moved to `errors/` with reason [`CANCELLED_REASON`].
    Errors,
    /// Put back into `incoming/`.
    Incoming,
    /// Its outcome was decided before the cancel arrived, and carried out.
    Finished,
}

impl Request {
    pub(crate) fn new(requeue: bool, owner: u32) -> Request {
        let now = SystemTime::now();
        Request {
            requeue,
            requested_at: rfc3339(now),
            requested_ms: epoch_ms(now),
            by: sys::pid(),
            owner,
            result: None,
        }
    }

    fn key(&self, input: usize, name: &OsStr) -> Key {
        (input, name.to_os_string(), self.requested_ms, self.by)
    }
}

/// Tells one request apart from another for the same message: (input, id,
/// `requested_ms`, `by`).
type Key = (usize, OsString, u64, u32);

/// The path of the request directory of the queue at `root`.
pub(crate) fn dir_path(root: &Path) -> PathBuf {
    root.join(PIPERS_DIR).join(CANCEL_DIR)
}

/// Opens the request directory of `queue`, creating it (and `pipers/`) if `create`;
/// `None` when it does not exist and `create` is false.
pub(crate) fn open_dir(queue: &DirectoryQueue, create: bool) -> io::Result<Option<Dir>> {
    let path = dir_path(queue.root());
    match Dir::open(&path) {
        Ok(dir) => return Ok(Some(dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let mode = queue.engine().config().dir_mode;
    let root = Dir::open(queue.root())?;
    mkdir_quiet(&root, OsStr::new(PIPERS_DIR), mode)?;
    let pipers = root.open_child(OsStr::new(PIPERS_DIR))?;
    mkdir_quiet(&pipers, OsStr::new(CANCEL_DIR), mode)?;
    Dir::open(&path).map(Some)
}

fn mkdir_quiet(dir: &Dir, name: &OsStr, mode: u32) -> io::Result<()> {
    match dir.mkdir(name, mode) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Writes `request` as `name` in `dir`: under a dot name first, then renamed over
/// whatever is there, so that readers see the old file or the new one, never half.
pub(crate) fn write(dir: &Dir, name: &OsStr, request: &Request, mode: u32) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(request).map_err(io::Error::other)?;
    let tmp = OsString::from(format!(
        ".{}.{}.{}.new",
        name.to_string_lossy(),
        sys::pid(),
        sys::random::unit().to_bits()
    ));
    let mut file = dir.create_new(&tmp, mode)?;
    let written = file.write_all(&json);
    drop(file);
    let renamed = written.and_then(|()| dir.rename_replace(&tmp, dir, name));
    if renamed.is_err() {
        let _ = dir.unlink(&tmp);
    }
    renamed
}

/// Reads the request `name` in `dir`: `Ok(None)` when there is none, `Err` with kind
/// `InvalidData` when it does not parse.
pub(crate) fn read(dir: &Dir, name: &OsStr) -> io::Result<Option<Request>> {
    let mut file = match dir.open_read(name) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Removes the request `name`; a request already gone is not an error.
pub(crate) fn remove(dir: &Dir, name: &OsStr) -> io::Result<()> {
    match dir.unlink(name) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The names of the requests in `dir` (dot names, being written, are skipped).
fn names(dir: &Dir) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    let mut buf = Vec::new();
    dir.scan(&mut buf, |entry| {
        if !entry.name.as_encoded_bytes().starts_with(b".") {
            names.push(entry.name.to_os_string());
        }
    })?;
    Ok(names)
}

/// Answers the request for `id` in `queue` (if it is still there, unanswered):
/// called by the worker that carried the cancel out.
pub(super) fn answer(queue: &DirectoryQueue, id: &MessageId, answer: Answer) {
    let name = id.as_os_str();
    let answered = (|| {
        let Some(dir) = open_dir(queue, false)? else {
            return Ok(()); // withdrawn
        };
        let Some(mut request) = read(&dir, name)? else {
            return Ok(()); // withdrawn: the requester gave up waiting
        };
        if request.result.is_some() || request.owner != sys::pid() {
            return Ok(());
        }
        request.result = Some(answer);
        write(&dir, name, &request, queue.engine().config().file_mode)
    })();
    if let Err(e) = answered {
        tracing::warn!(id = %id, error = %e, "cannot answer a cancel request");
    }
}

/// The supervisor's side: looks for requests at most every [`SCAN_EVERY`].
pub(super) struct Watcher {
    last: Instant,
    /// The requests already acted on (input, id, requested_ms, by): a message put back
    /// into `incoming/` and claimed again by this Piper before its answer is written
    /// must not be cancelled twice.
    taken: HashSet<Key>,
}

impl Watcher {
    pub(super) fn new() -> Watcher {
        Watcher {
            last: Instant::now(),
            taken: HashSet::new(),
        }
    }

    /// Acts on this process's requests, answers those it can, removes stale ones.
    pub(super) fn tick(&mut self, shared: &Shared, now: Instant) {
        if now.duration_since(self.last) < SCAN_EVERY {
            return;
        }
        self.last = now;
        let mut seen = HashSet::new();
        for (input, queue) in shared.inputs.iter().enumerate() {
            if let Err(e) = self.scan(shared, input, queue, &mut seen) {
                tracing::debug!(stage = %shared.name, queue = %queue.root().display(), error = %e, "cannot read cancel requests");
            }
        }
        self.taken.retain(|key| seen.contains(key));
    }

    fn scan(
        &mut self,
        shared: &Shared,
        input: usize,
        queue: &DirectoryQueue,
        seen: &mut HashSet<Key>,
    ) -> io::Result<()> {
        let Some(dir) = open_dir(queue, false)? else {
            return Ok(());
        };
        let me = sys::pid();
        for name in names(&dir)? {
            let request = match read(&dir, &name) {
                Ok(Some(request)) => request,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::warn!(queue = %queue.root().display(), name = %name.to_string_lossy(), "removing a cancel request that does not parse");
                    remove(&dir, &name)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if request.result.is_some() {
                let age = epoch_ms(SystemTime::now()).saturating_sub(request.requested_ms);
                if !sys::process_alive(request.by) || age > ANSWER_KEEP.as_millis() as u64 {
                    remove(&dir, &name)?;
                }
                continue;
            }
            if request.owner != me {
                // Another process's message: it acts. Gone, it never will; its message
                // is recovered like any dead owner's.
                if !sys::process_alive(request.owner) {
                    remove(&dir, &name)?;
                }
                continue;
            }
            let key = request.key(input, &name);
            seen.insert(key.clone());
            if self.taken.contains(&key) {
                continue; // acted on; the worker answers
            }
            if self.cancel_job(shared, input, &name, request.requeue) {
                tracing::info!(stage = %shared.name, id = %name.to_string_lossy(), requeue = request.requeue, by = request.by, "cancelling a message at the operator's request");
                self.taken.insert(key);
                continue;
            }
            // Not being processed here. Its outcome was decided before the request came
            // (it may still wait in pending/ for the group commit), or a worker claimed
            // it an instant ago and has not yet started its stage: answer once it has
            // left pending/, else look again at the next scan.
            let Ok(id) = MessageId::new(&name) else {
                remove(&dir, &name)?;
                continue;
            };
            // IMPORTANT: in this order. Another Piper of this process may be carrying
            // the cancel out: it marks it under way before it cancels the job, and
            // unmarks it only after its answer. So a message gone from pending/, not
            // under way, and whose request is still unanswered when read again, was
            // not cancelled by anyone here, and this answer overwrites no other.
            if queue.engine().find(State::Pending, &id)?.is_some() || is_under_way(queue, &id) {
                continue;
            }
            if let Some(mut unanswered) = read(&dir, &name)?.filter(|r| r.result.is_none()) {
                unanswered.result = Some(Answer::Finished);
                write(&dir, &name, &unanswered, queue.engine().config().file_mode)?;
            }
        }
        Ok(())
    }

    /// Marks the job processing `name` from `input` cancelled; false when there is none
    /// (or it finished or was taken over just now).
    fn cancel_job(&self, shared: &Shared, input: usize, name: &OsStr, requeue: bool) -> bool {
        let target = if requeue { JOB_REQUEUE } else { JOB_CANCELLED };
        let queue = &shared.inputs[input];
        let jobs = lock(&shared.jobs);
        let Some(job) = jobs
            .iter()
            .find(|job| job.input == input && job.id.as_os_str() == name)
        else {
            return false;
        };
        begin(queue, &job.id);
        let cancelled = job
            .state
            .compare_exchange(JOB_RUNNING, target, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !cancelled {
            end(queue, &job.id);
        }
        cancelled
    }
}

/// The cancels being carried out in this process, by queue (its identity) and id,
/// from before the job is marked until after the answer is written.
///
/// Process-wide, not per Piper: several Pipers of one process may read one queue, and
/// a request names the process. One that has no job for the message must not answer
/// `finished` while another carries the cancel out (see [`Watcher::scan`]).
static UNDER_WAY: Mutex<Vec<((u64, u64), MessageId)>> = Mutex::new(Vec::new());

fn under_way() -> std::sync::MutexGuard<'static, Vec<((u64, u64), MessageId)>> {
    UNDER_WAY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn begin(queue: &DirectoryQueue, id: &MessageId) {
    under_way().push((queue.engine().identity(), id.clone()));
}

/// Unmarks a cancel: after its answer, or when it did not happen after all (the job
/// finished first, or the timeout took it over).
pub(super) fn end(queue: &DirectoryQueue, id: &MessageId) {
    let key = (queue.engine().identity(), id.clone());
    let mut cancels = under_way();
    if let Some(i) = cancels.iter().position(|k| *k == key) {
        cancels.swap_remove(i);
    }
}

fn is_under_way(queue: &DirectoryQueue, id: &MessageId) -> bool {
    let key = (queue.engine().identity(), id.clone());
    under_way().contains(&key)
}

/// Removes the stale requests of `queue`: unanswered ones whose owner process is gone,
/// answered ones whose requester is gone; for `dirq recover`. The number removed.
///
/// # Errors
///
/// An I/O error reading the request directory.
pub(crate) fn remove_stale(queue: &DirectoryQueue) -> io::Result<usize> {
    let Some(dir) = open_dir(queue, false)? else {
        return Ok(0);
    };
    let mut removed = 0;
    for name in names(&dir)? {
        let stale = match read(&dir, &name) {
            Ok(Some(request)) => {
                let waiting_for = match request.result {
                    Some(_) => request.by,
                    None => request.owner,
                };
                !sys::process_alive(waiting_for)
            }
            Ok(None) => false,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => true,
            Err(e) => return Err(e),
        };
        if stale {
            remove(&dir, &name)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid that no process has now: a child that exited and was reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("run true");
        let pid = child.id();
        child.wait().expect("wait for true");
        pid
    }

    #[test]
    fn requests_are_written_whole_and_stale_ones_are_removed() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let queue = DirectoryQueue::open(dir.path().join("q")).expect("open queue");
        assert!(open_dir(&queue, false).expect("no directory yet").is_none());
        let cancels = open_dir(&queue, true).expect("create").expect("created");
        let mine = Request::new(true, sys::pid());
        write(&cancels, OsStr::new("a"), &mine, 0o644).expect("write a");
        assert_eq!(
            read(&cancels, OsStr::new("a")).expect("read a"),
            Some(mine.clone())
        );
        // Only the final names are there: the dot name was renamed away.
        assert_eq!(names(&cancels).expect("names"), [OsString::from("a")]);

        let orphaned = Request::new(false, dead_pid());
        write(&cancels, OsStr::new("b"), &orphaned, 0o644).expect("write b");
        let answered = Request {
            result: Some(Answer::Errors),
            by: dead_pid(),
            ..mine.clone()
        };
        write(&cancels, OsStr::new("c"), &answered, 0o644).expect("write c");
        std::fs::write(dir_path(queue.root()).join("d"), b"not json").expect("write d");
        assert_eq!(remove_stale(&queue).expect("remove stale"), 3);
        assert_eq!(names(&cancels).expect("names"), [OsString::from("a")]);
        remove(&cancels, OsStr::new("a")).expect("remove a");
        remove(&cancels, OsStr::new("a")).expect("removing twice is fine");
        assert_eq!(read(&cancels, OsStr::new("a")).expect("read"), None);
    }
}
