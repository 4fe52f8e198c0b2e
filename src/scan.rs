//! Oldest-first directory scans with bounded memory.
//!
//! A scan reads the whole directory (there is no other way to find its oldest names)
//! but keeps only the `limit` oldest entries, so memory stays bounded however long the
//! queue is. Entries are kept in a buffer of up to `2 * limit`; when it fills, a
//! linear-time selection keeps the `limit` oldest and the rest are dropped. From then on
//! a name that is not older than the newest kept one is skipped without allocating.
//! The total cost is linear in the directory size.

use std::ffi::OsStr;
use std::mem::MaybeUninit;

use crate::id::MessageId;
use crate::queue::StateDir;
use std::time::{Duration, SystemTime};

use crate::sys::{EntryKind, FileStat};

/// A name found by a scan.
#[derive(Debug)]
pub(crate) struct Candidate {
    pub(crate) id: MessageId,
    pub(crate) kind: EntryKind,
}

/// The result of [`oldest`].
#[derive(Debug, Default)]
pub(crate) struct Oldest {
    /// The oldest entries, oldest first.
    pub(crate) candidates: Vec<Candidate>,
}

/// Reads `dir` and returns its `limit` oldest entries in FIFO order, leaving out names
/// starting with `.` (files in progress, never messages).
pub(crate) fn oldest(
    dir: &StateDir,
    limit: usize,
    buf: &mut Vec<MaybeUninit<u8>>,
) -> std::io::Result<Oldest> {
    let limit = limit.max(1);
    let mut kept: Vec<Candidate> = Vec::new();
    let mut threshold: Option<MessageId> = None;
    dir.dir.scan(buf, |entry| {
        if MessageId::is_hidden(entry.name.as_encoded_bytes()) {
            return;
        }
        if let Some(threshold) = &threshold {
            if !precedes(entry.name, threshold) {
                return;
            }
        }
        kept.push(Candidate {
            id: MessageId::from_name(entry.name),
            kind: entry.kind,
        });
        if kept.len() == 2 * limit {
            kept.select_nth_unstable_by(limit - 1, |a, b| a.id.cmp(&b.id));
            kept.truncate(limit);
            threshold = kept.iter().map(|c| &c.id).max().cloned();
        }
    })?;
    kept.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    kept.truncate(limit);
    Ok(Oldest { candidates: kept })
}

/// What changes when a directory's entries change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirStamp {
    mtime: SystemTime,
    ctime: SystemTime,
    size: u64,
}

impl DirStamp {
    pub(crate) fn of(st: &FileStat) -> DirStamp {
        DirStamp {
            mtime: st.mtime,
            ctime: st.ctime,
            size: st.size,
        }
    }

    /// Whether the stamp is old enough that a later change cannot share it: directory
    /// timestamps come from a coarse clock, so a change within the same tick as the
    /// stamp could leave it unchanged.
    pub(crate) fn settled(&self) -> bool {
        let horizon = SystemTime::now() - Duration::from_secs(1);
        self.mtime < horizon && self.ctime < horizon
    }
}

/// Whether `name` sorts before `threshold`, without allocating an id for it.
fn precedes(name: &OsStr, threshold: &MessageId) -> bool {
    MessageId::cmp_name(name, threshold).is_lt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Dir;
    use std::path::PathBuf;

    fn state_dir(path: PathBuf) -> StateDir {
        StateDir {
            dir: Dir::open(&path).unwrap(),
            path,
        }
    }

    #[test]
    fn keeps_the_oldest_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut names: Vec<String> = (0..1000).map(|i| format!("m{i:05}")).collect();
        // Create in a scrambled order; directory order is not creation order anyway.
        names.reverse();
        for n in &names {
            std::fs::write(tmp.path().join(n), b"x").unwrap();
        }
        std::fs::write(tmp.path().join(".hidden"), b"x").unwrap();
        let dir = state_dir(tmp.path().to_path_buf());
        let mut buf = Vec::new();
        for limit in [1, 7, 100, 999, 1000, 5000] {
            let got = oldest(&dir, limit, &mut buf).unwrap();
            let expect: Vec<String> = (0..limit.min(1000)).map(|i| format!("m{i:05}")).collect();
            let got_names: Vec<String> = got
                .candidates
                .iter()
                .map(|c| c.id.to_str().unwrap().to_owned())
                .collect();
            assert_eq!(got_names, expect, "limit {limit}");
        }
    }
}
