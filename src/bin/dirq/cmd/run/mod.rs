//! `dirq run PIPELINE.toml`: the stages of a pipeline as `dirq exec` processes,
//! supervised by this one, which restarts workers that crash and stops them all on
//! SIGTERM or SIGINT. SIGUSR1 logs the supervisor's statistics and is passed on to every
//! stage process, which logs its own. On Linux every stage process gets SIGTERM (and
//! drains) when the supervisor dies, even by SIGKILL.
//!
//! SIGHUP reloads the file: it is read and checked as at start (`--check` included),
//! and a bad file is logged and changes nothing. Stages are matched by name: one whose
//! `dirq exec` arguments and process count are unchanged keeps its processes; a changed
//! one drains (SIGTERM) and starts anew with its new settings once every old process
//! has exited; a removed one drains; an added one starts.
//!
//! Under systemd (`NOTIFY_SOCKET` set) the supervisor reports readiness, reloads,
//! stopping and watchdog keep-alives: see `notify.rs`.

mod notify;
mod pipeline;
mod signals;
mod supervisor;

use std::io::Write;
use std::path::Path;

use super::Opener;
use crate::output::{quiet_broken_pipe, stdout_error, CliResult};
use pipeline::{load, stage_inputs, Loaded};

pub(crate) fn run(file: &Path, check: bool, opener: &Opener) -> CliResult {
    let loaded = load(file, opener)?;
    if check {
        check_inputs(&loaded, opener)?;
        return print_ok(file, &loaded);
    }
    supervisor::supervise(file, loaded, opener)
}

/// A pipeline file read and checked as `dirq run --check` does: what a reload applies.
fn load_checked(
    file: &Path,
    opener: &Opener,
) -> Result<Loaded, Box<dyn std::error::Error + Send + Sync>> {
    let loaded = load(file, opener)?;
    check_inputs(&loaded, opener)?;
    Ok(loaded)
}

/// Every stage's input queues exist (a stage whose input is missing would be restarted
/// over and over); outputs are created when missing. Changes nothing.
fn check_inputs(loaded: &Loaded, opener: &Opener) -> Result<(), String> {
    for stage in &loaded.pipeline.stages {
        let (first, also) = stage_inputs(stage)?;
        for input in std::iter::once(first).chain(also) {
            opener
                .inspect(&loaded.base.join(input))
                .map_err(|e| format!("stage {:?}: input queue: {e}", stage.name))?;
        }
    }
    Ok(())
}

/// `dirq run --check`'s one line.
fn print_ok(file: &Path, loaded: &Loaded) -> CliResult {
    let pipeline = &loaded.pipeline;
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
