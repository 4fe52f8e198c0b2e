//! Groups (their members are named in their ids, see `format/group.rs`): when a member
//! fails, the members still waiting are cancelled into `errors/`; the members of an
//! ordered group (a chain) wait in `chained/` and go to `incoming/` one at a time.
//!
//! Everything here is driven by the terminals of members (a failure, or a chain member
//! committed or forwarded) and repaired by recovery, which completes a cancellation or
//! a turn that a crash interrupted. Messages outside groups never reach this module.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;

use super::quarantine::{move_to_errors_as, Moved};
use super::sidecar::read_sidecar;
use super::Shared;
use crate::error::{Error, Operation, Result};
use crate::format::group::Group;
use crate::format::id::MessageId;
use crate::format::meta::FailureInfo;
use crate::format::state::{entry_id, State};
use crate::sys::lock;

/// The reason of a member cancelled because another member of its group failed
/// starts so: `cancelled: <id> failed: <its reason>`.
pub(crate) const CANCELLED: &str = "cancelled: ";

/// Where a member waits to be claimed, sources first: a member moves from each of these
/// towards `incoming/` (a turn, an unhold, a due time), never back, so reading
/// `incoming/` last misses none that moves meanwhile.
const WAITING: [State; 4] = [
    State::Chained,
    State::Hold,
    State::Deferred,
    State::Incoming,
];

/// Where a chain member counts as the current one: the next member waits until it has
/// left all of these (committed or forwarded). One in `errors/` stops the chain until an
/// operator requeues or deletes it.
const CURRENT: [State; 5] = [
    State::Incoming,
    State::Pending,
    State::Deferred,
    State::Hold,
    State::Errors,
];

/// The group of message `id`, if it names one.
pub(crate) fn group_of(id: &MessageId) -> Option<Group> {
    Group::of(id.as_os_str().as_encoded_bytes())
}

/// The members of `group` in `state`: their names there and their ids.
pub(crate) fn members(
    inner: &Shared,
    state: State,
    group: &Group,
) -> Result<Vec<(OsString, MessageId)>> {
    let Some(dir) = inner.state_dir(state) else {
        return Ok(Vec::new());
    };
    Ok(dir
        .names()?
        .into_iter()
        .filter_map(|name| {
            let (id, _) = entry_id(state, &name)?;
            (group_of(&id).as_ref() == Some(group)).then_some((name, id))
        })
        .collect())
}

/// After member `failed` of `group` went to `errors/` with `reason`: moves every
/// member still waiting (in `chained/`, `hold/`, `deferred/` or `incoming/`) to
/// `errors/`, with reason `cancelled: <failed> failed: <reason>`. A member claimed
/// meanwhile is not waiting any more and is left to its worker. Returns how many were
/// cancelled.
pub(crate) fn cancel_waiting(
    inner: &Shared,
    group: &Group,
    failed: &MessageId,
    reason: &str,
) -> Result<usize> {
    let why = format!("{CANCELLED}{failed} failed: {reason}");
    let mut cancelled = 0;
    for state in WAITING {
        for (name, id) in members(inner, state, group)? {
            if &id == failed {
                continue;
            }
            let info = FailureInfo::now(why.clone(), 0, state);
            match move_to_errors_as(inner, state, &name, id.as_os_str(), &info, Operation::Group)? {
                Moved::To { synced, .. } => {
                    synced?;
                    cancelled += 1;
                }
                Moved::Gone => {}
            }
        }
    }
    if cancelled > 0 {
        tracing::info!(group = %group, %failed, cancelled, "cancelled the waiting members of a failed group");
    }
    Ok(cancelled)
}

/// Lets the next member of the ordered group `chain` (the oldest id in `chained/`)
/// into `incoming/`, when no member is current (see [`CURRENT`]). Returns its id.
///
/// Processes and threads take turns through an `flock` on `chained/`, so that two
/// callers cannot both find no current member and each let one in.
pub(crate) fn next_turn(inner: &Shared, chain: &Group) -> Result<Option<MessageId>> {
    let Some(chained) = inner.state_dir(State::Chained) else {
        return Ok(None);
    };
    let turn = chained
        .dir
        .open_read(OsStr::new("."))
        .and_then(lock::lock_waiting)
        .map_err(|e| Error::io(Operation::Group, &chained.path, e))?;
    for state in CURRENT {
        if !members(inner, state, chain)?.is_empty() {
            return Ok(None);
        }
    }
    let Some((name, id)) = members(inner, State::Chained, chain)?
        .into_iter()
        .min_by(|a, b| a.1.cmp(&b.1))
    else {
        return Ok(None);
    };
    let incoming = inner.dir(State::Incoming);
    match chained
        .dir
        .rename_noreplace(&name, &incoming.dir, id.as_os_str())
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::moving(
                Operation::Group,
                chained.join(&name),
                incoming.join(id.as_os_str()),
                e,
            ))
        }
    }
    // Durable before the turn is given up: the next caller must see it current.
    inner.syncer.changed(&[chained, incoming])?;
    drop(turn);
    tracing::debug!(chain = %chain, %id, "next member of the chain let in");
    Ok(Some(id))
}

/// After message `id` went to `errors/` with `reason` (a failure, a dead letter, an
/// expiry, a timeout): cancels its group's waiting members, if it is in a group. A
/// failure to do so is logged; recovery completes it.
pub(crate) fn after_failure(inner: &Shared, id: &MessageId, reason: &str) {
    let Some(group) = group_of(id) else {
        return;
    };
    if let Err(e) = cancel_waiting(inner, &group, id, reason) {
        tracing::warn!(group = %group, %id, error = %e, "cannot cancel the group's waiting members; recovery will");
    }
}

/// Syncs `dirs`, the directories a terminal that took message `id` out of the queue
/// (a commit or a forward) changed, as the durability mode says; for a member of an
/// ordered group, syncs them now whatever the mode (a crash must not bring the member
/// back beside the next one, out of order) and lets the next member in. The sync's
/// result is the terminal's; a turn that cannot be taken is logged, and recovery takes
/// it.
pub(crate) fn sync_leaving(
    inner: &Shared,
    id: &MessageId,
    dirs: &[&std::sync::Arc<super::StateDir>],
) -> Result<()> {
    let Some(chain) = group_of(id).filter(Group::is_ordered) else {
        return inner.syncer.changed(dirs);
    };
    inner.syncer.changed_now(dirs)?;
    if let Err(e) = next_turn(inner, &chain) {
        tracing::warn!(chain = %chain, %id, error = %e, "cannot let the chain's next member in; recovery will");
    }
    Ok(())
}

/// What [`repair`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Repaired {
    pub(crate) cancelled: usize,
    pub(crate) let_in: usize,
}

/// Recovery's part: completes the cancellations and turns a crash interrupted.
///
/// - A group with a member in `errors/` that failed (not a cancelled one) has its
///   waiting members cancelled.
/// - Each ordered group with members in `chained/` gets its turn checked.
pub(crate) fn repair(inner: &Shared) -> Result<Repaired> {
    let mut repaired = Repaired::default();
    let mut failed: BTreeMap<String, (Group, MessageId, String)> = BTreeMap::new();
    let errors = inner.dir(State::Errors);
    for name in errors.names()? {
        let Some((id, _)) = entry_id(State::Errors, &name) else {
            continue;
        };
        let Some(group) = group_of(&id) else {
            continue;
        };
        if failed.contains_key(group.name()) {
            continue;
        }
        let reason = read_sidecar(inner, &name)?
            .and_then(|info| info.reason)
            .unwrap_or_default();
        if !reason.starts_with(CANCELLED) {
            failed.insert(group.name().to_owned(), (group, id, reason));
        }
    }
    for (group, id, reason) in failed.values() {
        repaired.cancelled += cancel_waiting(inner, group, id, reason)?;
    }
    let mut chains: BTreeMap<String, Group> = BTreeMap::new();
    if let Some(chained) = inner.state_dir(State::Chained) {
        for name in chained.names()? {
            if let Some(chain) = entry_id(State::Chained, &name).and_then(|(id, _)| group_of(&id)) {
                chains.insert(chain.name().to_owned(), chain);
            }
        }
    }
    for chain in chains.values() {
        repaired.let_in += usize::from(next_turn(inner, chain)?.is_some());
    }
    Ok(repaired)
}
