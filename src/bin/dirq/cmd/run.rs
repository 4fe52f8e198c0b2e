//! `dirq run PIPELINE.toml`: the stages of a pipeline as `dirq exec` processes,
//! supervised by this one, which restarts workers that crash and stops them all on
//! SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirq::piper::PiperBuilder;
use serde::Deserialize;

use super::Opener;
use crate::args::parse_duration;
use crate::output::{context, CliResult};

/// A pipeline file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pipeline {
    #[serde(default)]
    defaults: StageSettings,
    #[serde(rename = "stage")]
    stages: Vec<Stage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    name: String,
    input: PathBuf,
    output: Option<PathBuf>,
    /// An argument list, or a string run by `sh -c`.
    command: CommandLine,
    #[serde(flatten)]
    settings: StageSettings,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CommandLine {
    Shell(String),
    Args(Vec<String>),
}

/// Settings a stage may give, or take from `[defaults]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageSettings {
    /// Threads per process (`dirq exec -j`).
    workers: Option<usize>,
    /// Supervised processes of the stage.
    processes: Option<usize>,
    timeout: Option<String>,
    out_limit: Option<usize>,
    on_fail: Option<String>,
    retries: Option<u32>,
    drain_timeout: Option<String>,
    /// Group commit (`dirq exec --commit-batch`, `--commit-delay`).
    commit_batch: Option<usize>,
    commit_delay: Option<String>,
}

impl StageSettings {
    fn or(&self, defaults: &StageSettings) -> StageSettings {
        StageSettings {
            workers: self.workers.or(defaults.workers),
            processes: self.processes.or(defaults.processes),
            timeout: self.timeout.clone().or_else(|| defaults.timeout.clone()),
            out_limit: self.out_limit.or(defaults.out_limit),
            on_fail: self.on_fail.clone().or_else(|| defaults.on_fail.clone()),
            retries: self.retries.or(defaults.retries),
            drain_timeout: self
                .drain_timeout
                .clone()
                .or_else(|| defaults.drain_timeout.clone()),
            commit_batch: self.commit_batch.or(defaults.commit_batch),
            commit_delay: self
                .commit_delay
                .clone()
                .or_else(|| defaults.commit_delay.clone()),
        }
    }
}

/// The most processes a stage may have: a mistyped count must not fork-bomb the host.
const MAX_PROCESSES: usize = 1024;

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
}

const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const FORCING: u8 = 2;

pub(crate) fn run(file: &Path, opener: &Opener) -> CliResult {
    let text = std::fs::read_to_string(file).map_err(context(format!(
        "failed to read pipeline file {}",
        file.display()
    )))?;
    let pipeline: Pipeline = toml::from_str(&text)
        .map_err(|e| format!("invalid pipeline file {}: {e}", file.display()))?;
    if pipeline.stages.is_empty() {
        return Err(format!("pipeline file {} has no [[stage]]", file.display()).into());
    }
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let commands = pipeline
        .stages
        .iter()
        .map(|stage| exec_command(stage, &stage.settings.or(&pipeline.defaults), base, opener))
        .collect::<Result<Vec<_>, String>>()?;
    let state = Arc::new(AtomicU8::new(RUNNING));
    let _signals = watch_signals(Arc::clone(&state))?;

    let mut workers = Vec::new();
    for (index, stage) in pipeline.stages.iter().enumerate() {
        // Checked by exec_command above.
        let processes = stage.settings.or(&pipeline.defaults).processes.unwrap_or(1);
        for _ in 0..processes {
            workers.push(Worker {
                stage: index,
                child: None,
                started: Instant::now(),
                backoff: Duration::from_secs(1),
                restart_at: Some(Instant::now()),
            });
        }
    }
    tracing::info!(file = %file.display(), stages = pipeline.stages.len(), processes = workers.len(), "pipeline starting");
    let mut signalled = RUNNING;
    loop {
        let now = Instant::now();
        let wanted = state.load(Ordering::Acquire);
        if wanted != signalled {
            // First signal: every stage drains; second: every stage stops at once.
            for child in workers.iter().filter_map(|w| w.child.as_ref()) {
                send_term(child);
            }
            signalled = wanted;
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

/// The `dirq exec` arguments of one stage.
fn exec_command(
    stage: &Stage,
    settings: &StageSettings,
    base: &Path,
    opener: &Opener,
) -> Result<Vec<String>, String> {
    let bad = |what: String| format!("stage {:?}: {what}", stage.name);
    // Checked here, before anything starts: a worker process that refused its `-j`
    // would only be restarted over and over.
    let workers = settings.workers.unwrap_or(1);
    if !(1..=PiperBuilder::MAX_WORKERS).contains(&workers) {
        return Err(bad(format!(
            "workers = {workers}: must be from 1 to {}",
            PiperBuilder::MAX_WORKERS
        )));
    }
    let processes = settings.processes.unwrap_or(1);
    if !(1..=MAX_PROCESSES).contains(&processes) {
        return Err(bad(format!(
            "processes = {processes}: must be from 1 to {MAX_PROCESSES}"
        )));
    }
    if let Some(batch) = settings.commit_batch {
        if !(1..=PiperBuilder::MAX_COMMIT_BATCH).contains(&batch) {
            return Err(bad(format!(
                "commit_batch = {batch}: must be from 1 to {}",
                PiperBuilder::MAX_COMMIT_BATCH
            )));
        }
    }
    let mut args = vec![
        "--durability".to_owned(),
        match opener.durability {
            dirq::Durability::Full => "full",
            dirq::Durability::Batch => "batch",
            _ => "none",
        }
        .to_owned(),
        "exec".to_owned(),
        base.join(&stage.input).to_string_lossy().into_owned(),
        "--name".to_owned(),
        stage.name.clone(),
        "-j".to_owned(),
        workers.to_string(),
    ];
    if let Some(output) = &stage.output {
        args.extend([
            "--to".to_owned(),
            base.join(output).to_string_lossy().into_owned(),
        ]);
    }
    for (flag, value) in [
        ("--timeout", &settings.timeout),
        ("--drain-timeout", &settings.drain_timeout),
        ("--commit-delay", &settings.commit_delay),
    ] {
        if let Some(value) = value {
            parse_duration(value).map_err(|e| bad(format!("{flag}: {e}")))?;
            args.extend([flag.to_owned(), value.clone()]);
        }
    }
    if let Some(limit) = settings.out_limit {
        args.extend(["--out-limit".to_owned(), limit.to_string()]);
    }
    if let Some(batch) = settings.commit_batch {
        args.extend(["--commit-batch".to_owned(), batch.to_string()]);
    }
    if let Some(retries) = settings.retries {
        args.extend(["--retries".to_owned(), retries.to_string()]);
    }
    if let Some(hook) = &settings.on_fail {
        args.extend(["--on-fail".to_owned(), hook.clone()]);
    }
    args.push("--".to_owned());
    match &stage.command {
        CommandLine::Shell(line) => args.extend(["sh".to_owned(), "-c".to_owned(), line.clone()]),
        CommandLine::Args(list) if list.is_empty() => {
            return Err(bad("the command is empty".to_owned()))
        }
        CommandLine::Args(list) => args.extend(list.iter().cloned()),
    }
    Ok(args)
}

fn spawn(args: &[String], base: &Path) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    let exe = std::env::current_exe().map_err(context("failed to find the dirq executable"))?;
    Ok(Command::new(exe)
        .args(args)
        .current_dir(base)
        .stdin(Stdio::null())
        .spawn()
        .map_err(context("failed to start a stage worker"))?)
}

#[cfg(unix)]
fn send_term(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

#[cfg(not(unix))]
fn send_term(_child: &Child) {}

/// SIGTERM or SIGINT: stop draining; again: stop at once.
#[cfg(unix)]
fn watch_signals(
    state: Arc<AtomicU8>,
) -> Result<signal_hook::iterator::Handle, Box<dyn std::error::Error + Send + Sync>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("dirq-run-signals".to_owned())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    tracing::info!("SIGHUP ignored: restart dirq run to reload the pipeline");
                    continue;
                }
                let next = if state.load(Ordering::Acquire) == RUNNING {
                    STOPPING
                } else {
                    FORCING
                };
                tracing::info!(signal, "stopping the pipeline");
                state.store(next, Ordering::Release);
            }
        })?;
    Ok(handle)
}

#[cfg(not(unix))]
fn watch_signals(_state: Arc<AtomicU8>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("dirq run needs Unix signals".into())
}
