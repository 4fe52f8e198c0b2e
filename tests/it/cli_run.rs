//! `dirq run` as a supervisor: signals, closed pipes, relative pipeline paths and bad
//! settings, each against the real binary (issue 13).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
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

/// Whether process `pid` has exited (a zombie nobody reaped counts as gone).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
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

/// Starts `dirq run` on `dir/pipeline.toml`; its standard error collects into the
/// returned buffer.
fn start(dir: &Path) -> (Child, Arc<Mutex<String>>) {
    let mut supervisor = dirq()
        .args(["run", s(&dir.join("pipeline.toml"))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let reader = BufReader::new(supervisor.stderr.take().unwrap());
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { return };
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (supervisor, log)
}

/// Defect 1: SIGUSR1 killed `dirq run` (rc 138) and left its stage processes running
/// unsupervised. Now it logs the supervisor's statistics and passes the signal on.
#[test]
fn run_logs_statistics_on_sigusr1_and_passes_it_on() {
    let dir = tempdir();
    let (input, done) = cat_pipeline(dir.path());
    let (mut supervisor, log) = start(dir.path());
    wait_until(LONG, "the stage to advertise", || {
        live_pids(&input).len() == 1
    });
    pass_through(&input, &done, 3, 3);
    let stage = live_pids(&input)[0];
    // A stage process sent SIGUSR1 before it handles it would die of it; the
    // supervisor waits until its processes are a few seconds old. Poll, signalling
    // again, until the stage's own statistics line shows up.
    let mut sent = std::time::Instant::now() - LONG;
    wait_until(LONG, "the stage's statistics line", || {
        if sent.elapsed() >= Duration::from_millis(500) {
            signal(supervisor.id(), "USR1");
            sent = std::time::Instant::now();
        }
        let log = log.lock().unwrap();
        log.contains("statistics") && log.contains("committed=3")
    });
    let text = log.lock().unwrap().clone();
    assert!(text.contains("pipeline statistics"), "{text}");
    assert!(
        text.contains("stage process statistics") && text.contains(&format!("pid={stage}")),
        "{text}"
    );
    assert!(supervisor.try_wait().unwrap().is_none(), "dirq run died");
    assert_eq!(
        live_pids(&input),
        [stage],
        "the stage process was restarted"
    );
    assert_eq!(stop(supervisor), Some(0), "dirq run after SIGTERM");
}

/// Defect 1: after `kill -9` of `dirq run`, its stage processes kept running,
/// re-parented to pid 1. Now they get SIGTERM (the parent-death signal), drain and
/// exit, and every message is either processed or back in incoming/.
#[cfg(target_os = "linux")]
#[test]
fn stage_processes_die_with_a_killed_supervisor() {
    let dir = tempdir();
    std::fs::write(
        dir.path().join("pipeline.toml"),
        "[[stage]]\nname = \"slow\"\ninput = \"spool/input\"\noutput = \"spool/done\"\n\
         command = \"sleep 0.2; cat\"\nprocesses = 2\nworkers = 2\ndrain_timeout = \"30s\"\n",
    )
    .unwrap();
    let input = DirectoryQueue::open(dir.path().join("spool/input")).unwrap();
    let done = DirectoryQueue::open(dir.path().join("spool/done")).unwrap();
    for i in 0..40 {
        input.enqueue(format!("message {i}")).unwrap();
    }
    let (mut supervisor, log) = start(dir.path());
    wait_until(LONG, "both stage processes to advertise", || {
        live_pids(&input).len() == 2
    });
    let stages = live_pids(&input);
    wait_until(LONG, "some messages through", || {
        done.count(State::Incoming).unwrap() >= 2
    });
    signal(supervisor.id(), "KILL");
    supervisor.wait().unwrap();
    wait_until(LONG, "the stage processes to exit", || {
        stages.iter().all(|&pid| gone(pid))
    });
    // One SIGTERM each, which drains: a second one would stop them at once.
    wait_until(LONG, "both stage processes to log their end", || {
        log.lock().unwrap().matches("exec finished").count() == 2
    });
    let text = log.lock().unwrap().clone();
    assert!(!text.contains("stopping now"), "{text}");
    let counts = input.counts().unwrap();
    assert_eq!(counts.pending, 0, "{counts:?}");
    assert_eq!(counts.errors, 0, "{counts:?}");
    assert_eq!(
        counts.incoming + done.count(State::Incoming).unwrap(),
        40,
        "nothing lost: {counts:?}"
    );
}

/// Defect 2: `dirq run sub/pipeline.toml` joined `sub/` onto the queue paths and then
/// also ran the stages in `sub/`, so every stage failed to open `sub/spool/input` and
/// was restarted over and over.
#[test]
fn a_relative_pipeline_path_applies_its_directory_once() {
    let dir = tempdir();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let (input, done) = cat_pipeline(&sub);
    // A relative command runs in the file's directory too.
    std::fs::write(
        sub.join("pipeline.toml"),
        "[[stage]]\nname = \"copy\"\ninput = \"spool/input\"\noutput = \"spool/done\"\n\
         command = [\"sh\", \"./copy.sh\"]\n",
    )
    .unwrap();
    std::fs::write(sub.join("copy.sh"), "exec cat\n").unwrap();
    let mut supervisor = dirq()
        .current_dir(dir.path())
        .args(["run", "sub/pipeline.toml"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    pass_through(&input, &done, 3, 3);
    assert!(supervisor.try_wait().unwrap().is_none(), "dirq run died");
    assert_eq!(stop(supervisor), Some(0), "dirq run after SIGTERM");
    assert_eq!(input.counts().unwrap().errors, 0);
}

/// Defect 3: `dirq run --help` advertised `inputs`, which the parser rejected. A stage
/// now reads `inputs = [...]` in strict priority order, through `dirq exec
/// --also-input`, and `exec --drain` waits for every input to be empty.
#[test]
fn a_stage_reads_several_inputs_in_priority_order() {
    let dir = tempdir();
    let root = dir.path();
    let log = root.join("order.log");
    std::fs::write(
        root.join("pipeline.toml"),
        format!(
            "[[stage]]\nname = \"both\"\ninputs = [\"spool/high\", \"spool/low\"]\n\
             command = \"cat >> '{}'; echo >> '{}'\"\n",
            log.display(),
            log.display()
        ),
    )
    .unwrap();
    let high = DirectoryQueue::open(root.join("spool/high")).unwrap();
    let low = DirectoryQueue::open(root.join("spool/low")).unwrap();
    for i in 0..3 {
        low.enqueue(format!("low {i}")).unwrap();
    }
    for i in 0..3 {
        high.enqueue(format!("high {i}")).unwrap();
    }
    let supervisor = dirq()
        .args(["run", s(&root.join("pipeline.toml"))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    wait_until(LONG, "all six messages", || lines().len() == 6);
    assert_eq!(stop(supervisor), Some(0), "dirq run after SIGTERM");
    assert_eq!(
        lines(),
        ["high 0", "high 1", "high 2", "low 0", "low 1", "low 2"],
        "strict priority"
    );
    // Both input and inputs, or neither: refused before anything runs.
    for keys in ["input = \"a\"\ninputs = [\"b\"]", "inputs = []"] {
        std::fs::write(
            root.join("bad.toml"),
            format!("[[stage]]\nname = \"x\"\ncommand = \"cat\"\n{keys}\n"),
        )
        .unwrap();
        let out = crate::util::run(&["run", s(&root.join("bad.toml"))]);
        assert_eq!(out.status.code(), Some(1), "{keys}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains("stage \"x\"") && stderr.contains("input"),
            "{stderr}"
        );
    }
    // exec --drain does not stop while a lower-priority input still has messages.
    low.enqueue(b"late").unwrap();
    let out = crate::util::run(&[
        "exec",
        s(high.root()),
        "--also-input",
        s(low.root()),
        "--drain",
        "--",
        "true",
    ]);
    crate::util::assert_succeeded(&out, "dirq exec --also-input --drain");
    assert_eq!(low.counts().unwrap().incoming, 0);
}

/// Defect 8, beyond `dirq run`: `dirq completions` panicked (exit 101) when its standard
/// output was closed. A reader that went away is not an error for any command.
#[test]
fn a_closed_stdout_panics_no_command() {
    let dir = tempdir();
    let queue = DirectoryQueue::open(dir.path().join("q")).unwrap();
    queue.enqueue(b"one").unwrap();
    let q = s(queue.root());
    for args in [
        vec!["completions", "bash"],
        vec!["--help"],
        vec!["run", "--help"],
        vec!["status", q],
        vec!["ls", q],
    ] {
        let mut child = dirq()
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the command writes anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_ne!(out.status.code(), Some(101), "{args:?} panicked");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `dirq run --check FILE` validates a pipeline file (syntax, settings, input queues)
/// without starting anything, like `postfix check`.
#[test]
fn run_check_validates_a_pipeline_file_without_running_it() {
    let dir = tempdir();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let (input, _done) = cat_pipeline(&sub);
    input.enqueue(b"untouched").unwrap();
    let check = |file: &str| {
        dirq()
            .current_dir(dir.path())
            .args(["run", "--check", file])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = check("sub/pipeline.toml");
    crate::util::assert_succeeded(&out, "dirq run --check");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "sub/pipeline.toml: ok (1 stages, 1 processes)\n"
    );
    assert_eq!(input.counts().unwrap().incoming, 1, "nothing ran");
    assert!(live_pids(&input).is_empty(), "a stage process was started");
    for (text, want) in [
        (
            "[[stage]]\nname = \"x\"\ninput = \"spool/missing\"\ncommand = \"cat\"\n",
            "stage \"x\": input queue: failed to open queue",
        ),
        (
            "[[stage]]\nname = \"x\"\ninput = \"spool/input\"\ncommand = \"cat\"\nworkers = 0\n",
            "stage \"x\": workers = 0: must be from 1 to 1024",
        ),
        (
            "[[stage]]\nname = \"x\"\ninput = \"spool/input\"\ncommand = \"cat\"\ntimeout = \"soon\"\n",
            "stage \"x\": timeout: ",
        ),
        ("[defaults]\nworkers = 2\n", "has no [[stage]]"),
    ] {
        std::fs::write(sub.join("bad.toml"), text).unwrap();
        let out = check("sub/bad.toml");
        assert_eq!(out.status.code(), Some(1), "{text}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(want), "{text}: {stderr}");
        assert!(out.stdout.is_empty(), "{text}");
    }
    assert!(
        !sub.join("spool/missing").exists(),
        "--check created a queue"
    );
}
