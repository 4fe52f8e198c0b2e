//! Permission denied (an unprivileged user, through `setpriv`) and immutable
//! directories and files (`chattr +i`).

use std::path::Path;
use std::process::Command;

use dirq::DirectoryQueue;

use crate::inventory::{payload, Inventory};
use crate::support::{self, Figures, Mount, Outcome};
use crate::Case;

pub const CASE: Case = Case {
    name: "permission denied and immutable",
    injects: "push, take and status as uid 65534 (setpriv) on a root-owned queue; `chattr +i` \
              on incoming/, on pending/ and on one message",
    invariant: "each refusal is exit 1 with an error naming the operation, the directory or \
                file and the cause; no message moves or is lost; reading (`status`) works; all \
                works again once the attribute is removed",
    run,
};

const NOBODY: &[&str] = &["--reuid=65534", "--regid=65534", "--clear-groups"];

fn run(figures: &mut Figures) -> Outcome {
    if let Err(reason) = support::need_root_and(&["setpriv", "chattr", "mkfs.ext4"]) {
        return Outcome::Skipped(reason);
    }
    // Room for a copy of the binary: with every feature and release debug info it is
    // about 80 MB (it outgrew a 64 MiB image when serve and the bridge came).
    let fs = Mount::public_image("ext4", 256);
    let root = fs.path().join("q");
    let queue = DirectoryQueue::open(&root).expect("create the queue");
    for seq in 0..3 {
        queue.enqueue(payload(seq, 500)).expect("enqueue");
    }
    // A copy of the binary that the unprivileged user can run, and an input it can read.
    let dirq = fs.path().join("dirq");
    std::fs::copy(env!("CARGO_BIN_EXE_dirq"), &dirq).expect("copy dirq");
    let input = fs.path().join("input");
    std::fs::write(&input, payload(9, 500)).expect("write input");
    let before = Inventory::take(&[&root]).listing();
    let q = support::path_str(&root);
    let input = support::path_str(&input);
    let incoming = root.join("incoming");
    let pending = root.join("pending");
    let tmp = root.join("tmp");

    let as_nobody = |args: &[&str]| {
        let mut command = Command::new("setpriv");
        command.args(NOBODY).arg(&dirq).args(args);
        command
    };
    refused(
        &mut as_nobody(&["push", q, input]),
        "Permission denied",
        &tmp,
        "create",
    );
    refused(
        &mut as_nobody(&["take", q]),
        "Permission denied",
        &incoming,
        "claim",
    );
    let status = support::output(&mut as_nobody(&["status", q]));
    assert!(
        status.status.success(),
        "status as an unprivileged user: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    figures.add("refusals", 2);

    let dirq_root = |args: &[&str]| {
        let mut command = Command::new(&dirq);
        command.args(args);
        command
    };
    for (immutable, op, push_fails) in [(&incoming, "claim", true), (&pending, "claim", false)] {
        chattr("+i", immutable);
        if push_fails {
            refused(
                &mut dirq_root(&["push", q, input]),
                "Operation not permitted",
                immutable,
                "publish",
            );
            figures.add("refusals", 1);
        }
        refused(
            &mut dirq_root(&["take", q]),
            "Operation not permitted",
            &incoming,
            op,
        );
        figures.add("refusals", 1);
        chattr("-i", immutable);
    }
    // One immutable message: claiming it is refused, naming it.
    let oldest = queue
        .ids(dirq::State::Incoming)
        .expect("ids")
        .filter_map(Result::ok)
        .min()
        .expect("a message");
    let message = incoming.join(oldest.as_os_str());
    chattr("+i", &message);
    refused(
        &mut dirq_root(&["take", q]),
        "Operation not permitted",
        &message,
        "claim",
    );
    figures.add("refusals", 1);
    chattr("-i", &message);

    assert_eq!(
        Inventory::take(&[&root]).listing(),
        before,
        "messages moved"
    );
    // Everything works again.
    let taken = support::sh(support::path_str(&dirq), &["take", q, "-n", "3"]);
    assert_eq!(taken.lines().count(), 3, "{taken}");
    support::sh(support::path_str(&dirq), &["push", q, input]);
    let inventory = Inventory::take(&[&root]);
    inventory.assert_intact("after the attributes were removed");
    assert_eq!(inventory.found.len(), 1);
    figures.set("lost", 0);
    Outcome::Passed
}

/// Runs `command`, which must fail with exit 1 and an error that names `operation`,
/// `path` (or a file in it) and `cause`.
fn refused(command: &mut Command, cause: &str, path: &Path, operation: &str) {
    let out = support::output(command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("{command:?}");
    assert_eq!(out.status.code(), Some(1), "{context}: {stderr}");
    assert!(out.stdout.is_empty(), "{context} acknowledged something");
    assert!(
        stderr.contains(cause)
            && stderr.contains(&format!("failed to {operation}"))
            && stderr.contains(support::path_str(path)),
        "{context}: the error does not name {operation}, {} and {cause}: {stderr}",
        path.display()
    );
    println!("refused: {}", stderr.trim());
}

fn chattr(flag: &str, path: &Path) {
    support::sh("chattr", &[flag, support::path_str(path)]);
}
