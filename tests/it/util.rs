//! Fixtures shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dirq::{DirectoryQueue, State};

/// A queue in a fresh temporary directory, removed at the end of the test.
pub struct TestQueue {
    pub dir: tempfile::TempDir,
    pub queue: DirectoryQueue,
}

impl TestQueue {
    pub fn new() -> TestQueue {
        let dir = tempdir();
        let queue = DirectoryQueue::open(dir.path().join("q")).expect("open test queue");
        TestQueue { dir, queue }
    }

    /// Another queue beside this one (same filesystem).
    pub fn sibling(&self, name: &str) -> DirectoryQueue {
        DirectoryQueue::open(self.dir.path().join(name)).expect("open sibling queue")
    }

    pub fn root(&self) -> &Path {
        self.queue.root()
    }

    pub fn path(&self, state: State) -> PathBuf {
        self.queue.path(state).to_path_buf()
    }

    /// Sorted names in a state directory, sidecars included.
    pub fn names(&self, state: State) -> Vec<String> {
        names_in(&self.path(state))
    }
}

/// A temporary directory under the target directory: on the same filesystem as the
/// build, so that tests exercise a real disk filesystem rather than tmpfs.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dirq-it-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create temporary directory")
}

pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
/// The sleep between polls is a polling interval, not a synchronisation. `condition`
/// must not block: the deadline is only checked between calls.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The `dirq` binary built for these tests.
pub fn dirq() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dirq"));
    command.env_remove("DIRQ_LOG");
    command
}

/// `dirq exec --drain --retries 1 QUEUE [extra...] -- sh -c SCRIPT`, to completion.
pub fn exec_drain(queue: &Path, extra: &[&str], script: &str) -> Output {
    dirq()
        .args(["exec", "--drain", "--retries", "1"])
        .arg(queue)
        .args(extra)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("run dirq exec")
}

/// Runs `dirq` with `args` to completion.
pub fn run(args: &[&str]) -> Output {
    dirq()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dirq")
}

/// Runs `dirq` with `input` on its standard input, to completion.
pub fn run_with_input(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = dirq()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dirq");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write to dirq");
    child.wait_with_output().expect("wait for dirq")
}

/// Asserts that the process `what` exited successfully, showing its standard error if not.
pub fn assert_succeeded(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `dirq` and asserts it succeeded; returns standard output.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert_succeeded(&out, &format!("dirq {args:?}"));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Whether this process may mount filesystems (root, as in CI).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Prints why a test did not run. In CI (`CI=true`), where every capability is
/// provided, a skip is a failure instead.
pub fn skip(test: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run in CI: {reason}");
    }
    eprintln!("skipped {test}: {reason}");
}

/// A tmpfs mounted for the duration of a test (root only), unmounted on drop.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs with `options` (for example `size=1m`). `None` when not root.
    pub fn mount(options: &str) -> Option<Tmpfs> {
        if !is_root() {
            return None;
        }
        let dir = tempdir();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs -o {options} failed");
        Some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Builds (if needed) and locates an example binary of this crate, for tests that run
/// it as separate processes. `cargo test` builds examples only when it runs them all,
/// so the test asks cargo itself; that is a no-op when the example is up to date.
pub fn example(name: &str) -> PathBuf {
    use std::sync::{Mutex, OnceLock};
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let exe = std::env::current_exe().expect("test executable");
    // <target>/<profile>/deps/it-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let path = profile_dir.join("examples").join(name);
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "--example", name]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        let status = cargo
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --example");
        assert!(status.success(), "cargo build --example {name} failed");
        built.push(name.to_owned());
    }
    assert!(
        path.is_file(),
        "example binary {} not found",
        path.display()
    );
    path
}

/// Sends a signal (`TERM`, `STOP`, ...) to a process.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// A copy of the hand-made queue `tests/fixtures/<name>` in a temporary directory:
/// its `q/` is the queue. Symlinks are copied as symlinks; `README` and `.gitkeep` are
/// left out; every state directory exists, with mode 0775 like the root.
pub fn fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dir = tempdir();
    let root = dir.path().join("q");
    copy_tree(&source, &root);
    for state in ["tmp", "incoming", "pending", "errors", "deferred", "hold"] {
        std::fs::create_dir_all(root.join(state)).unwrap();
    }
    for entry in std::iter::once(root.clone())
        .chain(["tmp", "incoming", "pending", "errors", "deferred", "hold"].map(|s| root.join(s)))
    {
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o775)).unwrap();
    }
    (dir, root)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "README" || name == ".gitkeep" {
            continue;
        }
        let (source, target) = (entry.path(), to.join(&name));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_tree(&source, &target);
        } else {
            std::fs::copy(&source, &target).unwrap();
        }
    }
}

/// Whether strace can trace a child here (it is installed, and ptrace is allowed).
pub fn strace_works() -> Result<(), String> {
    let out = std::process::Command::new("strace")
        .args(["-qq", "-e", "trace=none", "true"])
        .output()
        .map_err(|e| format!("cannot run strace: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "strace cannot trace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The command line of a running process, its arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Checks that both `dirq run --check FILE` and `dirq run FILE` refuse the pipeline
/// file whose stage `x` has a bad `key`, as [`assert_stage_refused`] does.
pub fn assert_run_refuses(file: &Path, key: &str, want: &str) {
    let file = file.to_str().expect("a UTF-8 path");
    for args in [&["run", "--check", file][..], &["run", file][..]] {
        assert_stage_refused(args, key, want);
    }
}

/// Runs `dirq ARGS` on a pipeline file whose stage `x` has a bad `key`, and checks that
/// it is refused: exit 1, and standard error names the stage and says `want`.
pub fn assert_stage_refused(args: &[&str], key: &str, want: &str) {
    let out = run(args);
    assert_eq!(out.status.code(), Some(1), "{key}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("stage \"x\": {want}")),
        "{key}: {stderr}"
    );
}
