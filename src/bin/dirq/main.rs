//! `dirq`: the command-line tool. It parses arguments, calls the library and prints;
//! no protocol logic lives here.

mod args;
mod commands;
mod human;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    init_logging(cli.verbose);
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            print_error_chain(error.as_ref());
            ExitCode::from(1)
        }
    }
}

/// Prints `dirq: error: ...` and each cause on its own line.
fn print_error_chain(error: &(dyn std::error::Error + 'static)) {
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
