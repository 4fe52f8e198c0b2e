//! Waking async claimers: an inotify descriptor on `incoming/` polled by the reactor.
//!
//! One descriptor per [`AsyncQueue`](super::AsyncQueue) serves all its waiters: the
//! one that finds it readable drains it and bumps a generation that every waiter
//! watches, so an event drained by one waiter still wakes the others (it may be for
//! a second message). A waiter marks the generation seen before it looks, so an event
//! between its look and its wait is not lost.

use std::fmt;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::queue::ArrivalsWatch;

pub(super) struct AsyncWake {
    /// `None` where events are unavailable: waiters poll at the rescan interval.
    fd: Option<AsyncFd<ArrivalsWatch>>,
    generation: watch::Sender<()>,
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
        }
    }

    /// A receiver of the generation, current one marked seen.
    pub(super) fn subscribe(&self) -> watch::Receiver<()> {
        self.generation.subscribe()
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
                    self.generation.send_replace(());
                    return;
                }
                Ok(Err(e)) => {
                    // Not ready until the reactor says so again: a broken descriptor
                    // must not spin its waiters, who still rescan on their timer.
                    guard.clear_ready();
                    tracing::debug!(error = %e, "cannot read the watch; looking anyway");
                    self.generation.send_replace(());
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
