//! A million messages in one queue.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use dirq::{DirectoryQueue, Durability, State};

use crate::inventory::payload;
use crate::support::{self, Figures, Mount, Outcome, Proc};
use crate::Case;

pub const CASE: Case = Case {
    name: "1,000,000 messages",
    injects: "1,000,000 messages (durability none) in one queue on tmpfs, drained by one \
              worker process",
    invariant: "counts are exact (library, `dirq status`, id iteration); every message is \
                claimed once; full directory scans stay few (claim cost does not grow with \
                the queue); the worker's peak RSS stays bounded (< 128 MiB asserted)",
    run,
};

const MESSAGES: u64 = 1_000_000;
const SEGMENT: u64 = 100_000;

fn run(figures: &mut Figures) -> Outcome {
    if let Err(reason) = support::need_root_and(&["mount"]) {
        return Outcome::Skipped(reason);
    }
    let fs = Mount::tmpfs("size=8g,nr_inodes=2m");
    let root = fs.path().join("q");
    let queue = DirectoryQueue::builder(&root)
        .durability(Durability::None)
        .open()
        .expect("create the queue");
    let start = Instant::now();
    let mut seq = 0;
    while seq < MESSAGES {
        let batch = (seq..seq + 10_000).map(|s| payload(s, 100));
        queue.enqueue_batch(batch).expect("enqueue");
        seq += 10_000;
    }
    let enqueue_rate = MESSAGES as f64 / start.elapsed().as_secs_f64();
    println!(
        "enqueued {MESSAGES} in {:?} ({enqueue_rate:.0}/s)",
        start.elapsed()
    );

    assert_eq!(
        queue.count(State::Incoming).expect("count") as u64,
        MESSAGES
    );
    assert_eq!(
        queue.ids(State::Incoming).expect("ids").count() as u64,
        MESSAGES
    );
    let status = support::sh(
        env!("CARGO_BIN_EXE_dirq"),
        &["status", "--json", support::path_str(&root)],
    );
    let status: serde_json::Value = serde_json::from_str(status.trim()).expect("status JSON");
    assert_eq!(status["incoming"], MESSAGES, "{status}");

    // Drain in a worker process of its own, so that its memory is its own.
    let mut worker = Proc::spawn(
        support::role(&["drain", support::path_str(&root)])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let lines: Vec<String> = BufReader::new(worker.0.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(
        worker.0.wait().expect("wait").success(),
        "the worker failed: {lines:?}"
    );
    // Lines: `segment <claimed> <ms>` every SEGMENT claims, then
    // `done <claimed> <scans> <peak RSS KiB>`.
    let mut segments = Vec::new();
    let mut done = None;
    for line in &lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["segment", _, ms] => segments.push(ms.parse::<f64>().expect("ms")),
            ["done", claimed, scans, peak] => {
                done = Some((
                    claimed.parse::<u64>().expect("claimed"),
                    scans.parse::<u64>().expect("scans"),
                    peak.parse::<u64>().expect("peak"),
                ))
            }
            _ => panic!("unexpected worker line {line:?}"),
        }
    }
    let (claimed, scans, peak_kib) = done.expect("the worker's summary");
    assert_eq!(claimed, MESSAGES, "claimed");
    assert_eq!(
        queue.counts().expect("counts"),
        dirq::queue::Counts::default()
    );
    // One scan reads the whole directory and keeps the 128Ki oldest names; so a million
    // messages need about 8 of them (plus a few after the queue ran dry), not one per
    // claim.
    assert!(
        scans <= 24,
        "{scans} full directory scans for {MESSAGES} claims"
    );
    assert!(peak_kib < 128 * 1024, "worker peak RSS {peak_kib} KiB");
    let per_segment: Vec<String> = segments
        .iter()
        .map(|ms| format!("{:.0}", SEGMENT as f64 / ms * 1000.0))
        .collect();
    println!(
        "claim+commit rate per {SEGMENT} (msg/s): {}",
        per_segment.join(", ")
    );
    let (first, last) = (segments[0], segments[segments.len() - 1]);
    figures.set("messages", MESSAGES);
    figures.set("enqueue msg/s", format!("{enqueue_rate:.0}"));
    figures.set(
        "claim+commit msg/s, first 100k",
        format!("{:.0}", SEGMENT as f64 / first * 1000.0),
    );
    figures.set(
        "last 100k",
        format!("{:.0}", SEGMENT as f64 / last * 1000.0),
    );
    figures.set("full scans", scans);
    figures.set(
        "worker peak RSS MiB",
        format!("{:.1}", peak_kib as f64 / 1024.0),
    );
    figures.set("lost", 0);
    figures.set("duplicated", 0);
    Outcome::Passed
}

/// The worker: `drain QUEUE`. Claims and commits until the queue is empty, printing
/// `segment <claimed> <ms>` every 100,000 claims and `done <claimed> <scans> <peak RSS
/// KiB>` at the end.
pub fn child(args: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let [root] = args else {
        return Err(format!("drain QUEUE, not {args:?}").into());
    };
    let queue = DirectoryQueue::builder(root)
        .durability(Durability::None)
        .rescan_interval(Duration::from_secs(1))
        .open()?;
    let mut claimed = 0u64;
    let mut segment = Instant::now();
    while let Some(message) = queue.try_claim()? {
        message.commit()?;
        claimed += 1;
        if claimed % SEGMENT == 0 {
            println!(
                "segment {claimed} {:.3}",
                segment.elapsed().as_secs_f64() * 1000.0
            );
            segment = Instant::now();
        }
    }
    let (_, peak) = support::rss_kib(std::process::id());
    println!("done {claimed} {} {peak}", queue.claim_stats().scans);
    Ok(())
}
