//! Crash-point enumeration: each operation is run once under `strace` to list its
//! system calls, then once more per call, killed with SIGKILL as it enters that call.
//! After recovery, the queue must hold what the protocol promises for a crash there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dirq::queue::RetryPolicy;
use dirq::{DirectoryQueue, Durability, Enqueued, MessageId};

use crate::inventory::{payload, Inventory};
use crate::support::{self, Figures, Outcome};
use crate::Case;

pub const CASE: Case = Case {
    name: "crash points",
    injects: "SIGKILL at each system call k of enqueue, batch enqueue, claim, commit, forward, \
              fail, release, retry, hold, requeue, edit, the failure of a group member that \
              cancels the others, the commit of a chain member that lets the next in, \
              an idempotent enqueue and a commit that records its id in seen/ \
              (strace inject, full durability)",
    invariant: "after recover: acknowledged operations took effect, an interrupted one took \
                effect wholly or not at all (the message exactly once, intact), other messages \
                untouched, nothing in pending/ or tmp/, a second recover changes nothing; \
                an idempotent enqueue repeated after recovery leaves its id stored once, \
                and a committed id is refused",
    run,
};

const OPS: &[&str] = &[
    "enqueue",
    "batch",
    "claim",
    "commit",
    "forward",
    "fail",
    "release",
    "retry",
    "hold",
    "requeue",
    "edit",
    "group-fail",
    "chain-commit",
    "enqueue-with-id",
    "commit-seen",
];

/// The id `enqueue-with-id` stores its message under.
const FIXED_ID: &str = "crash-once";

/// The payload the operation works on, and the ones beside it.
const SUBJECT: u64 = 1;
const BYSTANDERS: [u64; 2] = [2, 3];
/// The payloads a (batch) enqueue adds.
const NEW: [u64; 3] = [10, 11, 12];
/// The content an edit gives the subject.
const EDITED: u64 = 20;
/// The members of the group whose first member fails, or of the chain whose first
/// member is committed.
const MEMBERS: [u64; 3] = [30, 31, 32];
const SIZE: usize = 5000;

/// The system call the child makes just before and just after the operation, so that
/// the parent can find the operation in the trace. Nothing else in the child makes it.
fn marker() {
    let _ = rustix::process::getppid();
}
const MARKER: &str = "getppid";

fn run(figures: &mut Figures) -> Outcome {
    if let Err(reason) = support::need_tools(&["strace"]) {
        return Outcome::Skipped(reason);
    }
    let mut total = 0;
    for op in OPS {
        let points = enumerate(op);
        assert!(
            points.len() >= 2,
            "{op}: the trace between the markers has too few system calls: {points:?}"
        );
        let mut missed = 0;
        for (k, (call, occurrence)) in points.iter().enumerate() {
            let scratch = support::tempdir();
            let setup = Setup::new(scratch.path(), op);
            let out = support::output(
                support::role_under_strace(&[
                    "-o",
                    "/dev/null",
                    "-e",
                    &format!("inject={call}:signal=KILL:when={occurrence}"),
                ])
                .args(["crashpoint", op])
                .arg(scratch.path())
                .arg(setup.subject_id.to_string()),
            );
            let acked = String::from_utf8_lossy(&out.stdout).contains("ack");
            if acked {
                // The calls of this run did not line up with the first one's (the
                // kill came later or never); the outcome must still be an acknowledged
                // one.
                missed += 1;
            }
            let context = format!("{op}: killed entering system call {k} ({call} #{occurrence})");
            setup.check_after_recovery(op, acked, &context);
        }
        println!(
            "{op}: {} crash points checked ({missed} did not line up with the first trace)",
            points.len()
        );
        figures.set(&format!("{op} points"), points.len());
        total += points.len();
        assert!(
            missed * 4 <= points.len(),
            "{op}: {missed} of {} runs did not crash where the first trace said",
            points.len()
        );
    }
    figures.set("crash points", total);
    Outcome::Passed
}

/// Runs `op` once, traced, checks its acknowledged outcome, and lists the system calls
/// between the markers as (name, occurrence of that name since the process started),
/// the end marker included: a kill there is a finished but unacknowledged operation.
fn enumerate(op: &str) -> Vec<(String, usize)> {
    let scratch = support::tempdir();
    let setup = Setup::new(scratch.path(), op);
    let trace = scratch.path().join("trace");
    let out = support::output(
        support::role_under_strace(&["-o", support::path_str(&trace)])
            .args(["crashpoint", op])
            .arg(scratch.path())
            .arg(setup.subject_id.to_string()),
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ack"),
        "{op} did not run cleanly under strace ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    setup.check_after_recovery(op, true, &format!("{op}, not interrupted"));

    let text = std::fs::read_to_string(&trace).expect("read the trace");
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut between = Vec::new();
    let mut markers = 0;
    for line in text.lines() {
        let Some((name, _)) = line.split_once('(') else {
            continue;
        };
        if name.starts_with("---") || name.starts_with("+++") || name.contains(' ') {
            continue;
        }
        let occurrence = {
            let n = seen.entry(name.to_owned()).or_default();
            *n += 1;
            *n
        };
        if markers == 1 {
            between.push((name.to_owned(), occurrence));
        }
        if name == MARKER {
            markers += 1;
            if markers == 2 {
                break;
            }
        }
    }
    assert_eq!(markers, 2, "{op}: the trace does not hold both markers");
    between
}

/// A fresh pair of queues `a` and `b`: the subject (the oldest message) and two
/// bystanders in `a/incoming/`.
struct Setup {
    a: PathBuf,
    b: PathBuf,
    subject_id: MessageId,
}

impl Setup {
    fn new(dir: &Path, op: &str) -> Setup {
        let (a, b) = (dir.join("a"), dir.join("b"));
        let qa = if op == "enqueue-with-id" || op == "commit-seen" {
            // A setting of the queue: the child, opening `a` plainly, honours it.
            DirectoryQueue::builder(&a)
                .durability(Durability::Full)
                .remember_finished(Duration::from_secs(3600))
                .open()
        } else {
            open(&a)
        }
        .expect("create a");
        open(&b).expect("create b");
        let id = qa
            .enqueue(payload(SUBJECT, SIZE))
            .expect("enqueue the subject");
        for seq in BYSTANDERS {
            qa.enqueue(payload(seq, SIZE)).expect("enqueue a bystander");
        }
        Setup {
            a,
            b,
            subject_id: id,
        }
    }

    /// Recovers twice and checks the queues: the second recovery must change nothing.
    fn check_after_recovery(&self, op: &str, acked: bool, context: &str) {
        let recover = |q: &Path| {
            DirectoryQueue::builder(q)
                .tmp_max_age(Duration::ZERO)
                .open()
                .and_then(|q| q.recover())
                .unwrap_or_else(|e| panic!("{context}: recover {}: {e}", q.display()))
        };
        recover(&self.a);
        recover(&self.b);
        let inventory = Inventory::take(&[&self.a, &self.b]);
        let first = inventory.listing();
        recover(&self.a);
        recover(&self.b);
        let second = Inventory::take(&[&self.a, &self.b]).listing();
        assert_eq!(
            first, second,
            "{context}: a second recover changed the queues"
        );

        inventory.assert_intact(context);
        inventory.assert_empty(&["pending", "tmp"], context);
        let untouched: &[u64] = match op {
            "enqueue" | "batch" | "group-fail" | "chain-commit" | "enqueue-with-id" => {
                &[SUBJECT, BYSTANDERS[0], BYSTANDERS[1]]
            }
            _ => &BYSTANDERS,
        };
        for &seq in untouched {
            assert_eq!(
                self.places(&inventory, seq),
                ["a/incoming"],
                "{context}: bystander {seq} moved"
            );
        }
        if op == "group-fail" {
            // The failure and its cancellations are one step to an observer after
            // recovery: all members in errors/, or (the failure never happened) all
            // waiting; never some of each.
            let places: Vec<Vec<String>> = MEMBERS
                .iter()
                .map(|&seq| self.places(&inventory, seq))
                .collect();
            let all_in = |place: &str| places.iter().all(|p| p == &[place]);
            assert!(
                all_in("a/errors") || (!acked && all_in("a/incoming")),
                "{context}: group members in {places:?}"
            );
            return;
        }
        if op == "chain-commit" {
            // Committed, with the next member let in or about to be by recovery; or
            // not committed, the next still waiting. Never two current members.
            let places: Vec<Vec<String>> = MEMBERS
                .iter()
                .map(|&seq| self.places(&inventory, seq))
                .collect();
            let done = [
                vec![],
                vec!["a/incoming".to_owned()],
                vec!["a/chained".to_owned()],
            ];
            let not_done = [
                vec!["a/incoming".to_owned()],
                vec!["a/chained".to_owned()],
                vec!["a/chained".to_owned()],
            ];
            assert!(
                places == done || (!acked && places == not_done),
                "{context}: chain members in {places:?}"
            );
            return;
        }
        if op == "edit" {
            // Exactly once, under the subject's id: the old content or (always, once
            // acknowledged) the new; never both, never neither.
            let old = self.places(&inventory, SUBJECT);
            let new = self.places(&inventory, EDITED);
            let either = (old == ["a/incoming"] && new.is_empty())
                || (old.is_empty() && new == ["a/incoming"]);
            assert!(either, "{context}: old content in {old:?}, new in {new:?}");
            assert!(
                !acked || !new.is_empty(),
                "{context}: acknowledged, but not edited"
            );
            let names: Vec<_> = [SUBJECT, EDITED]
                .iter()
                .flat_map(|&seq| inventory.places(seq))
                .map(|f| f.name.clone())
                .collect();
            assert_eq!(
                names,
                [std::ffi::OsString::from(self.subject_id.as_os_str())],
                "{context}: the message changed its id"
            );
            return;
        }
        let (subjects, allowed, done): (&[u64], &[&[&str]], &[&str]) = match op {
            "enqueue" | "enqueue-with-id" => (&NEW[..1], &[&[], &["a/incoming"]], &["a/incoming"]),
            "commit-seen" => (&[SUBJECT], &[&["a/incoming"], &[]], &[]),
            "batch" => (&NEW, &[&[], &["a/incoming"]], &["a/incoming"]),
            "claim" | "release" => (&[SUBJECT], &[&["a/incoming"]], &["a/incoming"]),
            "commit" => (&[SUBJECT], &[&["a/incoming"], &[]], &[]),
            "forward" => (
                &[SUBJECT],
                &[&["a/incoming"], &["b/incoming"]],
                &["b/incoming"],
            ),
            "fail" => (&[SUBJECT], &[&["a/incoming"], &["a/errors"]], &["a/errors"]),
            "retry" => (
                &[SUBJECT],
                &[&["a/incoming"], &["a/deferred"]],
                &["a/deferred"],
            ),
            "hold" => (&[SUBJECT], &[&["a/incoming"], &["a/hold"]], &["a/hold"]),
            "requeue" => (
                &[SUBJECT],
                &[&["a/errors"], &["a/incoming"]],
                &["a/incoming"],
            ),
            _ => panic!("unknown operation {op}"),
        };
        let mut batch_outcomes = Vec::new();
        for &seq in subjects {
            let places = self.places(&inventory, seq);
            if acked {
                assert_eq!(
                    places, done,
                    "{context}: acknowledged, but payload {seq} is not where it should be"
                );
            } else {
                assert!(
                    allowed.iter().any(|a| places == *a),
                    "{context}: payload {seq} is in {places:?}; allowed: {allowed:?}"
                );
            }
            batch_outcomes.push(places.is_empty());
        }
        if op == "batch" && !acked {
            // A batch is published message by message: a crash may leave a prefix
            // of it published, never a gap.
            let published = batch_outcomes.iter().take_while(|gone| !**gone).count();
            assert!(
                batch_outcomes[published..].iter().all(|gone| *gone),
                "{context}: the batch was published with a gap: {batch_outcomes:?}"
            );
        }
        if op == "enqueue-with-id" || op == "commit-seen" {
            self.check_repeated_enqueue(op, context);
        }
        if let Some(failed) = inventory
            .places(SUBJECT)
            .into_iter()
            .find(|f| f.state == "errors")
        {
            let mut sidecar = failed.name.clone();
            sidecar.push(".meta");
            let text = std::fs::read_to_string(self.a.join("errors").join(&sidecar))
                .unwrap_or_else(|e| panic!("{context}: a failed message without its sidecar: {e}"));
            let meta: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{context}: sidecar is not JSON ({e}): {text:?}"));
            assert!(
                meta["reason"].is_string(),
                "{context}: sidecar without a reason: {meta}"
            );
        }
    }

    /// A producer that repeats the enqueue after the crash (it was not acknowledged, or
    /// its acknowledgement was lost) must not make a second copy: the message it
    /// enqueues ends up in the queue exactly once, or, when its id was committed,
    /// not at all.
    fn check_repeated_enqueue(&self, op: &str, context: &str) {
        let (id, seq) = match op {
            "enqueue-with-id" => (MessageId::new(FIXED_ID).expect("a valid id"), NEW[0]),
            _ => (self.subject_id.clone(), SUBJECT),
        };
        let before = self.places(&Inventory::take(&[&self.a, &self.b]), seq);
        let queue = open(&self.a).unwrap_or_else(|e| panic!("{context}: open a: {e}"));
        let enqueued = queue
            .enqueue_with_id(&id, payload(seq, SIZE))
            .unwrap_or_else(|e| panic!("{context}: repeated enqueue_with_id: {e}"));
        let after = self.places(&Inventory::take(&[&self.a, &self.b]), seq);
        let expected: &[&str] = if op == "commit-seen" && before.is_empty() {
            assert_eq!(
                enqueued,
                Enqueued::AlreadyFinished,
                "{context}: the commit took effect but its id was not remembered"
            );
            &[]
        } else {
            &["a/incoming"]
        };
        assert_eq!(
            after, expected,
            "{context}: after a repeated enqueue ({enqueued:?}), payload {seq} is in {after:?}"
        );
    }

    /// Where payload `seq` is, as `queue/state` names.
    fn places(&self, inventory: &Inventory, seq: u64) -> Vec<String> {
        inventory
            .places(seq)
            .iter()
            .map(|f| {
                let queue = if f.queue == self.a { "a" } else { "b" };
                format!("{queue}/{}", f.state)
            })
            .collect()
    }
}

fn open(path: &Path) -> dirq::Result<DirectoryQueue> {
    DirectoryQueue::builder(path)
        .durability(Durability::Full)
        .retry_policy(
            RetryPolicy::builder()
                .max_attempts(100)
                .build()
                .expect("a valid policy"),
        )
        .open()
}

/// The child: `crashpoint OP DIR REQUEUE_ID`. Prepares what `OP` needs, then runs it
/// between two markers and prints `ack` once it has returned.
pub fn child(args: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let [op, dir, subject_id] = args else {
        return Err(format!("crashpoint OP DIR REQUEUE_ID, not {args:?}").into());
    };
    let dir = Path::new(dir);
    let (a, b) = (open(&dir.join("a"))?, open(&dir.join("b"))?);
    let subject_id: MessageId = subject_id.parse()?;
    if *op == "requeue" {
        // Not part of the operation: put the subject in errors/ first.
        a.try_claim()?
            .ok_or("nothing to claim")?
            .fail("set up for requeue")
            .map_err(|e| e.into_error())?;
    }
    if *op == "group-fail" || *op == "chain-commit" {
        // Not part of the operation: the group, and its first member claimed (the
        // older messages are claimed and kept; recovery puts them back).
        let group = match *op {
            "group-fail" => dirq::queue::Group::new("crash")?,
            _ => dirq::queue::Group::ordered("crash")?,
        };
        for seq in MEMBERS {
            a.enqueue_in_group(&group, payload(seq, SIZE))?;
        }
        for _ in 0..3 {
            std::mem::forget(a.try_claim()?.ok_or("nothing to claim")?);
        }
    }
    let claimed = match *op {
        "commit" | "forward" | "fail" | "release" | "retry" | "group-fail" | "chain-commit"
        | "commit-seen" => Some(a.try_claim()?.ok_or("nothing to claim")?),
        _ => None,
    };
    marker();
    match (*op, claimed) {
        ("enqueue", _) => drop(a.enqueue(payload(NEW[0], SIZE))?),
        ("enqueue-with-id", _) => {
            let id = MessageId::new(FIXED_ID)?;
            match a.enqueue_with_id(&id, payload(NEW[0], SIZE))? {
                Enqueued::Stored => {}
                other => return Err(format!("nothing stored: {other:?}").into()),
            }
        }
        ("batch", _) => drop(a.enqueue_batch(NEW.iter().map(|seq| payload(*seq, SIZE)))?),
        // Kept claimed until the process ends.
        ("claim", _) => std::mem::forget(a.try_claim()?.ok_or("nothing to claim")?),
        ("hold", _) => drop(dirq::admin::hold(&a, &subject_id)?),
        ("requeue", _) => dirq::admin::requeue(&a, &subject_id, false)?,
        ("edit", _) => drop(dirq::admin::replace(
            &a,
            &subject_id,
            &payload(EDITED, SIZE),
        )?),
        ("commit" | "chain-commit" | "commit-seen", Some(m)) => m.commit()?,
        ("forward", Some(m)) => m.forward(&b)?,
        ("fail" | "group-fail", Some(m)) => m.fail("crash-point test")?,
        ("release", Some(m)) => m.release()?,
        ("retry", Some(m)) => drop(m.retry("crash-point test")?),
        _ => return Err(format!("unknown operation {op}").into()),
    }
    marker();
    println!("ack");
    Ok(())
}
