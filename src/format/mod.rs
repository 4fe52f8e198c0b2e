//! The on-disk format: what a queue's directories and files mean, independent of
//! how they are read or written.
//!
//! `state` names the state directories (the only place their names are spelled),
//! `id` the message ids that are their file names, `deferred` the names in
//! `deferred/`, `meta` the failure sidecar `errors/<id>.meta`, and `attempts` the
//! attempt count kept in a message's extended attributes, `history` the lines and
//! file names of the outcome journal `history/` (not a state), `seen` the names in
//! `seen/`, the record of recently finished ids (not a state either). This layer imports `sys`
//! and `error` only.

pub(crate) mod attempts;
pub(crate) mod deferred;
pub(crate) mod group;
pub(crate) mod history;
pub(crate) mod id;
pub(crate) mod meta;
pub(crate) mod seen;
pub(crate) mod state;
