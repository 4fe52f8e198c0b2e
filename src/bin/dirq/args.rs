//! Command-line arguments.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Message queues kept as plain directories (the filer protocol).
///
/// A queue is a directory with tmp/, incoming/, pending/ and errors/ (and dirq's
/// deferred/, hold/ and chained/). Any number of processes share it; nothing acknowledged is lost
/// in a crash.
#[derive(Debug, Parser)]
#[command(name = "dirq", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Logging: set DIRQ_LOG (for example DIRQ_LOG=debug) or use -v.\n\
Durations are seconds or a number with a unit: 30s, 5m, 2h, 1d."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,

    /// More log output on standard error (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,

    /// What mutating commands sync before they report success. In exec and run (Pipers),
    /// full and batch both mean group commit (see exec --commit-batch), none no sync.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Full, global = true)]
    pub(crate) durability: DurabilityArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DurabilityArg {
    /// Sync files and directories: acknowledged means it survives power loss.
    Full,
    /// Sync files; sync each changed directory once, when the command ends (also
    /// after an error).
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
    // hold, unhold, flush, delete and requeue override their usage: clap puts a required group
    // (`<ID|--all>`) before the positionals, the reverse of the order it parses.
    /// Create queues (the directory and its state directories).
    #[command(
        after_help = "Examples:\n  dirq init /var/spool/dirq/input /var/spool/dirq/parsed\n  dirq init --mode 2770 /srv/q\n  dirq init --seen-ttl 1h /srv/inbound"
    )]
    Init {
        /// Queue directories to create.
        #[arg(required = true, value_name = "QUEUE")]
        queues: Vec<PathBuf>,
        /// Permission bits of the queue's directories, in octal, applied exactly
        /// (setgid allowed: 2770 for a group of cooperating users, as Mentat's
        /// queue_in_perms). Given, it is also set on the directories of queues that
        /// exist already. Default: 0775 for what is created; existing ones unchanged.
        #[arg(long, value_name = "MODE", value_parser = parse_mode)]
        mode: Option<u32>,
        /// Remember the ids of finished messages for DUR (1h, 10m) in seen/, so that
        /// `push --id` and other idempotent enqueues refuse an id already processed;
        /// 0 turns it off. A setting of the queue, honoured by every process that opens
        /// it afterwards. Default: unchanged (off in a new queue).
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        seen_ttl: Option<Duration>,
    },

    /// Enqueue each FILE (or standard input) as one message; print one id per line.
    #[command(
        after_help = "With --at or --delay the messages wait in deferred/ until then (a time not in \
the future delivers at once); `dirq flush` delivers them early.\n\n\
Examples:\n  dirq push q event1.json event2.json\n  echo '{\"a\": 1}' | dirq push q\n  \
dirq push q --delay 10m reminder.json\n  dirq push q --at 2026-12-01T08:00:00Z report.json\n  \
dirq push q --at @$(date -d 'tomorrow 08:00' +%s) report.json\n  \
dirq push q --id order-17 order.json  # a second push of order-17 enqueues nothing"
    )]
    Push {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// Files to enqueue; standard input when none, or for "-".
        #[arg(value_name = "FILE")]
        files: Vec<OsString>,
        /// Deliver at TIME: RFC 3339 with a zone (2026-12-01T08:00:00Z,
        /// 2026-12-01 09:00:00+01:00) or @SECONDS since the Unix epoch.
        #[arg(long, value_name = "TIME", value_parser = parse_time, conflicts_with = "delay")]
        at: Option<SystemTime>,
        /// Deliver after DUR (10m, 2h, 1d).
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        delay: Option<Duration>,
        /// Make each message a member of the group NAME (letters, digits, - and _): when
        /// one member fails, the members still waiting go to errors/ ("cancelled").
        #[arg(long, value_name = "NAME", conflicts_with_all = ["at", "delay"])]
        group: Option<String>,
        /// With --group: the members run one at a time, in the order pushed; each waits
        /// in chained/ until the one before it is committed or forwarded.
        #[arg(long, requires = "group")]
        ordered: bool,
        /// Enqueue the one message under ID, unless the queue has a message with this id
        /// or remembers finishing one (see `init --seen-ttl`); then nothing is enqueued
        /// and a note says where the id is.
        #[arg(long, value_name = "ID", conflicts_with_all = ["at", "delay", "group"])]
        id: Option<String>,
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
        /// How many messages to take at most (at least 1).
        #[arg(
            short = 'n',
            long = "count",
            default_value_t = 1,
            value_name = "N",
            value_parser = clap::value_parser!(u64).range(1..)
        )]
        count: u64,
        /// Forward each message to this queue and print its id instead.
        #[arg(long, value_name = "NEXT")]
        to: Option<PathBuf>,
        /// Wait up to SECS for the first message.
        #[arg(long, value_name = "SECS", value_parser = parse_duration)]
        wait: Option<Duration>,
        /// Separate messages with NUL instead of newline.
        #[arg(short = '0', long = "null")]
        null: bool,
    },

    /// Counts and bytes per state, the oldest waiting message, and the Pipers at work.
    #[command(
        after_help = "The queues named come first, then those found under each --spool ROOT, sorted by \
name; give either or both. A directory that cannot be read under ROOT is reported on standard \
error, the rest is shown, and the exit status is 1.\n\nExamples:\n  dirq status q1 q2\n  \
dirq status --spool /var/mentat/spool\n  dirq status --watch 2 --spool /var/spool/dirq\n  \
dirq status --json q1 | jq .incoming"
    )]
    Status {
        /// Queues to report on.
        #[arg(required_unless_present = "spool", value_name = "QUEUE")]
        queues: Vec<PathBuf>,
        /// Also report every queue under ROOT: each directory with incoming/, pending/,
        /// errors/ and tmp/, not following symlinks, not entering hidden directories or
        /// queues. Found again at each --watch refresh. Repeatable.
        #[arg(long, value_name = "ROOT")]
        spool: Vec<PathBuf>,
        /// How many directories below a --spool ROOT a queue may be [default: 4].
        #[arg(long, value_name = "N", requires = "spool")]
        depth: Option<usize>,
        /// One JSON object per queue per line: queue, incoming, pending, errors, tmp,
        /// deferred, hold, bytes, oldest_age_s, the Pipers that advertise under it, and
        /// last_hour: the outcomes of the last hour from its history (ok, fail, timeout,
        /// retried, released).
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds, in place (until interrupted); at least 0.1.
        #[arg(long, value_name = "SECS", value_parser = parse_watch_interval)]
        watch: Option<Duration>,
    },

    /// List messages, one per line, oldest first.
    #[command(
        after_help = "Each line shows the state, size, age, attempts, and where they apply the due \
time (deferred), the owner's pid (pending) and the failure reason (errors).\n\nExamples:\n  dirq ls q\n  \
dirq ls q --state errors\n  dirq ls q --json | jq -r 'select(.state == \"errors\") | .reason'"
    )]
    Ls {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// Only this state (default: all but tmp).
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// One JSON object per line: id, state, size, age_s, attempts, and not_before
        /// (deferred), held (hold), owner_pid (pending), reason (errors).
        #[arg(long)]
        json: bool,
    },

    /// Histogram of message ages per state, like Postfix's qshape.
    #[command(
        after_help = "Columns: T is the total; each other column counts messages younger than that \
many minutes (and older than the column before); 1280+ counts the rest.\n\nExamples:\n  dirq ages q\n  \
dirq ages /var/spool/dirq/*"
    )]
    Ages {
        /// Queues to report on.
        #[arg(required = true, value_name = "QUEUE")]
        queues: Vec<PathBuf>,
    },

    /// The outcomes Pipers recorded in a queue's history, oldest first.
    #[command(
        after_help = "Pipers (dirq exec, dirq run) append one line per outcome to QUEUE/history/ \
current.jsonl, rotated into files named by their first time; every file is read, the \
rotated ones first. Outcomes: committed, forwarded, emitted, failed, dead_lettered, \
timed_out, retried, released, stopped.\n\nExamples:\n  dirq history q --since 1h\n  \
dirq history q --outcome failed --since 1d\n  dirq history q --id 1763797920.123456789.host.4242.9f3a1c2b.msg\n  \
dirq history q --json | jq -r 'select(.duration_ms > 1000) | .id'"
    )]
    History {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// Only outcomes of the last DUR (30m, 1h, 2d).
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only this outcome (committed, failed, dead_lettered, timed_out, ...).
        #[arg(long, value_name = "OUTCOME", value_parser = parse_outcome)]
        outcome: Option<dirq::admin::HistoryOutcome>,
        /// Only this message id.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// The JSON lines as written: id, outcome, time, attempts, duration_ms,
        /// reason, exit_code, piper, pid, host.
        #[arg(long)]
        json: bool,
    },

    /// Print the job log of a message (dirq exec --log-output): each attempt's output.
    #[command(after_help = "Example:\n  dirq log q 1763797920.123456789.host.4242.9f3a1c2b.msg")]
    Log {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// The message id.
        #[arg(value_name = "ID")]
        id: OsString,
    },

    /// Print one message without claiming it.
    #[command(after_help = "Example:\n  dirq cat q 1763797920.123456789.host.4242.9f3a1c2b.msg")]
    Cat {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// The message id (its file name).
        #[arg(value_name = "ID")]
        id: OsString,
    },

    /// Edit a waiting message (incoming, deferred or held) before a worker takes it.
    #[command(
        after_help = "Opens $VISUAL (else $EDITOR, else vi) on a copy of the message. The new content \
replaces the message atomically under the same id, in the same state (a deferred message keeps \
its due time), and only if no worker claimed it meanwhile; otherwise nothing changes and the \
path of the edited copy is printed. Without a terminal, give --from.\n\n\
Examples:\n  dirq edit q 1763797920.123456789.host.4242.9f3a1c2b.msg\n  \
dirq cat q ID | sed 's/prio=low/prio=high/' | dirq edit q ID --from -"
    )]
    Edit {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// The message id (its file name).
        #[arg(value_name = "ID")]
        id: OsString,
        /// Take the new content from FILE ("-" for standard input) instead of an editor.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
    },

    /// Stop a running message: the Piper processing it abandons it.
    #[command(
        after_help = "The owner of the message (the process holding the lock on pending/ID) must \
be a Piper reading this queue on this host, such as dirq exec or dirq run. It is asked through a \
request file in QUEUE/pipers/cancel/; for dirq exec, the command's process group gets SIGTERM, \
then SIGKILL after the kill grace. The message goes to errors/ with reason \"cancelled by \
operator\" (the on-fail hook runs), or with --requeue back to incoming/ (not a failure; the \
cancelled run still counts as an attempt). dirq cancel waits for the Piper's answer and prints \
where the message went.\n\n\
Refused (exit 1, nothing changed) for a message that is not running (waiting, failed, unknown), \
one in pending/ whose owner died (use dirq recover), and one claimed by a process that is not a \
Piper (dirq take, a library program). With no answer within --wait, the request is withdrawn and \
dirq cancel exits 1.\n\n\
Examples:\n  dirq cancel q 1763797920.123456789.host.4242.9f3a1c2b.msg\n  \
dirq cancel q 1763797920.123456789.host.4242.9f3a1c2b.msg --requeue\n  \
dirq ls q --state pending --json | jq -r .id | xargs -n1 dirq cancel q --wait 30s"
    )]
    Cancel {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// The message id (its file name).
        #[arg(value_name = "ID")]
        id: OsString,
        /// Put the message back into incoming/ instead of errors/.
        #[arg(long)]
        requeue: bool,
        /// How long to wait for the Piper's answer.
        #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
        wait: Duration,
    },

    /// Move failed messages from errors/ back to incoming/.
    #[command(
        override_usage = "dirq requeue [OPTIONS] <QUEUE> <ID>...\n       dirq requeue [OPTIONS] <QUEUE> --all\n       dirq requeue [OPTIONS] <QUEUE> --group NAME",
        after_help = "Attempt counts start over unless --keep-attempts is given; the failure \
sidecars are removed.\n\nExamples:\n  dirq requeue q 1763797920.123456789.host.4242.9f3a1c2b.msg\n  \
dirq requeue q --all\n  dirq requeue q --all --older-than 1h\n  dirq requeue q --group nightly"
    )]
    Requeue {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        #[command(flatten)]
        select: Selection,
        /// Every member of the group NAME in errors/ (the failed one and those cancelled
        /// with it); an ordered group's members go back to chained/ and run in order.
        #[arg(long, value_name = "NAME", group = "Selection")]
        group: Option<String>,
        /// Only messages that failed longer ago than this.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Keep the attempt counts instead of starting over.
        #[arg(long)]
        keep_attempts: bool,
    },

    /// Put waiting messages on hold: they are not claimed until unheld.
    #[command(
        override_usage = "dirq hold [OPTIONS] <QUEUE> <ID>...\n       dirq hold [OPTIONS] <QUEUE> --all",
        after_help = "Examples:\n  dirq hold q 1763797920.123456789.host.4242.9f3a1c2b.msg\n  \
dirq ls q --json | jq -r 'select(.size > 1000000) | .id' | dirq hold q -\n  dirq hold q --all"
    )]
    Hold {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        #[command(flatten)]
        select: Selection,
    },

    /// Move held messages back to incoming/ (the opposite of hold).
    ///
    /// Called `release` before 0.2; that name still works but is hidden, because a
    /// claimed message's release (back to incoming/) is another thing.
    #[command(
        override_usage = "dirq unhold [OPTIONS] <QUEUE> <ID>...\n       dirq unhold [OPTIONS] <QUEUE> --all",
        alias = "release",
        after_help = "Examples:\n  dirq unhold q 1763797920.123456789.host.4242.9f3a1c2b.msg\n  dirq unhold q --all"
    )]
    Unhold {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        #[command(flatten)]
        select: Selection,
    },

    /// Deliver deferred messages now instead of at their due time (like postqueue -f / -i).
    #[command(
        override_usage = "dirq flush [OPTIONS] <QUEUE> <ID>...\n       dirq flush [OPTIONS] <QUEUE> --all",
        after_help = "Deferred messages are retries waiting out their backoff and messages pushed with \
--at or --delay. A flushed message keeps its attempt count.\n\nExamples:\n  \
dirq flush q --all\n  dirq flush q 1763797920.123456789.host.4242.9f3a1c2b.msg\n  \
dirq ls q --state deferred --json | jq -r .id | dirq flush q -"
    )]
    Flush {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        #[command(flatten)]
        select: Selection,
    },

    /// Delete messages (waiting, deferred, held or failed; never claimed ones).
    #[command(
        override_usage = "dirq delete [OPTIONS] <QUEUE> <ID>...\n       dirq delete [OPTIONS] <QUEUE> --all",
        after_help = "Examples:\n  dirq delete q 1763797920.123456789.host.4242.9f3a1c2b.msg\n  \
dirq ls q --state errors --json | jq -r .id | dirq delete q -\n  dirq delete q --all"
    )]
    Delete {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        #[command(flatten)]
        select: Selection,
    },

    /// Remove abandoned temporary files and, optionally, old failed messages.
    #[command(
        after_help = "Examples:\n  dirq purge q\n  dirq purge q --tmp-older-than 10m --errors-older-than 30d"
    )]
    Purge {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// Remove files in tmp/ older than this whose writer is gone.
        #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_duration)]
        tmp_older_than: Duration,
        /// Also remove failed messages (and their sidecars) older than this.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        errors_older_than: Option<Duration>,
    },

    /// Check a queue for problems (like postsuper -s); --repair fixes them.
    #[command(
        after_help = "Finds entries that do not belong (unknown files, symlinks, FIFOs, \
directories, hard links, empty messages), sidecars without messages, messages under two names \
(crash leftovers), duplicate ids, orphaned and abandoned files, and wrong permissions.\n\
Exit status: 0 when healthy, 1 when problems were found (repaired or not).\n\nExamples:\n  \
dirq check q\n  dirq check --repair q && dirq check q"
    )]
    Check {
        /// The queue.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        /// Fix what was found.
        #[arg(long)]
        repair: bool,
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
        #[arg(long, value_name = "SECS", value_parser = parse_duration)]
        grace: Option<Duration>,
    },

    /// Run a command for each message (a Piper whose stage is a command).
    #[command(
        after_help = "The message is the command's standard input; DIRQ_ID, DIRQ_QUEUE, \
DIRQ_ATTEMPT and DIRQ_PATH are in its environment. Exit 0 commits the message (with --to, passes \
on the command's standard output, or the message itself when that is empty); exit 75 retries \
it later with backoff; any other exit moves it to errors/ with the exit code and the end of \
standard error. SIGTERM drains and exits 0; a second SIGTERM stops at once.\n\n\
Several --to fan out; --route CODE=NAME sends exit CODE to one output (0 included), and with \
--route-by-line a first output line \"dirq-route: NAME\" does (the line is not passed on).\n\n\
Examples:\n  dirq exec q -- ./handle.sh\n  dirq exec input --to parsed -j 4 --timeout 30s -- jq -c .event\n  \
dirq exec mail --to clean=spool/clean --to spam=spool/spam --route 0=clean --route 3=spam -- ./classify\n  \
dirq exec q --on-fail 'logger -t dirq \"$DIRQ_ID failed: $DIRQ_REASON\"' -- ./deliver\n  \
dirq exec q --dry-run -- ./handle.sh"
    )]
    Exec(Box<ExecArgs>),

    /// Run the stages of a pipeline file, restarting crashed workers.
    #[command(
        after_help = "Example PIPELINE.toml:\n\n  [[stage]]\n  name = \"parse\"\n  \
input = \"spool/input\"\n  output = \"spool/parsed\"\n  command = [\"jq\", \"-c\", \".\"]\n  workers = 2\n\n  \
[[stage]]\n  name = \"deliver\"\n  input = \"spool/parsed\"\n  command = [\"./deliver.sh\"]\n  \
processes = 2\n  timeout = \"30s\"\n  commit_batch = 16\n  commit_delay = \"5ms\"\n\n\
Paths are relative to the file. Instead of input, inputs = [\"a\", \"b\"] reads several \
queues in strict priority order (dirq exec --also-input). outputs = { clean = \"spool/clean\", \
spam = \"spool/spam\" } names several outputs (beside or instead of output), routes = { 0 = \"clean\", \
3 = \"spam\" } routes exit codes and route_by_line = true lets the command choose (dirq exec \
--to NAME=QUEUE, --route, --route-by-line). dir_mode and file_mode (octal, 0o2770 or \"2770\") set \
the permissions of what the stage creates. Other stage keys: out_limit, on_fail, retries, drain_timeout, \
max_age, out_resume, out_limit_bytes, out_resume_bytes, breaker_failures, breaker_rate, \
breaker_min_samples, breaker_window, breaker_cooldown, kill_grace \
(as for dirq exec; commit_batch and commit_delay are its --commit-batch and --commit-delay; \
breaker = false is --no-breaker). \
A [defaults] table sets any of these keys for every stage.\n\n\
SIGHUP reloads the file: unchanged stages keep running, changed ones drain and restart, removed ones drain, added ones start; a file that fails the checks of --check is logged and changes nothing.\n\n\
Examples:\n  dirq run --check pipeline.toml\n  dirq run pipeline.toml"
    )]
    Run {
        /// The pipeline file.
        #[arg(value_name = "PIPELINE.toml")]
        file: PathBuf,
        /// Only check the file (syntax, settings, input queues) and print "ok"; run nothing.
        #[arg(long)]
        check: bool,
    },

    /// Watch queues and alert when their oldest message is too old or a Piper on them
    /// goes silent.
    #[command(
        after_help = "For queues no Piper watches (a Piper with --alert-max-age or \
--alert-stale-after watches its own inputs). Without --alert-cmd or --alert-url, each alert \
is printed as a line of JSON. Runs until SIGTERM or SIGINT; --once looks once and exits \
(1 when it found something).\n\n\
Examples:\n  dirq watch spool/* --alert-max-age 1h --alert-stale-after 5m \\\n    \
--alert-cmd 'mail -s \"dirq: $DIRQ_ALERT $DIRQ_QUEUE\" ops@example.org <<< \"$DIRQ_REASON\"'\n  \
dirq watch q --alert-max-age 10m --once"
    )]
    Watch {
        /// Queues to watch.
        #[arg(required = true, value_name = "QUEUE")]
        queues: Vec<PathBuf>,
        #[command(flatten)]
        alerts: AlertArgs,
        /// How often to look.
        #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
        every: Duration,
        /// Look once, deliver, and exit.
        #[arg(long)]
        once: bool,
    },

    /// Print Prometheus metrics of queues (text exposition format).
    #[command(
        after_help = "For node_exporter's textfile collector or a scraper.\n\nExamples:\n  \
dirq metrics /var/spool/dirq/* > /var/lib/node_exporter/dirq.prom.$$ && \\\n    \
mv /var/lib/node_exporter/dirq.prom.$$ /var/lib/node_exporter/dirq.prom"
    )]
    Metrics {
        /// Queues to report on.
        #[arg(required = true, value_name = "QUEUE")]
        queues: Vec<PathBuf>,
    },

    /// Serve an HTTP API and web console for every queue under a spool root.
    #[cfg(feature = "serve")]
    #[command(
        after_help = "Prints `listening on http://ADDR` as its first line (and `read-only: no \
--token-file` without a token), then serves until SIGTERM or SIGINT. Queues are found under ROOT \
at start, every few seconds and when a request names an unknown one. Requests that change \
anything need `Authorization: Bearer <token>` with the token in --token-file; without one the \
server is read-only. No TLS: put a reverse proxy in front (docs/operator.md).\n\nExamples:\n  \
dirq serve /var/spool/dirq\n  dirq serve /var/spool/dirq --listen 0.0.0.0:8080 --token-file /etc/dirq/token\n  \
curl -s localhost:8080/api/v1/queues | jq ."
    )]
    Serve {
        /// The spool root whose queues are served.
        #[arg(value_name = "ROOT")]
        root: PathBuf,
        /// Address and port to listen on; port 0 picks a free one.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// File holding the bearer token that changes need (surrounding whitespace is
        /// ignored). Without it, serve is read-only.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Largest message a submit may carry (bytes, or with KiB, MiB, GiB).
        #[arg(long, value_name = "BYTES", default_value = "16MiB", value_parser = parse_size)]
        max_body: u64,
    },

    /// Serve an HTTP API and web console (needs a build with `--features serve`).
    #[cfg(not(feature = "serve"))]
    #[command(
        after_help = "This dirq was built without the `serve` feature. Build the full binary with \
`cargo install --path . --all-features` (or `--features serve`)."
    )]
    Serve {
        /// Ignored: the command is not built in.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<OsString>,
    },

    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  dirq completions bash > /etc/bash_completion.d/dirq\n  \
dirq completions zsh > ~/.zfunc/_dirq"
    )]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Bridge queues to NATS JetStream: hops between hosts' spools (feature `nats`).
    #[cfg(feature = "nats")]
    #[command(subcommand)]
    Bridge(BridgeCommand),

    /// Bridge queues to NATS JetStream; this binary was built without it.
    #[cfg(not(feature = "nats"))]
    #[command(
        disable_help_flag = true,
        after_help = "This dirq was built without the NATS bridge (cargo feature `nats`). Get one \
with it:\n  cargo install --path . --features nats    (or --all-features)"
    )]
    Bridge {
        /// Ignored.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<OsString>,
    },
}

/// `dirq bridge ...`.
#[cfg(feature = "nats")]
#[derive(Debug, Subcommand)]
pub(crate) enum BridgeCommand {
    /// Create, or check, a work-queue file stream and its durable pull consumer.
    #[command(
        after_help = "The stream NAME takes the subject dirq.NAME, which `bridge out` \
publishes to. Idempotent: an existing stream and consumer are checked (retention, storage, \
subject; replicas and duplicate window when given) and left unchanged; a mismatch is an \
error.\n\nExamples:\n  dirq bridge setup --nats nats://10.0.0.1:4222 --stream orders\n  \
dirq bridge setup --nats nats://a:4222,nats://b:4222 --stream orders --replicas 3 --duplicate-window 10m"
    )]
    Setup {
        #[command(flatten)]
        nats: NatsArgs,
        /// Replicas of the stream (3 in a 3-node cluster). Default: 1 when created, not
        /// checked when it exists.
        #[arg(long, value_name = "N")]
        replicas: Option<usize>,
        /// How long the stream remembers an id to drop a republished message. Default:
        /// the server's (2m) when created.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        duplicate_window: Option<Duration>,
        /// The consumer's ack wait: how long the server waits for an ack before it
        /// delivers a message again.
        #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "30s")]
        ack_wait: Duration,
    },

    /// Claim messages from QUEUE and publish each to the stream with Nats-Msg-Id = its id.
    #[command(
        after_help = "A message is committed only after the stream's PubAck; a failed \
publish is retried with the same id. SIGTERM or SIGINT drains (a second one exits at once). \
Prints its counters as JSON when it stops.\n\nExample:\n  \
dirq bridge out /var/spool/dirq/to-b --nats nats://10.0.0.1:4222 --stream orders"
    )]
    Out {
        /// The queue to drain into the stream.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        #[command(flatten)]
        nats: NatsArgs,
        /// Messages claimed and committed together.
        #[arg(long, value_name = "N", default_value_t = 1024)]
        batch: usize,
        /// Messages published and not yet acknowledged, at most.
        #[arg(long, value_name = "N", default_value_t = 1024)]
        in_flight: usize,
    },

    /// Pull from the stream's consumer and store each message in QUEUE under its id.
    #[command(
        after_help = "A message is acked only once stored (and synced per --durability); \
one that arrives again, still queued or finished within --seen-ttl, is acked without being \
stored twice. Pulling stops while QUEUE's \
incoming/ holds --high messages and resumes below --low. SIGTERM or SIGINT drains. Prints \
its counters as JSON when it stops.\n\nExample:\n  \
dirq bridge in /var/spool/dirq/orders --nats nats://10.0.0.1:4222 --stream orders"
    )]
    In {
        /// The queue to store into.
        #[arg(value_name = "QUEUE")]
        queue: PathBuf,
        #[command(flatten)]
        nats: NatsArgs,
        /// The durable consumer; bridges with the same one share its messages.
        #[arg(long, value_name = "NAME", default_value = "dirq")]
        consumer: String,
        /// Messages pulled and stored together.
        #[arg(long, value_name = "N", default_value_t = 1024)]
        batch: usize,
        /// Stop pulling at this many messages in QUEUE's incoming/.
        #[arg(long, value_name = "N", default_value_t = 10_000)]
        high: usize,
        /// Resume pulling below this many.
        #[arg(long, value_name = "N", default_value_t = 8_000)]
        low: usize,
        /// Make QUEUE remember finished ids this long (its seen/ setting, as `init
        /// --seen-ttl`), so a message redelivered after it was processed is not stored
        /// again. Default: the queue's setting, or 1d where it has none.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        seen_ttl: Option<Duration>,
    },
}

/// The server and stream every bridge command needs.
#[cfg(feature = "nats")]
#[derive(Debug, Args)]
pub(crate) struct NatsArgs {
    /// NATS server URL(s), comma-separated: nats://host:4222.
    #[arg(long = "nats", value_name = "URL")]
    pub(crate) url: String,
    /// The stream (letters, digits, - and _); its subject is dirq.NAME.
    #[arg(long, value_name = "NAME")]
    pub(crate) stream: String,
}

/// Which messages a command acts on.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Selection {
    /// Message ids; "-" reads ids from standard input, one per line.
    #[arg(value_name = "ID")]
    pub(crate) ids: Vec<OsString>,
    /// Every message the command applies to.
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// The input queue.
    #[arg(value_name = "QUEUE")]
    pub(crate) queue: PathBuf,
    /// Another input queue, read only while QUEUE (and every --also-input before it)
    /// has nothing waiting: strict priority in the order given. Repeatable.
    #[arg(long, value_name = "QUEUE")]
    pub(crate) also_input: Vec<PathBuf>,
    /// Pass the command's output (or the message) on to this queue. Repeat it for
    /// several outputs: exit 0 passes on to every one (fan-out). NAME=NEXT names the
    /// output for --route; an output's default name is its directory's last component.
    #[arg(long, value_name = "[NAME=]NEXT", value_parser = parse_output)]
    pub(crate) to: Vec<(Option<String>, PathBuf)>,
    /// Exit code CODE (0 to 255, not 75, which retries) passes the message on to the
    /// output NAME only. Repeatable: --route 3=spam --route 0=clean.
    #[arg(long, value_name = "CODE=NAME", value_parser = parse_route)]
    pub(crate) route: Vec<(i32, String)>,
    /// A first line "dirq-route: NAME" on the command's standard output passes the
    /// message on to the output NAME only (exit 0 or a routed code); the line is not
    /// part of the message.
    #[arg(long)]
    pub(crate) route_by_line: bool,
    /// Permission bits of queue directories exec creates (octal, applied exactly;
    /// setgid allowed, e.g. 2770, for a group of cooperating users). Default: 0775.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub(crate) dir_mode: Option<u32>,
    /// Permission bits of message files exec writes (octal, narrowed by the umask).
    /// Default: 0664.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub(crate) file_mode: Option<u32>,
    /// Commands run in parallel (1 to 1024).
    #[arg(short = 'j', long = "jobs", default_value_t = 1, value_name = "N")]
    pub(crate) jobs: usize,
    /// Kill a command's process group after this long (more than zero) and fail its
    /// message.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// After a timeout, how long the command's process group has between SIGTERM and
    /// SIGKILL.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub(crate) kill_grace: Duration,
    /// Pause while NEXT holds this many messages (backpressure; at least 1).
    #[arg(long, value_name = "N", default_value_t = 5000)]
    pub(crate) out_limit: usize,
    /// Resume once NEXT holds fewer than this many messages (low watermark; at most
    /// --out-limit). Default: 80 % of --out-limit.
    #[arg(long, value_name = "N")]
    pub(crate) out_resume: Option<usize>,
    /// Also pause while NEXT's waiting messages hold this many bytes (at least 1).
    /// Default: no byte limit.
    #[arg(long, value_name = "BYTES")]
    pub(crate) out_limit_bytes: Option<u64>,
    /// Resume once NEXT's waiting messages hold fewer bytes than this (at most
    /// --out-limit-bytes, and only with it). Default: 80 % of --out-limit-bytes.
    #[arg(long, value_name = "BYTES")]
    pub(crate) out_resume_bytes: Option<u64>,
    /// Messages older than this (by their id's time; more than zero) go to errors/
    /// with reason "expired" instead of being processed. Default: no limit.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub(crate) max_age: Option<Duration>,
    /// Failure breaker: pause intake when this many failures (at least 1) happen
    /// within --breaker-window. Default: no count limit.
    #[arg(long, value_name = "N", conflicts_with = "no_breaker")]
    pub(crate) breaker_failures: Option<u32>,
    /// Failure breaker: pause intake when this fraction of outcomes (more than 0, at
    /// most 1) within --breaker-window failed. Default: 0.5.
    #[arg(long, value_name = "RATE", conflicts_with = "no_breaker")]
    pub(crate) breaker_rate: Option<f64>,
    /// Failure breaker: outcomes (at least 1) the window must hold before the rate
    /// counts. Default: 20.
    #[arg(long, value_name = "N")]
    pub(crate) breaker_min_samples: Option<u32>,
    /// Failure breaker: the window failures are counted over (more than zero).
    /// Default: 60s.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub(crate) breaker_window: Option<Duration>,
    /// Failure breaker: how long intake stays paused before a probe (more than zero;
    /// doubled by each failed probe, up to 10m). Default: 30s.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub(crate) breaker_cooldown: Option<Duration>,
    /// No failure breaker: intake never pauses for failures.
    #[arg(long)]
    pub(crate) no_breaker: bool,
    /// Only print what would run for each waiting message; change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Shell command run whenever a message goes to errors/ (failure, dead letter after
    /// the last retry, timeout), with DIRQ_REASON, DIRQ_ID, DIRQ_QUEUE, DIRQ_ATTEMPT,
    /// DIRQ_DEAD_LETTER (1 or 0) and DIRQ_EXIT_CODE (if it exited) in its environment.
    #[arg(long, value_name = "CMD")]
    pub(crate) on_fail: Option<OsString>,
    /// Stage name in logs and `dirq status` (default: the command's name).
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// Attempts before a message is dead-lettered into errors/.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub(crate) retries: u32,
    /// Exit 0 once the queue is empty and no command is running.
    #[arg(long)]
    pub(crate) drain: bool,
    /// How long SIGTERM waits for running commands before putting their messages back.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub(crate) drain_timeout: Duration,
    /// Write no history (QUEUE/history/; see dirq history).
    #[arg(long)]
    pub(crate) no_history: bool,
    /// Keep each command's standard error, and its standard output when it is not
    /// passed on, in QUEUE/history/logs/ID.log (see dirq log).
    #[arg(long)]
    pub(crate) log_output: bool,
    /// The most a message's job log holds (all attempts; head and tail kept): bytes,
    /// or with a unit, 64KiB, 1MiB.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub(crate) log_limit: u64,
    /// Group commit: outcomes per directory sync (1 to 65536; 1 syncs each message).
    /// A crash can make the last unsynced batch be processed again, with the same ids.
    #[arg(long, value_name = "N", default_value_t = dirq::piper::PiperBuilder::DEFAULT_COMMIT_BATCH)]
    pub(crate) commit_batch: usize,
    /// Group commit: how long a batch waits for more outcomes after its first (0: sync
    /// at once). Default: 2ms.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub(crate) commit_delay: Option<Duration>,
    #[command(flatten)]
    pub(crate) alerts: AlertArgs,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub(crate) command: Vec<OsString>,
}

/// Where alerts go (`dirq exec`, `dirq watch`).
#[derive(Debug, Args, Default)]
pub(crate) struct AlertArgs {
    /// Alert command (sh -c), run with DIRQ_ALERT (failed, timeout, breaker-open,
    /// breaker-closed, stale, age), DIRQ_STAGE, DIRQ_QUEUE, DIRQ_ID, DIRQ_REASON,
    /// DIRQ_COUNT (events it stands for), DIRQ_SINCE, DIRQ_HOST and DIRQ_PID.
    #[arg(long, value_name = "CMD")]
    pub(crate) alert_cmd: Option<OsString>,
    /// POST each alert as JSON to this http:// URL.
    #[arg(long, value_name = "URL")]
    pub(crate) alert_url: Option<String>,
    /// At most one alert per kind and queue in this time; the rest are counted into a
    /// summary (DIRQ_COUNT). Default: 60s.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub(crate) alert_interval: Option<Duration>,
    /// Alert (age) when a queue's oldest waiting message is older than this.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub(crate) alert_max_age: Option<Duration>,
    /// Alert (stale) when a Piper on the queue has not updated its liveness file for
    /// this long (at least 10s).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub(crate) alert_stale_after: Option<Duration>,
}

/// An outcome of `dirq history --outcome`.
pub(crate) fn parse_outcome(s: &str) -> Result<dirq::admin::HistoryOutcome, String> {
    dirq::admin::HistoryOutcome::from_name(s).ok_or_else(|| {
        let names: Vec<_> = dirq::admin::HistoryOutcome::ALL
            .iter()
            .map(|o| o.as_str())
            .collect();
        format!("{s:?} is not an outcome: {}", names.join(", "))
    })
}

/// A size: bytes, or a number with a unit (`KiB`, `MiB`, `GiB`, or `K`, `M`, `G`, all
/// powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 1048576, 64KiB or 1MiB"))?;
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use KiB, MiB or GiB"
            ))
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8).map_err(|_| format!("{s:?} is not an octal mode like 0775"))
}

/// `NAME=PATH` or `PATH` (an output of `dirq exec --to`). NAME is letters, digits, `-`
/// and `_`; a value whose part before `=` is not such a name is a path.
pub(crate) fn parse_output(s: &str) -> Result<(Option<String>, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if is_output_name(name) => {
            if path.is_empty() {
                return Err(format!("{s:?}: no queue after {name}="));
            }
            Ok((Some(name.to_owned()), PathBuf::from(path)))
        }
        _ if s.is_empty() => Err("the queue path is empty".to_owned()),
        _ => Ok((None, PathBuf::from(s))),
    }
}

/// Whether `name` may name an output: letters, digits, `-` and `_`, not empty.
pub(crate) fn is_output_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `CODE=NAME` of `dirq exec --route`.
pub(crate) fn parse_route(s: &str) -> Result<(i32, String), String> {
    let bad = || format!("{s:?} is not CODE=NAME, like 3=spam");
    let (code, name) = s.split_once('=').ok_or_else(bad)?;
    let code: i32 = code.trim().parse().map_err(|_| bad())?;
    if !(0..=255).contains(&code) || code == dirq::piper::EX_TEMPFAIL {
        return Err(format!(
            "{s:?}: the exit code must be from 0 to 255 and not 75 (75 retries)"
        ));
    }
    if !is_output_name(name) {
        return Err(format!(
            "{s:?}: {name:?} is not an output name (letters, digits, - and _)"
        ));
    }
    Ok((code, name.to_owned()))
}

/// Seconds (`1.5`) or a number with a unit: `500ms`, `30s`, `5m`, `2h`, `1d`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 2h or 1.5"))?;
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use ms, s, m, h or d"
            ))
        }
    };
    Duration::try_from_secs_f64(number * scale)
        .map_err(|_| format!("{s:?} is not a non-negative duration"))
}

/// A point in time, as [`dirq::admin::parse_time`] reads it.
pub(crate) fn parse_time(s: &str) -> Result<SystemTime, String> {
    dirq::admin::parse_time(s).ok_or_else(|| {
        format!(
            "{:?} is not a time like 2026-12-01T08:00:00Z, 2026-12-01T09:00:00+01:00 \
             or @1796112000 (seconds since the Unix epoch)",
            s.trim()
        )
    })
}

/// The shortest `status --watch` interval: 0 redrew in a busy loop, and a shorter one
/// than this re-reads every queue faster than anyone can read the screen.
const MIN_WATCH: Duration = Duration::from_millis(100);

/// A `status --watch` interval: a duration of at least [`MIN_WATCH`].
fn parse_watch_interval(s: &str) -> Result<Duration, String> {
    let every = parse_duration(s)?;
    if every < MIN_WATCH {
        return Err(format!(
            "{s:?} is too short: the interval must be at least {}ms",
            MIN_WATCH.as_millis()
        ));
    }
    Ok(every)
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
    fn outputs_and_routes_parse() {
        let path = |p: &str| PathBuf::from(p);
        assert_eq!(parse_output("spool/q"), Ok((None, path("spool/q"))));
        assert_eq!(
            parse_output("spam=spool/spam"),
            Ok((Some("spam".to_owned()), path("spool/spam")))
        );
        // Not a name before the `=`: all of it is a path.
        assert_eq!(parse_output("./a=b"), Ok((None, path("./a=b"))));
        assert!(parse_output("spam=").is_err());
        assert!(parse_output("").is_err());
        assert_eq!(parse_route("3=spam"), Ok((3, "spam".to_owned())));
        assert_eq!(parse_route("0=clean"), Ok((0, "clean".to_owned())));
        for bad in ["75=x", "256=x", "-1=x", "x=y", "3", "3=", "3=a/b"] {
            assert!(parse_route(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modes_and_durations_parse() {
        assert_eq!(parse_mode("0775"), Ok(0o775));
        assert_eq!(parse_mode("0o700"), Ok(0o700));
        assert!(parse_mode("9").is_err());
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_watch_interval("0").is_err());
        assert!(parse_watch_interval("99ms").is_err());
        assert_eq!(parse_watch_interval("0.1"), Ok(MIN_WATCH));
        assert_eq!(parse_watch_interval("2"), Ok(Duration::from_secs(2)));
    }
}
