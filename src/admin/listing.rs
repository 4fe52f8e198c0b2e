//! Listing a queue's messages in any state, with what the operator wants to know of
//! each: size, age, attempts, due time, hold, owner and failure reason.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::time::{Duration, SystemTime};

use crate::engine::{sidecar, StateDir};
use crate::error::{Error, Operation, Result};
use crate::format::meta::FailureInfo;
use crate::format::state::{entry_id, State};
use crate::format::{attempts, id::MessageId};
use crate::piper::PiperInfo;
use crate::sys::{EntryKind, FileStat};
use crate::DirectoryQueue;
use std::collections::HashMap;

/// What a listing says about one entry of a state directory.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MessageInfo {
    /// The message id (file name).
    pub id: MessageId,
    /// The state directory it is in.
    pub state: State,
    /// Size in bytes.
    pub size: u64,
    /// Time since it was created: from the time in its id, or else its modification time.
    pub age: Option<Duration>,
    /// How many times it has been claimed in this queue (for a pending message, this
    /// claim included); `None` when that cannot be read.
    pub attempts: Option<u32>,
    /// For `deferred/`: when it becomes claimable.
    pub not_before: Option<SystemTime>,
    /// For `pending/`: the process that owns it (holds its lock), from `/proc/locks`;
    /// `None` when nobody does (an orphan) or that cannot be known on this platform.
    pub owner: Option<u32>,
    /// Whether it is a regular file; anything else is a hostile entry awaiting
    /// quarantine.
    pub regular: bool,
    /// For `errors/`: what its sidecar says, if it has one.
    pub failure: Option<FailureInfo>,
    /// For `errors/`: when it failed (when its sidecar was written, or else when it was
    /// moved there).
    pub failed_at: Option<SystemTime>,
}

/// The upper limits, in minutes, of the buckets of [`age_histogram`]: qshape's
/// doubling buckets, younger than 5 minutes up to 1280 minutes (about 21 hours).
pub const AGE_BUCKETS_MINUTES: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// Counts `ages` (from [`ages`]) per bucket of [`AGE_BUCKETS_MINUTES`]: younger than
/// 5 minutes, 5 to 10, ..., 640 to 1280, and a last bucket for older ones, so the
/// result has one more entry than the limits.
pub fn age_histogram(ages: &[Duration]) -> [u64; AGE_BUCKETS_MINUTES.len() + 1] {
    let mut counts = [0u64; AGE_BUCKETS_MINUTES.len() + 1];
    for age in ages {
        let minutes = age.as_secs_f64() / 60.0;
        let bucket = AGE_BUCKETS_MINUTES
            .iter()
            .position(|&limit| minutes < limit as f64)
            .unwrap_or(AGE_BUCKETS_MINUTES.len());
        counts[bucket] += 1;
    }
    counts
}

/// The age of every message in one state, from the time in its id (a `stat` only
/// for names without one): what a histogram of ages needs, without reading the
/// messages.
///
/// # Errors
///
/// [`Error::Io`] with [`Operation::Scan`] or [`Operation::Stat`].
pub fn ages(queue: &DirectoryQueue, state: State) -> Result<Vec<Duration>> {
    let Some(dir) = queue.engine().state_dir(state) else {
        return Ok(Vec::new());
    };
    let now = SystemTime::now();
    let mut ages = Vec::new();
    for name in dir.names()? {
        let Some((id, _)) = entry_id(state, &name) else {
            continue;
        };
        let born = match id.timestamp() {
            Some(t) => t,
            None => match dir.dir.stat_at(&name) {
                Ok(st) => st.mtime,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(Operation::Stat, dir.join(&name), e)),
            },
        };
        ages.push(now.duration_since(born).unwrap_or(Duration::ZERO));
    }
    Ok(ages)
}

/// Lists one state directory, oldest first, with size, age, attempts and (for
/// `errors/`) the failure sidecar of each entry.
///
/// # Errors
///
/// [`Error::Io`] naming the directory or entry that could not be read, and
/// [`Error::Json`] for an unreadable sidecar.
pub fn list(queue: &DirectoryQueue, state: State) -> Result<Vec<MessageInfo>> {
    let Some(dir) = queue.engine().state_dir(state) else {
        return Ok(Vec::new());
    };
    let owners = owners(queue, state);
    let mut infos = Vec::new();
    for name in dir.names()? {
        let Some((id, not_before)) = entry_id(state, &name) else {
            continue;
        };
        match describe(queue, state, dir, &name, id, not_before, &owners) {
            Ok(info) => infos.push(info),
            // Claimed, committed or moved since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    infos.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(infos)
}

/// Describes the message `id` in `state`.
///
/// # Errors
///
/// [`Error::Io`] with [`Operation::Stat`] (kind `NotFound` when it is not there),
/// [`Error::Json`] for an unreadable sidecar.
pub fn info(queue: &DirectoryQueue, state: State, id: &MessageId) -> Result<MessageInfo> {
    let not_found = || {
        Error::io(
            Operation::Stat,
            queue
                .engine()
                .root()
                .join(state.as_str())
                .join(id.as_os_str()),
            io::Error::from(io::ErrorKind::NotFound),
        )
    };
    let dir = queue.engine().state_dir(state).ok_or_else(not_found)?;
    let name = queue.engine().find(state, id)?.ok_or_else(not_found)?;
    let (id, not_before) = entry_id(state, &name).ok_or_else(not_found)?;
    describe(
        queue,
        state,
        dir,
        &name,
        id,
        not_before,
        &owners(queue, state),
    )
}

/// Lock holders by inode, for `pending/` only.
fn owners(queue: &DirectoryQueue, state: State) -> HashMap<u64, u32> {
    if state == State::Pending {
        crate::sys::lock_owners(queue.engine().identity().0)
    } else {
        HashMap::new()
    }
}

fn describe(
    queue: &DirectoryQueue,
    state: State,
    dir: &StateDir,
    name: &OsStr,
    id: MessageId,
    not_before: Option<SystemTime>,
    owners: &HashMap<u64, u32>,
) -> Result<MessageInfo> {
    let st = dir
        .dir
        .stat_at(name)
        .map_err(|e| Error::io(Operation::Stat, dir.join(name), e))?;
    let (failure, failed_at) = if state == State::Errors {
        (
            sidecar::read_sidecar(queue.engine(), name)?,
            super::edit::failure_time(dir, name),
        )
    } else {
        (None, None)
    };
    let attempts = (st.kind == EntryKind::File)
        .then(|| dir.dir.open_read(name).ok())
        .flatten()
        .and_then(|file| attempts::read(&file, queue.engine().identity()).ok())
        .map(|done| done + u32::from(state == State::Pending));
    Ok(MessageInfo {
        age: Some(age_of(&id, &st)),
        id,
        state,
        size: st.size,
        attempts,
        not_before,
        owner: owners.get(&st.ino).copied(),
        regular: st.kind == EntryKind::File,
        failure,
        failed_at,
    })
}

/// What the sidecar of the failed message `id` says; `None` if it has none.
///
/// # Errors
///
/// [`Error::Io`] when the sidecar exists but cannot be read, [`Error::Json`] when
/// it is not JSON.
pub fn failure(queue: &DirectoryQueue, id: &MessageId) -> Result<Option<FailureInfo>> {
    sidecar::read_sidecar(queue.engine(), id.as_os_str())
}

/// Finds the message `id` in `incoming/`, `pending/` or `errors/` (in that order)
/// and reads it without claiming it. Only regular files are read; nothing is
/// followed or blocked on.
///
/// # Errors
///
/// [`Error::Io`] with kind `NotFound` when no state holds `id`, or naming the file
/// that could not be read; kind `InvalidData` when the entry is not a regular file.
pub fn peek(queue: &DirectoryQueue, id: &MessageId) -> Result<(State, Vec<u8>)> {
    for state in [
        State::Incoming,
        State::Pending,
        State::Errors,
        State::Hold,
        State::Deferred,
    ] {
        let (Some(dir), Some(name)) = (
            queue.engine().state_dir(state),
            queue.engine().find(state, id)?,
        ) else {
            continue;
        };
        match read_regular(dir, &name) {
            Ok(bytes) => return Ok((state, bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(Operation::Read, dir.join(&name), e)),
        }
    }
    Err(Error::io(
        Operation::Read,
        queue.engine().root().join(id.as_os_str()),
        io::Error::new(
            io::ErrorKind::NotFound,
            "no message with this id in any state",
        ),
    ))
}
fn read_regular(dir: &StateDir, name: &OsStr) -> io::Result<Vec<u8>> {
    let file = dir.dir.open_read(name)?;
    let st = crate::sys::stat_file(&file)?;
    if st.kind != EntryKind::File {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a regular file but a {}", st.kind.as_str()),
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(st.size).unwrap_or(0));
    (&file).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn age_of(id: &MessageId, st: &FileStat) -> Duration {
    let born = id.timestamp().unwrap_or(st.mtime);
    SystemTime::now()
        .duration_since(born)
        .unwrap_or(Duration::ZERO)
}

/// The Pipers that advertise themselves under this queue (see
/// [`Piper`](crate::piper::Piper)), live ones and the stale files of dead ones
/// ([`PiperInfo::live`]).
///
/// # Errors
///
/// [`Error::Io`] when the directory exists but cannot be read.
pub fn pipers(queue: &DirectoryQueue) -> Result<Vec<PiperInfo>> {
    crate::piper::read_adverts(queue.root())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_fall_into_qshape_buckets() {
        let m = |minutes: u64| Duration::from_secs(minutes * 60);
        let counts = age_histogram(&[m(0), m(4), m(5), m(19), m(1279), m(1280), m(100_000)]);
        assert_eq!(counts, [2, 1, 1, 0, 0, 0, 0, 0, 1, 2]);
    }
}
