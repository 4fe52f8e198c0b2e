//! Consistency check and repair of a queue: Postfix's `postsuper -s` for this layout.
//!
//! A check reads every state directory and reports what does not belong: entries the
//! protocol never creates, crash leftovers, hostile files, wrong permissions. A repair
//! fixes each reported problem with the protocol's own operations (quarantine into
//! `errors/`, recovery, removal of leftovers), so that a second check is clean.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::engine::owner::{lock_entry, Entry};
use crate::engine::quarantine::quarantine;
use crate::engine::StateDir;
use crate::error::{Error, Operation, Result};
use crate::format::deferred::parse_deferred_name;
use crate::format::history::HISTORY_DIR;
use crate::format::id::META_SUFFIX;
use crate::format::meta::sidecar_name;
use crate::format::seen::SEEN_DIR;
use crate::piper::PIPERS_DIR;
use crate::sys::{EntryKind, FileStat};
use crate::{DirectoryQueue, MessageId, State};

/// What is wrong with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ProblemKind {
    /// An entry in the queue root that is not a state directory.
    Unknown,
    /// A symlink, FIFO, socket, device or directory where a message should be.
    NotRegular,
    /// A message file with more than one hard link that no crash explains.
    HardLinked,
    /// An empty message.
    Empty,
    /// A name in `deferred/` that does not carry a due time.
    BadDeferredName,
    /// A hidden file in `incoming/` or `pending/` that nobody finished writing.
    Hidden,
    /// The same file under two names (a rename that a crash half undid).
    TwoNames,
    /// Two different files with the same id in states where a message waits or is
    /// processed.
    DuplicateId,
    /// A sidecar in `errors/` whose message is gone.
    StraySidecar,
    /// A message in `pending/` whose owner is gone.
    Orphan,
    /// A file in `tmp/` whose writer is gone.
    StaleTmp,
    /// A state directory whose mode differs from the queue root's, or a message its
    /// owner cannot read and write.
    Permissions,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::Unknown => "unknown entry",
            ProblemKind::NotRegular => "not a regular file",
            ProblemKind::HardLinked => "hard-linked file",
            ProblemKind::Empty => "empty message",
            ProblemKind::BadDeferredName => "deferred name without a due time",
            ProblemKind::Hidden => "abandoned hidden file",
            ProblemKind::TwoNames => "message under two names",
            ProblemKind::DuplicateId => "duplicate id",
            ProblemKind::StraySidecar => "sidecar without a message",
            ProblemKind::Orphan => "orphaned pending message",
            ProblemKind::StaleTmp => "abandoned temporary file",
            ProblemKind::Permissions => "wrong permissions",
        })
    }
}

/// One problem found by [`check`](crate::admin::check).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The entry.
    pub path: PathBuf,
    /// Details for a person, e.g. "a FIFO" or "also named pending/X".
    pub detail: String,
    /// What [`repair`](crate::admin::repair) will do about it.
    pub fix: String,
    /// The state directory it is in; `None` for the queue root.
    state: Option<State>,
    name: OsString,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            self.path.display(),
            self.kind,
            self.detail
        )
    }
}

/// What [`repair`](crate::admin::repair) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepairReport {
    /// Problems fixed.
    pub fixed: usize,
    /// Problems that had gone away by themselves before they were fixed.
    pub vanished: usize,
}

/// How long a hidden file in `incoming/` or `pending/` may stay before it counts as
/// abandoned: the temporary-file age limit.
fn stale(config_age: Duration, st: &FileStat, now: SystemTime) -> bool {
    now.duration_since(st.mtime).unwrap_or(Duration::ZERO) >= config_age
}

/// Checks the whole queue and reports every problem (see [`ProblemKind`]); changes
/// nothing. `progress` is called with the number of entries examined so far, for
/// progress bars.
///
/// # Errors
///
/// [`Error::Io`] naming a directory that cannot be read.
pub fn check(queue: &DirectoryQueue, progress: &mut dyn FnMut(u64)) -> Result<Vec<Problem>> {
    let inner = queue.engine();
    let now = SystemTime::now();
    let mut problems = Vec::new();
    let mut seen = 0u64;
    check_root(queue, &mut problems)?;
    // Names of every regular file by inode, to find files under two names.
    let mut inodes: HashMap<(u64, u64), Vec<(State, OsString)>> = HashMap::new();
    let mut ids: HashMap<MessageId, Vec<(State, OsString)>> = HashMap::new();
    for state in State::ALL {
        let Some(dir) = inner.state_dir(state) else {
            continue;
        };
        check_mode(queue, state, dir, &mut problems)?;
        for name in dir.names()? {
            seen += 1;
            if seen % 1024 == 0 {
                progress(seen);
            }
            let Ok(st) = dir.dir.stat_at(&name) else {
                continue; // gone meanwhile
            };
            let mut report = |kind, detail: String, fix: &str| {
                problems.push(problem(kind, state, dir, &name, detail, fix));
            };
            let hidden = MessageId::is_hidden(name.as_encoded_bytes());
            match state {
                // Sidecars are checked below.
                State::Errors if name.as_encoded_bytes().ends_with(META_SUFFIX.as_bytes()) => {
                    continue;
                }
                State::Tmp => {
                    if st.kind == EntryKind::File
                        && (stale(inner.config().tmp_max_age, &st, now) || st.nlink > 1)
                    {
                        if let Ok(Entry::Locked(..)) = lock_entry(dir, &name) {
                            report(
                                ProblemKind::StaleTmp,
                                format!("last written {}", crate::format::meta::rfc3339(st.mtime)),
                                "remove it",
                            );
                        }
                    }
                    continue;
                }
                _ if hidden => {
                    if stale(inner.config().tmp_max_age, &st, now) {
                        report(
                            ProblemKind::Hidden,
                            "a hidden file nobody finished".into(),
                            "move it to errors/",
                        );
                    }
                    continue;
                }
                _ => {}
            }
            if state == State::Deferred && parse_deferred_name(&name).is_none() {
                report(
                    ProblemKind::BadDeferredName,
                    "not <time>@<id>".into(),
                    "move it to errors/",
                );
                continue;
            }
            if st.kind != EntryKind::File {
                if state != State::Errors {
                    report(
                        ProblemKind::NotRegular,
                        format!("a {}", st.kind.as_str()),
                        "move it to errors/",
                    );
                }
                continue;
            }
            inodes
                .entry((st.dev, st.ino))
                .or_default()
                .push((state, name.clone()));
            if state != State::Errors {
                let id = match state {
                    State::Deferred => parse_deferred_name(&name).map(|(_, id)| id),
                    _ => Some(MessageId::from_name(&name)),
                };
                if let Some(id) = id {
                    ids.entry(id).or_default().push((state, name.clone()));
                }
            }
            if st.size == 0 && state != State::Errors && state != State::Pending {
                report(ProblemKind::Empty, "0 bytes".into(), "move it to errors/");
            }
            if !file_mode_ok(&st) {
                report(
                    ProblemKind::Permissions,
                    format!("mode {:o}", st.mode),
                    "chmod it",
                );
            }
            if state == State::Pending {
                if let Ok(Entry::Locked(_, now_st)) = lock_entry(dir, &name) {
                    let age = now.duration_since(now_st.ctime).unwrap_or(Duration::ZERO);
                    if age >= inner.config().orphan_grace {
                        report(
                            ProblemKind::Orphan,
                            "nobody holds its lock".into(),
                            "requeue it",
                        );
                    }
                }
            }
        }
    }
    check_links(queue, &inodes, &mut problems);
    check_ids(queue, &ids, &mut problems);
    check_sidecars(queue, &mut problems)?;
    progress(seen);
    problems.sort_by(|a, b| (a.kind, &a.path).cmp(&(b.kind, &b.path)));
    Ok(problems)
}

/// Fixes the `problems` a [`check`](crate::admin::check) found, as each one's
/// `fix` says. `progress` is called with the number fixed so far.
///
/// # Errors
///
/// [`Error`] from the first fix that failed; the ones before it stay fixed.
///
/// # Durability
///
/// As the operations used: quarantine, recovery, unlink and chmod per the mode.
pub fn repair(
    queue: &DirectoryQueue,
    problems: &[Problem],
    progress: &mut dyn FnMut(u64),
) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    for (done, problem) in problems.iter().enumerate() {
        if fix(queue, problem)? {
            report.fixed += 1;
        } else {
            report.vanished += 1;
        }
        if done % 256 == 0 {
            progress(done as u64);
        }
    }
    progress(problems.len() as u64);
    Ok(report)
}

fn fix(queue: &DirectoryQueue, problem: &Problem) -> Result<bool> {
    let inner = queue.engine();
    let name = problem.name.as_os_str();
    let reason = format!("{}: {}", problem.kind, problem.detail);
    let Some(state) = problem.state else {
        return quarantine_root_entry(queue, name, &reason);
    };
    let dir = inner.require(state)?;
    match problem.kind {
        ProblemKind::StaleTmp => Ok(queue.purge_tmp_entry(name, inner.config().tmp_max_age)? > 0),
        ProblemKind::StraySidecar | ProblemKind::TwoNames => match dir.dir.unlink(name) {
            Ok(()) => {
                inner.syncer().changed(&[dir])?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(Operation::Recover, dir.join(name), e)),
        },
        ProblemKind::Orphan => {
            let mut report = crate::queue::RecoverReport::default();
            queue.recover_entry(name, EntryKind::File, &mut report)?;
            Ok(report.requeued + report.duplicates_removed > 0)
        }
        ProblemKind::Permissions => fix_mode(queue, state, dir, name),
        _ => quarantine(inner, state, name, &reason),
    }
}

fn check_root(queue: &DirectoryQueue, problems: &mut Vec<Problem>) -> Result<()> {
    let inner = queue.engine();
    let root = &inner.root_dir();
    let mut buf = Vec::new();
    let mut found = Vec::new();
    root.scan(&mut buf, |entry| found.push(entry.name.to_os_string()))
        .map_err(|e| Error::io(Operation::Scan, inner.root(), e))?;
    for name in found {
        // pipers/, history/ and seen/ are dirq's, beside the states: no message is
        // ever there.
        let known = State::ALL.iter().any(|s| OsStr::new(s.as_str()) == name)
            || name == PIPERS_DIR
            || name == HISTORY_DIR
            || name == SEEN_DIR;
        if !known {
            problems.push(Problem {
                kind: ProblemKind::Unknown,
                path: inner.root().join(&name),
                detail: "not a state directory of the queue".into(),
                fix: "move it to errors/".into(),
                state: None,
                name,
            });
        }
    }
    Ok(())
}

fn check_mode(
    queue: &DirectoryQueue,
    state: State,
    dir: &StateDir,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let inner = queue.engine();
    let root_mode = inner
        .root_dir()
        .stat()
        .map_err(|e| Error::io(Operation::Stat, inner.root(), e))?
        .mode;
    let mode = dir
        .dir
        .stat()
        .map_err(|e| Error::io(Operation::Stat, &dir.path, e))?
        .mode;
    if mode & 0o777 != root_mode & 0o777 {
        problems.push(Problem {
            kind: ProblemKind::Permissions,
            path: dir.path.clone(),
            detail: format!(
                "mode {:o}, the queue root has {:o}",
                mode & 0o777,
                root_mode & 0o777
            ),
            fix: "chmod it like the root".into(),
            state: Some(state),
            name: OsString::new(),
        });
    }
    Ok(())
}

/// Whether a message file's mode lets the queue's users read and write it.
fn file_mode_ok(st: &FileStat) -> bool {
    st.mode & NEEDED_FILE_BITS == NEEDED_FILE_BITS
}

/// Owner read and write. Group and other bits are left to the umask of whoever
/// writes messages (the queue's file mode is narrowed by it), so they are not checked.
const NEEDED_FILE_BITS: u32 = 0o600;

fn fix_mode(queue: &DirectoryQueue, state: State, dir: &StateDir, name: &OsStr) -> Result<bool> {
    let inner = queue.engine();
    if name.is_empty() {
        let root_mode = inner
            .root_dir()
            .stat()
            .map_err(|e| Error::io(Operation::Stat, inner.root(), e))?
            .mode;
        let parent = &inner.root_dir();
        parent
            .chmod(OsStr::new(state.as_str()), root_mode & 0o7777)
            .map_err(|e| Error::io(Operation::Metadata, &dir.path, e))?;
        return Ok(true);
    }
    let st = match dir.dir.stat_at(name) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(Operation::Stat, dir.join(name), e)),
    };
    dir.dir
        .chmod(name, st.mode | NEEDED_FILE_BITS)
        .map_err(|e| Error::io(Operation::Metadata, dir.join(name), e))?;
    Ok(true)
}

/// Moves an unknown entry of the queue root into `errors/`.
fn quarantine_root_entry(queue: &DirectoryQueue, name: &OsStr, reason: &str) -> Result<bool> {
    let inner = queue.engine();
    let errors = inner.dir(State::Errors);
    let target = crate::engine::quarantine::free_name(inner, name, 0)?;
    let info = crate::format::meta::FailureInfo::now(reason.to_owned(), 0, State::Errors);
    crate::engine::sidecar::write_sidecar(inner, &target, &info)?;
    match inner
        .root_dir()
        .rename_noreplace(name, &errors.dir, &target)
    {
        Ok(()) => {
            inner.syncer().changed(&[errors])?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::moving(
            Operation::Quarantine,
            inner.root().join(name),
            errors.join(&target),
            e,
        )),
    }
}

/// Files with several names in the queue: a crash left a rename half done. The
/// name to keep is the furthest along (errors, then a claimed pending name, then
/// hold, deferred, incoming); the others go.
fn check_links(
    queue: &DirectoryQueue,
    inodes: &HashMap<(u64, u64), Vec<(State, OsString)>>,
    problems: &mut Vec<Problem>,
) {
    let inner = queue.engine();
    for names in inodes.values() {
        if names.len() < 2 {
            continue;
        }
        let rank = |state: State| match state {
            State::Errors => 0,
            State::Pending => 1,
            State::Hold => 2,
            State::Deferred => 3,
            State::Chained => 4,
            State::Incoming => 5,
            State::Tmp => 6,
        };
        let keep = names
            .iter()
            .min_by_key(|(s, _)| rank(*s))
            .map(|(s, n)| (*s, n.clone()));
        for (state, name) in names {
            if Some((*state, name.clone())) == keep {
                continue;
            }
            let Some(dir) = inner.state_dir(*state) else {
                continue;
            };
            let (kept_state, kept_name) = keep.clone().unwrap_or((*state, name.clone()));
            problems.push(problem(
                ProblemKind::TwoNames,
                *state,
                dir,
                name,
                format!("also named {kept_state}/{}", kept_name.to_string_lossy()),
                "remove this name",
            ));
        }
    }
    // Second links to files outside the queue (planted hard links).
    for names in inodes.values().filter(|n| n.len() == 1) {
        let (state, name) = &names[0];
        let Some(dir) = inner.state_dir(*state) else {
            continue;
        };
        if *state == State::Errors {
            continue;
        }
        if let Ok(st) = dir.dir.stat_at(name) {
            if st.nlink > 1 {
                problems.push(problem(
                    ProblemKind::HardLinked,
                    *state,
                    dir,
                    name,
                    format!("{} links", st.nlink),
                    "move it to errors/",
                ));
            }
        }
    }
}

/// The same id in two waiting or working states, as different files: all but the
/// one furthest along go to `errors/`.
fn check_ids(
    queue: &DirectoryQueue,
    ids: &HashMap<MessageId, Vec<(State, OsString)>>,
    problems: &mut Vec<Problem>,
) {
    let inner = queue.engine();
    for names in ids.values() {
        if names.len() < 2 {
            continue;
        }
        // Only distinct files; the same file under two names is reported above.
        let mut files: Vec<(State, OsString, (u64, u64))> = names
            .iter()
            .filter_map(|(s, n)| {
                let st = inner.state_dir(*s)?.dir.stat_at(n).ok()?;
                Some((*s, n.clone(), (st.dev, st.ino)))
            })
            .collect();
        files.sort_by_key(|(s, ..)| match s {
            State::Pending => 0,
            State::Hold => 1,
            State::Deferred => 2,
            _ => 3,
        });
        files.dedup_by_key(|(.., inode)| *inode);
        for (state, name, _) in files.iter().skip(1) {
            let Some(dir) = inner.state_dir(*state) else {
                continue;
            };
            let (first_state, first_name, _) = &files[0];
            problems.push(problem(
                ProblemKind::DuplicateId,
                *state,
                dir,
                name,
                format!(
                    "{first_state}/{} has the same id",
                    first_name.to_string_lossy()
                ),
                "move it to errors/",
            ));
        }
    }
}

fn check_sidecars(queue: &DirectoryQueue, problems: &mut Vec<Problem>) -> Result<()> {
    let errors = queue.engine().dir(State::Errors);
    let all = errors.names()?;
    let sidecars: std::collections::HashSet<&OsString> = all
        .iter()
        .filter(|n| n.as_encoded_bytes().ends_with(META_SUFFIX.as_bytes()))
        .collect();
    let mut explained = std::collections::HashSet::new();
    for name in &all {
        if !sidecars.contains(name) {
            explained.insert(sidecar_name(name));
        }
    }
    for sidecar in sidecars {
        if !explained.contains(sidecar) {
            problems.push(problem(
                ProblemKind::StraySidecar,
                State::Errors,
                errors,
                sidecar,
                "its message is not in errors/".into(),
                "remove it",
            ));
        }
    }
    Ok(())
}
fn problem(
    kind: ProblemKind,
    state: State,
    dir: &StateDir,
    name: &OsStr,
    detail: String,
    fix: &str,
) -> Problem {
    Problem {
        kind,
        path: dir.join(name),
        detail,
        fix: fix.to_owned(),
        state: Some(state),
        name: name.to_os_string(),
    }
}
