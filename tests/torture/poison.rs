//! Poison messages: one the stage rejects, one it panics on, one that kills the whole
//! worker process. A supervisor (this test) restarts the worker each time it dies.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use dirq::{DirectoryQueue, State};

use crate::inventory::{payload, Inventory};
use crate::support::{self, Figures, Outcome, Proc};
use crate::Case;

pub const CASE: Case = Case {
    name: "poison messages",
    injects: "among 30 good messages, one the stage rejects, one it panics on and one on which \
              the worker process SIGKILLs itself; the worker is restarted whenever it dies",
    invariant: "the three are dead-lettered in errors/ with their reasons after at most the \
                maximum attempts (3); the worker dies at most 3 times (no crash loop); the good \
                ones are all delivered once",
    run,
};

const MAX_ATTEMPTS: u32 = 3;
const GOOD: u64 = 30;

fn run(figures: &mut Figures) -> Outcome {
    let dir = support::tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let queue = DirectoryQueue::open(&a).expect("create a");
    DirectoryQueue::open(&b).expect("create b");
    for seq in 0..GOOD {
        queue.enqueue(payload(seq, 300)).expect("enqueue");
        if seq % 10 == 5 {
            let poison = ["poison-error", "poison-panic", "poison-kill"][(seq / 10) as usize];
            queue.enqueue(poison).expect("enqueue poison");
        }
    }
    let max = MAX_ATTEMPTS.to_string();
    // One worker thread: a process that kills itself then takes no bystander with it.
    let spawn = || {
        Proc::spawn(
            support::role(&[
                "stage",
                support::path_str(&a),
                support::path_str(&b),
                "1",
                &max,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        )
    };
    let mut worker = spawn();
    let mut deaths = 0;
    let done = || {
        let counts = queue.counts().expect("counts");
        counts.unfinished() == 0 && counts.errors == 3
    };
    support::wait_until(
        Duration::from_secs(120),
        "the poison to be dead-lettered",
        || {
            if let Some(status) = worker.0.try_wait().expect("poll the worker") {
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "the worker died otherwise: {status}"
                );
                deaths += 1;
                assert!(
                    deaths <= MAX_ATTEMPTS,
                    "crash loop: the worker died {deaths} times"
                );
                worker = spawn();
            }
            done()
        },
    );
    support::send(worker.id(), rustix::process::Signal::TERM);
    let status = worker.0.wait().expect("wait for the worker");
    assert!(
        status.success(),
        "the worker did not stop cleanly: {status}"
    );

    let failed = dirq::admin::list(&queue, State::Errors).expect("list errors/");
    let mut reasons = Vec::new();
    for info in &failed {
        let (_, bytes) = dirq::admin::peek(&queue, &info.id).expect("read a failed message");
        let failure = info.failure.clone().expect("a failure sidecar");
        let reason = failure.reason.unwrap_or_default();
        println!(
            "{}: {reason} (attempts {:?})",
            String::from_utf8_lossy(&bytes),
            failure.attempts
        );
        let expected = match bytes.as_slice() {
            b"poison-error" => "rejects this message",
            b"poison-panic" => "panicked",
            b"poison-kill" => "gave up after 3 attempts",
            other => panic!("a good message failed: {}", String::from_utf8_lossy(other)),
        };
        assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
        reasons.push(reason);
    }
    assert_eq!(reasons.len(), 3);
    let inventory = Inventory::take(&[&b]);
    inventory.assert_intact("delivered");
    for seq in 0..GOOD {
        assert_eq!(inventory.places(seq).len(), 1, "good message {seq}");
    }
    figures.set("worker deaths", deaths);
    figures.set("dead-lettered", reasons.len());
    figures.set("good delivered", GOOD);
    figures.set("lost", 0);
    Outcome::Passed
}
