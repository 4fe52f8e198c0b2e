//! Odd names and entries that are not messages, under a running Piper; and a state
//! directory swapped for a symlink under it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use dirq::{DirectoryQueue, MessageId, State};

use crate::inventory::{payload, Inventory};
use crate::support::{self, Figures, Outcome, Proc};
use crate::Case;

pub const CASE: Case = Case {
    name: "odd and hostile entries",
    injects: "names with a newline, 0xff bytes, 200 and 255 bytes, a leading dot or a `.meta` \
              suffix; a symlink (live and dangling), hard link, FIFO, socket, device, \
              subdirectory and empty file in incoming/; incoming/ replaced by a symlink under \
              a running Piper",
    invariant: "valid odd names flow through claim, retry, fail, requeue and forward unchanged; \
                everything else is quarantined into errors/ with a reason (never followed, \
                opened for reading or blocked on); a swapped incoming/ is refused by every new \
                process and never followed by the running one",
    run,
};

/// Regression: a 255-byte name (valid for the filesystem) was claimed as a message, but
/// failing it needs `<name>.meta` and retrying it `<time>@<name>`, both too long: the
/// message could never leave, and the worker retried it forever.
pub const LONG_NAME_CASE: Case = Case {
    name: "255-byte name cannot wedge a worker",
    injects: "a file with a 255-byte name in incoming/ whose stage fails it",
    invariant: "it is quarantined into errors/ under a shortened name with a reason, at once",
    run: long_name,
};

fn long_name(figures: &mut Figures) -> Outcome {
    let dir = support::tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let queue = DirectoryQueue::open(&a).expect("create a");
    DirectoryQueue::open(&b).expect("create b");
    std::fs::write(a.join("incoming").join(name(&[b'n'; 255])), "poison-error").expect("plant");
    let mut piper = Proc::spawn(
        support::role(&[
            "stage",
            support::path_str(&a),
            support::path_str(&b),
            "1",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null()),
    );
    support::wait_until(
        Duration::from_secs(30),
        "the long name to leave incoming/",
        || {
            queue
                .counts()
                .is_ok_and(|c| c.unfinished() == 0 && c.errors == 1)
        },
    );
    support::send(piper.id(), rustix::process::Signal::TERM);
    assert!(piper.0.wait().expect("wait").success());
    let failed = dirq::admin::list(&queue, State::Errors).expect("list errors/");
    let reason = failed[0]
        .failure
        .as_ref()
        .and_then(|f| f.reason.clone())
        .unwrap_or_default();
    assert!(reason.contains("at most 200 bytes"), "{reason}");
    assert_eq!(failed[0].id.as_os_str().len(), 200);
    figures.set("quarantined", 1);
    Outcome::Passed
}

fn run(figures: &mut Figures) -> Outcome {
    if !support::is_root() {
        // Only the device node needs root; the rest would run, but a partial run would
        // report figures that are not comparable.
        return Outcome::Skipped("needs root (mknod)".to_owned());
    }
    let dir = support::tempdir();
    quarantined_under_a_piper(dir.path(), figures);
    odd_names_through_the_lifecycle(dir.path(), figures);
    swapped_incoming(dir.path(), figures);
    Outcome::Passed
}

fn name(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}

/// Valid odd names: (name, payload). They must reach the next queue unchanged.
fn odd_names() -> Vec<(OsString, u64)> {
    vec![
        (name(b"odd\nnewline.msg"), 1),
        (name(b"odd-\xff\xfe.msg"), 2),
        (name(&[b'x'; 200]), 3),
        (name(b"tab\there \\ and \x1b[31mescape"), 7),
    ]
}

fn quarantined_under_a_piper(dir: &Path, figures: &mut Figures) {
    let (a, b) = (dir.join("a"), dir.join("b"));
    let queue = DirectoryQueue::open(&a).expect("create a");
    DirectoryQueue::open(&b).expect("create b");
    let incoming = a.join("incoming");
    let outside = dir.join("outside-secret");
    std::fs::write(&outside, b"do not touch").expect("write");
    let linked = dir.join("outside-linked");
    std::fs::write(&linked, payload(20, 300)).expect("write");

    for (name, seq) in odd_names() {
        std::fs::write(incoming.join(name), payload(seq, 300)).expect("plant");
    }
    // Not messages: (entry name, what its errors/ reason must say).
    let plant = |name: &[u8], seq: u64| {
        std::fs::write(incoming.join(self::name(name)), payload(seq, 300)).expect("plant")
    };
    plant(&[b'y'; 255], 4);
    plant(b"z.meta", 5);
    plant(b".hidden-partial", 6);
    std::os::unix::fs::symlink(&outside, incoming.join("symlink")).expect("symlink");
    std::os::unix::fs::symlink(dir.join("nowhere"), incoming.join("dangling")).expect("symlink");
    std::fs::hard_link(&linked, incoming.join("hardlink")).expect("hard link");
    support::sh("mkfifo", &[support::path_str(&incoming.join("fifo"))]);
    support::sh(
        "mknod",
        &[support::path_str(&incoming.join("device")), "c", "1", "3"],
    );
    let _socket =
        std::os::unix::net::UnixListener::bind(incoming.join("socket")).expect("bind a socket");
    std::fs::create_dir(incoming.join("subdir")).expect("mkdir");
    std::fs::write(incoming.join("subdir/inner"), b"inner").expect("write");
    std::fs::write(incoming.join("empty"), b"").expect("write");
    for seq in 10..16 {
        queue.enqueue(payload(seq, 300)).expect("enqueue");
    }

    let mut piper = Proc::spawn(
        support::role(&[
            "stage",
            support::path_str(&a),
            support::path_str(&b),
            "2",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null()),
    );
    // Blocking on the FIFO or the device, or following a link, would stop this.
    support::wait_until(
        Duration::from_secs(60),
        "the Piper to clear incoming/",
        || {
            let names: Vec<_> = std::fs::read_dir(&incoming)
                .expect("read incoming")
                .map(|e| e.expect("entry").file_name())
                .collect();
            names == [OsString::from(".hidden-partial")]
                && queue.counts().is_ok_and(|c| c.pending == 0)
        },
    );
    support::send(piper.id(), rustix::process::Signal::TERM);
    assert!(
        piper.0.wait().expect("wait").success(),
        "the Piper did not stop cleanly"
    );

    // The hidden file nobody finished goes when recovery says it is stale.
    let report = DirectoryQueue::builder(&a)
        .tmp_max_age(Duration::ZERO)
        .open()
        .and_then(|q| q.recover())
        .expect("recover");
    assert_eq!(report.quarantined, 1, "{report:?}");

    // Valid names arrived unchanged.
    for (name, seq) in odd_names().into_iter().chain([(OsString::new(), 10)]) {
        let found = Inventory::take(&[&b]);
        let places = found.places(seq);
        assert_eq!(places.len(), 1, "payload {seq} in b");
        if !name.is_empty() {
            assert_eq!(places[0].name, name, "payload {seq} was renamed");
        }
    }
    // Everything else is in errors/, each with a reason, none followed or read.
    let errors = a.join("errors");
    let reasons = [
        (&b"symlink"[..], "symbolic link"),
        (b"dangling", "symbolic link"),
        (b"hardlink", "hard-linked"),
        (b"fifo", "FIFO"),
        (b"device", "device"),
        (b"socket", "socket"),
        (b"subdir", "directory"),
        (b"empty", "empty message"),
        (b"z.meta~", "not a message name"),
        (b"hidden~.hidden-partial", "hidden file"),
    ];
    let mut cut = vec![b'y'; 196];
    cut.extend_from_slice(b"~cut");
    for (entry, reason) in reasons
        .iter()
        .copied()
        .chain([(cut.as_slice(), "at most 200 bytes")])
    {
        let entry = name(entry);
        let mut sidecar = entry.clone();
        sidecar.push(".meta");
        let meta: serde_json::Value = std::fs::read(errors.join(&sidecar))
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_slice(&text).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("{}: no readable sidecar: {e}", entry.to_string_lossy()));
        let got = meta["reason"].as_str().unwrap_or_default();
        assert!(
            got.contains(reason),
            "{}: reason {got:?} should say {reason:?}",
            entry.to_string_lossy()
        );
        std::fs::symlink_metadata(errors.join(&entry)).expect("the entry is in errors/");
        figures.add("entries quarantined", 1);
    }
    assert_eq!(std::fs::read(&outside).expect("read"), b"do not touch");
    assert_eq!(
        std::fs::read_link(errors.join("symlink")).expect("readlink"),
        outside
    );
    assert_eq!(std::fs::metadata(&linked).expect("stat").nlink(), 2);
    assert!(std::fs::symlink_metadata(errors.join("fifo"))
        .expect("stat")
        .file_type()
        .is_fifo());

    // The command line shows each of them on one line.
    let listing = support::sh(
        env!("CARGO_BIN_EXE_dirq"),
        &["ls", support::path_str(&a), "--state", "errors", "--json"],
    );
    assert_eq!(listing.lines().count(), reasons.len() + 1, "{listing}");
    for line in listing.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert!(entry["reason"].is_string(), "{line}");
    }
    let human = support::sh(env!("CARGO_BIN_EXE_dirq"), &["ls", support::path_str(&b)]);
    assert_eq!(
        human.lines().count(),
        Inventory::take(&[&b]).found.len(),
        "one line per message: {human}"
    );
}

fn odd_names_through_the_lifecycle(dir: &Path, figures: &mut Figures) {
    let (c, d) = (dir.join("c"), dir.join("d"));
    let queue = DirectoryQueue::open(&c).expect("create c");
    let next = DirectoryQueue::open(&d).expect("create d");
    let too_long = MessageId::new(name(&[b'y'; 201])).expect_err("a 201-byte id");
    assert!(
        too_long.to_string().contains("at most 200 bytes"),
        "{too_long}"
    );
    for (name, seq) in odd_names() {
        let id = MessageId::new(&name).expect("a valid id");
        queue
            .enqueue_with_id(&id, payload(seq, 300))
            .expect("enqueue");
        let claim = || {
            let m = queue.try_claim().expect("claim").expect("a message");
            assert_eq!(m.id(), &id);
            m
        };
        claim()
            .retry_at("odd", SystemTime::now() - Duration::from_secs(1))
            .expect("retry");
        claim().fail("odd").expect("fail");
        dirq::admin::requeue(&queue, &id, false).expect("requeue");
        claim().forward(&next).expect("forward");
        let found = Inventory::take(&[&d]);
        assert_eq!(found.places(seq).len(), 1);
        assert_eq!(found.places(seq)[0].name, name);
        figures.add("odd names through the lifecycle", 1);
    }
}

fn swapped_incoming(dir: &Path, figures: &mut Figures) {
    let (e, f) = (dir.join("e"), dir.join("f"));
    DirectoryQueue::open(&e).expect("create e");
    DirectoryQueue::open(&f).expect("create f");
    let mut piper = Proc::spawn(
        support::role(&[
            "stage",
            support::path_str(&e),
            support::path_str(&f),
            "1",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null()),
    );
    support::wait_until(Duration::from_secs(30), "the Piper to start", || {
        DirectoryQueue::open(&e)
            .and_then(|q| dirq::admin::pipers(&q))
            .is_ok_and(|p| !p.is_empty())
    });
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let bait = elsewhere.join("bait.msg");
    std::fs::write(&bait, payload(50, 300)).expect("write bait");
    let moved: PathBuf = e.join("incoming.moved");
    std::fs::rename(e.join("incoming"), &moved).expect("move incoming away");
    std::os::unix::fs::symlink(&elsewhere, e.join("incoming")).expect("symlink");

    for args in [
        vec!["status", support::path_str(&e)],
        vec!["push", support::path_str(&e)],
    ] {
        let out = support::output(support::dirq().args(&args).stdin(Stdio::piped()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("incoming") && stderr.contains("symbolic link"),
            "{args:?}: unclear error: {stderr}"
        );
        figures.add("refused with a swapped incoming/", 1);
    }
    // The running Piper keeps serving the directory it opened (now incoming.moved):
    // a message dropped there reaches f, and the bait is never touched.
    // Dropped as a producer must (complete, by rename): a file written in place could
    // be claimed while still empty, and an empty message is quarantined by design.
    let staged = e.join("tmp").join("late.msg");
    std::fs::write(&staged, payload(51, 300)).expect("write");
    std::fs::rename(&staged, moved.join("late.msg")).expect("publish late.msg");
    support::wait_until(
        Duration::from_secs(30),
        "the Piper to forward late.msg",
        || Inventory::take(&[&f]).places(51).len() == 1,
    );
    support::send(piper.id(), rustix::process::Signal::TERM);
    assert!(piper.0.wait().expect("wait").success());
    assert_eq!(
        std::fs::read(&bait).expect("the bait is still there"),
        payload(50, 300)
    );
    assert!(
        Inventory::take(&[&f]).places(50).is_empty(),
        "the bait was followed"
    );
}
