//! The pipeline file: its schema (`[defaults]` and `[[stage]]` tables), read, resolved
//! against the file's directory and checked, down to the `dirq exec` arguments of each
//! stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dirq::piper::PiperBuilder;
use serde::Deserialize;

use super::super::Opener;
use crate::args::{parse_duration, parse_mode, parse_route};
use crate::output::context;

/// A pipeline file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Pipeline {
    #[serde(default)]
    pub(super) defaults: StageSettings,
    /// Missing is an error with its own message, below.
    #[serde(rename = "stage", default)]
    pub(super) stages: Vec<Stage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Stage {
    pub(super) name: String,
    /// One input queue, or `inputs`: several, in strict priority order.
    pub(super) input: Option<PathBuf>,
    #[serde(default)]
    pub(super) inputs: Vec<PathBuf>,
    /// One output queue (named after its directory), and/or `outputs`: named ones.
    /// Exit 0 passes on to every output (fan-out), unless `routes` sends it elsewhere.
    pub(super) output: Option<PathBuf>,
    #[serde(default)]
    pub(super) outputs: BTreeMap<String, PathBuf>,
    /// Exit code → output name (`dirq exec --route CODE=NAME`).
    #[serde(default)]
    pub(super) routes: BTreeMap<String, String>,
    /// `dirq exec --route-by-line`: a first line `dirq-route: NAME` chooses the output.
    #[serde(default)]
    pub(super) route_by_line: bool,
    /// An argument list, or a string run by `sh -c`.
    pub(super) command: CommandLine,
    #[serde(flatten)]
    pub(super) settings: StageSettings,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum CommandLine {
    Shell(String),
    Args(Vec<String>),
}

/// Settings a stage may give, or take from `[defaults]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StageSettings {
    /// Threads per process (`dirq exec -j`).
    pub(super) workers: Option<usize>,
    /// Supervised processes of the stage.
    pub(super) processes: Option<usize>,
    pub(super) timeout: Option<String>,
    pub(super) out_limit: Option<usize>,
    pub(super) on_fail: Option<String>,
    pub(super) retries: Option<u32>,
    pub(super) drain_timeout: Option<String>,
    /// Between SIGTERM and SIGKILL after a timeout (`dirq exec --kill-grace`).
    pub(super) kill_grace: Option<String>,
    /// Group commit (`dirq exec --commit-batch`, `--commit-delay`).
    pub(super) commit_batch: Option<usize>,
    pub(super) commit_delay: Option<String>,
    /// Expiry of the input queues (`dirq exec --max-age`).
    pub(super) max_age: Option<String>,
    /// Backpressure watermarks (`--out-resume`, `--out-limit-bytes`, `--out-resume-bytes`).
    pub(super) out_resume: Option<usize>,
    pub(super) out_limit_bytes: Option<u64>,
    pub(super) out_resume_bytes: Option<u64>,
    /// The failure breaker: `breaker = false` is `--no-breaker`; the others are
    /// `--breaker-failures`, `--breaker-rate`, `--breaker-min-samples`,
    /// `--breaker-window` and `--breaker-cooldown`.
    pub(super) breaker: Option<bool>,
    pub(super) breaker_failures: Option<u32>,
    pub(super) breaker_rate: Option<f64>,
    pub(super) breaker_min_samples: Option<u32>,
    pub(super) breaker_window: Option<String>,
    pub(super) breaker_cooldown: Option<String>,
    /// Permission bits of the queues and files the stage creates (`--dir-mode`,
    /// `--file-mode`): an octal integer (`0o2770`) or a string (`"2770"`).
    pub(super) dir_mode: Option<Mode>,
    pub(super) file_mode: Option<Mode>,
    /// Alerts (`--alert-cmd`, `--alert-url`, `--alert-interval`, `--alert-max-age`,
    /// `--alert-stale-after`).
    pub(super) alert_cmd: Option<String>,
    pub(super) alert_url: Option<String>,
    pub(super) alert_interval: Option<String>,
    pub(super) alert_max_age: Option<String>,
    pub(super) alert_stale_after: Option<String>,
    /// History and job logs: `history = false` is `--no-history`; `log_output = true`
    /// is `--log-output`, `log_limit` (`"1MiB"`) `--log-limit`.
    pub(super) history: Option<bool>,
    pub(super) log_output: Option<bool>,
    pub(super) log_limit: Option<String>,
}

/// A permission mode in a pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Mode {
    Bits(u32),
    Octal(String),
}

impl Mode {
    /// The permission bits; `key` names the setting in an error.
    fn bits(&self, key: &str) -> Result<u32, String> {
        match self {
            Mode::Bits(bits) => Ok(*bits),
            Mode::Octal(text) => parse_mode(text).map_err(|e| format!("{key}: {e}")),
        }
    }
}

impl StageSettings {
    pub(super) fn or(&self, defaults: &StageSettings) -> StageSettings {
        StageSettings {
            workers: self.workers.or(defaults.workers),
            processes: self.processes.or(defaults.processes),
            timeout: self.timeout.clone().or_else(|| defaults.timeout.clone()),
            out_limit: self.out_limit.or(defaults.out_limit),
            on_fail: self.on_fail.clone().or_else(|| defaults.on_fail.clone()),
            retries: self.retries.or(defaults.retries),
            kill_grace: self
                .kill_grace
                .clone()
                .or_else(|| defaults.kill_grace.clone()),
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
            alert_cmd: self
                .alert_cmd
                .clone()
                .or_else(|| defaults.alert_cmd.clone()),
            alert_url: self
                .alert_url
                .clone()
                .or_else(|| defaults.alert_url.clone()),
            alert_interval: self
                .alert_interval
                .clone()
                .or_else(|| defaults.alert_interval.clone()),
            alert_max_age: self
                .alert_max_age
                .clone()
                .or_else(|| defaults.alert_max_age.clone()),
            alert_stale_after: self
                .alert_stale_after
                .clone()
                .or_else(|| defaults.alert_stale_after.clone()),
            dir_mode: self.dir_mode.clone().or_else(|| defaults.dir_mode.clone()),
            history: self.history.or(defaults.history),
            log_output: self.log_output.or(defaults.log_output),
            log_limit: self
                .log_limit
                .clone()
                .or_else(|| defaults.log_limit.clone()),
            file_mode: self
                .file_mode
                .clone()
                .or_else(|| defaults.file_mode.clone()),
        }
    }
}

/// The most processes a stage may have: a mistyped count must not fork-bomb the host.
pub(super) const MAX_PROCESSES: usize = 1024;

/// A pipeline file read, resolved and checked: what `dirq run --check` validates.
pub(super) struct Loaded {
    pub(super) pipeline: Pipeline,
    /// The file's directory, absolute.
    pub(super) base: PathBuf,
    /// The `dirq exec` arguments of each stage.
    pub(super) commands: Vec<Vec<String>>,
}

pub(super) fn load(
    file: &Path,
    opener: &Opener,
) -> Result<Loaded, Box<dyn std::error::Error + Send + Sync>> {
    let text = std::fs::read_to_string(file).map_err(context(format!(
        "failed to read pipeline file {}",
        file.display()
    )))?;
    let pipeline: Pipeline = toml::from_str(&text)
        .map_err(|e| format!("invalid pipeline file {}: {e}", file.display()))?;
    if pipeline.stages.is_empty() {
        return Err(format!("pipeline file {} has no [[stage]]", file.display()).into());
    }
    // A reload matches stages by name (and dirq status shows them by it): two stages
    // of one name could not be told apart.
    for (index, stage) in pipeline.stages.iter().enumerate() {
        if pipeline.stages[..index]
            .iter()
            .any(|s| s.name == stage.name)
        {
            return Err(format!("stage {:?}: the name is used twice", stage.name).into());
        }
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

/// The first input of a stage and the ones after it, in priority order.
pub(super) fn stage_inputs(stage: &Stage) -> Result<(&PathBuf, &[PathBuf]), String> {
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

/// The outputs of a stage, named (`output` after its directory), checked as
/// `dirq exec` checks them against the stage's routes.
fn stage_outputs(stage: &Stage) -> Result<Vec<(String, PathBuf)>, String> {
    let bad = |what: String| format!("stage {:?}: {what}", stage.name);
    let to: Vec<(Option<String>, PathBuf)> = stage
        .output
        .iter()
        .map(|queue| (None, queue.clone()))
        .chain(
            stage
                .outputs
                .iter()
                .map(|(name, queue)| (Some(name.clone()), queue.clone())),
        )
        .collect();
    for (name, _) in &to {
        if let Some(name) = name.as_ref().filter(|n| !crate::args::is_output_name(n)) {
            return Err(bad(format!(
                "outputs: {name:?} is not an output name (letters, digits, - and _)"
            )));
        }
    }
    let routes = stage
        .routes
        .iter()
        .map(|(code, output)| parse_route(&format!("{code}={output}")))
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| bad(format!("routes: {e}")))?;
    super::super::exec::named_outputs(&to, &routes, stage.route_by_line).map_err(bad)
}

/// The `dirq exec` arguments of one stage.
pub(super) fn exec_command(
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
    check_command(stage, settings, base).map_err(bad)?;
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
    for (name, queue) in stage_outputs(stage)? {
        args.extend([
            "--to".to_owned(),
            format!("{name}={}", base.join(queue).to_string_lossy()),
        ]);
    }
    for (code, output) in &stage.routes {
        args.extend(["--route".to_owned(), format!("{code}={output}")]);
    }
    if stage.route_by_line {
        args.push("--route-by-line".to_owned());
    }
    // Checked as the stage's queues will check them: an impossible mode would only
    // crash-loop the stage.
    let mut modes = dirq::DirectoryQueue::builder(base.join(first));
    for (flag, key, mode) in [
        ("--dir-mode", "dir_mode", &settings.dir_mode),
        ("--file-mode", "file_mode", &settings.file_mode),
    ] {
        if let Some(mode) = mode {
            let bits = mode.bits(key).map_err(bad)?;
            match key {
                "dir_mode" => modes.dir_mode(bits),
                _ => modes.file_mode(bits),
            };
            args.extend([flag.to_owned(), format!("{bits:o}")]);
        }
    }
    modes.check().map_err(|e| bad(e.to_string()))?;
    for (flag, value) in [
        ("--timeout", &settings.timeout),
        ("--drain-timeout", &settings.drain_timeout),
        ("--kill-grace", &settings.kill_grace),
        ("--alert-interval", &settings.alert_interval),
        ("--alert-max-age", &settings.alert_max_age),
        ("--alert-stale-after", &settings.alert_stale_after),
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
    if settings.history == Some(false) {
        args.push("--no-history".to_owned());
    }
    if settings.log_output == Some(true) {
        args.push("--log-output".to_owned());
    }
    if let Some(limit) = &settings.log_limit {
        let bytes = crate::args::parse_size(limit).map_err(|e| bad(format!("log_limit: {e}")))?;
        if bytes < 1024 {
            return Err(bad(format!("log_limit = {limit:?}: must be at least 1KiB")));
        }
        args.extend(["--log-limit".to_owned(), limit.clone()]);
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
    if let Some(command) = &settings.alert_cmd {
        args.extend(["--alert-cmd".to_owned(), command.clone()]);
    }
    if let Some(url) = &settings.alert_url {
        args.extend(["--alert-url".to_owned(), url.clone()]);
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

/// The command, timeout, on-fail hook, retries and output limit of a stage, checked by
/// the library's builders as its `dirq exec` will build them: a command that cannot be
/// run or a zero limit is refused before anything starts, instead of making the stage
/// process exit at once and be restarted over and over.
fn check_command(stage: &Stage, settings: &StageSettings, base: &Path) -> Result<(), String> {
    let (program, args) = match &stage.command {
        CommandLine::Shell(line) => ("sh", vec!["-c", line.as_str()]),
        CommandLine::Args(list) => match list.split_first() {
            Some((program, args)) => (program.as_str(), args.iter().map(String::as_str).collect()),
            None => return Err("the command is empty".to_owned()),
        },
    };
    // A program path with a slash is relative to the file's directory, where the stage
    // runs; a bare name is looked up in PATH.
    let program = if program.contains('/') {
        base.join(program).into_os_string()
    } else {
        program.into()
    };
    let mut command = dirq::piper::CommandStage::builder(program, args);
    if let Some(timeout) = &settings.timeout {
        command.timeout(parse_duration(timeout).map_err(|e| format!("timeout: {e}"))?);
    }
    if let Some(hook) = &settings.on_fail {
        command.on_fail(hook);
    }
    command.build().map_err(|e| e.to_string())?;
    if let Some(retries) = settings.retries {
        dirq::queue::RetryPolicy::builder()
            .max_attempts(retries)
            .build()
            .map_err(|e| format!("retries = {retries}: {e}"))?;
    }
    if settings.out_limit == Some(0) {
        return Err("out_limit = 0: must be at least 1".to_owned());
    }
    check_alerts(settings)
}

/// The alert settings, checked by the library's [`AlertPolicy`](dirq::piper::AlertPolicy).
fn check_alerts(settings: &StageSettings) -> Result<(), String> {
    let duration = |key: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|v| parse_duration(v).map_err(|e| format!("{key}: {e}")))
            .transpose()
    };
    // The stage's `dirq exec` flags, turned into a policy the way exec turns them.
    let flags = crate::args::AlertArgs {
        alert_cmd: settings.alert_cmd.clone().map(Into::into),
        alert_url: settings.alert_url.clone(),
        alert_interval: duration("alert_interval", &settings.alert_interval)?,
        alert_max_age: duration("alert_max_age", &settings.alert_max_age)?,
        alert_stale_after: duration("alert_stale_after", &settings.alert_stale_after)?,
    };
    super::super::watch::policy(&flags)
        .check()
        .map_err(|e| e.to_string())
}

/// The expiry, watermarks and breaker settings of a stage, checked as its `dirq exec`
/// (the queue and Piper builders) would check them: a bad value stops the pipeline
/// before it starts rather than failing a stage process over and over.
pub(super) fn check_flow_settings(settings: &StageSettings) -> Result<(), String> {
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
