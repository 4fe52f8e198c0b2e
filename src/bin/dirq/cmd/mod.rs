//! One module per family of subcommands: open queues, call the library, print.

mod admin;
mod exec;
mod metrics;
mod produce;
mod report;
mod run;

use std::path::Path;

use clap::CommandFactory;
use dirq::{DirectoryQueue, Durability};

use crate::args::{Cli, Command, DurabilityArg};
use crate::output::CliResult;

pub(crate) fn run(cli: Cli) -> CliResult {
    let opener = Opener {
        durability: match cli.durability {
            DurabilityArg::Full => Durability::Full,
            DurabilityArg::Batch => Durability::Batch,
            DurabilityArg::None => Durability::None,
        },
    };
    match cli.command {
        Command::Init { queues, mode } => produce::init(&queues, mode),
        Command::Push { queue, files } => produce::push(&opener.create(&queue)?, &files),
        Command::Take {
            queue,
            count,
            to,
            wait,
            null,
        } => {
            let next = to.map(|to| opener.create(&to)).transpose()?;
            let separator = if null { b'\0' } else { b'\n' };
            produce::take(
                &opener.existing(&queue)?,
                next.as_ref(),
                count,
                wait,
                separator,
            )
        }
        Command::Cat { queue, id } => produce::cat(&opener.existing(&queue)?, &id),
        Command::Status {
            queues,
            spool,
            depth,
            json,
            watch,
        } => {
            let targets = report::Targets {
                opener: &opener,
                named: opener.all(&queues)?,
                spools: &spool,
                depth,
            };
            report::status(&targets, json, watch)
        }
        Command::Ls { queue, state, json } => report::ls(&opener.existing(&queue)?, state, json),
        Command::Ages { queues } => report::ages(&opener.all(&queues)?),
        Command::Metrics { queues } => metrics::metrics(&opener.all(&queues)?),
        Command::Requeue {
            queue,
            select,
            older_than,
            keep_attempts,
        } => admin::requeue(
            &opener.existing(&queue)?,
            &select,
            older_than,
            keep_attempts,
        ),
        Command::Hold { queue, select } => admin::hold(&opener.existing(&queue)?, &select),
        Command::Unhold { queue, select } => admin::unhold(&opener.existing(&queue)?, &select),
        Command::Delete { queue, select } => admin::delete(&opener.existing(&queue)?, &select),
        Command::Purge {
            queue,
            tmp_older_than,
            errors_older_than,
        } => admin::purge(&opener.existing(&queue)?, tmp_older_than, errors_older_than),
        Command::Check { queue, repair } => admin::check(&opener.existing(&queue)?, repair),
        Command::Recover { queues, grace } => admin::recover(&opener, &queues, grace),
        Command::Exec(args) => exec::exec(&opener, &args),
        Command::Run { file } => run::run(&file, &opener),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "dirq", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// Opens queues with the command line's durability.
pub(crate) struct Opener {
    pub(crate) durability: Durability,
}

impl Opener {
    /// An existing queue; a missing one is an error, not created by a typo.
    pub(crate) fn existing(&self, path: &Path) -> Result<DirectoryQueue, dirq::Error> {
        DirectoryQueue::builder(path)
            .create(false)
            .durability(self.durability)
            .open()
    }

    /// A queue, created when missing (a producer's target, like Mentat's).
    pub(crate) fn create(&self, path: &Path) -> Result<DirectoryQueue, dirq::Error> {
        DirectoryQueue::builder(path)
            .durability(self.durability)
            .open()
    }

    fn all(&self, paths: &[std::path::PathBuf]) -> Result<Vec<DirectoryQueue>, dirq::Error> {
        paths.iter().map(|p| self.existing(p)).collect()
    }
}
