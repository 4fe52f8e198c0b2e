//! The pipeline files of `examples/pipelines/`, shown in docs/operator.md: each is in
//! the doc word for word (so the two cannot drift), `dirq run --check` accepts each,
//! and the fan-out and routing ones deliver where the doc says they do.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::util::{assert_succeeded, dirq, run_ok, run_with_input, signal, tempdir, wait_until};

/// Generous: both CPU cores may be busy with other tests.
const LONG: Duration = Duration::from_secs(60);

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pipelines")
}

/// The names of the files in `examples/pipelines/`, sorted.
fn example_names() -> Vec<String> {
    let names = crate::util::names_in(&examples_dir());
    assert!(
        names.iter().any(|n| n.ends_with(".toml")),
        "no pipeline file in examples/pipelines/"
    );
    names
}

/// The pipeline files among `names`.
fn pipelines(names: &[String]) -> impl Iterator<Item = &String> {
    names.iter().filter(|n| n.ends_with(".toml"))
}

#[test]
fn every_example_file_is_in_the_operator_guide_verbatim() {
    use std::os::unix::fs::PermissionsExt;
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operator.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    for name in example_names() {
        let path = examples_dir().join(&name);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            doc.contains(&format!("`examples/pipelines/{name}`:\n\n```")),
            "docs/operator.md does not name examples/pipelines/{name} before its content"
        );
        assert!(
            doc.contains(&text),
            "docs/operator.md does not show examples/pipelines/{name} as it is; copy the \
             file into the doc again"
        );
        if !name.ends_with(".toml") {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o111,
                0o111,
                "examples/pipelines/{name} is not executable"
            );
        }
    }
}

/// The input queues of the pipeline file `file`, as written in it (relative to it).
fn inputs(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let table: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not TOML: {e}", file.display()));
    let stages = table["stage"].as_array().expect("[[stage]] tables");
    let mut inputs = Vec::new();
    for stage in stages {
        let queues = match (stage.get("input"), stage.get("inputs")) {
            (Some(input), None) => vec![input.clone()],
            (None, Some(inputs)) => inputs.as_array().expect("inputs is a list").clone(),
            _ => panic!("{}: a stage needs input or inputs", file.display()),
        };
        inputs.extend(
            queues
                .iter()
                .map(|q| q.as_str().expect("a path").to_owned()),
        );
    }
    inputs
}

/// A copy of `examples/pipelines/` (scripts keep their modes) with the input queues of
/// `file` (or of every pipeline file) created by `dirq init`.
fn copy_examples(file: Option<&str>) -> tempfile::TempDir {
    let dir = tempdir();
    let names = example_names();
    for name in &names {
        std::fs::copy(examples_dir().join(name), dir.path().join(name)).unwrap();
    }
    let files: Vec<&String> = match file {
        Some(file) => names.iter().filter(|n| *n == file).collect(),
        None => pipelines(&names).collect(),
    };
    assert!(!files.is_empty(), "no examples/pipelines/{file:?}");
    for file in files {
        for input in inputs(&dir.path().join(file)) {
            run_ok(&["init", s(&dir.path().join(input))]);
        }
    }
    dir
}

#[test]
fn every_example_passes_run_check() {
    let dir = copy_examples(None);
    for name in pipelines(&example_names()) {
        let file = dir.path().join(name);
        let out = run_ok(&["run", "--check", s(&file)]);
        assert!(out.contains(": ok ("), "dirq run --check {name}: {out}");
    }
}

/// `dirq run FILE` in the background, killed if the test fails before it stops it.
struct Running(Child);

impl Running {
    fn start(file: &Path) -> Running {
        let child = dirq()
            .args(["run", s(file)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dirq run");
        Running(child)
    }

    /// SIGTERM: the stages drain and `dirq run` exits; its exit code.
    fn stop(mut self) -> Option<i32> {
        signal(self.0.id(), "TERM");
        let code = self.0.wait().unwrap().code();
        std::mem::forget(self);
        code
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // On Linux the stage processes get SIGTERM when `dirq run` dies.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn push(queue: &Path, body: &str) {
    let out = run_with_input(&["push", s(queue)], body.as_bytes());
    assert_succeeded(&out, &format!("dirq push {}", queue.display()));
}

/// The messages waiting in `queue`'s `incoming/` as (id, body), sorted by body; none
/// when the queue does not exist yet (read directly: opening it would create it).
fn waiting(queue: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(queue.join("incoming")) else {
        return Vec::new();
    };
    let mut messages: Vec<(String, String)> = entries
        .map(|e| e.unwrap())
        .map(|e| {
            let body = std::fs::read_to_string(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), body)
        })
        .collect();
    messages.sort_by(|a, b| a.1.cmp(&b.1));
    messages
}

fn bodies(queue: &Path) -> Vec<String> {
    waiting(queue).into_iter().map(|(_, body)| body).collect()
}

/// Nothing is left in any state of the input queue `queue`.
fn assert_consumed(queue: &Path) {
    for state in ["incoming", "pending", "deferred", "errors"] {
        let left = crate::util::names_in(&queue.join(state));
        assert!(left.is_empty(), "{}/{state}: {left:?}", queue.display());
    }
}

/// classify.toml: exit 3 sends a mail to spool/spam, exit 0 to spool/clean, never both.
#[test]
fn classify_example_routes_by_exit_code() {
    let dir = copy_examples(Some("classify.toml"));
    let spool = dir.path().join("spool");
    let running = Running::start(&dir.path().join("classify.toml"));
    for body in [
        "Hi mom\n",
        "You won the LOTTERY\n",
        "Lunch at noon?\n",
        "cheap viagra\n",
    ] {
        push(&spool.join("mail"), body);
    }
    wait_until(LONG, "four mails routed", || {
        waiting(&spool.join("clean")).len() + waiting(&spool.join("spam")).len() == 4
    });
    assert_eq!(running.stop(), Some(0), "dirq run after SIGTERM");
    assert_eq!(
        bodies(&spool.join("clean")),
        ["Hi mom\n", "Lunch at noon?\n"]
    );
    assert_eq!(
        bodies(&spool.join("spam")),
        ["You won the LOTTERY\n", "cheap viagra\n"]
    );
    assert_consumed(&spool.join("mail"));
}

/// fanout.toml: every event arrives in both outputs, under the same id in both.
#[test]
fn fanout_example_copies_each_message_to_both_outputs() {
    let dir = copy_examples(Some("fanout.toml"));
    let spool = dir.path().join("spool");
    let running = Running::start(&dir.path().join("fanout.toml"));
    for body in ["event 1\n", "event 2\n", "event 3\n"] {
        push(&spool.join("events"), body);
    }
    wait_until(LONG, "three events in both outputs", || {
        waiting(&spool.join("archive")).len() == 3 && waiting(&spool.join("index")).len() == 3
    });
    assert_eq!(running.stop(), Some(0), "dirq run after SIGTERM");
    let (archive, index) = (
        waiting(&spool.join("archive")),
        waiting(&spool.join("index")),
    );
    assert_eq!(archive, index, "the same ids and bodies in both outputs");
    assert_eq!(
        bodies(&spool.join("archive")),
        ["event 1\n", "event 2\n", "event 3\n"]
    );
    assert_consumed(&spool.join("events"));
}

/// triage.toml: the printed route line chooses the output and is not passed on.
#[test]
fn triage_example_routes_by_a_printed_line() {
    let dir = copy_examples(Some("triage.toml"));
    let spool = dir.path().join("spool");
    let running = Running::start(&dir.path().join("triage.toml"));
    for body in ["ERROR disk full\n", "INFO started\n", "INFO stopped\n"] {
        push(&spool.join("logs"), body);
    }
    wait_until(LONG, "three records routed", || {
        waiting(&spool.join("alerts")).len() + waiting(&spool.join("routine")).len() == 3
    });
    assert_eq!(running.stop(), Some(0), "dirq run after SIGTERM");
    assert_eq!(bodies(&spool.join("alerts")), ["ERROR disk full\n"]);
    assert_eq!(
        bodies(&spool.join("routine")),
        ["INFO started\n", "INFO stopped\n"]
    );
    assert_consumed(&spool.join("logs"));
}

/// filter.toml: two stages, `tr` then `sed`, each passing on what it printed.
#[test]
fn filter_example_transforms_through_two_stages() {
    let dir = copy_examples(Some("filter.toml"));
    let spool = dir.path().join("spool");
    let running = Running::start(&dir.path().join("filter.toml"));
    push(&spool.join("text"), "hello   big  world\n");
    wait_until(LONG, "the message through both stages", || {
        waiting(&spool.join("squeezed")).len() == 1
    });
    assert_eq!(running.stop(), Some(0), "dirq run after SIGTERM");
    assert_eq!(bodies(&spool.join("squeezed")), ["HELLO BIG WORLD\n"]);
    assert_consumed(&spool.join("text"));
    assert_consumed(&spool.join("upper"));
}
