//! Many recoverers at once over the orphans of a killed worker.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use dirq::{DirectoryQueue, State};

use crate::inventory::{payload, Inventory};
use crate::support::{self, Figures, Outcome, Proc};
use crate::Case;

pub const CASE: Case = Case {
    name: "concurrent recovery",
    injects: "a worker holding 1,000 claims is SIGKILLed; 4 `dirq recover` processes start at \
              once; three rounds",
    invariant: "the requeued counts add up to 1,000 in every round, each orphan is in incoming/ \
                exactly once, and its attempt count went up by exactly one per round",
    run,
};

const ORPHANS: u64 = 1000;
const RECOVERERS: usize = 4;
const ROUNDS: u32 = 3;

fn run(figures: &mut Figures) -> Outcome {
    let dir = support::tempdir();
    let root = dir.path().join("q");
    let queue = DirectoryQueue::open(&root).expect("create the queue");
    queue
        .enqueue_batch((0..ORPHANS).map(|seq| payload(seq, 200)))
        .expect("enqueue");
    let q = support::path_str(&root);
    for round in 1..=ROUNDS {
        // A worker claims everything, then dies.
        let mut holder = Proc::spawn(
            support::role(&["hold", q, &ORPHANS.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let stdout = BufReader::new(holder.0.stdout.take().expect("stdout"));
        let mut claimed = BTreeSet::new();
        for line in stdout.lines() {
            let line = line.expect("read the holder");
            if line == "writing" {
                break;
            }
            let seq: u64 = line
                .strip_prefix("claimed ")
                .and_then(|s| s.parse().ok())
                .expect("claimed SEQ");
            claimed.insert(seq);
        }
        assert_eq!(claimed.len() as u64, ORPHANS);
        support::kill(&mut holder.0);
        assert_eq!(
            queue.count(State::Pending).expect("count"),
            ORPHANS as usize
        );

        let recoverers: Vec<Proc> = (0..RECOVERERS)
            .map(|_| {
                Proc::spawn(
                    support::dirq()
                        .args(["recover", q])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped()),
                )
            })
            .collect();
        let mut requeued = Vec::new();
        for mut recoverer in recoverers {
            let out = recoverer.finish();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "recover: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let n: u64 = text
                .split("requeued ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no requeued count in {text:?}"));
            requeued.push(n);
        }
        println!("round {round}: the recoverers requeued {requeued:?}");
        assert_eq!(
            requeued.iter().sum::<u64>(),
            ORPHANS,
            "round {round}: {requeued:?}"
        );

        // The holder's temporary file: its writer is gone, so recovery removes it once
        // allowed to call it stale (here at once); nothing else is left to requeue.
        let report = DirectoryQueue::builder(&root)
            .tmp_max_age(Duration::ZERO)
            .open()
            .and_then(|q| q.recover())
            .expect("recover");
        assert_eq!((report.requeued, report.tmp_removed), (0, 1), "{report:?}");
        let inventory = Inventory::take(&[&root]);
        inventory.assert_intact(&format!("round {round}"));
        assert_eq!(inventory.in_state("incoming").len() as u64, ORPHANS);
        assert!(inventory.in_state("pending").is_empty());
        let attempts: BTreeSet<Option<u32>> = dirq::admin::list(&queue, State::Incoming)
            .expect("list")
            .into_iter()
            .map(|info| info.attempts)
            .collect();
        assert_eq!(
            attempts,
            BTreeSet::from([Some(round)]),
            "round {round}: attempt counts after recovery"
        );
        figures.add("orphans recovered", ORPHANS);
        figures.set("rounds", round);
    }
    figures.set("recoverers", RECOVERERS);
    figures.set("requeued twice", 0);
    figures.set("lost", 0);
    Outcome::Passed
}
