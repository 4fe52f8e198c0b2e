//! Issue 13, "Proof": every subcommand run with bad arguments, a bad queue, hostile
//! ids, huge and negative numbers, and a closed standard output or error. Each row must
//! fail cleanly (exit 1, or 2 for a usage error; never a panic), say on the first line
//! of standard error what failed and on what, and move or lose no message.

use std::path::Path;
use std::process::{Output, Stdio};

use dirq::State;

use crate::util::{dirq, is_root, TestQueue};

/// How a row's standard streams are set up.
#[derive(Clone, Copy, PartialEq)]
enum Streams {
    Normal,
    /// Standard output is a pipe whose read end is closed before the child writes.
    ClosedStdout,
    /// Standard error is a pipe whose read end is closed before the child writes.
    ClosedStderr,
}

struct Row {
    what: &'static str,
    args: Vec<String>,
    /// Words the first line of standard error must contain.
    says: Vec<String>,
    streams: Streams,
}

fn row(what: &'static str, args: &[&str], says: &[&str]) -> Row {
    Row {
        what,
        args: args.iter().map(|a| a.to_string()).collect(),
        says: says.iter().map(|a| a.to_string()).collect(),
        streams: Streams::Normal,
    }
}

fn with(mut r: Row, streams: Streams) -> Row {
    r.streams = streams;
    r
}

fn snapshot(t: &TestQueue) -> Vec<(State, Vec<String>)> {
    State::ALL.iter().map(|&s| (s, t.names(s))).collect()
}

fn spawn(args: &[String], streams: Streams, cwd: &Path) -> Output {
    // A pipe whose read end is closed before the child starts: no race with its first
    // write, however the scheduler runs the two processes.
    let closed = || {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills both descriptors on success; each is owned exactly once.
        let (reader, writer) = unsafe {
            assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0, "pipe2");
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        drop(reader);
        Stdio::from(writer)
    };
    let mut command = dirq();
    command
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match streams {
        Streams::Normal => {}
        Streams::ClosedStdout => drop(command.stdout(closed())),
        Streams::ClosedStderr => drop(command.stderr(closed())),
    }
    command.output().expect("run dirq")
}

#[test]
fn every_subcommand_fails_cleanly_on_bad_input() {
    let t = TestQueue::new();
    for body in [&b"one"[..], b"two", b"three"] {
        t.queue.enqueue(body).unwrap();
    }
    t.queue.enqueue(b"failed").unwrap();
    t.queue
        .try_claim()
        .unwrap()
        .unwrap()
        .fail("for the test")
        .unwrap();
    let first = t.names(State::Incoming)[0].clone();
    let q = t.root().to_str().unwrap().to_owned();
    let dir = t.dir.path();
    let missing = dir.join("missing").to_str().unwrap().to_owned();
    let file = dir.join("file");
    std::fs::write(&file, "not a queue\n").unwrap();
    let file = file.to_str().unwrap().to_owned();
    let pipeline = dir.join("pipeline.toml");
    std::fs::write(
        &pipeline,
        "[[stage]]\nname = \"s\"\ninput = \"q\"\ncommand = [\"cat\"]\n",
    )
    .unwrap();
    let pipeline = pipeline.to_str().unwrap().to_owned();
    let huge = "99999999999999999999";
    let next = dir.join("next").to_str().unwrap().to_owned();
    let dir_s = dir.to_str().unwrap().to_owned();

    let mut rows = Vec::new();
    // A missing queue and a queue that is a regular file.
    for bad in [missing.as_str(), file.as_str()] {
        let selection = |c: &'static str| row(c, &[c, bad, "--all"], &["open", bad]);
        rows.extend([
            row("take", &["take", bad], &["open", bad]),
            row("cat", &["cat", bad, "x.msg"], &["open", bad]),
            row("status", &["status", bad], &["open", bad]),
            row("ls", &["ls", bad], &["open", bad]),
            row("ages", &["ages", bad], &["open", bad]),
            row("metrics", &["metrics", bad], &["open", bad]),
            selection("requeue"),
            selection("hold"),
            selection("unhold"),
            selection("delete"),
            selection("flush"),
            row("purge", &["purge", bad], &["open", bad]),
            row("check", &["check", bad], &["open", bad]),
            row("recover", &["recover", bad], &["open", bad]),
            row(
                "exec --dry-run",
                &["exec", bad, "--dry-run", "--", "true"],
                &["open", bad],
            ),
            row(
                "exec --drain",
                &["exec", bad, "--drain", "--", "true"],
                &["open", bad],
            ),
            row("run --check", &["run", "--check", bad], &["pipeline", bad]),
        ]);
    }
    rows.push(row("init", &["init", &file], &["open", &file]));
    rows.push(row("push", &["push", &file], &["open", &file]));
    rows.push(row("push", &["push", &q], &["publish", &q]));
    rows.push(row("push", &["push", &q, &dir_s], &[&dir_s]));
    let under_file = format!("{file}/sub");
    rows.push(row("init", &["init", &under_file], &[&under_file]));
    rows.push(row("run --check", &["run", "--check", &file], &[&file]));
    rows.push(row("push", &["push", &q, &missing], &["open", &missing]));
    // Hostile ids.
    for id in ["garbage", "a/b", "..", "../../etc/passwd", "."] {
        for c in ["cat", "requeue", "hold", "unhold", "delete", "flush"] {
            rows.push(row(c, &[c, &q, id], &[id]));
        }
    }
    // Huge and negative numbers (clap usage errors, exit 2).
    rows.extend([
        row("take", &["take", &q, "-n", huge], &["--count", huge]),
        row("take", &["take", &q, "-n", "-1"], &["-1"]),
        row("take", &["take", &q, "-n", "0"], &["--count", "0"]),
        row("take", &["take", &q, "--wait", "-1"], &["-1"]),
        row(
            "status",
            &["status", "--spool", dir.to_str().unwrap(), "--depth", huge],
            &["--depth"],
        ),
        row("status", &["status", &q, "--watch", "0"], &["--watch"]),
        row(
            "push",
            &["push", &q, "--delay", "99999999999999999d"],
            &["--delay"],
        ),
        row("push", &["push", &q, "--at", "@-5"], &["--at"]),
        row(
            "requeue",
            &["requeue", &q, "--all", "--older-than", huge],
            &["--older-than"],
        ),
        row(
            "purge",
            &["purge", &q, "--errors-older-than", "nan"],
            &["--errors-older-than"],
        ),
        row("recover", &["recover", &q, "--grace", "-3"], &["-3"]),
        row("init", &["init", "--mode", huge, &missing], &["--mode"]),
        row(
            "exec --dry-run",
            &["exec", &q, "--dry-run", "-j", huge, "--", "true"],
            &["--jobs"],
        ),
        row(
            "exec --drain",
            &["exec", &q, "--drain", "--retries", "-1", "--", "true"],
            &["-1"],
        ),
        row("completions", &["completions", "nosuch"], &["<SHELL>"]),
        row(
            "exec --drain",
            &["exec", &q, "--drain", "-j", "0", "--", "true"],
            &["workers", "1 to 1024"],
        ),
        row(
            "exec --drain",
            &["exec", &q, "--drain", "--commit-batch", "0", "--", "true"],
            &["commit_batch", "1 to 65536"],
        ),
        row(
            "exec --drain",
            &[
                "exec",
                &q,
                "--to",
                &next,
                "--drain",
                "--out-limit",
                "0",
                "--",
                "true",
            ],
            &["out_limit", "at least 1"],
        ),
        row("hold", &["hold", &q], &["<ID>"]),
    ]);
    // A closed standard output: what would have been printed is not, and says so.
    for (what, args) in [
        ("take", vec!["take", q.as_str(), "-n", "5"]),
        ("cat", vec!["cat", q.as_str(), first.as_str()]),
        ("status", vec!["status", q.as_str()]),
        ("ls", vec!["ls", q.as_str()]),
        ("ages", vec!["ages", q.as_str()]),
        ("metrics", vec!["metrics", q.as_str()]),
        (
            "exec --dry-run",
            vec!["exec", q.as_str(), "--dry-run", "--", "true"],
        ),
        ("completions", vec!["completions", "bash"]),
        ("ls --json", vec!["ls", "--json", q.as_str()]),
        ("status --json", vec!["status", "--json", q.as_str()]),
        ("check", vec!["check", q.as_str()]),
        ("purge", vec!["purge", q.as_str()]),
        ("recover", vec!["recover", q.as_str()]),
        ("init", vec!["init", q.as_str()]),
        ("run --check", vec!["run", "--check", pipeline.as_str()]),
    ] {
        rows.push(with(row(what, &args, &[]), Streams::ClosedStdout));
    }
    // A closed standard error with a bad queue: the exit status still tells.
    for (what, args) in [
        ("ls", vec!["ls", missing.as_str()]),
        ("cat", vec!["cat", q.as_str(), "../../etc/passwd"]),
        ("take", vec!["take", file.as_str()]),
        (
            "exec --drain",
            vec!["exec", missing.as_str(), "--drain", "--", "true"],
        ),
    ] {
        rows.push(with(row(what, &args, &[]), Streams::ClosedStderr));
    }
    // A queue none can read as root either: its errors/ is a regular file. Its one
    // waiting message must stay where it is.
    let broken = TestQueue::new();
    let waiting = broken.queue.enqueue(b"waiting").unwrap().to_string();
    std::fs::remove_dir(broken.path(State::Errors)).unwrap();
    std::fs::write(broken.path(State::Errors), "not a directory\n").unwrap();
    let broken_q = broken.root().to_str().unwrap().to_owned();
    let broken_errors = broken.path(State::Errors).to_str().unwrap().to_owned();
    for c in [
        "take", "status", "ls", "ages", "metrics", "purge", "check", "recover", "init",
    ] {
        rows.push(row(c, &[c, &broken_q], &["open", &broken_errors]));
    }
    for c in ["requeue", "hold", "unhold", "delete", "flush"] {
        rows.push(row(c, &[c, &broken_q, "--all"], &["open", &broken_errors]));
    }
    rows.push(row(
        "cat",
        &["cat", &broken_q, &waiting],
        &["open", &broken_errors],
    ));
    rows.push(row(
        "exec --drain",
        &["exec", &broken_q, "--drain", "--", "true"],
        &["open", &broken_errors],
    ));
    // An unreadable queue directory; root reads it anyway.
    let unreadable = dir.join("unreadable");
    dirq::DirectoryQueue::open(&unreadable).unwrap();
    let unreadable = unreadable.to_str().unwrap().to_owned();
    if is_root() {
        eprintln!("skipped the unreadable-queue rows: running as root, chmod 000 stops no one");
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o000)).unwrap();
        for c in ["take", "ls", "status", "check", "recover", "purge"] {
            rows.push(row(c, &[c, &unreadable], &[&unreadable]));
        }
    }

    let mut before = snapshot(&t);
    let mut problems = Vec::new();
    println!(
        "{:<16} {:<9} {:>4}  arguments",
        "command", "streams", "exit"
    );
    for r in &rows {
        let out = spawn(&r.args, r.streams, dir);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let first_line = err.lines().next().unwrap_or("");
        let code = out.status.code();
        let streams = match r.streams {
            Streams::Normal => "",
            Streams::ClosedStdout => "no stdout",
            Streams::ClosedStderr => "no stderr",
        };
        println!(
            "{:<16} {:<9} {:>4}  {}",
            r.what,
            streams,
            code.map_or("sig".into(), |c| c.to_string()),
            r.args.join(" ")
        );
        let mut problem = |p: String| problems.push(format!("dirq {:?}: {p}", r.args));
        // A reader that went away is not an error for a listing (docs/operator.md:
        // `dirq ls q | head`): exit 0 and silence are allowed there, and only there.
        let quiet_ok = r.streams == Streams::ClosedStdout && r.says.is_empty();
        let allowed = matches!(code, Some(1 | 2)) || (quiet_ok && code == Some(0));
        if !allowed {
            problem(format!("exit {:?}, not 1 or 2; stderr: {err}", out.status));
        }
        if err.contains("panicked") {
            problem(format!("panicked: {err}"));
        }
        if r.streams != Streams::ClosedStderr && first_line.is_empty() && code != Some(0) {
            problem("failed with nothing on standard error".into());
        }
        // A usage error names the argument on the line after "error: ..." at times.
        let said = if code == Some(2) {
            err.as_str()
        } else {
            first_line
        };
        for word in &r.says {
            if !said.contains(word.as_str()) {
                problem(format!("stderr lacks {word:?}: {err}"));
            }
        }
        let now = snapshot(&t);
        if now != before {
            problem(format!("the queue changed: {before:?} -> {now:?}"));
            before = now;
        }
    }
    println!("{} rows, {} problems", rows.len(), problems.len());
    assert_eq!(
        broken.names(State::Incoming),
        [waiting.as_str()],
        "the broken queue's message stays waiting"
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// A reader that went away (`dirq recover a b | head -1`) does not stop the work still to
/// do: the second queue is recovered too, and the command does not fail.
#[test]
fn recover_of_several_queues_finishes_with_a_closed_stdout() {
    let (a, b) = (TestQueue::new(), TestQueue::new());
    let mut orphans = Vec::new();
    for t in [&a, &b] {
        let id = t.queue.enqueue(b"orphan").unwrap().to_string();
        // Claimed by a worker that is gone: in pending/, with no lock held.
        std::fs::rename(
            t.path(State::Incoming).join(&id),
            t.path(State::Pending).join(&id),
        )
        .unwrap();
        orphans.push(id);
    }
    let args = [
        "recover",
        a.root().to_str().unwrap(),
        b.root().to_str().unwrap(),
    ]
    .map(String::from);
    let out = spawn(&args, Streams::ClosedStdout, a.dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    for (t, id) in [(&a, &orphans[0]), (&b, &orphans[1])] {
        assert_eq!(t.names(State::Incoming), [id.as_str()], "{err}");
        assert!(t.names(State::Pending).is_empty());
    }
}

/// Nor does it stop `push a b c` after `a`, or `take --to NEXT -n 5` after the first
/// message: only the ids go unprinted.
#[test]
fn push_and_take_to_finish_with_a_closed_stdout() {
    let t = TestQueue::new();
    let dir = t.dir.path();
    let mut args = vec!["push".to_owned(), t.root().to_str().unwrap().to_owned()];
    for name in ["a", "b", "c"] {
        std::fs::write(dir.join(name), name).unwrap();
        args.push(dir.join(name).to_str().unwrap().to_owned());
    }
    let out = spawn(&args, Streams::ClosedStdout, dir);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "push: {err}");
    assert_eq!(
        t.names(State::Incoming).len(),
        3,
        "every file was pushed: {err}"
    );

    let next = t.sibling("next");
    let args = [
        "take",
        t.root().to_str().unwrap(),
        "--to",
        next.root().to_str().unwrap(),
        "-n",
        "5",
    ]
    .map(String::from);
    let out = spawn(&args, Streams::ClosedStdout, dir);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "take --to: {err}");
    assert!(t.names(State::Incoming).is_empty(), "{err}");
    assert_eq!(next.count(State::Incoming).unwrap(), 3, "{err}");
}

/// `exec --dry-run | head` is a listing: a reader that stopped reading is not an error,
/// and nothing is claimed.
#[test]
fn exec_dry_run_with_a_closed_stdout_exits_0() {
    let t = TestQueue::new();
    for i in 0..3 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    let args = [
        "exec",
        t.root().to_str().unwrap(),
        "--dry-run",
        "--",
        "true",
    ]
    .map(String::from);
    let out = spawn(&args, Streams::ClosedStdout, t.dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    assert_eq!(t.names(State::Incoming).len(), 3, "nothing was claimed");
}
