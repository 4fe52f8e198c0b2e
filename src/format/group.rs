//! Groups of messages, named in the ids of their members.
//!
//! A member's id carries its group before Mentat's `.msg` suffix:
//! `<time>.<host>.<pid>.<tag>.group-NAME.msg` for a group whose members run in any
//! order, `....chain-NAME.msg` for an ordered group (a chain), whose members run one
//! at a time in id order, that is in the order they were enqueued. Kept in the name,
//! the group travels with the message through every state and every queue of a
//! pipeline, is seen by `ls`, and costs no system call to look up.

use std::fmt;

/// Longest group name.
pub(crate) const MAX_NAME_LEN: usize = 64;

const GROUP_TAG: &str = "group-";
const CHAIN_TAG: &str = "chain-";
const SUFFIX: &str = ".msg";

/// A named group of messages: when one member fails, the members still waiting are
/// cancelled (moved to `errors/`); in an ordered group each member also waits for the
/// one before it. See [`DirectoryQueue::enqueue_in_group`](crate::DirectoryQueue::enqueue_in_group).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group {
    name: String,
    ordered: bool,
}

/// A group name that cannot be used; see [`Group::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid group name {name:?}: {reason}")]
pub struct InvalidGroup {
    name: String,
    reason: &'static str,
}

impl Group {
    /// A group whose members may run in any order, at the same time.
    ///
    /// # Errors
    ///
    /// [`InvalidGroup`] when `name` is empty, longer than 64 bytes, or has a character
    /// other than ASCII letters, digits, `-` and `_`.
    pub fn new(name: impl Into<String>) -> Result<Group, InvalidGroup> {
        Group::checked(name.into(), false)
    }

    /// An ordered group (a chain): a member is claimable only once the member before
    /// it (in enqueue order) has been committed or forwarded; until then it waits in
    /// `chained/`.
    ///
    /// # Errors
    ///
    /// As [`Group::new`].
    pub fn ordered(name: impl Into<String>) -> Result<Group, InvalidGroup> {
        Group::checked(name.into(), true)
    }

    fn checked(name: String, ordered: bool) -> Result<Group, InvalidGroup> {
        match check_name(&name) {
            Ok(()) => Ok(Group { name, ordered }),
            Err(reason) => Err(InvalidGroup { name, reason }),
        }
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether its members run one at a time, in order.
    pub fn is_ordered(&self) -> bool {
        self.ordered
    }

    /// The group a message id names, if any.
    pub(crate) fn of(id: &[u8]) -> Option<Group> {
        let stem = id.strip_suffix(SUFFIX.as_bytes())?;
        let start = stem.iter().rposition(|&b| b == b'.')? + 1;
        let last = std::str::from_utf8(&stem[start..]).ok()?;
        let (name, ordered) = match (last.strip_prefix(GROUP_TAG), last.strip_prefix(CHAIN_TAG)) {
            (Some(name), _) => (name, false),
            (_, Some(name)) => (name, true),
            _ => return None,
        };
        check_name(name).ok()?;
        Some(Group {
            name: name.to_owned(),
            ordered,
        })
    }

    /// `id` (a generated id, ending in `.msg`) made into an id of this group.
    pub(crate) fn member_name(&self, id: &str) -> String {
        let stem = id.strip_suffix(SUFFIX).unwrap_or(id);
        let tag = if self.ordered { CHAIN_TAG } else { GROUP_TAG };
        format!("{stem}.{tag}{}{SUFFIX}", self.name)
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("a group name must not be empty")
    } else if name.len() > MAX_NAME_LEN {
        Err("a group name must be at most 64 bytes long")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Err("a group name may only have ASCII letters, digits, - and _")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_ids() {
        let id = "1763797920.123456789.host.42.9f3a1c2b.msg";
        for group in [
            Group::new("nightly-1").unwrap(),
            Group::ordered("etl_2").unwrap(),
        ] {
            let member = group.member_name(id);
            assert!(member.starts_with("1763797920.123456789.host.42.9f3a1c2b."));
            assert!(member.ends_with(".msg"));
            assert_eq!(Group::of(member.as_bytes()), Some(group));
        }
        assert_eq!(Group::of(id.as_bytes()), None);
        assert_eq!(Group::of(b"x.group-.msg"), None);
        assert_eq!(Group::of(b"x.group-a b.msg"), None);
        assert_eq!(Group::of(b"x.group-ok"), None, "no .msg suffix");
        assert_eq!(Group::of(b"group-ok.msg"), None, "no field before");
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", "a/b", "a.b", "..", "é", &"x".repeat(65)] {
            assert!(Group::new(bad).is_err(), "{bad:?}");
        }
        assert!(Group::ordered("x".repeat(64)).is_ok());
    }
}
