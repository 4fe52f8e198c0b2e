//! The history journal (`QUEUE/history/`), `dirq history`, the status counts, and the
//! job logs of `dirq exec --log-output` (`dirq log`).

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime};

use dirq::admin::{HistoryFilter, HistoryOutcome, HistoryRecord};
use dirq::piper::{Emit, Outcome, Piper};
use dirq::queue::{FailureDetails, RetryPolicy};
use dirq::{DirectoryQueue, Durability, Message};

use crate::util::{assert_succeeded, dirq, names_in, run, run_ok, tempdir, wait_until, TestQueue};

const LONG: Duration = Duration::from_secs(120);

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn all(queue: &DirectoryQueue) -> Vec<HistoryRecord> {
    dirq::admin::history(queue, &HistoryFilter::default()).unwrap()
}

/// `dirq exec --drain QUEUE [extra...] -- sh -c SCRIPT`, run to completion.
fn exec(queue: &Path, extra: &[&str], script: &str) -> Output {
    let out = dirq()
        .args(["exec", "--drain", s(queue)])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_succeeded(&out, "dirq exec");
    out
}

/// Every line of every file of the history, and whether each is a record.
fn raw_lines(root: &Path) -> Vec<String> {
    let dir = root.join("history");
    let mut lines = Vec::new();
    for name in names_in(&dir) {
        if name.ends_with(".jsonl") {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            assert!(
                text.is_empty() || text.ends_with('\n'),
                "{name} ends mid-line"
            );
            lines.extend(text.lines().map(str::to_owned));
        }
    }
    lines
}

#[test]
fn each_outcome_is_one_line_with_its_fields() {
    let dir = tempdir();
    let retry = RetryPolicy::builder()
        .initial(Duration::from_millis(10))
        .max_delay(Duration::from_millis(10))
        .max_attempts(2)
        .build()
        .unwrap();
    let input = DirectoryQueue::builder(dir.path().join("in"))
        .retry_policy(retry)
        .open()
        .unwrap();
    let output = DirectoryQueue::open(dir.path().join("out")).unwrap();
    let mut ids = std::collections::HashMap::new();
    for word in ["commit", "forward", "emit", "fail", "timeout", "retry"] {
        ids.insert(input.enqueue(word).unwrap().to_string(), word);
    }
    let piper = Piper::builder("kinds")
        .input(&input)
        .output("next", &output)
        .workers(2)
        .stage(|message: &Message| {
            Ok(match message.bytes()?.as_slice() {
                b"commit" => Outcome::Commit,
                b"forward" => Outcome::Forward,
                b"emit" => Outcome::Emit(vec![Emit::new("new")]),
                b"fail" => {
                    Outcome::FailWith("bad input".into(), FailureDetails::new(Some(3), None))
                }
                b"timeout" => Outcome::TimedOut(FailureDetails::default()),
                _ => Outcome::Retry("not yet".into()),
            })
        })
        .build()
        .unwrap();
    let handle = piper.handle();
    let runner = std::thread::spawn(move || piper.run());
    wait_until(LONG, "seven outcomes in the history", || {
        all(&input).len() >= 7
    });
    handle.shutdown();
    runner.join().unwrap().unwrap();

    let records = all(&input);
    assert_eq!(records.len(), 7, "{records:#?}");
    let outcome_of = |word: &str| -> Vec<&HistoryRecord> {
        records.iter().filter(|r| ids[&r.id] == word).collect()
    };
    for (word, outcome) in [
        ("commit", HistoryOutcome::Committed),
        ("forward", HistoryOutcome::Forwarded),
        ("emit", HistoryOutcome::Emitted),
        ("fail", HistoryOutcome::Failed),
        ("timeout", HistoryOutcome::TimedOut),
    ] {
        let found = outcome_of(word);
        assert_eq!(found.len(), 1, "{word}: {found:?}");
        assert_eq!(found[0].outcome, outcome, "{word}");
    }
    let fail = outcome_of("fail")[0];
    assert_eq!(fail.reason.as_deref(), Some("bad input"));
    assert_eq!(fail.exit_code, Some(3));
    assert_eq!(outcome_of("timeout")[0].reason.as_deref(), Some("timeout"));
    let retry: Vec<_> = outcome_of("retry")
        .iter()
        .map(|r| (r.outcome, r.attempts))
        .collect();
    assert_eq!(
        retry,
        [
            (HistoryOutcome::Retried, 1),
            (HistoryOutcome::DeadLettered, 2)
        ]
    );
    let now = SystemTime::now();
    for record in &records {
        assert_eq!(record.piper, "kinds");
        assert_eq!(record.pid, std::process::id());
        assert!(record.reason.is_none() || !record.outcome.is_ok());
        let age = now
            .duration_since(record.when().expect("an RFC 3339 time"))
            .unwrap();
        assert!(age < LONG, "{record:?}");
    }
    // Not a state, and not a problem for check.
    let problems = dirq::admin::check(&input, &mut |_| {}).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn two_exec_processes_write_exactly_one_whole_line_per_message() {
    let t = TestQueue::new();
    let n = 2000;
    let payloads: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    t.queue
        .enqueue_batch(payloads.iter().map(String::as_bytes))
        .unwrap();
    let spawn = || {
        dirq()
            .args([
                "--durability",
                "none",
                "exec",
                "--drain",
                "-j",
                "4",
                s(t.root()),
            ])
            .args(["--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert_succeeded(&out, "dirq exec");
    }
    let lines = raw_lines(t.root());
    assert_eq!(lines.len(), n);
    let records: Vec<HistoryRecord> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let ids: HashSet<_> = records.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), n);
    assert!(records
        .iter()
        .all(|r| r.outcome == HistoryOutcome::Committed));
    let pids: HashSet<_> = records.iter().map(|r| r.pid).collect();
    assert!(pids.len() <= 2, "{pids:?}");
    assert_eq!(all(&t.queue).len(), n);
}

#[test]
fn rotation_by_size_while_pipers_write_loses_no_line() {
    let dir = tempdir();
    let input = DirectoryQueue::builder(dir.path().join("q"))
        .durability(Durability::None)
        .open()
        .unwrap();
    let n = 3000;
    let payloads: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    input
        .enqueue_batch(payloads.iter().map(String::as_bytes))
        .unwrap();
    // Two Pipers: two journals with their own descriptors and lock attempts, as two
    // processes would have.
    let pipers: Vec<_> = (0..2)
        .map(|k| {
            Piper::builder(format!("rotor{k}"))
                .input(&input)
                .workers(2)
                .history_max_bytes(16 * 1024)
                .history_keep(10_000)
                .stage(|_: &Message| Ok(Outcome::Commit))
                .build()
                .unwrap()
        })
        .collect();
    let handles: Vec<_> = pipers.iter().map(Piper::handle).collect();
    let runners: Vec<_> = pipers
        .into_iter()
        .map(|p| std::thread::spawn(move || p.run()))
        .collect();
    wait_until(LONG, "every message processed", || {
        handles.iter().map(|h| h.stats().committed).sum::<u64>() == n as u64
    });
    for h in &handles {
        h.shutdown();
    }
    for r in runners {
        r.join().unwrap().unwrap();
    }
    let rotated = names_in(&input.root().join("history"))
        .into_iter()
        .filter(|n| n.ends_with("Z.jsonl") || n.contains("Z-"))
        .count();
    assert!(rotated >= 5, "only {rotated} rotations");
    let lines = raw_lines(input.root());
    assert_eq!(lines.len(), n);
    let records = all(&input);
    let ids: HashSet<_> = records.iter().map(|r| r.id.clone()).collect();
    assert_eq!((records.len(), ids.len()), (n, n));
    // Oldest first: files in order of their first line.
    let times: Vec<_> = records.iter().map(|r| r.when().unwrap()).collect();
    let disorder = times.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(disorder < n / 10, "{disorder} lines out of order");
}

#[test]
fn a_truncated_last_line_is_skipped_and_the_next_line_kept() {
    let t = TestQueue::new();
    for i in 0..3 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    exec(t.root(), &[], "cat >/dev/null");
    // A crash in the middle of a write leaves half a line.
    let current = t.root().join("history/current.jsonl");
    let whole = std::fs::read_to_string(&current).unwrap();
    let first = whole.lines().next().unwrap();
    OpenOptions::new()
        .append(true)
        .open(&current)
        .unwrap()
        .write_all(&first.as_bytes()[..first.len() / 2])
        .unwrap();
    let json = run_ok(&["history", "--json", s(t.root())]);
    assert_eq!(json.lines().count(), 3, "{json}");
    let status = run_ok(&["status", "--json", s(t.root())]);
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(status["last_hour"]["ok"], 3, "{status}");
    // A writer appends after the fragment: its line is still read.
    t.queue.enqueue(b"m3").unwrap();
    exec(t.root(), &[], "cat >/dev/null");
    let json = run_ok(&["history", "--json", s(t.root())]);
    assert_eq!(json.lines().count(), 4, "{json}");
}

/// A line as a Piper writes it.
fn line(id: &str, outcome: &str, ago: Duration) -> String {
    let time = SystemTime::now() - ago;
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Formatted through `date`, independent of the crate's own formatting.
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{secs}"),
            "+%Y-%m-%dT%H:%M:%S.000000Z",
        ])
        .output()
        .unwrap();
    let time = String::from_utf8(out.stdout).unwrap();
    format!(
        r#"{{"id":"{id}","outcome":"{outcome}","time":"{}","attempts":1,"duration_ms":5,"piper":"p","pid":1,"host":"h"}}"#,
        time.trim()
    )
}

#[test]
fn history_filters_and_status_counts_of_the_last_hour() {
    let t = TestQueue::new();
    let dir = t.root().join("history");
    std::fs::create_dir(&dir).unwrap();
    let hour = Duration::from_secs(3600);
    // A rotated file (older lines), then current.jsonl.
    std::fs::write(
        dir.join("20200101T000000.000Z.jsonl"),
        format!(
            "{}\n{}\n",
            line("old-ok", "committed", 3 * hour),
            line("old-fail", "failed", 2 * hour)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("current.jsonl"),
        format!(
            "{}\n{}\n{}\n{}\n",
            line("a", "committed", hour / 2),
            line("b", "failed", hour / 3),
            line("c", "timed_out", hour / 4),
            line("a", "forwarded", Duration::ZERO),
        ),
    )
    .unwrap();
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["history", "--json", s(t.root())];
        all.extend_from_slice(args);
        run_ok(&all)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(ids(&[]), ["old-ok", "old-fail", "a", "b", "c", "a"]);
    assert_eq!(ids(&["--since", "1h"]), ["a", "b", "c", "a"]);
    assert_eq!(ids(&["--outcome", "failed"]), ["old-fail", "b"]);
    assert_eq!(ids(&["--outcome", "timed-out"]), ["c"]);
    assert_eq!(ids(&["--id", "a"]), ["a", "a"]);
    assert_eq!(ids(&["--id", "a", "--outcome", "forwarded"]), ["a"]);
    let table = run_ok(&["history", s(t.root()), "--since", "1h"]);
    assert!(table.starts_with("TIME"), "{table}");
    assert_eq!(table.lines().count(), 5, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("timed_out") && l.ends_with(" c")),
        "{table}"
    );
    let bad = run(&["history", s(t.root()), "--outcome", "exploded"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("dead_lettered"));

    let status = run_ok(&["status", "--json", s(t.root())]);
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    let hour = &status["last_hour"];
    assert_eq!(
        (&hour["ok"], &hour["fail"], &hour["timeout"]),
        (&2.into(), &1.into(), &1.into()),
        "{status}"
    );
    let human = run_ok(&["status", s(t.root())]);
    assert!(
        human.contains("last hour: 2 ok, 1 fail, 1 timeout"),
        "{human}"
    );
}

#[test]
fn no_history_writes_nothing() {
    let t = TestQueue::new();
    t.queue.enqueue(b"x").unwrap();
    exec(t.root(), &["--no-history"], "cat >/dev/null");
    assert_eq!(t.queue.counts().unwrap().incoming, 0);
    assert!(!t.root().join("history").exists());
    assert_eq!(run_ok(&["history", "--json", s(t.root())]), "");
}

#[test]
fn job_logs_keep_each_attempt_within_the_limit() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"hello").unwrap().to_string();
    let big = t.queue.enqueue(b"big").unwrap().to_string();
    // First attempt: asks for a retry (exit 75); the second succeeds.
    exec(
        t.root(),
        &["--log-output", "--log-limit", "8KiB"],
        r#"read m
           if [ "$m" = big ]; then head -c 100000 /dev/zero | tr '\0' y; echo; echo "big done"; exit 0; fi
           echo "out $m $DIRQ_ATTEMPT"; echo "err $m $DIRQ_ATTEMPT" >&2
           [ "$DIRQ_ATTEMPT" -ge 2 ] || exit 75"#,
    );
    let log = run_ok(&["log", s(t.root()), &id]);
    assert_eq!(log.matches("=== dirq: attempt ").count(), 2, "{log}");
    for expected in [
        "attempt 1 of",
        "out hello 1",
        "err hello 1",
        "exit 75 after",
        "attempt 2 of",
        "out hello 2",
        "err hello 2",
        "exit 0 after",
    ] {
        assert!(log.contains(expected), "{expected:?} missing in {log}");
    }
    let first = log.find("out hello 1").unwrap();
    assert!(first < log.find("attempt 2 of").unwrap());

    let big_log = std::fs::read(t.root().join("history/logs").join(format!("{big}.log"))).unwrap();
    assert!(big_log.len() <= 8 * 1024, "{} bytes", big_log.len());
    let text = String::from_utf8_lossy(&big_log);
    assert!(text.starts_with("=== dirq: attempt 1"), "{text}");
    assert!(text.contains("bytes left out]"));
    assert!(text.contains("big done"), "the tail is kept");

    let missing = run(&["log", s(t.root()), "no-such-id"]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("no-such-id") && stderr.contains(s(t.root())),
        "{stderr}"
    );
}

#[test]
fn rotation_by_age_keeps_the_newest_files_and_removes_older_job_logs() {
    let dir = tempdir();
    let input = DirectoryQueue::open(dir.path().join("q")).unwrap();
    let logs = input.root().join("history/logs");
    std::fs::create_dir_all(&logs).unwrap();
    let (old, fresh) = (logs.join("old.msg.log"), logs.join("fresh.msg.log"));
    std::fs::write(&old, b"ancient").unwrap();
    let touched = std::process::Command::new("touch")
        .args(["-d", "2 days ago"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(touched.success());
    let piper = Piper::builder("ager")
        .input(&input)
        .history_max_age(Duration::from_millis(200))
        .history_keep(2)
        .stage(|_: &Message| Ok(Outcome::Commit))
        .build()
        .unwrap();
    let handle = piper.handle();
    let runner = std::thread::spawn(move || piper.run());
    // A writer looks at the age of current.jsonl at most every second: five messages
    // more than a second apart make four rotations.
    for round in 1..=5u64 {
        if round == 5 {
            // Newer than the first line of the oldest file kept (round 3's).
            std::fs::write(&fresh, b"recent").unwrap();
        }
        input.enqueue(format!("m{round}")).unwrap();
        wait_until(LONG, "the message committed", || {
            handle.stats().committed == round
        });
        let done = std::time::Instant::now();
        wait_until(LONG, "a second and a bit", || {
            done.elapsed() >= Duration::from_millis(1200)
        });
    }
    handle.shutdown();
    runner.join().unwrap().unwrap();
    let names = names_in(&input.root().join("history"));
    let rotated: Vec<_> = names.iter().filter(|n| n.ends_with("Z.jsonl")).collect();
    assert_eq!(rotated.len(), 2, "{names:?}");
    assert!(
        !old.exists(),
        "a job log older than the history kept is removed"
    );
    assert!(fresh.exists());
    let records = all(&input);
    assert!((2..=3).contains(&records.len()), "{records:?}");
    assert_eq!(records.last().unwrap().outcome, HistoryOutcome::Committed);
}

#[test]
fn pipeline_keys_turn_history_off_and_job_logs_on() {
    let dir = tempdir();
    let input = DirectoryQueue::open(dir.path().join("in")).unwrap();
    let file = dir.path().join("pipeline.toml");
    let write = |extra: &str| {
        std::fs::write(
            &file,
            format!(
                "[defaults]\nhistory = false\n{extra}\n[[stage]]\nname = \"logged\"\n\
                 input = \"in\"\ncommand = \"cat >/dev/null; echo said-on-stderr >&2\"\n"
            ),
        )
        .unwrap();
    };
    write("log_limit = \"10\"");
    let refused = run(&["run", "--check", s(&file)]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("log_limit"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    write("log_output = true\nlog_limit = \"64KiB\"");
    run_ok(&["run", "--check", s(&file)]);
    let id = input.enqueue(b"x").unwrap();
    let log = input.root().join("history/logs").join(format!("{id}.log"));
    let supervisor = dirq()
        .args(["run", s(&file)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(LONG, "the message's job log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("exit 0 after"))
    });
    crate::util::signal(supervisor.id(), "TERM");
    let status = supervisor.wait_with_output().unwrap().status;
    assert!(status.success(), "{status}");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("said-on-stderr"));
    let history = names_in(&input.root().join("history"));
    assert_eq!(history, ["logs"], "history = false writes no journal");
}

#[test]
fn an_operators_cancel_is_a_cancelled_line() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"slow").unwrap().to_string();
    let mut exec = dirq()
        .args(["exec", s(t.root()), "--", "sh", "-c", "exec sleep 60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(LONG, "the command running", || {
        t.queue.counts().unwrap().pending == 1
    });
    let out = run(&["cancel", s(t.root()), &id]);
    let stopped = |exec: &mut std::process::Child| {
        let _ = exec.kill();
        let _ = exec.wait();
    };
    if !out.status.success() {
        stopped(&mut exec);
        panic!("dirq cancel: {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_until(LONG, "the cancelled line", || {
        all(&t.queue)
            .iter()
            .any(|r| r.id == id && r.outcome == HistoryOutcome::Cancelled)
    });
    stopped(&mut exec);
    let line = all(&t.queue).into_iter().find(|r| r.id == id).unwrap();
    assert_eq!(line.reason.as_deref(), Some(dirq::piper::CANCELLED_REASON));
    let status = run_ok(&["status", "--json", s(t.root())]);
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(status["last_hour"]["cancelled"], 1, "{status}");
}
