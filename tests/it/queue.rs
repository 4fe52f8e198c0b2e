//! The library API, one process.

use std::io::Read;
use std::time::{Duration, Instant, SystemTime};

use dirq::error::Operation;
use dirq::{DirectoryQueue, Durability, Error, MessageId, State};

use crate::util::{names_in, wait_until, TestQueue};

#[test]
fn enqueue_claim_commit_round_trip() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"hello").unwrap();
    assert_eq!(t.names(State::Incoming), vec![id.to_string()]);
    assert!(t.names(State::Tmp).is_empty());

    let message = t.queue.try_claim().unwrap().expect("a message");
    assert_eq!(message.id(), &id);
    assert_eq!(message.size(), 5);
    assert_eq!(message.bytes().unwrap(), b"hello");
    assert_eq!(message.path(), t.path(State::Pending).join(id.as_os_str()));
    assert_eq!(t.names(State::Pending), vec![id.to_string()]);
    assert!(t.names(State::Incoming).is_empty());

    message.commit().unwrap();
    assert!(t.names(State::Pending).is_empty());
    assert!(t.queue.try_claim().unwrap().is_none());
}

#[test]
fn claims_oldest_first() {
    let t = TestQueue::new();
    let ids: Vec<MessageId> = (0..50)
        .map(|i| t.queue.enqueue(format!("m{i}")).unwrap())
        .collect();
    let mut claimed = Vec::new();
    while let Some(message) = t.queue.try_claim().unwrap() {
        claimed.push(message.id().clone());
        message.commit().unwrap();
    }
    assert_eq!(claimed, ids);
}

#[test]
fn json_round_trip_and_decode_error_names_the_file() {
    let t = TestQueue::new();
    t.queue
        .enqueue_json(&serde_json::json!({"event": "login", "n": 3}))
        .unwrap();
    t.queue.enqueue(b"not json").unwrap();
    let message = t.queue.try_claim().unwrap().unwrap();
    let value: serde_json::Value = message.json().unwrap();
    assert_eq!(value["n"], 3);
    message.commit().unwrap();

    let message = t.queue.try_claim().unwrap().unwrap();
    let err = message.json::<serde_json::Value>().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Json {
                op: Operation::Decode,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.path(), Some(message.path()));
    message.commit().unwrap();
}

#[test]
fn reader_streams_and_restarts() {
    let t = TestQueue::new();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
    t.queue.enqueue_reader(&body[..]).unwrap();
    let message = t.queue.try_claim().unwrap().unwrap();
    for _ in 0..2 {
        let mut read = Vec::new();
        message.reader().read_to_end(&mut read).unwrap();
        assert_eq!(read, body);
    }
    message.commit().unwrap();
}

#[test]
fn empty_and_blank_messages_are_refused_and_leave_nothing() {
    let t = TestQueue::new();
    for blank in [&b""[..], b"  \n\t "] {
        let err = t.queue.enqueue(blank).unwrap_err();
        assert!(matches!(err, Error::EmptyMessage { .. }), "{err:?}");
        let err = t.queue.enqueue_reader(blank).unwrap_err();
        assert!(matches!(err, Error::EmptyMessage { .. }), "{err:?}");
    }
    let err = t.queue.enqueue_batch([&b"ok"[..], b""]).unwrap_err();
    assert!(matches!(err, Error::EmptyMessage { .. }), "{err:?}");
    assert!(t.names(State::Incoming).is_empty());
    assert!(t.names(State::Tmp).is_empty());
}

#[test]
fn batch_enqueue_publishes_all_in_order() {
    let t = TestQueue::new();
    let payloads: Vec<String> = (0..100).map(|i| format!("batch {i}")).collect();
    let ids = t.queue.enqueue_batch(&payloads).unwrap();
    assert_eq!(ids.len(), 100);
    assert_eq!(t.queue.counts().unwrap().incoming, 100);
    for payload in &payloads {
        let message = t.queue.try_claim().unwrap().unwrap();
        assert_eq!(message.bytes().unwrap(), payload.as_bytes());
        message.commit().unwrap();
    }
}

#[test]
fn forward_keeps_the_id() {
    let t = TestQueue::new();
    let next = t.sibling("next");
    let id = t.queue.enqueue(b"payload").unwrap();
    t.queue
        .try_claim()
        .unwrap()
        .unwrap()
        .forward(&next)
        .unwrap();
    assert!(t.names(State::Pending).is_empty());
    let message = next.try_claim().unwrap().unwrap();
    assert_eq!(message.id(), &id);
    assert_eq!(message.bytes().unwrap(), b"payload");
    message.commit().unwrap();
}

#[test]
fn failed_terminal_hands_the_message_back() {
    let t = TestQueue::new();
    let next = t.sibling("next");
    let id = t.queue.enqueue(b"first").unwrap();
    // Plant a message with the same id in the next queue.
    std::fs::write(next.path(State::Incoming).join(id.as_os_str()), b"other").unwrap();

    let message = t.queue.try_claim().unwrap().unwrap();
    let err = message.forward(&next).unwrap_err();
    assert!(
        matches!(
            err.error(),
            Error::Duplicate {
                op: Operation::Forward,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(&id.to_string()), "{err}");
    let message = err.into_message().expect("the message is handed back");
    // Still claimed and usable.
    assert_eq!(message.bytes().unwrap(), b"first");
    message.commit().unwrap();
    assert!(t.names(State::Pending).is_empty());
}

#[test]
fn release_returns_it_and_counts_the_attempt() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"again").unwrap();
    for expected in 1..=3 {
        let message = t.queue.try_claim().unwrap().unwrap();
        assert_eq!(message.id(), &id);
        assert_eq!(message.attempts().unwrap(), expected);
        message.release().unwrap();
    }
    assert_eq!(t.names(State::Incoming), vec![id.to_string()]);
}

#[test]
fn fail_writes_the_sidecar_first_with_reason_and_attempts() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"bad").unwrap();
    t.queue.try_claim().unwrap().unwrap().release().unwrap();
    t.queue
        .try_claim()
        .unwrap()
        .unwrap()
        .fail("cannot parse")
        .unwrap();

    let meta_name = format!("{id}.meta");
    assert_eq!(
        t.names(State::Errors),
        vec![id.to_string(), meta_name.clone()]
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path(State::Errors).join(&meta_name)).unwrap())
            .unwrap();
    assert_eq!(meta["reason"], "cannot parse");
    assert_eq!(meta["attempts"], 2);
    assert_eq!(meta["pid"], std::process::id());
    assert!(meta["host"].as_str().is_some_and(|h| !h.is_empty()));
    assert!(meta["time"].as_str().is_some_and(|t| t.ends_with('Z')));

    let failure = dirq::admin::failure(&t.queue, &id).unwrap().unwrap();
    assert_eq!(failure.reason.as_deref(), Some("cannot parse"));
    assert_eq!(t.queue.counts().unwrap().errors, 1);
}

#[test]
fn failing_the_same_id_twice_keeps_both() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"once").unwrap();
    t.queue.try_claim().unwrap().unwrap().fail("first").unwrap();
    // The same id arrives again (a requeue by hand, say) and fails again.
    std::fs::write(t.path(State::Incoming).join(id.as_os_str()), b"twice").unwrap();
    t.queue
        .try_claim()
        .unwrap()
        .unwrap()
        .fail("second")
        .unwrap();
    let second = format!("{id}~1");
    assert_eq!(
        t.names(State::Errors),
        vec![
            id.to_string(),
            format!("{id}.meta"),
            second.clone(),
            format!("{second}.meta")
        ]
    );
    assert_eq!(
        std::fs::read(t.path(State::Errors).join(&second)).unwrap(),
        b"twice"
    );
}

#[test]
fn dropped_message_stays_pending_until_recovered() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"orphan").unwrap();
    drop(t.queue.try_claim().unwrap().unwrap());
    assert_eq!(t.names(State::Pending), vec![id.to_string()]);
    assert!(t.queue.try_claim().unwrap().is_none());

    let report = t.queue.recover().unwrap();
    assert_eq!(report.requeued, 1);
    let message = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(message.id(), &id);
    assert_eq!(message.attempts().unwrap(), 2, "the dead claim counts");
    message.commit().unwrap();
}

#[test]
fn recover_leaves_live_owners_alone() {
    let t = TestQueue::new();
    t.queue.enqueue(b"busy").unwrap();
    let held = t.queue.try_claim().unwrap().unwrap();
    // A separate handle, as another process would have.
    let other = DirectoryQueue::open(t.root()).unwrap();
    for _ in 0..3 {
        let report = other.recover().unwrap();
        assert_eq!((report.requeued, report.owned), (0, 1));
    }
    assert_eq!(t.names(State::Pending).len(), 1);
    held.commit().unwrap();
}

#[test]
fn recover_honours_the_orphan_grace() {
    let t = TestQueue::new();
    t.queue.enqueue(b"young").unwrap();
    drop(t.queue.try_claim().unwrap().unwrap());
    let patient = DirectoryQueue::builder(t.root())
        .orphan_grace(Duration::from_secs(3600))
        .open()
        .unwrap();
    let report = patient.recover().unwrap();
    assert_eq!((report.requeued, report.within_grace), (0, 1));
    assert_eq!(t.queue.recover().unwrap().requeued, 1);
}

#[test]
fn recover_removes_only_abandoned_old_tmp_files() {
    let t = TestQueue::new();
    let tmp = t.path(State::Tmp);
    let old = SystemTime::now() - Duration::from_secs(7200);
    let abandoned = std::fs::File::create(tmp.join("abandoned")).unwrap();
    abandoned.set_modified(old).unwrap();
    drop(abandoned);
    let writing = std::fs::File::create(tmp.join("writing")).unwrap();
    writing.set_modified(old).unwrap();
    fs2::FileExt::try_lock_exclusive(&writing).unwrap();
    std::fs::write(tmp.join("fresh"), b"x").unwrap();

    let report = t.queue.recover().unwrap();
    assert_eq!(report.tmp_removed, 1);
    assert_eq!(t.names(State::Tmp), vec!["fresh", "writing"]);
    drop(writing);
}

#[test]
fn recover_is_idempotent() {
    let t = TestQueue::new();
    for i in 0..5 {
        t.queue.enqueue(format!("m{i}")).unwrap();
        drop(t.queue.try_claim().unwrap().unwrap());
    }
    assert_eq!(t.queue.recover().unwrap().requeued, 5);
    assert_eq!(
        t.queue.recover().unwrap(),
        dirq::queue::RecoverReport::default()
    );
    assert_eq!(t.queue.counts().unwrap().incoming, 5);
}

#[test]
fn claim_timeout_gives_up_at_the_deadline() {
    let t = TestQueue::new();
    let start = Instant::now();
    assert!(t
        .queue
        .claim_timeout(Duration::from_millis(200))
        .unwrap()
        .is_none());
    assert!(start.elapsed() >= Duration::from_millis(200));
}

#[test]
fn idle_claimer_is_woken_by_an_event_not_the_rescan() {
    let t = TestQueue::new();
    // An hour-long rescan interval: only a filesystem event can wake the claimer
    // before the deadline below.
    let claimer = DirectoryQueue::builder(t.root())
        .rescan_interval(Duration::from_secs(3600))
        .open()
        .unwrap();
    let watcher = claimer.clone();
    let waiting = std::thread::spawn(move || claimer.claim_timeout(Duration::from_secs(60)));
    // Produce once the claimer has found the queue empty (whether it is already asleep
    // or about to be, the message must reach it; the unit tests of the wake-up check
    // that an event wakes a sleeper).
    wait_until(Duration::from_secs(10), "the claimer's first scan", || {
        watcher.claim_stats().scans >= 1
    });
    let id = t.queue.enqueue(b"wake up").unwrap();
    let message = waiting
        .join()
        .unwrap()
        .unwrap()
        .expect("woken with a message");
    assert_eq!(message.id(), &id);
    message.commit().unwrap();
}

/// Batch mode syncs no directory until `sync()`, which syncs each changed one once.
/// Counted with strace: the child process below does the work, and this test reads
/// which directories it fsynced between its markers.
#[test]
fn batch_durability_defers_to_sync() {
    let dir = crate::util::tempdir();
    let (root, next_root) = (dir.path().join("q"), dir.path().join("next"));
    // Made here, so that the child only opens them.
    DirectoryQueue::open(&root).unwrap();
    DirectoryQueue::open(&next_root).unwrap();
    if let Err(why) = crate::util::strace_works() {
        return crate::util::skip("batch_durability_defers_to_sync", &why);
    }
    let log = dir.path().join("strace.log");
    let out = std::process::Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "trace=fsync,%%stat", "-o"])
        .arg(&log)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "queue::batch_durability_child"])
        .args(["--test-threads", "1", "--nocapture"])
        .env(BATCH_CHILD_DIR, dir.path())
        .output()
        .unwrap();
    crate::util::assert_succeeded(&out, "the traced child");
    let trace = std::fs::read_to_string(&log).unwrap();
    let synced = |step: &str| -> Vec<String> {
        let begin = format!("\"{BATCH_MARKER}/{step}\"");
        let mut dirs: Vec<String> = trace
            .lines()
            .skip_while(|l| !l.contains(&begin))
            .skip(1)
            .take_while(|l| !l.contains(BATCH_MARKER))
            .filter_map(|l| {
                let fd = l.split_once("fsync(")?.1;
                let path = fd.split_once('<')?.1.split_once('>')?.0;
                Some(path.to_owned())
            })
            .collect();
        dirs.sort();
        dirs
    };
    // strace -y shows the kernel's path of each descriptor: no symlinks.
    let path = |p: std::path::PathBuf| {
        let p = std::fs::canonicalize(p).unwrap();
        p.to_str().unwrap().to_owned()
    };
    assert!(
        trace.contains(BATCH_MARKER),
        "no markers in the trace:\n{trace}"
    );
    assert_eq!(
        synced("work"),
        Vec::<String>::new(),
        "batch mode synced before sync()"
    );
    let mut changed = vec![
        path(root.join("incoming")),
        path(root.join("pending")),
        path(next_root.join("incoming")),
    ];
    changed.sort();
    // Where one fsync commits the whole journal (ext4 with a journal, xfs), sync()
    // touches one directory and syncs it: one commit. Elsewhere, each directory once.
    let one_commit = vec![path(root.join("pending"))];
    let dirs = synced("sync");
    assert!(
        dirs == changed || dirs == one_commit,
        "sync() syncs each changed directory once, or commits the journal once: {dirs:?}"
    );
    assert_eq!(
        synced("again"),
        Vec::<String>::new(),
        "nothing changed since"
    );
    assert_eq!(
        DirectoryQueue::open(&next_root)
            .unwrap()
            .counts()
            .unwrap()
            .incoming,
        10
    );
}

/// Where [`batch_durability_child`] finds its queues.
const BATCH_CHILD_DIR: &str = "DIRQ_TEST_BATCH_CHILD_DIR";

/// Markers in the child's trace: failed `stat`s of `<BATCH_MARKER>/<step>`.
const BATCH_MARKER: &str = "/dirq-test-marker";

/// The work that `batch_durability_defers_to_sync` traces, in the queues it names.
/// Run on its own (as in every `cargo test`), it does the same work in queues of its
/// own and checks that a handle in `Batch` mode enqueues, claims and forwards all of it.
#[test]
fn batch_durability_child() {
    let own = crate::util::tempdir();
    let dir = std::env::var_os(BATCH_CHILD_DIR)
        .map_or_else(|| own.path().to_path_buf(), std::path::PathBuf::from);
    let dir = dir.as_path();
    let marker = |step: &str| {
        let _ = std::fs::symlink_metadata(format!("{BATCH_MARKER}/{step}"));
    };
    let queue = DirectoryQueue::builder(dir.join("q"))
        .durability(Durability::Batch)
        .open()
        .unwrap();
    let next = DirectoryQueue::open(dir.join("next")).unwrap();
    marker("work");
    for i in 0..10 {
        queue.enqueue(format!("m{i}")).unwrap();
    }
    while let Some(message) = queue.try_claim().unwrap() {
        message.forward(&next).unwrap();
    }
    marker("sync");
    queue.sync().unwrap();
    marker("again");
    queue.sync().unwrap();
    marker("end");
    assert_eq!(next.count(State::Incoming).unwrap(), 10);
    assert_eq!(queue.counts().unwrap().unfinished(), 0);
}

#[test]
fn counts_ages_and_ids() {
    let t = TestQueue::new();
    assert_eq!(t.queue.oldest_age().unwrap(), None);
    let ids: Vec<MessageId> = (0..3)
        .map(|i| t.queue.enqueue(format!("{i}")).unwrap())
        .collect();
    t.queue.try_claim().unwrap().unwrap().fail("x").unwrap();
    let counts = t.queue.counts().unwrap();
    assert_eq!(
        (counts.incoming, counts.pending, counts.errors, counts.tmp),
        (2, 0, 1, 0)
    );
    let age = t.queue.oldest_age().unwrap().unwrap();
    assert!(age < Duration::from_secs(60), "{age:?}");
    let mut incoming: Vec<MessageId> = t
        .queue
        .ids(State::Incoming)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    incoming.sort();
    assert_eq!(incoming, ids[1..]);
    let errors: Vec<MessageId> = t
        .queue
        .ids(State::Errors)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(errors, ids[..1], "sidecars are not listed");
    let listed = dirq::admin::list(&t.queue, State::Errors).unwrap();
    assert_eq!(
        listed[0].failure.as_ref().unwrap().reason.as_deref(),
        Some("x")
    );
}

#[test]
fn bad_ids_are_typed_errors() {
    let t = TestQueue::new();
    for bad in ["", "a/b", "..", "../escape", "nul\0byte", ".hidden"] {
        let err = Error::from(MessageId::new(bad).unwrap_err());
        assert!(matches!(err, Error::InvalidId { .. }), "{bad:?}: {err:?}");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
    let missing = MessageId::new("no-such-message").unwrap();
    let err = dirq::admin::peek(&t.queue, &missing).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn foreign_names_are_messages_too() {
    let t = TestQueue::new();
    let incoming = t.path(State::Incoming);
    std::fs::write(incoming.join("fill.0000000007.msg"), b"seven").unwrap();
    std::fs::write(
        incoming.join("host.example.org.77.1700000000.000001.64769.5.msg"),
        b"mentat",
    )
    .unwrap();
    let mut got = Vec::new();
    while let Some(message) = t.queue.try_claim().unwrap() {
        got.push(message.bytes().unwrap());
        message.commit().unwrap();
    }
    // Untimed names first, then Mentat's by time.
    assert_eq!(got, vec![b"seven".to_vec(), b"mentat".to_vec()]);
}

#[test]
fn hidden_files_in_incoming_are_not_messages() {
    let t = TestQueue::new();
    std::fs::write(t.path(State::Incoming).join(".rsync-temp"), b"partial").unwrap();
    assert!(t.queue.try_claim().unwrap().is_none());
    assert_eq!(t.queue.counts().unwrap().incoming, 0);
    assert_eq!(names_in(&t.path(State::Incoming)), vec![".rsync-temp"]);
}

/// Drains `t`'s queue with one thread per handle (handles may repeat: clones share a
/// snapshot); returns every payload taken, as numbers.
fn drain_concurrently(handles: &[DirectoryQueue]) -> Vec<u32> {
    let taken: Vec<Vec<u32>> = std::thread::scope(|s| {
        let workers: Vec<_> = handles
            .iter()
            .map(|queue| {
                s.spawn(move || {
                    let mut got = Vec::new();
                    while let Some(m) = queue.try_claim().unwrap() {
                        let body = String::from_utf8(m.bytes().unwrap()).unwrap();
                        got.push(body.parse().unwrap());
                        m.commit().unwrap();
                    }
                    got
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut all = taken.concat();
    all.sort_unstable();
    all
}

fn fill(t: &TestQueue, n: u32) {
    let payloads: Vec<String> = (0..n).map(|i| format!("{i}")).collect();
    t.queue.enqueue_batch(&payloads).unwrap();
}

fn unsynced_handle(t: &TestQueue) -> DirectoryQueue {
    DirectoryQueue::builder(t.root())
        .durability(Durability::None)
        .open()
        .unwrap()
}

#[test]
fn threads_sharing_a_handle_never_collide() {
    let t = TestQueue::new();
    fill(&t, 2000);
    let queue = unsynced_handle(&t);
    let shared = vec![queue.clone(), queue.clone(), queue.clone(), queue.clone()];
    assert_eq!(drain_concurrently(&shared), (0..2000).collect::<Vec<_>>());
    assert_eq!(queue.claim_stats().collisions, 0);
}

#[test]
fn separate_handles_take_each_message_once() {
    let t = TestQueue::new();
    fill(&t, 3000);
    let handles: Vec<DirectoryQueue> = (0..3).map(|_| unsynced_handle(&t)).collect();
    assert_eq!(
        drain_concurrently(&handles),
        (0..3000).collect::<Vec<_>>(),
        "each message exactly once"
    );
    let collisions: u64 = handles.iter().map(|h| h.claim_stats().collisions).sum();
    eprintln!("3 handles, 3000 messages: {collisions} wasted claims");
    assert!(t.names(State::Pending).is_empty());
}
