//! The JSON documents of the API, built from a queue on the blocking pool. Field names
//! are a contract with the console and with scripts: add, never rename.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::registry::{unix_now, unix_secs, Registry, Sample};
use crate::error::Result;
use crate::piper::PiperInfo;
use crate::{admin, DirectoryQueue, State};

/// Counts by state name, every state present.
pub(super) type Counts = BTreeMap<&'static str, usize>;

fn counts_of(sample: &Sample) -> Counts {
    State::ALL
        .iter()
        .zip(sample.counts)
        .map(|(state, n)| (state.as_str(), n))
        .collect()
}

#[derive(Serialize)]
pub(super) struct QueueView {
    name: String,
    counts: Counts,
    bytes: u64,
    oldest_age_seconds: Option<f64>,
    rates: Rates,
    series: Vec<Point>,
    backpressure: Option<bool>,
    pipers: Vec<PiperView>,
}

#[derive(Serialize)]
struct Rates {
    enqueued_per_second: f64,
    finished_per_second: f64,
}

#[derive(Serialize)]
struct Point {
    t: u64,
    counts: Counts,
}

#[derive(Serialize)]
struct PiperView {
    name: String,
    pid: u32,
    host: String,
    alive: bool,
    heartbeat_age_seconds: f64,
    /// `open` while the failure breaker pauses the Piper's intake, else `closed`.
    breaker: &'static str,
    backpressure: bool,
    state: String,
    workers: usize,
    claimed_per_second: f64,
    done_per_second: f64,
    failed_per_second: f64,
}

impl PiperView {
    fn of(piper: PiperInfo, now_ms: u64) -> PiperView {
        PiperView {
            breaker: if piper.live && piper.state.contains("breaker") {
                "open"
            } else {
                "closed"
            },
            backpressure: piper.live && piper.state.contains("backpressure"),
            heartbeat_age_seconds: now_ms.saturating_sub(piper.heartbeat_ms) as f64 / 1000.0,
            name: piper.stage,
            pid: piper.pid,
            host: piper.host,
            alive: piper.live,
            state: piper.state,
            workers: piper.workers,
            claimed_per_second: piper.rates.claimed,
            done_per_second: piper.rates.done,
            failed_per_second: piper.rates.failed,
        }
    }
}

/// Everything about one queue, with the registry's samples of it.
pub(super) fn queue(registry: &Registry, name: &str, queue: &DirectoryQueue) -> Result<QueueView> {
    let now = Sample::take(queue)?;
    let mut bytes = 0;
    for state in State::ALL {
        bytes += queue.size(state)?;
    }
    let now_ms = u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX);
    let pipers: Vec<PiperView> = admin::pipers(queue)?
        .into_iter()
        .map(|p| PiperView::of(p, now_ms))
        .collect();
    let live: Vec<&PiperView> = pipers.iter().filter(|p| p.alive).collect();
    // `+ 0.0`: an empty sum of floats is -0.0, which JSON would show as such.
    let finished: f64 = live.iter().map(|p| p.done_per_second).sum::<f64>() + 0.0;
    let series = registry.series(name);
    // Enqueued = finished + growth of what is unfinished, over the last minute or so.
    let growth = series
        .iter()
        .find(|s| s.at.elapsed() <= Duration::from_secs(70))
        .map(|then| {
            let seconds = then.at.elapsed().as_secs_f64();
            if seconds < 1.0 {
                0.0
            } else {
                (now.unfinished() as f64 - then.unfinished() as f64) / seconds
            }
        })
        .unwrap_or(0.0);
    Ok(QueueView {
        name: name.to_owned(),
        counts: counts_of(&now),
        bytes,
        oldest_age_seconds: queue.oldest_age()?.map(|d| d.as_secs_f64()),
        rates: Rates {
            enqueued_per_second: (finished + growth).max(0.0),
            finished_per_second: finished,
        },
        series: series
            .iter()
            .map(|s| Point {
                t: s.unix,
                counts: counts_of(s),
            })
            .collect(),
        backpressure: (!live.is_empty()).then(|| live.iter().any(|p| p.backpressure)),
        pipers,
    })
}

#[derive(Serialize)]
pub(super) struct MessagesView {
    state: &'static str,
    total: usize,
    offset: usize,
    limit: usize,
    messages: Vec<MessageView>,
}

#[derive(Serialize)]
struct MessageView {
    id: String,
    size: u64,
    age_seconds: Option<f64>,
    attempts: Option<u32>,
    due: Option<u64>,
    owner: Option<u32>,
    reason: Option<String>,
    exit_code: Option<i32>,
    stderr: Option<String>,
    failed_at: Option<u64>,
}

/// One page of the messages in `state`, oldest first.
pub(super) fn messages(
    queue: &DirectoryQueue,
    state: State,
    offset: usize,
    limit: usize,
) -> Result<MessagesView> {
    let mut ids = Vec::new();
    for id in queue.ids(state)? {
        ids.push(id?);
    }
    ids.sort();
    let total = ids.len();
    let mut messages = Vec::new();
    for id in ids.iter().skip(offset).take(limit) {
        match admin::info(queue, state, id) {
            Ok(info) => {
                let failure = info.failure.unwrap_or_default();
                messages.push(MessageView {
                    id: id.to_string(),
                    size: info.size,
                    age_seconds: info.age.map(|d| d.as_secs_f64()),
                    attempts: info.attempts,
                    due: info.not_before.map(unix_secs),
                    owner: info.owner,
                    reason: failure.reason.or_else(|| failure.stderr.clone()),
                    exit_code: failure.exit_code,
                    stderr: failure.stderr,
                    failed_at: info.failed_at.map(unix_secs),
                });
            }
            // Claimed, finished or moved since the directory was read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(MessagesView {
        state: state.as_str(),
        total,
        offset,
        limit,
        messages,
    })
}

#[derive(Serialize)]
pub(super) struct AgesView {
    /// Upper limits of the buckets in minutes; `counts` has one more, the older ones.
    buckets_minutes: [u64; admin::AGE_BUCKETS_MINUTES.len()],
    states: BTreeMap<&'static str, StateAges>,
    t: u64,
}

#[derive(Serialize)]
struct StateAges {
    total: u64,
    counts: Vec<u64>,
}

/// The age histogram of every state but `tmp/`.
pub(super) fn ages(queue: &DirectoryQueue) -> Result<AgesView> {
    let mut states = BTreeMap::new();
    for state in State::ALL {
        if state == State::Tmp {
            continue;
        }
        let counts = admin::age_histogram(&admin::ages(queue, state)?).to_vec();
        states.insert(
            state.as_str(),
            StateAges {
                total: counts.iter().sum(),
                counts,
            },
        );
    }
    Ok(AgesView {
        buckets_minutes: admin::AGE_BUCKETS_MINUTES,
        states,
        t: unix_now(),
    })
}
