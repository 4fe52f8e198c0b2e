//! `dirq exec` (a command per message) and `dirq run` (a pipeline of them).

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use dirq::{DirectoryQueue, MessageId, State};

use crate::util::{assert_succeeded, dirq, names_in, signal, tempdir, wait_until, TestQueue};

const LONG: Duration = Duration::from_secs(60);

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `dirq exec --drain QUEUE [extra...] -- sh -c SCRIPT`, run to completion.
fn exec(queue: &Path, extra: &[&str], script: &str) -> Output {
    let out = dirq()
        .args(["exec", "--drain", s(queue)])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .current_dir(queue.parent().unwrap())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_succeeded(&out, "dirq exec");
    out
}

fn process_exists(pid: &str) -> bool {
    Path::new("/proc").join(pid.trim()).exists()
}

#[test]
fn success_commits_and_failure_keeps_exit_code_and_stderr() {
    let t = TestQueue::new();
    t.queue.enqueue(b"ok 1").unwrap();
    let bad = t.queue.enqueue(b"bad input").unwrap();
    t.queue.enqueue(b"ok 2").unwrap();
    let env_log = t.dir.path().join("env.log");
    exec(
        t.root(),
        &[],
        &format!(
            r#"read m; echo "$DIRQ_ID|$DIRQ_QUEUE|$DIRQ_ATTEMPT|$DIRQ_PATH|$m" >> {}
               case "$m" in bad*) echo "cannot parse: $m" >&2; exit 3;; esac"#,
            env_log.display()
        ),
    );
    let counts = t.queue.counts().unwrap();
    assert_eq!((counts.incoming, counts.pending, counts.errors), (0, 0, 1));
    let failure = dirq::admin::failure(&t.queue, &bad).unwrap().unwrap();
    assert_eq!(failure.reason.as_deref(), Some("exit 3"));
    assert_eq!(failure.exit_code, Some(3));
    assert!(failure.stderr.unwrap().contains("cannot parse: bad input"));
    // The environment of each run.
    let log = std::fs::read_to_string(&env_log).unwrap();
    let line = log.lines().find(|l| l.ends_with("|bad input")).unwrap();
    let fields: Vec<&str> = line.split('|').collect();
    assert_eq!(fields[0], bad.to_string());
    assert_eq!(fields[1], t.root().to_str().unwrap());
    assert_eq!(fields[2], "1");
    assert_eq!(
        fields[3],
        t.path(State::Pending)
            .join(bad.as_os_str())
            .to_str()
            .unwrap()
    );
}

#[test]
fn with_to_the_output_is_passed_on_or_the_message_when_there_is_none() {
    let t = TestQueue::new();
    let next = t.dir.path().join("next");
    let upper = t.queue.enqueue(b"shout").unwrap();
    let quiet = t.queue.enqueue(b"quiet please").unwrap();
    exec(
        t.root(),
        &["--to", s(&next)],
        r#"read m; case "$m" in quiet*) cat > /dev/null;; *) echo "$m" | tr a-z A-Z;; esac"#,
    );
    let next = DirectoryQueue::open(&next).unwrap();
    assert_eq!(
        dirq::admin::peek(&next, &upper).unwrap().1,
        b"SHOUT\n",
        "stdout became the next message"
    );
    assert_eq!(
        dirq::admin::peek(&next, &quiet).unwrap().1,
        b"quiet please",
        "empty stdout: the message itself"
    );
    assert_eq!(t.queue.counts().unwrap().unfinished(), 0);
}

#[test]
fn exit_75_retries_later() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"try again").unwrap();
    let log = t.dir.path().join("attempts.log");
    let start = Instant::now();
    exec(
        t.root(),
        &[],
        &format!(
            r#"echo "$DIRQ_ATTEMPT" >> {}; test "$DIRQ_ATTEMPT" -gt 1 || exit 75"#,
            log.display()
        ),
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "1\n2\n");
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "the retry waited for its backoff"
    );
    assert_eq!(t.queue.counts().unwrap().unfinished(), 0);
    assert!(dirq::admin::failure(&t.queue, &id).unwrap().is_none());
}

#[test]
fn a_timeout_kills_the_whole_process_group() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"slow").unwrap();
    let pidfile = t.dir.path().join("child.pid");
    let start = Instant::now();
    exec(
        t.root(),
        // Long enough for a loaded machine to start the child and write its pid
        // before the timeout: otherwise there is no child to look for.
        &["--timeout", "2s"],
        &format!("sleep 600 & echo $! > {}; wait", pidfile.display()),
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(
        dirq::admin::failure(&t.queue, &id)
            .unwrap()
            .unwrap()
            .reason
            .as_deref(),
        Some("timeout")
    );
    let child = std::fs::read_to_string(&pidfile).unwrap();
    wait_until(LONG, "the command's own child to be gone", || {
        !process_exists(&child)
    });
}

#[test]
fn a_command_ignoring_sigterm_is_killed_after_the_grace() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"stubborn").unwrap();
    let pidfile = t.dir.path().join("child.pid");
    exec(
        t.root(),
        // Long enough for the shell to ignore SIGTERM and start its child before the
        // timeout: otherwise SIGTERM kills it and the grace is never tested.
        &["--timeout", "2s", "--kill-grace", "300ms"],
        &format!(
            "trap '' TERM; sleep 600 & echo $! > {}; while true; do sleep 0.1; done",
            pidfile.display()
        ),
    );
    assert_eq!(
        dirq::admin::failure(&t.queue, &id)
            .unwrap()
            .unwrap()
            .reason
            .as_deref(),
        Some("timeout")
    );
    let child = std::fs::read_to_string(&pidfile).unwrap();
    wait_until(LONG, "the stubborn group to be gone", || {
        !process_exists(&child)
    });
}

#[test]
fn dry_run_changes_nothing() {
    let t = TestQueue::new();
    for i in 0..3 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    let before: Vec<(String, Vec<String>)> = ["incoming", "pending", "errors", "tmp"]
        .iter()
        .map(|s| (s.to_string(), names_in(&t.root().join(s))))
        .collect();
    let marker = t.dir.path().join("ran");
    let out = dirq()
        .args(["exec", "--dry-run", s(t.root()), "--", "touch", s(&marker)])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.matches("would run: touch").count(), 3, "{stdout}");
    let after: Vec<(String, Vec<String>)> = ["incoming", "pending", "errors", "tmp"]
        .iter()
        .map(|s| (s.to_string(), names_in(&t.root().join(s))))
        .collect();
    assert_eq!(before, after);
    assert!(!marker.exists(), "nothing ran");
}

#[test]
fn on_fail_runs_a_hook_with_the_reason() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"doomed").unwrap();
    let alert = t.dir.path().join("alert");
    exec(
        t.root(),
        &[
            "--on-fail",
            &format!(
                r#"echo "$DIRQ_ID $DIRQ_REASON $DIRQ_EXIT_CODE" > {}"#,
                alert.display()
            ),
        ],
        "exit 9",
    );
    assert_eq!(
        std::fs::read_to_string(&alert).unwrap(),
        format!("{id} exit 9 9\n")
    );
}

#[test]
fn jobs_run_in_parallel() {
    let t = TestQueue::new();
    for i in 0..4 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    // Each command marks that it runs, then waits until all four do: they can only
    // all succeed if the four run at once. The deadline turns a serial exec into
    // failures rather than a hang.
    exec(
        t.root(),
        &["-j", "4"],
        &format!(
            r#"touch {dir}/running.$DIRQ_ID
               tries=0
               until [ "$(ls {dir} | grep -c '^running\.')" -ge 4 ]; do
                 tries=$((tries + 1))
                 if [ $tries -gt 600 ]; then echo "alone after 60 s" >&2; exit 1; fi
                 sleep 0.1
               done"#,
            dir = t.dir.path().display()
        ),
    );
    let counts = t.queue.counts().unwrap();
    let failures: Vec<_> = dirq::admin::list(&t.queue, State::Errors)
        .unwrap()
        .into_iter()
        .filter_map(|m| m.failure.and_then(|f| f.stderr))
        .collect();
    assert_eq!(
        (counts.unfinished(), counts.errors),
        (0, 0),
        "the commands did not run at once: {failures:?}"
    );
}

#[test]
fn sigterm_drains_running_commands_and_exits_0() {
    let t = TestQueue::new();
    let next = t.dir.path().join("next");
    DirectoryQueue::open(&next).unwrap();
    for i in 0..30 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    // The first four commands pass their message on at once; the others wait for the
    // gate, which opens only after SIGTERM: so exec is stopped mid-queue however slow
    // this machine is, with commands running.
    let (started, gate) = (t.dir.path().join("started"), t.dir.path().join("gate"));
    let script = format!(
        r#"echo "$DIRQ_ID" >> {started}
           if [ "$(grep -nxF "$DIRQ_ID" {started} | cut -d: -f1)" -gt 4 ]; then
             tries=0
             until [ -e {gate} ]; do
               tries=$((tries + 1))
               if [ $tries -gt 600 ]; then echo "the gate stayed shut" >&2; exit 1; fi
               sleep 0.1
             done
           fi
           cat"#,
        started = started.display(),
        gate = gate.display()
    );
    let child = dirq()
        .args(["exec", s(t.root()), "--to", s(&next), "-j", "2", "--"])
        .args(["sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(LONG, "the first four commands to finish", || {
        names_in(&next.join("incoming")).len() == 4
    });
    signal(child.id(), "TERM");
    std::fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_succeeded(&out, "dirq exec");
    assert_eq!(t.queue.counts().unwrap().pending, 0);
    assert_eq!(t.queue.counts().unwrap().errors, 0, "a command failed");
    let done = names_in(&next.join("incoming")).len();
    assert_eq!(
        done + t.queue.counts().unwrap().incoming,
        30,
        "nothing lost"
    );
    // The four, and at most one running command per job.
    assert!((4..=6).contains(&done), "{done} done: it did not stop");
}

#[test]
fn run_supervises_a_three_stage_pipeline_and_restarts_crashed_workers() {
    let dir = tempdir();
    let root = dir.path();
    std::fs::write(
        root.join("pipeline.toml"),
        r#"
[defaults]
drain_timeout = "5s"

[[stage]]
name = "upper"
input = "spool/input"
output = "spool/upper"
command = ["tr", "a-z", "A-Z"]
processes = 2

[[stage]]
name = "tag"
input = "spool/upper"
output = "spool/tagged"
command = "sed 's/^/tagged: /'"

[[stage]]
name = "deliver"
input = "spool/tagged"
output = "spool/done"
command = ["cat"]
workers = 2
"#,
    )
    .unwrap();
    let spool = root.join("spool");
    for queue in ["input", "upper", "tagged", "done"] {
        DirectoryQueue::open(spool.join(queue)).unwrap();
    }
    let input = DirectoryQueue::open(spool.join("input")).unwrap();
    let ids: Vec<MessageId> = (0..50)
        .map(|i| input.enqueue(format!("event {i}")).unwrap())
        .collect();
    let supervisor = dirq()
        .args(["run", s(&root.join("pipeline.toml"))])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let done = DirectoryQueue::open(spool.join("done")).unwrap();
    wait_until(LONG, "every event through three stages", || {
        done.count(State::Incoming).unwrap() == 50
    });
    for id in &ids {
        let body = String::from_utf8(dirq::admin::peek(&done, id).unwrap().1).unwrap();
        assert!(body.starts_with("tagged: EVENT "), "{body}");
    }
    // dirq status shows the stages; a worker killed with SIGKILL comes back.
    let upper = DirectoryQueue::open(spool.join("input")).unwrap();
    wait_until(LONG, "both upper workers to advertise", || {
        dirq::admin::pipers(&upper)
            .unwrap()
            .iter()
            .filter(|p| p.live && p.stage == "upper")
            .count()
            == 2
    });
    let victim = dirq::admin::pipers(&upper)
        .unwrap()
        .iter()
        .find(|p| p.live)
        .unwrap()
        .pid;
    signal(victim, "KILL");
    wait_until(LONG, "the killed worker to be restarted", || {
        let pipers = dirq::admin::pipers(&upper).unwrap();
        pipers
            .iter()
            .filter(|p| p.live && p.stage == "upper")
            .count()
            == 2
            && pipers.iter().all(|p| !p.live || p.pid != victim)
    });
    let status = crate::util::run_ok(&["status", s(&spool.join("upper"))]);
    assert!(status.contains("piper tag pid"), "{status}");
    // More work still flows after the restart.
    input.enqueue(b"late event").unwrap();
    wait_until(LONG, "the late event", || {
        done.count(State::Incoming).unwrap() == 51
    });
    signal(supervisor.id(), "TERM");
    let start = Instant::now();
    let out = supervisor.wait_with_output().unwrap();
    assert_succeeded(&out, "dirq run");
    assert!(start.elapsed() < Duration::from_secs(30));
    wait_until(LONG, "every worker to be gone", || {
        dirq::admin::pipers(&upper).unwrap().iter().all(|p| !p.live)
    });
}

#[test]
fn exec_refuses_bad_settings_before_anything_runs() {
    let t = TestQueue::new();
    t.queue.enqueue(b"untouched").unwrap();
    let next = t.dir.path().join("next");
    for (args, want) in [
        (vec!["--timeout", "0"], "invalid timeout of command stage"),
        (vec!["-j", "0"], "invalid workers of Piper"),
        (vec!["-j", "100000000000"], "invalid workers of Piper"),
        (
            vec!["--to", s(&next), "--out-limit", "0"],
            "invalid out_limit of Piper",
        ),
    ] {
        let out = crate::util::run(&[&["exec", s(t.root())], &args[..], &["--", "true"]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    assert_eq!(t.queue.counts().unwrap().incoming, 1, "nothing was claimed");
}

#[test]
fn run_refuses_absurd_worker_and_process_counts_before_starting_any() {
    let dir = tempdir();
    let marker = dir.path().join("started");
    for (key, want) in [
        (
            "workers = 100000000000",
            "workers = 100000000000: must be from 1 to 1024",
        ),
        ("workers = 0", "workers = 0: must be from 1 to 1024"),
        ("processes = 0", "processes = 0: must be from 1 to 1024"),
        (
            "processes = 100000",
            "processes = 100000: must be from 1 to 1024",
        ),
    ] {
        let file = dir.path().join("pipeline.toml");
        std::fs::write(
            &file,
            format!(
                "[[stage]]\nname = \"x\"\ninput = \"q\"\ncommand = \"touch {}\"\n{key}\n",
                marker.display()
            ),
        )
        .unwrap();
        crate::util::assert_stage_refused(&["run", s(&file)], key, want);
    }
    assert!(!marker.exists(), "a stage process was started");
}

#[test]
fn a_bad_pipeline_file_is_a_clear_error() {
    let dir = tempdir();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[stage]]\nname = \"x\"\ninput = \"q\"\ncommand = [\"cat\"]\nworkerz = 2\n",
    )
    .unwrap();
    let out = crate::util::run(&["run", s(&file)]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("invalid pipeline file") && stderr.contains("workerz"),
        "{stderr}"
    );
}

#[test]
fn dry_run_lists_due_deferred_messages_a_real_run_would_process() {
    let t = TestQueue::new();
    let waiting = t.queue.enqueue(b"waiting").unwrap();
    // Deferred by hand: `<due>@<id>`, one due long ago and one due in a century.
    let (due, later) = (MessageId::generate(), MessageId::generate());
    let deferred = t.path(State::Deferred);
    std::fs::create_dir_all(&deferred).unwrap();
    std::fs::write(deferred.join(format!("0000000001.000000000@{due}")), b"due").unwrap();
    std::fs::write(
        deferred.join(format!("9999999999.000000000@{later}")),
        b"later",
    )
    .unwrap();
    let out = dirq()
        .args(["exec", "--dry-run", s(t.root()), "--", "cat"])
        .output()
        .unwrap();
    assert_succeeded(&out, "dirq exec --dry-run");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.matches("would run: cat").count(), 2, "{stdout}");
    let line = |id: &MessageId| {
        stdout
            .lines()
            .find(|l| l.contains(&format!("DIRQ_ID={id} ")))
            .unwrap_or_else(|| panic!("no line for {id}: {stdout}"))
            .to_owned()
    };
    assert!(!line(&waiting).contains("deferred"), "{stdout}");
    assert!(line(&due).ends_with("[deferred, due]"), "{stdout}");
    assert!(
        !stdout.contains(&later.to_string()),
        "not yet due: {stdout}"
    );
    assert!(
        stdout.contains("2 message(s) would be processed"),
        "{stdout}"
    );
    assert_eq!(t.names(State::Deferred).len(), 2, "nothing was promoted");
}

#[test]
fn a_command_timeout_is_counted_in_the_timeouts_statistic() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"slow").unwrap();
    let out = exec(
        t.root(),
        &["-v", "--timeout", "200ms", "--kill-grace", "0"],
        "sleep 5",
    );
    let failure = dirq::admin::failure(&t.queue, &id).unwrap().unwrap();
    assert_eq!(failure.reason.as_deref(), Some("timeout"));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let finished = stderr
        .lines()
        .find(|l| l.contains("exec finished"))
        .unwrap_or_else(|| panic!("no final statistics: {stderr}"));
    assert!(finished.contains("timeouts: 1,"), "{finished}");
    assert!(finished.contains("failed: 1,"), "{finished}");
}

#[test]
fn a_command_that_cannot_be_started_is_refused_and_the_queue_is_kept() {
    let t = TestQueue::new();
    for i in 0..3 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    let not_executable = t.dir.path().join("not-executable.sh");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").unwrap();
    for command in [
        "/nonexistent/cmd",
        "dirq-no-such-command-anywhere",
        s(&not_executable),
        s(t.dir.path()),
    ] {
        let out = crate::util::run(&["exec", "--drain", s(t.root()), "--", command]);
        assert_eq!(out.status.code(), Some(1), "{command}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains("invalid program of command stage") && stderr.contains(command),
            "{command}: {stderr}"
        );
        let counts = t.queue.counts().unwrap();
        assert_eq!((counts.incoming, counts.errors), (3, 0), "{command}");
    }
}

#[test]
fn a_command_removed_while_running_stops_exec_and_keeps_the_messages() {
    let t = TestQueue::new();
    for i in 0..3 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    // The first message's command removes the command itself: the next cannot start.
    let script = t.dir.path().join("once.sh");
    std::fs::write(&script, "#!/bin/sh\nrm -f \"$0\"\ncat > /dev/null\n").unwrap();
    let mut permissions = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&script, permissions).unwrap();
    let out = crate::util::run(&["exec", "--drain", "-j", "1", s(t.root()), "--", s(&script)]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("cannot start command {:?}", s(&script))),
        "{stderr}"
    );
    let counts = t.queue.counts().unwrap();
    assert_eq!(
        (counts.incoming, counts.pending, counts.errors),
        (2, 0, 0),
        "one processed, the others kept: {stderr}"
    );
}

#[test]
fn on_fail_runs_for_dead_letters_and_timeouts_with_id_queue_reason_and_attempt() {
    let t = TestQueue::new();
    let hook_log = t.dir.path().join("hook.log");
    let hook = format!(
        r#"echo "$DIRQ_ID|$DIRQ_QUEUE|$DIRQ_REASON|$DIRQ_ATTEMPT|$DIRQ_DEAD_LETTER" >> {}"#,
        hook_log.display()
    );
    let lines = || -> Vec<Vec<String>> {
        std::fs::read_to_string(&hook_log)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('|').map(str::to_owned).collect())
            .collect()
    };
    // Exit 75 retries; after the last of 2 attempts the message is a dead letter.
    let dead = t.queue.enqueue(b"always busy").unwrap();
    exec(
        t.root(),
        &["--retries", "2", "--on-fail", &hook],
        "cat > /dev/null; exit 75",
    );
    assert_eq!(t.queue.counts().unwrap().errors, 1);
    let got = lines();
    assert_eq!(
        got.len(),
        1,
        "the hook ran once, for the dead letter: {got:?}"
    );
    assert_eq!(got[0][0], dead.to_string());
    assert_eq!(got[0][1], s(t.root()));
    assert!(got[0][2].starts_with("exit 75"), "{got:?}");
    assert_eq!((got[0][3].as_str(), got[0][4].as_str()), ("2", "1"));
    // A timeout of the command.
    let slow = t.queue.enqueue(b"slow").unwrap();
    exec(
        t.root(),
        &[
            "--timeout",
            "200ms",
            "--kill-grace",
            "0",
            "--on-fail",
            &hook,
        ],
        "sleep 5",
    );
    let got = lines();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got[1],
        [&slow.to_string(), s(t.root()), "timeout", "1", "0"].map(str::to_owned)
    );
}
