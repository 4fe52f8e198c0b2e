//! Enqueue: write `tmp/X`, sync it, rename it to `incoming/X`, sync `incoming/`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::Serialize;

use crate::durability::Syncer;
use crate::error::{Error, Operation, Result};
use crate::queue::Inner;
use crate::{lock, DirectoryQueue, MessageId, State};

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
        let bytes = bytes.as_ref();
        let inner = &*self.inner;
        if is_blank(bytes) {
            return Err(empty(inner));
        }
        let mut tmp = TmpFile::create(inner, None)?;
        tmp.write(bytes)?;
        let id = tmp.publish(&inner.syncer)?;
        let synced = inner.syncer.changed(&[inner.dir(State::Incoming)]);
        settle(inner, vec![id], synced).map(|mut ids| ids.remove(0))
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
        let id = tmp.publish(&inner.syncer)?;
        let synced = inner.syncer.changed(&[inner.dir(State::Incoming)]);
        settle(inner, vec![id], synced).map(|mut ids| ids.remove(0))
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
            match tmp.rename_into_incoming() {
                Ok(id) => published.push(id),
                Err(error) if published.is_empty() => return Err(error),
                Err(error) => {
                    // Make what is visible durable before reporting it as published.
                    let _ = inner.syncer.changed_now(&[inner.dir(State::Incoming)]);
                    return Err(Error::PartialBatch {
                        path: inner.dir(State::Incoming).path.clone(),
                        published,
                        total,
                        source: Box::new(error),
                    });
                }
            }
        }
        let synced = inner.syncer.changed_now(&[inner.dir(State::Incoming)]);
        settle(inner, published, synced)
    }
}

/// Reports the outcome of publishing `ids`: when the sync that was to make them durable
/// failed, they are taken back out of `incoming/` (nothing is acknowledged that might
/// not survive), and those a consumer already claimed are reported as published.
fn settle(inner: &Inner, ids: Vec<MessageId>, synced: Result<()>) -> Result<Vec<MessageId>> {
    let Err(error) = synced else {
        return Ok(ids);
    };
    let incoming = inner.dir(State::Incoming);
    let total = ids.len();
    let still_visible: Vec<MessageId> = ids
        .into_iter()
        .filter(|id| match incoming.dir.unlink(id.as_os_str()) {
            Ok(()) => false,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        })
        .collect();
    if still_visible.is_empty() {
        return Err(error);
    }
    Err(Error::PartialBatch {
        path: incoming.path.clone(),
        published: still_visible,
        total,
        source: Box::new(error),
    })
}

/// Publishes a copy of a message from another filesystem into `next` under the same
/// id (the cross-filesystem forward), durable before it returns unless the mode is
/// [`crate::Durability::None`].
pub(crate) fn publish_copy(
    syncer: &Syncer,
    next: &Inner,
    id: &MessageId,
    mut reader: impl Read,
) -> Result<()> {
    let mut tmp = TmpFile::create(next, Some(id))?;
    tmp.copy_from(&mut reader)?;
    syncer.file(&tmp.file, &tmp.path)?;
    tmp.id = Some(id.clone());
    tmp.fixed_id = true;
    let id = tmp.rename_into_incoming()?;
    let incoming = next.dir(State::Incoming);
    if let Err(error) = syncer.changed_now(&[incoming]) {
        let _ = incoming.dir.unlink(id.as_os_str());
        return Err(error);
    }
    Ok(())
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

    /// Syncs the file and renames it into `incoming/`; returns the id it got.
    fn publish(self, syncer: &Syncer) -> Result<MessageId> {
        syncer.file(&self.file, &self.path)?;
        self.rename_into_incoming()
    }

    /// Renames the file into `incoming/` without replacing anything. If the id is
    /// taken there (which only a clock stepped back together with a reused pid can
    /// cause), a new id is chosen, unless the id is fixed.
    fn rename_into_incoming(mut self) -> Result<MessageId> {
        let incoming = self.queue.dir(State::Incoming);
        let tmp = self.queue.dir(State::Tmp);
        let mut id = self.id.take().unwrap_or_else(MessageId::generate);
        for _ in 0..16 {
            match tmp
                .dir
                .rename_noreplace(&self.name, &incoming.dir, id.as_os_str())
            {
                Ok(()) => {
                    self.published = true;
                    return Ok(id);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && self.fixed_id => {
                    return Err(Error::Duplicate {
                        op: Operation::Publish,
                        path: incoming.join(id.as_os_str()),
                        id,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => id = MessageId::generate(),
                Err(e) => {
                    return Err(Error::moving(
                        Operation::Publish,
                        &self.path,
                        incoming.join(id.as_os_str()),
                        e,
                    ))
                }
            }
        }
        Err(Error::io(
            Operation::Publish,
            &incoming.path,
            io::Error::new(io::ErrorKind::AlreadyExists, "no free id in incoming/"),
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
