//! Oldest-first directory scans with bounded memory.
//!
//! A scan reads the whole directory (there is no other way to find its oldest names)
//! but keeps only the `limit` oldest entries, so memory stays bounded however long the
//! queue is. Entries are kept in a buffer of up to `2 * limit`; when it fills, a
//! linear-time selection keeps the `limit` oldest and the rest are dropped. From then on
//! a name that is not older than the newest kept one is skipped without allocating.
//! The total cost is linear in the directory size.

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
    let mut selection = Selection::new(limit.max(1));
    dir.dir.scan(buf, |entry| {
        let name = entry.name.as_encoded_bytes();
        if !MessageId::is_hidden(name) {
            selection.offer(name, entry.kind);
        }
    })?;
    Ok(Oldest {
        candidates: selection.into_oldest(),
    })
}

/// The oldest names offered so far, kept without an allocation per name: the names
/// live in one buffer (`arena`) and `kept` holds their sort keys and places in it.
/// Reading a directory of a million names offers every one of them; this is the part
/// of the cost of a first claim that is ours rather than the kernel's.
struct Selection {
    limit: usize,
    kept: Vec<Kept>,
    arena: Vec<u8>,
    /// Once `kept` has been cut to `limit`: the newest kept name. Names that do not
    /// precede it cannot be among the oldest and are not kept.
    threshold: Option<(u64, Vec<u8>)>,
}

/// A kept name: its creation time (the first part of FIFO order, see [`MessageId`])
/// and its bytes `arena[start..start + len]`.
#[derive(Clone, Copy)]
struct Kept {
    time_ns: u64,
    start: usize,
    len: usize,
    kind: EntryKind,
}

impl Selection {
    fn new(limit: usize) -> Selection {
        Selection {
            limit,
            kept: Vec::new(),
            arena: Vec::new(),
            threshold: None,
        }
    }

    fn offer(&mut self, name: &[u8], kind: EntryKind) {
        let time_ns = MessageId::time_of(name);
        if let Some((threshold_ns, threshold)) = &self.threshold {
            if (time_ns, name) >= (*threshold_ns, threshold.as_slice()) {
                return;
            }
        }
        self.kept.push(Kept {
            time_ns,
            start: self.arena.len(),
            len: name.len(),
            kind,
        });
        self.arena.extend_from_slice(name);
        if self.kept.len() == 2 * self.limit {
            self.cut();
        }
    }

    /// Keeps the `limit` oldest, in linear time, and forgets the others' bytes.
    fn cut(&mut self) {
        let arena = &self.arena;
        self.kept
            .select_nth_unstable_by(self.limit - 1, |a, b| fifo(arena, a, b));
        self.kept.truncate(self.limit);
        let mut compacted = Vec::with_capacity(self.arena.len() / 2);
        for kept in &mut self.kept {
            let start = compacted.len();
            compacted.extend_from_slice(&self.arena[kept.start..kept.start + kept.len]);
            kept.start = start;
        }
        self.arena = compacted;
        self.threshold = self
            .kept
            .iter()
            .max_by(|a, b| fifo(&self.arena, a, b))
            .map(|newest| (newest.time_ns, self.bytes(newest).to_vec()));
    }

    fn bytes(&self, kept: &Kept) -> &[u8] {
        &self.arena[kept.start..kept.start + kept.len]
    }

    /// The `limit` oldest names offered, oldest first.
    fn into_oldest(mut self) -> Vec<Candidate> {
        let arena = &self.arena;
        self.kept.sort_unstable_by(|a, b| fifo(arena, a, b));
        self.kept.truncate(self.limit);
        self.kept
            .iter()
            .map(|kept| Candidate {
                id: MessageId::with_time(
                    crate::sys::os_string(self.bytes(kept).to_vec()),
                    kept.time_ns,
                ),
                kind: kept.kind,
            })
            .collect()
    }
}

/// FIFO order of two kept names, as [`MessageId`]'s `Ord`.
fn fifo(arena: &[u8], a: &Kept, b: &Kept) -> std::cmp::Ordering {
    a.time_ns
        .cmp(&b.time_ns)
        .then_with(|| arena[a.start..a.start + a.len].cmp(&arena[b.start..b.start + b.len]))
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

    #[test]
    fn orders_as_message_ids_do() {
        let tmp = tempfile::tempdir().unwrap();
        // Timed names (dirq's format) whose byte order is not their time order, and
        // untimed names, which sort before all timed ones.
        let mut names: Vec<String> = (0..300u64)
            .map(|i| {
                let ns = (i * 7919) % 1000;
                format!("1700000000.{ns:09}.host.{}.0000abcd.msg", 1000 - i)
            })
            .chain((0..50).map(|i| format!("foreign-{i}")))
            .collect();
        for n in &names {
            std::fs::write(tmp.path().join(n), b"x").unwrap();
        }
        let mut ids: Vec<MessageId> = names
            .drain(..)
            .map(|n| MessageId::new(n).unwrap())
            .collect();
        ids.sort();
        let dir = state_dir(tmp.path().to_path_buf());
        for limit in [1, 40, 120, 350] {
            let got = oldest(&dir, limit, &mut Vec::new()).unwrap();
            let got: Vec<&MessageId> = got.candidates.iter().map(|c| &c.id).collect();
            let expect: Vec<&MessageId> = ids.iter().take(limit).collect();
            assert_eq!(got, expect, "limit {limit}");
        }
    }
}
