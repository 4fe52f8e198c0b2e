//! The state directories of a queue: the on-disk protocol's vocabulary, written once.

use std::ffi::OsStr;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use super::id::{MessageId, META_SUFFIX};

/// A state directory of a queue. A message's state is the directory it is in.
///
/// ```text
///            enqueue                 claim                commit
///   tmp/ ───────────────▶ incoming/ ───────▶ pending/ ──────────────▶ (deleted)
///     │ enqueue_at         ▲ ▲ ▲ ▲            │ │ │ forward
///     └──▶ deferred/ ─due──┘ │ │ └─ release ──┘ │ └─────────▶ next queue's incoming/
///             ▲              │ │   or recover   │ fail, or retry after the last attempt
///             └─── retry ────┼─┼────────────────┤
///   hold/ ◀── hold ──────────┘ │                ▼
///         ─── unhold ─────────▶┘             errors/
///   chained/ ── its turn in an ordered group ──▶ incoming/
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum State {
    /// `tmp/`: files being written. Never read by consumers.
    Tmp,
    /// `incoming/`: complete messages, ready to be claimed. Nothing else ever appears here.
    Incoming,
    /// `pending/`: claimed messages, each owned by the process holding its lock.
    Pending,
    /// `errors/`: failed or quarantined messages, each with an `<id>.meta` JSON sidecar.
    Errors,
    /// `deferred/`: messages waiting for a time (a retry's backoff, a delayed
    /// delivery), named `<not-before>@<id>`. Not a Mentat directory.
    Deferred,
    /// `hold/`: messages put on hold by an operator; never claimed until released.
    /// Not a Mentat directory.
    Hold,
    /// `chained/`: members of an ordered group waiting for the member before them to be
    /// committed or forwarded; each moves to `incoming/` in its turn. Not a Mentat
    /// directory.
    Chained,
}

impl State {
    /// Every state, in the order a message normally passes through them.
    pub const ALL: [State; 7] = [
        State::Tmp,
        State::Incoming,
        State::Pending,
        State::Errors,
        State::Deferred,
        State::Hold,
        State::Chained,
    ];

    /// The four states of Mentat's protocol, which every queue has.
    pub(crate) const MENTAT: [State; 4] =
        [State::Tmp, State::Incoming, State::Pending, State::Errors];

    /// The directory name (`"incoming"`, ...), as Mentat spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Tmp => "tmp",
            State::Incoming => "incoming",
            State::Pending => "pending",
            State::Errors => "errors",
            State::Deferred => "deferred",
            State::Hold => "hold",
            State::Chained => "chained",
        }
    }

    /// Index into per-state arrays.
    pub(crate) fn index(self) -> usize {
        match self {
            State::Tmp => 0,
            State::Incoming => 1,
            State::Pending => 2,
            State::Errors => 3,
            State::Deferred => 4,
            State::Hold => 5,
            State::Chained => 6,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error returned when parsing an unknown state name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseStateError(String);

impl fmt::Display for ParseStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown queue state {:?}: expected one of tmp, incoming, pending, errors, deferred, hold, chained",
            self.0
        )
    }
}

impl std::error::Error for ParseStateError {}

impl FromStr for State {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<State, ParseStateError> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseStateError(s.to_owned()))
    }
}

/// The message id (and, in `deferred/`, the due time) of a listed name in `state`.
pub(crate) fn entry_id(state: State, name: &OsStr) -> Option<(MessageId, Option<SystemTime>)> {
    if !is_listed(state, name) {
        return None;
    }
    if state == State::Deferred {
        let (when, id) = super::deferred::parse_deferred_name(name)?;
        return Some((id, Some(when)));
    }
    Some((MessageId::from_name(name), None))
}

/// Whether `name` is listed and counted in `state`.
pub(crate) fn is_listed(state: State, name: &OsStr) -> bool {
    let bytes = name.as_encoded_bytes();
    match state {
        State::Tmp => true,
        State::Errors => !MessageId::is_hidden(bytes) && !bytes.ends_with(META_SUFFIX.as_bytes()),
        _ => !MessageId::is_hidden(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for state in State::ALL {
            assert_eq!(state.as_str().parse::<State>().unwrap(), state);
            assert_eq!(State::ALL[state.index()], state);
        }
        assert!("done".parse::<State>().is_err());
    }
}
