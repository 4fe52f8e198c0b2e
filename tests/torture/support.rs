//! What the torture cases share: figures, skips, scratch space, mounts, child
//! processes, signals and a seeded random source.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How a case ended when it did not panic.
pub enum Outcome {
    Passed,
    /// The case could not run here, and why.
    Skipped(String),
}

/// The figures a case reports: `name=value` pairs in the order they were recorded.
#[derive(Default)]
pub struct Figures(Vec<(String, String)>);

impl Figures {
    pub fn set(&mut self, name: &str, value: impl fmt::Display) {
        let value = value.to_string();
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name.to_owned(), value)),
        }
    }

    pub fn add(&mut self, name: &str, amount: u64) {
        let old: u64 = self
            .0
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        self.set(name, old + amount);
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self.0.iter().map(|(n, v)| format!("{n} {v}")).collect();
        f.write_str(&pairs.join(", "))
    }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned())
}

/// Whether this process runs as root (mounts, other uids, `chattr`).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Fails with the reason to skip unless every tool in `tools` is on the `PATH`.
pub fn need_tools(tools: &[&str]) -> Result<(), String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("{} not installed", missing.join(", ")))
    }
}

/// Fails with the reason to skip unless this process is root and has `tools`.
pub fn need_root_and(tools: &[&str]) -> Result<(), String> {
    if !is_root() {
        return Err("needs root (mounts, other users, chattr)".to_owned());
    }
    need_tools(tools)
}

/// A scratch directory under the target directory (a real disk filesystem, not tmpfs),
/// removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dirq-torture-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create a scratch directory")
}

/// Runs `program args` to completion and panics, with its output, unless it succeeds.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A mounted filesystem, unmounted (and its loop device released) when dropped.
pub struct Mount {
    /// The scratch directory holding the mount point and any image.
    scratch: tempfile::TempDir,
    point: PathBuf,
    /// `tmpfs`, `ext4`, `xfs` or `btrfs`.
    pub kind: &'static str,
    image: Option<PathBuf>,
}

impl Mount {
    /// A tmpfs with `options` (for example `size=1m`).
    pub fn tmpfs(options: &str) -> Mount {
        let scratch = tempdir();
        let point = scratch.path().join("mnt");
        std::fs::create_dir(&point).expect("create mount point");
        sh(
            "mount",
            &["-t", "tmpfs", "-o", options, "tmpfs", path_str(&point)],
        );
        Mount {
            scratch,
            point,
            kind: "tmpfs",
            image: None,
        }
    }

    /// A fresh `kind` filesystem in a sparse image file of `mib` MiB, loop-mounted.
    pub fn image(kind: &'static str, mib: u64) -> Mount {
        Mount::image_in(tempdir(), kind, mib)
    }

    /// As [`image`](Mount::image), but where every user can reach it: under the system's
    /// temporary directory, with the scratch directory and the filesystem's root mode
    /// 0755 (the target directory may sit in a home directory others cannot enter).
    pub fn public_image(kind: &'static str, mib: u64) -> Mount {
        use std::os::unix::fs::PermissionsExt;
        let scratch = tempfile::Builder::new()
            .prefix("dirq-torture-")
            .tempdir_in(std::env::temp_dir())
            .expect("create a scratch directory");
        let public = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(scratch.path(), public.clone()).expect("chmod scratch");
        let mount = Mount::image_in(scratch, kind, mib);
        std::fs::set_permissions(mount.path(), public).expect("chmod the mount");
        mount
    }

    fn image_in(scratch: tempfile::TempDir, kind: &'static str, mib: u64) -> Mount {
        let point = scratch.path().join("mnt");
        std::fs::create_dir(&point).expect("create mount point");
        let image = scratch.path().join(format!("{kind}.img"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .expect("create image file");
        let mkfs = format!("mkfs.{kind}");
        let quiet = if kind == "ext4" { "-q" } else { "-f" };
        sh(&mkfs, &[quiet, path_str(&image)]);
        let mount = Mount {
            scratch,
            point,
            kind,
            image: Some(image),
        };
        mount.mount_image(mount.image_path());
        mount
    }

    pub fn path(&self) -> &Path {
        &self.point
    }

    /// The image file of a loop mount.
    pub fn image_path(&self) -> &Path {
        self.image.as_deref().expect("a loop-mounted image")
    }

    /// A path in the scratch directory beside the mount point (not on the mount).
    pub fn beside(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// Mounts `image` (this mount's own or a copy of it) at the mount point.
    pub fn mount_image(&self, image: &Path) {
        sh(
            "mount",
            &["-o", "loop", path_str(image), path_str(&self.point)],
        );
    }

    /// Unmounts, retrying while processes that were just killed still hold it.
    pub fn unmount(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("umount")
                .arg(&self.point)
                .stderr(Stdio::piped())
                .output()
                .expect("run umount");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "umount {} kept failing: {}",
                self.point.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `mount -o remount,<options>`.
    pub fn remount(&self, options: &str) {
        sh(
            "mount",
            &["-o", &format!("remount,{options}"), path_str(&self.point)],
        );
    }

    /// Whether the mount point currently has a filesystem mounted on it.
    pub fn is_mounted(&self) -> bool {
        let point = std::fs::canonicalize(&self.point).unwrap_or_else(|_| self.point.clone());
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(path_str(&point)))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.is_mounted() {
            let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        }
    }
}

/// Whether the kernel can mount `kind` (tmpfs, ext4, xfs, btrfs).
pub fn kernel_has(kind: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some(kind))
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("scratch paths are UTF-8")
}

/// This executable, to run a role in a child process: `role(&["stage", ...])`.
pub fn role(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("the torture executable"));
    command.arg("--role").args(args);
    command
}

/// The `dirq` binary built with this suite.
pub fn dirq() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dirq"));
    command.env_remove("DIRQ_LOG").stdin(Stdio::null());
    command
}

/// Runs `command` to completion, capturing its output.
pub fn output(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"))
}

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, condition: impl FnMut() -> bool) {
    if wait_for(timeout, condition).is_err() {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls `condition` until it holds, or fails after `timeout`. The pause between polls
/// is a polling interval, not a synchronisation.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Sends `signal` to process `pid`; a process that has already gone is not an error.
pub fn send(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a positive pid");
    match rustix::process::kill_process(pid, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => panic!("kill {pid:?}: {e}"),
    }
}

/// The state letter of process `pid` in `/proc` (`R`, `S`, `T`, `t`, `Z`, ...).
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces; the state follows the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Kills `child` with SIGKILL and reaps it.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process that is killed when dropped, so that a failing case leaves no
/// process behind.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(command: &mut Command) -> Proc {
        Proc(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("start {command:?}: {e}")),
        )
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the process to end and collects what is left of its output pipes.
    pub fn finish(&mut self) -> Output {
        use std::io::Read;
        let read = |pipe: Option<&mut dyn Read>| {
            let mut bytes = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        };
        let stdout = read(self.0.stdout.as_mut().map(|p| p as &mut dyn Read));
        let stderr = read(self.0.stderr.as_mut().map(|p| p as &mut dyn Read));
        let status = self.0.wait().expect("wait for a child");
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            kill(&mut self.0);
        }
    }
}

/// A small seeded random source (xorshift), printed so that a failure can be replayed
/// with `DIRQ_TORTURE_SEED`.
pub struct Rng(u64);

impl Rng {
    pub fn new(case: &str) -> Rng {
        let seed = std::env::var("DIRQ_TORTURE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos() as u64
            })
            | 1;
        println!("{case}: seed {seed} (replay with DIRQ_TORTURE_SEED={seed})");
        Rng(seed)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }
}

/// The resident set size of process `pid`, and its peak, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// This executable run as a role under `strace -qq STRACE_ARGS`; add the role's
/// arguments.
pub fn role_under_strace(strace_args: &[&str]) -> Command {
    let mut command = Command::new("strace");
    // cargo's library path only makes the loader's system calls many and variable.
    command
        .env_remove("LD_LIBRARY_PATH")
        .arg("-qq")
        .args(strace_args)
        .arg(std::env::current_exe().expect("the torture executable"))
        .arg("--role");
    command
}

/// The process that strace (pid `tracer`) started.
pub fn traced_child(tracer: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children"))
        .expect("read strace's children");
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("strace has a child")
}

/// Kills a process run under strace, then strace, and waits until both are gone.
pub fn kill_traced(tracer: &mut Proc) {
    let child = traced_child(tracer.id());
    send(child, rustix::process::Signal::KILL);
    kill(&mut tracer.0);
    wait_until(
        Duration::from_secs(10),
        "the traced process to end",
        || !matches!(process_state(child), Some(state) if state != 'Z'),
    );
}
