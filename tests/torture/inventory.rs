//! Test payloads that prove their own integrity, and an inventory of every file in a
//! set of queues, to check "present exactly once, complete" after a disaster.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The states whose files are messages (or pieces of messages).
pub const STATES: [&str; 7] = [
    "tmp", "incoming", "pending", "deferred", "hold", "chained", "errors",
];

/// The payload of test message `seq`: a header naming its sequence number and length,
/// then filler derived from both, so that a truncated, empty or mixed-up file is
/// recognised without knowing what was sent.
pub fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut bytes = format!("m{seq:010}/{size:09}:").into_bytes();
    let header = bytes.len();
    assert!(size >= header, "payloads are at least {header} bytes");
    bytes.extend((header..size).map(|i| b'a' + ((seq as usize + i) % 26) as u8));
    bytes
}

/// The sequence number of a complete, intact payload, or what is wrong with it.
pub fn parse(bytes: &[u8]) -> Result<u64, String> {
    if bytes.is_empty() {
        return Err("empty (0 bytes)".to_owned());
    }
    let text = std::str::from_utf8(bytes.get(..22).unwrap_or(bytes)).unwrap_or("");
    let (seq, size) = text
        .strip_prefix('m')
        .and_then(|t| t.strip_suffix(':'))
        .and_then(|t| t.split_once('/'))
        .and_then(|(s, n)| Some((s.parse::<u64>().ok()?, n.parse::<usize>().ok()?)))
        .ok_or_else(|| format!("not a test payload ({} bytes)", bytes.len()))?;
    if bytes.len() != size {
        return Err(format!(
            "payload {seq} is {} bytes instead of {size}",
            bytes.len()
        ));
    }
    if bytes != payload(seq, size).as_slice() {
        return Err(format!("payload {seq} is corrupt"));
    }
    Ok(seq)
}

/// One file found in a queue.
#[derive(Debug, Clone)]
pub struct Found {
    pub queue: PathBuf,
    pub state: &'static str,
    pub name: OsString,
    pub size: u64,
    /// The payload's sequence number, or why the file is not an intact payload.
    pub seq: Result<u64, String>,
}

/// Every message file of some queues (`.meta` sidecars and Piper adverts aside).
pub struct Inventory {
    pub found: Vec<Found>,
}

impl Inventory {
    pub fn take(queues: &[&Path]) -> Inventory {
        let mut found = Vec::new();
        for queue in queues {
            for state in STATES {
                let dir = queue.join(state);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let entry = entry.expect("read a queue directory");
                    let name = entry.file_name();
                    if state == "errors" && name.as_bytes().ends_with(b".meta") {
                        continue;
                    }
                    let path = entry.path();
                    let meta = std::fs::symlink_metadata(&path).expect("stat a queue entry");
                    let seq = if meta.is_file() {
                        std::fs::read(&path)
                            .map_err(|e| e.to_string())
                            .and_then(|bytes| parse(&bytes))
                    } else {
                        Err(format!("not a regular file: {:?}", meta.file_type()))
                    };
                    found.push(Found {
                        queue: queue.to_path_buf(),
                        state,
                        name,
                        size: meta.len(),
                        seq,
                    });
                }
            }
        }
        found.sort_by(|a, b| (&a.queue, a.state, &a.name).cmp(&(&b.queue, b.state, &b.name)));
        Inventory { found }
    }

    /// Where payload `seq` is: every file holding it.
    pub fn places(&self, seq: u64) -> Vec<&Found> {
        self.found
            .iter()
            .filter(|f| f.seq.as_ref().ok() == Some(&seq))
            .collect()
    }

    /// Files that are not intact payloads: empty, truncated, corrupt, not regular.
    pub fn damaged(&self) -> Vec<&Found> {
        self.found.iter().filter(|f| f.seq.is_err()).collect()
    }

    /// Payloads present under more than one name, with how many.
    pub fn duplicated(&self) -> BTreeMap<u64, usize> {
        let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
        for f in &self.found {
            if let Ok(seq) = f.seq {
                *seen.entry(seq).or_default() += 1;
            }
        }
        seen.retain(|_, n| *n > 1);
        seen
    }

    /// Files in `state` of any queue.
    pub fn in_state(&self, state: &str) -> Vec<&Found> {
        self.found.iter().filter(|f| f.state == state).collect()
    }

    /// Panics, naming `context` and what is left, unless every state in `states` is
    /// empty in every queue.
    pub fn assert_empty(&self, states: &[&str], context: &str) {
        for state in states {
            let left = self.in_state(state);
            assert!(
                left.is_empty(),
                "{context}: {state}/ is not empty: {left:#?}"
            );
        }
    }

    /// A listing to compare two inventories: queue, state, name and size of each file.
    pub fn listing(&self) -> Vec<String> {
        self.found
            .iter()
            .map(|f| {
                format!(
                    "{}/{}/{} ({} bytes)",
                    f.queue.display(),
                    f.state,
                    f.name.to_string_lossy(),
                    f.size
                )
            })
            .collect()
    }

    /// Panics, listing them, when files are damaged or payloads duplicated.
    pub fn assert_intact(&self, context: &str) {
        let damaged = self.damaged();
        assert!(damaged.is_empty(), "{context}: damaged files: {damaged:#?}");
        let duplicated = self.duplicated();
        assert!(
            duplicated.is_empty(),
            "{context}: payloads under more than one name: {:?}",
            duplicated
                .keys()
                .map(|seq| self.places(*seq))
                .collect::<Vec<_>>()
        );
    }
}
