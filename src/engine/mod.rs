//! The engine: the shared state behind every clone of a queue handle, and the
//! mechanisms that carry out the protocol on it.
//!
//! [`Shared`] owns the open state directories, the settings, the fsync policy
//! ([`durability`]), the claim snapshot ([`claim`]), the wake-ups ([`wake`]) and the
//! counters. Its fields are private to this module and its children; the queue API,
//! the operator tools and Pipers reach it through its methods only.
//!
//! Children: `layout` opens and creates the directories, `scan` reads them,
//! `claim` takes messages, `publish` writes and publishes message files,
//! `deferred` moves due messages back, `owner` tells live owners from dead ones,
//! `quarantine` moves hostile entries and failed messages to `errors/`, `sidecar`
//! reads and writes `errors/<id>.meta`, `retry` is the retry policy, `seen` keeps the
//! record of recently finished ids and `idempotent` publishes under a given id once.
//!
//! This layer imports `sys` and `format` only, never the queue API above it.

pub(crate) mod claim;
pub(crate) mod config;
pub(crate) mod deferred;
pub(crate) mod durability;
pub(crate) mod group;
pub(crate) mod idempotent;
mod layout;
pub(crate) mod owner;
pub(crate) mod publish;
pub(crate) mod quarantine;
pub(crate) mod retry;
pub(crate) mod scan;
pub(crate) mod seen;
pub(crate) mod sidecar;
pub(crate) mod wake;

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Operation, Result};
use crate::format::deferred::parse_deferred_name;
use crate::format::id::MessageId;
use crate::format::state::State;
use crate::sys::{Dir, EntryKind, FsFamily};
use claim::Snapshot;
use config::Config;
use durability::{Durability, Syncer};
use seen::Seen;
use wake::Wake;

/// One open state directory.
#[derive(Debug)]
pub(crate) struct StateDir {
    pub(crate) dir: Dir,
    pub(crate) path: PathBuf,
}

impl StateDir {
    /// The path of `name` in this directory, for error messages and `Message::path`.
    pub(crate) fn join(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    /// Every name in the directory, in directory order.
    pub(crate) fn names(&self) -> Result<Vec<OsString>> {
        Ok(self.entries()?.into_iter().map(|(name, _)| name).collect())
    }

    /// Every name in the directory with the kind the directory read reported.
    pub(crate) fn entries(&self) -> Result<Vec<(OsString, EntryKind)>> {
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
pub(crate) struct Shared {
    root: PathBuf,
    /// The root directory, for checks of what lies beside the state directories.
    root_dir: Arc<Dir>,
    /// Indexed by [`State::index`]. The four Mentat states are always there; `deferred/`
    /// and `hold/` are missing only in a queue opened without permission to create them.
    dirs: [Option<Arc<StateDir>>; 7],
    /// `<root>/<state>` for every state, whether or not it exists.
    paths: [PathBuf; 7],
    /// `(st_dev, st_ino)` of the root: the queue's identity (see `format::attempts`).
    identity: (u64, u64),
    family: FsFamily,
    config: Config,
    syncer: Syncer,
    snapshot: Mutex<Snapshot>,
    wake: Wake,
    counters: Counters,
    noreplace: OnceLock<bool>,
    /// `seen/`: the record of finished ids and the locks of idempotent enqueues.
    seen: Seen,
}

impl Shared {
    /// Opens (and if the configuration allows, creates) the queue at `root`.
    pub(crate) fn open(root: &Path, config: Config) -> Result<Shared> {
        let opened = layout::open(root, &config)?;
        let family = opened.root_dir.fs_family();
        let seen = Seen::open(&opened.root_dir, root, &config)?;
        tracing::debug!(root = %root.display(), ?family, durability = ?config.durability, "opened queue");
        Ok(Shared {
            root: root.to_path_buf(),
            root_dir: Arc::new(opened.root_dir),
            dirs: opened.dirs,
            paths: State::ALL.map(|state| root.join(state.as_str())),
            identity: opened.identity,
            family,
            syncer: Syncer::new(config.durability, family),
            snapshot: Mutex::new(Snapshot::default()),
            wake: Wake::new(family.is_local()),
            counters: Counters::default(),
            noreplace: OnceLock::new(),
            seen,
            config,
        })
    }

    /// The same directories with the same settings, but its own snapshot, wake-ups,
    /// statistics and batch of unsynced changes, synced as `durability` says (a
    /// Piper's handles, which it shares between its workers and nobody else).
    pub(crate) fn reopen(&self, durability: Durability) -> Shared {
        Shared {
            root: self.root.clone(),
            root_dir: Arc::clone(&self.root_dir),
            dirs: self.dirs.clone(),
            paths: self.paths.clone(),
            identity: self.identity,
            family: self.family,
            config: self.config.clone(),
            syncer: Syncer::new(durability, self.family),
            snapshot: Mutex::new(Snapshot::default()),
            wake: Wake::new(self.family.is_local()),
            counters: Counters::default(),
            noreplace: self.noreplace.clone(),
            seen: self.seen.reopen(),
        }
    }

    /// The root directory, as given when opening.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The open root directory, for checks of what lies beside the state directories.
    pub(crate) fn root_dir(&self) -> &Dir {
        &self.root_dir
    }

    /// `<root>/<state>`, whether or not the directory exists.
    pub(crate) fn path(&self, state: State) -> &Path {
        &self.paths[state.index()]
    }

    /// `(st_dev, st_ino)` of the root: the queue's identity.
    pub(crate) fn identity(&self) -> (u64, u64) {
        self.identity
    }

    /// The settings the queue was opened with.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The fsync policy of this handle.
    pub(crate) fn syncer(&self) -> &Syncer {
        &self.syncer
    }

    /// The wake-ups of this handle's idle claimers.
    pub(crate) fn wake(&self) -> &Wake {
        &self.wake
    }

    /// `seen/`: how long finished ids are remembered, and where.
    pub(crate) fn seen(&self) -> &Seen {
        &self.seen
    }

    /// The running totals of this handle.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The name of `id` in `state`, if it is there (in `deferred/` names carry a due time).
    pub(crate) fn find(&self, state: State, id: &MessageId) -> Result<Option<OsString>> {
        let Some(dir) = self.state_dir(state) else {
            return Ok(None);
        };
        if state != State::Deferred {
            return match dir.dir.stat_at(id.as_os_str()) {
                Ok(_) => Ok(Some(id.as_os_str().to_os_string())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(Operation::Stat, dir.join(id.as_os_str()), e)),
            };
        }
        let mut found = None;
        let mut buf = Vec::new();
        dir.dir
            .scan(&mut buf, |entry| {
                if found.is_none()
                    && parse_deferred_name(entry.name).is_some_and(|(_, entry_id)| &entry_id == id)
                {
                    found = Some(entry.name.to_os_string());
                }
            })
            .map_err(|e| Error::io(Operation::Scan, &dir.path, e))?;
        Ok(found)
    }

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
