//! A stage that runs a command once per message: the "queue batch" wrapper of job
//! schedulers, and what `dirq exec` runs.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::cancel::{Cancellation, CANCELLED_REASON};
use super::stage::{Emit, Failed, Outcome, Stage, StageResult};
use crate::error::{Error, Result};
use crate::format::meta::{rfc3339, FailureDetails};
use crate::{sys, Message};

/// Exit status that asks for a retry (`EX_TEMPFAIL` of `sysexits.h`).
pub const EX_TEMPFAIL: i32 = 75;

/// How often a running command's stage looks whether its message was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// How much of a failed command's standard error is kept in the sidecar.
const STDERR_TAIL_BYTES: usize = 4096;

/// Runs a command for each message.
///
/// - The message bytes are the command's standard input; `DIRQ_ID`, `DIRQ_QUEUE` (the
///   root of the message's queue), `DIRQ_ATTEMPT` and `DIRQ_PATH` are in its
///   environment. It runs in a process group of its own.
/// - Exit 0 commits the message; with [`forward`](CommandStageBuilder::forward), it
///   passes on the command's standard output as a new message (same id), or the
///   original message when the output is empty.
/// - Exit 75 (`EX_TEMPFAIL`) retries it with backoff.
/// - **Routing.** An exit code given a [route](CommandStageBuilder::route_exit) passes
///   the message on to that one named output (its standard output as a new message,
///   or the original when the output is empty). With
///   [`route_by_line`](CommandStageBuilder::route_by_line), a first line of standard
///   output `dirq-route: NAME` does the same for any routable exit (0 or a routed
///   code), and is not part of the message passed on. A name that is not an output of
///   the Piper fails the message, with a reason naming it.
/// - Any other exit, or death by a signal, fails it, with the exit code and the end of
///   the command's standard error in the sidecar.
/// - A command that cannot be started is a configuration error:
///   [`build`](CommandStageBuilder::build) refuses a program it cannot find or
///   execute, and when starting it fails later (the program was removed), the message
///   goes back to `incoming/` and the Piper stops ([`Outcome::Stop`]), its `run`
///   returning an error that names the command.
/// - A command that runs longer than the [timeout](CommandStageBuilder::timeout) gets
///   SIGTERM for its whole process group, then SIGKILL after a grace period, and the
///   message fails with reason `timeout` ([`Outcome::TimedOut`], counted in
///   [`PiperStats::timeouts`](super::PiperStats::timeouts)).
///
/// Standard error is passed through to the Piper's standard error as well. With
/// `forward` or any routing, standard output is collected in memory; without, it is
/// passed through. With [`log_output`](CommandStageBuilder::log_output), what is passed
/// through is also kept in a job log per message, beside the queue's history.
///
/// ```
/// use std::time::{Duration, Instant};
/// use dirq::DirectoryQueue;
/// use dirq::piper::{CommandStage, Piper};
///
/// let dir = tempfile::tempdir().expect("a temporary directory");
/// let input = DirectoryQueue::open(dir.path().join("input"))?;
/// let upper = DirectoryQueue::open(dir.path().join("upper"))?;
/// input.enqueue(b"hello")?;
///
/// let stage = CommandStage::builder("tr", ["a-z", "A-Z"])
///     .forward(true)
///     .timeout(Duration::from_secs(30))
///     .build()?;
/// let piper = Piper::builder("upper")
///     .input(&input)
///     .output("next", &upper)
///     .stage(stage)
///     .build()?;
/// let handle = piper.handle();
/// let runner = std::thread::spawn(move || piper.run());
/// while upper.counts()?.incoming == 0 {
///     std::thread::sleep(Duration::from_millis(10));
/// }
/// handle.shutdown();
/// runner.join().expect("the piper thread")?;
/// let message = upper.try_claim()?.expect("the command's output");
/// assert_eq!(message.bytes()?, b"HELLO");
/// # Ok::<(), dirq::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CommandStage {
    /// The settings, checked by [`CommandStageBuilder::build`].
    settings: CommandStageBuilder,
    /// Process groups of commands running now, for [`CommandStage::kill_running`].
    running: Arc<Mutex<HashSet<u32>>>,
}

/// Configures a [`CommandStage`]; see [`CommandStage::builder`].
#[derive(Debug, Clone)]
pub struct CommandStageBuilder {
    program: OsString,
    args: Vec<OsString>,
    forward: bool,
    timeout: Option<Duration>,
    kill_grace: Duration,
    on_fail: Option<OsString>,
    /// Exit code → the one output it routes to.
    routes: BTreeMap<i32, String>,
    route_by_line: bool,
    log_output: bool,
    log_limit: u64,
}

/// The first line of standard output that names an output; see
/// [`CommandStageBuilder::route_by_line`].
pub const ROUTE_LINE_PREFIX: &str = "dirq-route: ";

impl CommandStage {
    /// Starts configuring a stage that runs `program` with `args` for each message.
    pub fn builder<I, A>(program: impl Into<OsString>, args: I) -> CommandStageBuilder
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        CommandStageBuilder {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            forward: false,
            timeout: None,
            kill_grace: Duration::from_secs(5),
            on_fail: None,
            routes: BTreeMap::new(),
            route_by_line: false,
            log_output: false,
            log_limit: CommandStageBuilder::DEFAULT_LOG_LIMIT,
        }
    }

    /// Kills (SIGKILL) the process groups of all commands still running: for a Piper
    /// stopped by force, whose stage threads are abandoned.
    pub fn kill_running(&self) {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        for &group in running.iter() {
            sys::signal_group(group, sys::GroupSignal::Kill);
        }
    }

    fn spawn(&self, message: &Message, attempt: u32) -> std::io::Result<Child> {
        let mut command = Command::new(&self.settings.program);
        command
            .args(&self.settings.args)
            .env("DIRQ_ID", message.id().as_os_str())
            .env("DIRQ_QUEUE", message.queue().root())
            .env("DIRQ_ATTEMPT", attempt.to_string())
            .env("DIRQ_PATH", message.path())
            .stdin(Stdio::piped())
            .stdout(
                if self.settings.captures_output() || self.settings.log_output {
                    Stdio::piped()
                } else {
                    Stdio::inherit()
                },
            )
            .stderr(Stdio::piped());
        sys::new_process_group(&mut command);
        command.spawn()
    }

    /// Runs the command on `message`: its exit status (or `None` when it timed out),
    /// its standard output (when [captured](CommandStageBuilder::captures_output)) and
    /// the end of its standard error.
    fn run(
        &self,
        message: &Message,
        attempt: u32,
        cancel: &Cancellation,
        log: Option<&Mutex<Capture>>,
    ) -> Result<(Ended, Vec<u8>, String), super::StageError> {
        let mut child = match self.spawn(message, attempt) {
            Ok(child) => child,
            Err(e) => {
                return Err(Unstartable(format!(
                    "cannot start command {:?}: {e}",
                    self.settings.program
                ))
                .into())
            }
        };
        let group = child.id();
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(group);
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let result = std::thread::scope(|scope| {
            // Feed the message; a command that does not read it all closes the pipe,
            // which is not an error.
            scope.spawn(move || {
                if let Some(mut stdin) = stdin {
                    let _ = std::io::copy(&mut message.reader(), &mut stdin);
                }
            });
            let captures = self.settings.captures_output();
            let out = scope.spawn(move || {
                let mut bytes = Vec::new();
                match stdout {
                    // Passed on as a message: not part of the log.
                    Some(mut stdout) if captures => {
                        let _ = stdout.read_to_end(&mut bytes);
                    }
                    // Piped only for the log: passed through as well.
                    Some(stdout) => tee(stdout, &mut std::io::stdout(), log),
                    None => {}
                }
                bytes
            });
            let err = scope.spawn(move || stderr.map(|e| tee_tail(e, log)).unwrap_or_default());
            let status = self.wait(&mut child, group, cancel);
            let out = out.join().unwrap_or_default();
            let err = err.join().unwrap_or_default();
            (status, out, err)
        });
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&group);
        let (status, out, err) = result;
        Ok((status?, out, err))
    }

    /// Waits for the command, killing its process group at the timeout or when the
    /// message is cancelled.
    fn wait(&self, child: &mut Child, group: u32, cancel: &Cancellation) -> std::io::Result<Ended> {
        let deadline = self
            .settings
            .timeout
            .and_then(|t| Instant::now().checked_add(t));
        let ended = loop {
            if cancel.is_cancelled() {
                break Ended::Cancelled;
            }
            // Short waits, to notice a cancel within CANCEL_POLL.
            let now = Instant::now();
            let slice = match deadline {
                Some(deadline) if deadline <= now => break Ended::TimedOut,
                Some(deadline) => (deadline - now).min(CANCEL_POLL),
                None => CANCEL_POLL,
            };
            if let Some(status) = wait_timeout(child, slice)? {
                return Ok(Ended::Exited(status));
            }
        };
        sys::signal_group(group, sys::GroupSignal::Terminate);
        if wait_timeout(child, self.settings.kill_grace)?.is_none() {
            sys::signal_group(group, sys::GroupSignal::Kill);
            child.wait()?;
        }
        // Whatever else is left of the group (a child that ignored SIGTERM) goes too.
        sys::signal_group(group, sys::GroupSignal::Kill);
        Ok(ended)
    }

    /// Runs the on-fail hook, if there is one, for a message that went to `errors/`.
    fn alert(&self, failed: &Failed) {
        let Some(hook) = &self.settings.on_fail else {
            return;
        };
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(hook)
            .env("DIRQ_REASON", &failed.reason)
            .env("DIRQ_ID", failed.id.as_os_str())
            .env("DIRQ_QUEUE", &failed.queue)
            .env("DIRQ_ATTEMPT", failed.attempt.to_string())
            .env(
                "DIRQ_DEAD_LETTER",
                if failed.dead_letter { "1" } else { "0" },
            )
            .stdin(Stdio::null());
        match failed.exit_code {
            Some(code) => command.env("DIRQ_EXIT_CODE", code.to_string()),
            None => command.env_remove("DIRQ_EXIT_CODE"),
        };
        match command.status() {
            Ok(status) if status.success() => {}
            Ok(status) => tracing::warn!(id = %failed.id, %status, "the on-fail hook failed"),
            Err(e) => tracing::warn!(id = %failed.id, error = %e, "cannot run the on-fail hook"),
        }
    }
}

impl CommandStageBuilder {
    /// Whether a successful command passes its output (or the message) on. Default:
    /// `false` (the message is committed).
    pub fn forward(&mut self, forward: bool) -> &mut Self {
        self.forward = forward;
        self
    }

    /// Longest a command may run; more than zero. Default: no limit (see
    /// [`no_timeout`](Self::no_timeout)).
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = Some(timeout);
        self
    }

    /// No limit on a command's run time: undoes [`timeout`](Self::timeout). The
    /// default.
    pub fn no_timeout(&mut self) -> &mut Self {
        self.timeout = None;
        self
    }

    /// How long a timed-out command has between SIGTERM and SIGKILL; zero sends
    /// SIGKILL at once. Default: 5 s.
    pub fn kill_grace(&mut self, grace: Duration) -> &mut Self {
        self.kill_grace = grace;
        self
    }

    /// A shell command (`sh -c`) run for alerting whenever a message goes to
    /// `errors/` (see [`Stage::on_failed`]): a failed command, a dead letter after the
    /// last retry, a timeout. Its environment has `DIRQ_REASON`, `DIRQ_ID`,
    /// `DIRQ_QUEUE`, `DIRQ_ATTEMPT`, `DIRQ_DEAD_LETTER` (`1` or `0`) and
    /// `DIRQ_EXIT_CODE` (when the command exited); not empty. It runs on the worker,
    /// which waits for it. Default: none.
    pub fn on_fail(&mut self, hook: impl Into<OsString>) -> &mut Self {
        self.on_fail = Some(hook.into());
        self
    }

    /// Routes exit `code` to the Piper output named `output`: the message is passed on
    /// to that output only (the command's standard output as a new message under the
    /// same id, or the original when the output is empty), whether or not
    /// [`forward`](Self::forward) is set. A second route for the same code replaces the
    /// first. `code` 0 routes successes; 75 (`EX_TEMPFAIL`) cannot be routed, it
    /// retries. Default: no routes (exit 0 passes on to every output with `forward`,
    /// other codes fail).
    pub fn route_exit(&mut self, code: i32, output: impl Into<String>) -> &mut Self {
        self.routes.insert(code, output.into());
        self
    }

    /// Whether the command may choose the output by printing, as the first line of its
    /// standard output, `dirq-route: NAME` ([`ROUTE_LINE_PREFIX`] then an output's
    /// name). The line is taken off; the rest of the output is the message passed on to
    /// `NAME` only (the original, when nothing else was printed). It applies to exit 0
    /// and to [routed](Self::route_exit) exit codes, and wins over the code's route; an
    /// output without such a line is handled as if this were off. Default: `false`.
    pub fn route_by_line(&mut self, enabled: bool) -> &mut Self {
        self.route_by_line = enabled;
        self
    }

    /// The default [`log_limit`](Self::log_limit): 1 MiB.
    pub const DEFAULT_LOG_LIMIT: u64 = 1 << 20;

    /// Whether each command's standard error, and its standard output when it is not
    /// passed on as a message, are kept in a job log per message,
    /// `<queue>/history/logs/<id>.log`: each attempt appended after a header line
    /// (attempt, time, pid, command) and followed by a line saying how it ended. Both
    /// streams are still passed through to the Piper's own. Read it with
    /// [`admin::job_log`](crate::admin::job_log) or `dirq log`. Logs are removed with
    /// the history files they are older than (see
    /// [`PiperBuilder::history_keep`](super::PiperBuilder::history_keep)). Not synced.
    /// Default: `false`.
    pub fn log_output(&mut self, enabled: bool) -> &mut Self {
        self.log_output = enabled;
        self
    }

    /// The most bytes a message's job log holds, all attempts together; at least 1024.
    /// Past it the log keeps its head and its tail, with a line saying how many bytes
    /// were left out between them. Default: 1 MiB.
    pub fn log_limit(&mut self, bytes: u64) -> &mut Self {
        self.log_limit = bytes;
        self
    }

    /// Whether the command's standard output is collected (to be passed on) rather than
    /// passed through.
    fn captures_output(&self) -> bool {
        self.forward || self.route_by_line || !self.routes.is_empty()
    }

    /// Checks the settings and makes the stage.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the program is empty or cannot be executed (a path
    /// that is not an executable file, or a bare name not found in `PATH`, looked up
    /// as `execvp` does), the timeout is zero, the log limit is below 1024 bytes, the
    /// on-fail hook is empty, or a route is
    /// for exit 75 or a code outside 0 to 255, or names an empty output.
    pub fn build(&self) -> Result<CommandStage> {
        let target = format!("command stage {:?}", self.program);
        let bad = |field: &'static str, reason: &str| Err(Error::config(&target, field, reason));
        if self.program.is_empty() {
            return bad("program", "must not be empty");
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return bad("timeout", "must be more than zero");
        }
        if self.log_limit < 1024 {
            return bad("log_limit", "must be at least 1024 bytes");
        }
        if self.on_fail.as_ref().is_some_and(|hook| hook.is_empty()) {
            return bad("on_fail", "must not be empty");
        }
        for (&code, output) in &self.routes {
            if code == EX_TEMPFAIL {
                return bad(
                    "route_exit",
                    "exit 75 (EX_TEMPFAIL) retries; it cannot be routed",
                );
            }
            if !(0..=255).contains(&code) {
                return bad(
                    "route_exit",
                    &format!("exit code {code} is not from 0 to 255"),
                );
            }
            if output.is_empty() {
                return bad(
                    "route_exit",
                    &format!("exit {code} routes to an empty name"),
                );
            }
        }
        if let Err(reason) = find_program(&self.program) {
            return bad("program", &reason);
        }
        Ok(CommandStage {
            settings: self.clone(),
            running: Arc::default(),
        })
    }
}

impl Stage for CommandStage {
    /// Runs the [`on_fail`](CommandStageBuilder::on_fail) hook.
    fn on_failed(&mut self, failed: &Failed) {
        self.alert(failed);
    }

    fn process(&mut self, message: &Message) -> StageResult {
        self.process_cancellable(message, &Cancellation::default())
    }

    /// Runs the command; a cancel kills its process group as the timeout does
    /// (SIGTERM, then SIGKILL after the [kill grace](CommandStageBuilder::kill_grace)),
    /// and only this message's group.
    fn process_cancellable(&mut self, message: &Message, cancel: &Cancellation) -> StageResult {
        let attempt = message.attempts()?;
        let log = self.settings.log_output.then(|| {
            Mutex::new(Capture::new(
                usize::try_from(self.settings.log_limit).unwrap_or(usize::MAX),
            ))
        });
        let started = Instant::now();
        let ran = self.run(message, attempt, cancel, log.as_ref());
        if let Some(log) = log {
            let log = log.into_inner().unwrap_or_else(PoisonError::into_inner);
            self.write_log(message, attempt, started, log, &ran);
        }
        let (ended, stdout, stderr_tail) = match ran {
            Ok(ran) => ran,
            // The command cannot be started at all (it was removed or lost its
            // execute permission since build): failing the message would fail every
            // message the same way, so it goes back and the Piper stops.
            Err(e) => match e.downcast::<Unstartable>() {
                Ok(unstartable) => return Ok(Outcome::Stop(unstartable.0)),
                Err(e) => return Err(e),
            },
        };
        let status = match ended {
            Ended::Exited(status) => status,
            Ended::TimedOut => {
                let details = FailureDetails {
                    exit_code: None,
                    stderr: (!stderr_tail.is_empty()).then_some(stderr_tail),
                };
                return Ok(Outcome::TimedOut(details));
            }
            Ended::Cancelled => {
                // Not carried out (the Piper fails or requeues a cancelled message
                // itself), but its details go into the sidecar.
                let details = FailureDetails {
                    exit_code: None,
                    stderr: (!stderr_tail.is_empty()).then_some(stderr_tail),
                };
                return Ok(Outcome::FailWith(CANCELLED_REASON.to_owned(), details));
            }
        };
        let (reason, exit_code) = match (status.code(), sys::killed_by(&status)) {
            (Some(code), _) if code == 0 || self.settings.routes.contains_key(&code) => {
                return Ok(self.pass_on(code, stdout));
            }
            (Some(EX_TEMPFAIL), _) => {
                return Ok(Outcome::Retry(format!(
                    "exit {EX_TEMPFAIL} (temporary failure){}",
                    suffix(&stderr_tail)
                )));
            }
            (Some(code), _) => (format!("exit {code}"), Some(code)),
            (None, Some(signal)) => (format!("killed by signal {signal}"), None),
            (None, None) => ("ended abnormally".to_owned(), None),
        };
        let details = FailureDetails {
            exit_code,
            stderr: (!stderr_tail.is_empty()).then_some(stderr_tail),
        };
        Ok(Outcome::FailWith(reason, details))
    }
}

impl CommandStage {
    /// Appends this attempt's output to the message's job log: a header line, what the
    /// command wrote, and a line saying how it ended.
    fn write_log(
        &self,
        message: &Message,
        attempt: u32,
        started: Instant,
        log: Capture,
        ran: &Result<(Ended, Vec<u8>, String), super::StageError>,
    ) {
        let settings = &self.settings;
        let command = std::iter::once(&settings.program)
            .chain(&settings.args)
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let mut text = format!(
            "=== dirq: attempt {attempt} of {} at {}, pid {}: {command}\n",
            message.id(),
            rfc3339(std::time::SystemTime::now() - started.elapsed()),
            sys::pid(),
        )
        .into_bytes();
        let output = log.into_bytes();
        text.extend_from_slice(&output);
        if !output.is_empty() && output.last() != Some(&b'\n') {
            text.push(b'\n');
        }
        let ended = match ran {
            Ok((Ended::TimedOut, ..)) => "timed out".to_owned(),
            Ok((Ended::Cancelled, ..)) => "cancelled".to_owned(),
            Ok((Ended::Exited(status), ..)) => match (status.code(), sys::killed_by(status)) {
                (Some(code), _) => format!("exit {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => "ended abnormally".to_owned(),
            },
            Err(e) => format!("not run: {e}"),
        };
        text.extend_from_slice(
            format!(
                "=== dirq: {ended} after {} ms\n",
                started.elapsed().as_millis()
            )
            .as_bytes(),
        );
        if let Err(e) = super::history::append_job_log(
            message.queue(),
            message.id().as_os_str(),
            &text,
            settings.log_limit,
        ) {
            tracing::warn!(id = %message.id(), error = %super::error_chain(&e), "cannot write the job log");
        }
    }

    /// The outcome of a command that exited with `code`, 0 or a routed one: passed on to
    /// the output its route line or its code names, else to every output with
    /// `forward`, else committed.
    fn pass_on(&self, code: i32, mut stdout: Vec<u8>) -> Outcome {
        let settings = &self.settings;
        let route = match settings.route_by_line.then(|| take_route_line(&mut stdout)) {
            Some(Some(name)) => Some(name),
            _ => settings.routes.get(&code).cloned(),
        };
        match (route, settings.forward, stdout.is_empty()) {
            (Some(name), _, true) => Outcome::ForwardTo(name),
            (Some(name), _, false) => Outcome::Emit(vec![Emit::new(stdout).to(name)]),
            (None, false, _) => Outcome::Commit,
            (None, true, true) => Outcome::Forward,
            (None, true, false) => Outcome::Emit(vec![Emit::new(stdout)]),
        }
    }
}

/// Takes a first line `dirq-route: NAME` off `stdout` and returns `NAME` (trimmed of
/// spaces and a `\r`); `None`, leaving `stdout` alone, when it does not start so.
fn take_route_line(stdout: &mut Vec<u8>) -> Option<String> {
    let rest = stdout.strip_prefix(ROUTE_LINE_PREFIX.as_bytes())?;
    let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let name = std::str::from_utf8(&rest[..end]).ok()?.trim().to_owned();
    let consumed = ROUTE_LINE_PREFIX.len() + (end + 1).min(rest.len());
    stdout.drain(..consumed);
    Some(name)
}

/// How a command's run ended.
enum Ended {
    Exited(ExitStatus),
    /// Killed at the timeout.
    TimedOut,
    /// Killed because the message was cancelled.
    Cancelled,
}

/// The command could not be started; see [`Outcome::Stop`].
#[derive(Debug)]
struct Unstartable(String);

impl std::fmt::Display for Unstartable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unstartable {}

/// Checks that `program` can be executed, looked up as `execvp` does: a name with a
/// `/` is a path that must be an executable file; a bare name must be one in a
/// directory of `PATH` (`/bin:/usr/bin` when `PATH` is unset; an empty entry is the
/// current directory).
fn find_program(program: &OsStr) -> std::result::Result<(), String> {
    let path = Path::new(program);
    if program.as_encoded_bytes().contains(&b'/') {
        return sys::check_executable(path).map_err(|e| format!("cannot be executed: {e}"));
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/bin:/usr/bin"));
    let found = std::env::split_paths(&search).any(|dir| {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        sys::check_executable(&dir.join(path)).is_ok()
    });
    if found {
        Ok(())
    } else {
        Err("not found in PATH (or not executable there)".to_owned())
    }
}

fn suffix(stderr_tail: &str) -> String {
    let last = stderr_tail.lines().last().unwrap_or_default().trim();
    if last.is_empty() {
        String::new()
    } else {
        format!(": {last}")
    }
}

/// What a command wrote to its job log during one attempt, within a limit: past twice
/// the limit, the middle is dropped, keeping the head and the latest tail.
#[derive(Debug)]
struct Capture {
    bytes: Vec<u8>,
    limit: usize,
    /// Bytes dropped from the middle, after the first `limit / 2`.
    skipped: u64,
}

impl Capture {
    fn new(limit: usize) -> Capture {
        Capture {
            bytes: Vec::new(),
            limit,
            skipped: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > self.limit.saturating_mul(2) {
            let half = self.limit / 2;
            let cut = half..self.bytes.len() - half;
            self.skipped += cut.len() as u64;
            self.bytes.drain(cut);
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        if self.skipped == 0 {
            return self.bytes;
        }
        let half = self.limit / 2;
        let mut out = self.bytes[..half].to_vec();
        out.extend_from_slice(format!("\n[dirq: {} bytes left out]\n", self.skipped).as_bytes());
        out.extend_from_slice(&self.bytes[half..]);
        out
    }
}

fn capture(log: Option<&Mutex<Capture>>, chunk: &[u8]) {
    if let Some(log) = log {
        log.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(chunk);
    }
}

/// Copies a command's standard output to ours and to its log.
fn tee(mut from: impl Read, to: &mut impl Write, log: Option<&Mutex<Capture>>) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = to.write_all(&buf[..n]);
                capture(log, &buf[..n]);
            }
        }
    }
}

/// Copies a command's standard error to ours (and its log) and returns its last
/// [`STDERR_TAIL_BYTES`] as text.
fn tee_tail(mut stderr: impl Read, log: Option<&Mutex<Capture>>) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stderr.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = std::io::stderr().write_all(&buf[..n]);
                capture(log, &buf[..n]);
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL_BYTES {
                    tail.drain(..tail.len() - STDERR_TAIL_BYTES);
                }
            }
        }
    }
    if tail.len() > STDERR_TAIL_BYTES {
        tail.drain(..tail.len() - STDERR_TAIL_BYTES);
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// Waits at most `timeout` for `child`; `Ok(None)` when it is still running. A
/// timeout too long to add to the clock (`Duration::MAX`) waits for as long as it
/// takes, since the platform wait would panic on the addition.
fn wait_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    if Instant::now().checked_add(timeout).is_none() {
        return child.wait().map(Some);
    }
    sys::wait_child_timeout(child, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(builder: &CommandStageBuilder) -> &'static str {
        match builder.build() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn bad_settings_are_config_errors_naming_the_setting() {
        let no_args: [&str; 0] = [];
        assert_eq!(rejected(&CommandStage::builder("", no_args)), "program");
        assert_eq!(
            rejected(CommandStage::builder("true", no_args).timeout(Duration::ZERO)),
            "timeout"
        );
        assert_eq!(
            rejected(CommandStage::builder("true", no_args).on_fail("")),
            "on_fail"
        );
        let mut fine = CommandStage::builder("true", ["-x"]);
        fine.timeout(Duration::from_secs(1))
            .kill_grace(Duration::ZERO)
            .on_fail("logger failed")
            .forward(true);
        let stage = fine.build().expect("valid settings");
        assert_eq!(stage.settings.kill_grace, Duration::ZERO);
        assert_eq!(stage.settings.args, vec![OsString::from("-x")]);
        let undone = CommandStage::builder("true", no_args)
            .timeout(Duration::ZERO)
            .no_timeout()
            .build()
            .expect("no timeout is valid");
        assert_eq!(undone.settings.timeout, None);
        for code in [EX_TEMPFAIL, -1, 256] {
            assert_eq!(
                rejected(CommandStage::builder("true", no_args).route_exit(code, "x")),
                "route_exit",
                "exit {code}"
            );
        }
        assert_eq!(
            rejected(CommandStage::builder("true", no_args).route_exit(3, "")),
            "route_exit"
        );
    }

    #[test]
    fn a_route_line_is_taken_off_the_output() {
        let mut out = b"dirq-route: spam \r\nbody\nmore".to_vec();
        assert_eq!(take_route_line(&mut out).as_deref(), Some("spam"));
        assert_eq!(out, b"body\nmore");
        let mut only = b"dirq-route: clean".to_vec();
        assert_eq!(take_route_line(&mut only).as_deref(), Some("clean"));
        assert!(only.is_empty());
        let mut plain = b"body\ndirq-route: spam\n".to_vec();
        assert_eq!(take_route_line(&mut plain), None);
        assert_eq!(plain, b"body\ndirq-route: spam\n");
    }

    fn outcome_of(builder: &CommandStageBuilder, code: i32, stdout: &[u8]) -> String {
        let stage = builder.build().expect("valid settings");
        format!("{:?}", stage.pass_on(code, stdout.to_vec()))
    }

    #[test]
    fn exit_codes_and_lines_choose_the_output() {
        let no_args: [&str; 0] = [];
        let mut routed = CommandStage::builder("true", no_args);
        routed.route_exit(3, "spam").route_by_line(true);
        assert_eq!(outcome_of(&routed, 0, b""), "Commit");
        assert_eq!(outcome_of(&routed, 3, b""), "ForwardTo(\"spam\")");
        assert_eq!(
            outcome_of(&routed, 0, b"dirq-route: clean\n"),
            "ForwardTo(\"clean\")"
        );
        let emitted = outcome_of(&routed, 3, b"dirq-route: clean\nnew");
        assert!(
            emitted.starts_with("Emit") && emitted.contains("\"clean\""),
            "{emitted}"
        );
        routed.forward(true);
        assert_eq!(outcome_of(&routed, 0, b""), "Forward");
        assert!(outcome_of(&routed, 0, b"x").starts_with("Emit"));
    }
}
