//! `dirq run` reloading its pipeline file on SIGHUP, and speaking systemd's
//! notification protocol, against the real binary.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirq::{DirectoryQueue, State};

use crate::util::{assert_stage_refused, cmdline, dirq, signal, skip, tempdir, wait_until};

/// Generous: both CPU cores may be busy with other tests.
const LONG: Duration = Duration::from_secs(60);

/// A `dirq run` under test, its standard error collected.
struct Supervisor {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Supervisor {
    /// Starts `dirq run dir/pipeline.toml` with `env` added to its environment.
    fn start(dir: &Path, env: &[(&str, &str)]) -> Supervisor {
        let mut command = dirq();
        command
            .arg("run")
            .arg(dir.join("pipeline.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for name in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "JOURNAL_STREAM",
        ] {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let reader = BufReader::new(child.stderr.take().unwrap());
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Supervisor { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    /// Sends SIGHUP and waits until the supervisor logged its `n`th reload attempt
    /// (applied or refused).
    fn reload(&self, n: usize) {
        self.signal("HUP");
        wait_until(LONG, "the supervisor to read the file again", || {
            let log = self.log();
            log.matches("pipeline reloaded").count() + log.matches("not reloaded").count() >= n
        });
    }

    /// The live `dirq exec` processes of stage `name` (children of the supervisor whose
    /// command line has `--name NAME`).
    fn stage_pids(&self, name: &str) -> Vec<u32> {
        let wanted = format!(" --name {name} ");
        let mut pids: Vec<u32> = children(self.pid())
            .into_iter()
            .filter(|&pid| cmdline(pid).contains(&wanted))
            .collect();
        pids.sort_unstable();
        pids
    }

    /// The one live process of stage `name`, once there is exactly one.
    fn wait_one(&self, name: &str) -> u32 {
        let mut found = Vec::new();
        wait_until(LONG, &format!("one process of stage {name}"), || {
            found = self.stage_pids(name);
            found.len() == 1
        });
        found[0]
    }

    /// SIGTERM, and the exit code.
    fn stop(&mut self) -> Option<i32> {
        self.signal("TERM");
        self.wait()
    }

    /// The exit code, once the supervisor exited and, when it stopped normally, its
    /// last line was read.
    fn wait(&mut self) -> Option<i32> {
        let code = self.child.wait().unwrap().code();
        if code == Some(0) {
            wait_until(LONG, "the supervisor's last log line", || {
                self.log().contains("pipeline stopped")
            });
        }
        code
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // A failed test must not leave a supervisor running; its stage processes get
        // the parent-death signal.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The live (not zombie) children of `parent`, from /proc.
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) S ppid ...": the fields after the last ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap_or("Z");
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            ppid == Some(parent) && !matches!(state, "Z" | "X")
        })
        .collect()
}

/// Whether process `pid` has exited (a zombie counts as gone).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Opens (creating) the queue `dir/spool/NAME`.
fn queue(dir: &Path, name: &str) -> DirectoryQueue {
    DirectoryQueue::open(dir.join("spool").join(name)).unwrap()
}

fn write_pipeline(dir: &Path, text: &str) {
    // Written beside and renamed: the supervisor must never read half a file.
    let tmp = dir.join("pipeline.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("pipeline.toml")).unwrap();
}

/// A `[[stage]]` table.
fn stage(name: &str, input: &str, output: Option<&str>, command: &str) -> String {
    let output = output.map_or(String::new(), |o| format!("output = \"spool/{o}\"\n"));
    format!(
        "[[stage]]\nname = \"{name}\"\ninput = \"spool/{input}\"\n{output}\
         command = {command}\ndrain_timeout = \"30s\"\n\n"
    )
}

/// How many times each message body is waiting in `queue`'s incoming/.
fn bodies(queue: &DirectoryQueue) -> BTreeMap<String, usize> {
    let mut found = BTreeMap::new();
    let dir: PathBuf = queue.path(State::Incoming).to_path_buf();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
        *found.entry(body).or_insert(0) += 1;
    }
    found
}

/// Each of `bodies` exactly once.
fn once(bodies: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    bodies.into_iter().map(|b| (b, 1)).collect()
}

fn enqueue(queue: &DirectoryQueue, prefix: &str, range: std::ops::Range<usize>) {
    for i in range {
        queue.enqueue(format!("{prefix} {i}")).unwrap();
    }
}

fn wait_count(queue: &DirectoryQueue, n: usize, what: &str) {
    wait_until(LONG, what, || queue.count(State::Incoming).unwrap() >= n);
}

/// Nothing claimed and nothing failed in `queue`.
fn assert_settled(queue: &DirectoryQueue, what: &str) {
    let counts = queue.counts().unwrap();
    assert_eq!(counts.pending, 0, "{what}: {counts:?}");
    assert_eq!(counts.errors, 0, "{what}: {counts:?}");
}

/// SIGHUP with stage A unchanged, B's command changed, C removed and D added: A keeps
/// its process, B's is replaced by one running the new command, C's exits, D's starts,
/// and every message ends up exactly once where the stages in force put it.
#[test]
fn sighup_keeps_unchanged_stages_and_restarts_changed_ones() {
    let dir = tempdir();
    let d = dir.path();
    let [a, a_out, b, b_out, c, c_out, d_in, d_out] =
        ["a", "a_out", "b", "b_out", "c", "c_out", "d", "d_out"].map(|n| queue(d, n));
    write_pipeline(
        d,
        &(stage("A", "a", Some("a_out"), "[\"cat\"]")
            + &stage("B", "b", Some("b_out"), "[\"cat\"]")
            + &stage("C", "c", Some("c_out"), "[\"cat\"]")),
    );
    let mut supervisor = Supervisor::start(d, &[]);
    let (pid_a, pid_b, pid_c) = (
        supervisor.wait_one("A"),
        supervisor.wait_one("B"),
        supervisor.wait_one("C"),
    );
    for (input, output) in [(&a, &a_out), (&b, &b_out), (&c, &c_out)] {
        enqueue(input, "before", 0..5);
        wait_count(output, 5, "the first messages through every stage");
    }

    write_pipeline(
        d,
        &(stage("A", "a", Some("a_out"), "[\"cat\"]")
            + &stage("B", "b", Some("b_out"), "[\"tr\", \"a-z\", \"A-Z\"]")
            + &stage("D", "d", Some("d_out"), "[\"cat\"]")),
    );
    supervisor.reload(1);
    let log = supervisor.log();
    assert!(
        log.contains("pipeline reloaded: kept A; restarted B; removed C; added D"),
        "{log}"
    );
    wait_until(LONG, "B's new process, C gone and D started", || {
        let b_now = supervisor.stage_pids("B");
        b_now.len() == 1
            && b_now[0] != pid_b
            && cmdline(b_now[0]).contains("-- tr a-z A-Z")
            && gone(pid_b)
            && gone(pid_c)
            && supervisor.stage_pids("C").is_empty()
            && supervisor.stage_pids("D").len() == 1
    });
    assert_eq!(supervisor.stage_pids("A"), [pid_a], "A was restarted");
    assert!(!gone(pid_a));

    for queue in [&a, &b, &c, &d_in] {
        enqueue(queue, "after", 0..5);
    }
    wait_count(&a_out, 10, "A's messages");
    wait_count(&b_out, 10, "B's messages");
    wait_count(&d_out, 5, "D's messages");
    let before = || (0..5).map(|i| format!("before {i}"));
    let after = || (0..5).map(|i| format!("after {i}"));
    assert_eq!(bodies(&a_out), once(before().chain(after())));
    assert_eq!(
        bodies(&b_out),
        once(before().chain(after().map(|s| s.to_uppercase())))
    );
    assert_eq!(bodies(&c_out), once(before()), "C ran after its removal");
    assert_eq!(bodies(&c), once(after()), "C's input after its removal");
    assert_eq!(bodies(&d_out), once(after()));
    assert_eq!(supervisor.stage_pids("A"), [pid_a], "A was restarted");
    assert_eq!(supervisor.stop(), Some(0), "dirq run after SIGTERM");
    for (queue, what) in [(&a, "a"), (&b, "b"), (&c, "c"), (&d_in, "d")] {
        assert_settled(queue, what);
    }
    for queue in [&a, &b, &d_in] {
        assert_eq!(queue.count(State::Incoming).unwrap(), 0);
    }
}

/// A file that does not parse, and then one whose input queue does not exist: each
/// SIGHUP logs an error naming the file, and the pipeline runs on as it was.
#[test]
fn sighup_with_a_bad_file_changes_nothing() {
    let dir = tempdir();
    let d = dir.path();
    let (input, output) = (queue(d, "in"), queue(d, "out"));
    let good = stage("A", "in", Some("out"), "[\"cat\"]");
    write_pipeline(d, &good);
    let mut supervisor = Supervisor::start(d, &[]);
    let pid = supervisor.wait_one("A");
    let file = d.join("pipeline.toml");

    write_pipeline(d, &format!("{good}bogus_key = 1\n"));
    supervisor.reload(1);
    write_pipeline(
        d,
        &(good.clone() + &stage("B", "missing", None, "[\"cat\"]")),
    );
    supervisor.reload(2);
    let log = supervisor.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("not reloaded"))
        .collect();
    assert_eq!(errors.len(), 2, "{log}");
    assert!(
        errors
            .iter()
            .all(|l| l.contains(&file.display().to_string())),
        "{log}"
    );
    assert!(errors[0].contains("bogus_key"), "{log}");
    assert!(errors[1].contains("stage \"B\": input queue"), "{log}");
    assert!(!log.contains("pipeline reloaded"), "{log}");

    enqueue(&input, "m", 0..5);
    wait_count(&output, 5, "messages through the stage");
    assert_eq!(supervisor.stage_pids("A"), [pid], "A was restarted");
    assert!(supervisor.stage_pids("B").is_empty());
    assert_eq!(supervisor.stop(), Some(0), "dirq run after SIGTERM");
    assert_settled(&input, "in");
}

/// A changed stage drains while its slow commands are running: every message they
/// held arrives once, none is left pending, and its old process got one SIGTERM only
/// (a second one would abandon running commands).
#[test]
fn sighup_drains_a_changed_stage_without_losing_in_flight_messages() {
    let dir = tempdir();
    let d = dir.path();
    let (input, output) = (queue(d, "in"), queue(d, "out"));
    let slow = |pause: &str| {
        format!(
            "[[stage]]\nname = \"S\"\ninput = \"spool/in\"\noutput = \"spool/out\"\n\
             command = \"sleep {pause}; cat\"\nworkers = 3\ndrain_timeout = \"60s\"\n"
        )
    };
    write_pipeline(d, &slow("0.3"));
    enqueue(&input, "m", 0..24);
    let supervisor = Supervisor::start(d, &[]);
    let old = supervisor.wait_one("S");
    wait_count(&output, 3, "some messages through the slow stage");
    assert!(
        output.count(State::Incoming).unwrap() < 24,
        "too late to reload"
    );
    write_pipeline(d, &slow("0.2"));
    supervisor.reload(1);
    wait_until(LONG, "the new process", || {
        let pids = supervisor.stage_pids("S");
        pids.len() == 1 && pids[0] != old && cmdline(pids[0]).contains("sleep 0.2")
    });
    wait_count(&output, 24, "every message through");
    assert_eq!(bodies(&output), once((0..24).map(|i| format!("m {i}"))));
    let mut supervisor = supervisor;
    assert_eq!(supervisor.stop(), Some(0));
    let log = supervisor.log();
    assert!(
        !log.contains("stopping now"),
        "a stage got two SIGTERMs: {log}"
    );
    assert!(gone(old));
    assert_settled(&input, "in");
    assert_eq!(input.count(State::Incoming).unwrap(), 0);
}

/// A reload while a changed stage is still draining applies the newest file (the
/// in-between version never runs), and a SIGHUP after SIGTERM is ignored: the stop
/// goes on and the held message is finished, not lost.
#[test]
fn second_sighup_while_draining_applies_the_newest_file() {
    let dir = tempdir();
    let d = dir.path();
    let (input, output) = (queue(d, "in"), queue(d, "out"));
    // The command waits for the file `gate` in the pipeline's directory: a message
    // stays in flight for as long as the test needs.
    let gated = |filter: &str| {
        format!(
            "[[stage]]\nname = \"S\"\ninput = \"spool/in\"\noutput = \"spool/out\"\n\
             command = \"while [ ! -e gate ]; do sleep 0.02; done; {filter}\"\n\
             drain_timeout = \"60s\"\n"
        )
    };
    let gate = d.join("gate");
    write_pipeline(d, &gated("cat"));
    let supervisor = Supervisor::start(d, &[]);
    let old = supervisor.wait_one("S");
    input.enqueue("held 0").unwrap();
    wait_until(LONG, "the message to be claimed", || {
        input.count(State::Pending).unwrap() == 1
    });

    write_pipeline(d, &gated("tr a-z b-za"));
    supervisor.reload(1);
    write_pipeline(d, &gated("tr a-z A-Z"));
    supervisor.reload(2);
    let log = supervisor.log();
    assert_eq!(log.matches("restarted S").count(), 2, "{log}");
    assert_eq!(
        supervisor.stage_pids("S"),
        [old],
        "the old process still drains"
    );
    std::fs::write(&gate, "").unwrap();
    wait_until(LONG, "the newest version to run", || {
        let pids = supervisor.stage_pids("S");
        pids.len() == 1 && pids[0] != old && cmdline(pids[0]).contains("tr a-z A-Z")
    });
    assert!(gone(old));

    enqueue(&input, "after", 0..3);
    wait_count(&output, 4, "the messages through the newest version");

    // Held again, then SIGTERM and SIGHUP: the reload is ignored, the stop drains.
    std::fs::remove_file(&gate).unwrap();
    input.enqueue("held 1").unwrap();
    wait_until(LONG, "the message to be claimed", || {
        input.count(State::Pending).unwrap() == 1
    });
    let new = supervisor.wait_one("S");
    supervisor.signal("TERM");
    wait_until(LONG, "the stop to begin", || {
        supervisor.log().contains("stopping the pipeline")
    });
    supervisor.signal("HUP");
    wait_until(LONG, "the SIGHUP to be ignored", || {
        supervisor.log().contains("SIGHUP ignored")
    });
    assert!(!gone(new), "the stage stopped without draining");
    std::fs::write(&gate, "").unwrap();
    let mut supervisor = supervisor;
    assert_eq!(supervisor.wait(), Some(0), "{}", supervisor.log());
    let log = supervisor.log();
    assert!(
        !log.contains("stopping now"),
        "a stage got two SIGTERMs: {log}"
    );
    // The version in between never ran: one start at first, one after the drain.
    assert_eq!(log.matches("stage worker started").count(), 2, "{log}");
    assert_eq!(log.matches("pipeline reloaded").count(), 2, "{log}");
    let mut want = once((0..3).map(|i| format!("AFTER {i}")));
    want.extend(once(["held 0".to_owned(), "HELD 1".to_owned()]));
    assert_eq!(bodies(&output), want);
    assert_settled(&input, "in");
    assert_eq!(input.count(State::Incoming).unwrap(), 0);
}

/// A reload matches stages by name, so two stages of one name are refused at start.
#[test]
fn two_stages_of_one_name_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    queue(d, "in");
    let x = stage("x", "in", None, "[\"cat\"]");
    write_pipeline(d, &(x.clone() + &x));
    let file = d.join("pipeline.toml");
    let file = file.to_str().unwrap();
    assert_stage_refused(&["run", "--check", file], "name", "the name is used twice");
    assert_stage_refused(&["run", file], "name", "the name is used twice");
}

/// Collects what `dirq run` sends to a notification socket, with a deadline per
/// expected message.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind(address: &std::os::unix::net::SocketAddr) -> NotifySocket {
        let socket = std::os::unix::net::UnixDatagram::bind_addr(address).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            socket,
            received: Vec::new(),
        }
    }

    /// Reads datagrams until one satisfies `wanted`; returns it. Earlier ones are kept
    /// in `received`.
    fn until(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LONG;
        let mut buf = vec![0; 4096];
        loop {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received {:?}",
                self.received
            );
            let Ok(n) = self.socket.recv(&mut buf) else {
                continue;
            };
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.received.push(message.clone());
            if wanted(&message) {
                return message;
            }
        }
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// The notification protocol end to end: READY=1 once the stages run, WATCHDOG=1 every
/// half WATCHDOG_USEC, RELOADING=1 then READY=1 around a SIGHUP, STOPPING=1 at stop;
/// the stage processes do not inherit NOTIFY_SOCKET.
fn notifies_the_service_manager(address: &std::os::unix::net::SocketAddr, env_value: &str) {
    let dir = tempdir();
    let d = dir.path();
    let (_input, _output) = (queue(d, "in"), queue(d, "out"));
    write_pipeline(d, &stage("A", "in", Some("out"), "[\"cat\"]"));
    let mut socket = NotifySocket::bind(address);
    let mut supervisor = Supervisor::start(
        d,
        &[("NOTIFY_SOCKET", env_value), ("WATCHDOG_USEC", "300000")],
    );
    let ready = socket.until("READY=1", |m| has_line(m, "READY=1"));
    assert!(
        has_line(&ready, &format!("MAINPID={}", supervisor.pid())),
        "{ready:?}"
    );
    assert!(
        ready.contains("STATUS=running 1 stages, 1 processes"),
        "{ready:?}"
    );
    assert_eq!(
        supervisor.stage_pids("A").len(),
        1,
        "READY=1 before the stage ran"
    );
    let stage_pid = supervisor.stage_pids("A")[0];
    let environ = std::fs::read(format!("/proc/{stage_pid}/environ")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET="),
        "a stage process inherited NOTIFY_SOCKET"
    );
    for n in 1..=2 {
        socket.until(&format!("WATCHDOG=1 #{n} after READY=1"), |m| {
            has_line(m, "WATCHDOG=1")
        });
    }

    write_pipeline(
        d,
        &stage("A", "in", Some("out"), "[\"tr\", \"a-z\", \"A-Z\"]"),
    );
    supervisor.signal("HUP");
    let reloading = socket.until("RELOADING=1", |m| has_line(m, "RELOADING=1"));
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(usec > 0);
    socket.until("READY=1 after the reload", |m| has_line(m, "READY=1"));
    let pids = supervisor.stage_pids("A");
    assert!(
        pids.len() == 1 && cmdline(pids[0]).contains("tr a-z A-Z"),
        "READY=1 before the reload was applied: {pids:?}"
    );

    supervisor.signal("TERM");
    socket.until("STOPPING=1", |m| has_line(m, "STOPPING=1"));
    assert_eq!(supervisor.stop(), Some(0));
}

#[cfg(target_os = "linux")]
#[test]
fn run_notifies_systemd_over_a_socket_path() {
    let dir = tempdir();
    let path = dir.path().join("notify.sock");
    let address = std::os::unix::net::SocketAddr::from_pathname(&path).unwrap();
    notifies_the_service_manager(&address, path.to_str().unwrap());
}

#[cfg(target_os = "linux")]
#[test]
fn run_notifies_systemd_over_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("dirq-test-{}-{nanos}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    notifies_the_service_manager(&address, &format!("@{name}"));
}

/// Under systemd (JOURNAL_STREAM naming standard error), log lines carry neither
/// colours nor a timestamp: the journal adds its own.
#[cfg(unix)]
#[test]
fn logs_for_the_journal_have_no_timestamp() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    let d = dir.path();
    let (input, _output) = (queue(d, "in"), queue(d, "out"));
    let log_path = d.join("stderr");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let journal = format!("{}:{}", meta.dev(), meta.ino());
    let out = dirq()
        .args(["exec", "--drain"])
        .arg(input.root())
        .args(["--", "cat"])
        .env("JOURNAL_STREAM", &journal)
        .stdin(Stdio::null())
        .stderr(log)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!text.is_empty());
    assert!(!text.contains('\x1b'), "colours: {text:?}");
    let started = text
        .lines()
        .find(|l| l.contains("piper started"))
        .unwrap_or_else(|| panic!("no start line: {text}"));
    assert!(started.trim_start().starts_with("INFO "), "{started:?}");
}

/// The example unit passes `systemd-analyze verify`, with this build's binary and a
/// real pipeline file in it.
#[test]
fn the_example_unit_file_verifies() {
    let test = "the_example_unit_file_verifies";
    let Ok(analyze) = which("systemd-analyze") else {
        skip(
            test,
            "systemd-analyze is not installed (Debian package systemd)",
        );
        return;
    };
    let dir = tempdir();
    let d = dir.path();
    queue(d, "in");
    write_pipeline(d, &stage("A", "in", None, "[\"cat\"]"));
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/systemd/dirq-pipeline.service"),
    )
    .unwrap();
    let pipeline = d.join("pipeline.toml");
    let mut text = String::new();
    for line in unit.lines() {
        // The test host has no dirq user or group, which a verify may look up
        // (systemd 252's does not): the lines are left out rather than replaced by
        // root, which the unit must never suggest.
        if line.starts_with("User=") || line.starts_with("Group=") {
            continue;
        }
        if line.starts_with("ExecStart=") {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 3, "ExecStart=dirq run FILE: {line}");
            text.push_str(&format!(
                "ExecStart={} run {}\n",
                env!("CARGO_BIN_EXE_dirq"),
                pipeline.display()
            ));
            continue;
        }
        if line.starts_with("ReadWritePaths=") {
            text.push_str(&format!("ReadWritePaths={}\n", d.display()));
            continue;
        }
        text.push_str(line);
        text.push('\n');
    }
    assert!(text.contains("ExecStart=/"), "no ExecStart= in the unit");
    let path = d.join("dirq-pipeline.service");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Other units of the host may be reported; not ours.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("dirq-pipeline"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify: {stderr}");
}

fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}
