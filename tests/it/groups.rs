//! Groups of messages: a member that fails cancels the members still waiting;
//! ordered groups (chains) run one member at a time, in order; recovery completes
//! what a crash interrupted; `dirq push --group` and `dirq requeue --group`.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirq::queue::{Group, RetryPolicy};
use dirq::{DirectoryQueue, MessageId, State};

use crate::util::{dirq, run_ok, signal, wait_until, TestQueue};

const LONG: Duration = Duration::from_secs(60);

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ids(queue: &DirectoryQueue, state: State) -> Vec<MessageId> {
    let mut ids: Vec<MessageId> = queue.ids(state).unwrap().map(Result::unwrap).collect();
    ids.sort();
    ids
}

fn reason(queue: &DirectoryQueue, id: &MessageId) -> String {
    dirq::admin::failure(queue, id)
        .unwrap()
        .and_then(|f| f.reason)
        .unwrap_or_default()
}

fn members(queue: &DirectoryQueue, group: &Group, n: usize) -> Vec<MessageId> {
    (0..n)
        .map(|i| {
            queue
                .enqueue_in_group(group, format!("member {i}").as_bytes())
                .unwrap()
        })
        .collect()
}

/// One member fails: every member still waiting (incoming, deferred, held) goes to
/// errors/ with a reason naming the failed one; a member being processed is left to
/// its worker; a message outside the group is untouched. requeue_group brings all
/// back.
#[test]
fn a_failed_member_cancels_the_waiting_members() {
    let t = TestQueue::new();
    let outsider = t.queue.enqueue(b"not in the group").unwrap();
    let group = Group::new("batch-1").unwrap();
    let all = members(&t.queue, &group, 5);
    // Member 1 is being processed, 2 is deferred (a retry), 3 is held.
    let skip_outsider = |q: &DirectoryQueue| loop {
        let m = q.try_claim().unwrap().unwrap();
        if m.id() != &outsider {
            return m;
        }
        m.release().unwrap();
    };
    let failing = skip_outsider(&t.queue);
    assert_eq!(failing.id(), &all[0]);
    let busy = skip_outsider(&t.queue);
    assert_eq!(busy.id(), &all[1]);
    let deferred = skip_outsider(&t.queue);
    deferred
        .retry_at(
            "later",
            std::time::SystemTime::now() + Duration::from_secs(3600),
        )
        .unwrap();
    dirq::admin::hold(&t.queue, &all[3]).unwrap();

    failing.fail("exit 3").unwrap();
    let want = format!("cancelled: {} failed: exit 3", all[0]);
    for id in [&all[2], &all[3], &all[4]] {
        assert_eq!(reason(&t.queue, id), want, "{id}");
    }
    assert_eq!(reason(&t.queue, &all[0]), "exit 3");
    assert_eq!(ids(&t.queue, State::Errors).len(), 4);
    assert_eq!(
        ids(&t.queue, State::Incoming),
        std::slice::from_ref(&outsider)
    );
    // The member in a worker's hands finishes as its worker says.
    busy.commit().unwrap();

    assert_eq!(
        dirq::admin::requeue_group(&t.queue, &group, false).unwrap(),
        4
    );
    let mut back = ids(&t.queue, State::Incoming);
    back.retain(|id| id != &outsider);
    assert_eq!(
        back,
        [
            all[0].clone(),
            all[2].clone(),
            all[3].clone(),
            all[4].clone()
        ]
    );
    assert!(ids(&t.queue, State::Errors).is_empty());
}

/// A dead letter (the last retry) fails the member too, and cancels the group.
#[test]
fn a_dead_letter_cancels_the_group() {
    let dir = crate::util::tempdir();
    let queue = DirectoryQueue::builder(dir.path().join("q"))
        .retry_policy(RetryPolicy::builder().max_attempts(1).build().unwrap())
        .open()
        .unwrap();
    let group = Group::new("g").unwrap();
    let all = members(&queue, &group, 3);
    let first = queue.try_claim().unwrap().unwrap();
    assert_eq!(
        first.retry("boom").unwrap(),
        dirq::queue::Retried::DeadLettered
    );
    assert_eq!(ids(&queue, State::Errors), all);
    assert!(reason(&queue, &all[2]).starts_with(&format!("cancelled: {} failed: boom", all[0])));
}

/// A chain's members are claimable one at a time, in the order enqueued, even with
/// four threads claiming; each waits in chained/ meanwhile.
#[test]
fn an_ordered_group_runs_one_member_at_a_time_in_order() {
    let t = TestQueue::new();
    let chain = Group::ordered("etl").unwrap();
    let all = members(&t.queue, &chain, 12);
    assert_eq!(ids(&t.queue, State::Incoming), [all[0].clone()]);
    assert_eq!(ids(&t.queue, State::Chained).len(), 11);
    let log = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (queue, log) = (t.queue.clone(), log.clone());
            std::thread::spawn(move || loop {
                if log.lock().unwrap().len() >= 24 {
                    return;
                }
                let Some(message) = queue.try_claim().unwrap() else {
                    std::thread::yield_now();
                    continue;
                };
                log.lock().unwrap().push(format!("start {}", message.id()));
                std::thread::sleep(Duration::from_millis(2));
                log.lock().unwrap().push(format!("end {}", message.id()));
                message.commit().unwrap();
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let want: Vec<String> = all
        .iter()
        .flat_map(|id| [format!("start {id}"), format!("end {id}")])
        .collect();
    assert_eq!(*log.lock().unwrap(), want);
    assert_eq!(t.queue.counts().unwrap().unfinished(), 0);
}

/// A failed chain member stops the chain: the members after it are cancelled out of
/// chained/; requeued, they run again in order after it.
#[test]
fn a_failed_chain_member_stops_the_chain_until_requeued() {
    let t = TestQueue::new();
    let chain = Group::ordered("nightly").unwrap();
    let all = members(&t.queue, &chain, 4);
    t.queue.try_claim().unwrap().unwrap().commit().unwrap();
    t.queue
        .try_claim()
        .unwrap()
        .unwrap()
        .fail("exit 1")
        .unwrap();
    assert_eq!(ids(&t.queue, State::Errors), all[1..]);
    assert!(ids(&t.queue, State::Chained).is_empty());
    assert_eq!(
        reason(&t.queue, &all[3]),
        format!("cancelled: {} failed: exit 1", all[1])
    );

    assert_eq!(
        dirq::admin::requeue_group(&t.queue, &chain, false).unwrap(),
        3
    );
    assert_eq!(ids(&t.queue, State::Incoming), [all[1].clone()]);
    assert_eq!(ids(&t.queue, State::Chained), all[2..]);
    for id in &all[1..] {
        let message = t.queue.try_claim().unwrap().expect("the next member");
        assert_eq!(message.id(), id);
        assert!(t.queue.try_claim().unwrap().is_none(), "only one at a time");
        message.commit().unwrap();
    }
    assert_eq!(t.queue.counts().unwrap().unfinished(), 0);
}

/// Deleting the failed member of a stopped chain lets the next one in.
#[test]
fn deleting_the_failed_member_lets_the_chain_go_on() {
    let t = TestQueue::new();
    let chain = Group::ordered("c").unwrap();
    let all = members(&t.queue, &chain, 2);
    t.queue.try_claim().unwrap().unwrap().fail("no").unwrap();
    dirq::admin::requeue(&t.queue, &all[1], false).unwrap();
    assert_eq!(
        ids(&t.queue, State::Chained),
        [all[1].clone()],
        "waits behind the failed one"
    );
    dirq::admin::delete(&t.queue, &all[0]).unwrap();
    assert_eq!(ids(&t.queue, State::Incoming), [all[1].clone()]);
}

/// What a crash interrupts, recovery completes: a waiting member of a failed group
/// is cancelled, and a chain whose current member left without letting the next in
/// gets its next member.
#[test]
fn recovery_completes_cancellations_and_turns() {
    let t = TestQueue::new();
    let group = Group::new("g").unwrap();
    let all = members(&t.queue, &group, 3);
    t.queue
        .try_claim()
        .unwrap()
        .unwrap()
        .fail("exit 2")
        .unwrap();
    // As if the crash came before this member was cancelled.
    dirq::admin::requeue(&t.queue, &all[2], false).unwrap();
    let report = t.queue.recover().unwrap();
    assert_eq!(report.cancelled, 1);
    assert_eq!(ids(&t.queue, State::Errors), all);

    let chain = Group::ordered("c").unwrap();
    let links = members(&t.queue, &chain, 2);
    let first = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(first.id(), &links[0]);
    // As if the process died between its commit and the next turn: the file goes,
    // nothing lets the next member in.
    std::fs::remove_file(first.path()).unwrap();
    drop(first);
    assert!(t.queue.try_claim().unwrap().is_none());
    let report = t.queue.recover().unwrap();
    assert_eq!(report.let_in, 1);
    assert_eq!(t.queue.try_claim().unwrap().unwrap().id(), &links[1]);
    let again = t.queue.recover().unwrap();
    assert_eq!((again.cancelled, again.let_in), (0, 0), "idempotent");
}

#[test]
fn bad_group_names_are_refused() {
    for bad in ["", "a/b", "a.b", "sp ace", &"x".repeat(65)] {
        assert!(Group::new(bad).is_err(), "{bad:?}");
    }
    let out = crate::util::run(&["push", "/tmp/never-created-q", "--group", "a/b"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid group name \"a/b\""), "{stderr}");
    assert!(!Path::new("/tmp/never-created-q").exists());
}

/// `dirq exec -j 3` in two processes over a 16-member chain pushed with
/// `push --group --ordered`: the commands run one after another, in push order.
#[test]
fn exec_processes_run_a_chain_in_order() {
    let t = TestQueue::new();
    for i in 0..16 {
        crate::util::run_with_input(
            &["push", s(t.root()), "--group", "jobs", "--ordered"],
            format!("{i:02}").as_bytes(),
        );
    }
    assert_eq!(t.queue.counts().unwrap().chained, 15);
    let log = t.dir.path().join("log");
    let script = format!(
        "n=$(cat); echo start $n >> {log}; sleep 0.02; echo end $n >> {log}",
        log = s(&log)
    );
    let spawn = || -> Child {
        dirq()
            .args(["exec", s(t.root()), "-j", "3", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let workers = [spawn(), spawn()];
    wait_until(LONG, "every job run", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().count() == 32)
            && t.queue.counts().unwrap().unfinished() == 0
    });
    for mut worker in workers {
        signal(worker.id(), "TERM");
        assert!(worker.wait().unwrap().success());
    }
    let want: Vec<String> = (0..16)
        .flat_map(|i| [format!("start {i:02}"), format!("end {i:02}")])
        .collect();
    let got: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(got, want);
}

/// Two `dirq exec -j 4` processes over a 40-member group, one of which fails: no
/// member runs after being cancelled, every member ran or is in errors/, and
/// `dirq requeue --group` brings every failed and cancelled one back.
#[test]
fn exec_processes_cancel_a_failed_group() {
    let t = TestQueue::new();
    let group = Group::new("batch").unwrap();
    let all = members(&t.queue, &group, 40);
    let ran = t.dir.path().join("ran");
    // Member 5 fails; the others take a moment, so that some still wait when it does.
    let script = format!(
        "b=$(cat); echo \"$DIRQ_ID\" >> {ran}; [ \"$b\" = 'member 5' ] && exit 3; sleep 0.05",
        ran = s(&ran)
    );
    let spawn = || -> Child {
        dirq()
            .args([
                "exec",
                s(t.root()),
                "-j",
                "4",
                "--retries",
                "1",
                "--no-breaker",
            ])
            .args(["--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let workers = [spawn(), spawn()];
    wait_until(LONG, "the group settled", || {
        let c = t.queue.counts().unwrap();
        c.incoming + c.pending == 0 && c.errors > 0
    });
    for mut worker in workers {
        signal(worker.id(), "TERM");
        assert!(worker.wait().unwrap().success());
    }
    let ran: Vec<String> = std::fs::read_to_string(&ran)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let failed = ids(&t.queue, State::Errors);
    assert!(failed.contains(&all[5]));
    assert_eq!(reason(&t.queue, &all[5]), "exit 3");
    let want = format!("cancelled: {} failed: exit 3", all[5]);
    for id in failed.iter().filter(|id| *id != &all[5]) {
        assert_eq!(reason(&t.queue, id), want);
        assert!(!ran.contains(&id.to_string()), "{id} ran and was cancelled");
    }
    assert_eq!(
        ran.len() + failed.len() - 1,
        40,
        "each member ran or is in errors/"
    );
    assert!(failed.len() > 1, "nothing was cancelled");

    let out = run_ok(&["requeue", s(t.root()), "--group", "batch"]);
    assert_eq!(
        out,
        format!("requeued {} member(s) of group batch\n", failed.len())
    );
    assert_eq!(ids(&t.queue, State::Incoming), failed);
}
