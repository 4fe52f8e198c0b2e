//! What the benches share: scratch directories under the target directory, and queues.

use std::fs;
use std::path::{Path, PathBuf};

use dirq::{DirectoryQueue, Durability};

/// An empty directory `target/tmp/bench/<name>` (emptied if a previous run left it).
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("bench")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("bench directory");
    dir
}

/// A queue at `dir`, created if missing.
pub fn queue(dir: &Path, durability: Durability) -> DirectoryQueue {
    DirectoryQueue::builder(dir)
        .durability(durability)
        .open()
        .expect("open queue")
}
