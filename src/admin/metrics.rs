//! Prometheus text exposition (format 0.0.4) of queues and their Pipers: what
//! `dirq metrics` prints and `dirq serve` answers at `GET /metrics`.

use std::fmt::Write as _;

use crate::error::Result;
use crate::{DirectoryQueue, State};

const STATES: [State; 7] = [
    State::Incoming,
    State::Pending,
    State::Deferred,
    State::Hold,
    State::Chained,
    State::Errors,
    State::Tmp,
];

/// The metrics of `queues` in Prometheus' text exposition format 0.0.4, each family
/// with one `HELP` and `TYPE` line; the `queue` label is the queue's root as opened.
///
/// Families: `dirq_messages` and `dirq_bytes` per state, `dirq_oldest_age_seconds`,
/// and per Piper advertising itself under a queue `dirq_piper_up`,
/// `dirq_piper_paused`, `dirq_piper_workers`, `dirq_piper_messages_total` (by event),
/// `dirq_piper_paused_seconds_total` and `dirq_piper_rate`; for a NATS bridge,
/// `dirq_bridge_total` (by counter) and `dirq_bridge_lag`.
///
/// # Errors
///
/// [`Error::Io`](crate::Error::Io) when a state directory or the Pipers' directory of
/// a queue cannot be read.
pub fn metrics(queues: &[DirectoryQueue]) -> Result<String> {
    let mut out = Exposition::default();
    for queue in queues {
        let q = label_value(&queue.root().to_string_lossy());
        let counts = queue.counts()?;
        for state in STATES {
            let labels = format!("queue=\"{q}\",state=\"{}\"", state.as_str());
            out.sample(
                "dirq_messages",
                "gauge",
                "Messages in a state of a queue.",
                &labels,
                counts.get(state) as f64,
            );
            out.sample(
                "dirq_bytes",
                "gauge",
                "Bytes of the messages in a state of a queue.",
                &labels,
                queue.size(state)? as f64,
            );
        }
        let oldest = queue.oldest_age()?.map_or(0.0, |d| d.as_secs_f64());
        out.sample(
            "dirq_oldest_age_seconds",
            "gauge",
            "Age of the oldest message waiting in incoming/ (0 when empty).",
            &format!("queue=\"{q}\""),
            oldest,
        );
        for piper in super::pipers(queue)? {
            let labels = format!(
                "queue=\"{q}\",stage=\"{}\",pid=\"{}\",host=\"{}\"",
                label_value(&piper.stage),
                piper.pid,
                label_value(&piper.host)
            );
            out.sample(
                "dirq_piper_up",
                "gauge",
                "1 for a running Piper, 0 for the stale file of a dead one.",
                &labels,
                f64::from(u8::from(piper.live)),
            );
            let paused = piper.live && piper.state.starts_with("paused");
            out.sample(
                "dirq_piper_paused",
                "gauge",
                "1 while a Piper's intake is paused (backpressure or failure breaker).",
                &labels,
                f64::from(u8::from(paused)),
            );
            out.sample(
                "dirq_piper_workers",
                "gauge",
                "Worker threads of a Piper.",
                &labels,
                piper.workers as f64,
            );
            let s = &piper.stats;
            for (event, value) in [
                ("claimed", s.claimed),
                ("committed", s.committed),
                ("forwarded", s.forwarded),
                ("emitted", s.emitted),
                ("failed", s.failed),
                ("retried", s.retried),
                ("dead_lettered", s.dead_lettered),
                ("expired", s.expired),
                ("timeouts", s.timeouts),
                ("cancelled", s.cancelled),
                ("panics", s.panics),
                ("wasted_claims", s.wasted_claims),
            ] {
                out.sample(
                    "dirq_piper_messages_total",
                    "counter",
                    "Messages a Piper handled, by what happened.",
                    &format!("{labels},event=\"{event}\""),
                    value as f64,
                );
            }
            out.sample(
                "dirq_piper_paused_seconds_total",
                "counter",
                "Time a Piper's intake was paused.",
                &labels,
                s.paused_ms as f64 / 1000.0,
            );
            for (kind, rate) in [
                ("claimed", piper.rates.claimed),
                ("done", piper.rates.done),
                ("failed", piper.rates.failed),
            ] {
                out.sample(
                    "dirq_piper_rate",
                    "gauge",
                    "Messages per second over the last seconds, as the Piper reported them.",
                    &format!("{labels},kind=\"{kind}\""),
                    rate,
                );
            }
            // A bridge's own counters (`dirq bridge out|in`); `lag` is a gauge.
            for (counter, value) in &piper.counters {
                let (name, kind, help) = if counter == "lag" {
                    (
                        "dirq_bridge_lag",
                        "gauge",
                        "Messages waiting to cross a bridge.",
                    )
                } else {
                    (
                        "dirq_bridge_total",
                        "counter",
                        "Events of a NATS bridge, by counter.",
                    )
                };
                out.sample(
                    name,
                    kind,
                    help,
                    &format!("{labels},counter=\"{}\"", label_value(counter)),
                    *value as f64,
                );
            }
        }
    }
    Ok(out.finish())
}

/// Groups samples by metric name, each with one HELP and TYPE line, as the format wants.
#[derive(Default)]
struct Exposition {
    metrics: Vec<(String, String, String, Vec<String>)>,
}

impl Exposition {
    fn sample(&mut self, name: &str, kind: &str, help: &str, labels: &str, value: f64) {
        let line = format!("{name}{{{labels}}} {}", number(value));
        match self.metrics.iter_mut().find(|(n, ..)| n == name) {
            Some((.., lines)) => lines.push(line),
            None => self.metrics.push((
                name.to_owned(),
                kind.to_owned(),
                help.to_owned(),
                vec![line],
            )),
        }
    }

    fn finish(self) -> String {
        let mut text = String::new();
        for (name, kind, help, lines) in self.metrics {
            let _ = writeln!(text, "# HELP {name} {help}");
            let _ = writeln!(text, "# TYPE {name} {kind}");
            for line in lines {
                let _ = writeln!(text, "{line}");
            }
        }
        text
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_metrics_grouped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut e = Exposition::default();
        e.sample("m", "gauge", "help", "q=\"1\"", 1.0);
        e.sample("n", "counter", "other", "q=\"1\"", 0.5);
        e.sample("m", "gauge", "help", "q=\"2\"", 2.0);
        assert_eq!(
            e.finish(),
            "# HELP m help\n# TYPE m gauge\nm{q=\"1\"} 1\nm{q=\"2\"} 2\n# HELP n other\n# TYPE n counter\nn{q=\"1\"} 0.5\n"
        );
    }
}
