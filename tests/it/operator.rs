//! The operator's commands on fixture queues: status, ls, ages, requeue, hold,
//! release, delete, purge, check, metrics, completions.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use dirq::{DirectoryQueue, State};

use crate::util::{dirq, fixture, names_in, run, run_ok, wait_until};

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn status_reports_counts_bytes_and_age_of_a_fixture_queue() {
    let (_dir, q) = fixture("healthy");
    let status = &json_lines(&run_ok(&["status", "--json", s(&q)]))[0];
    assert_eq!(
        (
            status["incoming"].as_u64(),
            status["deferred"].as_u64(),
            status["hold"].as_u64(),
            status["errors"].as_u64()
        ),
        (Some(3), Some(1), Some(1), Some(1))
    );
    assert_eq!(status["bytes"]["incoming"], 8 + 8 + 18);
    // The oldest message was made in November 2023.
    assert!(status["oldest_age_s"].as_f64().unwrap() > 3e7);
    let human = run_ok(&["status", s(&q)]);
    // Waiting bytes: incoming, deferred and held.
    assert!(human.contains("BYTES") && human.contains("50 B"), "{human}");
}

#[test]
fn status_watch_refreshes_until_stopped() {
    let (_dir, q) = fixture("healthy");
    let mut child = dirq()
        .args(["status", "--watch", "0.1", s(&q)])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Read on a thread of its own: a blocking read would let a silent child outlast
    // any deadline.
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    while seen.matches("dirq status").count() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no three refreshes within 30 s: {seen}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(seen.contains("INCOMING"), "{seen}");
}

#[test]
fn ls_shows_attempts_due_times_holds_owners_and_reasons() {
    let (_dir, q) = fixture("healthy");
    let queue = DirectoryQueue::open(&q).unwrap();
    let claimed = queue.try_claim().unwrap().unwrap();
    let lines = json_lines(&run_ok(&["ls", "--json", s(&q)]));
    let by_state = |state: &str| {
        lines
            .iter()
            .filter(|l| l["state"] == state)
            .collect::<Vec<_>>()
    };
    assert_eq!(by_state("incoming").len(), 2);
    let pending = by_state("pending");
    assert_eq!(
        pending[0]["owner_pid"],
        std::process::id(),
        "the owner of a claimed message"
    );
    assert_eq!(pending[0]["attempts"], 1);
    assert_eq!(by_state("deferred")[0]["not_before"], 4_102_444_800.0);
    assert_eq!(by_state("hold")[0]["held"], true);
    let errors = by_state("errors");
    assert_eq!(
        (
            errors[0]["reason"].as_str(),
            errors[0]["exit_code"].as_i64()
        ),
        (Some("exit 3"), Some(3))
    );
    let human = run_ok(&["ls", s(&q)]);
    assert!(
        human.contains(&format!("owner: pid {}", std::process::id())),
        "{human}"
    );
    assert!(human.contains("due in"), "{human}");
    assert!(human.contains("reason: exit 3"), "{human}");
    drop(claimed); // the claim dies: ls says nobody owns it
    let human = run_ok(&["ls", "--state", "pending", s(&q)]);
    assert!(human.contains("owner: none"), "{human}");
}

#[test]
fn ages_counts_messages_per_state_and_age_bucket() {
    let (_dir, q) = fixture("healthy");
    let queue = DirectoryQueue::open(&q).unwrap();
    queue.enqueue(b"brand new").unwrap();
    let text = run_ok(&["ages", s(&q)]);
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    );
    let row = |state: &str| -> Vec<u64> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(state))
            .unwrap();
        line.split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect()
    };
    // Three old messages (1280+ minutes) and the new one (under 5 minutes).
    assert_eq!(row("incoming"), [4, 1, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
    assert_eq!(row("errors")[0], 1);
    assert_eq!(row("pending")[0], 0);
}

#[test]
fn requeue_moves_failures_back_and_resets_attempts_unless_kept() {
    let (_dir, q) = fixture("healthy");
    let queue = DirectoryQueue::open(&q).unwrap();
    // A second failure, claimed twice.
    while let Some(m) = queue.try_claim().unwrap() {
        m.commit().unwrap();
    }
    let id = queue.enqueue(b"again").unwrap();
    queue.try_claim().unwrap().unwrap().release().unwrap();
    queue.try_claim().unwrap().unwrap().fail("flaky").unwrap();
    // --older-than: only failures older than an hour; ours are fresh.
    let out = run_ok(&["requeue", s(&q), "--all", "--older-than", "1h"]);
    assert!(out.contains("requeued 0 of 0"), "{out}");
    let out = run_ok(&["requeue", s(&q), &id.to_string(), "--keep-attempts"]);
    assert!(out.contains("requeued 1 of 1"), "{out}");
    assert_eq!(
        dirq::admin::list(&queue, State::Incoming).unwrap()[0].attempts,
        Some(2),
        "attempts kept"
    );
    let out = run_ok(&["requeue", s(&q), "--all"]);
    assert!(out.contains("requeued 1 of 1"), "{out}");
    assert_eq!(
        names_in(&q.join("errors")),
        Vec::<String>::new(),
        "sidecars removed too"
    );
    let requeued = dirq::admin::info(
        &queue,
        State::Incoming,
        &"1700000000.000000005.fixture.100.0000abcd.msg"
            .parse()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(requeued.attempts, Some(0), "attempts start over");
    // Asking for an id that is not in errors/ fails, and says which.
    let out = run(&["requeue", s(&q), "no-such-id.msg"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-id.msg"));
}

#[test]
fn hold_release_and_delete_take_ids_all_or_stdin() {
    let (_dir, q) = fixture("healthy");
    let out = run_ok(&["hold", s(&q), "--all"]);
    assert!(out.contains("held 4 of 4"), "{out}"); // 3 incoming + 1 deferred
    assert_eq!(names_in(&q.join("hold")).len(), 5);
    let out = run_ok(&[
        "release",
        s(&q),
        "1700000000.000000001.fixture.100.0000abcd.msg",
    ]);
    assert!(out.contains("unheld 1 of 1"), "{out}");
    let out = crate::util::run_with_input(
        &["unhold", s(&q), "-"],
        b"1700000000.000000002.fixture.100.0000abcd.msg\n1700000000.000000004.fixture.100.0000abcd.msg\n",
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("unheld 2 of 2"));
    assert_eq!(names_in(&q.join("incoming")).len(), 3);
    let out = run_ok(&["delete", s(&q), "--all"]);
    assert!(out.contains("deleted 6 of 6"), "{out}"); // 3 incoming, 2 held, 1 failed
    let queue = DirectoryQueue::open(&q).unwrap();
    assert_eq!(queue.counts().unwrap(), dirq::queue::Counts::default());
}

#[test]
fn purge_removes_abandoned_tmp_files_and_old_failures() {
    let (_dir, q) = fixture("healthy");
    let old = std::fs::File::create(q.join("tmp/abandoned")).unwrap();
    old.set_modified(SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    drop(old);
    std::fs::write(q.join("tmp/fresh"), b"being written").unwrap();
    let out = run_ok(&["purge", s(&q)]);
    assert!(
        out.contains("removed 1 abandoned file(s) from tmp/ and 0 failed"),
        "{out}"
    );
    assert_eq!(names_in(&q.join("tmp")), ["fresh"]);
    let out = run_ok(&["purge", s(&q), "--errors-older-than", "0s"]);
    assert!(out.contains("and 1 failed message(s)"), "{out}");
    assert!(
        names_in(&q.join("errors")).is_empty(),
        "the sidecar went too"
    );
}

#[test]
fn check_finds_every_planted_problem_and_repair_fixes_them() {
    let (dir, q) = fixture("corrupt");
    // What git cannot store.
    let status = std::process::Command::new("mkfifo")
        .arg(q.join("incoming/fifo.msg"))
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::create_dir(q.join("hold/a-directory")).unwrap();
    let outside = dir.path().join("outside-file");
    std::fs::write(&outside, b"not the queue's").unwrap();
    std::fs::hard_link(
        &outside,
        q.join("incoming/1700000000.000000010.fixture.100.0000abcd.msg"),
    )
    .unwrap();
    std::fs::write(
        q.join("incoming/1700000000.000000011.fixture.100.0000abcd.msg"),
        b"{\"n\": 11}",
    )
    .unwrap();
    std::fs::hard_link(
        q.join("incoming/1700000000.000000011.fixture.100.0000abcd.msg"),
        q.join("pending/1700000000.000000011.fixture.100.0000abcd.msg"),
    )
    .unwrap();
    std::fs::set_permissions(q.join("errors"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(
        q.join("errors/1700000000.000000006.fixture.100.0000abcd.msg"),
        std::fs::Permissions::from_mode(0o200),
    )
    .unwrap();
    let old = SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(q.join("tmp/1700000000.000000007.fixture.100.0000abcd.msg"))
        .unwrap()
        .set_modified(old)
        .unwrap();

    let out = run(&["check", s(&q)]);
    let report = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{report}");
    for expected in [
        "NOTES.txt: unknown entry",
        "incoming/1700000000.000000002.fixture.100.0000abcd.msg: empty message",
        "incoming/1700000000.000000003.fixture.100.0000abcd.msg: not a regular file (a symbolic link)",
        "incoming/fifo.msg: not a regular file (a FIFO)",
        "hold/a-directory: not a regular file (a directory)",
        "deferred/not-a-deferred-name.msg: deferred name without a due time",
        "errors/1700000000.000000005.fixture.100.0000abcd.msg.meta: sidecar without a message",
        "tmp/1700000000.000000007.fixture.100.0000abcd.msg: abandoned temporary file",
        "pending/1700000000.000000008.fixture.100.0000abcd.msg: orphaned pending message",
        "1700000000.000000009.fixture.100.0000abcd.msg: duplicate id",
        "incoming/1700000000.000000010.fixture.100.0000abcd.msg: hard-linked file (2 links)",
        "incoming/1700000000.000000011.fixture.100.0000abcd.msg: message under two names",
        "errors: wrong permissions",
        "errors/1700000000.000000006.fixture.100.0000abcd.msg: wrong permissions",
    ] {
        assert!(report.contains(expected), "check did not report {expected:?}:\n{report}");
    }

    let out = run(&["check", "--repair", s(&q)]);
    let repaired = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "problems were found: {repaired}"
    );
    assert!(repaired.contains("repaired 15"), "{repaired}");
    let out = run(&["check", s(&q)]);
    let again = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "a second check is clean:\n{again}"
    );
    assert!(again.contains("healthy"), "{again}");
    // Nothing was lost: the good message is still waiting, the orphan is back, the
    // outside file is untouched.
    let incoming = names_in(&q.join("incoming"));
    assert!(
        incoming.contains(&"1700000000.000000001.fixture.100.0000abcd.msg".to_owned()),
        "{incoming:?}"
    );
    assert!(
        incoming.contains(&"1700000000.000000008.fixture.100.0000abcd.msg".to_owned()),
        "{incoming:?}"
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"not the queue's");
    assert_eq!(
        std::fs::read_link(q.join("errors/1700000000.000000003.fixture.100.0000abcd.msg")).unwrap(),
        Path::new("../../outside-secret")
    );
}

#[test]
fn a_healthy_fixture_checks_clean() {
    let (_dir, q) = fixture("healthy");
    let out = run(&["check", s(&q)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn metrics_parse_as_prometheus_text() {
    let (_dir, q) = fixture("healthy");
    // A live Piper advertises under the queue too.
    let queue = DirectoryQueue::open(&q).unwrap();
    let piper = dirq::piper::Piper::builder("metered")
        .input(&queue)
        .stage(|_: &dirq::Message| -> dirq::piper::StageResult { Ok(dirq::piper::Outcome::Commit) })
        .build()
        .unwrap();
    let handle = piper.handle();
    let runner = std::thread::spawn(move || piper.run());
    wait_until(
        Duration::from_secs(30),
        "the Piper to advertise itself",
        || !dirq::admin::pipers(&queue).unwrap().is_empty(),
    );
    let text = run_ok(&["metrics", s(&q)]);
    handle.shutdown();
    runner.join().unwrap().unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let value = |name: &str, state: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("state") == Some(state))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(value("dirq_messages", "hold"), Some(1.0));
    assert_eq!(value("dirq_bytes", "errors"), Some(15.0));
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "dirq_piper_up" && s.labels.get("stage") == Some("metered")));
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "dirq_piper_messages_total"));
    assert!(scrape.docs.contains_key("dirq_oldest_age_seconds"));
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run_ok(&["completions", shell]);
        assert!(out.contains("dirq") && out.contains("requeue"), "{shell}");
    }
}

#[test]
fn long_operations_draw_no_progress_bar_off_a_terminal() {
    let (_dir, q) = fixture("healthy");
    let queue = DirectoryQueue::builder(&q)
        .durability(dirq::Durability::None)
        .open()
        .unwrap();
    let payloads: Vec<String> = (0..1500).map(|i| format!("{i}")).collect();
    queue.enqueue_batch(&payloads).unwrap();
    let out = run(&["--durability", "none", "delete", s(&q), "--all"]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 1506 of 1506"));
}
