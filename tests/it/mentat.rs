//! Interoperability with Mentat's own `mentat.dirq.DirectoryQueue` (mentat-ng on PyPI).
//!
//! The tests need a Python with mentat-ng installed. `.ci/run` makes one; run by hand,
//! the tests make one themselves under the target directory (`pip install --no-deps
//! mentat-ng`: its `mentat/dirq.py` needs only the standard library). Without Python
//! or network they are skipped with a printed reason (a failure in CI).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use dirq::{DirectoryQueue, State};

use crate::util::{assert_succeeded, run_ok, skip, TestQueue};

const MENTAT_VERSION: &str = "2.15.4";

/// A Python interpreter that can `import mentat.dirq`, if one can be had.
fn mentat_python() -> Result<&'static Path, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Some(python) = std::env::var_os("DIRQ_TEST_PYTHON") {
                return Ok(PathBuf::from(python));
            }
            let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mentat-venv");
            let python = venv.join("bin/python");
            if !imports_mentat(&python) {
                let made = Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(&venv)
                    .status()
                    .map_err(|e| format!("no python3: {e}"))?;
                if !made.success() {
                    return Err("python3 -m venv failed".to_owned());
                }
                let installed = Command::new(venv.join("bin/pip"))
                    .args(["install", "-q", "--disable-pip-version-check", "--no-deps"])
                    .arg(format!("mentat-ng=={MENTAT_VERSION}"))
                    .status()
                    .map_err(|e| format!("cannot run pip: {e}"))?;
                if !installed.success() {
                    return Err(format!("pip install mentat-ng=={MENTAT_VERSION} failed"));
                }
            }
            if imports_mentat(&python) {
                Ok(python)
            } else {
                Err("mentat.dirq does not import".to_owned())
            }
        })
        .as_deref()
        .map_err(Clone::clone)
}

fn imports_mentat(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import mentat.dirq"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a Python snippet with `sys.argv[1:]` = `args`; returns its standard output.
fn python(script: &str, args: &[&Path]) -> String {
    let out = Command::new(mentat_python().expect("checked by the caller"))
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert_succeeded(&out, "python");
    String::from_utf8(out.stdout).unwrap()
}

/// Mentat's consumer: `next()` until empty, committing each; prints `id<TAB>data` lines.
const MENTAT_DRAIN: &str = r#"
import sys
from mentat.dirq import DirectoryQueue
q = DirectoryQueue(sys.argv[1])
while True:
    (item_id, data) = q.next()
    if item_id is None:
        break
    q.commit(item_id)
    print(item_id + "\t" + data)
"#;

fn available(test: &str) -> bool {
    match mentat_python() {
        Ok(_) => true,
        Err(reason) => {
            skip(test, &reason);
            false
        }
    }
}

#[test]
fn mentat_enqueues_dirq_takes_each_once_oldest_first() {
    if !available("mentat_enqueues_dirq_takes_each_once_oldest_first") {
        return;
    }
    let t = TestQueue::new();
    let printed = python(
        r#"
import sys
from mentat.dirq import DirectoryQueue
q = DirectoryQueue(sys.argv[1])
for i in range(200):
    print(q.enqueue('{"ID": "m%03d"}' % i))
"#,
        &[t.root()],
    );
    let mentat_ids: Vec<&str> = printed.lines().collect();
    assert_eq!(mentat_ids.len(), 200);
    let mut bodies = Vec::new();
    while let Some(message) = t.queue.try_claim().unwrap() {
        assert!(mentat_ids.contains(&message.id().to_str().unwrap()));
        bodies.push(String::from_utf8(message.bytes().unwrap()).unwrap());
        message.commit().unwrap();
    }
    // Mentat's ids carry their creation time, so dirq claims them in enqueue order
    // (Mentat itself dequeues in directory order).
    let expected: Vec<String> = (0..200)
        .map(|i| format!("{{\"ID\": \"m{i:03}\"}}"))
        .collect();
    assert_eq!(bodies, expected);
}

#[test]
fn dirq_pushes_mentat_reads_each_once() {
    if !available("dirq_pushes_mentat_reads_each_once") {
        return;
    }
    let t = TestQueue::new();
    let mut pushed = HashSet::new();
    for i in 0..100 {
        pushed.insert(
            t.queue
                .enqueue(format!("{{\"n\": {i}}}"))
                .unwrap()
                .to_string(),
        );
    }
    let lines = python(MENTAT_DRAIN, &[t.root()]);
    let mut read = HashSet::new();
    for line in lines.lines() {
        let (id, data) = line.split_once('\t').unwrap();
        assert!(read.insert(id.to_owned()), "{id} read twice");
        assert!(data.starts_with("{\"n\": "), "{data}");
    }
    assert_eq!(read, pushed);
    assert_eq!(t.queue.counts().unwrap(), dirq::queue::Counts::default());
}

#[test]
fn dirq_forwards_into_a_queue_mentat_consumes() {
    if !available("dirq_forwards_into_a_queue_mentat_consumes") {
        return;
    }
    let t = TestQueue::new();
    let next_root = t.dir.path().join("next");
    // Mentat creates its queue first, as a running Mentat daemon would have.
    python(
        "import sys\nfrom mentat.dirq import DirectoryQueue\nDirectoryQueue(sys.argv[1])",
        &[&next_root],
    );
    let next = DirectoryQueue::open(&next_root).unwrap();
    for i in 0..50 {
        t.queue.enqueue(format!("{{\"hop\": {i}}}")).unwrap();
    }
    // Forward through the CLI, as a shell stage of a pipeline would.
    let forwarded = run_ok(&[
        "take",
        "-n",
        "1000",
        "--to",
        next_root.to_str().unwrap(),
        t.root().to_str().unwrap(),
    ]);
    let forwarded: HashSet<&str> = forwarded.lines().collect();
    assert_eq!(forwarded.len(), 50);
    let lines = python(MENTAT_DRAIN, &[&next_root]);
    let read: HashSet<&str> = lines
        .lines()
        .map(|l| l.split_once('\t').unwrap().0)
        .collect();
    assert_eq!(read, forwarded);
    assert_eq!(next.counts().unwrap().get(State::Incoming), 0);
}

#[test]
fn mentat_reads_a_queue_fed_by_enqueue_with_id() {
    if !available("mentat_reads_a_queue_fed_by_enqueue_with_id") {
        return;
    }
    let t = TestQueue::new();
    let queue = DirectoryQueue::builder(t.root())
        .remember_finished(std::time::Duration::from_secs(3600))
        .open()
        .unwrap();
    let mut pushed = HashSet::new();
    for i in 0..40 {
        let id = dirq::MessageId::new(format!("event-{i:02}")).unwrap();
        assert!(queue
            .enqueue_with_id(&id, format!("{{\"n\": {i}}}"))
            .unwrap()
            .is_stored());
        // A repeat, as a redelivering producer sends: nothing more for Mentat to read.
        assert!(!queue.enqueue_with_id(&id, b"again").unwrap().is_stored());
        pushed.insert(id.to_string());
    }
    // One finished by dirq: its record sits in seen/, where Mentat never looks.
    let done = queue.try_claim().unwrap().unwrap();
    pushed.remove(&done.id().to_string());
    done.commit().unwrap();
    let lines = python(MENTAT_DRAIN, &[t.root()]);
    let mut read = HashSet::new();
    for line in lines.lines() {
        let (id, data) = line.split_once('\t').unwrap();
        assert!(read.insert(id.to_owned()), "{id} read twice");
        assert!(data.starts_with("{\"n\": "), "{data}");
    }
    assert_eq!(read, pushed);
    assert!(
        t.root().join("seen/.ttl").exists(),
        "seen/ is left as it was"
    );
}
