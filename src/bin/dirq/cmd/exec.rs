//! `dirq exec`: a Piper whose stage runs a command for each message.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dirq::piper::{BreakerPolicy, CommandStage, Piper, PiperBuilder};
use dirq::queue::RetryPolicy;
use dirq::{DirectoryQueue, State};

use super::Opener;
use crate::args::ExecArgs;
use crate::output::{quiet_broken_pipe, stdout_error, CliResult};

pub(crate) fn exec(opener: &Opener, args: &ExecArgs) -> CliResult {
    let retry = RetryPolicy::builder().max_attempts(args.retries).build()?;
    let with_modes = |root: &Path| {
        let mut builder = DirectoryQueue::builder(root);
        if let Some(mode) = args.dir_mode {
            builder.dir_mode(mode);
        }
        if let Some(mode) = args.file_mode {
            builder.file_mode(mode);
        }
        builder
    };
    let input_builder = |root: &Path| {
        let mut builder = with_modes(root);
        builder.create(false).retry_policy(retry);
        if let Some(age) = args.max_age {
            builder.max_age(age);
        }
        builder
    };
    let input = opener.open(&mut input_builder(&args.queue))?;
    // Lower-priority inputs (--also-input), in the order given.
    let mut also = Vec::new();
    for queue in &args.also_input {
        also.push(opener.open(&mut input_builder(queue))?);
    }
    let (program, rest) = args.command.split_first().ok_or("no command was given")?;
    if args.dry_run {
        return dry_run(&input, program.as_ref(), rest);
    }
    let refuse = |why: String| format!("failed to start exec on {}: {why}", args.queue.display());
    let outputs = named_outputs(&args.to, &args.route, args.route_by_line).map_err(refuse)?;
    let mut next = Vec::new();
    for (name, path) in outputs {
        let queue = opener.open(&mut with_modes(&path))?;
        // A stage may emit back into its own queue (fresh ids), but forwarding into it
        // would hand the same message back at once, for ever.
        if std::iter::once(&input)
            .chain(&also)
            .any(|i| i.same_queue(&queue))
        {
            return Err(refuse(format!(
                "--to {} is the same queue as an input",
                path.display()
            ))
            .into());
        }
        next.push((name, queue));
    }
    let name = args.name.clone().unwrap_or_else(|| {
        Path::new(program)
            .file_name()
            .map_or_else(|| "exec".to_owned(), |n| n.to_string_lossy().into_owned())
    });
    let mut stage = CommandStage::builder(program, rest);
    stage
        .forward(!next.is_empty())
        .route_by_line(args.route_by_line)
        .kill_grace(args.kill_grace);
    for (code, output) in &args.route {
        stage.route_exit(*code, output);
    }
    if let Some(timeout) = args.timeout {
        stage.timeout(timeout);
    }
    if let Some(hook) = &args.on_fail {
        stage.on_fail(hook);
    }
    stage.log_output(args.log_output).log_limit(args.log_limit);
    let stage = stage.build()?;
    let mut builder = Piper::builder(&name);
    builder
        .input(&input)
        .workers(args.jobs)
        .drain_timeout(args.drain_timeout)
        .commit_batch(args.commit_batch)
        .commit_delay(
            args.commit_delay
                .unwrap_or(PiperBuilder::DEFAULT_COMMIT_DELAY),
        )
        .handle_signals(true)
        .history(!args.no_history)
        .stage(stage.clone());
    for queue in &also {
        builder.input(queue);
    }
    for (name, queue) in &next {
        builder.output(name, queue);
    }
    // Set and checked by build even without --to: a mistyped value is refused, not
    // ignored, and --out-resume is compared with the --out-limit given.
    builder.out_limit(args.out_limit);
    if let Some(low) = args.out_resume {
        builder.out_resume(low);
    }
    if let Some(high) = args.out_limit_bytes {
        builder.out_limit_bytes(high);
    }
    if let Some(low) = args.out_resume_bytes {
        builder.out_resume_bytes(low);
    }
    builder
        .breaker(&breaker_policy(args))
        .alerts(&super::watch::policy(&args.alerts));
    let piper = builder.build()?;
    let handle = piper.handle();
    let drain = args.drain.then(|| {
        let inputs: Vec<DirectoryQueue> = std::iter::once(&input).chain(&also).cloned().collect();
        let handle = handle.clone();
        std::thread::spawn(move || {
            // Empty means nothing waiting, claimed or due to be retried; held messages
            // wait for an operator and do not count. Two idle looks in a row: one count
            // misses a retry moving from deferred/ to incoming/ while it reads (see
            // DirectoryQueue::counts), and shutting down then would leave it unprocessed.
            let mut idle_before = false;
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let idle = inputs.iter().all(|input| {
                    input
                        .counts()
                        .is_ok_and(|c| c.incoming + c.pending + c.deferred == 0)
                }) && handle.stats().in_flight == 0;
                if idle && idle_before {
                    handle.shutdown();
                    return;
                }
                idle_before = idle;
            }
        })
    });
    let result = piper.run();
    // Commands of a Piper stopped by force are still running: they go too.
    stage.kill_running();
    drop(drain);
    let stats = result?;
    tracing::info!(stage = %name, ?stats, "exec finished");
    Ok(())
}

/// Names the outputs `to` (an unnamed one after its directory) and checks them against
/// `routes`: names are unique, and every route names one of them. Shared with the
/// pipeline file's check, so that a stage that exec would refuse never starts.
pub(crate) fn named_outputs(
    to: &[(Option<String>, PathBuf)],
    routes: &[(i32, String)],
    route_by_line: bool,
) -> Result<Vec<(String, PathBuf)>, String> {
    let mut named: Vec<(String, PathBuf)> = Vec::new();
    for (name, path) in to {
        let name = match name {
            Some(name) => name.clone(),
            None => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| crate::args::is_output_name(n))
                .ok_or_else(|| {
                    format!(
                        "--to {}: cannot name this output after its directory; give NAME={}",
                        path.display(),
                        path.display()
                    )
                })?,
        };
        if named.iter().any(|(other, _)| *other == name) {
            return Err(format!(
                "--to {}: two outputs are named {name:?}; give each a NAME=",
                path.display()
            ));
        }
        named.push((name, path.clone()));
    }
    if named.is_empty() && (!routes.is_empty() || route_by_line) {
        return Err(
            "routes need outputs: give --to (outputs or output in a pipeline file)".to_owned(),
        );
    }
    let names = || {
        named
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (code, output) in routes {
        if !named.iter().any(|(name, _)| name == output) {
            return Err(format!(
                "route {code}={output}: no output is named {output:?} (outputs: {})",
                names()
            ));
        }
    }
    if !routes.is_empty() && named.len() > 1 && !routes.iter().any(|(c, _)| *c == 0) {
        tracing::warn!(
            outputs = %names(),
            "exit 0 passes messages on to every output; give --route 0=NAME to send them to one"
        );
    }
    Ok(named)
}

/// The failure breaker of the exec flags; the Piper's build checks it.
fn breaker_policy(args: &ExecArgs) -> BreakerPolicy {
    let mut policy = if args.no_breaker {
        BreakerPolicy::disabled()
    } else {
        BreakerPolicy::default()
    };
    if let Some(failures) = args.breaker_failures {
        policy.max_failures(failures);
    }
    if let Some(rate) = args.breaker_rate {
        policy.max_failure_rate(rate);
    }
    if let Some(samples) = args.breaker_min_samples {
        policy.min_samples(samples);
    }
    if let Some(window) = args.breaker_window {
        policy.window(window);
    }
    if let Some(cooldown) = args.breaker_cooldown {
        policy.cooldown(cooldown);
    }
    policy
}

/// Prints the command that would run for each waiting message, oldest first, then for
/// each deferred message that is due (marked so); claims nothing.
fn dry_run(
    input: &DirectoryQueue,
    program: &std::ffi::OsStr,
    args: &[std::ffi::OsString],
) -> CliResult {
    let mut out = io::stdout().lock();
    let command = std::iter::once(program)
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    // A real run also takes deferred messages whose due time has passed (it promotes
    // them to incoming/ first), so they are listed too, after the waiting ones.
    let mut infos = dirq::admin::list(input, State::Incoming)?;
    let now = std::time::SystemTime::now();
    infos.extend(
        dirq::admin::list(input, State::Deferred)?
            .into_iter()
            .filter(|info| info.not_before.is_some_and(|due| due <= now)),
    );
    // Written at once: a reader that stopped reading (`| head`) is not an error.
    let mut text = String::new();
    for info in &infos {
        text.push_str(&format!(
            "would run: {command}  (DIRQ_ID={} DIRQ_QUEUE={} DIRQ_ATTEMPT={} DIRQ_PATH={}, {} bytes on stdin){}\n",
            info.id,
            input.root().display(),
            info.attempts.unwrap_or(0) + 1,
            input.path(State::Pending).join(info.id.as_os_str()).display(),
            info.size,
            if info.state == State::Deferred {
                "  [deferred, due]"
            } else {
                ""
            }
        ));
    }
    text.push_str(&format!(
        "dry run: {} message(s) would be processed; nothing was changed\n",
        infos.len()
    ));
    quiet_broken_pipe(out.write_all(text.as_bytes()).and_then(|()| out.flush()))
        .map_err(stdout_error)?;
    Ok(())
}
