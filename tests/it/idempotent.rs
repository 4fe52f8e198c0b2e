//! Idempotent enqueue: `enqueue_with_id` (and its batch form) stores a message under a
//! given id once, finds the id in every state and, while the queue remembers finished
//! ids, in `seen/`; many threads and processes enqueueing the same ids, one at a time or
//! in batches, while claimers commit them get each processed exactly once.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirq::queue::{Group, RetryPolicy};
use dirq::{DirectoryQueue, Enqueued, MessageId, State};

use crate::util::{dirq, run_ok, run_with_input, wait_until, TestQueue};

const HOUR: Duration = Duration::from_secs(3600);

fn id(name: &str) -> MessageId {
    MessageId::new(name).unwrap()
}

/// A queue that remembers finished ids for an hour.
fn remembering(t: &TestQueue) -> DirectoryQueue {
    DirectoryQueue::builder(t.root())
        .remember_finished(HOUR)
        .open()
        .unwrap()
}

/// Retries that wait an hour: a retried message stays in `deferred/` for the test.
fn retry_in_an_hour() -> RetryPolicy {
    RetryPolicy::builder()
        .initial(HOUR)
        .max_delay(HOUR)
        .build()
        .unwrap()
}

/// Every message file of the queue, in any state, by state.
fn census(t: &TestQueue) -> Vec<(State, Vec<String>)> {
    State::ALL
        .into_iter()
        .filter(|&s| t.path(s).exists())
        .map(|s| (s, t.names(s)))
        .collect()
}

#[test]
fn a_second_enqueue_with_the_same_id_stores_nothing() {
    let t = TestQueue::new();
    let id = id("order-17");
    assert_eq!(
        t.queue.enqueue_with_id(&id, b"first").unwrap(),
        Enqueued::Stored
    );
    assert_eq!(
        t.queue.enqueue_with_id(&id, b"second").unwrap(),
        Enqueued::AlreadyQueued(State::Incoming)
    );
    assert_eq!(t.names(State::Incoming), ["order-17"]);
    assert!(
        t.names(State::Tmp).is_empty(),
        "the refused copy is removed"
    );
    let message = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(message.bytes().unwrap(), b"first");
}

#[test]
fn the_id_is_found_in_every_state() {
    let t = TestQueue::new();
    let queue = DirectoryQueue::builder(t.root())
        .retry_policy(retry_in_an_hour())
        .open()
        .unwrap();
    let (claimed, retried, held, failed) = (id("claimed"), id("retried"), id("held"), id("failed"));
    for id in [&claimed, &retried, &held, &failed] {
        assert!(queue.enqueue_with_id(id, b"x").unwrap().is_stored());
    }
    dirq::admin::hold(&queue, &held).unwrap();
    let mut kept = Vec::new();
    while let Some(message) = queue.try_claim().unwrap() {
        if message.id() == &failed {
            message.fail("broken").unwrap();
        } else if message.id() == &retried {
            let retried = message.retry("later").unwrap();
            assert!(
                matches!(retried, dirq::queue::Retried::Deferred(_)),
                "{retried:?}"
            );
        } else {
            kept.push(message);
        }
    }
    assert_eq!(kept.len(), 1, "only `claimed` stays claimed");
    let chain = Group::ordered("nightly").unwrap();
    queue.enqueue_in_group(&chain, b"extract").unwrap();
    let waiting = queue.enqueue_in_group(&chain, b"load").unwrap();

    let before = census(&t);
    let cases = [
        (&claimed, State::Pending),
        (&failed, State::Errors),
        (&retried, State::Deferred),
        (&held, State::Hold),
        (&waiting, State::Chained),
    ];
    for (id, state) in cases {
        assert_eq!(
            queue.enqueue_with_id(id, b"again").unwrap(),
            Enqueued::AlreadyQueued(state),
            "{id}"
        );
    }
    assert_eq!(census(&t), before, "nothing was added or moved");
    drop(kept);
}

/// The batch form answers for each item as the single one would: new ids stored, known
/// ones found where they are (or remembered), a blank item refused alone, an id given
/// twice stored once.
#[test]
fn a_batch_answers_for_each_item() {
    let t = TestQueue::new();
    let queue = DirectoryQueue::builder(t.root())
        .remember_finished(HOUR)
        .retry_policy(retry_in_an_hour())
        .open()
        .unwrap();
    let (waiting, claimed, retried, finished) =
        (id("waiting"), id("claimed"), id("retried"), id("finished"));
    for id in [&waiting, &claimed, &retried, &finished] {
        assert!(queue.enqueue_with_id(id, b"x").unwrap().is_stored());
    }
    let (mut kept, mut to_release) = (None, None);
    while let Some(message) = queue.try_claim().unwrap() {
        match message.id().to_string().as_str() {
            "claimed" => kept = Some(message),
            "retried" => drop(message.retry("later").unwrap()),
            "finished" => message.commit().unwrap(),
            _ => to_release = Some(message),
        }
    }
    assert!(kept.is_some());
    // Back in incoming/.
    to_release.expect("waiting").release().unwrap();
    let (new, twice) = (id("new"), id("twice"));
    let items = [
        (new.clone(), "new"),
        (waiting.clone(), "again"),
        (claimed.clone(), "again"),
        (retried.clone(), "again"),
        (finished.clone(), "again"),
        (id("blank"), " \n"),
        (twice.clone(), "first"),
        (twice.clone(), "second"),
    ];
    let answers = queue.enqueue_batch_with_id(&items).unwrap();
    let answers: Vec<Result<Enqueued, String>> = answers
        .into_iter()
        .map(|a| a.map_err(|e| e.to_string()))
        .collect();
    assert_eq!(answers[0], Ok(Enqueued::Stored));
    assert_eq!(answers[1], Ok(Enqueued::AlreadyQueued(State::Incoming)));
    assert_eq!(answers[2], Ok(Enqueued::AlreadyQueued(State::Pending)));
    assert_eq!(answers[3], Ok(Enqueued::AlreadyQueued(State::Deferred)));
    assert_eq!(answers[4], Ok(Enqueued::AlreadyFinished));
    assert!(
        answers[5].as_ref().is_err_and(|e| e.contains("empty")),
        "{:?}",
        answers[5]
    );
    assert_eq!(answers[6], Ok(Enqueued::Stored));
    assert_eq!(answers[7], Ok(Enqueued::AlreadyQueued(State::Incoming)));
    let mut incoming = t.names(State::Incoming);
    incoming.sort();
    assert_eq!(incoming, ["new", "twice", "waiting"]);
    assert!(t.names(State::Tmp).is_empty(), "refused copies are removed");
    let bodies: HashMap<String, Vec<u8>> = std::iter::from_fn(|| queue.try_claim().unwrap())
        .map(|m| {
            let body = m.bytes().unwrap();
            (m.id().to_string(), body)
        })
        .collect();
    assert_eq!(bodies["twice"], b"first", "the first of the two is kept");
    assert_eq!(bodies["new"], b"new");
    assert!(queue
        .enqueue_batch_with_id::<&[u8]>(&[])
        .unwrap()
        .is_empty());
}

#[test]
fn a_finished_id_is_refused_while_remembered_then_let_in_again() {
    let t = TestQueue::new();
    let queue = DirectoryQueue::builder(t.root())
        .remember_finished(Duration::from_secs(1))
        .open()
        .unwrap();
    let id = id("once");
    assert_eq!(queue.enqueue_with_id(&id, b"x").unwrap(), Enqueued::Stored);
    queue.try_claim().unwrap().unwrap().commit().unwrap();
    assert_eq!(
        queue.enqueue_with_id(&id, b"x").unwrap(),
        Enqueued::AlreadyFinished
    );
    assert_eq!(queue.counts().unwrap(), dirq::queue::Counts::default());
    // The record lasts one to two seconds (a time to live of 1 s, in buckets of 1 s).
    wait_until(Duration::from_secs(10), "the record to expire", || {
        queue.enqueue_with_id(&id, b"x").unwrap().is_stored()
    });
    assert_eq!(t.names(State::Incoming), ["once"]);
    let report = queue.recover().unwrap();
    assert_eq!(report.seen_removed, 1, "{report:?}");
    assert_eq!(t.names(State::Tmp), Vec::<String>::new());
    let seen = t.root().join("seen");
    let buckets: Vec<String> = crate::util::names_in(&seen)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(
        buckets.is_empty(),
        "emptied buckets are removed: {buckets:?}"
    );
}

#[test]
fn without_remembering_a_finished_id_is_new_again() {
    let t = TestQueue::new();
    assert_eq!(t.queue.remembers_finished(), None);
    let id = id("again");
    t.queue.enqueue_with_id(&id, b"x").unwrap();
    t.queue.try_claim().unwrap().unwrap().commit().unwrap();
    assert_eq!(
        t.queue.enqueue_with_id(&id, b"x").unwrap(),
        Enqueued::Stored
    );
}

#[test]
fn forwarded_and_deleted_ids_are_remembered() {
    let t = TestQueue::new();
    let queue = remembering(&t);
    let next = t.sibling("next");
    let (forwarded, deleted) = (id("forwarded"), id("deleted"));
    queue.enqueue_with_id(&forwarded, b"x").unwrap();
    queue.try_claim().unwrap().unwrap().forward(&next).unwrap();
    queue.enqueue_with_id(&deleted, b"x").unwrap();
    assert_eq!(
        dirq::admin::delete(&queue, &deleted).unwrap(),
        State::Incoming
    );
    for id in [&forwarded, &deleted] {
        assert_eq!(
            queue.enqueue_with_id(id, b"x").unwrap(),
            Enqueued::AlreadyFinished,
            "{id}"
        );
    }
    assert_eq!(queue.counts().unwrap(), dirq::queue::Counts::default());
    // The next queue does not remember: its own setting.
    assert_eq!(next.remembers_finished(), None);
}

#[test]
fn the_setting_belongs_to_the_queue() {
    let t = TestQueue::new();
    drop(remembering(&t));
    // Handles opened afterwards, without saying anything, honour it.
    let worker = DirectoryQueue::open(t.root()).unwrap();
    assert_eq!(worker.remembers_finished(), Some(HOUR));
    let id = id("shared");
    worker.enqueue_with_id(&id, b"x").unwrap();
    worker.try_claim().unwrap().unwrap().commit().unwrap();
    let producer = DirectoryQueue::open(t.root()).unwrap();
    assert_eq!(
        producer.enqueue_with_id(&id, b"x").unwrap(),
        Enqueued::AlreadyFinished
    );
    // Turned off: the records stay but no longer count, and recovery removes them.
    let off = DirectoryQueue::builder(t.root())
        .remember_finished(Duration::ZERO)
        .open()
        .unwrap();
    assert_eq!(off.remembers_finished(), None);
    assert_eq!(off.enqueue_with_id(&id, b"x").unwrap(), Enqueued::Stored);
    assert_eq!(off.recover().unwrap().seen_removed, 1);
    assert!(DirectoryQueue::builder(t.root())
        .remember_finished(Duration::from_millis(500))
        .open()
        .is_err());
}

#[test]
fn enqueue_reader_with_id_streams_and_refuses_a_known_id() {
    let t = TestQueue::new();
    let id = id("streamed");
    let big = vec![b'z'; 200_000];
    assert!(t
        .queue
        .enqueue_reader_with_id(&id, &big[..])
        .unwrap()
        .is_stored());
    assert_eq!(
        t.queue.enqueue_reader_with_id(&id, &b"other"[..]).unwrap(),
        Enqueued::AlreadyQueued(State::Incoming)
    );
    assert!(matches!(
        t.queue
            .enqueue_with_id(&dirq::MessageId::new("blank").unwrap(), b"  \n"),
        Err(dirq::Error::EmptyMessage { .. })
    ));
    assert_eq!(t.queue.try_claim().unwrap().unwrap().bytes().unwrap(), big);
}

/// A handle opened before the queue was set to remember finished ids (a worker
/// started before `dirq bridge in` set it) picks the setting up within a second or so,
/// and its commits then leave records; it picks up the setting's removal too.
#[test]
fn an_open_handle_picks_up_a_later_setting() {
    let t = TestQueue::new();
    let worker = DirectoryQueue::open(t.root()).unwrap();
    assert_eq!(worker.remembers_finished(), None);
    let producer = remembering(&t);
    wait_until(
        Duration::from_secs(10),
        "the worker to read the setting",
        || worker.remembers_finished() == Some(HOUR),
    );
    let id = id("late");
    assert!(producer.enqueue_with_id(&id, b"x").unwrap().is_stored());
    worker.try_claim().unwrap().unwrap().commit().unwrap();
    assert_eq!(
        producer.enqueue_with_id(&id, b"x").unwrap(),
        Enqueued::AlreadyFinished,
        "the worker's commit left a record"
    );
    drop(
        DirectoryQueue::builder(t.root())
            .remember_finished(Duration::ZERO)
            .open()
            .unwrap(),
    );
    wait_until(
        Duration::from_secs(10),
        "the worker to read the removal",
        || worker.remembers_finished().is_none(),
    );
}

#[test]
fn check_knows_seen() {
    let t = TestQueue::new();
    let queue = remembering(&t);
    queue.enqueue_with_id(&id("checked"), b"x").unwrap();
    queue.try_claim().unwrap().unwrap().commit().unwrap();
    let problems = dirq::admin::check(&queue, &mut |_| {}).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

/// Producers in threads (each with its own handle) and in processes (`dirq push
/// --id`) enqueue every id while claimers commit: each id is processed exactly once,
/// and exactly one enqueue of each reported that it stored it.
#[test]
fn concurrent_producers_and_claimers_process_each_id_once() {
    const IDS: usize = 120;
    const THREADS: usize = 4;
    const PROCESSES: usize = 2;
    let t = TestQueue::new();
    drop(remembering(&t));
    let ids: Vec<String> = (0..IDS).map(|n| format!("job-{n:03}")).collect();
    let root = t.root().to_path_buf();

    let children: Vec<_> = (0..PROCESSES)
        .map(|k| {
            // Each process walks the ids from its own starting point.
            let order: Vec<&str> = ids
                .iter()
                .cycle()
                .skip(k * 53)
                .take(IDS)
                .map(String::as_str)
                .collect();
            let script = format!(
                "for id in {}; do echo \"$id from process\" | \"$DIRQ\" push --id \"$id\" \"$Q\" \
                 || exit 1; done",
                order.join(" ")
            );
            std::process::Command::new("sh")
                .args(["-c", &script])
                .env("DIRQ", dirq().get_program())
                .env("Q", &root)
                .env_remove("DIRQ_LOG")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn sh")
        })
        .collect();

    let processed: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let producing = Arc::new(AtomicUsize::new(THREADS));
    let done = Arc::new(AtomicBool::new(false));
    let claimers: Vec<_> = (0..2)
        .map(|_| {
            let queue = DirectoryQueue::open(&root).unwrap();
            let processed = Arc::clone(&processed);
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    // Waits for an arrival, but looks at `done` now and then.
                    if let Some(message) = queue.claim_timeout(Duration::from_millis(50)).unwrap() {
                        *processed
                            .lock()
                            .unwrap()
                            .entry(message.id().to_string())
                            .or_default() += 1;
                        message.commit().unwrap();
                    }
                }
            })
        })
        .collect();
    let stored_by_threads: Vec<_> = (0..THREADS)
        .map(|k| {
            let queue = DirectoryQueue::open(&root).unwrap();
            let ids = ids.clone();
            let producing = Arc::clone(&producing);
            std::thread::spawn(move || {
                let mut stored = Vec::new();
                let order: Vec<&String> = (0..IDS).map(|n| &ids[(n + k * 31) % IDS]).collect();
                // Half the threads enqueue one id at a time, half in batches of 16.
                if k % 2 == 0 {
                    for name in order {
                        let answer = queue
                            .enqueue_with_id(
                                &MessageId::new(name).unwrap(),
                                format!("{name} from {k}"),
                            )
                            .unwrap();
                        if answer.is_stored() {
                            stored.push(name.clone());
                        }
                    }
                } else {
                    for chunk in order.chunks(16) {
                        let items: Vec<(MessageId, String)> = chunk
                            .iter()
                            .map(|name| (MessageId::new(name).unwrap(), format!("{name} from {k}")))
                            .collect();
                        let answers = queue.enqueue_batch_with_id(&items).unwrap();
                        for ((id, _), answer) in items.iter().zip(answers) {
                            if answer.unwrap().is_stored() {
                                stored.push(id.to_string());
                            }
                        }
                    }
                }
                producing.fetch_sub(1, Ordering::SeqCst);
                stored
            })
        })
        .collect();

    let mut stored: Vec<String> = stored_by_threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a producer process failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stored.extend(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(str::to_owned),
        );
    }
    assert_eq!(producing.load(Ordering::SeqCst), 0);
    wait_until(Duration::from_secs(60), "every id to be processed", || {
        processed.lock().unwrap().len() == IDS
    });
    done.store(true, Ordering::SeqCst);
    for claimer in claimers {
        claimer.join().unwrap();
    }

    let processed = processed.lock().unwrap();
    let twice: Vec<_> = processed.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "processed more than once: {twice:?}");
    stored.sort();
    assert_eq!(
        stored, ids,
        "each id reported stored by exactly one enqueue"
    );
    assert_eq!(
        t.queue.counts().unwrap(),
        dirq::queue::Counts::default(),
        "no copy left behind"
    );
    assert!(t.names(State::Tmp).is_empty());
}

#[test]
fn cli_init_seen_ttl_and_push_id() {
    let t = TestQueue::new();
    let q = t.root().to_str().unwrap();
    run_ok(&["init", "--seen-ttl", "1h", q]);
    assert_eq!(
        DirectoryQueue::open(q).unwrap().remembers_finished(),
        Some(HOUR)
    );

    let first = run_with_input(&["push", "--id", "order-1", q], b"ship it");
    assert!(first.status.success());
    assert_eq!(String::from_utf8_lossy(&first.stdout), "order-1\n");
    let again = run_with_input(&["push", "--id", "order-1", q], b"ship it");
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout), "");
    let note = String::from_utf8_lossy(&again.stderr);
    assert!(note.contains("already in incoming/"), "{note}");

    run_ok(&["take", q]);
    let after = run_with_input(&["push", "--id", "order-1", q], b"ship it");
    assert!(after.status.success());
    let note = String::from_utf8_lossy(&after.stderr);
    assert!(note.contains("already processed"), "{note}");
    assert!(t.names(State::Incoming).is_empty());

    let two = crate::util::run(&["push", "--id", "x", q, "a", "b"]);
    assert!(!two.status.success(), "one id cannot name two messages");
}

/// Runs `dirq ARGS` under strace with every `renameat2` failing with `EINVAL`, as the
/// Linux NFS client answers `RENAME_NOREPLACE`; the trace of renames and links goes to
/// `trace`.
fn dirq_without_noreplace(
    trace: &std::path::Path,
    args: &[&str],
    input: &[u8],
) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(trace)
        .args([
            "-e",
            "trace=renameat2,link,linkat",
            "-e",
            "inject=renameat2:error=EINVAL",
            "--",
        ])
        .arg(dirq().get_program())
        .args(args)
        .env_remove("DIRQ_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run strace");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Regression guard for docs/scale-out.md: where `RENAME_NOREPLACE` is refused (NFS),
/// publishing, claiming and idempotent enqueue fall back to `link` + `unlink` and keep
/// their promises on one host.
#[test]
fn no_rename_noreplace_falls_back_to_link_and_unlink() {
    if let Err(why) = crate::util::strace_works() {
        crate::util::skip("no_rename_noreplace_falls_back_to_link_and_unlink", &why);
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let t = TestQueue::new();
    drop(remembering(&t));
    let q = t.root().to_str().unwrap();
    let trace = t.dir.path().join("trace");
    let text = |out: &[u8]| String::from_utf8_lossy(out).into_owned();

    let first = dirq_without_noreplace(&trace, &["push", "--id", "nfs-1", q], b"one");
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert_eq!(text(&first.stdout), "nfs-1\n");
    let calls = std::fs::read_to_string(&trace).unwrap();
    assert!(
        calls.contains("EINVAL") && calls.contains("link"),
        "renameat2 refused, then a link: {calls}"
    );
    let again = dirq_without_noreplace(&trace, &["push", "--id", "nfs-1", q], b"two");
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("already in incoming/"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(t.names(State::Incoming), ["nfs-1"]);
    let links = std::fs::metadata(t.path(State::Incoming).join("nfs-1"))
        .unwrap()
        .nlink();
    assert_eq!(links, 1, "the tmp/ name is gone");
    assert!(t.names(State::Tmp).is_empty());

    let taken = dirq_without_noreplace(&trace, &["take", q], b"");
    assert!(taken.status.success(), "{}", text(&taken.stderr));
    assert_eq!(text(&taken.stdout), "one\n");
    let after = dirq_without_noreplace(&trace, &["push", "--id", "nfs-1", q], b"three");
    assert!(after.status.success(), "{}", text(&after.stderr));
    assert!(
        text(&after.stderr).contains("already processed"),
        "{}",
        text(&after.stderr)
    );
    assert_eq!(t.queue.counts().unwrap(), dirq::queue::Counts::default());
    assert!(t.names(State::Tmp).is_empty());
}

#[cfg(feature = "tokio")]
#[test]
fn async_enqueue_with_id_answers_as_the_sync_one() {
    let t = TestQueue::new();
    let queue = dirq::aio::AsyncQueue::from(remembering(&t));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let id = id("async-1");
        assert_eq!(
            queue.enqueue_with_id(id.clone(), b"x").await.unwrap(),
            Enqueued::Stored
        );
        assert_eq!(
            queue.enqueue_with_id(id.clone(), b"x").await.unwrap(),
            Enqueued::AlreadyQueued(State::Incoming)
        );
        queue
            .try_claim()
            .await
            .unwrap()
            .unwrap()
            .commit()
            .await
            .unwrap();
        assert_eq!(
            queue.enqueue_with_id(id, b"x").await.unwrap(),
            Enqueued::AlreadyFinished
        );
    });
}

/// Writers sweep too: without any recovery, expired records go as new ones come.
#[test]
fn writers_remove_expired_records_as_they_go() {
    let t = TestQueue::new();
    let queue = DirectoryQueue::builder(t.root())
        .remember_finished(Duration::from_secs(1))
        .open()
        .unwrap();
    let finish = |name: &str| {
        queue.enqueue_with_id(&id(name), b"x").unwrap();
        queue.try_claim().unwrap().unwrap().commit().unwrap();
    };
    let buckets = || -> Vec<String> {
        crate::util::names_in(&t.root().join("seen"))
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect()
    };
    finish("old");
    let first = buckets();
    assert_eq!(first.len(), 1, "{first:?}");
    wait_until(Duration::from_secs(10), "the record to expire", || {
        queue.enqueue_with_id(&id("old"), b"x").unwrap().is_stored()
    });
    dirq::admin::delete(&queue, &id("old")).unwrap();
    // 64 records by one handle: one of them sweeps.
    for n in 0..64 {
        finish(&format!("new-{n}"));
    }
    let now = buckets();
    assert!(
        !now.contains(&first[0]),
        "the expired bucket {} is gone: {now:?}",
        first[0]
    );
}

/// Something planted in `seen/` under a bucket's name is not a bucket, and does not
/// stop idempotent enqueues.
#[test]
fn a_file_under_a_buckets_name_is_passed_over() {
    let t = TestQueue::new();
    let queue = remembering(&t);
    queue.enqueue_with_id(&id("before"), b"x").unwrap();
    std::fs::write(t.root().join("seen/9999999999"), b"planted").unwrap();
    std::os::unix::fs::symlink("/", t.root().join("seen/9999999998")).unwrap();
    assert_eq!(
        queue.enqueue_with_id(&id("after"), b"x").unwrap(),
        Enqueued::Stored
    );
    while let Some(message) = queue.try_claim().unwrap() {
        message.commit().unwrap();
    }
    for name in ["before", "after"] {
        assert_eq!(
            queue.enqueue_with_id(&id(name), b"x").unwrap(),
            Enqueued::AlreadyFinished,
            "{name}"
        );
    }
    assert_eq!(queue.recover().unwrap().seen_removed, 0);
    assert!(
        t.root().join("seen/9999999999").exists(),
        "left for the operator"
    );
}
