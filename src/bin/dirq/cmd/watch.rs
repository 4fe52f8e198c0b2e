//! Alerts from the command line: the policy of the `--alert-*` flags (for `dirq exec`
//! and the pipeline file), and `dirq watch`, which raises the monitoring alerts for
//! queues that no Piper watches.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirq::piper::{AlertPolicy, Alerts};

use super::Opener;
use crate::args::AlertArgs;
use crate::output::{quiet_broken_pipe, stdout_error, CliResult, ExitStatus};

/// The alert policy of the `--alert-*` flags; the library checks it when it starts.
pub(crate) fn policy(args: &AlertArgs) -> AlertPolicy {
    let mut policy = AlertPolicy::new();
    if let Some(command) = &args.alert_cmd {
        policy.command(command);
    }
    if let Some(url) = &args.alert_url {
        policy.url(url);
    }
    if let Some(interval) = args.alert_interval {
        policy.interval(interval);
    }
    if let Some(age) = args.alert_max_age {
        policy.max_age(age);
    }
    if let Some(after) = args.alert_stale_after {
        policy.stale_after(after);
    }
    policy
}

/// `dirq watch`: every `every`, an age alert for each queue whose oldest waiting
/// message is older than the limit, and a stale alert for each Piper on it that has
/// gone silent. Without a destination, each finding is printed as a line of JSON.
pub(crate) fn watch(
    opener: &Opener,
    queues: &[PathBuf],
    args: &AlertArgs,
    every: Duration,
    once: bool,
) -> CliResult {
    if args.alert_max_age.is_none() && args.alert_stale_after.is_none() {
        return Err(
            "dirq watch needs --alert-max-age or --alert-stale-after: nothing to watch for".into(),
        );
    }
    let policy = policy(args);
    // Checked (and refused with the setting's name) even when nothing is delivered.
    let alerts = Alerts::start(&policy)?;
    let alerts = policy.is_enabled().then_some(alerts);
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .map_err(|e| format!("failed to watch signal {signal}: {e}"))?;
    }
    let mut found_any = false;
    loop {
        let started = Instant::now();
        for root in queues {
            let queue = opener.inspect(root)?;
            for alert in dirq::piper::queue_alerts(&queue, &policy, "watch")? {
                found_any = true;
                match &alerts {
                    Some(alerts) => alerts.raise(alert),
                    None => {
                        let mut out = std::io::stdout().lock();
                        quiet_broken_pipe(writeln!(out, "{}", alert.to_json()))
                            .map_err(stdout_error)?;
                    }
                }
            }
        }
        if once {
            break;
        }
        while started.elapsed() < every && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    if let Some(alerts) = alerts {
        alerts.stop();
    }
    if once && found_any {
        return Err(ExitStatus(1).into());
    }
    Ok(())
}
