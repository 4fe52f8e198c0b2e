//! The queue handle and its layout on disk.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::builder::{Config, QueueBuilder};
use crate::claim::Snapshot;
use crate::durability::{Durability, Syncer};
use crate::error::{Error, Operation, Result};
use crate::sys::{Dir, EntryKind, FsFamily};
use crate::wake::Wake;
use crate::{MessageId, State};

/// A message queue kept as a directory, shared by any number of processes.
///
/// A handle is cheap to clone and safe to share between threads; clones share one
/// directory snapshot, so threads of one process claiming through clones of one handle
/// never race each other for the same message. Separate handles (or processes) race
/// safely: each message goes to exactly one claimer.
///
/// See the [crate documentation](crate) for the protocol and its guarantees.
#[derive(Clone)]
pub struct DirectoryQueue {
    pub(crate) inner: Arc<Inner>,
}

/// One open state directory.
#[derive(Debug)]
pub(crate) struct StateDir {
    pub(crate) dir: Dir,
    pub(crate) path: PathBuf,
}

impl StateDir {
    /// The path of `name` in this directory, for error messages and [`crate::Message::path`].
    pub(crate) fn join(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    /// Every name in the directory, in directory order.
    pub(crate) fn names(&self) -> Result<Vec<std::ffi::OsString>> {
        Ok(self.entries()?.into_iter().map(|(name, _)| name).collect())
    }

    /// Every name in the directory with the kind the directory read reported.
    pub(crate) fn entries(&self) -> Result<Vec<(std::ffi::OsString, EntryKind)>> {
        let mut entries = Vec::new();
        let mut buf = Vec::new();
        self.dir
            .scan(&mut buf, |entry| {
                entries.push((entry.name.to_os_string(), entry.kind))
            })
            .map_err(|e| Error::io(Operation::Scan, &self.path, e))?;
        Ok(entries)
    }

    /// `fsync` of the directory.
    pub(crate) fn sync(&self) -> Result<()> {
        self.dir
            .sync()
            .map_err(|e| Error::io(Operation::Sync, &self.path, e))
    }
}

/// Shared state of every clone of one handle.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) root: PathBuf,
    /// The root directory, for checks of what lies beside the state directories.
    pub(crate) root_dir: Arc<Dir>,
    /// Indexed by [`State::index`]. The four Mentat states are always there; `deferred/`
    /// and `hold/` are missing only in a queue opened without permission to create them.
    dirs: [Option<Arc<StateDir>>; 6],
    /// `<root>/<state>` for every state, whether or not it exists.
    paths: [PathBuf; 6],
    /// `(st_dev, st_ino)` of the root: the queue's identity (see `attempts.rs`).
    pub(crate) identity: (u64, u64),
    pub(crate) family: FsFamily,
    pub(crate) config: Config,
    pub(crate) syncer: Syncer,
    pub(crate) snapshot: Mutex<Snapshot>,
    pub(crate) wake: Wake,
    pub(crate) counters: Counters,
    noreplace: OnceLock<bool>,
}

impl Inner {
    /// One of the four Mentat state directories, which every open queue has.
    pub(crate) fn dir(&self, state: State) -> &Arc<StateDir> {
        debug_assert!(State::MENTAT.contains(&state), "{state} is optional");
        self.dirs[state.index()]
            .as_ref()
            .expect("the Mentat state directories are always open")
    }

    /// Any state directory, if the queue has it.
    pub(crate) fn state_dir(&self, state: State) -> Option<&Arc<StateDir>> {
        self.dirs[state.index()].as_ref()
    }

    /// A state directory the operation needs: a [`Error::Layout`] error when it is
    /// missing (a queue opened without permission to create `deferred/` or `hold/`).
    pub(crate) fn require(&self, state: State) -> Result<&Arc<StateDir>> {
        self.state_dir(state).ok_or_else(|| Error::Layout {
            path: self.root.join(state.as_str()),
            reason: format!("{state}/ is missing; open the queue with creation allowed to add it"),
        })
    }

    /// Whether `renameat2(RENAME_NOREPLACE)` works on this filesystem. Where it does
    /// not, publishing falls back to `link` + `unlink`, which briefly gives a message two
    /// links, so a second link is not proof of a planted hard link.
    pub(crate) fn supports_noreplace(&self) -> bool {
        *self.noreplace.get_or_init(|| {
            let probe = format!(".dirq-probe.{}", MessageId::generate());
            // A queue we cannot write to cannot publish either; assume the common case.
            self.dir(State::Tmp)
                .dir
                .supports_noreplace(OsStr::new(&probe))
                .unwrap_or(true)
        })
    }
}

/// Running totals of one handle, for statistics and benchmarks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) claimed: AtomicU64,
    pub(crate) collisions: AtomicU64,
    pub(crate) quarantined: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) scans: AtomicU64,
}

/// Claim statistics of one queue handle (all its clones together), since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimStats {
    /// Messages claimed.
    pub claimed: u64,
    /// Claim attempts lost to another claimer (wasted work, not errors).
    pub collisions: u64,
    /// Entries of `incoming/` moved to `errors/` because they were not claimable
    /// messages (symlinks, FIFOs, empty files, ...).
    pub quarantined: u64,
    /// Claimed messages older than the [maximum age](crate::QueueBuilder::max_age),
    /// moved to `errors/` with reason `expired` instead of being returned.
    pub expired: u64,
    /// Directory scans of `incoming/`.
    pub scans: u64,
}

impl DirectoryQueue {
    /// Opens the queue at `root` with default settings, creating it if it is missing.
    ///
    /// # Errors
    ///
    /// As [`QueueBuilder::open`].
    pub fn open(root: impl AsRef<Path>) -> Result<DirectoryQueue> {
        DirectoryQueue::builder(root).open()
    }

    /// Starts configuring a queue at `root`.
    pub fn builder(root: impl AsRef<Path>) -> QueueBuilder {
        QueueBuilder::new(root.as_ref().to_path_buf())
    }

    pub(crate) fn open_with(root: &Path, config: Config) -> Result<DirectoryQueue> {
        let (root_dir, created_root) = open_root(root, &config)?;
        let root_stat = root_dir
            .stat()
            .map_err(|e| Error::io(Operation::Open, root, e))?;
        let mut dirs: [Option<Arc<StateDir>>; 6] = Default::default();
        let mut created_state_dir = false;
        for state in State::ALL {
            let required = State::MENTAT.contains(&state);
            match open_state_dir(&root_dir, root, state, &config, root_stat.dev) {
                Ok((dir, created)) => {
                    dirs[state.index()] = Some(Arc::new(dir));
                    created_state_dir |= created;
                }
                // dirq's own states may be missing from a Mentat queue opened read-only.
                Err(Error::Layout { .. }) if !required && !config.create => {}
                Err(e) => return Err(e),
            }
        }
        if config.durability != Durability::None {
            sync_created(root, &root_dir, created_state_dir, created_root.as_deref())?;
        }
        let family = root_dir.fs_family();
        tracing::debug!(root = %root.display(), ?family, durability = ?config.durability, "opened queue");
        Ok(DirectoryQueue {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                root_dir: Arc::new(root_dir),
                dirs,
                paths: State::ALL.map(|state| root.join(state.as_str())),
                identity: (root_stat.dev, root_stat.ino),
                family,
                syncer: Syncer::new(config.durability, family),
                snapshot: Mutex::new(Snapshot::default()),
                wake: Wake::new(family.is_local()),
                counters: Counters::default(),
                noreplace: OnceLock::new(),
                config,
            }),
        })
    }

    /// The root directory, as given when opening.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The path of a state directory (`<root>/incoming`, ...).
    pub fn path(&self, state: State) -> &Path {
        &self.inner.paths[state.index()]
    }

    /// The durability mode of this handle.
    pub fn durability(&self) -> Durability {
        self.inner.syncer.mode()
    }

    /// Claim statistics of this handle and its clones.
    pub fn claim_stats(&self) -> ClaimStats {
        let c = &self.inner.counters;
        ClaimStats {
            claimed: c.claimed.load(Ordering::Relaxed),
            collisions: c.collisions.load(Ordering::Relaxed),
            quarantined: c.quarantined.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            scans: c.scans.load(Ordering::Relaxed),
        }
    }

    /// Makes every operation done through this handle so far durable: the barrier of
    /// [`Durability::Batch`] (group commit). In the other modes there is nothing to do.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Sync`] when a directory cannot be synced; the
    /// operations since the previous `sync` may then not survive a crash.
    ///
    /// # Durability
    ///
    /// Syncs each directory changed since the previous call, including the `incoming/`
    /// of queues that messages were forwarded into.
    pub fn sync(&self) -> Result<()> {
        self.inner.syncer.flush()
    }

    /// A new handle on the same directories with the same settings, but its own
    /// snapshot, wake-ups, statistics and batch of unsynced changes (a Piper's inputs,
    /// which it shares between its workers and nobody else).
    pub(crate) fn reopen(&self) -> DirectoryQueue {
        let inner = &*self.inner;
        DirectoryQueue {
            inner: Arc::new(Inner {
                root: inner.root.clone(),
                root_dir: Arc::clone(&inner.root_dir),
                dirs: inner.dirs.clone(),
                paths: inner.paths.clone(),
                identity: inner.identity,
                family: inner.family,
                config: inner.config.clone(),
                syncer: Syncer::new(inner.config.durability, inner.family),
                snapshot: Mutex::new(Snapshot::default()),
                wake: Wake::new(inner.family.is_local()),
                counters: Counters::default(),
                noreplace: inner.noreplace.clone(),
            }),
        }
    }

    /// Whether two handles refer to the same queue directory.
    pub fn same_queue(&self, other: &DirectoryQueue) -> bool {
        self.inner.identity == other.inner.identity
    }
}

impl fmt::Debug for DirectoryQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectoryQueue")
            .field("root", &self.inner.root)
            .field("durability", &self.inner.syncer.mode())
            .finish()
    }
}

/// Opens (and if allowed creates) the root directory. When it had to be created, also
/// returns the deepest ancestor that existed before (whose entries changed).
fn open_root(root: &Path, config: &Config) -> Result<(Dir, Option<PathBuf>)> {
    match Dir::open(root) {
        Ok(dir) => return Ok((dir, None)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && config.create => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::Layout {
                path: root.to_path_buf(),
                reason: "the queue directory does not exist".to_owned(),
            })
        }
        Err(e) if crate::sys::is_not_a_directory(&e) => {
            return Err(Error::Layout {
                path: root.to_path_buf(),
                reason: "not a directory".to_owned(),
            })
        }
        Err(e) => return Err(Error::io(Operation::Open, root, e)),
    }
    let existing = root
        .ancestors()
        .skip(1)
        .map(or_dot)
        .find(|a| std::fs::symlink_metadata(a).is_ok())
        .map(Path::to_path_buf);
    create_dir_all(root, config.dir_mode)?;
    let dir = Dir::open(root).map_err(|e| Error::io(Operation::Open, root, e))?;
    Ok((dir, existing))
}

/// Makes a newly created layout durable: a queue whose directories a crash could take
/// back would lose the messages acknowledged in them. Syncs the root (the state
/// directories' entries) and, when the root itself was created, every directory from
/// its parent up to `existing`, the deepest ancestor that was already there.
fn sync_created(
    root: &Path,
    root_dir: &Dir,
    created_state_dir: bool,
    existing: Option<&Path>,
) -> Result<()> {
    if created_state_dir || existing.is_some() {
        root_dir
            .sync()
            .map_err(|e| Error::io(Operation::Sync, root, e))?;
    }
    let Some(existing) = existing else {
        return Ok(());
    };
    for dir in root.ancestors().skip(1).map(or_dot) {
        Dir::open(dir)
            .and_then(|d| d.sync())
            .map_err(|e| Error::io(Operation::Sync, dir, e))?;
        if dir == existing {
            break;
        }
    }
    Ok(())
}

/// The parent of a relative one-component path is `""`: the current directory.
fn or_dot(path: &Path) -> &Path {
    if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    }
}

/// `mkdir -p` with an exact mode for every directory it creates.
fn create_dir_all(path: &Path, mode: u32) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, mode);
    builder
        .create(path)
        .map_err(|e| Error::io(Operation::CreateDir, path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(Operation::CreateDir, path, e))?;
    }
    Ok(())
}

/// Opens one state directory, refusing symlinks, non-directories and mount points;
/// says whether it had to be created.
fn open_state_dir(
    root_dir: &Dir,
    root: &Path,
    state: State,
    config: &Config,
    root_dev: u64,
) -> Result<(StateDir, bool)> {
    let name = OsStr::new(state.as_str());
    let path = root.join(name);
    let layout = |reason: String| Error::Layout {
        path: path.clone(),
        reason,
    };
    let mut created = false;
    match root_dir.stat_at(name) {
        Ok(st) if st.kind == EntryKind::Dir => {}
        Ok(st) => {
            return Err(layout(format!(
                "{} is a {}, not a directory{}",
                state,
                st.kind.as_str(),
                if st.kind == EntryKind::Symlink {
                    "; state directories must not be symbolic links"
                } else {
                    ""
                }
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && config.create => {
            match root_dir.mkdir(name, config.dir_mode) {
                Ok(()) => created = true,
                // Another process created it first.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(Operation::CreateDir, &path, e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(layout(format!(
                "{state}/ is missing and creating it was not allowed"
            )))
        }
        Err(e) => return Err(Error::io(Operation::Open, &path, e)),
    }
    let dir = root_dir.open_child(name).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            layout(format!(
                "{state}/ disappeared while the queue was being opened"
            ))
        } else {
            Error::io(Operation::Open, &path, e)
        }
    })?;
    let st = dir
        .stat()
        .map_err(|e| Error::io(Operation::Open, &path, e))?;
    if st.dev != root_dev {
        return Err(layout(format!(
            "{state}/ is on a different filesystem than the queue root; \
             renames between state directories would not be atomic"
        )));
    }
    Ok((StateDir { dir, path }, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_layout_with_exact_mode() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/q");
        let q = DirectoryQueue::builder(&root)
            .dir_mode(0o770)
            .open()
            .unwrap();
        for state in State::ALL {
            let meta = std::fs::metadata(q.path(state)).unwrap();
            assert!(meta.is_dir());
            assert_eq!(meta.permissions().mode() & 0o7777, 0o770, "{state}");
        }
    }

    #[test]
    fn refuses_symlinked_state_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("q");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), root.join("incoming")).unwrap();
        match DirectoryQueue::open(&root) {
            Err(Error::Layout { path, reason }) => {
                assert_eq!(path, root.join("incoming"));
                assert!(reason.contains("symbolic link"), "{reason}");
            }
            other => panic!("expected a layout error, got {other:?}"),
        }
    }

    #[test]
    fn refuses_state_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("q");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("pending"), b"").unwrap();
        let err = DirectoryQueue::open(&root).unwrap_err();
        assert!(err.to_string().contains("pending"), "{err}");
        assert!(matches!(err, Error::Layout { .. }));
    }

    #[test]
    fn missing_queue_without_create_is_a_layout_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = DirectoryQueue::builder(tmp.path().join("nope"))
            .create(false)
            .open()
            .unwrap_err();
        assert!(matches!(err, Error::Layout { .. }), "{err:?}");
    }

    #[test]
    fn bad_settings_are_errors_not_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let mut builder = DirectoryQueue::builder(tmp.path());
        assert!(matches!(
            builder.dir_mode(0o444).open(),
            Err(Error::Config { .. })
        ));
        builder
            .dir_mode(0o775)
            .rescan_interval(std::time::Duration::ZERO);
        assert!(matches!(builder.open(), Err(Error::Config { .. })));
    }
}
