//! Read-only views of a queue: counts, ages, listings.

use std::io;
use std::time::{Duration, SystemTime};

use super::DirectoryQueue;
use crate::error::{Error, Operation, Result};
use crate::format::id::MessageId;
use crate::format::state::{entry_id, is_listed, State};

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
    /// Members of ordered groups waiting for their turn.
    pub chained: usize,
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
            State::Chained => self.chained,
        }
    }

    /// Messages not yet done with: incoming, pending, deferred, held and chained.
    ///
    /// From [`DirectoryQueue::counts`], 0 does not prove that the queue is drained
    /// while anything works on it: a message on its way back to `incoming/` can be
    /// missed.
    pub fn unfinished(&self) -> usize {
        self.incoming + self.pending + self.deferred + self.hold + self.chained
    }
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
    /// another (`tmp/`, `incoming/`, `pending/`, `errors/`, `deferred/`, `hold/`,
    /// `chained/`) while
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
    /// [`stats`](crate::piper::PiperHandle::stats), a message in the next queue, a failure in
    /// [`admin::failure`](crate::admin::failure)), or stop the workers and then count. A
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
            chained: self.count(State::Chained)?,
        })
    }

    /// Counts the messages of one state (see [`counts`](DirectoryQueue::counts)).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Scan`].
    pub fn count(&self, state: State) -> Result<usize> {
        let Some(dir) = self.engine().state_dir(state) else {
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

    /// Total size in bytes of the messages of one state (a `stat` per message), as
    /// [`Message::size`](crate::Message::size) is the size of one.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Scan`] or [`Operation::Stat`].
    pub fn size(&self, state: State) -> Result<u64> {
        let Some(dir) = self.engine().state_dir(state) else {
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
        let dir = self.engine().dir(State::Incoming);
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
        let Some(dir) = self.engine().state_dir(state) else {
            return Ok(Ids {
                state,
                path: self.engine().root().join(state.as_str()),
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
