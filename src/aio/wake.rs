//! Waking async claimers: an inotify descriptor on `incoming/` polled by the reactor.
//!
//! One descriptor per [`AsyncQueue`](super::AsyncQueue) serves all its waiters: the
//! one that finds it readable drains it and bumps a generation that every waiter
//! watches, so an event drained by one waiter still wakes the others (it may be for
//! a second message). A waiter marks the generation seen before it looks, so an event
//! between its look and its wait is not lost.
//!
//! A woken herd looks once, not once per waiter: a waiter woken by an event (or
//! starting to claim) skips its look when another look that began at the same
//! generation or later found nothing. An arrival after that look leaves the
//! descriptor readable, and whoever drains it bumps the generation, so the skipper
//! looks then. A waiter woken by its timer (rescan, due time) always looks.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::queue::ArrivalsWatch;

pub(super) struct AsyncWake {
    /// `None` where events are unavailable: waiters poll at the rescan interval.
    fd: Option<AsyncFd<ArrivalsWatch>>,
    generation: watch::Sender<()>,
    /// Bumped with `generation`; a number to compare looks by.
    events: AtomicU64,
    /// One more than the greatest `events` value at the start of a look that found
    /// nothing (0: none yet).
    empty_from: AtomicU64,
}

impl AsyncWake {
    /// Registers `watch` with the current runtime's reactor.
    pub(super) fn new(watch: Option<ArrivalsWatch>) -> AsyncWake {
        // SAFETY: `ArrivalsWatch` owns its descriptor (a private `OwnedFd`, never
        // replaced) and closes it only when dropped, which `AsyncFd` does after
        // deregistering it: the registered descriptor stays valid while registered.
        #[expect(unsafe_code, reason = "tokio's registration of a descriptor is unsafe")]
        let registered = |watch| unsafe { AsyncFd::register(watch) };
        let fd = watch.and_then(|watch| match registered(watch) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!(error = %e, "cannot register the watch; polling only");
                None
            }
        });
        AsyncWake {
            fd,
            generation: watch::Sender::new(()),
            events: AtomicU64::new(0),
            empty_from: AtomicU64::new(0),
        }
    }

    /// A receiver of the generation, current one marked seen.
    pub(super) fn subscribe(&self) -> watch::Receiver<()> {
        self.generation.subscribe()
    }

    /// The event count, read before a look.
    pub(super) fn events(&self) -> u64 {
        self.events.load(Ordering::Acquire)
    }

    /// Whether a look that began at event count `events` or later found nothing, so
    /// that another look now would find the same. Never without the descriptor: the
    /// count then stands still, and only looking finds what arrived.
    pub(super) fn looked_empty(&self, events: u64) -> bool {
        self.fd.is_some() && self.empty_from.load(Ordering::Acquire) > events
    }

    /// A look that began at event count `events` found nothing.
    pub(super) fn found_empty(&self, events: u64) {
        self.empty_from.fetch_max(events + 1, Ordering::AcqRel);
    }

    fn bump(&self) {
        // IMPORTANT: the count before the watch: a waiter woken by the watch must not
        // read the old count and skip its look on the strength of an older empty look.
        self.events.fetch_add(1, Ordering::AcqRel);
        self.generation.send_replace(());
    }

    /// Completes when events were drained from the descriptor (and the generation was
    /// bumped for the other waiters). Never completes without a descriptor.
    pub(super) async fn arrival(&self) {
        let Some(fd) = &self.fd else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return std::future::pending().await;
            };
            // Reading a few bytes of inotify events never blocks: the descriptor is
            // non-blocking, and WouldBlock clears the readiness for the next wait.
            match guard.try_io(|fd| fd.get_ref().drain()) {
                Ok(Ok(_)) => {
                    self.bump();
                    return;
                }
                Ok(Err(e)) => {
                    // Not ready until the reactor says so again: a broken descriptor
                    // must not spin its waiters, who still rescan on their timer.
                    guard.clear_ready();
                    tracing::debug!(error = %e, "cannot read the watch; looking anyway");
                    self.bump();
                    return;
                }
                // Another waiter drained it first and bumped the generation.
                Err(_would_block) => {}
            }
        }
    }
}

impl fmt::Debug for AsyncWake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncWake")
            .field("events", &self.fd.is_some())
            .finish()
    }
}
