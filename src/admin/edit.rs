//! Operator actions on single messages and whole states: requeue, delete, purge.

use std::ffi::OsStr;
use std::io;
use std::time::{Duration, SystemTime};

use crate::engine::group;
use crate::engine::seen;
use crate::engine::StateDir;
use crate::error::{Error, Operation, Result};
use crate::format::attempts;
use crate::format::group::Group;
use crate::format::meta::sidecar_name;
use crate::sys::EntryKind;
use crate::{DirectoryQueue, MessageId, State};

/// What one [`purge`](crate::admin::purge) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PurgeReport {
    /// Files removed from `tmp/` (their writers were gone).
    pub tmp_removed: usize,
    /// Failed messages removed from `errors/`, with their sidecars.
    pub errors_removed: usize,
}

/// Moves the failed message `id` from `errors/` back to `incoming/` and removes its
/// sidecar. Its attempt count starts over unless `keep_attempts`. A member of an
/// ordered group goes back to `chained/` instead, and waits for its turn there (see
/// [`requeue_group`]).
///
/// # Errors
///
/// [`Error::Io`] with kind `NotFound` when `errors/` has no such message, kind
/// `InvalidInput` when the entry is not a regular file (a quarantined FIFO, socket,
/// device, symlink or directory, which stays in `errors/`);
/// [`Error::Duplicate`] when `incoming/` already holds a message with this id.
///
/// # Durability
///
/// `Full`: `errors/` and `incoming/` are synced. `Batch`: at the next
/// [`sync`](DirectoryQueue::sync). `None`: never.
pub fn requeue(queue: &DirectoryQueue, id: &MessageId, keep_attempts: bool) -> Result<()> {
    let inner = queue.engine();
    let errors = inner.dir(State::Errors);
    let chain = group::group_of(id).filter(Group::is_ordered);
    let incoming = match chain {
        Some(_) => inner.require(State::Chained)?,
        None => inner.dir(State::Incoming),
    };
    let name = id.as_os_str();
    // Only a regular file is a message. A FIFO, socket, device, symlink or directory
    // that was quarantined stays in errors/: put back into incoming/, it would be
    // quarantined again by the next claim, or worse, be read by a Mentat worker.
    match errors.dir.stat_at(name) {
        Ok(stat) if stat.kind != EntryKind::File => {
            return Err(Error::io(
                Operation::Requeue,
                errors.join(name),
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "it is a {}, not a message file; only regular files can be \
                         requeued (look at it, then delete it)",
                        stat.kind.as_str()
                    ),
                ),
            ))
        }
        _ => {}
    }
    if !keep_attempts {
        if let Ok(file) = errors.dir.open_read(name) {
            if let Err(e) = attempts::reset(&file) {
                tracing::debug!(%id, error = %e, "cannot reset the attempt count");
            }
        }
    }
    match errors.dir.rename_noreplace(name, &incoming.dir, name) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::Duplicate {
                op: Operation::Requeue,
                path: incoming.join(name),
                id: id.clone(),
            })
        }
        // The bare "No such file or directory" of the rename does not say which of
        // the two names is missing.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::io(
                Operation::Requeue,
                errors.join(name),
                io::Error::new(io::ErrorKind::NotFound, "no failed message with this id"),
            ))
        }
        Err(e) => {
            return Err(Error::moving(
                Operation::Requeue,
                errors.join(name),
                incoming.join(name),
                e,
            ))
        }
    }
    remove_sidecar(errors, name)?;
    inner.syncer().changed(&[errors, incoming])?;
    if let Some(chain) = chain {
        group::next_turn(inner, &chain)?;
    }
    Ok(())
}

/// Requeues every member of `group` in `errors/` (the one that failed and those
/// cancelled with it), as [`requeue`] does each, and returns how many. The members of
/// an ordered group go back to `chained/` and run again in their order.
///
/// # Errors
///
/// As [`requeue`], for the first member that could not be requeued; those before it
/// stay requeued.
///
/// # Durability
///
/// As [`requeue`].
pub fn requeue_group(queue: &DirectoryQueue, group: &Group, keep_attempts: bool) -> Result<usize> {
    let mut members = group::members(queue.engine(), State::Errors, group)?;
    members.sort_by(|a, b| a.1.cmp(&b.1));
    for (_, id) in &members {
        requeue(queue, id, keep_attempts)?;
    }
    Ok(members.len())
}

/// Deletes the message `id` from `incoming/`, `deferred/`, `hold/`, `chained/` or
/// `errors/`
/// (with its sidecar) and returns the state it was in. A claimed message is never
/// deleted from under its worker. A directory that was quarantined into `errors/`
/// (one with a `.meta` sidecar) is removed with everything in it, never following a
/// symlink; a directory in `errors/` without a sidecar is refused. When the queue
/// [remembers finished ids](crate::QueueBuilder::remember_finished), a record of the id
/// is written to `seen/` first.
///
/// # Errors
///
/// [`Error::Io`] with [`Operation::Remember`] when the record cannot be written
/// (nothing is deleted); with kind `ResourceBusy` when the message is in `pending/`, kind
/// `NotFound` when no state holds it, kind `IsADirectory` for a directory in
/// `errors/` without a sidecar or a directory in another state.
///
/// # Durability
///
/// `Full`: the directory is synced. `Batch`: at the next
/// [`sync`](DirectoryQueue::sync). `None`: never.
pub fn delete(queue: &DirectoryQueue, id: &MessageId) -> Result<State> {
    let inner = queue.engine();
    for state in [
        State::Incoming,
        State::Deferred,
        State::Hold,
        State::Chained,
        State::Errors,
    ] {
        let (Some(dir), Some(name)) = (inner.state_dir(state), queue.engine().find(state, id)?)
        else {
            continue;
        };
        // Recorded before it goes, as a commit does (see `Message::commit`).
        seen::remember(inner, id)?;
        match dir.dir.unlink(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            // std maps EISDIR to this kind (Rust 1.83+), so no errno is compared here.
            Err(e) if e.kind() == io::ErrorKind::IsADirectory && state == State::Errors => {
                delete_quarantined_dir(dir, &name)?;
            }
            Err(e) => return Err(Error::io(Operation::Delete, dir.join(&name), e)),
        }
        if state == State::Errors {
            remove_sidecar(dir, &name)?;
        }
        inner.syncer().changed(&[dir])?;
        // A chain waits while a member is in errors/: deleting it lets the next in.
        if let Some(chain) = group::group_of(id).filter(Group::is_ordered) {
            group::next_turn(inner, &chain)?;
        }
        return Ok(state);
    }
    Err(super::not_waiting(
        queue,
        Operation::Delete,
        inner.root().join(id.as_os_str()),
        id,
        "the message is claimed by a worker",
        "no message with this id",
    ))
}

/// Removes the directory `name` from `errors/`, with everything in it, if dirq
/// quarantined it there: only then does it have a failure sidecar, which quarantine
/// writes before the move. A directory without one was put there by someone else and
/// may be anything (a mount point, someone's work), so it is left to the operator.
/// Symlinks inside are removed, never followed.
fn delete_quarantined_dir(errors: &StateDir, name: &OsStr) -> Result<()> {
    let path = errors.join(name);
    if errors.dir.stat_at(&sidecar_name(name)).is_err() {
        return Err(Error::io(
            Operation::Delete,
            path,
            io::Error::new(
                io::ErrorKind::IsADirectory,
                "it is a directory that dirq did not quarantine (it has no .meta \
                 sidecar); remove it by hand if it should go",
            ),
        ));
    }
    errors
        .dir
        .remove_tree(name)
        .map_err(|e| Error::io(Operation::Delete, path, e))
}

/// Removes abandoned files from `tmp/` older than `tmp_older_than` (whose writers
/// are gone; see [`recover`](DirectoryQueue::recover)) and, if `errors_older_than`
/// is given, failed messages that failed longer ago than that, with their sidecars
/// (each recorded in `seen/` first when the queue
/// [remembers finished ids](crate::QueueBuilder::remember_finished)).
///
/// # Errors
///
/// [`Error::Io`] naming the directory or file that could not be read, removed or
/// recorded.
///
/// # Durability
///
/// `Full`: `errors/` is synced once at the end. `tmp/` is never synced.
///
/// `progress` is called with the number of failed messages examined so far, for
/// progress bars.
pub fn purge(
    queue: &DirectoryQueue,
    tmp_older_than: Duration,
    errors_older_than: Option<Duration>,
    progress: &mut dyn FnMut(u64),
) -> Result<PurgeReport> {
    let inner = queue.engine();
    let mut report = PurgeReport {
        tmp_removed: queue.purge_tmp(tmp_older_than)?,
        errors_removed: 0,
    };
    let Some(age) = errors_older_than else {
        return Ok(report);
    };
    let errors = inner.dir(State::Errors);
    let now = SystemTime::now();
    for (examined, id) in queue.ids(State::Errors)?.enumerate() {
        if examined % 1024 == 0 {
            progress(examined as u64);
        }
        let id = id?;
        let name = id.as_os_str();
        let Some(failed_at) = failure_time(errors, name) else {
            continue;
        };
        if now.duration_since(failed_at).unwrap_or(Duration::ZERO) < age {
            continue;
        }
        seen::remember(inner, &id)?;
        match errors.dir.unlink(name) {
            Ok(()) => report.errors_removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            // A quarantined directory: left for the operator.
            // std maps EISDIR to this kind (Rust 1.83+), so no errno is compared here.
            Err(e) if e.kind() == io::ErrorKind::IsADirectory => continue,
            Err(e) => return Err(Error::io(Operation::Purge, errors.join(name), e)),
        }
        remove_sidecar(errors, name)?;
    }
    if report.errors_removed > 0 {
        inner.syncer().changed(&[errors])?;
    }
    Ok(report)
}
/// When the message `name` in `errors/` failed: its sidecar is written when it fails;
/// without one, the file's change time (set by the rename into `errors/`) says when.
pub(crate) fn failure_time(errors: &StateDir, name: &OsStr) -> Option<SystemTime> {
    errors
        .dir
        .stat_at(&sidecar_name(name))
        .or_else(|_| errors.dir.stat_at(name))
        .map(|st| st.ctime)
        .ok()
}

/// Removes `errors/<name>.meta` if it exists.
pub(crate) fn remove_sidecar(errors: &StateDir, name: &OsStr) -> Result<()> {
    let sidecar = sidecar_name(name);
    match errors.dir.unlink(&sidecar) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(Operation::Metadata, errors.join(&sidecar), e)),
    }
}
