//! `dirq edit` and `admin::replace`: new content for a waiting message, atomically, under
//! the same id, refused for a claimed one with the edit kept; and, under workers that
//! claim all the while, every message processed exactly once with the old content or
//! the new.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirq::{MessageId, State};

use crate::util::{run, TestQueue};

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `dirq edit QUEUE ID` in a pseudo-terminal (`script`), with `$VISUAL` set to `visual`.
fn edit_in_terminal(queue: &Path, id: &MessageId, visual: &str) -> Output {
    let line = format!("{} edit {} {}", env!("CARGO_BIN_EXE_dirq"), s(queue), id);
    Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("VISUAL", visual)
        .env("TMPDIR", queue.parent().unwrap())
        .stdin(Stdio::null())
        .output()
        .expect("run script")
}

fn body(queue: &TestQueue, state: State, name: &str) -> String {
    std::fs::read_to_string(queue.path(state).join(name)).unwrap()
}

#[test]
fn from_a_file_replaces_the_content_under_the_same_id() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"prio=low").unwrap();
    let new = t.dir.path().join("new");
    std::fs::write(&new, "prio=high").unwrap();
    let out = run(&["edit", s(t.root()), id.to_str().unwrap(), "--from", s(&new)]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{id}: edited in incoming/\n")
    );
    assert_eq!(t.names(State::Incoming), [id.to_str().unwrap()]);
    assert_eq!(body(&t, State::Incoming, id.to_str().unwrap()), "prio=high");
    assert!(
        t.names(State::Tmp).is_empty(),
        "the old content stayed in tmp/"
    );
}

/// A deferred message keeps its due time (its name) and its attempt count; a held one
/// stays held.
#[test]
fn deferred_and_held_messages_stay_where_they_are() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"old").unwrap();
    let message = t.queue.try_claim().unwrap().unwrap();
    message
        .retry_at(
            "later",
            std::time::SystemTime::now() + Duration::from_secs(3600),
        )
        .unwrap();
    let deferred = t.names(State::Deferred);
    assert_eq!(
        dirq::admin::replace(&t.queue, &id, b"new").unwrap(),
        State::Deferred
    );
    assert_eq!(t.names(State::Deferred), deferred);
    assert_eq!(body(&t, State::Deferred, &deferred[0]), "new");
    assert_eq!(
        dirq::admin::info(&t.queue, State::Deferred, &id)
            .unwrap()
            .attempts,
        Some(1)
    );

    let held = t.queue.enqueue(b"held").unwrap();
    dirq::admin::hold(&t.queue, &held).unwrap();
    assert_eq!(
        dirq::admin::replace(&t.queue, &held, b"HELD").unwrap(),
        State::Hold
    );
    assert_eq!(body(&t, State::Hold, held.to_str().unwrap()), "HELD");
}

#[test]
fn the_editor_edits_a_copy_which_goes_away_once_applied() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"colour=red").unwrap();
    let out = edit_in_terminal(t.root(), &id, "sed -i s/red/blue/");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        body(&t, State::Incoming, id.to_str().unwrap()),
        "colour=blue"
    );
    let copies: Vec<_> = crate::util::names_in(t.dir.path())
        .into_iter()
        .filter(|n| n.starts_with("dirq-edit-"))
        .collect();
    assert!(copies.is_empty(), "copies left: {copies:?}");

    // Saved unchanged: nothing is replaced.
    let out = edit_in_terminal(t.root(), &id, "true");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));
}

/// A worker claims the message while the operator edits it: the edit is refused, the
/// claimed message is untouched, and the edited copy is kept at the path printed.
#[test]
fn a_message_claimed_during_the_edit_is_left_alone_and_the_edit_kept() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"original").unwrap();
    // The "editor" claims the message the way a worker would, then saves an edit.
    let visual = format!(
        "f() {{ {} take {} -n 1 --to {} >/dev/null; echo edited > \"$1\"; }}; f",
        env!("CARGO_BIN_EXE_dirq"),
        s(t.root()),
        s(&t.dir.path().join("elsewhere"))
    );
    let out = edit_in_terminal(t.root(), &id, &visual);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("failed to edit"), "{said}");
    let kept = said
        .split("your edit is kept in ")
        .nth(1)
        .unwrap_or_else(|| panic!("no kept path in {said:?}"))
        .trim();
    assert_eq!(std::fs::read_to_string(kept).unwrap(), "edited\n");
    let elsewhere = dirq::DirectoryQueue::open(t.dir.path().join("elsewhere")).unwrap();
    let message = elsewhere.try_claim().unwrap().unwrap();
    assert_eq!(message.bytes().unwrap(), b"original");
}

#[test]
fn what_cannot_be_edited_is_refused_and_nothing_changes() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"keep").unwrap();
    let failed = t.queue.enqueue(b"failed").unwrap();
    let claimed = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(claimed.id(), &id);
    t.queue.try_claim().unwrap().unwrap().fail("no").unwrap();
    let blank = t.dir.path().join("blank");
    std::fs::write(&blank, " \n").unwrap();
    let waiting = t.queue.enqueue(b"waiting").unwrap();
    let garbage = "../x".to_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![id.to_str().unwrap(), "--from", s(&blank)],
            "the message is in pending/",
        ),
        (
            vec![failed.to_str().unwrap(), "--from", s(&blank)],
            "in errors/",
        ),
        (
            vec![waiting.to_str().unwrap(), "--from", s(&blank)],
            "empty",
        ),
        (
            vec![waiting.to_str().unwrap(), "--from", "/nonexistent/file"],
            "/nonexistent/file",
        ),
        (vec![&garbage, "--from", s(&blank)], "../x"),
        (vec![waiting.to_str().unwrap()], "no terminal"),
    ];
    for (args, want) in cases {
        let mut full = vec!["edit", s(t.root())];
        full.extend(&args);
        let out = run(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: wanted {want:?} in {stderr}"
        );
        assert!(
            stderr.starts_with("dirq: error: failed to ")
                || stderr.starts_with("dirq: error: invalid message id"),
            "{stderr}"
        );
    }
    assert_eq!(
        body(&t, State::Incoming, waiting.to_str().unwrap()),
        "waiting"
    );
    assert_eq!(body(&t, State::Pending, id.to_str().unwrap()), "keep");
    drop(claimed);
}

/// Workers claim and commit while every message is edited once: a message whose edit
/// succeeded is processed with the new content, one whose edit was refused with the
/// old; each exactly once.
#[test]
fn edits_under_claiming_workers_are_all_or_nothing() {
    const N: usize = 300;
    let t = TestQueue::new();
    let ids: Vec<MessageId> = (0..N)
        .map(|i| t.queue.enqueue(format!("old {i}").as_bytes()).unwrap())
        .collect();
    let seen = Arc::new(Mutex::new(Vec::<(MessageId, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (queue, seen, stop) = (t.queue.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match queue.try_claim().unwrap() {
                        Some(message) => {
                            let text = String::from_utf8(message.bytes().unwrap()).unwrap();
                            seen.lock().unwrap().push((message.id().clone(), text));
                            message.commit().unwrap();
                        }
                        None => std::thread::yield_now(),
                    }
                }
            })
        })
        .collect();
    let mut edited = std::collections::HashSet::new();
    for (i, id) in ids.iter().enumerate() {
        match dirq::admin::replace(&t.queue, id, format!("new {i}").as_bytes()) {
            Ok(_) => {
                edited.insert(id.clone());
            }
            Err(dirq::Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ResourceBusy | std::io::ErrorKind::NotFound
                ) => {}
            Err(e) => panic!("edit {id}: {e}"),
        }
    }
    crate::util::wait_until(Duration::from_secs(60), "every message processed", || {
        seen.lock().unwrap().len() >= N && t.queue.counts().unwrap().pending == 0
    });
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), N, "processed more than once");
    for (id, text) in seen.iter() {
        let i = ids.iter().position(|x| x == id).unwrap();
        let want = if edited.contains(id) { "new" } else { "old" };
        assert_eq!(text, &format!("{want} {i}"), "{id}");
    }
    assert!(t.names(State::Tmp).is_empty());
}
