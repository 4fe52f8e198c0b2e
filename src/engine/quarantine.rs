//! Moving entries that are not claimable messages out of the way, into `errors/`.
//!
//! Symlinks, FIFOs, sockets, devices, directories, hard-linked files and empty files are
//! never followed, opened for reading, or blocked on: they are renamed by name into
//! `errors/` with a `.meta` sidecar saying why, and the queue goes on.

use std::ffi::{OsStr, OsString};
use std::io;
use std::sync::atomic::Ordering;

use super::sidecar;
use super::Shared;
use crate::error::{Error, Operation, Result};
use crate::format::id::{self, MessageId};
use crate::format::meta::FailureInfo;
use crate::format::state::State;

/// Moves the entry `name` of `from` to `errors/` with `reason` in its sidecar, for an
/// entry that is not a claimable message.
///
/// Returns `Ok(false)` when the entry had already gone (another claimer moved it).
pub(crate) fn quarantine(inner: &Shared, from: State, name: &OsStr, reason: &str) -> Result<bool> {
    let info = FailureInfo::now(reason.to_owned(), 0, from);
    let Moved::To {
        name: target,
        synced,
    } = move_to_errors(inner, from, name, &info, Operation::Quarantine)?
    else {
        return Ok(false);
    };
    synced?;
    {
        inner.counters.quarantined.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            entry = %inner.require(from)?.join(name).display(),
            to = %inner.dir(State::Errors).join(&target).display(),
            reason,
            "quarantined"
        );
    }
    Ok(true)
}

/// Where [`move_to_errors`] put an entry.
pub(crate) enum Moved {
    /// The entry was gone before it could be moved.
    Gone,
    /// The entry is in `errors/` under `name`; `synced` says whether that is durable
    /// as the durability mode requires.
    To { name: OsString, synced: Result<()> },
}

/// Moves the entry `name` of `from` into `errors/`, under its own name or `name~N` when
/// that is taken, after writing `info` as its sidecar.
///
/// # Durability
///
/// The sidecar is durable before the entry appears in `errors/`; the move itself is
/// synced as the queue's durability mode says, together with `incoming/` (a claim's
/// rename is made durable by the terminal that follows it).
pub(crate) fn move_to_errors(
    inner: &Shared,
    from: State,
    name: &OsStr,
    info: &FailureInfo,
    op: Operation,
) -> Result<Moved> {
    move_to_errors_as(inner, from, name, name, info, op)
}

/// [`move_to_errors`] for an entry whose name in `from` is not its id (`deferred/`'s
/// `<due>@<id>`): in `errors/` it is named after `id`.
pub(crate) fn move_to_errors_as(
    inner: &Shared,
    from: State,
    name: &OsStr,
    id: &OsStr,
    info: &FailureInfo,
    op: Operation,
) -> Result<Moved> {
    let source = inner.require(from)?;
    let errors = inner.dir(State::Errors);
    let mut start = 0;
    for _ in 0..8 {
        let target = free_name(inner, id, start)?;
        sidecar::write_sidecar(inner, &target, info)?;
        inner.syncer.order_before_next(errors)?;
        match source.dir.rename_noreplace(name, &errors.dir, &target) {
            Ok(()) => {
                let synced = inner
                    .syncer
                    .changed(&[inner.dir(State::Incoming), source, errors]);
                return Ok(Moved::To {
                    name: target,
                    synced,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                remove_orphan_sidecar(inner, &target);
                return Ok(Moved::Gone);
            }
            // Someone else took that name in errors/ meanwhile: try the next one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => start += 1,
            Err(e) => {
                remove_orphan_sidecar(inner, &target);
                return Err(Error::moving(
                    op,
                    source.join(name),
                    errors.join(&target),
                    e,
                ));
            }
        }
    }
    Err(Error::io(
        op,
        source.join(name),
        io::Error::new(io::ErrorKind::AlreadyExists, "no free name in errors/"),
    ))
}

/// The name for `name` in `errors/`, or `<name>~N` when `errors/` already holds an
/// entry of that name. A name that is not a valid id (see [`errors_name`]) is changed
/// into one first.
pub(crate) fn free_name(inner: &Shared, name: &OsStr, start: u32) -> Result<OsString> {
    let errors = inner.dir(State::Errors);
    let base = errors_name(name);
    for n in start..start + 1000 {
        let candidate = if n == 0 {
            base.clone()
        } else {
            let mut c = base.clone();
            c.push(format!("~{n}"));
            c
        };
        match errors.dir.stat_at(&candidate) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(candidate),
            Err(e) => return Err(Error::io(Operation::Stat, errors.join(&candidate), e)),
            Ok(_) => {}
        }
    }
    Err(Error::io(
        Operation::Stat,
        errors.join(name),
        io::Error::new(io::ErrorKind::AlreadyExists, "no free name in errors/"),
    ))
}

/// A valid id for an entry quarantined under `name`, so that it shows in `dirq ls` and
/// can be requeued: a hidden name gets the prefix `hidden~`, a name ending in `.meta`
/// (which would pass for a sidecar) gets a `~`, and a name longer than an id may be is
/// cut to fit, ending in `~cut`.
fn errors_name(name: &OsStr) -> OsString {
    let bytes = name.as_encoded_bytes();
    if id::check(bytes).is_ok() {
        return name.to_os_string();
    }
    let mut fixed = Vec::with_capacity(id::MAX_LEN);
    if MessageId::is_hidden(bytes) {
        fixed.extend_from_slice(b"hidden~");
    }
    fixed.extend_from_slice(bytes);
    if fixed.len() > id::MAX_LEN {
        const CUT: &[u8] = b"~cut";
        // Cut on a character boundary when the name is UTF-8 (it stays printable).
        let mut keep = id::MAX_LEN - CUT.len();
        if let Ok(text) = std::str::from_utf8(&fixed) {
            while !text.is_char_boundary(keep) {
                keep -= 1;
            }
        }
        fixed.truncate(keep);
        fixed.extend_from_slice(CUT);
    }
    if fixed.ends_with(id::META_SUFFIX.as_bytes()) {
        fixed.push(b'~');
    }
    crate::sys::os_string(fixed)
}

/// Removes a sidecar written for an entry that did not arrive, unless another process
/// moved an entry of that name into `errors/` meanwhile.
fn remove_orphan_sidecar(inner: &Shared, target: &OsStr) {
    let errors = inner.dir(State::Errors);
    if errors.dir.stat_at(target).is_ok() {
        return;
    }
    let sidecar = crate::format::meta::sidecar_name(target);
    if let Err(e) = errors.dir.unlink(&sidecar) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %errors.join(&sidecar).display(), error = %e, "cannot remove unused sidecar");
        }
    }
}
