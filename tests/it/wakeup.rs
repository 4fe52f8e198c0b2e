//! An idle claimer that found `incoming/` empty claims the names its filesystem events
//! carry without reading the directory again (docs/protocol.md §5.3), and those names
//! get every check a scanned name gets.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use dirq::{DirectoryQueue, MessageId, State};

use crate::util::{names_in, wait_until, TestQueue};

/// A claimer of `t`'s queue that only an event can wake before the test ends, claiming
/// and committing until `stop` arrives. Sends each claimed id.
fn claimer(t: &TestQueue) -> (DirectoryQueue, mpsc::Receiver<MessageId>, JoinHandle<()>) {
    let queue = DirectoryQueue::builder(t.root())
        .rescan_interval(Duration::from_secs(3600))
        .open()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let claiming = queue.clone();
    let thread = std::thread::spawn(move || {
        while let Some(message) = claiming.claim_timeout(Duration::from_secs(60)).unwrap() {
            let id = message.id().clone();
            message.commit().unwrap();
            if tx.send(id).is_err() {
                return;
            }
        }
    });
    (queue, rx, thread)
}

/// A [`claimer`] that has claimed one message after waiting for it, so that it found
/// `incoming/` empty with its watch recording: from now on it trusts its events.
fn trusting_claimer(t: &TestQueue) -> (DirectoryQueue, mpsc::Receiver<MessageId>, JoinHandle<()>) {
    let (queue, rx, thread) = claimer(t);
    // Its first read of incoming/ comes before its watch, its second after: only once
    // that one has started can the message arrive while the watch records. Sent
    // earlier, the message is found by reads, and the claimer trusts its events only
    // after one more read that finds incoming/ empty (a loaded machine did that).
    wait_until(
        Duration::from_secs(30),
        "the claimer to look with its watch on",
        || queue.claim_stats().scans >= 2,
    );
    let first = t.queue.enqueue(b"first").unwrap();
    assert_eq!(received(&rx), first);
    (queue, rx, thread)
}

fn received(rx: &mpsc::Receiver<MessageId>) -> MessageId {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the claimer claimed the message")
}

#[test]
fn a_woken_claimer_claims_what_the_events_name_without_reading_incoming() {
    let t = TestQueue::new();
    let (claimer, rx, thread) = trusting_claimer(&t);
    let scans = claimer.claim_stats().scans;
    // Each message arrives while the claimer waits, or is about to: either way, it
    // finds the new name among the events it recorded.
    for i in 0..50 {
        let id = t.queue.enqueue(format!("message {i}").as_bytes()).unwrap();
        assert_eq!(received(&rx), id);
    }
    let more = claimer.claim_stats().scans - scans;
    // Without the events' names, each of the 50 wake-ups would read the directory.
    assert!(more <= 2, "{more} directory reads for 50 wake-ups");
    drop(rx);
    t.queue.enqueue(b"stop").unwrap();
    thread.join().unwrap();
}

#[test]
fn names_from_events_get_the_checks_of_scanned_names() {
    let t = TestQueue::new();
    let (_claimer, rx, _thread) = trusting_claimer(&t);

    // Planted while the claimer trusts its events; they sort before the message.
    let incoming = t.path(State::Incoming);
    std::fs::write(incoming.join(".000-in-progress"), b"partial").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", incoming.join("000-link")).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(incoming.join("000-fifo"))
        .status()
        .unwrap();
    assert!(status.success());
    let id = t.queue.enqueue(b"after them").unwrap();
    assert_eq!(received(&rx), id);

    let errors = names_in(&t.path(State::Errors));
    assert!(errors.contains(&"000-fifo".to_owned()), "{errors:?}");
    assert!(errors.contains(&"000-link".to_owned()), "{errors:?}");
    assert_eq!(names_in(&incoming), [".000-in-progress"]);
}

#[test]
fn a_message_that_arrived_locked_is_claimed_once_unlocked() {
    let t = TestQueue::new();
    let (claimer, rx, _thread) = trusting_claimer(&t);

    // Arrives with its lock held, as a message being released does: the claimer's
    // attempt finds it locked, and no event will say when the lock goes.
    let name = "1700000000.000000001.test.1.00000001.msg";
    let staged = t.path(State::Tmp).join(name);
    std::fs::write(&staged, b"locked").unwrap();
    let held = std::fs::File::open(&staged).unwrap();
    fs2::FileExt::try_lock_exclusive(&held).unwrap();
    std::fs::rename(&staged, t.path(State::Incoming).join(name)).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the claimer to find it locked",
        || claimer.claim_stats().collisions >= 1,
    );
    drop(held);

    assert_eq!(received(&rx).to_string(), name);
}
