//! The filesystem remounted read-only under a producer and a Piper.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use dirq::DirectoryQueue;

use crate::inventory::{payload, Inventory};
use crate::support::{self, Figures, Mount, Outcome, Proc};
use crate::Case;

pub const CASE: Case = Case {
    name: "read-only remount under a running Piper",
    injects: "`mount -o remount,ro` under a running producer and forwarding Piper, then back \
              to read-write",
    invariant: "mutations fail fast with a clear EROFS error naming the operation and path; \
                the Piper stays up; `dirq status` works; nothing is deleted; after `remount,rw` \
                every acknowledged message is there exactly once",
    run,
};

fn run(figures: &mut Figures) -> Outcome {
    if let Err(reason) = support::need_root_and(&["mount"]) {
        return Outcome::Skipped(reason);
    }
    let fs = Mount::tmpfs("size=64m");
    let (a, b) = (fs.path().join("a"), fs.path().join("b"));
    DirectoryQueue::open(&a).expect("create a");
    DirectoryQueue::open(&b).expect("create b");
    let (a_str, b_str) = (support::path_str(&a), support::path_str(&b));

    let mut producer = Proc::spawn(
        support::role(&["produce", a_str, "0", "1000000", "300", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let acks = {
        let stdout = producer.0.stdout.take().expect("producer stdout");
        std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .collect::<BTreeSet<u64>>()
        })
    };
    let mut piper = Proc::spawn(
        support::role(&["stage", a_str, b_str, "2", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    support::wait_until(Duration::from_secs(60), "messages to flow into b", || {
        Inventory::take(&[&b]).found.len() >= 50
    });

    // Files open for writing make the remount fail with EBUSY: retry until a moment
    // when none is.
    let remounted = support::wait_for(Duration::from_secs(30), || {
        std::process::Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(fs.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(remounted.is_ok(), "could not remount read-only");
    let read_only_at = Instant::now();
    let frozen = Inventory::take(&[&a, &b]).listing();

    // The producer fails on its next enqueue and says why.
    support::wait_until(Duration::from_secs(30), "the producer to fail", || {
        matches!(producer.0.try_wait(), Ok(Some(_)))
    });
    let failed_after = read_only_at.elapsed();
    let out = producer.finish();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "producer: {stderr}");
    assert_clear(&stderr, a_str, "producer");

    // (b holds what the Piper forwarded; nobody consumes it.)
    for (args, queue, what) in [
        (["push", a_str], a_str, "dirq push"),
        (["take", b_str], b_str, "dirq take"),
    ] {
        let start = Instant::now();
        let out = support::output(support::dirq().args(args).stdin(Stdio::piped()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert_clear(&stderr, queue, what);
        println!("{what} failed in {:?}: {}", start.elapsed(), stderr.trim());
    }
    let status = support::output(support::dirq().args(["status", "--json", a_str, b_str]));
    assert!(
        status.status.success(),
        "dirq status on a read-only filesystem: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let recover = support::output(support::dirq().args(["recover", a_str]));
    assert!(
        !String::from_utf8_lossy(&recover.stderr).contains("panicked"),
        "dirq recover panicked on a read-only filesystem"
    );
    assert!(
        matches!(piper.0.try_wait(), Ok(None)),
        "the Piper died on the read-only filesystem"
    );
    assert_eq!(
        Inventory::take(&[&a, &b]).listing(),
        frozen,
        "the queues changed while read-only"
    );

    fs.remount("rw");
    support::send(piper.id(), rustix::process::Signal::TERM);
    let status = piper.0.wait().expect("wait for the Piper");
    assert!(status.success(), "the Piper did not stop cleanly: {status}");
    let acknowledged = acks.join().expect("acknowledgements");
    for q in [&a, &b] {
        DirectoryQueue::builder(q)
            .tmp_max_age(Duration::ZERO)
            .open()
            .and_then(|q| q.recover())
            .expect("recover after the remount");
    }
    let inventory = Inventory::take(&[&a, &b]);
    inventory.assert_intact("after the read-only spell");
    let lost: Vec<u64> = acknowledged
        .iter()
        .copied()
        .filter(|seq| inventory.places(*seq).is_empty())
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    inventory.assert_empty(&["pending", "tmp"], "after remount,rw");
    // Writing works again.
    DirectoryQueue::open(&a)
        .and_then(|q| q.enqueue(payload(9_999_999, 300)))
        .expect("enqueue after remount,rw");
    figures.set("acknowledged", acknowledged.len());
    figures.set("producer failed after (ms)", failed_after.as_millis());
    figures.set("lost", lost.len());
    figures.set("duplicated", inventory.duplicated().len());
    Outcome::Passed
}

fn assert_clear(stderr: &str, queue: &str, what: &str) {
    assert!(
        stderr.contains("Read-only file system")
            && stderr.contains("failed to ")
            && stderr.contains(queue),
        "{what}: the error does not name the operation, the path and the cause: {stderr}"
    );
}
