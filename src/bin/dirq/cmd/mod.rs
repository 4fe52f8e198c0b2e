//! One module per family of subcommands: open queues, call the library, print.

mod admin;
#[cfg(feature = "nats")]
mod bridge;
mod edit;
mod exec;
mod history;
mod metrics;
mod produce;
mod report;
mod run;
mod serve;
mod watch;

use std::cell::RefCell;
use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use dirq::{DirectoryQueue, Durability, QueueBuilder};

use crate::args::{Cli, Command, DurabilityArg};
use crate::output::{quiet_broken_pipe, stdout_error, CliResult};

pub(crate) fn run(cli: Cli) -> CliResult {
    let opener = Opener::new(match cli.durability {
        DurabilityArg::Full => Durability::Full,
        DurabilityArg::Batch => Durability::Batch,
        DurabilityArg::None => Durability::None,
    });
    let result = dispatch(cli.command, &opener);
    // After an error too: what the command did before it failed is as acknowledged
    // (printed ids, moved messages) as what a successful one did.
    let mut failures = opener.sync_all().into_iter();
    match (result, failures.next()) {
        (result, None) => result,
        (Ok(()), Some(first)) => {
            for other in failures {
                crate::print_error_chain(&other);
            }
            Err(Box::new(first))
        }
        (Err(error), Some(first)) => {
            for failure in std::iter::once(first).chain(failures) {
                crate::print_error_chain(&failure);
            }
            Err(error)
        }
    }
}

fn dispatch(command: Command, opener: &Opener) -> CliResult {
    match command {
        Command::Init {
            queues,
            mode,
            seen_ttl,
        } => produce::init(&queues, mode, seen_ttl),
        Command::Push {
            queue,
            files,
            at,
            delay,
            group,
            ordered,
            id,
        } => {
            if let Some(id) = id {
                return produce::push_with_id(
                    &opener.create(&queue)?,
                    &files,
                    &dirq::MessageId::new(id)?,
                );
            }
            let placement = match group {
                Some(name) if ordered => {
                    produce::Placement::Group(dirq::queue::Group::ordered(name)?)
                }
                Some(name) => produce::Placement::Group(dirq::queue::Group::new(name)?),
                None => match at.or_else(|| delay.map(|d| std::time::SystemTime::now() + d)) {
                    Some(when) => produce::Placement::At(when),
                    None => produce::Placement::Now,
                },
            };
            produce::push(&opener.create(&queue)?, &files, &placement)
        }
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
        Command::Edit { queue, id, from } => {
            edit::edit(&opener.existing(&queue)?, &id, from.as_deref())
        }
        Command::History {
            queue,
            since,
            outcome,
            id,
            json,
        } => history::history(&opener.inspect(&queue)?, since, outcome, id, json),
        Command::Log { queue, id } => history::log(&opener.inspect(&queue)?, &id),
        Command::Cat { queue, id } => produce::cat(&opener.inspect(&queue)?, &id),
        Command::Status {
            queues,
            spool,
            depth,
            json,
            watch,
        } => {
            let targets = report::Targets {
                opener,
                named: opener.inspect_all(&queues)?,
                spools: &spool,
                depth,
            };
            report::status(&targets, json, watch)
        }
        Command::Ls { queue, state, json } => report::ls(&opener.inspect(&queue)?, state, json),
        Command::Ages { queues } => report::ages(&opener.inspect_all(&queues)?),
        Command::Metrics { queues } => metrics::metrics(&opener.inspect_all(&queues)?),
        Command::Requeue {
            queue,
            group: Some(group),
            keep_attempts,
            ..
        } => admin::requeue_group(&opener.existing(&queue)?, &group, keep_attempts),
        Command::Requeue {
            queue,
            select,
            older_than,
            keep_attempts,
            group: None,
        } => admin::requeue(
            &opener.existing(&queue)?,
            &select,
            older_than,
            keep_attempts,
        ),
        Command::Hold { queue, select } => admin::hold(&opener.existing(&queue)?, &select),
        Command::Unhold { queue, select } => admin::unhold(&opener.existing(&queue)?, &select),
        Command::Flush { queue, select } => admin::flush(&opener.existing(&queue)?, &select),
        Command::Cancel {
            queue,
            id,
            requeue,
            wait,
        } => admin::cancel(&opener.existing(&queue)?, &id, requeue, wait),
        Command::Delete { queue, select } => admin::delete(&opener.existing(&queue)?, &select),
        Command::Purge {
            queue,
            tmp_older_than,
            errors_older_than,
        } => admin::purge(&opener.existing(&queue)?, tmp_older_than, errors_older_than),
        Command::Check { queue, repair } => admin::check(&opener.existing(&queue)?, repair),
        Command::Recover { queues, grace } => admin::recover(opener, &queues, grace),
        Command::Exec(args) => exec::exec(opener, &args),
        Command::Watch {
            queues,
            alerts,
            every,
            once,
        } => watch::watch(opener, &queues, &alerts, every, once),
        Command::Run { file, check } => run::run(&file, check, opener),
        #[cfg(feature = "serve")]
        Command::Serve {
            root,
            listen,
            token_file,
            max_body,
        } => serve::serve(
            &root,
            listen,
            token_file.as_deref(),
            max_body,
            opener.durability,
        ),
        #[cfg(not(feature = "serve"))]
        Command::Serve { .. } => serve::not_built(),
        Command::Completions { shell } => {
            // Written here, not by clap_complete, which panics when standard output is
            // closed.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "dirq", &mut script);
            let mut out = std::io::stdout().lock();
            quiet_broken_pipe(out.write_all(&script).and_then(|()| out.flush()))
                .map_err(stdout_error)?;
            Ok(())
        }
        #[cfg(feature = "nats")]
        Command::Bridge(command) => bridge::bridge(opener, command),
        #[cfg(not(feature = "nats"))]
        Command::Bridge { .. } => Err(
            "this dirq was built without the NATS bridge (cargo feature \
`nats`); build one with it: cargo install --path . --features nats"
                .into(),
        ),
    }
}

/// Opens queues with the command line's durability, and syncs at the end of the
/// command what it changed in them.
pub(crate) struct Opener {
    pub(crate) durability: Durability,
    /// Every queue opened to be changed. A clone shares its handle's unsynced changes
    /// ([`Durability::Batch`] defers directory syncs to [`DirectoryQueue::sync`]), so
    /// syncing the clones covers whatever the command did through any of them.
    opened: RefCell<Vec<DirectoryQueue>>,
}

impl Opener {
    fn new(durability: Durability) -> Opener {
        Opener {
            durability,
            opened: RefCell::new(Vec::new()),
        }
    }

    /// Opens the queue `builder` describes with the command line's durability, to be
    /// synced when the command ends.
    pub(crate) fn open(&self, builder: &mut QueueBuilder) -> Result<DirectoryQueue, dirq::Error> {
        let queue = builder.durability(self.durability).open()?;
        self.opened.borrow_mut().push(queue.clone());
        Ok(queue)
    }

    /// An existing queue; a missing one is an error, not created by a typo.
    pub(crate) fn existing(&self, path: &Path) -> Result<DirectoryQueue, dirq::Error> {
        self.open(DirectoryQueue::builder(path).create(false))
    }

    /// A queue, created when missing (a producer's target, like Mentat's).
    pub(crate) fn create(&self, path: &Path) -> Result<DirectoryQueue, dirq::Error> {
        self.open(&mut DirectoryQueue::builder(path))
    }

    /// An existing queue a command only looks at. It is not kept for the final sync:
    /// it has nothing to sync, and `status --watch` opens its queues again at every
    /// refresh, so keeping them would hold more descriptors at each one.
    pub(crate) fn inspect(&self, path: &Path) -> Result<DirectoryQueue, dirq::Error> {
        DirectoryQueue::builder(path)
            .create(false)
            .durability(self.durability)
            .open()
    }

    fn inspect_all(
        &self,
        paths: &[std::path::PathBuf],
    ) -> Result<Vec<DirectoryQueue>, dirq::Error> {
        paths.iter().map(|p| self.inspect(p)).collect()
    }

    /// Syncs every queue opened to be changed, each once, and returns the failures
    /// (each names the directory that could not be synced). A no-op in full mode,
    /// where every operation synced before it returned, and in none.
    fn sync_all(&self) -> Vec<dirq::Error> {
        self.opened
            .borrow()
            .iter()
            .filter_map(|queue| queue.sync().err())
            .collect()
    }
}
