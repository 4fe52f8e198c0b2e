//! `dirq run PIPELINE.toml`: the stages of a pipeline as `dirq exec` processes,
//! supervised by this one, which restarts workers that crash and stops them all on
//! SIGTERM or SIGINT. SIGUSR1 logs the supervisor's statistics and is passed on to every
//! stage process, which logs its own. On Linux every stage process gets SIGTERM (and
//! drains) when the supervisor dies, even by SIGKILL.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dirq::piper::PiperBuilder;
use serde::Deserialize;

use super::Opener;
use crate::args::parse_duration;
use crate::output::{context, quiet_broken_pipe, stdout_error, CliResult};

/// A pipeline file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pipeline {
    #[serde(default)]
    defaults: StageSettings,
    /// Missing is an error with its own message, below.
    #[serde(rename = "stage", default)]
    stages: Vec<Stage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    name: String,
    /// One input queue, or `inputs`: several, in strict priority order.
    input: Option<PathBuf>,
    #[serde(default)]
    inputs: Vec<PathBuf>,
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
    /// Expiry of the input queues (`dirq exec --max-age`).
    max_age: Option<String>,
    /// Backpressure watermarks (`--out-resume`, `--out-limit-bytes`, `--out-resume-bytes`).
    out_resume: Option<usize>,
    out_limit_bytes: Option<u64>,
    out_resume_bytes: Option<u64>,
    /// The failure breaker: `breaker = false` is `--no-breaker`; the others are
    /// `--breaker-failures`, `--breaker-rate`, `--breaker-min-samples`,
    /// `--breaker-window` and `--breaker-cooldown`.
    breaker: Option<bool>,
    breaker_failures: Option<u32>,
    breaker_rate: Option<f64>,
    breaker_min_samples: Option<u32>,
    breaker_window: Option<String>,
    breaker_cooldown: Option<String>,
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
            max_age: self.max_age.clone().or_else(|| defaults.max_age.clone()),
            out_resume: self.out_resume.or(defaults.out_resume),
            out_limit_bytes: self.out_limit_bytes.or(defaults.out_limit_bytes),
            out_resume_bytes: self.out_resume_bytes.or(defaults.out_resume_bytes),
            breaker: self.breaker.or(defaults.breaker),
            breaker_failures: self.breaker_failures.or(defaults.breaker_failures),
            breaker_rate: self.breaker_rate.or(defaults.breaker_rate),
            breaker_min_samples: self.breaker_min_samples.or(defaults.breaker_min_samples),
            breaker_window: self
                .breaker_window
                .clone()
                .or_else(|| defaults.breaker_window.clone()),
            breaker_cooldown: self
                .breaker_cooldown
                .clone()
                .or_else(|| defaults.breaker_cooldown.clone()),
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
    /// How many times this process was restarted after exiting on its own.
    restarts: u32,
}

const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const FORCING: u8 = 2;

/// A pipeline file read, resolved and checked: what `dirq run --check` validates.
struct Loaded {
    pipeline: Pipeline,
    /// The file's directory, absolute.
    base: PathBuf,
    /// The `dirq exec` arguments of each stage.
    commands: Vec<Vec<String>>,
}

pub(crate) fn run(file: &Path, check: bool, opener: &Opener) -> CliResult {
    let Loaded {
        pipeline,
        base,
        commands,
    } = load(file, opener)?;
    if check {
        return check_inputs(file, &pipeline, &base, opener);
    }
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

/// `dirq run --check`: every stage's input queues exist (a stage whose input is missing
/// would be restarted over and over); outputs are created when missing. Prints one
/// line and changes nothing.
fn check_inputs(file: &Path, pipeline: &Pipeline, base: &Path, opener: &Opener) -> CliResult {
    for stage in &pipeline.stages {
        let (first, also) = stage_inputs(stage)?;
        for input in std::iter::once(first).chain(also) {
            opener
                .inspect(&base.join(input))
                .map_err(|e| format!("stage {:?}: input queue: {e}", stage.name))?;
        }
    }
    let processes: usize = pipeline
        .stages
        .iter()
        .map(|s| s.settings.or(&pipeline.defaults).processes.unwrap_or(1))
        .sum();
    let mut out = std::io::stdout().lock();
    quiet_broken_pipe(writeln!(
        out,
        "{}: ok ({} stages, {processes} processes)",
        file.display(),
        pipeline.stages.len()
    ))
    .map_err(stdout_error)?;
    Ok(())
}

fn load(file: &Path, opener: &Opener) -> Result<Loaded, Box<dyn std::error::Error + Send + Sync>> {
    let text = std::fs::read_to_string(file).map_err(context(format!(
        "failed to read pipeline file {}",
        file.display()
    )))?;
    let pipeline: Pipeline = toml::from_str(&text)
        .map_err(|e| format!("invalid pipeline file {}: {e}", file.display()))?;
    if pipeline.stages.is_empty() {
        return Err(format!("pipeline file {} has no [[stage]]", file.display()).into());
    }
    // Queue paths in the file are relative to its directory, and stage processes run
    // in that directory (for commands like ./deliver.sh). The directory is made absolute
    // first: joined as a relative path and then also changed into, it would apply twice
    // (sub/pipeline.toml reading sub/sub/spool/input).
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::path::absolute(base).map_err(context(format!(
        "failed to resolve the directory of pipeline file {}",
        file.display()
    )))?;
    let base = base.as_path();
    let commands = pipeline
        .stages
        .iter()
        .map(|stage| exec_command(stage, &stage.settings.or(&pipeline.defaults), base, opener))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Loaded {
        pipeline,
        base: base.to_path_buf(),
        commands,
    })
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

/// The first input of a stage and the ones after it, in priority order.
fn stage_inputs(stage: &Stage) -> Result<(&PathBuf, &[PathBuf]), String> {
    let bad = |what: &str| format!("stage {:?}: {what}", stage.name);
    match (&stage.input, stage.inputs.split_first()) {
        (Some(input), None) => Ok((input, &[][..])),
        (None, Some((first, also))) => Ok((first, also)),
        (Some(_), Some(_)) => Err(bad("give input or inputs, not both")),
        (None, None) => Err(bad(
            "no input: give input = \"QUEUE\" or inputs = [\"FIRST\", \"SECOND\"]",
        )),
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
    check_flow_settings(settings).map_err(bad)?;
    let (first, also) = stage_inputs(stage)?;
    let mut args = vec![
        "--durability".to_owned(),
        match opener.durability {
            dirq::Durability::Full => "full",
            dirq::Durability::Batch => "batch",
            _ => "none",
        }
        .to_owned(),
        "exec".to_owned(),
        base.join(first).to_string_lossy().into_owned(),
        "--name".to_owned(),
        stage.name.clone(),
        "-j".to_owned(),
        workers.to_string(),
    ];
    for input in also {
        args.extend([
            "--also-input".to_owned(),
            base.join(input).to_string_lossy().into_owned(),
        ]);
    }
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
        ("--max-age", &settings.max_age),
        ("--breaker-window", &settings.breaker_window),
        ("--breaker-cooldown", &settings.breaker_cooldown),
    ] {
        if let Some(value) = value {
            parse_duration(value).map_err(|e| bad(format!("{flag}: {e}")))?;
            args.extend([flag.to_owned(), value.clone()]);
        }
    }
    for (flag, value) in [
        ("--out-resume", settings.out_resume.map(|n| n.to_string())),
        (
            "--out-limit-bytes",
            settings.out_limit_bytes.map(|n| n.to_string()),
        ),
        (
            "--out-resume-bytes",
            settings.out_resume_bytes.map(|n| n.to_string()),
        ),
        (
            "--breaker-failures",
            settings.breaker_failures.map(|n| n.to_string()),
        ),
        (
            "--breaker-rate",
            settings.breaker_rate.map(|r| r.to_string()),
        ),
        (
            "--breaker-min-samples",
            settings.breaker_min_samples.map(|n| n.to_string()),
        ),
    ] {
        if let Some(value) = value {
            args.extend([flag.to_owned(), value]);
        }
    }
    if settings.breaker == Some(false) {
        args.push("--no-breaker".to_owned());
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

/// The expiry, watermarks and breaker settings of a stage, checked as its `dirq exec`
/// (the queue and Piper builders) would check them: a bad value stops the pipeline
/// before it starts rather than failing a stage process over and over.
fn check_flow_settings(settings: &StageSettings) -> Result<(), String> {
    for (key, value) in [
        ("max_age", &settings.max_age),
        ("breaker_window", &settings.breaker_window),
        ("breaker_cooldown", &settings.breaker_cooldown),
    ] {
        if let Some(value) = value {
            let duration = parse_duration(value).map_err(|e| format!("{key}: {e}"))?;
            if duration.is_zero() {
                return Err(format!("{key} = {value:?}: must be more than zero"));
            }
        }
    }
    let out_limit = settings.out_limit.unwrap_or(5000);
    if let Some(low) = settings.out_resume {
        if low > out_limit {
            return Err(format!(
                "out_resume = {low}: must be at most out_limit ({out_limit})"
            ));
        }
    }
    match (settings.out_limit_bytes, settings.out_resume_bytes) {
        (Some(0), _) => return Err("out_limit_bytes = 0: must be at least 1".to_owned()),
        (None, Some(low)) => {
            return Err(format!(
                "out_resume_bytes = {low}: is set, but out_limit_bytes is not"
            ))
        }
        (Some(high), Some(low)) if low > high => {
            return Err(format!(
                "out_resume_bytes = {low}: must be at most out_limit_bytes ({high})"
            ))
        }
        _ => {}
    }
    if settings.breaker == Some(false)
        && (settings.breaker_failures.is_some() || settings.breaker_rate.is_some())
    {
        return Err(
            "breaker = false: cannot be combined with breaker_failures or breaker_rate".to_owned(),
        );
    }
    if settings.breaker_failures == Some(0) {
        return Err("breaker_failures = 0: must be at least 1".to_owned());
    }
    if let Some(rate) = settings.breaker_rate {
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(format!(
                "breaker_rate = {rate}: must be more than 0 and at most 1"
            ));
        }
    }
    if settings.breaker_min_samples == Some(0) {
        return Err("breaker_min_samples = 0: must be at least 1".to_owned());
    }
    Ok(())
}

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

/// What a signal asks of the supervisor.
#[derive(Debug, Clone, Copy)]
enum Request {
    /// SIGTERM or SIGINT: stop draining; again: stop at once.
    Stop,
    /// SIGUSR1.
    Statistics,
}

/// The supervisor's signals, read by its main loop.
///
/// IMPORTANT: no thread waits for them. The supervisor stays single-threaded because
/// when it dies, the kernel passes its children to each of its remaining threads in
/// turn and sends the parent-death signal at every step: with a second thread, a stage
/// process would get SIGTERM twice, and the second SIGTERM means "stop at once, abandon
/// running commands" instead of draining.
#[cfg(unix)]
struct SignalWatch(signal_hook::iterator::Signals);

#[cfg(unix)]
impl SignalWatch {
    fn new() -> Result<SignalWatch, Box<dyn std::error::Error + Send + Sync>> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
        Ok(SignalWatch(signal_hook::iterator::Signals::new([
            SIGTERM, SIGINT, SIGHUP, SIGUSR1,
        ])?))
    }

    /// The requests of the signals received since the last call; never blocks.
    fn requests(&mut self) -> Vec<Request> {
        use signal_hook::consts::{SIGHUP, SIGUSR1};
        self.0
            .pending()
            .filter_map(|signal| match signal {
                SIGHUP => {
                    tracing::info!("SIGHUP ignored: restart dirq run to reload the pipeline");
                    None
                }
                SIGUSR1 => Some(Request::Statistics),
                _ => Some(Request::Stop),
            })
            .collect()
    }
}

#[cfg(not(unix))]
struct SignalWatch;

#[cfg(not(unix))]
impl SignalWatch {
    fn new() -> Result<SignalWatch, Box<dyn std::error::Error + Send + Sync>> {
        Err("dirq run needs Unix signals".into())
    }

    fn requests(&mut self) -> Vec<Request> {
        Vec::new()
    }
}
