//! The operator's commands run as a new operator would: by mistake as well as on
//! purpose. Each test is named after the defect of issue 13 it guards against.

use std::process::Output;

use dirq::State;

use crate::util::{run, run_ok, TestQueue};

fn s(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `out` is a failure (exit 1) whose standard error contains each of `words`.
fn assert_fails_saying(out: &Output, words: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {err}");
    for word in words {
        assert!(err.contains(word), "stderr should contain {word:?}: {err}");
    }
}

/// `take --to` and `exec --to` the queue they read from would hand the same message
/// back for ever: refused, by identity (`q/.` and a symlink are the same queue).
#[test]
fn forwarding_into_its_own_queue_is_refused() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"once").unwrap().to_string();
    let q = s(t.root());
    let link = t.dir.path().join("link");
    std::os::unix::fs::symlink(t.root(), &link).unwrap();
    let dotted = format!("{q}/.");
    for to in [q, dotted.as_str(), s(&link)] {
        let take = run(&["take", q, "--to", to, "-n", "5"]);
        assert_fails_saying(&take, &["failed to take from", "same queue"]);
        assert!(take.stdout.is_empty(), "no id was printed for --to {to}");
        let exec = run(&["exec", q, "--to", to, "--drain", "--", "cat"]);
        assert_fails_saying(&exec, &["failed to start exec on", "same queue"]);
        assert_eq!(t.names(State::Incoming), [id.as_str()], "--to {to}");
    }
    // Another queue is still fine.
    let next = t.dir.path().join("next");
    assert_eq!(run_ok(&["take", q, "--to", s(&next)]).trim(), id);
}

#[test]
fn selection_usage_shows_the_queue_before_the_ids() {
    let t = TestQueue::new();
    let q = s(t.root());
    for command in ["hold", "unhold", "flush", "delete", "requeue", "release"] {
        let help = run_ok(&[command, "--help"]);
        let usage = help
            .lines()
            .find(|l| l.starts_with("Usage:"))
            .unwrap_or_else(|| panic!("{command} --help has a usage line: {help}"));
        let (queue, id) = (usage.find("<QUEUE>"), usage.find("<ID>"));
        assert!(
            queue.is_some() && queue < id,
            "{command}: <QUEUE> comes before <ID>: {usage}"
        );
        assert!(
            help.contains("<QUEUE> --all"),
            "{command} shows --all: {help}"
        );
    }
    // Following the usage works: the queue first, then the id.
    let id = t.queue.enqueue(b"x").unwrap().to_string();
    assert!(run_ok(&["hold", q, &id]).contains("held 1 of 1"));
    assert!(run_ok(&["unhold", q, &id]).contains("unheld 1 of 1"));
    t.queue
        .try_claim()
        .unwrap()
        .unwrap()
        .fail("for requeue")
        .unwrap();
    assert!(run_ok(&["requeue", q, &id]).contains("requeued 1 of 1"));
    assert!(run_ok(&["delete", q, &id]).contains("deleted 1 of 1"));
}

#[test]
fn help_texts_have_no_escaped_quotes() {
    // A doc comment is not a string literal: `\"` in one came out as a backslash.
    for command in [
        "push", "take", "status", "ls", "ages", "cat", "requeue", "hold", "unhold", "delete",
        "purge", "check", "recover", "init", "metrics",
    ] {
        let help = run_ok(&[command, "--help"]);
        assert!(!help.contains("\\\""), "{command} --help: {help}");
    }
    assert!(run_ok(&["push", "--help"]).contains("or for \"-\""));
}

#[test]
fn errors_name_the_operation_and_the_path_given() {
    let t = TestQueue::new();
    let q = s(t.root());
    let nope = format!("{q}/nope");
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["delete", q, "nope"],
            &["failed to delete", &nope, "no message with this id"],
        ),
        (
            &["hold", q, "nope"],
            &["failed to hold", "nope", "no message with this id"],
        ),
        (
            &["unhold", q, "nope"],
            &["failed to unhold", "hold/nope", "no held message"],
        ),
        (
            &["requeue", q, "garbage"],
            &[
                "failed to requeue",
                "errors/garbage",
                "no failed message with this id",
            ],
        ),
    ];
    for (args, words) in cases {
        let out = run(args);
        assert_fails_saying(&out, words);
        let err = stderr(&out);
        for wrong in [
            "failed to commit",
            "failed to release",
            "\n  caused by: No such file",
        ] {
            assert!(!err.contains(wrong), "{args:?} says {wrong:?}: {err}");
        }
    }

    // A directory given to push: the error names it, not the queue's tmp/ file, and
    // nothing is left behind.
    let dir = t.dir.path().join("some-directory");
    std::fs::create_dir(&dir).unwrap();
    let given = format!("{}/", s(&dir));
    let out = run(&["push", q, &given]);
    assert_fails_saying(&out, &["failed to read input file", &given]);
    let tmp = format!("{q}/tmp/");
    assert!(!stderr(&out).contains(&tmp), "{}", stderr(&out));
    assert!(t.names(State::Tmp).is_empty());
    assert!(t.names(State::Incoming).is_empty());
}

fn mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn quarantined_fifo_is_not_requeued_and_quarantined_directory_is_deleted() {
    let t = TestQueue::new();
    let q = s(t.root());
    // Planted entries, quarantined into errors/ (with sidecars) by check --repair.
    mkfifo(&t.path(State::Incoming).join("fifo"));
    let planted = t.path(State::Incoming).join("tree");
    std::fs::create_dir_all(planted.join("sub/deeper")).unwrap();
    std::fs::write(planted.join("sub/deeper/file"), b"x").unwrap();
    let outside = t.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"keep").unwrap();
    std::os::unix::fs::symlink(&outside, planted.join("sub/link")).unwrap();
    let _ = run(&["check", "--repair", q]);
    let errors = t.names(State::Errors);
    for name in ["fifo", "fifo.meta", "tree", "tree.meta"] {
        assert!(
            errors.iter().any(|n| n == name),
            "{name} in errors/: {errors:?}"
        );
    }

    // requeue refuses the FIFO, which stays in errors/.
    let out = run(&["requeue", q, "fifo"]);
    assert_fails_saying(
        &out,
        &[
            "failed to requeue",
            "errors/fifo",
            "FIFO",
            "not a message file",
        ],
    );
    assert!(
        t.names(State::Incoming).is_empty(),
        "nothing went to incoming/"
    );
    assert!(t.path(State::Errors).join("fifo").exists());
    // requeue --all skips nothing silently: it reports both and moves neither.
    let out = run(&["requeue", q, "--all"]);
    assert_fails_saying(&out, &["2 message(s) could not be requeued"]);
    assert!(t.names(State::Incoming).is_empty());

    // delete removes the quarantined directory with what is in it, not what its
    // symlink points to, and the FIFO.
    assert!(run_ok(&["delete", q, "tree", "fifo"]).contains("deleted 2 of 2"));
    assert!(
        t.names(State::Errors).is_empty(),
        "{:?}",
        t.names(State::Errors)
    );
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");

    // A directory in errors/ that dirq did not quarantine (no sidecar) is refused.
    std::fs::create_dir(t.path(State::Errors).join("by-hand")).unwrap();
    let out = run(&["delete", q, "by-hand"]);
    assert_fails_saying(
        &out,
        &["failed to delete", "errors/by-hand", "did not quarantine"],
    );
    assert!(t.path(State::Errors).join("by-hand").is_dir());
}

#[test]
fn hold_on_a_mentat_queue_says_that_init_adds_hold() {
    let dir = crate::util::tempdir();
    let q = dir.path().join("mentat");
    for state in ["tmp", "incoming", "pending", "errors"] {
        std::fs::create_dir_all(q.join(state)).unwrap();
    }
    std::fs::write(q.join("incoming/a"), b"x").unwrap();
    let init = format!("dirq init {}", s(&q));
    for args in [
        ["hold", s(&q), "a"],
        ["hold", s(&q), "--all"],
        ["unhold", s(&q), "--all"],
    ] {
        let out = run(&args);
        assert_fails_saying(&out, &["hold/ is missing", &init]);
    }
    assert_eq!(crate::util::names_in(&q.join("incoming")), ["a"]);
    // Following the advice works.
    run_ok(&["init", s(&q)]);
    assert!(run_ok(&["hold", s(&q), "a"]).contains("held 1 of 1"));
}

#[test]
fn status_watch_refuses_a_zero_or_tiny_interval() {
    let t = TestQueue::new();
    let q = s(t.root());
    for every in ["0", "0s", "0.01", "50ms"] {
        // Refused at once: the command never starts redrawing (`run` waits for the exit).
        let out = run(&["status", "--watch", every, q]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "--watch {every}: {err}");
        assert!(
            err.contains("--watch") && err.contains("at least 100ms"),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "--watch {every} drew nothing");
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `ls --json` lines of one state, as JSON values.
fn ls_json(q: &str, state: &str) -> Vec<serde_json::Value> {
    run_ok(&["ls", q, "--state", state, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn push_at_and_delay_defer_delivery() {
    let t = TestQueue::new();
    let q = s(t.root());
    let before = unix_now();
    let later = crate::util::run_with_input(&["push", q, "--delay", "10m"], b"later");
    assert!(later.status.success(), "{}", stderr(&later));
    let at = before + 3600;
    let at_arg = format!("@{at}");
    let file = t.dir.path().join("at.txt");
    std::fs::write(&file, b"at").unwrap();
    let at_id = run_ok(&["push", q, "--at", &at_arg, s(&file)]);
    let rfc = run_ok(&["push", q, "--at", "2200-01-01T00:00:00Z", s(&file)]);
    // A time already past delivers at once.
    let past = run_ok(&["push", q, "--at", "2000-01-01T00:00:00+02:00", s(&file)]);

    assert_eq!(t.names(State::Incoming), [past.trim()]);
    let deferred = ls_json(q, "deferred");
    assert_eq!(deferred.len(), 3, "{deferred:?}");
    let due = |id: &str| {
        deferred
            .iter()
            .find(|m| m["id"] == id.trim())
            .and_then(|m| m["not_before"].as_f64())
            .unwrap_or_else(|| panic!("{id} deferred with not_before: {deferred:?}"))
    };
    let delayed = deferred
        .iter()
        .find(|m| m["id"] != at_id.trim() && m["id"] != rfc.trim())
        .and_then(|m| m["not_before"].as_f64())
        .unwrap();
    assert!(
        (before + 600) as f64 <= delayed + 1.0 && delayed <= (unix_now() + 601) as f64,
        "--delay 10m is due in ten minutes: {delayed}"
    );
    assert!((due(&at_id) - at as f64).abs() < 1.0, "--at @{at}");
    assert!((due(&rfc) - 7_258_118_400.0).abs() < 1.0, "--at 2200-01-01");
    // Not due: a consumer sees only the past one.
    assert_eq!(run_ok(&["take", q, "-n", "10"]), "at\n");

    // Bad times and both flags are usage errors; nothing is enqueued.
    for args in [
        &["push", q, "--at", "tomorrow", s(&file)][..],
        &["push", q, "--at", "2030-01-01T00:00:00", s(&file)],
        &["push", q, "--at", "@1", "--delay", "1m", s(&file)],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(t.queue.counts().unwrap().deferred, 3);
    assert_eq!(t.queue.counts().unwrap().incoming, 0);
}

#[test]
fn flush_delivers_deferred_messages_now() {
    let t = TestQueue::new();
    let q = s(t.root());
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let ids: Vec<String> = (0..3)
        .map(|i| {
            t.queue
                .enqueue_at(format!("{i}"), later)
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(run_ok(&["take", q]), "", "nothing is due");

    assert!(run_ok(&["flush", q, &ids[1]]).contains("flushed 1 of 1"));
    assert_eq!(t.names(State::Incoming), [ids[1].as_str()]);
    // An id that is not deferred (any more) names the operation and the path.
    let out = run(&["flush", q, &ids[1]]);
    assert_fails_saying(
        &out,
        &[
            "failed to deliver deferred",
            "deferred/",
            "no deferred message",
        ],
    );

    assert!(run_ok(&["flush", q, "--all"]).contains("flushed 2 message(s)"));
    assert_eq!(t.queue.counts().unwrap().deferred, 0);
    assert_eq!(run_ok(&["take", q, "-n", "10"]).lines().count(), 3);
}
