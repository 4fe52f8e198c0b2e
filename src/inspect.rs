//! Read-only views of a queue: counts, ages, listings.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Operation, Result};
use crate::id::META_SUFFIX;
use crate::meta::{self, FailureInfo};
use crate::queue::StateDir;
use crate::sys::{EntryKind, FileStat};
use crate::{DirectoryQueue, MessageId, State};

/// How many messages each state held, each state counted at its own moment (see
/// [`DirectoryQueue::counts`] for what that does and does not guarantee).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// Files being written.
    pub tmp: usize,
    /// Messages waiting to be claimed.
    pub incoming: usize,
    /// Messages being processed.
    pub pending: usize,
    /// Failed messages (sidecars not counted).
    pub errors: usize,
    /// Messages waiting for a time (retries, delayed deliveries).
    pub deferred: usize,
    /// Messages on hold.
    pub hold: usize,
}

impl Counts {
    /// The count of one state.
    pub fn get(&self, state: State) -> usize {
        match state {
            State::Tmp => self.tmp,
            State::Incoming => self.incoming,
            State::Pending => self.pending,
            State::Errors => self.errors,
            State::Deferred => self.deferred,
            State::Hold => self.hold,
        }
    }

    /// Messages not yet done with: incoming, pending, deferred and held.
    ///
    /// From [`DirectoryQueue::counts`], 0 does not prove that the queue is drained
    /// while anything works on it: a message on its way back to `incoming/` can be
    /// missed.
    pub fn unfinished(&self) -> usize {
        self.incoming + self.pending + self.deferred + self.hold
    }
}

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

impl DirectoryQueue {
    /// Counts the entries of every state directory.
    ///
    /// Names starting with `.` are not messages and are not counted, except in `tmp/`;
    /// `.meta` sidecars in `errors/` are not counted.
    ///
    /// # Consistency
    ///
    /// The counts are not one atomic snapshot: the directories are read one after
    /// another (`tmp/`, `incoming/`, `pending/`, `errors/`, `deferred/`, `hold/`) while
    /// messages keep moving.
    ///
    /// - Guaranteed: each count is what its directory held at some moment during the
    ///   call, and a message that stays in one state for the whole call is counted
    ///   exactly once. On a queue at rest (nothing claims, releases or promotes) the
    ///   counts are exact.
    /// - Not guaranteed: a message that moves during the call may be counted twice
    ///   (moved to a directory read later, as a claim from `incoming/` to `pending/`)
    ///   or not at all (moved to a directory read earlier: a retry falling due in
    ///   `deferred/`, a release or recovery from `pending/`, an unhold, all of which
    ///   go to `incoming/`). So [`Counts::unfinished`] can be 0 for a moment while a
    ///   message is still going round.
    ///
    /// To learn that work has finished, wait for what finishing means (a Piper's
    /// [`stats`](crate::PiperHandle::stats), a message in the next queue, a failure in
    /// [`failure`](DirectoryQueue::failure)), or stop the workers and then count. A
    /// poller with nothing better can require two idle counts in a row, some time
    /// apart: a message missed by both moved back to `incoming/` during each of them,
    /// which a retry cannot do again before its next delay has passed.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Scan`] naming the directory that could not be read.
    pub fn counts(&self) -> Result<Counts> {
        Ok(Counts {
            tmp: self.count(State::Tmp)?,
            incoming: self.count(State::Incoming)?,
            pending: self.count(State::Pending)?,
            errors: self.count(State::Errors)?,
            deferred: self.count(State::Deferred)?,
            hold: self.count(State::Hold)?,
        })
    }

    /// Counts the messages of one state (see [`counts`](DirectoryQueue::counts)).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Scan`].
    pub fn count(&self, state: State) -> Result<usize> {
        let Some(dir) = self.inner.state_dir(state) else {
            return Ok(0);
        };
        let mut n = 0;
        let mut buf = Vec::new();
        dir.dir
            .scan(&mut buf, |entry| {
                n += usize::from(is_listed(state, entry.name))
            })
            .map_err(|e| Error::io(Operation::Scan, &dir.path, e))?;
        Ok(n)
    }

    /// Total size in bytes of the messages of one state (a `stat` per message).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Scan`] or [`Operation::Stat`].
    pub fn bytes(&self, state: State) -> Result<u64> {
        let Some(dir) = self.inner.state_dir(state) else {
            return Ok(0);
        };
        let mut total = 0;
        for name in dir.names()? {
            if !is_listed(state, &name) {
                continue;
            }
            match dir.dir.stat_at(&name) {
                Ok(st) => total += st.size,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(Operation::Stat, dir.join(&name), e)),
            }
        }
        Ok(total)
    }

    /// The age of every message in one state, from the time in its id (a `stat` only
    /// for names without one): what a histogram of ages needs, without reading the
    /// messages.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Scan`] or [`Operation::Stat`].
    pub fn ages(&self, state: State) -> Result<Vec<Duration>> {
        let Some(dir) = self.inner.state_dir(state) else {
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

    /// Age of the oldest message in `incoming/`: how long the longest-waiting message
    /// has waited. `None` when `incoming/` is empty.
    ///
    /// The age comes from the creation time in the id (dirq's and Mentat's formats);
    /// for other names, from the file's modification time.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Scan`] or [`Operation::Stat`].
    pub fn oldest_age(&self) -> Result<Option<Duration>> {
        let dir = self.inner.dir(State::Incoming);
        let mut oldest_timed: Option<SystemTime> = None;
        let mut untimed = Vec::new();
        let mut buf = Vec::new();
        dir.dir
            .scan(&mut buf, |entry| {
                if !is_listed(State::Incoming, entry.name) {
                    return;
                }
                let id = MessageId::from_name(entry.name);
                match id.timestamp() {
                    Some(t) => oldest_timed = Some(oldest_timed.map_or(t, |o| o.min(t))),
                    None => untimed.push(entry.name.to_os_string()),
                }
            })
            .map_err(|e| Error::io(Operation::Scan, &dir.path, e))?;
        let mut oldest = oldest_timed;
        for name in untimed {
            match dir.dir.stat_at(&name) {
                Ok(st) => oldest = Some(oldest.map_or(st.mtime, |o| o.min(st.mtime))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(Operation::Stat, dir.join(&name), e)),
            }
        }
        Ok(oldest.map(|t| {
            SystemTime::now()
                .duration_since(t)
                .unwrap_or(Duration::ZERO)
        }))
    }

    /// The ids in one state directory, in directory order (not sorted), streamed.
    ///
    /// Hidden names (starting with `.`; except in `tmp/`) and `.meta` sidecars are left
    /// out. A directory read error is yielded as an item and iteration ends.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Scan`] when the directory cannot be opened.
    pub fn ids(&self, state: State) -> Result<Ids> {
        let Some(dir) = self.inner.state_dir(state) else {
            return Ok(Ids {
                state,
                path: self.inner.root.join(state.as_str()),
                entries: None,
            });
        };
        let path = dir.path.clone();
        let entries = std::fs::read_dir(&path).map_err(|e| Error::io(Operation::Scan, &path, e))?;
        Ok(Ids {
            state,
            path,
            entries: Some(entries),
        })
    }

    /// Lists one state directory, oldest first, with size, age, attempts and (for
    /// `errors/`) the failure sidecar of each entry.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] naming the directory or entry that could not be read, and
    /// [`Error::Json`] for an unreadable sidecar.
    pub fn list(&self, state: State) -> Result<Vec<MessageInfo>> {
        let Some(dir) = self.inner.state_dir(state) else {
            return Ok(Vec::new());
        };
        let owners = self.owners(state);
        let mut infos = Vec::new();
        for name in dir.names()? {
            let Some((id, not_before)) = entry_id(state, &name) else {
                continue;
            };
            match self.describe(state, dir, &name, id, not_before, &owners) {
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
    pub fn info(&self, state: State, id: &MessageId) -> Result<MessageInfo> {
        let not_found = || {
            Error::io(
                Operation::Stat,
                self.inner.root.join(state.as_str()).join(id.as_os_str()),
                io::Error::from(io::ErrorKind::NotFound),
            )
        };
        let dir = self.inner.state_dir(state).ok_or_else(not_found)?;
        let name = self.find(state, id)?.ok_or_else(not_found)?;
        let (id, not_before) = entry_id(state, &name).ok_or_else(not_found)?;
        self.describe(state, dir, &name, id, not_before, &self.owners(state))
    }

    /// Lock holders by inode, for `pending/` only.
    fn owners(&self, state: State) -> std::collections::HashMap<u64, u32> {
        if state == State::Pending {
            crate::sys::lock_owners(self.inner.identity.0)
        } else {
            std::collections::HashMap::new()
        }
    }

    fn describe(
        &self,
        state: State,
        dir: &StateDir,
        name: &OsStr,
        id: MessageId,
        not_before: Option<SystemTime>,
        owners: &std::collections::HashMap<u64, u32>,
    ) -> Result<MessageInfo> {
        let st = dir
            .dir
            .stat_at(name)
            .map_err(|e| Error::io(Operation::Stat, dir.join(name), e))?;
        let (failure, failed_at) = if state == State::Errors {
            (
                meta::read_sidecar(&self.inner, name)?,
                crate::admin::failure_time(dir, name),
            )
        } else {
            (None, None)
        };
        let attempts = (st.kind == EntryKind::File)
            .then(|| dir.dir.open_read(name).ok())
            .flatten()
            .and_then(|file| crate::attempts::read(&file, self.inner.identity).ok())
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
    pub fn failure(&self, id: &MessageId) -> Result<Option<FailureInfo>> {
        meta::read_sidecar(&self.inner, id.as_os_str())
    }

    /// Finds the message `id` in `incoming/`, `pending/` or `errors/` (in that order)
    /// and reads it without claiming it. Only regular files are read; nothing is
    /// followed or blocked on.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with kind `NotFound` when no state holds `id`, or naming the file
    /// that could not be read; kind `InvalidData` when the entry is not a regular file.
    pub fn peek(&self, id: &MessageId) -> Result<(State, Vec<u8>)> {
        for state in [
            State::Incoming,
            State::Pending,
            State::Errors,
            State::Hold,
            State::Deferred,
        ] {
            let (Some(dir), Some(name)) = (self.inner.state_dir(state), self.find(state, id)?)
            else {
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
            self.inner.root.join(id.as_os_str()),
            io::Error::new(
                io::ErrorKind::NotFound,
                "no message with this id in any state",
            ),
        ))
    }
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

/// The message id (and, in `deferred/`, the due time) of a listed name in `state`.
fn entry_id(state: State, name: &OsStr) -> Option<(MessageId, Option<SystemTime>)> {
    if !is_listed(state, name) {
        return None;
    }
    if state == State::Deferred {
        let (when, id) = crate::defer::parse_deferred_name(name)?;
        return Some((id, Some(when)));
    }
    Some((MessageId::from_name(name), None))
}

/// Whether `name` is listed and counted in `state`.
fn is_listed(state: State, name: &OsStr) -> bool {
    let bytes = name.as_encoded_bytes();
    match state {
        State::Tmp => true,
        State::Errors => !MessageId::is_hidden(bytes) && !bytes.ends_with(META_SUFFIX.as_bytes()),
        _ => !MessageId::is_hidden(bytes),
    }
}

fn age_of(id: &MessageId, st: &FileStat) -> Duration {
    let born = id.timestamp().unwrap_or(st.mtime);
    SystemTime::now()
        .duration_since(born)
        .unwrap_or(Duration::ZERO)
}

/// The ids of one state directory; see [`DirectoryQueue::ids`].
#[derive(Debug)]
pub struct Ids {
    state: State,
    path: std::path::PathBuf,
    entries: Option<std::fs::ReadDir>,
}

impl Iterator for Ids {
    type Item = Result<MessageId>;

    fn next(&mut self) -> Option<Result<MessageId>> {
        loop {
            let entry = match self.entries.as_mut()?.next()? {
                Ok(entry) => entry,
                Err(e) => {
                    self.entries = None;
                    return Some(Err(Error::io(Operation::Scan, &self.path, e)));
                }
            };
            if let Some((id, _)) = entry_id(self.state, &entry.file_name()) {
                return Some(Ok(id));
            }
        }
    }
}
