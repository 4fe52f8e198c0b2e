//! Command-line arguments.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Message queues kept as plain directories (the filer protocol).
///
/// A queue is a directory with tmp/, incoming/, pending/ and errors/. Any number of
/// processes share it; nothing acknowledged is lost in a crash.
#[derive(Debug, Parser)]
#[command(name = "dirq", version, propagate_version = true, max_term_width = 100)]
#[command(after_help = "Logging: set DIRQ_LOG (for example DIRQ_LOG=debug) or use -v.")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,

    /// More log output on standard error (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,

    /// What mutating commands sync before they report success.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Full, global = true)]
    pub(crate) durability: DurabilityArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DurabilityArg {
    /// Sync files and directories: acknowledged means it survives power loss.
    Full,
    /// Sync files; sync directories once at the end of the command.
    Batch,
    /// Never sync (Mentat's behaviour; for tmpfs).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StateArg {
    Incoming,
    Pending,
    Errors,
    Tmp,
    Deferred,
    Hold,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create queues (the directory and its tmp/, incoming/, pending/, errors/).
    #[command(
        after_help = "Examples:\n  dirq init /var/spool/dirq/input /var/spool/dirq/parsed\n  dirq init --mode 0770 /srv/q"
    )]
    Init {
        /// Queue directories to create.
        #[arg(required = true, value_name = "QUEUE")]
        queues: Vec<PathBuf>,
        /// Permission bits of created directories, in octal.
        #[arg(long, default_value = "0775", value_parser = parse_mode)]
        mode: u32,
    },

    /// Enqueue each FILE (or standard input) as one message; print one id per line.
    #[command(
        after_help = "Examples:\n  dirq push q event1.json event2.json\n  echo '{\"a\": 1}' | dirq push q"
    )]
    Push {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// Files to enqueue; standard input when none (or for \"-\").
        #[arg(value_name = "FILE")]
        files: Vec<OsString>,
    },

    /// Claim up to N of the oldest messages and print (then commit) or forward them.
    #[command(
        after_help = "Without --to, each message is written to standard output followed by a newline \
(a NUL with -0) and then committed; a message that cannot be written is released.\n\n\
Examples:\n  dirq take q                     # print and remove the oldest message\n  \
dirq take q -n 100 -0 | xargs -0 -n1 echo\n  dirq take q --to next -n 10      # move 10 messages on\n  \
dirq take q --wait 30           # wait up to 30 s for the first message"
    )]
    Take {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// How many messages to take at most.
        #[arg(short = 'n', long = "count", default_value_t = 1, value_name = "N")]
        count: u64,
        /// Forward each message to this queue and print its id instead.
        #[arg(long, value_name = "NEXT")]
        to: Option<PathBuf>,
        /// Wait up to SECS for the first message.
        #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
        wait: Option<std::time::Duration>,
        /// Separate messages with NUL instead of newline.
        #[arg(short = '0', long = "null")]
        null: bool,
    },

    /// Counts per state, the age of the oldest waiting message, and the Pipers at work.
    #[command(
        after_help = "Examples:\n  dirq status q1 q2\n  dirq status --json q1 | jq .incoming"
    )]
    Status {
        /// Queues to report on.
        #[arg(required = true, value_name = "QUEUE")]
        queues: Vec<PathBuf>,
        /// One JSON object per queue per line: queue, incoming, pending, errors, tmp,
        /// deferred, hold, oldest_age_s, and the Pipers that advertise under it.
        #[arg(long)]
        json: bool,
    },

    /// List messages, one per line, oldest first.
    #[command(
        after_help = "Examples:\n  dirq ls q\n  dirq ls q --state errors\n  dirq ls q --json | jq -r 'select(.state == \"errors\") | .reason'"
    )]
    Ls {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// Only this state (default: all but tmp).
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// One JSON object per line: id, state, size, age_s, attempts, not_before (deferred)
        /// and reason (errors).
        #[arg(long)]
        json: bool,
    },

    /// Print one message without claiming it (from incoming/, pending/ or errors/).
    #[command(after_help = "Example:\n  dirq cat q 1763797920.123456789.host.4242.9f3a1c2b.msg")]
    Cat {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// The message id (its file name).
        #[arg(value_name = "ID")]
        id: OsString,
    },

    /// Requeue messages of dead workers and remove abandoned temporary files.
    #[command(
        after_help = "Safe to run at any time, from any number of processes: a message whose \
worker is alive (even stopped) is never touched.\n\nExample:\n  dirq recover q1 q2"
    )]
    Recover {
        /// Queues to recover.
        #[arg(required = true, value_name = "QUEUE")]
        queues: Vec<PathBuf>,
        /// Leave unlocked pending messages younger than SECS alone (for queues shared
        /// with Mentat daemons, which take no locks).
        #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
        grace: Option<std::time::Duration>,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8).map_err(|_| format!("{s:?} is not an octal mode like 0775"))
}

fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    std::time::Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} is not a non-negative number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn modes_and_seconds_parse() {
        assert_eq!(parse_mode("0775"), Ok(0o775));
        assert_eq!(parse_mode("0o700"), Ok(0o700));
        assert!(parse_mode("9").is_err());
        assert_eq!(
            parse_seconds("1.5"),
            Ok(std::time::Duration::from_millis(1500))
        );
        assert!(parse_seconds("-1").is_err());
    }
}
