//! Oldest-first directory scans with bounded memory.
//!
//! A scan reads the whole directory (there is no other way to find its oldest names)
//! but keeps only the `limit` oldest entries, so memory stays bounded however long the
//! queue is. Entries are kept in a buffer of up to `2 * limit`; when it fills, a
//! linear-time selection keeps the `limit` oldest and the rest are dropped. From then on
//! a name that is not older than the newest kept one is skipped without allocating.
//! The total cost is linear in the directory size.

use std::ffi::OsString;
use std::mem::MaybeUninit;

use std::time::{Duration, SystemTime};

use super::StateDir;
use crate::format::id::MessageId;
use crate::sys::{EntryKind, FileStat};

/// A name found by a scan.
#[derive(Debug)]
pub(crate) struct Candidate {
    pub(crate) id: MessageId,
    pub(crate) kind: EntryKind,
}

/// Names to claim, oldest first: the result of [`oldest`], or the names of arrival
/// events. Sorted lazily, a chunk at a time, and turned into ids one at a time as they
/// are taken: a claimer that takes a few names from a snapshot of 128k does not pay
/// for sorting and allocating all of them (on a queue of 100k, that was a third of the
/// time to the first claim).
#[derive(Debug, Default)]
pub(crate) struct Oldest {
    kept: Vec<Kept>,
    arena: Vec<u8>,
    /// `kept[next..sorted]` are the oldest of `kept[next..]`, in order.
    next: usize,
    sorted: usize,
}

/// The first chunk sorted; each later chunk is as long as everything sorted before it,
/// so that draining a snapshot costs O(n log n) like one sort.
const FIRST_CHUNK: usize = 1024;

impl Oldest {
    /// `names` (unordered; hidden ones left out) as a set to take oldest first.
    pub(crate) fn of_names(names: &[OsString]) -> Oldest {
        let mut selection = Selection::new(names.len().max(1));
        for name in names {
            let name = name.as_encoded_bytes();
            if !MessageId::is_hidden(name) {
                selection.offer(name, EntryKind::Unknown);
            }
        }
        selection.into_oldest()
    }

    pub(crate) fn len(&self) -> usize {
        self.kept.len() - self.next
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn clear(&mut self) {
        *self = Oldest::default();
    }

    /// Takes the oldest name left.
    pub(crate) fn pop_front(&mut self) -> Option<Candidate> {
        self.sort_next();
        let kept = *self.kept.get(self.next)?;
        self.next += 1;
        Some(Candidate {
            id: MessageId::with_time(
                crate::sys::os_string(bytes(&self.arena, &kept).to_vec()),
                kept.time_ns,
            ),
            kind: kept.kind,
        })
    }

    /// Drops the `n` oldest names left.
    pub(crate) fn skip(&mut self, n: usize) {
        let end = (self.next + n).min(self.kept.len());
        while self.sorted < end {
            self.next = self.sorted;
            self.sort_next();
        }
        self.next = end;
    }

    /// Leaves out the names of `ids`.
    pub(crate) fn remove(&mut self, ids: &[&MessageId]) {
        if ids.is_empty() {
            return;
        }
        let arena = &self.arena;
        let mut rest = self.kept.split_off(self.next);
        rest.retain(|kept| {
            let name = bytes(arena, kept);
            !ids.iter()
                .any(|id| id.as_os_str().as_encoded_bytes() == name)
        });
        self.kept = rest;
        self.next = 0;
        self.sorted = 0;
    }

    /// Makes sure `kept[next]`, if any, is the oldest name left.
    fn sort_next(&mut self) {
        if self.next < self.sorted || self.next >= self.kept.len() {
            return;
        }
        let arena = &self.arena;
        let rest = &mut self.kept[self.next..];
        let chunk = FIRST_CHUNK.max(self.next).min(rest.len());
        if chunk < rest.len() {
            rest.select_nth_unstable_by(chunk - 1, |a, b| fifo(arena, a, b));
        }
        rest[..chunk].sort_unstable_by(|a, b| fifo(arena, a, b));
        self.sorted = self.next + chunk;
    }
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
    Ok(selection.into_oldest())
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
#[derive(Debug, Clone, Copy)]
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
            compacted.extend_from_slice(bytes(&self.arena, kept));
            kept.start = start;
        }
        self.arena = compacted;
        self.threshold = self
            .kept
            .iter()
            .max_by(|a, b| fifo(&self.arena, a, b))
            .map(|newest| (newest.time_ns, bytes(&self.arena, newest).to_vec()));
    }

    /// The `limit` oldest names offered.
    fn into_oldest(mut self) -> Oldest {
        if self.kept.len() > self.limit {
            self.cut();
        }
        Oldest {
            kept: self.kept,
            arena: self.arena,
            next: 0,
            sorted: 0,
        }
    }
}

fn bytes<'a>(arena: &'a [u8], kept: &Kept) -> &'a [u8] {
    &arena[kept.start..kept.start + kept.len]
}

/// FIFO order of two kept names, as [`MessageId`]'s `Ord`.
fn fifo(arena: &[u8], a: &Kept, b: &Kept) -> std::cmp::Ordering {
    a.time_ns
        .cmp(&b.time_ns)
        .then_with(|| bytes(arena, a).cmp(bytes(arena, b)))
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
            let got_names: Vec<String> = taken(got)
                .iter()
                .map(|id| id.to_str().unwrap().to_owned())
                .collect();
            assert_eq!(got_names, expect, "limit {limit}");
        }
    }

    /// Every name left in `oldest`, in the order taken.
    fn taken(mut oldest: Oldest) -> Vec<MessageId> {
        std::iter::from_fn(|| oldest.pop_front())
            .map(|c| c.id)
            .collect()
    }

    fn ids(names: impl IntoIterator<Item = String>) -> Vec<MessageId> {
        names
            .into_iter()
            .map(|n| MessageId::new(n).unwrap())
            .collect()
    }

    #[test]
    fn taking_skipping_and_removing_across_sorted_chunks() {
        // More names than the first sorted chunk, offered newest first.
        let names: Vec<OsString> = (0..5000).rev().map(|i| format!("m{i:05}").into()).collect();
        let oldest = || Oldest::of_names(&names);
        let all = ids((0..5000).map(|i| format!("m{i:05}")));
        assert_eq!(taken(oldest()), all);

        let mut some = oldest();
        assert_eq!(some.len(), 5000);
        assert_eq!(some.pop_front().unwrap().id, all[0]);
        some.skip(3000);
        assert_eq!(some.len(), 1999);
        assert_eq!(some.pop_front().unwrap().id, all[3001]);
        let left_out = [&all[3002], &all[4999]];
        some.remove(&left_out);
        assert_eq!(taken(some), all[3003..4999]);

        let mut with_hidden = Oldest::of_names(&[".partial".into(), "b".into()]);
        with_hidden.skip(10);
        assert!(with_hidden.is_empty());
        assert!(taken(Oldest::default()).is_empty());
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
            let got = taken(got);
            let expect: Vec<MessageId> = ids.iter().take(limit).cloned().collect();
            assert_eq!(got, expect, "limit {limit}");
        }
    }
}
