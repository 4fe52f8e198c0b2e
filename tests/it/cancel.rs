//! `dirq cancel` and `admin::cancel_*`: stopping a running message through the Piper
//! that owns it, and only that one.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirq::admin::CancelTo;
use dirq::piper::{Cancellation, Failed, Outcome, Piper, Stage, StageResult, CANCELLED_REASON};
use dirq::{Message, State};

use crate::util::{assert_succeeded, dirq, names_in, run, wait_until, TestQueue};

const LONG: Duration = Duration::from_secs(60);

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A running `dirq exec`, killed with every command group it recorded when dropped
/// (a test that fails midway leaves no `sleep` behind).
struct Exec {
    child: Child,
    /// Where each command writes `<dirq exec pid> <its own pid, the group id>`.
    runs: PathBuf,
}

impl Exec {
    /// `dirq exec QUEUE -j JOBS [extra...] -- sh -c SCRIPT`, where the script first
    /// records its run in `runs/<id>.<attempt>`.
    fn start(queue: &Path, runs: &Path, jobs: &str, extra: &[&str], script: &str) -> Exec {
        std::fs::create_dir_all(runs).unwrap();
        let script = format!(
            r#"echo "$PPID $$" > {runs}/"$DIRQ_ID.$DIRQ_ATTEMPT"; {script}"#,
            runs = runs.display()
        );
        let child = dirq()
            .args(["exec", s(queue), "-j", jobs])
            .args(extra)
            .args(["--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Exec {
            child,
            runs: runs.to_path_buf(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The runs recorded by this exec's commands: (id, attempt, command group).
    fn runs(&self) -> Vec<(String, u32, u32)> {
        let mine = self.pid();
        names_in(&self.runs)
            .into_iter()
            .filter_map(|name| {
                let text = std::fs::read_to_string(self.runs.join(&name)).ok()?;
                let mut pids = text.split_whitespace().map(|p| p.parse::<u32>().ok());
                let (Some(Some(parent)), Some(Some(group))) = (pids.next(), pids.next()) else {
                    return None;
                };
                let (id, attempt) = name.rsplit_once('.')?;
                let attempt = attempt.parse().ok()?;
                (parent == mine).then(|| (id.to_owned(), attempt, group))
            })
            .collect()
    }

    fn group_of(&self, id: &str) -> u32 {
        self.runs()
            .into_iter()
            .find(|(run, _, _)| run == id)
            .map(|(_, _, group)| group)
            .unwrap_or_else(|| panic!("no run of {id}"))
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (_, _, group) in self.runs() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether any process is in process group `group` (zombies not counted: a killed
/// command waiting to be reaped has stopped).
fn group_alive(group: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces, so count from ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields.first() != Some(&"Z") && fields.get(2) == Some(&group.to_string().as_str())
    })
}

fn cancel(queue: &Path, id: &str, extra: &[&str]) -> Output {
    let mut args = vec!["cancel", s(queue), id];
    args.extend_from_slice(extra);
    run(&args)
}

/// `dirq cancel`, asserted to succeed; its standard output.
fn cancel_ok(queue: &Path, id: &str, extra: &[&str]) -> String {
    let out = cancel(queue, id, extra);
    assert_succeeded(&out, "dirq cancel");
    String::from_utf8(out.stdout).unwrap()
}

fn reason(t: &TestQueue, id: &str) -> Option<String> {
    let id = dirq::MessageId::new(id).unwrap();
    dirq::admin::failure(&t.queue, &id).unwrap()?.reason
}

#[test]
fn cancel_kills_only_that_command_and_fails_its_message_with_the_hook() {
    let t = TestQueue::new();
    for i in 0..3 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    let hook = t.dir.path().join("hook");
    let on_fail = format!(r#"echo "$DIRQ_ID|$DIRQ_REASON" >> {}"#, hook.display());
    // The command's own child shows that the whole group goes, not just the shell.
    let exec = Exec::start(
        t.root(),
        &t.dir.path().join("runs"),
        "3",
        &["--on-fail", &on_fail, "--kill-grace", "1s"],
        "sleep 60 & wait",
    );
    wait_until(LONG, "three commands running", || exec.runs().len() == 3);
    let runs = exec.runs();
    let (victim, _, group) = runs[1].clone();
    assert!(group_alive(group));

    assert_eq!(
        cancel_ok(t.root(), &victim, &[]),
        format!("{victim}: cancelled, now in errors/\n")
    );
    assert_eq!(reason(&t, &victim).as_deref(), Some(CANCELLED_REASON));
    wait_until(LONG, "the cancelled command's group to be gone", || {
        !group_alive(group)
    });
    // The other two run on, untouched.
    for (id, _, other) in runs.iter().filter(|(id, _, _)| *id != victim) {
        assert!(group_alive(*other), "{id}'s command was stopped too");
        assert!(
            t.path(State::Pending).join(id).exists(),
            "{id} left pending/"
        );
    }
    assert_eq!(t.queue.counts().unwrap().errors, 1);
    wait_until(LONG, "the on-fail hook", || hook.exists());
    assert_eq!(
        std::fs::read_to_string(&hook).unwrap(),
        format!("{victim}|{CANCELLED_REASON}\n")
    );
    // Answered and cleaned up: no request left behind.
    assert!(names_in(&t.root().join("pipers/cancel")).is_empty());
}

#[test]
fn requeue_puts_the_message_back_and_it_runs_again_with_its_attempt_counted() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"again").unwrap().to_string();
    // The first attempt hangs; the second succeeds.
    let exec = Exec::start(
        t.root(),
        &t.dir.path().join("runs"),
        "1",
        &[],
        r#"[ "$DIRQ_ATTEMPT" -gt 1 ] || sleep 60"#,
    );
    wait_until(LONG, "the first attempt running", || exec.runs().len() == 1);
    let group = exec.group_of(&id);
    assert_eq!(
        cancel_ok(t.root(), &id, &["--requeue"]),
        format!("{id}: cancelled, now in incoming/\n")
    );
    wait_until(LONG, "the first attempt's group to be gone", || {
        !group_alive(group)
    });
    // Back in incoming/, claimed again, and processed: attempt 2, no failure.
    wait_until(LONG, "the second attempt to commit it", || {
        t.queue.counts().unwrap().unfinished() == 0
    });
    let attempts: Vec<u32> = exec.runs().into_iter().map(|(_, a, _)| a).collect();
    assert_eq!(attempts, [1, 2]);
    assert_eq!(t.queue.counts().unwrap().errors, 0);
}

#[test]
fn with_two_execs_on_one_queue_only_the_owner_acts() {
    let t = TestQueue::new();
    for i in 0..4 {
        t.queue.enqueue(format!("m{i}")).unwrap();
    }
    let runs = t.dir.path().join("runs");
    let a = Exec::start(t.root(), &runs, "2", &[], "sleep 60");
    let b = Exec::start(t.root(), &runs, "2", &[], "sleep 60");
    wait_until(LONG, "four commands running, two per exec", || {
        a.runs().len() == 2 && b.runs().len() == 2
    });
    let victim = b.runs()[0].0.clone();
    cancel_ok(t.root(), &victim, &[]);
    assert_eq!(reason(&t, &victim).as_deref(), Some(CANCELLED_REASON));
    wait_until(LONG, "the cancelled command's group to be gone", || {
        !group_alive(b.group_of(&victim))
    });
    for (id, _, group) in a.runs().into_iter().chain(b.runs()) {
        if id != victim {
            assert!(group_alive(group), "{id}'s command was stopped too");
            assert!(
                t.path(State::Pending).join(&id).exists(),
                "{id} left pending/"
            );
        }
    }
    assert_eq!(t.queue.counts().unwrap().pending, 3);
}

/// Runs `dirq cancel` and checks the one-line refusal: exit 1, naming queue and id,
/// saying `why`.
fn assert_refused(t: &TestQueue, id: &str, why: &str) {
    let out = cancel(t.root(), id, &["--wait", "5s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "failed to cancel message {id} in {}: ",
            t.root().display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains(why), "{stderr}");
}

#[test]
fn refusals_name_the_queue_and_the_id_and_change_nothing() {
    let t = TestQueue::new();
    assert_refused(
        &t,
        "1763797920.123456789.host.1.00000000.msg",
        "there is no such message",
    );

    let waiting = t.queue.enqueue(b"waiting").unwrap().to_string();
    assert_refused(
        &t,
        &waiting,
        "it is waiting in incoming/, not running: use dirq delete or hold",
    );
    assert!(t.path(State::Incoming).join(&waiting).exists());

    // A message in pending/ that nobody holds: its owner died.
    let orphan = t.queue.enqueue(b"orphan").unwrap().to_string();
    std::fs::rename(
        t.path(State::Incoming).join(&orphan),
        t.path(State::Pending).join(&orphan),
    )
    .unwrap();
    assert_refused(
        &t,
        &orphan,
        "nobody owns it (its owner died): dirq recover requeues it",
    );
    assert!(t.path(State::Pending).join(&orphan).exists());

    // Claimed through the library by this process, which runs no Piper.
    std::fs::rename(
        t.path(State::Pending).join(&orphan),
        t.path(State::Incoming).join(&orphan),
    )
    .unwrap();
    let mut held = Vec::new();
    while let Some(message) = t.queue.try_claim().unwrap() {
        held.push(message);
    }
    assert_eq!(held.len(), 2);
    assert_refused(
        &t,
        &waiting,
        &format!(
            "it is claimed by process {}, which is not a Piper",
            std::process::id()
        ),
    );
    assert!(t.path(State::Pending).join(&waiting).exists());
    assert!(!t.root().join("pipers/cancel").join(&waiting).exists());
    for message in held {
        message.release().unwrap();
    }
}

/// Works until cancelled (or a minute), then returns Commit, which must not be
/// carried out; records what on_failed is told.
#[derive(Clone)]
struct Polling {
    started: Arc<AtomicUsize>,
    told: Arc<Mutex<Vec<Failed>>>,
    saw_cancel: Arc<AtomicBool>,
}

impl Stage for Polling {
    fn process(&mut self, message: &Message) -> StageResult {
        self.process_cancellable(message, &Cancellation::default())
    }

    fn process_cancellable(&mut self, _: &Message, cancel: &Cancellation) -> StageResult {
        self.started.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + LONG;
        while !cancel.is_cancelled() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.saw_cancel
            .store(cancel.is_cancelled(), Ordering::SeqCst);
        Ok(Outcome::Commit)
    }

    fn on_failed(&mut self, failed: &Failed) {
        self.told.lock().unwrap().push(failed.clone());
    }
}

#[test]
fn a_library_stage_polling_its_cancellation_stops_and_its_commit_is_not_carried_out() {
    let t = TestQueue::new();
    let first = t.queue.enqueue(b"first").unwrap();
    let second = t.queue.enqueue(b"second").unwrap();
    let stage = Polling {
        started: Arc::default(),
        told: Arc::default(),
        saw_cancel: Arc::default(),
    };
    let piper = Piper::builder("polling")
        .input(&t.queue)
        .workers(2)
        .stage(stage.clone())
        .build()
        .unwrap();
    let handle = piper.handle();
    let runner = std::thread::spawn(move || piper.run());
    wait_until(LONG, "both messages in the stage", || {
        stage.started.load(Ordering::SeqCst) == 2
    });
    // The Piper runs in this process: the owner found by lock is this pid, and the
    // advert is this Piper's.
    let went = dirq::admin::cancel_timeout(&t.queue, &first, CancelTo::Errors, LONG).unwrap();
    assert_eq!(went, State::Errors);
    assert!(stage.saw_cancel.load(Ordering::SeqCst));
    let failure = dirq::admin::failure(&t.queue, &first).unwrap().unwrap();
    assert_eq!(failure.reason.as_deref(), Some(CANCELLED_REASON));
    let told = stage.told.lock().unwrap().clone();
    assert_eq!(told.len(), 1);
    assert_eq!(
        (&told[0].id, told[0].reason.as_str()),
        (&first, CANCELLED_REASON)
    );
    // The other message is still being processed.
    assert!(t.path(State::Pending).join(second.as_os_str()).exists());
    assert_eq!(handle.stats().cancelled, 1);

    let went = dirq::admin::cancel_timeout(&t.queue, &second, CancelTo::Incoming, LONG).unwrap();
    assert_eq!(went, State::Incoming);
    // Processed again (and cancelled again, to end the test).
    wait_until(LONG, "the requeued message in the stage again", || {
        stage.started.load(Ordering::SeqCst) == 3
    });
    dirq::admin::cancel_timeout(&t.queue, &second, CancelTo::Errors, LONG).unwrap();
    handle.shutdown();
    let stats = runner.join().unwrap().unwrap();
    assert_eq!(
        (stats.cancelled, stats.failed, stats.committed),
        (3, 2, 0),
        "{stats:?}"
    );
    assert_eq!(t.queue.counts().unwrap().errors, 2);
}

/// Sees its cancellation but goes on until released; then returns Commit.
#[derive(Clone)]
struct Deaf {
    running: Arc<AtomicBool>,
    saw_cancel: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

impl Stage for Deaf {
    fn process(&mut self, message: &Message) -> StageResult {
        self.process_cancellable(message, &Cancellation::default())
    }

    fn process_cancellable(&mut self, _: &Message, cancel: &Cancellation) -> StageResult {
        self.running.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + LONG;
        while !self.release.load(Ordering::SeqCst) && Instant::now() < deadline {
            if cancel.is_cancelled() {
                self.saw_cancel.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Outcome::Commit)
    }
}

#[test]
fn without_an_answer_in_time_the_request_is_withdrawn_and_a_begun_cancel_still_wins() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"deaf").unwrap();
    let stage = Deaf {
        running: Arc::default(),
        saw_cancel: Arc::default(),
        release: Arc::default(),
    };
    let piper = Piper::builder("deaf")
        .input(&t.queue)
        .stage(stage.clone())
        .build()
        .unwrap();
    let handle = piper.handle();
    let runner = std::thread::spawn(move || piper.run());
    wait_until(LONG, "the stage running", || {
        stage.running.load(Ordering::SeqCst)
    });
    let refused =
        dirq::admin::cancel_timeout(&t.queue, &id, CancelTo::Errors, Duration::from_secs(3))
            .unwrap_err();
    assert!(
        refused.to_string().contains("no answer from the Piper"),
        "{refused}"
    );
    assert!(!t.root().join("pipers/cancel").join(id.as_os_str()).exists());
    // The supervisor had marked the job (it scans every 200 ms), so the cancel is
    // under way: when the stage returns Commit, the cancel wins.
    assert!(stage.saw_cancel.load(Ordering::SeqCst));
    stage.release.store(true, Ordering::SeqCst);
    wait_until(LONG, "the message to leave pending/", || {
        t.queue.counts().unwrap().pending == 0
    });
    assert_eq!(
        dirq::admin::failure(&t.queue, &id)
            .unwrap()
            .unwrap()
            .reason
            .as_deref(),
        Some(CANCELLED_REASON)
    );
    handle.shutdown();
    let stats = runner.join().unwrap().unwrap();
    assert_eq!((stats.cancelled, stats.committed), (1, 0));
}

#[test]
fn recover_removes_a_request_whose_owner_is_gone() {
    let t = TestQueue::new();
    // A pid no process has now: a child that exited and was reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let cancels = t.root().join("pipers/cancel");
    std::fs::create_dir_all(&cancels).unwrap();
    let request = cancels.join("1763797920.123456789.host.1.00000000.msg");
    std::fs::write(
        &request,
        format!(r#"{{"requeue": false, "by": {dead}, "owner": {dead}, "requested_ms": 1}}"#),
    )
    .unwrap();
    let out = crate::util::run_ok(&["recover", s(t.root())]);
    assert!(out.contains("removed 1 stale cancel requests"), "{out}");
    assert!(!request.exists());
}

#[test]
fn with_two_pipers_in_one_process_the_one_processing_the_message_answers() {
    let t = TestQueue::new();
    let ids: Vec<_> = (0..2)
        .map(|i| t.queue.enqueue(format!("m{i}")).unwrap())
        .collect();
    let stage = Polling {
        started: Arc::default(),
        told: Arc::default(),
        saw_cancel: Arc::default(),
    };
    // Both name this process in the lock table; each message is in one of them.
    let pipers: Vec<_> = ["one", "two"]
        .into_iter()
        .map(|name| {
            Piper::builder(name)
                .input(&t.queue)
                .stage(stage.clone())
                .build()
                .unwrap()
        })
        .collect();
    let handles: Vec<_> = pipers.iter().map(Piper::handle).collect();
    let runners: Vec<_> = pipers
        .into_iter()
        .map(|piper| std::thread::spawn(move || piper.run()))
        .collect();
    wait_until(LONG, "both messages in a stage", || {
        stage.started.load(Ordering::SeqCst) == 2
    });
    for id in &ids {
        let went = dirq::admin::cancel_timeout(&t.queue, id, CancelTo::Errors, LONG).unwrap();
        assert_eq!(went, State::Errors, "{id}");
    }
    for handle in &handles {
        handle.shutdown();
    }
    let cancelled: u64 = runners
        .into_iter()
        .map(|r| r.join().unwrap().unwrap().cancelled)
        .sum();
    assert_eq!(cancelled, 2);
    assert_eq!(t.queue.counts().unwrap().errors, 2);
}
