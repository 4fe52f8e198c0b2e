//! Opening a queue's directories, creating them where allowed, and making a newly
//! created layout durable.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::Config;
use super::durability::Durability;
use super::StateDir;
use crate::error::{Error, Operation, Result};
use crate::format::state::State;
use crate::sys::{Dir, EntryKind};

/// The directories of an opened queue.
pub(super) struct Opened {
    pub(super) root_dir: Dir,
    /// Indexed by [`State::index`]; `None` for an optional state that is missing.
    pub(super) dirs: [Option<Arc<StateDir>>; 7],
    /// `(st_dev, st_ino)` of the root.
    pub(super) identity: (u64, u64),
}

/// Opens the root and every state directory, creating what is missing when the
/// configuration allows it, and syncs what it created.
pub(super) fn open(root: &Path, config: &Config) -> Result<Opened> {
    let (root_dir, created_root) = open_root(root, config)?;
    let root_stat = root_dir
        .stat()
        .map_err(|e| Error::io(Operation::Open, root, e))?;
    let mut dirs: [Option<Arc<StateDir>>; 7] = Default::default();
    let mut created_state_dir = false;
    for state in State::ALL {
        let required = State::MENTAT.contains(&state);
        match open_state_dir(&root_dir, root, state, config, root_stat.dev) {
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
    Ok(Opened {
        root_dir,
        dirs,
        identity: (root_stat.dev, root_stat.ino),
    })
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
