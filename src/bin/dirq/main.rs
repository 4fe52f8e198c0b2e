//! `dirq`: the command-line tool. It parses arguments, calls the library and prints;
//! no protocol logic lives here.

mod args;
mod cmd;
mod human;
mod output;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    // Long-running commands report what they do (statistics, signals) by default.
    let daemon = matches!(
        cli.command,
        args::Command::Exec(_)
            | args::Command::Run { .. }
            | args::Command::Serve { .. }
            | args::Command::Bridge { .. }
    );
    init_logging(cli.verbose + u8::from(daemon));
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if let Some(status) = error.downcast_ref::<output::ExitStatus>() {
                return ExitCode::from(status.0);
            }
            print_error_chain(error.as_ref());
            ExitCode::from(1)
        }
    }
}

/// Prints `dirq: error: ...` and each cause on its own line.
pub(crate) fn print_error_chain(error: &(dyn std::error::Error + 'static)) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "dirq: error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = writeln!(stderr, "  caused by: {cause}");
        source = cause.source();
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("DIRQ_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let journal = stderr_is_journal();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written is dropped: a reader of standard error that
        // went away (`dirq run ... 2>&1 | head`) must not panic a worker holding claimed
        // messages. tracing-subscriber would report the failed write with eprintln!,
        // which panics on a closed pipe, hence no internal error logging either.
        .with_writer(|| output::QuietStderr)
        .log_internal_errors(false)
        .with_target(false);
    // The journal stamps each line itself.
    if journal {
        subscriber.without_time().init();
    } else {
        subscriber.init();
    }
}

/// Whether standard error is systemd's journal stream: `JOURNAL_STREAM` holds its
/// `device:inode`. Compared rather than trusted, since a shell started by a service
/// passes the variable on to commands whose standard error is a terminal or a file.
#[cfg(unix)]
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    stream.to_str() == Some(&format!("{}:{}", stat.st_dev, stat.st_ino))
}

#[cfg(not(unix))]
fn stderr_is_journal() -> bool {
    false
}
