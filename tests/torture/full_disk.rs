//! Running out of space and out of inodes, on small tmpfs mounts.

use std::io;

use dirq::{DirectoryQueue, State};

use crate::inventory::{payload, Inventory};
use crate::support::{self, Figures, Mount, Outcome};
use crate::Case;

pub const CASE: Case = Case {
    name: "disk full and inode exhaustion",
    injects: "producers fill a tmpfs of `size=1m`, and one of `nr_inodes=48`; then the mount \
              is grown (`remount`)",
    invariant: "a clear ENOSPC error naming the operation and path, nothing partial left; \
                consumers keep claiming, committing and forwarding on the full filesystem; \
                producers work again once space returns; every accepted message exactly once",
    run,
};

fn run(figures: &mut Figures) -> Outcome {
    if let Err(reason) = support::need_root_and(&["mount"]) {
        return Outcome::Skipped(reason);
    }
    for (what, options, grown, size) in [
        ("space", "size=1m,nr_inodes=10000", "size=16m", 8192),
        ("inodes", "size=64m,nr_inodes=48", "nr_inodes=10000", 300),
    ] {
        let accepted = exhaust(what, options, grown, size);
        figures.set(&format!("accepted until out of {what}"), accepted);
    }
    figures.set("lost", 0);
    figures.set("duplicated", 0);
    Outcome::Passed
}

/// Fills a tmpfs mounted with `options`, checks what full means, grows it with
/// `grown`, and checks that everything accepted is there once. Returns how many
/// messages were accepted before it was full.
fn exhaust(what: &str, options: &str, grown: &str, size: usize) -> u64 {
    let fs = Mount::tmpfs(options);
    let (a_path, b_path) = (fs.path().join("a"), fs.path().join("b"));
    let a = DirectoryQueue::open(&a_path).expect("create a");
    let b = DirectoryQueue::open(&b_path).expect("create b");
    let mut seq: u64 = 0;
    let error = loop {
        match a.enqueue(payload(seq, size)) {
            Ok(_) => seq += 1,
            Err(e) => break e,
        }
        assert!(seq < 10_000, "{what}: the filesystem never filled up");
    };
    let accepted = seq;
    assert!(
        accepted > 3,
        "{what}: too few messages fit to test anything"
    );
    assert_eq!(
        error.kind(),
        io::ErrorKind::StorageFull,
        "{what}: {error:?}"
    );
    assert!(
        error.operation().is_some(),
        "{what}: no operation in {error:?}"
    );
    let path = error.path().expect("the error names a path");
    assert!(path.starts_with(&a_path), "{what}: {}", path.display());
    println!("{what}: full after {accepted} messages: {error}");

    // The command line says so clearly and leaves nothing behind.
    let input = fs.beside("input");
    std::fs::write(&input, payload(99_999, size)).expect("write input");
    let out = support::output(support::dirq().arg("push").arg(&a_path).arg(&input));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(
        stderr.contains("No space left on device")
            && stderr.contains("failed to ")
            && stderr.contains(support::path_str(&a_path)),
        "{what}: unclear error: {stderr}"
    );
    assert!(out.stdout.is_empty(), "{what}: push printed an id");
    let inventory = Inventory::take(&[&a_path, &b_path]);
    inventory.assert_intact(what);
    assert!(
        inventory.in_state("tmp").is_empty(),
        "{what}: tmp/ is not empty"
    );
    assert_eq!(inventory.in_state("incoming").len() as u64, accepted);

    // Consumers keep draining the full filesystem: forwards are renames, commits free
    // space. A failure needs a sidecar, which may not fit: then the message comes back.
    for _ in 0..2 {
        let m = a
            .try_claim()
            .expect("claim on a full fs")
            .expect("a message");
        m.forward(&b).expect("forward on a full fs");
    }
    let m = a.try_claim().expect("claim").expect("a message");
    if let Err(e) = m.fail("failed on a full filesystem") {
        let (error, message) = e.into_parts();
        println!("{what}: fail on a full filesystem: {error}");
        message
            .expect("a failure that did not happen hands the message back")
            .release()
            .expect("release on a full fs");
    }
    let taken = support::sh(
        env!("CARGO_BIN_EXE_dirq"),
        &["take", support::path_str(&b_path), "-n", "2"],
    );
    assert_eq!(
        taken.lines().count(),
        2,
        "{what}: take on a full fs: {taken:?}"
    );

    // Space returns: producers go on.
    fs.remount(grown);
    for extra in 0..5 {
        a.enqueue(payload(accepted + extra, size))
            .unwrap_or_else(|e| panic!("{what}: enqueue after {grown}: {e}"));
    }
    let total = accepted + 5;
    while let Some(m) = a.try_claim().expect("claim") {
        m.forward(&b).expect("forward");
    }
    let inventory = Inventory::take(&[&a_path, &b_path]);
    inventory.assert_intact(what);
    let mut committed = 0;
    for seq in 0..total {
        match inventory.places(seq).as_slice() {
            [] => committed += 1,
            [one] => assert!(
                one.state == "incoming" || one.state == "errors",
                "{what}: payload {seq} in {}/{}",
                one.queue.display(),
                one.state
            ),
            many => panic!("{what}: payload {seq} is in {} places", many.len()),
        }
    }
    assert_eq!(committed, 2, "{what}: only the two taken messages are gone");
    let left = b.count(State::Incoming).expect("count") + a.count(State::Errors).expect("count");
    assert_eq!(left as u64, total - 2, "{what}: messages after draining");
    accepted
}
