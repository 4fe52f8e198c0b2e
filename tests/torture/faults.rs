//! Injected I/O errors (strace `inject=...:error=`): what `dirq push` reports, what it
//! leaves behind, and how a worker behaves while its storage keeps failing.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use dirq::DirectoryQueue;

use crate::inventory::{payload, Inventory};
use crate::support::{self, Figures, Mount, Outcome, Proc};
use crate::Case;

pub const CASE: Case = Case {
    name: "fsync EIO and ENOSPC",
    injects: "EIO or ENOSPC from fdatasync (the message), fsync (the directory, after the \
              rename), write and renameat2, into `dirq push`; on ext4, from sync_file_range \
              (the message, made durable by the journal commit) and the directory fsync",
    invariant: "a typed error naming the operation and path, exit 1, no id printed, nothing in \
                incoming/ or tmp/, and the queue works once the fault is gone",
    run,
};

/// Regression: a worker whose outcomes failed (the message released each time) claimed
/// the same message again at once, thousands of times a second.
pub const BACKOFF_CASE: Case = Case {
    name: "worker backs off on failing storage",
    injects: "EIO from every fsync and fdatasync under a running Piper whose stage emits",
    invariant: "the worker backs off (bounded attempts in a 3 s window) and, once the fault is \
                gone, delivers every message exactly once",
    run: backs_off,
};

/// (system call, errno, which occurrence; 0 for every one).
const INJECTIONS: &[(&str, &str, u32, &str)] = &[
    ("fdatasync", "EIO", 0, "Input/output error"),
    ("fdatasync", "ENOSPC", 0, "No space left on device"),
    ("fsync", "EIO", 1, "Input/output error"),
    ("fsync", "ENOSPC", 0, "No space left on device"),
    ("write", "ENOSPC", 1, "No space left on device"),
    ("renameat2", "EIO", 1, "Input/output error"),
];

/// The same on a journaled filesystem (ext4), where a message file is written back with
/// `sync_file_range` and made durable by the directory's journal commit.
const JOURNALED_INJECTIONS: &[(&str, &str, u32, &str)] = &[
    ("sync_file_range", "EIO", 0, "Input/output error"),
    ("sync_file_range", "ENOSPC", 0, "No space left on device"),
    ("fsync", "EIO", 1, "Input/output error"),
];

fn run(figures: &mut Figures) -> Outcome {
    if let Err(reason) = support::need_root_and(&["strace", "mkfs.ext4"]) {
        return Outcome::Skipped(reason);
    }
    let scratch = support::tempdir();
    for &(call, errno, when, text) in INJECTIONS {
        push_fails_cleanly(scratch.path(), call, errno, when, text);
        figures.add("injections", 1);
    }
    let ext4 = Mount::image("ext4", 64);
    for &(call, errno, when, text) in JOURNALED_INJECTIONS {
        push_fails_cleanly(ext4.path(), call, errno, when, text);
        figures.add("injections", 1);
    }
    figures.set("acknowledged", 0);
    figures.set("left behind", 0);
    Outcome::Passed
}

fn backs_off(figures: &mut Figures) -> Outcome {
    if let Err(reason) = support::need_tools(&["strace"]) {
        return Outcome::Skipped(reason);
    }
    let (attempts, delivered) = worker_backs_off();
    figures.set("failed syncs in 3 s", attempts);
    figures.set("delivered after the fault", delivered);
    figures.set("lost", 0);
    figures.set("duplicated", 0);
    Outcome::Passed
}

/// `dirq push` into a new queue under `base`, with `call` failing with `errno` (at
/// occurrence `when`, or always).
fn push_fails_cleanly(base: &Path, call: &str, errno: &str, when: u32, text: &str) {
    let root = base.join(format!("q-{call}-{errno}-{when}"));
    DirectoryQueue::open(&root).expect("create the queue");
    let input = base.join("message");
    std::fs::write(&input, payload(1, 4000)).expect("write the input file");
    let inject = match when {
        0 => format!("inject={call}:error={errno}"),
        n => format!("inject={call}:error={errno}:when={n}"),
    };
    let context = format!("push with {inject}");
    let out = support::output(
        std::process::Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-e", &inject])
            .arg(env!("CARGO_BIN_EXE_dirq"))
            .arg("push")
            .arg(&root)
            .arg(&input),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{context}: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "{context}: an id was printed: {out:?}"
    );
    assert!(
        stderr.contains(text) && stderr.contains("failed to ") && stderr.contains(support::path_str(&root)),
        "{context}: the error does not name the operation, the queue's path and the cause: {stderr}"
    );
    let inventory = Inventory::take(&[&root]);
    assert!(
        inventory.found.is_empty(),
        "{context}: left behind: {:#?}",
        inventory.found
    );
    println!("{context}: {}", stderr.trim());
    // The queue works once the fault is gone.
    support::sh(
        env!("CARGO_BIN_EXE_dirq"),
        &["push", support::path_str(&root), support::path_str(&input)],
    );
}

/// A Piper whose every sync fails: it must not spin. Returns how many outcomes it
/// attempted in a 3 s window, and how many messages were delivered once the fault was
/// gone.
fn worker_backs_off() -> (usize, usize) {
    const MESSAGES: u64 = 20;
    let dir = support::tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let queue = DirectoryQueue::open(&a).expect("create a");
    DirectoryQueue::open(&b).expect("create b");
    for seq in 0..MESSAGES {
        queue.enqueue(payload(seq, 300)).expect("enqueue");
    }
    let trace = dir.path().join("trace");
    // The stage emits a copy (an enqueue into b, whose file sync fails) and commits:
    // the outcome fails, the message is released, and without a back-off the worker
    // would claim it again at once, forever.
    let stage_args = [
        support::path_str(&a),
        support::path_str(&b),
        "1",
        "1000",
        "emit",
    ];
    let mut worker = Proc::spawn(
        support::role_under_strace(&[
            "-f",
            "-o",
            support::path_str(&trace),
            "-e",
            "trace=fdatasync,fsync",
            "-e",
            "inject=fdatasync,fsync:error=EIO",
        ])
        .arg("stage")
        .args(stage_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null()),
    );
    let failed_syncs = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("EIO"))
            .count()
    };
    support::wait_until(
        Duration::from_secs(30),
        "the worker to hit the fault",
        || failed_syncs() >= 3,
    );
    // A measurement window, not a synchronisation: a spinning worker fails thousands
    // of syncs in it, one that backs off (10 ms, doubling, up to 5 s) about ten.
    let before = failed_syncs();
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let attempts = failed_syncs() - before;
    assert!(
        attempts <= 100,
        "the worker spun on the failing storage: {attempts} failed syncs in 3 s"
    );
    support::kill_traced(&mut worker);

    // The fault is gone: a fresh worker delivers everything, each message once.
    let mut worker = Proc::spawn(
        support::role(&["stage"])
            .args(stage_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    support::wait_until(Duration::from_secs(60), "the queue to drain", || {
        Inventory::take(&[&b]).found.len() as u64 >= MESSAGES
            && DirectoryQueue::open(&a)
                .and_then(|q| q.counts())
                .is_ok_and(|c| c.unfinished() == 0)
    });
    support::send(worker.id(), rustix::process::Signal::TERM);
    assert!(worker.0.wait().expect("wait for the worker").success());
    let inventory = Inventory::take(&[&a, &b]);
    inventory.assert_intact("after the fault");
    for seq in 0..MESSAGES {
        let places: Vec<&Path> = inventory
            .places(seq)
            .iter()
            .map(|f| f.queue.as_path())
            .collect();
        assert_eq!(places, [b.as_path()], "payload {seq}");
    }
    (attempts, MESSAGES as usize)
}
