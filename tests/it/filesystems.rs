//! State directories on other filesystems, forwards across filesystems. Tests that
//! mount a tmpfs need root and are skipped otherwise. Full disks are in the torture
//! suite (`tests/torture/full_disk.rs`).

use dirq::{DirectoryQueue, Error, State};

use crate::util::{names_in, skip, tempdir, TestQueue, Tmpfs};

#[test]
fn state_directory_on_another_filesystem_is_refused() {
    let Some(fs) = Tmpfs::mount("size=1m") else {
        skip(
            "state_directory_on_another_filesystem_is_refused",
            "needs root to mount a tmpfs",
        );
        return;
    };
    let dir = tempdir();
    let root = dir.path().join("q");
    for state in ["tmp", "incoming", "pending", "errors"] {
        std::fs::create_dir_all(root.join(state)).unwrap();
    }
    let status = std::process::Command::new("mount")
        .args(["--bind"])
        .arg(fs.path())
        .arg(root.join("pending"))
        .status()
        .unwrap();
    assert!(status.success());
    let result = DirectoryQueue::open(&root);
    let _ = std::process::Command::new("umount")
        .arg(root.join("pending"))
        .status();
    match result {
        Err(Error::Layout { path, reason }) => {
            assert_eq!(path, root.join("pending"));
            assert!(reason.contains("different filesystem"), "{reason}");
        }
        other => panic!("expected a layout error, got {other:?}"),
    }
}

#[test]
fn forward_across_filesystems_copies_then_deletes() {
    // /dev/shm is a tmpfs on Linux; the test queue is on the build's disk.
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        skip(
            "forward_across_filesystems_copies_then_deletes",
            "no /dev/shm",
        );
        return;
    }
    let t = TestQueue::new();
    let other = tempfile::tempdir_in(shm).unwrap();
    let next = DirectoryQueue::open(other.path().join("next")).unwrap();
    if std::fs::metadata(next.root())
        .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
        .unwrap()
        == std::fs::metadata(t.root())
            .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
            .unwrap()
    {
        skip(
            "forward_across_filesystems_copies_then_deletes",
            "/dev/shm is on the same filesystem",
        );
        return;
    }
    let id = t.queue.enqueue(b"travelling").unwrap();
    t.queue
        .try_claim()
        .unwrap()
        .unwrap()
        .forward(&next)
        .unwrap();
    assert!(t.names(State::Pending).is_empty());
    assert!(names_in(next.path(State::Tmp)).is_empty());
    let message = next.try_claim().unwrap().unwrap();
    assert_eq!(message.id(), &id);
    assert_eq!(message.bytes().unwrap(), b"travelling");
    message.commit().unwrap();
}
