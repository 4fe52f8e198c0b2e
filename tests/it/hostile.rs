//! A queue whose state directory is a symlink is refused. Entries in `incoming/` that
//! are not messages are in the torture suite (`tests/torture/hostile.rs`), with a
//! running Piper.

use crate::util::{names_in, TestQueue};

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
