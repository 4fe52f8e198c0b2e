//! `--durability` and group commit on the command line: what the real binary syncs,
//! counted with strace, and the `--commit-batch`/`--commit-delay` settings of `dirq
//! exec` and of a pipeline file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dirq::{DirectoryQueue, State};

use crate::util::{
    assert_succeeded, dirq, names_in, run, run_ok, run_with_input, signal, skip, strace_works,
    tempdir, wait_until,
};

const LONG: Duration = Duration::from_secs(60);

/// Messages of the issue's reproduction.
const MESSAGES: usize = 20;

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `command` to completion with its standard output and error in files under
/// `dir`; fails the test (killing the process) if it takes longer than [`LONG`].
fn complete(command: &mut Command, dir: &Path, what: &str) -> Output {
    let (out_path, err_path) = (dir.join("out.log"), dir.join("err.log"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let deadline = Instant::now() + LONG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {LONG:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: std::fs::read(out_path).unwrap(),
        stderr: std::fs::read(err_path).unwrap(),
    }
}

/// `strace -f -qq -y -e trace=CALLS -o LOG dirq ARGS...`: the traced run's output and
/// the trace, one system call a line, each descriptor followed by its `<path>`.
fn traced(dir: &Path, calls: &str, args: &[&str]) -> (Output, Vec<String>) {
    let log = dir.join("strace.log");
    let out = complete(
        Command::new("strace")
            .args(["-f", "-qq", "-y", "-e"])
            .arg(format!("trace={calls}"))
            .arg("-o")
            .arg(&log)
            .arg(env!("CARGO_BIN_EXE_dirq"))
            .args(args)
            .env_remove("DIRQ_LOG"),
        dir,
        &format!("strace dirq {args:?}"),
    );
    let trace = std::fs::read_to_string(&log).unwrap();
    (out, trace.lines().map(str::to_owned).collect())
}

/// The path of a traced `fsync` of a directory on `line`, if it is one.
fn directory_fsync(line: &str) -> Option<&str> {
    let fd = line.split_once("fsync(")?.1;
    let path = fd.split_once('<')?.1.split_once('>')?.0;
    Path::new(path).is_dir().then_some(path)
}

/// The issue's reproduction: `dirq init a b`, 20 pushes, then `dirq --durability batch
/// exec a --to b --drain -- cat` under strace with `extra` exec arguments. Returns how
/// many directories the exec fsynced, after checking that all 20 messages went on.
fn batch_exec_directory_fsyncs(extra: &[&str]) -> usize {
    let dir = tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    run_ok(&["init", s(&a), s(&b)]);
    for i in 0..MESSAGES {
        let out = run_with_input(&["push", s(&a)], format!("message {i}").as_bytes());
        assert_succeeded(&out, "dirq push");
    }
    let args = [
        &[
            "--durability",
            "batch",
            "exec",
            s(&a),
            "--to",
            s(&b),
            "--drain",
        ],
        extra,
        &["--", "cat"],
    ]
    .concat();
    let (out, trace) = traced(dir.path(), "fsync,fdatasync", &args);
    assert_succeeded(&out, &format!("dirq {args:?}"));
    assert_eq!(
        names_in(&b.join("incoming")).len(),
        MESSAGES,
        "every message went on to b"
    );
    for state in ["incoming", "pending"] {
        assert_eq!(names_in(&a.join(state)), Vec::<String>::new(), "a/{state}");
    }
    trace.iter().filter_map(|l| directory_fsync(l)).count()
}

/// Issue 12: `dirq --durability batch exec` synced no directory (0 fsyncs), so a power
/// cut could lose what it had passed on. A Piper in batch mode is group commit: with
/// `--commit-batch 1` every outcome is a batch of its own, which syncs at least one
/// directory, and no batch of the default can sync more often.
#[test]
fn batch_exec_syncs_directories_per_group_commit() {
    let name = "batch_exec_syncs_directories_per_group_commit";
    if let Err(why) = strace_works() {
        return skip(name, &why);
    }
    let default = batch_exec_directory_fsyncs(&[]);
    assert!(default > 0, "batch exec synced no directory");
    let one = batch_exec_directory_fsyncs(&["--commit-batch", "1"]);
    assert!(
        one >= MESSAGES,
        "--commit-batch 1 synced {one} directories for {MESSAGES} outcomes"
    );
    assert!(
        one >= default,
        "--commit-batch 1 synced {one} directories, the default {default}"
    );
}

/// Three files to push, in a fresh directory with an empty queue `q`.
fn queue_and_files() -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let dir = tempdir();
    let q = dir.path().join("q");
    run_ok(&["init", s(&q)]);
    let files = (1..=3)
        .map(|i| {
            let file = dir.path().join(format!("f{i}"));
            std::fs::write(&file, format!("file {i}")).unwrap();
            s(&file).to_owned()
        })
        .collect();
    (dir, q, files)
}

/// The index of the last line of `trace` that publishes a message into `incoming`.
fn last_publish(trace: &[String], incoming: &str) -> usize {
    trace
        .iter()
        .rposition(|l| (l.contains("rename") || l.contains("link")) && l.contains(incoming))
        .unwrap_or_else(|| panic!("no publish into {incoming} in the trace:\n{trace:#?}"))
}

/// `--durability batch` promised a directory sync at the end of the command; a push of
/// several files syncs `incoming/` once its last message is published, and `none`
/// syncs nothing at all.
#[test]
fn batch_push_syncs_directories_at_the_end_and_none_syncs_nothing() {
    let name = "batch_push_syncs_directories_at_the_end_and_none_syncs_nothing";
    if let Err(why) = strace_works() {
        return skip(name, &why);
    }
    let calls = "fsync,fdatasync,sync_file_range,rename,renameat,renameat2,link,linkat";
    let (dir, q, files) = queue_and_files();
    let args = [
        &["--durability", "batch", "push", s(&q)][..],
        &files.iter().map(String::as_str).collect::<Vec<_>>(),
    ]
    .concat();
    let (out, trace) = traced(dir.path(), calls, &args);
    assert_succeeded(&out, "dirq --durability batch push");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    let incoming = std::fs::canonicalize(q.join("incoming")).unwrap();
    let incoming = format!("{}>", incoming.display());
    let published = last_publish(&trace, &incoming);
    let syncs: Vec<usize> = trace
        .iter()
        .enumerate()
        .filter(|(_, l)| directory_fsync(l).is_some())
        .map(|(i, _)| i)
        .collect();
    assert!(!syncs.is_empty(), "no directory fsync:\n{trace:#?}");
    assert!(
        syncs.iter().all(|&i| i > published),
        "a directory was synced before the last message was published:\n{trace:#?}"
    );
    assert!(
        trace[published..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&incoming)),
        "incoming/ was not synced at the end:\n{trace:#?}"
    );

    let (dir, q, files) = queue_and_files();
    let args = [
        &["--durability", "none", "push", s(&q)][..],
        &files.iter().map(String::as_str).collect::<Vec<_>>(),
    ]
    .concat();
    let (out, trace) = traced(dir.path(), "fsync,fdatasync,sync_file_range", &args);
    assert_succeeded(&out, "dirq --durability none push");
    assert_eq!(names_in(&q.join("incoming")).len(), 3);
    assert_eq!(trace, Vec::<String>::new(), "--durability none synced");
}

/// A push that fails at its second file still syncs the first message, whose id it
/// printed: the final sync used to be skipped by the error's early return.
#[test]
fn batch_push_that_fails_midway_syncs_what_it_pushed() {
    let name = "batch_push_that_fails_midway_syncs_what_it_pushed";
    if let Err(why) = strace_works() {
        return skip(name, &why);
    }
    let (dir, q, files) = queue_and_files();
    let missing = dir.path().join("missing");
    let args = [
        "--durability",
        "batch",
        "push",
        s(&q),
        &files[0],
        s(&missing),
    ];
    let (out, trace) = traced(
        dir.path(),
        "fsync,rename,renameat,renameat2,link,linkat",
        &args,
    );
    assert_eq!(out.status.code(), Some(1), "the missing file is an error");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    let incoming = std::fs::canonicalize(q.join("incoming")).unwrap();
    let incoming = format!("{}>", incoming.display());
    let published = last_publish(&trace, &incoming);
    assert!(
        trace[published..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&incoming)),
        "incoming/ was not synced after the error:\n{trace:#?}"
    );
}

/// `--commit-batch 0` (and above the maximum) is the library's clear error, before
/// any message is claimed, in `dirq exec` and in a pipeline file.
#[test]
fn commit_batch_out_of_range_is_refused_before_anything_runs() {
    let dir = tempdir();
    let (input, next) = (dir.path().join("input"), dir.path().join("next"));
    let queue = DirectoryQueue::open(&input).unwrap();
    queue.enqueue(b"untouched").unwrap();
    for batch in ["0", "65537"] {
        let out = run(&[
            "exec",
            s(&input),
            "--to",
            s(&next),
            "--commit-batch",
            batch,
            "--",
            "cat",
        ]);
        assert_eq!(out.status.code(), Some(1), "--commit-batch {batch}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains("invalid commit_batch of Piper")
                && stderr.contains("must be from 1 to 65536"),
            "--commit-batch {batch}: {stderr}"
        );
    }
    assert_eq!(queue.counts().unwrap().incoming, 1, "nothing was claimed");
    assert_eq!(names_in(&next.join("incoming")), Vec::<String>::new());

    let marker = dir.path().join("started");
    for (settings, want) in [
        (
            "commit_batch = 0",
            "stage \"x\": commit_batch = 0: must be from 1 to 65536",
        ),
        (
            "commit_batch = 70000",
            "stage \"x\": commit_batch = 70000: must be from 1 to 65536",
        ),
        ("commit_delay = \"soon\"", "stage \"x\": --commit-delay"),
    ] {
        for defaults in [false, true] {
            let file = dir.path().join("pipeline.toml");
            let stage = format!(
                "[[stage]]\nname = \"x\"\ninput = \"input\"\ncommand = \"touch {}\"\n",
                marker.display()
            );
            let text = if defaults {
                format!("[defaults]\n{settings}\n\n{stage}")
            } else {
                format!("{stage}{settings}\n")
            };
            std::fs::write(&file, text).unwrap();
            let out = run(&["run", s(&file)]);
            assert_eq!(out.status.code(), Some(1), "{settings}");
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert!(stderr.contains(want), "{settings}: {stderr}");
        }
    }
    assert!(!marker.exists(), "a stage process was started");
    assert_eq!(queue.counts().unwrap().incoming, 1, "nothing was claimed");
}

/// `commit_batch` and `commit_delay` in a pipeline file, per stage over `[defaults]`,
/// reach each stage's `dirq exec`, and the pipeline drains.
#[test]
fn pipeline_commit_settings_reach_each_stage_and_it_drains() {
    let dir = tempdir();
    let root = dir.path();
    let file = root.join("pipeline.toml");
    std::fs::write(
        &file,
        r#"
[defaults]
commit_batch = 8
commit_delay = "1ms"
drain_timeout = "5s"

[[stage]]
name = "upper"
input = "input"
output = "upper"
command = ["tr", "a-z", "A-Z"]
commit_batch = 1
commit_delay = "0ms"

[[stage]]
name = "deliver"
input = "upper"
output = "done"
command = ["cat"]
commit_delay = "5ms"
"#,
    )
    .unwrap();
    for queue in ["input", "upper", "done"] {
        DirectoryQueue::open(root.join(queue)).unwrap();
    }
    let input = DirectoryQueue::open(root.join("input")).unwrap();
    for i in 0..MESSAGES {
        input.enqueue(format!("event {i}")).unwrap();
    }
    let mut supervisor = dirq()
        .args(["--durability", "batch", "run", s(&file)])
        .stdin(Stdio::null())
        .stderr(File::create(root.join("run.log")).unwrap())
        .spawn()
        .unwrap();
    let done = DirectoryQueue::open(root.join("done")).unwrap();
    wait_until(LONG, "every event through both stages", || {
        done.count(State::Incoming).unwrap() == MESSAGES
    });
    for (queue, stage, batch, delay) in [
        ("input", "upper", "1", "0ms"),
        ("upper", "deliver", "8", "5ms"),
    ] {
        let queue = DirectoryQueue::open(root.join(queue)).unwrap();
        let mut line = String::new();
        wait_until(LONG, &format!("the {stage} stage to advertise"), || {
            let pipers = dirq::admin::pipers(&queue).unwrap();
            match pipers.iter().find(|p| p.live && p.stage == stage) {
                Some(piper) => {
                    line = format!(" {} ", crate::util::cmdline(piper.pid));
                    true
                }
                None => false,
            }
        });
        for want in [
            format!(" --commit-batch {batch} "),
            format!(" --commit-delay {delay} "),
            " --durability batch ".to_owned(),
        ] {
            assert!(line.contains(&want), "{stage}: {want:?} not in {line}");
        }
    }
    signal(supervisor.id(), "TERM");
    wait_until(LONG, "dirq run to stop", || {
        supervisor.try_wait().unwrap().is_some()
    });
    let status = supervisor.wait().unwrap();
    let log = std::fs::read_to_string(root.join("run.log")).unwrap();
    assert!(status.success(), "dirq run failed ({status}): {log}");
    for state in ["incoming", "pending"] {
        assert_eq!(
            names_in(&root.join("input").join(state)),
            Vec::<String>::new()
        );
        assert_eq!(
            names_in(&root.join("upper").join(state)),
            Vec::<String>::new()
        );
    }
}
