//! The benchmark driver `examples/peerbench` keeps the harness's contract
//! (`../shared/peers/README.md`): it refuses what it does not know and honours
//! `work_us=`.

use std::process::{Command, Output};

use crate::util::{example, tempdir};

fn peerbench(args: &[&str]) -> Output {
    Command::new(example("peerbench"))
        .args(args)
        .output()
        .expect("run peerbench")
}

/// The JSON line a successful run prints.
fn report(args: &[&str]) -> serde_json::Value {
    let out = peerbench(args);
    assert!(
        out.status.success(),
        "peerbench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn an_argument_the_driver_does_not_know_is_an_error_not_ignored() {
    let dir = tempdir();
    let q = format!("q={}", dir.path().join("q").display());
    for args in [
        vec!["enqueue", &q, "n=1", "bogus=1"],
        vec!["dequeue", &q, "n=1"],
        vec!["count", &q, "durable=1"],
    ] {
        let out = peerbench(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains("does not know"), "{args:?}: {stderr}");
    }
    let out = peerbench(&["frob", &q]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command \"frob\""));
    let out = peerbench(&["dequeue", &q, "threads=0"]);
    assert!(!out.status.success(), "threads=0 was accepted");
}

#[test]
fn work_us_is_spent_on_every_message_between_read_and_commit() {
    let dir = tempdir();
    let q = format!("q={}", dir.path().join("q").display());
    report(&["enqueue", &q, "n=4"]);
    let dequeued = report(&["dequeue", &q, "work_us=25000", "expect=4"]);
    assert_eq!(dequeued["done"], 4);
    assert_eq!(dequeued["loss"], 0);
    // Four sleeps of 25 ms one after the other cannot take less than 0.1 s.
    let secs = dequeued["secs"].as_f64().expect("secs");
    assert!(
        secs >= 0.1,
        "work_us= was not spent: {secs} s for 4 messages"
    );

    // With a batch, messages are claimed, processed and committed K at a time.
    report(&["enqueue", &q, "n=8", "start=4"]);
    let batched = report(&[
        "dequeue",
        &q,
        "work_us=1000",
        "durable=1",
        "batch=4",
        "threads=2",
        "expect=8",
    ]);
    assert_eq!(batched["done"], 8);
    assert_eq!(batched["dups"], 0);
    assert_eq!(batched["loss"], 0);
    assert_eq!(batched["remaining"], 0);
}
