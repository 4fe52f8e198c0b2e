//! Waking idle claimers when something arrives in `incoming/`.
//!
//! notify (inotify on Linux) is a hint; the directory scan decides. A waiter always
//! wakes after the rescan interval too, so a missed event costs latency, never a
//! message.
//!
//! The watch is active only while some claimer of this handle has recently waited:
//! notify subscribes to opens and modifications as well, so a watch on a busy queue
//! would wake notify's thread for every claim. It is added when a claimer is about to
//! sleep and dropped after [`IDLE_UNWATCH`] without waiters.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use notify::{EventKind, RecursiveMode, Watcher};

/// How long the watch stays after the last waiter, so that a worker alternating
/// between busy and idle does not add and remove it for every message.
const IDLE_UNWATCH: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct Wake {
    signal: Arc<Signal>,
    watch: Mutex<WatchState>,
}

/// Bumped by the watcher thread on every relevant event.
#[derive(Debug, Default)]
struct Signal {
    generation: Mutex<u64>,
    cond: Condvar,
}

impl Signal {
    fn bump(&self) {
        *lock(&self.generation) += 1;
        self.cond.notify_all();
    }
}

#[derive(Debug)]
struct WatchState {
    /// `None` until first needed, or when events cannot work here.
    watcher: Option<notify::RecommendedWatcher>,
    watching: Option<PathBuf>,
    /// Events are unavailable (NFS, FUSE, inotify limits): poll only.
    polling_only: bool,
    waiters: usize,
    last_waiter: Instant,
}

impl Wake {
    /// `events`: whether filesystem events can be trusted on this filesystem.
    pub(crate) fn new(events: bool) -> Wake {
        Wake {
            signal: Arc::default(),
            watch: Mutex::new(WatchState {
                watcher: None,
                watching: None,
                polling_only: !events,
                waiters: 0,
                last_waiter: Instant::now(),
            }),
        }
    }

    /// The current event generation; pass it to [`Wake::wait`] after a scan found
    /// nothing, so that an event arriving in between is not lost.
    pub(crate) fn generation(&self) -> u64 {
        *lock(&self.signal.generation)
    }

    /// Makes sure events for `dir` are being watched. Returns `true` when the watch
    /// was just added: events before that moment were missed, so the caller scans once
    /// more before sleeping.
    pub(crate) fn prepare(&self, dir: &Path) -> bool {
        let mut state = lock(&self.watch);
        state.last_waiter = Instant::now();
        if state.polling_only || state.watching.is_some() {
            return false;
        }
        if state.watcher.is_none() {
            let signal = Arc::clone(&self.signal);
            let handler = move |event: notify::Result<notify::Event>| {
                let relevant = match event {
                    Ok(event) => matches!(
                        event.kind,
                        EventKind::Create(_)
                            | EventKind::Modify(notify::event::ModifyKind::Name(_))
                            | EventKind::Any
                            | EventKind::Other
                    ),
                    // Overflow or a watcher error: wake everyone to rescan.
                    Err(_) => true,
                };
                if relevant {
                    signal.bump();
                }
            };
            match notify::recommended_watcher(handler) {
                Ok(watcher) => state.watcher = Some(watcher),
                Err(e) => {
                    tracing::debug!(error = %e, "no filesystem events; polling only");
                    state.polling_only = true;
                    return false;
                }
            }
        }
        let Some(watcher) = state.watcher.as_mut() else {
            return false;
        };
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                state.watching = Some(dir.to_path_buf());
                true
            }
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch; polling only");
                state.polling_only = true;
                false
            }
        }
    }

    /// Sleeps until an event arrives after generation `seen`, or until `until`.
    pub(crate) fn wait(&self, seen: u64, until: Instant) {
        lock(&self.watch).waiters += 1;
        let mut generation = lock(&self.signal.generation);
        while *generation == seen {
            let now = Instant::now();
            if now >= until {
                break;
            }
            generation = self
                .signal
                .cond
                .wait_timeout(generation, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(generation);
        let mut state = lock(&self.watch);
        state.waiters -= 1;
        state.last_waiter = Instant::now();
    }

    /// Called when a claim succeeded: drops a watch nobody has needed for a while.
    pub(crate) fn busy(&self) {
        let Ok(mut state) = self.watch.try_lock() else {
            return;
        };
        if state.waiters > 0
            || state.watching.is_none()
            || state.last_waiter.elapsed() < IDLE_UNWATCH
        {
            return;
        }
        let dir = state.watching.take();
        if let (Some(watcher), Some(dir)) = (state.watcher.as_mut(), dir) {
            if let Err(e) = watcher.unwatch(&dir) {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot unwatch");
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_after_prepare_wakes_a_sleeper() {
        let dir = tempfile::tempdir().unwrap();
        let wake = Arc::new(Wake::new(true));
        assert!(wake.prepare(dir.path()), "the watch is new");
        assert!(!wake.prepare(dir.path()), "the watch exists");
        // The generation is read before the event, as the claim loop does, so the
        // event is seen whether or not the sleeper is asleep yet.
        let seen = wake.generation();
        let sleeper = {
            let wake = Arc::clone(&wake);
            std::thread::spawn(move || {
                let start = Instant::now();
                wake.wait(seen, Instant::now() + Duration::from_secs(60));
                start.elapsed()
            })
        };
        std::fs::write(dir.path().join("message"), b"x").unwrap();
        let slept = sleeper.join().unwrap();
        assert!(
            slept < Duration::from_secs(60),
            "woken by the event, not the deadline"
        );
        assert!(wake.generation() > seen);
    }

    #[test]
    fn polling_only_never_watches() {
        let dir = tempfile::tempdir().unwrap();
        let wake = Wake::new(false);
        assert!(!wake.prepare(dir.path()));
        let start = Instant::now();
        wake.wait(wake.generation(), start + Duration::from_millis(50));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
