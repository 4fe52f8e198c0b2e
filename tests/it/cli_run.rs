//! `dirq run` as a supervisor: signals, closed pipes, relative pipeline paths and bad
//! settings, each against the real binary (issue 13).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use dirq::{DirectoryQueue, State};

use crate::util::{dirq, signal, tempdir, wait_until};

/// Generous: both CPU cores may be busy with other tests.
const LONG: Duration = Duration::from_secs(60);

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Writes `dir/pipeline.toml` with one stage `cat` from `spool/input` to `spool/done`,
/// creates both queues and returns them.
fn cat_pipeline(dir: &Path) -> (DirectoryQueue, DirectoryQueue) {
    std::fs::write(
        dir.join("pipeline.toml"),
        "[[stage]]\nname = \"copy\"\ninput = \"spool/input\"\noutput = \"spool/done\"\n\
         command = [\"cat\"]\ndrain_timeout = \"10s\"\n",
    )
    .unwrap();
    (
        DirectoryQueue::open(dir.join("spool/input")).unwrap(),
        DirectoryQueue::open(dir.join("spool/done")).unwrap(),
    )
}

/// The pids of the live stage processes advertised on `input`.
fn live_pids(input: &DirectoryQueue) -> Vec<u32> {
    dirq::admin::pipers(input)
        .unwrap()
        .iter()
        .filter(|p| p.live)
        .map(|p| p.pid)
        .collect()
}

/// Enqueues `n` messages and waits until `done` holds `total`.
fn pass_through(input: &DirectoryQueue, done: &DirectoryQueue, n: usize, total: usize) {
    for i in 0..n {
        input.enqueue(format!("message {i}")).unwrap();
    }
    wait_until(LONG, "the messages through the stage", || {
        done.count(State::Incoming).unwrap() == total
    });
}

/// Stops the supervisor with SIGTERM and returns its exit code.
fn stop(mut supervisor: Child) -> Option<i32> {
    signal(supervisor.id(), "TERM");
    supervisor.wait().unwrap().code()
}

/// Defect 8: `dirq run pipeline.toml 2>&1 | head -2` panicked (exit 101) at the first
/// log line after `head` left, its stage workers died and messages stayed in pending/.
#[test]
fn run_survives_a_closed_stderr() {
    let dir = tempdir();
    let (input, done) = cat_pipeline(dir.path());
    let mut supervisor = dirq()
        .args(["run", s(&dir.path().join("pipeline.toml"))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader takes two lines and goes away, as `head -2` does.
    let mut reader = BufReader::new(supervisor.stderr.take().unwrap());
    for _ in 0..2 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
    }
    drop(reader);
    wait_until(LONG, "the stage to advertise", || {
        live_pids(&input).len() == 1
    });
    pass_through(&input, &done, 5, 5);
    // A crash makes both the supervisor and the new stage process log.
    let victim = live_pids(&input)[0];
    signal(victim, "KILL");
    wait_until(LONG, "the killed stage process to be restarted", || {
        let pids = live_pids(&input);
        pids.len() == 1 && pids[0] != victim
    });
    pass_through(&input, &done, 5, 10);
    assert!(supervisor.try_wait().unwrap().is_none(), "dirq run died");
    assert_eq!(stop(supervisor), Some(0), "dirq run after SIGTERM");
    let counts = input.counts().unwrap();
    assert_eq!(
        counts.pending + counts.incoming + counts.errors,
        0,
        "{counts:?}"
    );
}
