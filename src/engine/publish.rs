//! Publishing: write `tmp/X`, sync it, rename it to `incoming/X` (or `deferred/`),
//! sync the directory; and taking it back out when that sync fails.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use super::durability::Syncer;
use super::owner::{lock_entry, Entry};
use super::{Shared, StateDir};
use crate::error::{Error, Operation, Result};
use crate::format::attempts;
use crate::format::deferred::deferred_name;
use crate::format::id::MessageId;
use crate::format::state::State;
use crate::sys::lock::{self, Locked};
use crate::sys::FileStat;

/// Size of the buffer a streamed enqueue copies through.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// A file in `tmp/` holding `bytes`, unless they are blank; named after `id` when
/// given.
pub(crate) fn write_new<'q>(
    inner: &'q Shared,
    bytes: &[u8],
    id: Option<&MessageId>,
) -> Result<TmpFile<'q>> {
    if is_blank(bytes) {
        return Err(empty(inner));
    }
    let mut tmp = TmpFile::create(inner, id)?;
    tmp.write(bytes)?;
    Ok(tmp)
}

/// Writes every item to `tmp/`, syncs the files, publishes them and syncs `incoming/`
/// once (group commit); see `DirectoryQueue::enqueue_batch`.
pub(crate) fn publish_batch<I>(inner: &Shared, items: I) -> Result<Vec<MessageId>>
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    let mut files = Vec::new();
    for item in items {
        let bytes = item.as_ref();
        if is_blank(bytes) {
            return Err(empty(inner));
        }
        let mut tmp = TmpFile::create(inner, None)?;
        tmp.write(bytes)?;
        files.push(tmp);
    }
    let total = files.len();
    TmpFile::sync_many(inner, files.iter())?;
    let mut published = Vec::with_capacity(total);
    for tmp in files {
        match tmp.rename_into(Destination::Incoming) {
            Ok((id, name, _)) => published.push((id, name)),
            Err(error) if published.is_empty() => return Err(error),
            Err(error) => {
                // Make what is visible durable before reporting it as published.
                let _ = inner.syncer.changed_now(&[inner.dir(State::Incoming)]);
                return Err(Error::PartialBatch {
                    path: inner.dir(State::Incoming).path.clone(),
                    published: published.into_iter().map(|(id, _)| id).collect(),
                    total,
                    source: Box::new(error),
                });
            }
        }
    }
    let synced = inner.syncer.changed_now(&[inner.dir(State::Incoming)]);
    settle(inner.dir(State::Incoming), published, synced)
}

/// Reports the outcome of publishing `ids`: when the sync that was to make them durable
/// failed, they are taken back out of `incoming/` (nothing is acknowledged that might
/// not survive), and those a consumer already claimed are reported as published.
pub(crate) fn settle(
    published_in: &StateDir,
    names: Vec<(MessageId, std::ffi::OsString)>,
    synced: Result<()>,
) -> Result<Vec<MessageId>> {
    let Err(error) = synced else {
        return Ok(names.into_iter().map(|(id, _)| id).collect());
    };
    let total = names.len();
    let still_visible: Vec<MessageId> = names
        .into_iter()
        .filter(|(_, name)| match published_in.dir.unlink(name) {
            Ok(()) => false,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        })
        .map(|(id, _)| id)
        .collect();
    if still_visible.is_empty() {
        return Err(error);
    }
    Err(Error::PartialBatch {
        path: published_in.path.clone(),
        published: still_visible,
        total,
        source: Box::new(error),
    })
}

/// When [`publish_copy`] syncs the directory it published into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncWhen {
    /// Before it returns, unless the mode is [`crate::Durability::None`]: the
    /// cross-filesystem forward, which deletes the original next.
    Now,
    /// As the syncer's mode says: a Piper's copy, whose barrier syncs it before the
    /// original leaves its queue.
    ByMode,
}

/// Publishes a copy of a message into `next` under the same id (the cross-filesystem
/// forward, and a Piper's copies to its other outputs). The file is synced before it
/// is published, unless the mode is [`crate::Durability::None`].
pub(crate) fn publish_copy(
    syncer: &Syncer,
    next: &Shared,
    id: &MessageId,
    mut reader: impl Read,
    when: SyncWhen,
) -> Result<()> {
    let mut tmp = TmpFile::create(next, Some(id))?;
    tmp.copy_from(&mut reader)?;
    tmp.fix_id(id);
    syncer.file(&tmp.file, &tmp.path)?;
    let (id, name, dir) = tmp.rename_into(Destination::Incoming)?;
    let synced = match when {
        SyncWhen::Now => syncer.changed_now(&[dir]),
        SyncWhen::ByMode => syncer.changed(&[dir]),
    };
    settle(dir, vec![(id, name)], synced).map(drop)
}

/// Whether `bytes` are empty or whitespace only: not a message (Mentat fails those).
pub(crate) fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

pub(crate) fn empty(inner: &Shared) -> Error {
    Error::EmptyMessage {
        op: Operation::Publish,
        path: inner.dir(State::Incoming).path.clone(),
    }
}

/// Where a finished message file goes.
#[derive(Clone, Copy)]
pub(crate) enum Destination {
    Incoming,
    /// `chained/`: a member of an ordered group, waiting for its turn.
    Chained,
    /// `deferred/`, due at this time.
    Deferred(SystemTime),
}

/// A message file being written in `tmp/`. It is locked while it exists, so that
/// recovery never removes a file whose writer is alive,
/// and removed on drop unless it was published.
pub(crate) struct TmpFile<'q> {
    queue: &'q Shared,
    /// Its name in `tmp/`.
    name: OsString,
    path: PathBuf,
    file: File,
    /// The id it is published under; `None` until decided.
    id: Option<MessageId>,
    /// The id must not change on publishing (a forward keeps its id).
    fixed_id: bool,
    /// Whether any byte written so far is not whitespace.
    nonblank: bool,
    published: bool,
}

impl<'q> TmpFile<'q> {
    /// Creates a file in `tmp/` named after `id`, or after a new id.
    pub(crate) fn create(queue: &'q Shared, id: Option<&MessageId>) -> Result<TmpFile<'q>> {
        let tmp = queue.dir(State::Tmp);
        let mut preferred = id.cloned();
        for _ in 0..16 {
            // A generated id names the tmp file too, so that a crash leftover in tmp/
            // can be matched with its published twin (see `claim`).
            let id = preferred.take().unwrap_or_else(MessageId::generate);
            let name = id.as_os_str().to_os_string();
            match tmp.dir.create_new(&name, queue.config.file_mode) {
                Ok(file) => {
                    // Never contended: the file was created just now.
                    lock::try_lock(&file)
                        .map_err(|e| Error::io(Operation::Create, tmp.join(&name), e))?;
                    return Ok(TmpFile {
                        queue,
                        path: tmp.join(&name),
                        name,
                        file,
                        id: Some(id),
                        fixed_id: false,
                        nonblank: false,
                        published: false,
                    });
                }
                // A leftover of a crashed writer, or an id clash: try another name.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(Operation::Create, tmp.join(&name), e)),
            }
        }
        Err(Error::io(
            Operation::Create,
            &tmp.path,
            io::Error::new(io::ErrorKind::AlreadyExists, "no free name in tmp/"),
        ))
    }

    /// Whether everything written so far is whitespace (or nothing).
    pub(crate) fn is_blank(&self) -> bool {
        !self.nonblank
    }

    /// Publishes under exactly `id`, or not at all.
    pub(crate) fn fix_id(&mut self, id: &MessageId) {
        self.id = Some(id.clone());
        self.fixed_id = true;
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.nonblank |= !is_blank(bytes);
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(Operation::Write, &self.path, e))
    }

    pub(crate) fn copy_from(&mut self, reader: &mut impl Read) -> Result<()> {
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(Operation::Read, &self.path, e)),
            };
            self.write(&buf[..n])?;
        }
    }

    /// Makes the bytes durable as the mode says, before the file is published.
    pub(crate) fn sync(&self) -> Result<()> {
        self.queue.syncer.file(&self.file, &self.path)
    }

    /// Makes the bytes of all `files` durable as the mode says, the writeback of all
    /// started before waiting for any.
    pub(crate) fn sync_many<'a>(
        queue: &Shared,
        files: impl Iterator<Item = &'a TmpFile<'a>> + Clone,
    ) -> Result<()> {
        queue
            .syncer
            .files(files.map(|tmp| (&tmp.file, tmp.path.as_path())))
    }

    /// Renames the file to `incoming/<id>` without replacing anything and keeps it
    /// locked, so that claimers pass it over until the returned lock is dropped; `None`
    /// when `incoming/<id>` exists (the file is then removed). Returns the file's
    /// identity too, to tell it from another file under the same name later.
    pub(crate) fn rename_held(mut self, id: &MessageId) -> Result<Option<(Locked, FileStat)>> {
        let incoming = self.queue.dir(State::Incoming);
        let name = id.as_os_str();
        let held = self
            .file
            .try_clone()
            .and_then(|file| Ok((crate::sys::stat_file(&file)?, file)))
            .map_err(|e| Error::io(Operation::Publish, &self.path, e))?;
        match self
            .queue
            .dir(State::Tmp)
            .dir
            .rename_noreplace(&self.name, &incoming.dir, name)
        {
            Ok(()) => {
                self.published = true;
                // The clone shares the open file description, and with it the lock.
                Ok(Some((Locked::new(held.1), held.0)))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(Error::moving(
                Operation::Publish,
                &self.path,
                incoming.join(name),
                e,
            )),
        }
    }

    /// The single-message publish: sync the file, rename it into place, sync the
    /// directory as the mode says (taking it back out if that fails).
    pub(crate) fn publish(self, destination: Destination) -> Result<MessageId> {
        let queue = self.queue;
        queue.syncer.file(&self.file, &self.path)?;
        let (id, name, dir) = self.rename_into(destination)?;
        let synced = queue.syncer.changed(&[dir]);
        settle(dir, vec![(id, name)], synced).map(|mut ids| ids.remove(0))
    }

    /// Renames the file into `destination` without replacing anything; returns its id,
    /// its name there and the directory. If the id is taken (which only a clock stepped
    /// back together with a reused pid can cause), a new id is chosen, unless the id is
    /// fixed.
    fn rename_into(
        mut self,
        destination: Destination,
    ) -> Result<(MessageId, OsString, &'q Arc<StateDir>)> {
        let tmp = self.queue.dir(State::Tmp);
        let dir = match destination {
            Destination::Incoming => self.queue.dir(State::Incoming),
            Destination::Deferred(_) => self.queue.require(State::Deferred)?,
            Destination::Chained => self.queue.require(State::Chained)?,
        };
        let mut id = self.id.take().unwrap_or_else(MessageId::generate);
        // IMPORTANT: unlock before publishing. A claimer that found the new message
        // still locked would take it for a claim in progress and could sleep until its
        // next rescan. The lock only kept recovery from purging the file while it was
        // written; its fresh mtime does that from here on.
        lock::unlock(&self.file).map_err(|e| Error::io(Operation::Publish, &self.path, e))?;
        for _ in 0..16 {
            let name = match destination {
                Destination::Incoming | Destination::Chained => id.as_os_str().to_os_string(),
                Destination::Deferred(when) => deferred_name(&id, when),
            };
            match tmp.dir.rename_noreplace(&self.name, &dir.dir, &name) {
                Ok(()) => {
                    self.published = true;
                    return Ok((id, name, dir));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && self.fixed_id => {
                    return Err(Error::Duplicate {
                        op: Operation::Publish,
                        path: dir.join(&name),
                        id,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => id = MessageId::generate(),
                Err(e) => {
                    return Err(Error::moving(
                        Operation::Publish,
                        &self.path,
                        dir.join(&name),
                        e,
                    ))
                }
            }
        }
        Err(Error::io(
            Operation::Publish,
            &dir.path,
            io::Error::new(io::ErrorKind::AlreadyExists, "no free id"),
        ))
    }
}

/// Replaces the content of the waiting message file `name` in `state` by what `reader`
/// gives, under the same name: the new content is written and synced in `tmp/`, then
/// swapped with the old file in one `renameat2(RENAME_EXCHANGE)`, so that at every
/// moment, crash included, the name holds either the old content or the new, never
/// neither; the old content, now in `tmp/`, is removed. The attempt count goes with the
/// message. When the message left `state` meanwhile (claimed, held, released), the swap
/// finds no file and nothing changes: [`Error::Io`] of kind `NotFound`.
pub(crate) fn replace(
    inner: &Shared,
    state: State,
    name: &OsString,
    reader: &mut impl Read,
) -> Result<()> {
    let dir = inner.require(state)?;
    let mut tmp = TmpFile::create(inner, None)?;
    tmp.copy_from(reader)?;
    if tmp.is_blank() {
        return Err(empty(inner));
    }
    let old_path = dir.join(name);
    // IMPORTANT: the old file is locked, as a claimer locks it, until the swap is done.
    // A claimer that locked it first is claiming it: refused. One that comes after
    // finds it locked and skips it, then finds the new file under the name. Without
    // the lock, a claimer that locked the old file before the swap would rename the new
    // one into pending/ unlocked, read the old one, and recovery would later requeue
    // the new one: processed twice.
    let moved = |why: &str| {
        Err(Error::moving(
            Operation::Edit,
            &tmp.path,
            &old_path,
            io::Error::new(io::ErrorKind::NotFound, why.to_owned()),
        ))
    };
    let old = match lock_entry(dir, name).map_err(|e| Error::io(Operation::Edit, &old_path, e))? {
        Entry::Locked(old, _) => old,
        Entry::Held => {
            return Err(Error::io(
                Operation::Edit,
                &old_path,
                io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "the message is being claimed by a worker",
                ),
            ))
        }
        Entry::Gone => return moved("the message moved meanwhile"),
        Entry::NotRegular(kind) => {
            return Err(Error::io(
                Operation::Edit,
                &old_path,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a regular file but a {}", kind.as_str()),
                ),
            ))
        }
    };
    // The attempt count lives on the file (an xattr): it moves to the new one.
    let identity = inner.identity();
    let count =
        attempts::read(&old, identity).map_err(|e| Error::io(Operation::Metadata, &old_path, e))?;
    if count > 0 {
        attempts::write(&tmp.file, identity, count)
            .map_err(|e| Error::io(Operation::Metadata, &tmp.path, e))?;
    }
    inner.syncer.file(&tmp.file, &tmp.path)?;
    // Unlocked first: a claimer finding the new content locked would take it for a
    // claim in progress (see rename_into).
    lock::unlock(&tmp.file).map_err(|e| Error::io(Operation::Edit, &tmp.path, e))?;
    let tmp_dir = inner.dir(State::Tmp);
    tmp_dir
        .dir
        .exchange(&tmp.name, &dir.dir, name)
        .map_err(|e| Error::moving(Operation::Edit, &tmp.path, &old_path, e))?;
    // tmp.name now holds the old content; dropping `tmp` removes it, then the old
    // file's lock goes.
    drop(tmp);
    drop(old);
    inner.syncer.changed(&[dir, tmp_dir])
}

impl Drop for TmpFile<'_> {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        if let Err(e) = self.queue.dir(State::Tmp).dir.unlink(&self.name) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove unpublished file");
            }
        }
    }
}
