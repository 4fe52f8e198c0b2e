//! `dirq exec` with several named outputs: fan-out, routing by exit code and by a
//! printed `dirq-route:` line, the refusals of routes that cannot work, and the
//! permission modes of the queues and files exec creates.

use std::path::Path;
use std::process::Stdio;

use dirq::{DirectoryQueue, State};

use crate::util::{assert_succeeded, dirq, exec_drain, TestQueue};

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The ids of `state`.
fn ids(queue: &DirectoryQueue, state: State) -> Vec<dirq::MessageId> {
    queue.ids(state).unwrap().map(Result::unwrap).collect()
}

/// The bodies waiting in `queue`'s `incoming/`, sorted.
fn bodies(queue: &DirectoryQueue) -> Vec<String> {
    let mut bodies: Vec<String> = ids(queue, State::Incoming)
        .iter()
        .map(|id| {
            String::from_utf8(
                std::fs::read(queue.path(State::Incoming).join(id.as_os_str())).unwrap(),
            )
            .unwrap()
        })
        .collect();
    bodies.sort();
    bodies
}

/// Exit 3 goes to `spam`, exit 0 to `clean` (with `--route 0=`); nothing is copied to
/// the other output and nothing stays behind.
#[test]
fn exit_codes_route_each_message_to_one_output() {
    let t = TestQueue::new();
    for body in ["ham 1", "spam 2", "ham 3", "spam 4"] {
        t.queue.enqueue(body.as_bytes()).unwrap();
    }
    let (clean, spam) = (t.sibling("clean"), t.sibling("spam"));
    let out = exec_drain(
        t.root(),
        &[
            "--to",
            &format!("clean={}", s(clean.root())),
            "--to",
            s(spam.root()),
            "--route",
            "0=clean",
            "--route",
            "3=spam",
        ],
        "case $(cat) in spam*) exit 3;; esac",
    );
    assert_succeeded(&out, "exec with routes");
    assert_eq!(bodies(&clean), ["ham 1", "ham 3"]);
    assert_eq!(bodies(&spam), ["spam 2", "spam 4"]);
    let counts = t.queue.counts().unwrap();
    assert_eq!(
        counts.incoming + counts.pending + counts.errors,
        0,
        "{counts:?}"
    );
}

/// Without `--route 0=`, exit 0 passes on to every output (fan-out), and exec says so.
#[test]
fn exit_0_fans_out_to_every_output_unless_routed() {
    let t = TestQueue::new();
    t.queue.enqueue(b"ok").unwrap();
    t.queue.enqueue(b"bad").unwrap();
    let (a, b) = (t.sibling("a"), t.sibling("b"));
    let out = exec_drain(
        t.root(),
        &["--to", s(a.root()), "--to", s(b.root()), "--route", "4=b"],
        "test \"$(cat)\" = ok || exit 4",
    );
    assert_succeeded(&out, "exec with fan-out and a route");
    assert_eq!(bodies(&a), ["ok"]);
    assert_eq!(bodies(&b), ["bad", "ok"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--route 0=NAME"), "no warning: {stderr}");
}

/// A first line `dirq-route: NAME` chooses the output and is not passed on; the rest of
/// the output is the new message, or the original when nothing else was printed. A name
/// that is no output fails the message with a reason naming it.
#[test]
fn a_printed_line_routes_the_message() {
    let t = TestQueue::new();
    for body in ["left", "right", "nowhere"] {
        t.queue.enqueue(body.as_bytes()).unwrap();
    }
    let (left, right) = (t.sibling("left"), t.sibling("right"));
    let out = exec_drain(
        t.root(),
        &[
            "--to",
            s(left.root()),
            "--to",
            s(right.root()),
            "--route-by-line",
        ],
        // "left" is passed on as it is; "right" is replaced by new text.
        "b=$(cat); echo \"dirq-route: $b\"; if [ \"$b\" = right ]; then printf RIGHT; fi",
    );
    assert_succeeded(&out, "exec --route-by-line");
    assert_eq!(bodies(&left), ["left"]);
    assert_eq!(bodies(&right), ["RIGHT"]);
    let failed = ids(&t.queue, State::Errors);
    assert_eq!(failed.len(), 1, "the message routed nowhere fails");
    let reason = dirq::admin::failure(&t.queue, &failed[0])
        .unwrap()
        .unwrap()
        .reason
        .unwrap();
    assert!(reason.contains("\"nowhere\""), "{reason}");
    assert_eq!(t.queue.counts().unwrap().incoming, 0);
}

/// Routes that cannot work are refused before anything is claimed, naming the flag.
#[test]
fn impossible_routes_are_refused_and_nothing_moves() {
    let t = TestQueue::new();
    t.queue.enqueue(b"kept").unwrap();
    let other = t.sibling("other");
    let to = format!("out={}", s(other.root()));
    let cases: &[(&[&str], &str)] = &[
        (
            &["--to", &to, "--route", "3=spam"],
            "no output is named \"spam\"",
        ),
        (&["--route", "3=spam"], "routes need outputs"),
        (&["--route-by-line"], "routes need outputs"),
        (&["--to", &to, "--to", &to], "two outputs are named \"out\""),
        (&["--to", &to, "--route", "75=out"], "75 retries"),
        (&["--to", &to, "--route", "x"], "not CODE=NAME"),
        (
            &["--also-input", s(other.root()), "--to", s(other.root())],
            "same queue",
        ),
    ];
    for (extra, want) in cases {
        let out = exec_drain(t.root(), extra, "cat");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{extra:?}: {} {stderr}",
            out.status
        );
        assert!(
            stderr.contains(want),
            "{extra:?}: wanted {want:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert_eq!(bodies(&t.queue), ["kept"]);
}

/// `--dir-mode` is applied exactly to the queue directories exec creates (setgid
/// included), and `--file-mode`, narrowed by the umask, to the files it writes.
#[cfg(unix)]
#[test]
fn dir_and_file_modes_apply_to_what_exec_creates() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    let t = TestQueue::new();
    t.queue.enqueue(b"x").unwrap();
    let next = t.dir.path().join("shared-next");
    let out = dirq()
        .args(["exec", "--drain", s(t.root()), "--to", s(&next)])
        .args(["--dir-mode", "2770", "--file-mode", "0660"])
        .args(["--", "sh", "-c", "cat; echo more"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_succeeded(&out, "exec with modes");
    assert_eq!(mode(&next), 0o2770);
    assert_eq!(mode(&next.join("incoming")), 0o2770);
    let next = DirectoryQueue::open(&next).unwrap();
    let ids = ids(&next, State::Incoming);
    assert_eq!(ids.len(), 1);
    let umask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Umask:"))?.to_owned();
            u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).ok()
        })
        .unwrap_or(0o022);
    let file = next.path(State::Incoming).join(ids[0].as_os_str());
    assert_eq!(mode(&file), 0o660 & !umask);
}

/// `dirq init --mode` creates a queue's directories with the mode, and sets it on a
/// queue that exists already; without `--mode`, an existing queue keeps its modes.
#[cfg(unix)]
#[test]
fn init_mode_applies_to_new_and_existing_queues() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    let t = TestQueue::new();
    // A bucket of finished ids in seen/, which every user of the queue writes into.
    let remembering = dirq::DirectoryQueue::builder(t.root())
        .remember_finished(std::time::Duration::from_secs(3600))
        .open()
        .unwrap();
    remembering.enqueue(b"done").unwrap();
    remembering.try_claim().unwrap().unwrap().commit().unwrap();
    let bucket = std::fs::read_dir(t.root().join("seen"))
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_type().unwrap().is_dir())
        .expect("a bucket")
        .path();
    let fresh = t.dir.path().join("fresh");
    crate::util::run_ok(&["init", "--mode", "2770", s(&fresh), s(t.root())]);
    for queue in [fresh.as_path(), t.root()] {
        assert_eq!(mode(queue), 0o2770, "{}", queue.display());
        for state in State::ALL {
            let dir = queue.join(state.as_str());
            if dir.exists() {
                assert_eq!(mode(&dir), 0o2770, "{}", dir.display());
            }
        }
        assert_eq!(
            mode(&queue.join("seen")),
            0o2770,
            "{}/seen",
            queue.display()
        );
    }
    assert_eq!(mode(&bucket), 0o2770, "{}", bucket.display());
    crate::util::run_ok(&["init", s(t.root())]);
    assert_eq!(
        mode(&t.root().join("incoming")),
        0o2770,
        "re-init without --mode"
    );
    let bad = crate::util::run(&["init", "--mode", "0600", s(t.root())]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("dir_mode"));
}

/// A pipeline stage with `outputs`, `routes`, `route_by_line` and the modes: the
/// messages reach the outputs the routes name, and the created queue has the mode.
#[cfg(unix)]
#[test]
fn pipeline_outputs_and_routes_reach_the_stage() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestQueue::new();
    for body in ["ham", "spam", "ham", "odd"] {
        t.queue.enqueue(body.as_bytes()).unwrap();
    }
    let base = t.dir.path();
    let file = base.join("pipeline.toml");
    std::fs::write(
        &file,
        format!(
            "[defaults]\ndir_mode = 0o2770\n\n\
             [[stage]]\nname = \"filter\"\ninput = \"{}\"\n\
             outputs = {{ clean = \"clean\", spam = \"spam\", odd = \"odd\" }}\n\
             routes = {{ 0 = \"clean\", 3 = \"spam\" }}\nroute_by_line = true\n\
             command = 'b=$(cat); case $b in spam) exit 3;; odd) echo \"dirq-route: odd\";; esac'\n",
            s(t.root())
        ),
    )
    .unwrap();
    crate::util::run_ok(&["run", "--check", s(&file)]);
    let mut supervisor = dirq()
        .args(["run", s(&file)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Not opened before the stage creates them: opening would create them first.
    let names = ["clean", "spam", "odd"];
    crate::util::wait_until(
        std::time::Duration::from_secs(60),
        "every message routed",
        || {
            names
                .iter()
                .map(|name| {
                    std::fs::read_dir(base.join(name).join("incoming")).map_or(0, Iterator::count)
                })
                .sum::<usize>()
                == 4
        },
    );
    let mode = std::fs::metadata(base.join("odd"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o2770);
    let [clean, spam, odd] = names.map(|name| t.sibling(name));
    crate::util::signal(supervisor.id(), "TERM");
    assert!(supervisor.wait().unwrap().success());
    assert_eq!(bodies(&clean), ["ham", "ham"]);
    assert_eq!(bodies(&spam), ["spam"]);
    assert_eq!(bodies(&odd), ["odd"]);
}

/// Outputs and routes that `dirq exec` would refuse stop the pipeline before any stage
/// starts, with `--check` too, naming the stage.
#[test]
fn run_refuses_impossible_routes_before_starting() {
    let t = TestQueue::new();
    let file = t.dir.path().join("pipeline.toml");
    for (keys, want) in [
        (
            "output = \"o\"\nroutes = { 3 = \"spam\" }",
            "route 3=spam: no output is named \"spam\"",
        ),
        ("routes = { 3 = \"o\" }", "routes need outputs"),
        (
            "outputs = { o = \"o\" }\nroutes = { 75 = \"o\" }",
            "routes: ",
        ),
        (
            "outputs = { \"a/b\" = \"o\" }",
            "outputs: \"a/b\" is not an output name",
        ),
        ("output = \"o\"\noutputs = { o = \"p\" }", "--to "),
        (
            "dir_mode = \"0600\"\noutput = \"o\"",
            "invalid dir_mode of queue ",
        ),
        ("file_mode = \"rw\"", "file_mode: "),
    ] {
        std::fs::write(
            &file,
            format!(
                "[[stage]]\nname = \"x\"\ninput = \"{}\"\ncommand = \"cat\"\n{keys}\n",
                s(t.root())
            ),
        )
        .unwrap();
        crate::util::assert_run_refuses(&file, keys, want);
    }
    assert!(!t.dir.path().join("o").exists(), "an output was created");
}
