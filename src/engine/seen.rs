//! `seen/`: the record of recently finished message ids, and the locks that make
//! concurrent idempotent enqueues of one id take turns (the names are in
//! `format::seen`; the protocol in docs/protocol.md, "seen/ and idempotent enqueue").
//!
//! A queue remembers finished ids only when its `seen/.ttl` says for how long; every
//! handle reads that setting when it is opened and again at most [`TTL_RECHECK`]
//! after, so that every process of the queue honours the same one, within that time
//! of a change. When it does, a message leaving the queue for good (commit,
//! forward, delete, purge) first gets an empty record file `seen/<bucket>/<id>`, and
//! only then goes. A crash between the two leaves a record of a message that still
//! exists: harmless, the record only refuses a second copy.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::config::Config;
use super::durability::Durability;
use super::{Shared, StateDir};
use crate::error::{Error, Operation, Result};
use crate::format::id::MessageId;
use crate::format::seen::{
    bucket_end, format_ttl, is_expired, lock_name, parse_bucket, parse_ttl, SEEN_DIR, TTL_FILE,
};
use crate::sys::lock::{self, Locked};
use crate::sys::{Dir, EntryKind};

/// How long a handle trusts the setting it read from `seen/.ttl` before it looks at
/// the file again: a handle opened before the setting was made (a worker started
/// before `dirq bridge in` set one) would otherwise leave no records for good.
const TTL_RECHECK: Duration = Duration::from_secs(1);

/// One in this many records a handle writes also sweeps expired records.
const SWEEP_EVERY: u64 = 64;

/// The most records one sweep by a writer removes: four per record written on
/// average, more than the one each record adds, and a bounded pause for the writer.
const SWEEP_BUDGET: usize = 256;

/// The `seen/` directory of one queue handle.
#[derive(Debug)]
pub(crate) struct Seen {
    path: PathBuf,
    /// Opened (and created when missing) on first use: a queue that never enqueues
    /// by id nor remembers needs no `seen/`.
    dir: OnceLock<Arc<StateDir>>,
    /// How long finished ids are remembered (`None`: not at all), as `seen/.ttl` said
    /// when it was last read, and when that was.
    ttl: Mutex<(Option<Duration>, Instant)>,
    /// Records written through this handle, for the occasional sweep.
    written: AtomicU64,
    /// The bucket records go in now, kept open: a record then costs one file
    /// create. A bucket is swept only once it has expired, long after it stopped
    /// being the current one.
    current: Mutex<Option<(u64, Arc<StateDir>)>>,
}

impl Seen {
    /// Reads the queue's setting, or first stores `config.remember_finished` as the
    /// queue's setting when it is given.
    pub(super) fn open(root_dir: &Dir, root: &Path, config: &Config) -> Result<Seen> {
        let path = root.join(SEEN_DIR);
        let seen = Seen {
            path,
            dir: OnceLock::new(),
            ttl: Mutex::new((None, Instant::now())),
            written: AtomicU64::new(0),
            current: Mutex::new(None),
        };
        if let Some(ttl) = config.remember_finished {
            let dir = seen.dir(root_dir, config)?;
            store_ttl(dir, ttl, config)?;
            let ttl = (!ttl.is_zero()).then_some(ttl);
            return Ok(Seen {
                ttl: Mutex::new((ttl, Instant::now())),
                ..seen
            });
        }
        let dir = match root_dir.open_child(OsStr::new(SEEN_DIR)) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Made with the queue, as its other directories are, so that the first
                // idempotent enqueue (a Piper's emit among them) does not sync the root
                // in the middle of a group commit. Where it cannot be made now (a
                // read-only share), it is made, or its error reported, when first used.
                if config.create {
                    let _ = seen.dir(root_dir, config);
                }
                return Ok(seen);
            }
            Err(e) => return Err(Error::io(Operation::Open, &seen.path, e)),
        };
        let ttl = read_ttl(&dir, &seen.path.join(TTL_FILE))?;
        let ttl = Mutex::new((ttl, Instant::now()));
        let _ = seen.dir.set(Arc::new(StateDir {
            dir,
            path: seen.path.clone(),
        }));
        Ok(Seen { ttl, ..seen })
    }

    /// The same directory and setting, for a reopened handle.
    pub(super) fn reopen(&self) -> Seen {
        let dir = OnceLock::new();
        if let Some(open) = self.dir.get() {
            let _ = dir.set(Arc::clone(open));
        }
        Seen {
            path: self.path.clone(),
            dir,
            ttl: Mutex::new(*self.ttl.lock().unwrap_or_else(PoisonError::into_inner)),
            written: AtomicU64::new(0),
            current: Mutex::new(None),
        }
    }

    /// How long finished ids are remembered; `None` when they are not.
    ///
    /// Read from `seen/.ttl` again when the last reading is [`TTL_RECHECK`] old. A file
    /// that cannot be read then keeps the last setting (and is logged), so that a
    /// passing error does not turn remembering off.
    pub(crate) fn ttl(&self, root_dir: &Dir) -> Option<Duration> {
        let mut known = self.ttl.lock().unwrap_or_else(PoisonError::into_inner);
        if known.1.elapsed() < TTL_RECHECK {
            return known.0;
        }
        known.1 = Instant::now();
        let read = self.existing(root_dir).and_then(|dir| match dir {
            Some(dir) => read_ttl(&dir.dir, &self.path.join(TTL_FILE)),
            None => Ok(None),
        });
        match read {
            Ok(ttl) => known.0 = ttl,
            Err(error) => {
                tracing::warn!(%error, "cannot read how long finished ids are remembered; keeping the last setting");
            }
        }
        known.0
    }

    /// The open `seen/`, created if it is missing.
    fn dir(&self, root_dir: &Dir, config: &Config) -> Result<&Arc<StateDir>> {
        if let Some(dir) = self.dir.get() {
            return Ok(dir);
        }
        let name = OsStr::new(SEEN_DIR);
        match root_dir.mkdir(name, config.dir_mode) {
            Ok(()) => {
                if config.durability != Durability::None {
                    root_dir
                        .sync()
                        .map_err(|e| Error::io(Operation::Sync, &self.path, e))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(Operation::CreateDir, &self.path, e)),
        }
        let dir = root_dir
            .open_child(name)
            .map_err(|e| Error::io(Operation::Open, &self.path, e))?;
        let _ = self.dir.set(Arc::new(StateDir {
            dir,
            path: self.path.clone(),
        }));
        Ok(self
            .dir
            .get()
            .expect("set just now, by this thread or another"))
    }

    /// The open `seen/` if it exists, without creating it.
    fn existing(&self, root_dir: &Dir) -> Result<Option<&Arc<StateDir>>> {
        if let Some(dir) = self.dir.get() {
            return Ok(Some(dir));
        }
        match root_dir.open_child(OsStr::new(SEEN_DIR)) {
            Ok(dir) => {
                let _ = self.dir.set(Arc::new(StateDir {
                    dir,
                    path: self.path.clone(),
                }));
                Ok(self.dir.get())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(Operation::Open, &self.path, e)),
        }
    }
}

/// Stores `ttl` as the queue's setting (zero: remember nothing), replacing the file in
/// one rename so that a process opening the queue meanwhile reads the old setting or
/// the new, never half of one.
fn store_ttl(dir: &Arc<StateDir>, ttl: Duration, config: &Config) -> Result<()> {
    let name = OsStr::new(TTL_FILE);
    let path = dir.join(name);
    if ttl.is_zero() {
        match dir.dir.unlink(name) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(Operation::Remember, path, e)),
        }
    } else {
        if read_ttl(&dir.dir, &path)? == Some(ttl) {
            return Ok(());
        }
        let tmp_name = OsString::from(format!("{TTL_FILE}.{}", MessageId::generate()));
        let tmp_path = dir.join(&tmp_name);
        let written = dir
            .dir
            .create_new(&tmp_name, config.file_mode)
            .and_then(|mut file| {
                file.write_all(format_ttl(ttl).as_bytes())?;
                if config.durability != Durability::None {
                    file.sync_all()?;
                }
                Ok(())
            })
            .and_then(|()| dir.dir.rename_replace(&tmp_name, &dir.dir, name));
        if let Err(e) = written {
            let _ = dir.dir.unlink(&tmp_name);
            return Err(Error::io(Operation::Remember, tmp_path, e));
        }
    }
    if config.durability != Durability::None {
        dir.sync()?;
    }
    Ok(())
}

/// The time to live in `seen/.ttl`; `None` when the file is missing or says zero.
fn read_ttl(dir: &Dir, path: &Path) -> Result<Option<Duration>> {
    let mut file = match dir.open_read(OsStr::new(TTL_FILE)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(Operation::Open, path, e)),
    };
    let mut text = Vec::new();
    (&mut file)
        .take(64)
        .read_to_end(&mut text)
        .map_err(|e| Error::io(Operation::Read, path, e))?;
    match parse_ttl(&text) {
        Some(ttl) => Ok(Some(ttl)),
        None if text.trim_ascii() == b"0" => Ok(None),
        None => Err(Error::Layout {
            path: path.to_path_buf(),
            reason: "expected the number of seconds finished ids are remembered".to_owned(),
        }),
    }
}

/// Makes idempotent enqueues of `id` take turns, across processes: held until the
/// returned lock is dropped. A lock file is shared by the ids that hash to it.
///
/// # Errors
///
/// [`Error::Io`] when `seen/` or the lock file cannot be created or locked.
pub(crate) fn lock_id(inner: &Shared, id: &MessageId) -> Result<Locked> {
    lock_file(inner, &lock_name(id))
}

/// The turns of all `ids` at once, for a batch: each lock file once, taken in the
/// order of their names, so that two batches sharing lock files cannot each wait for
/// the other (a single id's turn holds one lock file and waits for nothing else).
///
/// # Errors
///
/// As [`lock_id`].
pub(crate) fn lock_ids<'a>(
    inner: &Shared,
    ids: impl IntoIterator<Item = &'a MessageId>,
) -> Result<Vec<Locked>> {
    let names: BTreeSet<String> = ids.into_iter().map(lock_name).collect();
    names.iter().map(|name| lock_file(inner, name)).collect()
}

/// Opens (making it if missing) and locks one of `seen/`'s lock files, waiting.
fn lock_file(inner: &Shared, name: &str) -> Result<Locked> {
    let seen = &inner.seen;
    let dir = seen.dir(inner.root_dir(), inner.config())?;
    let name = OsStr::new(name);
    let path = || dir.join(name);
    // Read-only when it exists: flock needs no write permission, and the users
    // sharing a queue may not be able to write each other's files.
    let file = match dir.dir.open_read(name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            dir.dir.open_append(name, inner.config().file_mode)
        }
        opened => opened,
    }
    .map_err(|e| Error::io(Operation::Remember, path(), e))?;
    lock::lock_waiting(file).map_err(|e| Error::io(Operation::Remember, path(), e))
}

/// Whether `seen/` holds an unexpired record of `id`.
///
/// # Errors
///
/// [`Error::Io`] when `seen/` or one of its buckets cannot be read.
pub(crate) fn is_remembered(inner: &Shared, id: &MessageId) -> Result<bool> {
    Remembered::look(inner)?.contains(id)
}

/// The unexpired buckets of `seen/`, found and opened once for the lookups of many
/// ids (a batch's). A record made later in one of them is found; a bucket made later
/// is not, so it is to be opened after whatever must be seen: a message leaves the
/// queue only after its record is made, so buckets opened after a message was not
/// found in the queue hold its record if it finished.
pub(crate) struct Remembered {
    /// Each bucket's path (for errors) and open directory.
    buckets: Vec<(PathBuf, Dir)>,
}

impl Remembered {
    /// Finds and opens the unexpired buckets; none when the queue does not remember
    /// finished ids or has no `seen/`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when `seen/` or one of its buckets cannot be read.
    pub(crate) fn look(inner: &Shared) -> Result<Remembered> {
        let mut remembered = Remembered {
            buckets: Vec::new(),
        };
        let seen = &inner.seen;
        let Some(ttl) = seen.ttl(inner.root_dir()) else {
            return Ok(remembered);
        };
        let Some(dir) = seen.existing(inner.root_dir())? else {
            return Ok(remembered);
        };
        let now = SystemTime::now();
        for bucket in buckets(dir)? {
            if is_expired(bucket, ttl, now) {
                continue;
            }
            let name = OsString::from(bucket.to_string());
            match dir.dir.open_child(&name) {
                Ok(d) => remembered.buckets.push((dir.join(&name), d)),
                // Swept meanwhile: it had expired.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // Not a bucket (a file or symlink planted under a bucket's name).
                Err(e) if is_not_a_bucket(&e) => continue,
                Err(e) => return Err(Error::io(Operation::Remember, dir.join(&name), e)),
            }
        }
        Ok(remembered)
    }

    /// Whether one of the buckets holds a record of `id`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when a bucket cannot be read.
    pub(crate) fn contains(&self, id: &MessageId) -> Result<bool> {
        for (path, bucket) in &self.buckets {
            match bucket.stat_at(id.as_os_str()) {
                Ok(_) => return Ok(true),
                // Not there, or the bucket was swept since (it had expired).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(Operation::Remember, path.join(id.as_os_str()), e)),
            }
        }
        Ok(false)
    }
}

/// Records that `id` finished, if the queue remembers finished ids, durably before
/// whatever the caller does next (the message's removal) can be: on a journaled
/// filesystem the journal keeps the order, elsewhere the bucket (and `seen/`, for a new
/// bucket) are synced here, unless the mode is [`Durability::None`]. Now and then it
/// also sweeps expired records, at a bounded cost.
///
/// # Errors
///
/// [`Error::Io`] when the record cannot be made durable; the caller must then keep
/// the message, or a second copy could be let in.
pub(crate) fn remember(inner: &Shared, id: &MessageId) -> Result<()> {
    let seen = &inner.seen;
    let Some(ttl) = seen.ttl(inner.root_dir()) else {
        return Ok(());
    };
    let dir = seen.dir(inner.root_dir(), inner.config())?;
    let end = bucket_end(SystemTime::now(), ttl);
    let mut bucket = current_bucket(inner, dir, end)?;
    let mut created = bucket
        .dir
        .create_new(id.as_os_str(), inner.config().file_mode);
    if created
        .as_ref()
        .is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
    {
        // The bucket kept open was removed (a clock stepped forward by more than the
        // time to live made it look expired to a sweeper): open or make it again.
        *seen.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
        bucket = current_bucket(inner, dir, end)?;
        created = bucket
            .dir
            .create_new(id.as_os_str(), inner.config().file_mode);
    }
    match created {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::io(
                Operation::Remember,
                bucket.join(id.as_os_str()),
                e,
            ))
        }
    }
    // IMPORTANT: the record must be durable before the removal that follows can be,
    // or a crash could keep the removal and lose the record: a redelivered copy would
    // then be let in and processed twice.
    inner.syncer().order_before_next(&bucket)?;
    if seen.written.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
        if let Err(e) = sweep(inner, SWEEP_BUDGET) {
            tracing::warn!(error = %e, "cannot remove expired records of finished ids");
        }
    }
    Ok(())
}

/// The open bucket ending at `end`, made when missing. A new bucket's entry in `seen/`
/// is made durable as the record will be (see [`remember`]).
fn current_bucket(inner: &Shared, dir: &Arc<StateDir>, end: u64) -> Result<Arc<StateDir>> {
    let mut current = inner
        .seen
        .current
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((open_end, bucket)) = current.as_ref() {
        if *open_end == end {
            return Ok(Arc::clone(bucket));
        }
    }
    let name = OsString::from(end.to_string());
    let path = dir.join(&name);
    let opened = match dir.dir.open_child(&name) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match dir.dir.mkdir(&name, inner.config().dir_mode) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(Operation::Remember, path, e)),
            }
            // Whoever made it, its entry must be as durable as the records in it.
            inner.syncer().order_before_next(dir)?;
            dir.dir
                .open_child(&name)
                .map_err(|e| Error::io(Operation::Remember, &path, e))?
        }
        Err(e) => return Err(Error::io(Operation::Remember, path, e)),
    };
    let bucket = Arc::new(StateDir { dir: opened, path });
    *current = Some((end, Arc::clone(&bucket)));
    Ok(bucket)
}

/// Removes up to `budget` expired records, and the buckets it empties; returns how
/// many records it removed. Every record is expired when the queue no longer
/// remembers finished ids.
///
/// # Errors
///
/// [`Error::Io`] when `seen/` or a bucket cannot be read or a record removed.
pub(crate) fn sweep(inner: &Shared, budget: usize) -> Result<usize> {
    let seen = &inner.seen;
    let Some(dir) = seen.existing(inner.root_dir())? else {
        return Ok(0);
    };
    let ttl = seen.ttl(inner.root_dir());
    let now = SystemTime::now();
    let mut removed = 0;
    for bucket in buckets(dir)? {
        if removed >= budget {
            break;
        }
        if ttl.is_some_and(|ttl| !is_expired(bucket, ttl, now)) {
            continue;
        }
        let name = OsString::from(bucket.to_string());
        let path = dir.join(&name);
        let bucket_dir = match dir.dir.open_child(&name) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound || is_not_a_bucket(&e) => continue,
            Err(e) => return Err(Error::io(Operation::Remember, path, e)),
        };
        let want = budget - removed;
        let mut names = Vec::new();
        bucket_dir
            .scan_while(&mut Vec::new(), |entry| {
                names.push(entry.name.to_os_string());
                names.len() < want
            })
            .map_err(|e| Error::io(Operation::Remember, &path, e))?;
        let emptied = names.len() < want;
        for record in &names {
            match bucket_dir.unlink(record) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(Operation::Remember, path.join(record), e)),
            }
        }
        if emptied {
            match dir.dir.rmdir(&name) {
                // Another sweeper removed it, or a record came in late (a clock
                // behind the others'): the next sweep tries again.
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                    ) => {}
                Err(e) => return Err(Error::io(Operation::Remember, path, e)),
            }
        }
    }
    Ok(removed)
}

/// Whether opening a bucket failed because the name is not a directory at all.
fn is_not_a_bucket(e: &io::Error) -> bool {
    crate::sys::is_not_a_directory(e) || crate::sys::is_symlink_refusal(e)
}

/// The ends of the buckets in `seen/`, oldest first.
fn buckets(dir: &StateDir) -> Result<Vec<u64>> {
    let mut ends = Vec::new();
    dir.dir
        .scan(&mut Vec::new(), |entry| {
            let maybe_dir = matches!(entry.kind, EntryKind::Dir | EntryKind::Unknown);
            if let Some(end) = parse_bucket(entry.name).filter(|_| maybe_dir) {
                ends.push(end);
            }
        })
        .map_err(|e| Error::io(Operation::Scan, &dir.path, e))?;
    ends.sort_unstable();
    Ok(ends)
}
