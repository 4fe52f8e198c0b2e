//! Entries in `incoming/` that are not messages: never followed, read or blocked on.

use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;
use std::time::Duration;

use dirq::State;

use crate::util::{names_in, TestQueue};

#[test]
fn planted_entries_are_quarantined_and_messages_flow() {
    let t = TestQueue::new();
    let incoming = t.path(State::Incoming);
    let outside = t.dir.path().join("outside-secret");
    std::fs::write(&outside, b"do not touch").unwrap();
    let hardlink_target = t.dir.path().join("outside-linked");
    std::fs::write(&hardlink_target, b"linked content").unwrap();

    t.queue.enqueue(b"before").unwrap();
    std::os::unix::fs::symlink(&outside, incoming.join("symlink")).unwrap();
    mkfifo(&incoming.join("fifo"));
    std::fs::create_dir(incoming.join("subdir")).unwrap();
    std::fs::write(incoming.join("subdir/inner"), b"inner").unwrap();
    std::fs::hard_link(&hardlink_target, incoming.join("hardlink")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(incoming.join("socket")).unwrap();
    std::fs::write(incoming.join("empty"), b"").unwrap();
    t.queue.enqueue(b"after").unwrap();

    // Claim everything on another thread: if anything blocked (a FIFO opened for
    // reading without O_NONBLOCK waits for a writer), the deadline below catches it.
    let queue = t.queue.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bodies = Vec::new();
        while let Some(message) = queue.try_claim().unwrap() {
            bodies.push(message.bytes().unwrap());
            message.commit().unwrap();
        }
        tx.send(bodies).unwrap();
    });
    let bodies = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("claiming must not block on hostile entries");
    assert_eq!(bodies, vec![b"before".to_vec(), b"after".to_vec()]);

    // The outside files are untouched.
    assert_eq!(std::fs::read(&outside).unwrap(), b"do not touch");
    assert_eq!(std::fs::read(&hardlink_target).unwrap(), b"linked content");
    // The hard link was moved, not read or deleted: still two links.
    assert_eq!(std::fs::metadata(&hardlink_target).unwrap().nlink(), 2);

    assert!(names_in(&incoming).is_empty());
    let errors = t.path(State::Errors);
    for (name, reason) in [
        ("symlink", "symbolic link"),
        ("fifo", "FIFO"),
        ("subdir", "directory"),
        ("hardlink", "hard-linked"),
        ("socket", "socket"),
        ("empty", "empty message"),
    ] {
        assert!(
            std::fs::symlink_metadata(errors.join(name)).is_ok(),
            "{name} should be in errors/"
        );
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(errors.join(format!("{name}.meta"))).unwrap())
                .unwrap();
        let got = meta["reason"].as_str().unwrap();
        assert!(
            got.contains(reason),
            "{name}: reason {got:?} should mention {reason:?}"
        );
        assert_eq!(meta["from"], "incoming");
    }
    // The symlink in errors/ still points where it did; nothing followed it.
    assert_eq!(std::fs::read_link(errors.join("symlink")).unwrap(), outside);
    assert_eq!(t.queue.claim_stats().quarantined, 6);
}

#[test]
fn symlinked_state_directory_is_refused() {
    let t = TestQueue::new();
    let elsewhere = t.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let root = t.dir.path().join("swapped");
    std::fs::create_dir(&root).unwrap();
    for state in ["tmp", "pending", "errors"] {
        std::fs::create_dir(root.join(state)).unwrap();
    }
    std::os::unix::fs::symlink(&elsewhere, root.join("incoming")).unwrap();
    let err = dirq::DirectoryQueue::open(&root).unwrap_err();
    assert!(matches!(err, dirq::Error::Layout { .. }), "{err:?}");
    assert!(err.to_string().contains("incoming"), "{err}");
    assert!(names_in(&elsewhere).is_empty());
}

fn mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo failed");
}
