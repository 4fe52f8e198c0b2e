//! Liveness: every running Piper advertises itself under each of its input queues, in
//! `<queue>/pipers/<host>.<pid>.<tag>.json`.
//!
//! The advertising process holds an `flock` on its file for as long as it runs, so, as
//! with messages in `pending/`, a file whose lock anyone can take belongs to a dead
//! process: readers report it as stale, and the next Piper to start there removes it.
//! The file is rewritten in place at every heartbeat; a reader that catches it half
//! written tries once more.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Operation, Result};
use crate::piper::stats::{PiperRates, PiperStats};
use crate::sys::{self, lock, Dir};
use crate::{DirectoryQueue, MessageId};

/// The directory under a queue root where Pipers advertise themselves.
pub(crate) const PIPERS_DIR: &str = "pipers";

/// What a running Piper says about itself; see [`admin::pipers`](crate::admin::pipers). Read
/// leniently: missing fields are left at their defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PiperInfo {
    /// The stage name given to [`Piper::builder`](crate::piper::Piper::builder).
    pub stage: String,
    /// Host of the process.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// When it started, RFC 3339 UTC.
    pub started: String,
    /// Last heartbeat, RFC 3339 UTC.
    pub heartbeat: String,
    /// Last heartbeat, milliseconds since the epoch.
    pub heartbeat_ms: u64,
    /// `running`, `paused (backpressure)`, `paused (failure breaker)` or `draining`.
    pub state: String,
    /// Worker threads.
    pub workers: usize,
    /// Input queue roots, in priority order.
    pub inputs: Vec<String>,
    /// Output names and queue roots.
    pub outputs: Vec<(String, String)>,
    /// Counters since start.
    pub stats: PiperStats,
    /// Rates over the last seconds.
    pub rates: PiperRates,
    /// Whether it honours cancel requests (`dirq cancel`); false in the adverts of
    /// versions before cancelling existed.
    pub cancellable: bool,
    /// Counters of an advertiser that is not a Piper but shows like one: a bridge
    /// (feature `nats`) puts `published`, `stored`, `duplicates`, `redeliveries`,
    /// `lag` and the like here. Empty for Pipers.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Whether the process is alive (it holds the lock on its file). Filled in by the
    /// reader, not stored.
    #[serde(skip)]
    pub live: bool,
}

/// The advertisement files of one Piper, removed when it stops.
///
/// Each is held open read-only (for its lock) and opened for writing only while a
/// heartbeat rewrites it: a file kept open for writing would stop the filesystem from
/// being remounted read-only while the Piper runs.
#[derive(Debug)]
pub(crate) struct Advert {
    files: Vec<AdvertFile>,
}

#[derive(Debug)]
struct AdvertFile {
    dir: Dir,
    name: OsString,
    path: PathBuf,
    /// Open read-only, locked for as long as the Piper runs.
    lock: File,
}

impl Advert {
    /// Creates (and locks) this process's file under each input, holding `info`, after
    /// removing the files of dead Pipers there.
    pub(crate) fn create(inputs: &[DirectoryQueue], info: &PiperInfo) -> Result<Advert> {
        let json = serde_json::to_vec_pretty(info).unwrap_or_default();
        let id = MessageId::generate();
        let name = OsString::from(format!("{id}.json"));
        // IMPORTANT: created under a name readers ignore, written, locked, and only then
        // renamed into place. A file visible before its lock would look like a dead
        // Piper's to another one starting at the same moment, which would remove it; one
        // visible before its contents, like a Piper without a name.
        let unlocked = OsString::from(format!(".{id}.new"));
        let mut files = Vec::new();
        for queue in inputs {
            let dir_path = queue.root().join(PIPERS_DIR);
            let dir = open_dir(&dir_path, queue.engine().config().dir_mode)?;
            remove_stale(&dir, &dir_path)?;
            let path = dir_path.join(&name);
            let create = |e| Error::io(Operation::Create, dir_path.join(&unlocked), e);
            let mut file = dir
                .create_new(&unlocked, queue.engine().config().file_mode)
                .map_err(create)?;
            file.write_all(&json).map_err(create)?;
            drop(file);
            let lock = dir.open_read(&unlocked).map_err(create)?;
            lock::try_lock(&lock).map_err(|e| Error::io(Operation::Create, &path, e))?;
            dir.rename_noreplace(&unlocked, &dir, &name).map_err(|e| {
                Error::moving(Operation::Create, dir_path.join(&unlocked), &path, e)
            })?;
            files.push(AdvertFile {
                dir,
                name: name.clone(),
                path,
                lock,
            });
        }
        Ok(Advert { files })
    }

    /// Rewrites every file with `info`.
    pub(crate) fn update(&mut self, info: &PiperInfo) {
        let Ok(json) = serde_json::to_vec_pretty(info) else {
            return;
        };
        for advert in &self.files {
            if let Err(e) = advert.rewrite(&json) {
                tracing::warn!(path = %advert.path.display(), error = %e, "cannot update liveness file");
            }
        }
    }
}

impl AdvertFile {
    /// Replaces the file's contents, unless someone replaced the file itself.
    fn rewrite(&self, json: &[u8]) -> std::io::Result<()> {
        let mut file = self.dir.open_write(&self.name)?;
        let st = sys::stat_file(&file)?;
        if !st.same_file(&sys::stat_file(&self.lock)?) {
            return Err(std::io::Error::other("the file was replaced"));
        }
        // IMPORTANT: one write over the old contents from the start, padded with spaces
        // (which JSON allows) to at least their length, never a truncation first:
        // readers take no lock, and one that came between a truncation and the write
        // found the file empty and reported a Piper without a name.
        let len = usize::try_from(st.size).unwrap_or(0).max(json.len());
        let mut padded = json.to_vec();
        padded.resize(len, b' ');
        file.write_all(&padded)
    }
}

impl Drop for Advert {
    fn drop(&mut self) {
        for advert in &self.files {
            if let Err(e) = advert.dir.unlink(&advert.name) {
                tracing::warn!(path = %advert.path.display(), error = %e, "cannot remove liveness file");
            }
        }
    }
}

fn open_dir(path: &Path, mode: u32) -> Result<Dir> {
    match Dir::open(path) {
        Ok(dir) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path.parent().unwrap_or(path);
            let parent_dir =
                Dir::open(parent).map_err(|e| Error::io(Operation::Open, parent, e))?;
            match parent_dir.mkdir(OsStr::new(PIPERS_DIR), mode) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(Operation::CreateDir, path, e)),
            }
            Dir::open(path).map_err(|e| Error::io(Operation::Open, path, e))
        }
        Err(e) => Err(Error::io(Operation::Open, path, e)),
    }
}

/// Removes the files of dead Pipers (whose lock can be taken).
fn remove_stale(dir: &Dir, path: &Path) -> Result<()> {
    for (name, file) in entries(dir, path)? {
        if lock::try_lock(&file).unwrap_or(false) {
            let _ = dir.unlink(&name);
        }
    }
    Ok(())
}

/// Every advertisement file in `dir`, opened.
fn entries(dir: &Dir, path: &Path) -> Result<Vec<(OsString, File)>> {
    let mut names = Vec::new();
    let mut buf = Vec::new();
    dir.scan(&mut buf, |entry| {
        if entry.name.as_encoded_bytes().ends_with(b".json") {
            names.push(entry.name.to_os_string());
        }
    })
    .map_err(|e| Error::io(Operation::Scan, path, e))?;
    Ok(names
        .into_iter()
        .filter_map(|name| dir.open_read(&name).ok().map(|file| (name, file)))
        .collect())
}

/// The Pipers that advertise themselves under the queue at `root`, live ones and
/// the stale files of dead ones ([`PiperInfo::live`]).
pub(crate) fn read_adverts(root: &Path) -> Result<Vec<PiperInfo>> {
    let path = root.join(PIPERS_DIR);
    let dir = match Dir::open(&path) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(Operation::Open, &path, e)),
    };
    let mut found = Vec::new();
    for (_, file) in entries(&dir, &path)? {
        let live = !lock::try_lock(&file).unwrap_or(true);
        if !live {
            // Unlocked at once, not at close: a process forked meanwhile would keep
            // the probe's lock and make the dead Piper look alive (see lock::Locked).
            let _ = lock::unlock(&file);
        }
        // A heartbeat may be rewriting the file: one more read.
        let info = read_info(&file).or_else(|| read_info(&file));
        found.push(PiperInfo {
            live,
            ..info.unwrap_or_default()
        });
    }
    found.sort_by(|a, b| (&a.stage, a.pid).cmp(&(&b.stage, b.pid)));
    Ok(found)
}

/// The Pipers on the queue at `root` (other than this process's) whose liveness file
/// is older than `limit`, each described in a sentence, as
/// [`AlertKind::Stale`](super::AlertKind::Stale) reports them: a live process that
/// stopped updating it is hung, a dead one left it behind. An unreadable directory
/// gives none: staleness is not worth an error.
pub(crate) fn silent_pipers(root: &Path, limit: std::time::Duration) -> Vec<String> {
    let now = epoch_ms(SystemTime::now());
    read_adverts(root)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.pid != crate::sys::pid() && p.heartbeat_ms > 0)
        .filter_map(|p| {
            let silent_s = now.saturating_sub(p.heartbeat_ms) / 1000;
            (silent_s > limit.as_secs()).then(|| {
                format!(
                    "Piper {:?} (pid {} on {}) has not updated its liveness file for {silent_s}s: {}",
                    p.stage,
                    p.pid,
                    p.host,
                    if p.live {
                        "its process is alive but not working"
                    } else {
                        "its process is gone (dirq recover requeues its messages)"
                    }
                )
            })
        })
        .collect()
}

fn read_info(mut file: &File) -> Option<PiperInfo> {
    let mut bytes = Vec::new();
    std::io::Seek::rewind(&mut file).ok()?;
    file.read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Milliseconds since the epoch.
pub(crate) fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
