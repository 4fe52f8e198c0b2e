//! `dirq exec` flags for the library's expiry, backpressure watermarks and failure
//! breaker, and the pipeline-file keys passing them on to each stage.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use dirq::{DirectoryQueue, MessageId};

use crate::util::{assert_succeeded, dirq, signal, tempdir, wait_until, TestQueue};

const LONG: Duration = Duration::from_secs(60);

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `dirq exec QUEUE [extra...] -- sh -c SCRIPT` in the background.
fn spawn_exec(queue: &Path, extra: &[&str], script: &str) -> Child {
    dirq()
        .args(["exec", s(queue)])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .current_dir(queue.parent().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Stops a background exec with SIGTERM and waits for it.
fn stop(mut child: Child) {
    signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exec exited with {status}");
}

/// Waits until a live Piper on `queue` reports `state`.
fn wait_for_state(queue: &DirectoryQueue, state: &str) {
    wait_until(LONG, state, || {
        dirq::admin::pipers(queue)
            .unwrap_or_default()
            .iter()
            .any(|p| p.live && p.state == state)
    });
}

#[test]
fn max_age_sends_old_messages_to_errors_unprocessed() {
    let t = TestQueue::new();
    // Its id says it was born in 2023: older than the maximum age however slow the test.
    let old = MessageId::new("1700000000.000000001.test.1.00000001.msg").unwrap();
    t.queue.enqueue_with_id(&old, b"old").unwrap();
    t.queue.enqueue(b"fresh").unwrap();
    let log = t.dir.path().join("processed");
    let out = dirq()
        .args(["exec", "--drain", "--max-age", "1h", s(t.root())])
        .args([
            "--",
            "sh",
            "-c",
            &format!("cat >> {}; echo >> {}", s(&log), s(&log)),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_succeeded(&out, "dirq exec --max-age");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "fresh\n");
    let failure = dirq::admin::failure(&t.queue, &old).unwrap().unwrap();
    assert_eq!(failure.reason.as_deref(), Some("expired"));
}

#[test]
fn out_limit_bytes_pauses_intake_while_next_holds_that_many_bytes() {
    let t = TestQueue::new();
    let next = t.sibling("next");
    // One waiting message of 100 bytes: far below the count limit, above the byte one.
    next.enqueue([b'x'; 100]).unwrap();
    t.queue.enqueue(b"held back").unwrap();
    let child = spawn_exec(
        t.root(),
        &[
            "--to",
            s(next.root()),
            "--out-limit-bytes",
            "50",
            "--out-resume-bytes",
            "10",
        ],
        "cat",
    );
    wait_for_state(&t.queue, "paused (backpressure)");
    assert_eq!(t.queue.counts().unwrap().incoming, 1, "intake paused");
    // Once next is drained below the low byte watermark, intake resumes.
    let taken = next.try_claim().unwrap().unwrap();
    taken.commit().unwrap();
    wait_until(LONG, "the held message forwarded", || {
        t.queue.counts().unwrap().unfinished() == 0 && next.counts().unwrap().incoming == 1
    });
    stop(child);
}

#[test]
fn breaker_failures_opens_the_breaker_and_no_breaker_keeps_going() {
    let t = TestQueue::new();
    for i in 0..5 {
        t.queue.enqueue(format!("m{i}").as_bytes()).unwrap();
    }
    let child = spawn_exec(
        t.root(),
        &[
            "--retries",
            "1",
            "--breaker-failures",
            "2",
            "--breaker-cooldown",
            "1h",
        ],
        "exit 1",
    );
    wait_for_state(&t.queue, "paused (failure breaker)");
    stop(child);
    assert!(t.queue.counts().unwrap().incoming >= 1, "intake stopped");

    // The same failures with --no-breaker: every message is dead-lettered.
    let out = dirq()
        .args([
            "exec",
            "--drain",
            "--retries",
            "1",
            "--no-breaker",
            s(t.root()),
        ])
        .args(["--", "sh", "-c", "exit 1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_succeeded(&out, "dirq exec --no-breaker");
    let counts = t.queue.counts().unwrap();
    assert_eq!((counts.unfinished(), counts.errors), (0, 5));
}

#[test]
fn exec_refuses_out_of_range_settings_naming_them() {
    let t = TestQueue::new();
    t.queue.enqueue(b"untouched").unwrap();
    for (args, want) in [
        (&["--max-age", "0"][..], "invalid max_age"),
        (
            &["--out-resume", "10", "--out-limit", "5"][..],
            "invalid out_resume of Piper",
        ),
        (
            &["--out-limit-bytes", "0"][..],
            "invalid out_limit_bytes of Piper",
        ),
        (&["--out-limit", "0"][..], "invalid out_limit of Piper"),
        (
            &["--out-resume-bytes", "10"][..],
            "invalid out_resume_bytes of Piper",
        ),
        (
            &["--out-limit-bytes", "5", "--out-resume-bytes", "10"][..],
            "invalid out_resume_bytes of Piper",
        ),
        (
            &["--breaker-failures", "0"][..],
            "invalid breaker.max_failures of Piper",
        ),
        (
            &["--breaker-rate", "1.5"][..],
            "invalid breaker.max_failure_rate of Piper",
        ),
        (
            &["--breaker-min-samples", "0"][..],
            "invalid breaker.min_samples of Piper",
        ),
        (
            &["--breaker-window", "0"][..],
            "invalid breaker.window of Piper",
        ),
        (
            &["--breaker-cooldown", "0"][..],
            "invalid breaker.cooldown of Piper",
        ),
    ] {
        // --drain: a value wrongly accepted ends the run (and the test) instead of hanging.
        let out =
            crate::util::run(&[&["exec", "--drain", s(t.root())], args, &["--", "true"]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
    assert_eq!(t.queue.counts().unwrap().incoming, 1, "nothing was claimed");
}

#[test]
fn run_refuses_out_of_range_settings_before_starting_any_stage() {
    let dir = tempdir();
    let marker = dir.path().join("started");
    DirectoryQueue::builder(dir.path().join("q"))
        .open()
        .unwrap();
    for (key, want) in [
        (
            "max_age = \"0s\"",
            "max_age = \"0s\": must be more than zero",
        ),
        ("max_age = \"soon\"", "max_age: "),
        (
            "out_resume = 6000",
            "out_resume = 6000: must be at most out_limit (5000)",
        ),
        (
            "out_limit_bytes = 0",
            "out_limit_bytes = 0: must be at least 1",
        ),
        (
            "out_resume_bytes = 5",
            "out_resume_bytes = 5: is set, but out_limit_bytes is not",
        ),
        (
            "breaker_failures = 0",
            "breaker_failures = 0: must be at least 1",
        ),
        (
            "breaker_rate = 0.0",
            "breaker_rate = 0: must be more than 0 and at most 1",
        ),
        (
            "breaker_min_samples = 0",
            "breaker_min_samples = 0: must be at least 1",
        ),
        (
            "breaker_window = \"0s\"",
            "breaker_window = \"0s\": must be more than zero",
        ),
        (
            "breaker_cooldown = \"0\"",
            "breaker_cooldown = \"0\": must be more than zero",
        ),
        (
            "breaker = false\nbreaker_failures = 3",
            "breaker = false: cannot be combined",
        ),
        ("timeout = \"0\"", "invalid timeout of command stage"),
        ("on_fail = \"\"", "invalid on_fail of command stage"),
        ("retries = 0", "retries = 0: "),
        ("out_limit = 0", "out_limit = 0: must be at least 1"),
    ] {
        for defaults in [false, true] {
            let file = dir.path().join("pipeline.toml");
            let stage = format!(
                "[[stage]]\nname = \"x\"\ninput = \"q\"\ncommand = \"touch {}\"\n",
                marker.display()
            );
            let text = if defaults {
                format!("[defaults]\n{key}\n\n{stage}")
            } else {
                format!("{stage}{key}\n")
            };
            std::fs::write(&file, text).unwrap();
            crate::util::assert_run_refuses(&file, key, want);
        }
    }
    assert!(!marker.exists(), "a stage process was started");
}

/// A command that cannot be run (a missing program, relative to the file's directory
/// or in PATH) stops the pipeline before it starts, naming the program.
#[test]
fn run_refuses_a_command_that_cannot_be_run() {
    let dir = tempdir();
    DirectoryQueue::builder(dir.path().join("q"))
        .open()
        .unwrap();
    let file = dir.path().join("pipeline.toml");
    for (command, want) in [
        ("[\"./missing.sh\"]", "missing.sh"),
        ("[\"no-such-program-dirq\"]", "no-such-program-dirq"),
        ("[]", "the command is empty"),
    ] {
        std::fs::write(
            &file,
            format!("[[stage]]\nname = \"x\"\ninput = \"q\"\ncommand = {command}\n"),
        )
        .unwrap();
        for check in [true, false] {
            let args: &[&str] = if check {
                &["run", "--check", s(&file)]
            } else {
                &["run", s(&file)]
            };
            let out = crate::util::run(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
            assert!(stderr.contains("stage \"x\": "), "{stderr}");
            assert!(
                stderr.contains(want),
                "{command}: wanted {want:?} in {stderr}"
            );
        }
    }
    // The same program, present and executable beside the file, is accepted.
    let script = dir.path().join("present.sh");
    std::fs::write(&script, "#!/bin/sh\ncat\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(
        &file,
        "[[stage]]\nname = \"x\"\ninput = \"q\"\ncommand = [\"./present.sh\"]\n",
    )
    .unwrap();
    crate::util::run_ok(&["run", "--check", s(&file)]);
}

#[test]
fn pipeline_keys_reach_each_stage_process_per_stage_over_defaults() {
    let dir = tempdir();
    for name in ["a", "b", "out"] {
        DirectoryQueue::builder(dir.path().join(name))
            .open()
            .unwrap();
    }
    let file = dir.path().join("pipeline.toml");
    std::fs::write(
        &file,
        "[defaults]\nmax_age = \"2h\"\nout_resume = 7\nout_limit_bytes = 4096\n\
         out_resume_bytes = 1024\nbreaker_min_samples = 4\nbreaker_window = \"30s\"\n\
         breaker_cooldown = \"2m\"\nkill_grace = \"1s\"\n\n\
         [[stage]]\nname = \"first\"\ninput = \"a\"\noutput = \"out\"\ncommand = \"cat\"\n\
         breaker_failures = 9\nbreaker_rate = 0.25\n\n\
         [[stage]]\nname = \"second\"\ninput = \"b\"\ncommand = \"cat\"\n\
         max_age = \"5m\"\nbreaker = false\n",
    )
    .unwrap();
    let out = crate::util::run(&["run", "--check", s(&file)]);
    assert_succeeded(&out, "dirq run --check");

    let mut supervisor = dirq()
        .args(["run", s(&file)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let queues = [
        DirectoryQueue::builder(dir.path().join("a"))
            .open()
            .unwrap(),
        DirectoryQueue::builder(dir.path().join("b"))
            .open()
            .unwrap(),
    ];
    let mut lines = [String::new(), String::new()];
    wait_until(LONG, "both stage processes running", || {
        for (queue, line) in queues.iter().zip(&mut lines) {
            if let Some(p) = dirq::admin::pipers(queue)
                .unwrap_or_default()
                .iter()
                .find(|p| p.live)
            {
                *line = format!(" {} ", crate::util::cmdline(p.pid));
            }
        }
        lines.iter().all(|l| l.contains(" exec "))
    });
    signal(supervisor.id(), "TERM");
    assert!(supervisor.wait().unwrap().success());
    let [first, second] = lines;
    for want in [
        " --max-age 2h ",
        " --out-resume 7 ",
        " --out-limit-bytes 4096 ",
        " --out-resume-bytes 1024 ",
        " --breaker-failures 9 ",
        " --breaker-rate 0.25 ",
        " --breaker-min-samples 4 ",
        " --breaker-window 30s ",
        " --breaker-cooldown 2m ",
        " --kill-grace 1s ",
    ] {
        assert!(first.contains(want), "{want} in {first}");
    }
    assert!(!first.contains("--no-breaker"), "{first}");
    for want in [
        " --max-age 5m ",
        " --no-breaker ",
        " --breaker-min-samples 4 ",
    ] {
        assert!(second.contains(want), "{want} in {second}");
    }
    assert!(!second.contains("--breaker-failures"), "{second}");
}
