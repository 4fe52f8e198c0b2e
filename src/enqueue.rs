//! Enqueue: write `tmp/X`, sync it, rename it to `incoming/X`, sync `incoming/`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::durability::Syncer;
use crate::error::{Error, Operation, Result};
use crate::queue::{Inner, StateDir};
use crate::{defer, lock, DirectoryQueue, MessageId, State};

/// Size of the buffer a streamed enqueue copies through.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

impl DirectoryQueue {
    /// Enqueues `bytes` as a new message and returns its id.
    ///
    /// The message is written to `tmp/` under its id (exclusive create), synced, and
    /// published by an atomic rename into `incoming/`, where consumers see it complete
    /// or not at all.
    ///
    /// # Errors
    ///
    /// - [`Error::EmptyMessage`] for empty or whitespace-only bytes (Mentat treats
    ///   those as errors); nothing is written.
    /// - [`Error::Io`] naming the path for any system error (`ENOSPC`, `EDQUOT`,
    ///   `EIO`, ...). The file in `tmp/` is removed and nothing appears in `incoming/`;
    ///   if the final directory sync fails, the just-published message is taken back
    ///   out of `incoming/` unless a consumer already claimed it.
    ///
    /// # Durability
    ///
    /// `Full`: the file and `incoming/` are synced before this returns. `Batch`: the
    /// file is synced, `incoming/` at the next [`sync`](DirectoryQueue::sync).
    /// `None`: nothing is synced.
    pub fn enqueue(&self, bytes: impl AsRef<[u8]>) -> Result<MessageId> {
        self.written(bytes.as_ref(), None)?
            .publish(Destination::Incoming)
    }

    /// A file in `tmp/` holding `bytes`, unless they are blank.
    fn written(&self, bytes: &[u8], id: Option<&MessageId>) -> Result<TmpFile<'_>> {
        if is_blank(bytes) {
            return Err(empty(&self.inner));
        }
        let mut tmp = TmpFile::create(&self.inner, id)?;
        tmp.write(bytes)?;
        Ok(tmp)
    }

    /// Enqueues `bytes` for delivery at `not_before`: the message waits in `deferred/`
    /// and moves to `incoming/` when a claimer of the queue finds it due. A time not in
    /// the future delivers at once.
    ///
    /// # Errors
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue); [`Error::Layout`] when the queue has no
    /// `deferred/` (opened without permission to create it).
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue), with `deferred/` in place of `incoming/`.
    pub fn enqueue_at(&self, bytes: impl AsRef<[u8]>, not_before: SystemTime) -> Result<MessageId> {
        let tmp = self.written(bytes.as_ref(), None)?;
        if not_before <= SystemTime::now() {
            return tmp.publish(Destination::Incoming);
        }
        tmp.publish(Destination::Deferred(not_before))
    }

    /// Enqueues `bytes` under a given id, so that a producer that may repeat itself
    /// (after a crash, say) cannot make a duplicate while the first copy is waiting.
    ///
    /// # Errors
    ///
    /// [`Error::Duplicate`] when `incoming/` already holds a message with this id (a
    /// message with this id in another state is not detected); otherwise as
    /// [`enqueue`](DirectoryQueue::enqueue).
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue).
    pub fn enqueue_with_id(&self, id: &MessageId, bytes: impl AsRef<[u8]>) -> Result<()> {
        let mut tmp = self.written(bytes.as_ref(), Some(id))?;
        tmp.fix_id(id);
        tmp.publish(Destination::Incoming).map(drop)
    }

    /// Enqueues `value` serialised as JSON.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] with [`Operation::Encode`] when `value` cannot be serialised;
    /// otherwise as [`enqueue`](DirectoryQueue::enqueue).
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue).
    pub fn enqueue_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<MessageId> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            Error::json(Operation::Encode, &self.inner.dir(State::Incoming).path, e)
        })?;
        self.enqueue(bytes)
    }

    /// Enqueues everything `reader` yields, streamed through a 64 KiB buffer: a message
    /// of any size needs no more memory than that.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with [`Operation::Read`] naming the queue's `tmp/` file when the
    /// reader fails; otherwise as [`enqueue`](DirectoryQueue::enqueue). The partial file
    /// is removed in every case.
    ///
    /// # Durability
    ///
    /// As [`enqueue`](DirectoryQueue::enqueue).
    pub fn enqueue_reader(&self, mut reader: impl Read) -> Result<MessageId> {
        let inner = &*self.inner;
        let mut tmp = TmpFile::create(inner, None)?;
        tmp.copy_from(&mut reader)?;
        if !tmp.nonblank {
            return Err(empty(inner));
        }
        tmp.publish(Destination::Incoming)
    }

    /// Enqueues many messages behind one durability barrier (group commit) and returns
    /// their ids in order.
    ///
    /// All files are written first, then synced, then published, then `incoming/` is
    /// synced once. Throughput with full durability is therefore many times that of
    /// single enqueues.
    ///
    /// # Errors
    ///
    /// - [`Error::EmptyMessage`] or an I/O error before publishing: nothing is
    ///   published and every `tmp/` file is removed.
    /// - [`Error::PartialBatch`] when publishing stopped part-way: it lists the ids
    ///   that were published (and remain, synced as far as possible); the rest are
    ///   removed.
    ///
    /// # Durability
    ///
    /// `Full` and `Batch`: every file and `incoming/` are synced before this returns.
    /// `None`: nothing is synced.
    pub fn enqueue_batch<I>(&self, items: I) -> Result<Vec<MessageId>>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let inner = &*self.inner;
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
        inner
            .syncer
            .files(files.iter().map(|tmp| (&tmp.file, tmp.path.as_path())))?;
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
}

/// Reports the outcome of publishing `ids`: when the sync that was to make them durable
/// failed, they are taken back out of `incoming/` (nothing is acknowledged that might
/// not survive), and those a consumer already claimed are reported as published.
fn settle(
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

/// Publishes a copy of a message from another filesystem into `next` under the same
/// id (the cross-filesystem forward), durable before it returns unless the mode is
/// [`crate::Durability::None`] (the copy must be durable before the original goes).
pub(crate) fn publish_copy(
    syncer: &Syncer,
    next: &Inner,
    id: &MessageId,
    mut reader: impl Read,
) -> Result<()> {
    let mut tmp = TmpFile::create(next, Some(id))?;
    tmp.copy_from(&mut reader)?;
    tmp.fix_id(id);
    syncer.file(&tmp.file, &tmp.path)?;
    let (id, name, dir) = tmp.rename_into(Destination::Incoming)?;
    settle(dir, vec![(id, name)], syncer.changed_now(&[dir])).map(drop)
}

fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

fn empty(inner: &Inner) -> Error {
    Error::EmptyMessage {
        op: Operation::Publish,
        path: inner.dir(State::Incoming).path.clone(),
    }
}

/// Where a finished message file goes.
#[derive(Clone, Copy)]
enum Destination {
    Incoming,
    /// `deferred/`, due at this time.
    Deferred(SystemTime),
}

/// A message file being written in `tmp/`. It is locked while it exists, so that
/// [`recover`](DirectoryQueue::recover) never removes a file whose writer is alive,
/// and removed on drop unless it was published.
struct TmpFile<'q> {
    queue: &'q Inner,
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
    fn create(queue: &'q Inner, id: Option<&MessageId>) -> Result<TmpFile<'q>> {
        let tmp = queue.dir(State::Tmp);
        let mut preferred = id.cloned();
        for _ in 0..16 {
            // A generated id names the tmp file too, so that a crash leftover in tmp/
            // can be matched with its published twin (see claim.rs).
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

    /// Publishes under exactly `id`, or not at all.
    fn fix_id(&mut self, id: &MessageId) {
        self.id = Some(id.clone());
        self.fixed_id = true;
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.nonblank |= !is_blank(bytes);
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(Operation::Write, &self.path, e))
    }

    fn copy_from(&mut self, reader: &mut impl Read) -> Result<()> {
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

    /// The single-message publish: sync the file, rename it into place, sync the
    /// directory as the mode says (taking it back out if that fails).
    fn publish(self, destination: Destination) -> Result<MessageId> {
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
        };
        let mut id = self.id.take().unwrap_or_else(MessageId::generate);
        // IMPORTANT: unlock before publishing. A claimer that found the new message
        // still locked would take it for a claim in progress and could sleep until its
        // next rescan. The lock only kept recovery from purging the file while it was
        // written; its fresh mtime does that from here on.
        lock::unlock(&self.file).map_err(|e| Error::io(Operation::Publish, &self.path, e))?;
        for _ in 0..16 {
            let name = match destination {
                Destination::Incoming => id.as_os_str().to_os_string(),
                Destination::Deferred(when) => defer::deferred_name(&id, when),
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
