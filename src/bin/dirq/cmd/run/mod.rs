//! `dirq run PIPELINE.toml`: the stages of a pipeline as `dirq exec` processes,
//! supervised by this one, which restarts workers that crash and stops them all on
//! SIGTERM or SIGINT. SIGUSR1 logs the supervisor's statistics and is passed on to every
//! stage process, which logs its own. On Linux every stage process gets SIGTERM (and
//! drains) when the supervisor dies, even by SIGKILL.

mod pipeline;
mod signals;
mod supervisor;

use std::io::Write;
use std::path::Path;

use super::Opener;
use crate::output::{quiet_broken_pipe, stdout_error, CliResult};
use pipeline::{load, stage_inputs, Pipeline};

pub(crate) fn run(file: &Path, check: bool, opener: &Opener) -> CliResult {
    let loaded = load(file, opener)?;
    if check {
        return check_inputs(file, &loaded.pipeline, &loaded.base, opener);
    }
    supervisor::supervise(file, loaded)
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
