//! The `dirq` command line: outputs, exit codes, error messages.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use dirq::State;

use crate::util::{assert_succeeded, dirq, run, run_ok, tempdir, wait_until, TestQueue};

fn s(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn push_take_round_trip_with_separators() {
    let t = TestQueue::new();
    let q = s(t.root());
    let file = t.dir.path().join("input.json");
    std::fs::write(&file, b"{\"from\": \"file\"}").unwrap();
    let ids = run_ok(&["push", q, s(&file), s(&file)]);
    assert_eq!(ids.lines().count(), 2);

    let out = crate::util::run_with_input(&["push", q], b"from stdin");
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1);

    let taken = run_ok(&["take", q, "-n", "2", "-0"]);
    assert_eq!(taken, "{\"from\": \"file\"}\0{\"from\": \"file\"}\0");
    assert_eq!(run_ok(&["take", q]), "from stdin\n");
    assert_eq!(
        run_ok(&["take", q]),
        "",
        "an empty queue prints nothing and succeeds"
    );
}

#[test]
fn take_to_forwards_and_prints_ids() {
    let t = TestQueue::new();
    let next = t.dir.path().join("next");
    let pushed: Vec<String> = (0..3)
        .map(|i| t.queue.enqueue(format!("{i}")).unwrap().to_string())
        .collect();
    let out = run_ok(&["take", s(t.root()), "-n", "10", "--to", s(&next)]);
    assert_eq!(out.lines().collect::<Vec<_>>(), pushed);
    assert_eq!(crate::util::names_in(&next.join("incoming")), pushed);
}

#[test]
fn take_wait_returns_when_a_message_arrives() {
    let t = TestQueue::new();
    let child = dirq()
        .args(["take", s(t.root()), "--wait", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The waiting process has the queue open once its watch is on; any order is
    // correct, since it scans after adding the watch.
    t.queue.enqueue(b"worth the wait").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"worth the wait\n");
}

#[test]
fn status_json_has_the_documented_keys() {
    let t = TestQueue::new();
    t.queue.enqueue(b"a").unwrap();
    t.queue.enqueue(b"b").unwrap();
    t.queue.try_claim().unwrap().unwrap().fail("nope").unwrap();
    let other = t.dir.path().join("other");
    run_ok(&["init", s(&other)]);
    let out = run_ok(&["status", "--json", s(t.root()), s(&other)]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let first = lines[0].as_object().unwrap();
    for key in [
        "queue",
        "incoming",
        "pending",
        "errors",
        "tmp",
        "oldest_age_s",
    ] {
        assert!(
            first.contains_key(key),
            "status --json lacks {key}: {first:?}"
        );
    }
    assert_eq!(
        (first["incoming"].as_u64(), first["errors"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(first["oldest_age_s"].as_f64().unwrap() >= 0.0);
    assert!(lines[1]["oldest_age_s"].is_null());

    let human = run_ok(&["status", s(t.root())]);
    assert!(human.starts_with("QUEUE"), "{human}");
}

#[test]
fn status_spool_reports_every_queue_under_a_root() {
    let dir = tempdir();
    let spool = dir.path().join("spool");
    let (parse, enrich) = (spool.join("parse"), spool.join("site/enrich"));
    let solo = dir.path().join("solo");
    run_ok(&[
        "init",
        s(&parse),
        s(&enrich),
        s(&spool.join(".old")),
        s(&solo),
    ]);
    let pushed = crate::util::run_with_input(&["push", s(&parse)], b"waiting");
    assert_succeeded(&pushed, "dirq push");
    // Not queues: a directory with one state directory, a symlink to a queue.
    std::fs::create_dir_all(spool.join("plain/incoming")).unwrap();
    std::os::unix::fs::symlink(&solo, spool.join("alias")).unwrap();

    let counts = |out: &str| -> Vec<(String, u64)> {
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| {
                (
                    v["queue"].as_str().unwrap().to_owned(),
                    v["incoming"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let out = run_ok(&["status", "--json", "--spool", s(&spool)]);
    assert_eq!(
        counts(&out),
        [(s(&parse).to_owned(), 1), (s(&enrich).to_owned(), 0)]
    );
    let out = run_ok(&["status", "--json", "--spool", s(&spool), "--depth", "1"]);
    assert_eq!(counts(&out), [(s(&parse).to_owned(), 1)]);

    // The queues named come first, then the spool's.
    let human = run_ok(&["status", s(&solo), "--spool", s(&spool)]);
    let shown: Vec<&str> = human
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(shown, [s(&solo), s(&parse), s(&enrich)], "{human}");

    // A root that cannot be scanned is reported; the rest is shown; exit status 1.
    let missing = dir.path().join("missing");
    let out = run(&[
        "status",
        "--json",
        "--spool",
        s(&spool),
        "--spool",
        s(&missing),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(counts(&String::from_utf8(out.stdout).unwrap()).len(), 2);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!("dirq: error: failed to scan {}\n", s(&missing))),
        "{stderr}"
    );
    assert!(stderr.contains("caused by: No such file"), "{stderr}");

    // Neither queues nor a spool is bad usage.
    assert_eq!(run(&["status"]).status.code(), Some(2));
}

#[test]
fn ls_json_lines_carry_state_size_age_and_reason() {
    let t = TestQueue::new();
    let failed = t.queue.enqueue(b"failed!").unwrap();
    let kept = t.queue.enqueue(b"kept").unwrap();
    let message = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(message.id(), &failed, "oldest first");
    message.fail("bad input").unwrap();

    let out = run_ok(&["ls", "--json", s(t.root())]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    let incoming = lines.iter().find(|l| l["state"] == "incoming").unwrap();
    assert_eq!(incoming["id"], kept.to_string());
    assert_eq!(incoming["size"], 4);
    assert!(incoming["age_s"].is_number());
    assert!(incoming.get("reason").is_none());
    let errors = lines.iter().find(|l| l["state"] == "errors").unwrap();
    assert_eq!(errors["id"], failed.to_string());
    assert_eq!(errors["reason"], "bad input");

    let only_errors = run_ok(&["ls", "--state", "errors", s(t.root())]);
    assert_eq!(only_errors.lines().count(), 1);
    assert!(only_errors.contains("reason: bad input"), "{only_errors}");
}

#[test]
fn cat_reads_without_claiming() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"look, don't touch").unwrap();
    assert_eq!(
        run_ok(&["cat", s(t.root()), &id.to_string()]),
        "look, don't touch"
    );
    assert_eq!(t.queue.counts().unwrap().get(State::Incoming), 1);
}

#[test]
fn recover_requeues_a_dead_workers_message() {
    let t = TestQueue::new();
    t.queue.enqueue(b"x").unwrap();
    drop(t.queue.try_claim().unwrap().unwrap());
    let out = run_ok(&["recover", s(t.root())]);
    assert!(out.contains("requeued 1"), "{out}");
    assert_eq!(t.queue.counts().unwrap().incoming, 1);
}

#[test]
fn errors_exit_1_with_the_cause_chain() {
    let dir = tempdir();
    let missing = dir.path().join("missing");
    let out = run(&["take", s(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("dirq: error: failed to open queue"),
        "{stderr}"
    );
    assert!(stderr.contains(s(&missing)), "{stderr}");

    let t = TestQueue::new();
    let out = run(&["push", s(t.root()), s(&dir.path().join("no-such-file"))]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("failed to open input file"), "{stderr}");
    assert!(stderr.contains("caused by: No such file"), "{stderr}");

    let out = run(&["cat", s(t.root()), "../etc/passwd"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("must not contain '/'"));
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        &["frobnicate"][..],
        &["take"],
        &["take", "q", "-n", "many"],
        &[],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "dirq {args:?}");
    }
}

#[test]
fn help_shows_examples_for_each_command() {
    let commands = [
        "init",
        "push",
        "take",
        "status",
        "ls",
        "ages",
        "cat",
        "requeue",
        "hold",
        "unhold",
        "delete",
        "purge",
        "check",
        "recover",
        "exec",
        "run",
        "metrics",
        "completions",
        "flush",
        "edit",
        "cancel",
        "watch",
    ];
    for command in commands {
        let help = run_ok(&[command, "--help"]);
        assert!(
            help.contains("Example"),
            "dirq {command} --help has no example:\n{help}"
        );
    }
    let top = run_ok(&["--help"]);
    for command in commands {
        assert!(top.contains(command), "{top}");
    }
}

#[test]
fn take_waits_for_the_first_message_only() {
    let t = TestQueue::new();
    let mut child = dirq()
        .args(["take", s(t.root()), "-n", "5", "--wait", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    t.queue.enqueue(b"one").unwrap();
    wait_until(
        Duration::from_secs(60),
        "take to exit after the first message",
        || child.try_wait().unwrap().is_some(),
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"one\n");
}

/// Peak resident memory of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn a_one_gib_message_streams_through_push_and_take_in_bounded_memory() {
    use std::io::Read;
    const GIB: u64 = 1 << 30;
    const LIMIT_KIB: u64 = 64 * 1024;
    let t = TestQueue::new();
    let chunk = vec![b'a'; 1 << 20];

    let mut push = dirq()
        .args(["push", s(t.root())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = push.stdin.take().unwrap();
    for _ in 0..GIB / chunk.len() as u64 {
        stdin.write_all(&chunk).unwrap();
    }
    // Everything but the end of input has been read by now (up to a pipe buffer).
    let push_peak = peak_rss_kib(push.id()).expect("push is running");
    drop(stdin);
    let out = push.wait_with_output().unwrap();
    assert_succeeded(&out, "dirq push");
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(
        std::fs::metadata(t.path(State::Incoming).join(&id))
            .unwrap()
            .len(),
        GIB
    );

    let mut take = dirq()
        .args(["take", s(t.root())])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = take.stdout.take().unwrap();
    let (mut received, mut take_peak) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        received += n as u64;
        if received % (64 << 20) < n as u64 {
            take_peak = take_peak.max(peak_rss_kib(take.id()).unwrap_or(0));
        }
    }
    assert!(take.wait().unwrap().success());
    assert_eq!(received, GIB + 1, "the message and its newline");
    eprintln!("1 GiB message: push peak RSS {push_peak} KiB, take peak RSS {take_peak} KiB");
    assert!(
        push_peak < LIMIT_KIB,
        "push used {push_peak} KiB for a 1 GiB message"
    );
    assert!(
        take_peak > 0 && take_peak < LIMIT_KIB,
        "take used {take_peak} KiB for a 1 GiB message"
    );
    assert_eq!(t.queue.counts().unwrap(), dirq::queue::Counts::default());
}
