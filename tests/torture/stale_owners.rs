//! Owners that died, owners that are stopped, a dead owner's pid taken by another
//! process, and clocks that jump.

use std::io::{BufRead, BufReader, Lines, Write};
use std::process::{ChildStdout, Command, Stdio};
use std::time::Duration;

use dirq::{DirectoryQueue, State};

use crate::inventory::{self, payload};
use crate::support::{self, Figures, Outcome, Proc};
use crate::Case;

pub const CASE: Case = Case {
    name: "stale owners",
    injects: "one holder of 3 claims and a half-written message SIGKILLed, another SIGSTOPped; \
              the dead one's pid given to a new process (ns_last_pid); recovery run with the \
              clock 2 days ahead and 2 days behind (faketime)",
    invariant: "the dead holder's claims are requeued exactly once and its temporary file \
                removed; the stopped holder's claims and temporary file are never taken, \
                whatever the clock or pid says; after SIGCONT it finishes normally",
    run,
};

const MESSAGES: u64 = 20;

struct Holder {
    proc: Proc,
    lines: Lines<BufReader<ChildStdout>>,
    claimed: Vec<u64>,
}

impl Holder {
    fn start(q: &str) -> Holder {
        let mut proc = Proc::spawn(
            support::role(&["hold", q, "3"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let mut lines = BufReader::new(proc.0.stdout.take().expect("stdout")).lines();
        let mut claimed = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("read the holder");
            if line == "writing" {
                break;
            }
            claimed.push(
                line.strip_prefix("claimed ")
                    .and_then(|s| s.parse().ok())
                    .expect("claimed SEQ"),
            );
        }
        // Half of its message is written; the rest waits on its standard input.
        proc.0
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(&payload(100, 4000)[..2000])
            .expect("write to the holder");
        Holder {
            proc,
            lines,
            claimed,
        }
    }
}

fn run(figures: &mut Figures) -> Outcome {
    if let Err(reason) = support::need_root_and(&["faketime"]) {
        return Outcome::Skipped(reason);
    }
    let dir = support::tempdir();
    let root = dir.path().join("q");
    let queue = DirectoryQueue::open(&root).expect("create the queue");
    for seq in 0..MESSAGES {
        queue.enqueue(payload(seq, 300)).expect("enqueue");
    }
    let q = support::path_str(&root);
    let mut dead = Holder::start(q);
    let mut stopped = Holder::start(q);
    support::wait_until(Duration::from_secs(10), "two temporary files", || {
        queue.count(State::Tmp).is_ok_and(|n| n == 2)
    });
    let tmp_of = |pid: u32| {
        std::fs::read_dir(root.join("tmp"))
            .expect("read tmp/")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .find(|name| name.contains(&format!(".{pid}.")))
    };
    let dead_pid = dead.proc.id();
    let stopped_tmp = tmp_of(stopped.proc.id()).expect("the stopped holder's temporary file");
    support::kill(&mut dead.proc.0);
    support::send(stopped.proc.id(), rustix::process::Signal::STOP);

    // A new process with the dead holder's pid: recovery must not take it for the owner.
    let impostor = reuse_pid(dead_pid);
    figures.set("dead pid reused", impostor.is_some());

    let recover = |fake: &str| {
        let out = support::output(Command::new("faketime").args([
            "-f",
            fake,
            env!("CARGO_BIN_EXE_dirq"),
            "recover",
            q,
        ]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "faketime {fake} dirq recover: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("faketime {fake}: {}", text.trim());
        text
    };
    let ahead = recover("+2d");
    assert!(
        ahead.contains("requeued 3, left 3 with live owners")
            && ahead.contains("removed 1 from tmp/"),
        "clock 2 days ahead: {ahead}"
    );
    let behind = recover("-2d");
    assert!(
        behind.contains("requeued 0, left 3 with live owners")
            && behind.contains("removed 0 from tmp/"),
        "clock 2 days behind: {behind}"
    );
    assert_eq!(queue.count(State::Pending).expect("count"), 3);
    assert_eq!(
        tmp_of(stopped.proc.id()).as_deref(),
        Some(stopped_tmp.as_str()),
        "the stopped writer's temporary file was removed"
    );

    // Everything but the stopped holder's claims can be taken, each once.
    let taken = support::sh(env!("CARGO_BIN_EXE_dirq"), &["take", q, "-n", "100"]);
    let mut seen: Vec<u64> = taken
        .lines()
        .map(|l| inventory::parse(l.as_bytes()).expect("a payload"))
        .collect();
    assert_eq!(seen.len() as u64, MESSAGES - 3, "taken: {seen:?}");
    for seq in &dead.claimed {
        assert!(
            seen.contains(seq),
            "the dead holder's {seq} was not requeued"
        );
    }

    // The stopped holder resumes as if nothing happened.
    support::send(stopped.proc.id(), rustix::process::Signal::CONT);
    let mut stdin = stopped.proc.0.stdin.take().expect("stdin");
    stdin
        .write_all(&payload(100, 4000)[2000..])
        .expect("finish the message");
    drop(stdin);
    let rest: Vec<String> = stopped.lines.by_ref().map_while(Result::ok).collect();
    assert_eq!(rest, ["enqueued", "done"]);
    assert!(stopped.proc.0.wait().expect("wait").success());
    seen.extend(&stopped.claimed);
    seen.sort_unstable();
    assert_eq!(seen, (0..MESSAGES).collect::<Vec<_>>(), "each message once");
    let left = dirq::admin::list(&queue, State::Incoming).expect("list");
    assert_eq!(left.len(), 1);
    assert_eq!(
        dirq::admin::peek(&queue, &left[0].id).expect("peek").1,
        payload(100, 4000)
    );
    drop(impostor);
    figures.set("requeued", dead.claimed.len());
    figures.set("robbed", 0);
    figures.set("messages checked", MESSAGES + 1);
    Outcome::Passed
}

/// Starts a process with pid `pid` (via `/proc/sys/kernel/ns_last_pid`); `None` when
/// another process took the pid first in every try.
fn reuse_pid(pid: u32) -> Option<Proc> {
    for _ in 0..20 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let sleeper = Proc::spawn(Command::new("sleep").arg("60"));
        if sleeper.id() == pid {
            println!("pid {pid} now belongs to a sleep");
            return Some(sleeper);
        }
    }
    println!("could not give pid {pid} to a new process (others took it first)");
    None
}
