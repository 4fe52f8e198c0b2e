//! Writing results: errors with context, standard output, progress bars.

use std::error::Error as StdError;
use std::fmt;
use std::io::{self, IsTerminal};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What every command returns.
pub(crate) type CliResult = Result<(), Box<dyn StdError + Send + Sync>>;

/// An error with what the command was doing, for causes that do not say it themselves.
#[derive(Debug)]
pub(crate) struct Context {
    what: String,
    source: io::Error,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl StdError for Context {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.source)
    }
}

/// Wraps an I/O error with what was being done.
pub(crate) fn context(what: impl Into<String>) -> impl FnOnce(io::Error) -> Context {
    move |source| Context {
        what: what.into(),
        source,
    }
}

/// The error of a failed write to standard output.
pub(crate) fn stdout_error(e: io::Error) -> Context {
    context("failed to write to standard output")(e)
}

/// For listings: a reader that stopped reading (`dirq ls | head`) is not an error.
pub(crate) fn quiet_broken_pipe(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// For reports of work done (`hold`, `check`, `recover`, ...): a reader that stopped
/// reading neither fails the command nor stops the work still to do; other write
/// errors still do. Use as `.or_else(unless_broken_pipe)`.
pub(crate) fn unless_broken_pipe(e: io::Error) -> io::Result<()> {
    quiet_broken_pipe(Err(e))
}

/// Standard error for log lines, where a failed write (closed pipe, full disk) is
/// dropped rather than reported: nothing can be reported on a stream that fails, and a
/// panic there would kill a worker holding claimed messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuietStderr;

impl io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// A command's verdict that is not an error to print: `check` found problems.
#[derive(Debug)]
pub(crate) struct ExitStatus(pub(crate) u8);

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl StdError for ExitStatus {}

/// Operations over at least this many messages show a progress bar on a terminal.
const PROGRESS_FROM: u64 = 1000;

/// A progress bar on standard error for `total` steps of `what`; hidden when standard
/// error is not a terminal or the job is small.
pub(crate) fn progress(total: u64, what: &str) -> ProgressBar {
    if total < PROGRESS_FROM || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}
