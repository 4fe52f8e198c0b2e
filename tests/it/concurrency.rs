//! Many processes of the real binary on one queue: each message exactly once.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dirq::{DirectoryQueue, Durability};

use crate::util::{assert_succeeded, dirq, TestQueue};

const MESSAGES: usize = 20_000;
const CONSUMERS: usize = 4;

#[test]
fn four_processes_take_each_message_exactly_once_while_a_producer_adds() {
    let t = TestQueue::new();
    let root = t.root().to_path_buf();
    // Half the messages are there before the consumers start, half arrive meanwhile.
    let producer_queue = DirectoryQueue::builder(&root)
        .durability(Durability::None)
        .open()
        .unwrap();
    let first: Vec<String> = (0..MESSAGES / 2).map(|i| format!("message {i}")).collect();
    producer_queue.enqueue_batch(&first).unwrap();

    let producing = AtomicBool::new(true);
    let deadline = Instant::now() + Duration::from_secs(300);
    let outputs: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        s.spawn(|| {
            for i in MESSAGES / 2..MESSAGES {
                producer_queue.enqueue(format!("message {i}")).unwrap();
            }
            producing.store(false, Ordering::SeqCst);
        });
        let consumers: Vec<_> = (0..CONSUMERS)
            .map(|_| {
                s.spawn(|| {
                    let mut taken = Vec::new();
                    loop {
                        assert!(
                            Instant::now() < deadline,
                            "consumers did not finish in time"
                        );
                        // Read the flag before taking: if the producer was done before
                        // this take found the queue empty, everything has been taken.
                        let done_producing = !producing.load(Ordering::SeqCst);
                        let out = dirq()
                            .args(["--durability", "none", "take", "-0", "-n", "500"])
                            .arg(&root)
                            .stdin(Stdio::null())
                            .output()
                            .unwrap();
                        assert_succeeded(&out, "dirq take");
                        let before = taken.len();
                        taken.extend(
                            out.stdout
                                .split(|&b| b == 0)
                                .filter(|m| !m.is_empty())
                                .map(<[u8]>::to_vec),
                        );
                        if taken.len() == before && done_producing {
                            return taken;
                        }
                    }
                })
            })
            .collect();
        consumers.into_iter().map(|c| c.join().unwrap()).collect()
    });

    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for body in outputs.iter().flatten() {
        *seen.entry(body.clone()).or_default() += 1;
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "{} messages taken twice",
        duplicates.len()
    );
    for i in 0..MESSAGES {
        assert!(
            seen.contains_key(format!("message {i}").as_bytes()),
            "message {i} was never taken"
        );
    }
    assert_eq!(seen.len(), MESSAGES);
    let per_process: Vec<usize> = outputs.iter().map(Vec::len).collect();
    eprintln!("{MESSAGES} messages taken by {CONSUMERS} processes: {per_process:?}");
    let counts = t.queue.counts().unwrap();
    assert_eq!((counts.incoming, counts.pending, counts.tmp), (0, 0, 0));
}

#[test]
fn recover_never_robs_a_stopped_owner() {
    use std::io::Read;
    let t = TestQueue::new();
    // Bigger than a pipe buffer: `take` blocks writing it out, holding its claim.
    let body = vec![b'z'; 1 << 20];
    t.queue.enqueue(&body).unwrap();
    let mut owner = dirq()
        .arg("take")
        .arg(t.root())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    crate::util::wait_until(Duration::from_secs(30), "the owner to claim", || {
        t.queue.counts().unwrap().pending == 1
    });
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &owner.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    for _ in 0..3 {
        let out = crate::util::run_ok(&["recover", t.root().to_str().unwrap()]);
        assert!(out.contains("requeued 0, left 1 with live owners"), "{out}");
    }
    assert_eq!(t.queue.counts().unwrap().pending, 1);
    signal("-CONT");
    let mut printed = Vec::new();
    owner
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut printed)
        .unwrap();
    assert!(owner.wait().unwrap().success());
    assert_eq!(printed.len(), body.len() + 1);
    assert_eq!(t.queue.counts().unwrap(), dirq::queue::Counts::default());
}
