//! A bridge's counters, and its liveness advert: the file a Piper keeps under its
//! queue's `pipers/`, so `dirq status` and `dirq metrics` show bridges beside Pipers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::format::meta::rfc3339;
use crate::piper::liveness::{epoch_ms, Advert, PiperInfo};
use crate::piper::stats::RateWindow;
use crate::piper::PiperStats;
use crate::{sys, DirectoryQueue};

/// A bridge's counters since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BridgeStats {
    /// Outbound: messages claimed from the queue.
    pub claimed: u64,
    /// Outbound: messages the stream acknowledged (PubAck), and committed locally.
    pub published: u64,
    /// Outbound: PubAcks saying the stream already had the id (a republish after a
    /// crash or a lost PubAck, dropped by the stream's duplicate window).
    pub republished: u64,
    /// Outbound: publishes that failed or timed out and were retried with the same id.
    pub publish_retries: u64,
    /// Outbound: messages given back to the queue on stopping, unpublished.
    pub released: u64,
    /// Inbound: messages stored in the queue.
    pub stored: u64,
    /// Inbound: messages that arrived again and were acked without being stored (their
    /// id was queued or finished already): duplicates absorbed.
    pub duplicates: u64,
    /// Inbound: deliveries the server marked as redeliveries (delivered more than once).
    pub redeliveries: u64,
    /// Inbound: progress acks sent for batches that took long to store.
    pub progress_acks: u64,
    /// Inbound: messages without a usable `Nats-Msg-Id`, stored under an id made of
    /// the stream's name and sequence.
    pub unkeyed: u64,
    /// Times the NATS connection was lost.
    pub disconnects: u64,
    /// Messages waiting to cross: outbound, the queue's `incoming/`; inbound, the
    /// consumer's `num_pending`. Sampled every second or so.
    pub lag: u64,
    /// Messages in flight now (published and not acknowledged, or pulled and not yet
    /// stored and acked).
    pub in_flight: u64,
    /// Milliseconds the bridge was paused (inbound: backpressure).
    pub paused_ms: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) claimed: AtomicU64,
    pub(super) published: AtomicU64,
    pub(super) republished: AtomicU64,
    pub(super) publish_retries: AtomicU64,
    pub(super) released: AtomicU64,
    pub(super) stored: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) redeliveries: AtomicU64,
    pub(super) progress_acks: AtomicU64,
    pub(super) unkeyed: AtomicU64,
    pub(super) lag: AtomicU64,
    pub(super) in_flight: AtomicU64,
    pub(super) paused_ms: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A reader of `counters` as [`BridgeStats`], with the connection's count of
    /// disconnects, for the heartbeat and for `run`'s answer.
    pub(super) fn snapshots(
        counters: &Arc<Counters>,
        disconnects: &Arc<AtomicU64>,
    ) -> impl Fn() -> BridgeStats + Clone + Send + 'static {
        let (counters, disconnects) = (Arc::clone(counters), Arc::clone(disconnects));
        move || counters.snapshot(disconnects.load(Ordering::Relaxed))
    }

    pub(super) fn snapshot(&self, disconnects: u64) -> BridgeStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BridgeStats {
            claimed: get(&self.claimed),
            published: get(&self.published),
            republished: get(&self.republished),
            publish_retries: get(&self.publish_retries),
            released: get(&self.released),
            stored: get(&self.stored),
            duplicates: get(&self.duplicates),
            redeliveries: get(&self.redeliveries),
            progress_acks: get(&self.progress_acks),
            unkeyed: get(&self.unkeyed),
            disconnects,
            lag: get(&self.lag),
            in_flight: get(&self.in_flight),
            paused_ms: get(&self.paused_ms),
        }
    }
}

impl BridgeStats {
    /// As a Piper's statistics, for the rates `dirq status` shows: outbound claims
    /// and publishes, inbound pulls and stores ("done" counts duplicates absorbed too).
    fn as_piper_stats(&self) -> PiperStats {
        PiperStats {
            claimed: self.claimed + self.stored + self.duplicates,
            forwarded: self.published + self.stored + self.duplicates,
            retried: self.publish_retries,
            in_flight: self.in_flight,
            paused_ms: self.paused_ms,
            ..PiperStats::default()
        }
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        [
            ("claimed", self.claimed),
            ("published", self.published),
            ("republished", self.republished),
            ("publish_retries", self.publish_retries),
            ("released", self.released),
            ("stored", self.stored),
            ("duplicates", self.duplicates),
            ("redeliveries", self.redeliveries),
            ("progress_acks", self.progress_acks),
            ("unkeyed", self.unkeyed),
            ("disconnects", self.disconnects),
            ("lag", self.lag),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// A bridge's liveness file under its queue, rewritten by [`Liveness::beat`].
#[derive(Debug)]
pub(super) struct Liveness {
    advert: Advert,
    info: PiperInfo,
    rates: RateWindow,
}

impl Liveness {
    /// Creates the advert under `queue` for the bridge `name` between `queue` and
    /// `remote` (`stream NAME at URL`).
    pub(super) fn create(
        queue: &DirectoryQueue,
        name: &str,
        outbound: bool,
        remote: String,
    ) -> crate::Result<Liveness> {
        let started = SystemTime::now();
        let root = queue.root().display().to_string();
        let (inputs, outputs) = if outbound {
            (vec![root], vec![("nats".to_owned(), remote)])
        } else {
            (vec![remote], vec![("queue".to_owned(), root)])
        };
        let info = PiperInfo {
            stage: name.to_owned(),
            host: sys::hostname(),
            pid: sys::pid(),
            started: rfc3339(started),
            heartbeat: rfc3339(started),
            heartbeat_ms: epoch_ms(started),
            state: "starting".to_owned(),
            workers: 1,
            inputs,
            outputs,
            live: true,
            ..PiperInfo::default()
        };
        let advert = Advert::create(std::slice::from_ref(queue), &info)?;
        Ok(Liveness {
            advert,
            info,
            rates: RateWindow::default(),
        })
    }

    /// Rewrites the advert with `stats` and `state`.
    pub(super) fn beat(&mut self, stats: &BridgeStats, state: &str) {
        let now = SystemTime::now();
        let piper_stats = stats.as_piper_stats();
        self.rates.record(piper_stats);
        self.info.heartbeat = rfc3339(now);
        self.info.heartbeat_ms = epoch_ms(now);
        self.info.state = state.to_owned();
        self.info.stats = piper_stats;
        self.info.rates = self.rates.rates();
        self.info.counters = stats.counters();
        self.advert.update(&self.info);
    }
}
