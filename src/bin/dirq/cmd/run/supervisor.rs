//! The supervisor's loop: one `dirq exec` process per stage process, restarted with a
//! backoff when it exits on its own, signalled to drain on stop, and the stages changed
//! in place by a reload (SIGHUP).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::notify::{Notifier, ENVIRONMENT};
use super::pipeline::Loaded;
use super::signals::{Request, SignalWatch};
use crate::cmd::Opener;
use crate::output::{context, CliResult};

/// How long a restarted worker must run before its crash backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How often the loop looks at its processes and signals.
const TICK: Duration = Duration::from_millis(100);

/// One stage as the pipeline file describes it: what a reload compares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    name: String,
    /// The `dirq exec` arguments of its processes.
    command: Vec<String>,
    processes: usize,
}

fn specs(loaded: &Loaded) -> Vec<Spec> {
    let pipeline = &loaded.pipeline;
    pipeline
        .stages
        .iter()
        .zip(&loaded.commands)
        .map(|(stage, command)| Spec {
            name: stage.name.clone(),
            command: command.clone(),
            // Checked by exec_command, through load.
            processes: stage.settings.or(&pipeline.defaults).processes.unwrap_or(1),
        })
        .collect()
}

/// A stage and its supervised processes.
struct StageRun {
    spec: Spec,
    workers: Vec<Worker>,
    /// Set by a reload that changed or removed the stage: its processes were sent
    /// SIGTERM and are not restarted. Once every one has exited, the stage starts
    /// again as `Some(spec)`, or goes away (`None`).
    draining: Option<Option<Spec>>,
}

impl StageRun {
    fn new(spec: Spec, now: Instant) -> StageRun {
        StageRun {
            workers: (0..spec.processes).map(|_| Worker::new(now)).collect(),
            spec,
            draining: None,
        }
    }

    /// Asks every process to drain, and none to be restarted.
    fn drain(&mut self, then: Option<Spec>) {
        for worker in &mut self.workers {
            worker.terminate();
            worker.restart_at = None;
        }
        self.draining = Some(then);
    }

    fn exited(&self) -> bool {
        self.workers.iter().all(|w| w.child.is_none())
    }
}

/// One supervised process of a stage.
struct Worker {
    child: Option<Child>,
    /// Whether this process was sent SIGTERM: a second one would make it stop at once,
    /// abandoning its running commands, instead of draining.
    terminated: bool,
    /// Whether a process was ever started in this place: readiness waits for all.
    launched: bool,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
    /// How many times this process was restarted after exiting on its own.
    restarts: u32,
}

impl Worker {
    fn new(now: Instant) -> Worker {
        Worker {
            child: None,
            terminated: false,
            launched: false,
            started: now,
            backoff: Duration::from_secs(1),
            restart_at: Some(now),
            restarts: 0,
        }
    }

    /// SIGTERM, once: the process drains.
    fn terminate(&mut self) {
        if let Some(child) = &self.child {
            if !self.terminated {
                send_signal(child, StageSignal::Terminate);
                self.terminated = true;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Running,
    /// First SIGTERM or SIGINT: every stage drains.
    Stopping,
    /// Second: every stage stops at once.
    Forcing,
}

/// The names a reload kept, restarted, removed and added.
#[derive(Debug, Default)]
struct Changes {
    kept: Vec<String>,
    restarted: Vec<String>,
    removed: Vec<String>,
    added: Vec<String>,
}

impl Changes {
    fn summary(&self) -> String {
        let list = |names: &[String]| {
            if names.is_empty() {
                "-".to_owned()
            } else {
                names.join(",")
            }
        };
        format!(
            "kept {}; restarted {}; removed {}; added {}",
            list(&self.kept),
            list(&self.restarted),
            list(&self.removed),
            list(&self.added)
        )
    }
}

/// Runs the stages of a loaded pipeline until a stop signal and every stage process has
/// exited.
pub(super) fn supervise(file: &Path, loaded: Loaded, opener: &Opener) -> CliResult {
    let mut signals = SignalWatch::new()?;
    let mut notifier = Notifier::from_env();
    let now = Instant::now();
    let mut base = loaded.base.clone();
    let mut stages: Vec<StageRun> = specs(&loaded)
        .into_iter()
        .map(|spec| StageRun::new(spec, now))
        .collect();
    drop(loaded);
    let processes: usize = stages.iter().map(|s| s.workers.len()).sum();
    tracing::info!(file = %file.display(), stages = stages.len(), processes, "pipeline starting");
    let mut wanted = Wanted::Running;
    // READY=1 is owed: at start, and after a reload until it is applied.
    let mut ready_owed = true;
    loop {
        let now = Instant::now();
        for request in signals.requests() {
            match request {
                Request::Stop => {
                    let force = wanted != Wanted::Running;
                    if !force {
                        notifier.stopping();
                    }
                    wanted = if force {
                        Wanted::Forcing
                    } else {
                        Wanted::Stopping
                    };
                    tracing::info!("stopping the pipeline");
                    for worker in stages.iter_mut().flat_map(|s| &mut s.workers) {
                        if force {
                            if let Some(child) = &worker.child {
                                send_signal(child, StageSignal::Terminate);
                            }
                        } else {
                            worker.terminate();
                        }
                    }
                }
                Request::Statistics => log_stats(&stages),
                Request::Reload if wanted != Wanted::Running => {
                    tracing::info!("SIGHUP ignored: the pipeline is stopping");
                }
                Request::Reload => {
                    notifier.reloading();
                    tracing::info!(file = %file.display(), "reloading the pipeline");
                    match super::load_checked(file, opener) {
                        Err(error) => {
                            let error = one_line(&error.to_string());
                            tracing::error!(file = %file.display(), %error, "pipeline file not reloaded; the pipeline runs on unchanged");
                            // A reload is still owed READY=1 when the reload before
                            // this one is not applied yet.
                            if !ready_owed {
                                notifier.ready(&format!(
                                    "running; reload of {} failed: {error}",
                                    file.display()
                                ));
                            }
                        }
                        Ok(loaded) => {
                            base.clone_from(&loaded.base);
                            let changes = reload(&mut stages, specs(&loaded), now);
                            tracing::info!(file = %file.display(), "pipeline reloaded: {}", changes.summary());
                            ready_owed = true;
                        }
                    }
                }
            }
        }
        if wanted == Wanted::Running {
            stages.retain_mut(|stage| next_generation(stage, now));
        }
        for stage in &mut stages {
            let name = &stage.spec.name;
            let draining = stage.draining.is_some();
            for worker in &mut stage.workers {
                if let Some(child) = worker.child.as_mut() {
                    if let Some(status) = child.try_wait()? {
                        let pid = child.id();
                        worker.child = None;
                        if wanted != Wanted::Running || draining {
                            tracing::info!(stage = %name, pid, %status, "stage worker exited");
                            continue;
                        }
                        if worker.started.elapsed() >= STABLE_AFTER {
                            worker.backoff = Duration::from_secs(1);
                        }
                        tracing::warn!(stage = %name, pid, %status, restart_in = ?worker.backoff, "stage worker exited; restarting it");
                        worker.restart_at = Some(now + worker.backoff);
                        worker.backoff = (worker.backoff * 2).min(MAX_BACKOFF);
                        worker.restarts += 1;
                    }
                } else if wanted == Wanted::Running
                    && !draining
                    && worker.restart_at.is_some_and(|t| now >= t)
                {
                    let child = spawn(&stage.spec.command, &base)?;
                    tracing::info!(stage = %name, pid = child.id(), "stage worker started");
                    worker.child = Some(child);
                    worker.terminated = false;
                    worker.launched = true;
                    worker.started = now;
                    worker.restart_at = None;
                }
            }
        }
        if wanted == Wanted::Running
            && ready_owed
            && stages
                .iter()
                .all(|s| s.draining.is_none() && s.workers.iter().all(|w| w.launched))
        {
            let processes: usize = stages.iter().map(|s| s.workers.len()).sum();
            notifier.ready(&format!(
                "running {} stages, {processes} processes",
                stages.len()
            ));
            ready_owed = false;
        }
        if wanted != Wanted::Running && stages.iter().all(StageRun::exited) {
            tracing::info!(file = %file.display(), "pipeline stopped");
            return Ok(());
        }
        let sleep = notifier
            .watchdog(Instant::now())
            .map_or(TICK, |due| due.min(TICK));
        std::thread::sleep(sleep);
    }
}

/// A multi-line error (TOML's show the offending line) as one log line: one journal
/// entry, one line for grep.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Applies a reloaded file: a stage whose `dirq exec` arguments and process count are
/// the same keeps its processes; a changed one drains and starts anew (see
/// [`next_generation`]); a removed one drains; an added one starts.
fn reload(stages: &mut Vec<StageRun>, new: Vec<Spec>, now: Instant) -> Changes {
    let mut changes = Changes::default();
    for stage in stages.iter_mut() {
        let name = stage.spec.name.clone();
        match new.iter().find(|spec| spec.name == name) {
            // A stage still draining from an earlier reload cannot be kept: its
            // processes were told to stop. It starts with the newest settings.
            Some(spec) if stage.draining.is_none() && *spec == stage.spec => {
                changes.kept.push(name);
            }
            Some(spec) => {
                stage.drain(Some(spec.clone()));
                changes.restarted.push(name);
            }
            None => {
                stage.drain(None);
                changes.removed.push(name);
            }
        }
    }
    for spec in new {
        if !stages.iter().any(|stage| stage.spec.name == spec.name) {
            changes.added.push(spec.name.clone());
            stages.push(StageRun::new(spec, now));
        }
    }
    changes
}

/// A draining stage whose processes have all exited starts with its new settings, or
/// goes away; returns whether it stays.
fn next_generation(stage: &mut StageRun, now: Instant) -> bool {
    if stage.draining.is_none() || !stage.exited() {
        return true;
    }
    match stage.draining.take().flatten() {
        Some(spec) => {
            tracing::info!(stage = %spec.name, "stage drained; starting it with its new settings");
            *stage = StageRun::new(spec, now);
            true
        }
        None => {
            tracing::info!(stage = %stage.spec.name, "stage drained and removed");
            false
        }
    }
}

/// SIGUSR1: a line per stage process (pid, uptime, restarts), and the signal passed on
/// to each, which logs its Piper's statistics.
fn log_stats(stages: &[StageRun]) {
    let workers = || stages.iter().flat_map(|s| &s.workers);
    let running = workers().filter(|w| w.child.is_some()).count();
    let restarts: u32 = workers().map(|w| w.restarts).sum();
    tracing::info!(
        stages = stages.len(),
        processes = workers().count(),
        running,
        restarts,
        "pipeline statistics"
    );
    for stage_run in stages {
        let stage = &stage_run.spec.name;
        for worker in &stage_run.workers {
            match &worker.child {
                Some(child) => {
                    tracing::info!(
                        stage = %stage,
                        pid = child.id(),
                        uptime_s = worker.started.elapsed().as_secs(),
                        restarts = worker.restarts,
                        draining = stage_run.draining.is_some(),
                        "stage process statistics"
                    );
                    // A process this young may not handle SIGUSR1 yet, and the signal's
                    // default action would kill it.
                    if worker.started.elapsed() >= SIGNAL_READY_AFTER {
                        send_signal(child, StageSignal::Statistics);
                    }
                }
                None => tracing::info!(
                    stage = %stage,
                    restarts = worker.restarts,
                    restart_in = ?worker.restart_at.map(|t| t.saturating_duration_since(Instant::now())),
                    "stage process statistics: not running"
                ),
            }
        }
    }
}

/// How long a stage process runs before it is sent SIGUSR1: by then a Piper has set up
/// its signal handling.
const SIGNAL_READY_AFTER: Duration = Duration::from_secs(2);

fn spawn(args: &[String], base: &Path) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    let exe = std::env::current_exe().map_err(context("failed to find the dirq executable"))?;
    let mut command = Command::new(exe);
    command.args(args).current_dir(base).stdin(Stdio::null());
    for name in ENVIRONMENT {
        command.env_remove(name);
    }
    die_with_parent(&mut command);
    Ok(command
        .spawn()
        .map_err(context("failed to start a stage worker"))?)
}

/// A signal for a stage process.
#[derive(Debug, Clone, Copy)]
enum StageSignal {
    /// SIGTERM: drain and exit (again: stop at once).
    Terminate,
    /// SIGUSR1: log statistics.
    Statistics,
}

#[cfg(unix)]
fn send_signal(child: &Child, signal: StageSignal) {
    use rustix::process::{kill_process, Pid, Signal};
    let signal = match signal {
        StageSignal::Terminate => Signal::TERM,
        StageSignal::Statistics => Signal::USR1,
    };
    // Fails only for a process that exited and is not reaped yet: nothing to tell it.
    let _ = kill_process(Pid::from_child(child), signal);
}

#[cfg(not(unix))]
fn send_signal(_child: &Child, _signal: StageSignal) {}

/// Makes the kernel send the stage process SIGTERM when this supervisor dies, even by
/// SIGKILL: otherwise its stage processes would keep running re-parented to pid 1,
/// unsupervised, and a new `dirq run` would start a second set beside them.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use rustix::process::{getpid, getppid, set_parent_process_death_signal, Signal};
    use std::os::unix::process::CommandExt;
    let supervisor = getpid();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes two raw system calls (prctl and
    // getppid) and allocates nothing. The parent-death signal is tied to the thread that
    // forks; the supervisor forks from its main thread, which lives as long as it does.
    unsafe {
        command.pre_exec(move || {
            set_parent_process_death_signal(Some(Signal::TERM))?;
            // The supervisor died before the prctl: no signal will come.
            if getppid() != Some(supervisor) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}
