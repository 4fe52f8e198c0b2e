//! The supervisor's loop: one `dirq exec` process per stage process, restarted with a
//! backoff when it exits on its own, signalled to drain on stop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pipeline::{Loaded, Stage};
use super::signals::{Request, SignalWatch};
use crate::output::{context, CliResult};

/// How long a restarted worker must run before its crash backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One supervised process of a stage.
struct Worker {
    stage: usize,
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
    /// How many times this process was restarted after exiting on its own.
    restarts: u32,
}

const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const FORCING: u8 = 2;

/// Runs the stages of a loaded pipeline until a stop signal and every stage process has
/// exited.
pub(super) fn supervise(file: &Path, loaded: Loaded) -> CliResult {
    let Loaded {
        pipeline,
        base,
        commands,
    } = loaded;
    let base = base.as_path();
    let mut signals = SignalWatch::new()?;

    let mut workers = Vec::new();
    for (index, stage) in pipeline.stages.iter().enumerate() {
        // Checked by exec_command, through load.
        let processes = stage.settings.or(&pipeline.defaults).processes.unwrap_or(1);
        for _ in 0..processes {
            workers.push(Worker {
                stage: index,
                child: None,
                started: Instant::now(),
                backoff: Duration::from_secs(1),
                restart_at: Some(Instant::now()),
                restarts: 0,
            });
        }
    }
    tracing::info!(file = %file.display(), stages = pipeline.stages.len(), processes = workers.len(), "pipeline starting");
    let mut wanted = RUNNING;
    loop {
        let now = Instant::now();
        for request in signals.requests() {
            match request {
                Request::Stop => {
                    // First signal: every stage drains; second: every stage stops at once.
                    wanted = if wanted == RUNNING { STOPPING } else { FORCING };
                    tracing::info!("stopping the pipeline");
                    for child in workers.iter().filter_map(|w| w.child.as_ref()) {
                        send_signal(child, StageSignal::Terminate);
                    }
                }
                Request::Statistics => log_stats(&pipeline.stages, &workers),
            }
        }
        for worker in &mut workers {
            let name = &pipeline.stages[worker.stage].name;
            if let Some(child) = worker.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    worker.child = None;
                    if wanted != RUNNING {
                        continue;
                    }
                    if worker.started.elapsed() >= STABLE_AFTER {
                        worker.backoff = Duration::from_secs(1);
                    }
                    tracing::warn!(stage = %name, %status, restart_in = ?worker.backoff, "stage worker exited; restarting it");
                    worker.restart_at = Some(now + worker.backoff);
                    worker.backoff = (worker.backoff * 2).min(MAX_BACKOFF);
                    worker.restarts += 1;
                }
            } else if wanted == RUNNING && worker.restart_at.is_some_and(|t| now >= t) {
                let child = spawn(&commands[worker.stage], base)?;
                tracing::info!(stage = %name, pid = child.id(), "stage worker started");
                worker.child = Some(child);
                worker.started = now;
                worker.restart_at = None;
            }
        }
        if wanted != RUNNING && workers.iter().all(|w| w.child.is_none()) {
            tracing::info!(file = %file.display(), "pipeline stopped");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGUSR1: a line per stage process (pid, uptime, restarts), and the signal passed on
/// to each, which logs its Piper's statistics.
fn log_stats(stages: &[Stage], workers: &[Worker]) {
    let running = workers.iter().filter(|w| w.child.is_some()).count();
    let restarts: u32 = workers.iter().map(|w| w.restarts).sum();
    tracing::info!(
        stages = stages.len(),
        processes = workers.len(),
        running,
        restarts,
        "pipeline statistics"
    );
    for worker in workers {
        let stage = &stages[worker.stage].name;
        match &worker.child {
            Some(child) => {
                tracing::info!(
                    stage = %stage,
                    pid = child.id(),
                    uptime_s = worker.started.elapsed().as_secs(),
                    restarts = worker.restarts,
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

/// How long a stage process runs before it is sent SIGUSR1: by then a Piper has set up
/// its signal handling.
const SIGNAL_READY_AFTER: Duration = Duration::from_secs(2);

fn spawn(args: &[String], base: &Path) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    let exe = std::env::current_exe().map_err(context("failed to find the dirq executable"))?;
    let mut command = Command::new(exe);
    command.args(args).current_dir(base).stdin(Stdio::null());
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
