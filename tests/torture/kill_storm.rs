//! A three-stage forwarding pipeline and a producer, SIGKILLed at random for a minute
//! and respawned each time: once with sync stages, once with async stages (several
//! futures in flight per process when the kill comes).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dirq::DirectoryQueue;

use crate::inventory::Inventory;
use crate::support::{self, Figures, Outcome, Proc, Rng};
use crate::Case;

pub const CASE: Case = Case {
    name: "kill -9 storm",
    injects: "SIGKILL every 50-300 ms for 60 s to a random process of a producer and a \
              3-stage forwarding pipeline (2 processes x 2 workers per stage), respawned",
    invariant: "after draining, every acknowledged message is in the sink exactly once and \
                intact; no payload under two names; pending/ and tmp/ empty",
    run: run_sync,
};

pub const ASYNC_CASE: Case = Case {
    name: "kill -9 storm, async stages",
    injects: "as the kill -9 storm, but each stage process runs an AsyncStage (1 worker, \
              up to 32 futures in flight, each waiting 0-4 ms on the runtime)",
    invariant: "as the kill -9 storm: every acknowledged message in the sink exactly once \
                and intact; pending/ and tmp/ empty",
    run: run_async,
};

/// How long the storm lasts: 60 s, or `DIRQ_TORTURE_STORM_SECS`.
fn storm() -> Duration {
    Duration::from_secs(
        std::env::var("DIRQ_TORTURE_STORM_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    )
}
const STAGES: usize = 3;
const PROCESSES_PER_STAGE: usize = 2;
const WORKERS_PER_PROCESS: &str = "2";
/// Futures in flight per process of the async storm (one worker each).
const ASYNC_IN_FLIGHT: &str = "32";
/// High enough that no message is dead-lettered by the kills themselves.
const MAX_ATTEMPTS: &str = "1000";

#[derive(Clone, Copy)]
enum Role {
    Producer,
    Stage(usize),
}

struct Running {
    role: Role,
    child: Proc,
}

fn run_sync(figures: &mut Figures) -> Outcome {
    storm_over(figures, false)
}

fn run_async(figures: &mut Figures) -> Outcome {
    if !cfg!(feature = "tokio") {
        return Outcome::Skipped(
            "async stages need the `tokio` feature: cargo test --release --all-features \
             --test torture"
                .to_owned(),
        );
    }
    storm_over(figures, true)
}

/// The storm, with stage processes running an async stage when `asynchronous`.
fn storm_over(figures: &mut Figures, asynchronous: bool) -> Outcome {
    let name = if asynchronous {
        ASYNC_CASE.name
    } else {
        CASE.name
    };
    let dir = support::tempdir();
    let queues: Vec<PathBuf> = (0..=STAGES)
        .map(|i| dir.path().join(format!("q{i}")))
        .collect();
    for q in &queues {
        DirectoryQueue::open(q).expect("create queue");
    }
    let mut rng = Rng::new(name);
    let (acks, acked_rx) = mpsc::channel::<u64>();
    let mut readers = Vec::new();
    let mut producers = 0u64;
    let mut spawn = |role: Role| -> Running {
        let mut command = match role {
            Role::Producer => {
                producers += 1;
                // Each producer numbers its payloads in a block of its own, so that an
                // unacknowledged payload of a killed one is never sent again.
                let first = (producers * 1_000_000).to_string();
                support::role(&["produce", s(&queues[0]), &first, "900000", "200", "2"])
            }
            Role::Stage(i) if asynchronous => support::role(&[
                "async-stage",
                s(&queues[i]),
                s(&queues[i + 1]),
                ASYNC_IN_FLIGHT,
                MAX_ATTEMPTS,
            ]),
            Role::Stage(i) => support::role(&[
                "stage",
                s(&queues[i]),
                s(&queues[i + 1]),
                WORKERS_PER_PROCESS,
                MAX_ATTEMPTS,
            ]),
        };
        let mut child = Proc::spawn(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        if let Role::Producer = role {
            let stdout = child.0.stdout.take().expect("producer stdout");
            let acks = acks.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let seq = line.split_whitespace().next().and_then(|s| s.parse().ok());
                    if let Some(seq) = seq {
                        let _ = acks.send(seq);
                    }
                }
            }));
        }
        Running { role, child }
    };

    let mut running: Vec<Running> = std::iter::once(Role::Producer)
        .chain((0..STAGES).flat_map(|i| std::iter::repeat_n(Role::Stage(i), PROCESSES_PER_STAGE)))
        .map(&mut spawn)
        .collect();
    let start = Instant::now();
    let mut kills = 0u64;
    while start.elapsed() < storm() {
        // A random moment to strike: any moment is valid, so this sleep synchronises
        // nothing.
        std::thread::sleep(Duration::from_millis(rng.between(50, 300)));
        for slot in running.iter_mut() {
            if let Some(status) = slot.child.0.try_wait().expect("poll a child") {
                panic!("a process ended by itself ({status}); roles run until killed");
            }
        }
        let index = rng.below(running.len() as u64) as usize;
        let victim = &mut running[index];
        support::kill(&mut victim.child.0);
        kills += 1;
        *victim = spawn(victim.role);
    }
    // The storm is over: no more input; the stages drain the pipeline (their periodic
    // recovery requeues what the last kills left in pending/).
    support::kill(&mut running[0].child.0);
    let drained = |q: &Path| {
        let c = DirectoryQueue::open(q)
            .and_then(|q| q.counts())
            .expect("count");
        c.incoming + c.pending + c.deferred == 0
    };
    let drain = support::wait_for(Duration::from_secs(300), || {
        queues[..STAGES].iter().all(|q| drained(q))
    });
    if drain.is_err() {
        let counts: Vec<_> = queues
            .iter()
            .map(|q| DirectoryQueue::open(q).and_then(|q| q.counts()))
            .collect();
        panic!("the pipeline did not drain in 300 s: {counts:#?}");
    }
    for r in running.iter_mut().skip(1) {
        support::send(r.child.id(), rustix::process::Signal::TERM);
        let status = r.child.0.wait().expect("wait for a stage");
        assert!(
            status.success(),
            "a stage did not exit cleanly on SIGTERM: {status}"
        );
    }
    drop(acks);
    for reader in readers {
        reader.join().expect("an acknowledgement reader");
    }
    let acknowledged: BTreeSet<u64> = acked_rx.iter().collect();

    // Orphaned temporary files of killed producers: their writers are gone, so an
    // immediate purge may remove them (a live writer's lock would protect its file).
    let mut tmp_orphans = 0;
    for q in &queues {
        let queue = DirectoryQueue::builder(q)
            .tmp_max_age(Duration::ZERO)
            .open()
            .expect("open");
        tmp_orphans += queue.recover().expect("recover").tmp_removed;
    }

    let paths: Vec<&Path> = queues.iter().map(PathBuf::as_path).collect();
    let inventory = Inventory::take(&paths);
    inventory.assert_intact("after the storm");
    inventory.assert_empty(&["pending", "tmp", "errors", "deferred"], "after the storm");
    let sink = &queues[STAGES];
    let lost: Vec<u64> = acknowledged
        .iter()
        .copied()
        .filter(|seq| !inventory.places(*seq).iter().any(|f| &f.queue == sink))
        .collect();
    assert!(lost.is_empty(), "acknowledged but not delivered: {lost:?}");
    let delivered = inventory.found.len();
    assert!(
        acknowledged.len() > 1000 && kills > 100,
        "the storm was too small to prove anything ({} acknowledged, {kills} kills)",
        acknowledged.len()
    );
    figures.set("kills survived", kills);
    figures.set("acknowledged", acknowledged.len());
    figures.set("delivered", delivered);
    figures.set(
        "unacknowledged but delivered",
        delivered - acknowledged.len(),
    );
    figures.set("lost", lost.len());
    figures.set("duplicated", inventory.duplicated().len());
    figures.set("orphaned tmp files purged", tmp_orphans);
    Outcome::Passed
}

fn s(path: &Path) -> &str {
    support::path_str(path)
}
