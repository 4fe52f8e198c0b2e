//! `dirq bridge setup|out|in`: the NATS JetStream bridge (feature `nats`).

use std::io::Write;

use dirq::bridge::{setup, BridgeConfig, BridgeStats, Inbound, Outbound, StopHandle};
use dirq::DirectoryQueue;
use serde_json::json;

use super::Opener;
use crate::args::{BridgeCommand, NatsArgs};
use crate::output::{quiet_broken_pipe, stdout_error, CliResult};

/// How long a destination without its own setting remembers finished ids: far longer
/// than any redelivery takes (an ack wait, a server restart, a bridge down for hours).
const DEFAULT_SEEN_TTL: std::time::Duration = std::time::Duration::from_secs(86_400);

pub(crate) fn bridge(opener: &Opener, command: BridgeCommand) -> CliResult {
    match command {
        BridgeCommand::Setup {
            nats,
            replicas,
            duplicate_window,
            ack_wait,
        } => {
            let mut config = config(&nats);
            config.ack_wait(ack_wait);
            if let Some(replicas) = replicas {
                config.replicas(replicas);
            }
            if let Some(window) = duplicate_window {
                config.duplicate_window(window);
            }
            let report = setup(&config)?;
            let line = json!({
                "stream": config.stream_name(),
                "subject": report.subject,
                "consumer": config.consumer_name(),
                "stream_created": report.stream_created,
                "consumer_created": report.consumer_created,
                "replicas": report.replicas,
                "duplicate_window_s": report.duplicate_window.as_secs_f64(),
                "pending": report.pending,
                "unacked": report.unacked,
                "messages": report.messages,
            });
            print_line(&line)
        }
        BridgeCommand::Out {
            queue,
            nats,
            batch,
            in_flight,
        } => {
            let mut config = config(&nats);
            config.batch(batch).in_flight(in_flight);
            let bridge = Outbound::new(opener.create(&queue)?, config);
            let _signals = stop_on_signals(bridge.stop_handle())?;
            let stats = bridge.run()?;
            print_line(&stats_json("out", &stats))
        }
        BridgeCommand::In {
            queue,
            nats,
            consumer,
            batch,
            high,
            low,
            seen_ttl,
        } => {
            let mut config = config(&nats);
            config.consumer(consumer).batch(batch).watermarks(high, low);
            let mut destination = opener.create(&queue)?;
            // Without seen/, a redelivery of a message already processed and removed
            // would be stored again.
            let ttl = seen_ttl.or_else(|| {
                destination
                    .remembers_finished()
                    .is_none()
                    .then_some(DEFAULT_SEEN_TTL)
            });
            if let Some(ttl) = ttl {
                destination =
                    opener.open(DirectoryQueue::builder(&queue).remember_finished(ttl))?;
            }
            let bridge = Inbound::new(destination, config);
            let _signals = stop_on_signals(bridge.stop_handle())?;
            let stats = bridge.run()?;
            print_line(&stats_json("in", &stats))
        }
    }
}

fn config(nats: &NatsArgs) -> BridgeConfig {
    BridgeConfig::new(nats.url.clone(), nats.stream.clone())
}

fn stats_json(direction: &str, s: &BridgeStats) -> serde_json::Value {
    json!({
        "bridge": direction,
        "claimed": s.claimed, "published": s.published, "republished": s.republished,
        "publish_retries": s.publish_retries, "released": s.released,
        "stored": s.stored, "duplicates": s.duplicates, "redeliveries": s.redeliveries,
        "progress_acks": s.progress_acks, "unkeyed": s.unkeyed,
        "disconnects": s.disconnects, "paused_ms": s.paused_ms,
    })
}

fn print_line(value: &serde_json::Value) -> CliResult {
    let mut out = std::io::stdout().lock();
    quiet_broken_pipe(writeln!(out, "{value}").and_then(|()| out.flush())).map_err(stdout_error)?;
    Ok(())
}

/// SIGTERM or SIGINT stops the bridge, which drains; a second one exits at once (what
/// is in flight is then recovered at the next start, or redelivered).
#[cfg(unix)]
fn stop_on_signals(stop: StopHandle) -> Result<std::thread::JoinHandle<()>, std::io::Error> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("dirq-signals".to_owned())
        .spawn(move || {
            for signal in signals.forever() {
                if stop.is_stopped() {
                    tracing::warn!(signal, "second signal: exiting without draining");
                    std::process::exit(130);
                }
                tracing::info!(signal, "stopping: draining what is in flight");
                stop.stop();
            }
        })
}

#[cfg(not(unix))]
fn stop_on_signals(_stop: StopHandle) -> Result<(), std::io::Error> {
    Ok(())
}
