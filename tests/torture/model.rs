//! Model-based test: random interleavings of the operations of several simulated
//! workers (each with handles of its own, as separate processes have), checked after
//! every step against an in-memory model of where each message must be.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use dirq::{DirectoryQueue, Durability, Message};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::inventory::{self, payload, Inventory};
use crate::support::{self, Figures, Outcome};
use crate::Case;

pub const CASE: Case = Case {
    name: "model-based (proptest)",
    injects: "random sequences of enqueue, claim, commit, forward, fail, release, retry, crash \
              (claims dropped unfinished) and recover by 3 workers with their own handles",
    invariant: "after every step each message is exactly where the model says (or, when \
                deferred and due, in incoming/); a claim finds a message whenever one waits in \
                incoming/; recover requeues exactly the crashed workers' claims",
    run,
};

const WORKERS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Enqueue(usize),
    Claim(usize),
    Commit(usize, usize),
    Forward(usize, usize),
    Fail(usize, usize),
    Release(usize, usize),
    Retry(usize, usize),
    Crash(usize),
    Recover(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let w = 0..WORKERS;
    let i = 0..4usize;
    prop_oneof![
        3 => w.clone().prop_map(Op::Enqueue),
        4 => w.clone().prop_map(Op::Claim),
        2 => (w.clone(), i.clone()).prop_map(|(w, i)| Op::Commit(w, i)),
        2 => (w.clone(), i.clone()).prop_map(|(w, i)| Op::Forward(w, i)),
        1 => (w.clone(), i.clone()).prop_map(|(w, i)| Op::Fail(w, i)),
        1 => (w.clone(), i.clone()).prop_map(|(w, i)| Op::Release(w, i)),
        1 => (w.clone(), i).prop_map(|(w, i)| Op::Retry(w, i)),
        1 => w.clone().prop_map(Op::Crash),
        1 => w.prop_map(Op::Recover),
    ]
}

/// Where the model says a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Incoming,
    /// Claimed by a live worker.
    Claimed,
    /// Claimed by a worker that crashed: in pending/, unlocked.
    Orphaned,
    /// Retried, due at once: in deferred/ until some claimer moves it back.
    Deferred,
    Errors,
    Forwarded,
    Gone,
}

struct Worker {
    a: DirectoryQueue,
    b: DirectoryQueue,
    held: Vec<(u64, Message)>,
}

struct World {
    _dir: tempfile::TempDir,
    a_path: std::path::PathBuf,
    b_path: std::path::PathBuf,
    workers: Vec<Worker>,
    model: BTreeMap<u64, Place>,
    next: u64,
}

impl World {
    fn new() -> World {
        let dir = support::tempdir();
        let (a_path, b_path) = (dir.path().join("a"), dir.path().join("b"));
        let open = |p: &Path| {
            DirectoryQueue::builder(p)
                .durability(Durability::None)
                .retry_policy(
                    dirq::queue::RetryPolicy::builder()
                        .max_attempts(1000)
                        .build()
                        .expect("a valid policy"),
                )
                .open()
                .expect("open")
        };
        let workers = (0..WORKERS)
            .map(|_| Worker {
                a: open(&a_path),
                b: open(&b_path),
                held: Vec::new(),
            })
            .collect();
        World {
            _dir: dir,
            a_path,
            b_path,
            workers,
            model: BTreeMap::new(),
            next: 0,
        }
    }

    /// Takes the `i`-th (modulo) message `w` holds.
    fn take(&mut self, w: usize, i: usize) -> Option<(u64, Message)> {
        let held = &mut self.workers[w].held;
        (!held.is_empty()).then(|| held.remove(i % held.len()))
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            TestCaseError::fail(format!("{op:?}: {what}: {e}"))
        };
        match *op {
            Op::Enqueue(w) => {
                let seq = self.next;
                self.next += 1;
                self.workers[w]
                    .a
                    .enqueue(payload(seq, 64))
                    .map_err(|e| fail("enqueue", &e))?;
                self.model.insert(seq, Place::Incoming);
            }
            Op::Claim(w) => {
                let waiting = self.model.values().any(|p| *p == Place::Incoming);
                match self.workers[w]
                    .a
                    .try_claim()
                    .map_err(|e| fail("claim", &e))?
                {
                    Some(message) => {
                        let bytes = message.bytes().map_err(|e| fail("read", &e))?;
                        let seq = inventory::parse(&bytes).map_err(|e| fail("payload", &e))?;
                        let place = self.model.get(&seq).copied();
                        prop_assert!(
                            matches!(place, Some(Place::Incoming | Place::Deferred)),
                            "{op:?} claimed {seq}, which the model has {place:?}"
                        );
                        self.model.insert(seq, Place::Claimed);
                        self.workers[w].held.push((seq, message));
                    }
                    None => prop_assert!(!waiting, "{op:?} found nothing, but messages wait"),
                }
            }
            Op::Commit(w, i)
            | Op::Forward(w, i)
            | Op::Fail(w, i)
            | Op::Release(w, i)
            | Op::Retry(w, i) => {
                let Some((seq, message)) = self.take(w, i) else {
                    return Ok(());
                };
                let b = self.workers[w].b.clone();
                let (result, place) = match op {
                    Op::Commit(..) => (message.commit(), Place::Gone),
                    Op::Forward(..) => (message.forward(&b), Place::Forwarded),
                    Op::Fail(..) => (message.fail("model"), Place::Errors),
                    Op::Release(..) => (message.release(), Place::Incoming),
                    _ => (
                        message
                            .retry_at("model", SystemTime::now() - Duration::from_secs(1))
                            .map(drop),
                        Place::Deferred,
                    ),
                };
                result.map_err(|e| fail("terminal", &e))?;
                self.model.insert(seq, place);
            }
            Op::Crash(w) => {
                for (seq, message) in self.workers[w].held.drain(..) {
                    drop(message);
                    self.model.insert(seq, Place::Orphaned);
                }
            }
            Op::Recover(w) => {
                let orphans = self
                    .model
                    .values()
                    .filter(|p| **p == Place::Orphaned)
                    .count();
                let report = self.workers[w]
                    .a
                    .recover()
                    .map_err(|e| fail("recover", &e))?;
                prop_assert_eq!(report.requeued, orphans, "{:?}: {:?}", op, report);
                for place in self.model.values_mut() {
                    if *place == Place::Orphaned {
                        *place = Place::Incoming;
                    }
                }
            }
        }
        self.check(op)
    }

    /// Compares the queues on disk with the model.
    fn check(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let inventory = Inventory::take(&[&self.a_path, &self.b_path]);
        prop_assert!(
            inventory.damaged().is_empty(),
            "{op:?}: damaged {:?}",
            inventory.damaged()
        );
        for (seq, place) in self.model.iter_mut() {
            let found: Vec<(bool, &str)> = inventory
                .places(*seq)
                .iter()
                .map(|f| (f.queue == self.a_path, f.state))
                .collect();
            let expected: &[&[(bool, &str)]] = match place {
                Place::Incoming => &[&[(true, "incoming")]],
                Place::Claimed | Place::Orphaned => &[&[(true, "pending")]],
                Place::Deferred => &[&[(true, "deferred")], &[(true, "incoming")]],
                Place::Errors => &[&[(true, "errors")]],
                Place::Forwarded => &[&[(false, "incoming")]],
                Place::Gone => &[&[]],
            };
            prop_assert!(
                expected.contains(&found.as_slice()),
                "after {op:?}: payload {seq} is at {found:?}; the model says {place:?}"
            );
            if *place == Place::Deferred && found == [(true, "incoming")] {
                // A claimer moved it back in when it fell due.
                *place = Place::Incoming;
            }
        }
        prop_assert_eq!(
            inventory.found.len(),
            self.model.values().filter(|p| **p != Place::Gone).count()
        );
        Ok(())
    }
}

fn run(figures: &mut Figures) -> Outcome {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let steps = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&prop::collection::vec(op(), 1..80), |ops| {
        let mut world = World::new();
        for op in &ops {
            world.step(op)?;
            steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("model-based test failed: {e}");
    }
    figures.set("sequences", cases);
    figures.set("steps checked", steps.into_inner());
    Outcome::Passed
}
