//! Waking idle claimers when something arrives in `incoming/`.
//!
//! notify (inotify on Linux) is a hint; the directory scan decides. A waiter always
//! wakes after the rescan interval too, so a missed event costs latency, never a
//! message.
//!
//! One signal serves the whole process: any watched directory's event wakes every
//! waiter, which rescans what it waits for. That lets a waiter wait on several queues
//! at once (a Piper's inputs, and its outputs while backpressure holds it), and lets
//! a shutdown wake everyone; a spurious wake-up costs a directory `stat`. A thread
//! that also waits for work handed to it alone (the worker of an async stage, whose
//! futures end on a runtime) waits with a [`Bell`] of its own, so that this work wakes
//! it and nobody else.
//!
//! While a claimer trusts the watch, it also records the names that arrive (see
//! [`Wake::arm`]), so that a claimer woken on a long directory (ext4 never shrinks
//! one that once held a million entries) claims the new names without reading it.
//!
//! The watch is active only while some claimer of this handle has recently waited:
//! notify subscribes to opens and modifications as well, so a watch on a busy queue
//! would wake notify's thread for every claim. It is added when a claimer is about to
//! sleep and dropped after [`IDLE_UNWATCH`] without waiters.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use notify::event::{ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};

/// What a waiter watches a directory for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interest {
    /// Messages arriving (claimers).
    Arrivals = 1,
    /// Messages leaving (a Piper paused by backpressure waits for downstream claims).
    Departures = 2,
}

/// Whether `event` matters to the interests in `wanted` (a bit set of [`Interest`]).
/// Errors and events notify cannot classify always matter.
fn matters(event: &notify::Result<notify::Event>, wanted: u8) -> bool {
    let arrivals = wanted & Interest::Arrivals as u8 != 0;
    let departures = wanted & Interest::Departures as u8 != 0;
    let Ok(event) = event else {
        return true;
    };
    match event.kind {
        EventKind::Create(_) => arrivals,
        EventKind::Remove(_) => departures,
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => arrivals,
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => departures,
        EventKind::Modify(ModifyKind::Name(_)) | EventKind::Any | EventKind::Other => true,
        EventKind::Modify(_) | EventKind::Access(_) => false,
    }
}

/// Whether `event` says the watch may have missed something: the kernel's event queue
/// overflowed, or notify reported an error or an event it could not classify.
fn incomplete(event: &notify::Result<notify::Event>) -> bool {
    match event {
        Err(_) => true,
        Ok(event) => event.need_rescan() || matches!(event.kind, EventKind::Any | EventKind::Other),
    }
}

/// The name of the entry that `event` says arrived in the watched directory, if any.
/// A rename within the directory is reported twice (`To`, then `Both`); only `To` counts.
fn arrival(event: &notify::Event) -> Option<OsString> {
    match event.kind {
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            event.paths.first()?.file_name().map(OsString::from)
        }
        _ => None,
    }
}

/// Most names [`Arrivals`] keeps; past this, reading the directory is cheaper anyway.
const MAX_ARRIVALS: usize = 64 * 1024;

/// Names the watch reported arriving since it was [armed](Wake::arm).
#[derive(Debug, Default)]
struct Arrivals {
    names: Vec<OsString>,
    /// Recording, since the last [`Wake::arm`], with the watch active throughout.
    armed: bool,
    /// Some arrival since then may be missing from `names`.
    incomplete: bool,
}

impl Arrivals {
    fn record(&mut self, event: &notify::Result<notify::Event>) {
        if !self.armed {
            return;
        }
        if incomplete(event) || self.names.len() >= MAX_ARRIVALS {
            self.incomplete = true;
            self.names = Vec::new();
            return;
        }
        if let Some(name) = event.as_ref().ok().and_then(arrival) {
            self.names.push(name);
        }
    }
}

/// How long the watch stays after the last waiter, so that a worker alternating
/// between busy and idle does not add and remove it for every message.
const IDLE_UNWATCH: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct Wake {
    watch: Mutex<WatchState>,
    /// Bit set of the [`Interest`]s of this handle's waiters, read by the watcher thread.
    interests: Arc<AtomicU8>,
    /// Departure events seen by this handle's watch (for backpressure: nothing left
    /// the directory, so counting it again would find the same).
    departures: Arc<AtomicU64>,
    arrivals: Arc<Mutex<Arrivals>>,
}

/// Bumped by the watcher threads on every relevant event, and by [`wake_all`].
#[derive(Debug)]
struct Signal {
    generation: Mutex<u64>,
    cond: Condvar,
}

static SIGNAL: Signal = Signal {
    generation: Mutex::new(0),
    cond: Condvar::new(),
};

impl Signal {
    fn bump(&self) {
        *lock(&self.generation) += 1;
        self.cond.notify_all();
        // Waiters with a bell sleep on its condition variable, not on ours.
        // IMPORTANT: the generation's lock is released first: a waiter holds its bell's
        // lock while it reads the generation.
        for bell in lock(&BELLS).iter() {
            let _rung = lock(&bell.rung);
            bell.cond.notify_one();
        }
    }
}

/// A waiter's own wake-up, for a thread that waits for the signal *or* for work handed
/// to it alone (a Piper worker whose async stage's futures finish on a runtime).
/// Ringing it wakes that one thread, where [`wake_all`] would make every waiter of the
/// process look at its queues again.
#[derive(Debug, Default)]
pub(crate) struct Bell {
    rung: Mutex<bool>,
    cond: Condvar,
}

/// The bells of the threads now in [`wait_any_or`], which the signal also rings.
static BELLS: Mutex<Vec<Arc<Bell>>> = Mutex::new(Vec::new());

#[cfg_attr(
    not(any(feature = "tokio", test)),
    expect(dead_code, reason = "rung only by the futures of async stages")
)]
impl Bell {
    /// Wakes the thread waiting with this bell, or, if none is waiting, makes its next
    /// wait return at once.
    pub(crate) fn ring(&self) {
        *lock(&self.rung) = true;
        self.cond.notify_one();
    }
}

/// As [`wait_any`], but also woken (alone) when `bell` rings, or at once if it rang
/// since the last wait with it returned.
pub(crate) fn wait_any_or(wakes: &[&Wake], seen: u64, until: Instant, bell: &Arc<Bell>) {
    for wake in wakes {
        lock(&wake.watch).waiters += 1;
    }
    lock(&BELLS).push(Arc::clone(bell));
    {
        // A bump after this read of the generation rings the bell, which waits for
        // this thread to sleep (it holds the bell's lock until then): not missed.
        let mut rung = bell
            .cond
            .wait_timeout_while(
                lock(&bell.rung),
                until.saturating_duration_since(Instant::now()),
                |rung| !*rung && generation() == seen,
            )
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        *rung = false;
    }
    lock(&BELLS).retain(|b| !Arc::ptr_eq(b, bell));
    for wake in wakes {
        let mut state = lock(&wake.watch);
        state.waiters -= 1;
        state.last_waiter = Instant::now();
    }
}

/// Wakes every waiter of the process (for example to notice a shutdown).
pub(crate) fn wake_all() {
    SIGNAL.bump();
}

/// The current event generation; pass it to [`wait_any`] after a scan found nothing,
/// so that an event arriving in between is not lost.
pub(crate) fn generation() -> u64 {
    *lock(&SIGNAL.generation)
}

/// Sleeps until an event arrives after generation `seen`, or until `until`, counting
/// as a waiter of each of `wakes` meanwhile (which keeps their watches).
pub(crate) fn wait_any(wakes: &[&Wake], seen: u64, until: Instant) {
    for wake in wakes {
        lock(&wake.watch).waiters += 1;
    }
    drop(
        SIGNAL
            .cond
            .wait_timeout_while(
                lock(&SIGNAL.generation),
                until.saturating_duration_since(Instant::now()),
                |generation| *generation == seen,
            )
            .unwrap_or_else(PoisonError::into_inner),
    );
    for wake in wakes {
        let mut state = lock(&wake.watch);
        state.waiters -= 1;
        state.last_waiter = Instant::now();
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
            interests: Arc::new(AtomicU8::new(0)),
            departures: Arc::new(AtomicU64::new(0)),
            arrivals: Arc::new(Mutex::new(Arrivals::default())),
            watch: Mutex::new(WatchState {
                watcher: None,
                watching: None,
                polling_only: !events,
                waiters: 0,
                last_waiter: Instant::now(),
            }),
        }
    }

    /// Makes sure events of `interest` in `dir` are being watched. Returns `true` when
    /// the watch (or the interest) was just added: events before that moment were
    /// missed, so the caller looks once more before sleeping.
    pub(crate) fn prepare(&self, dir: &Path, interest: Interest) -> bool {
        let new_interest =
            self.interests.fetch_or(interest as u8, Ordering::AcqRel) & interest as u8 == 0;
        let mut state = lock(&self.watch);
        state.last_waiter = Instant::now();
        if state.polling_only {
            return false;
        }
        if state.watching.is_some() {
            return new_interest;
        }
        if state.watcher.is_none() {
            let interests = Arc::clone(&self.interests);
            let departures = Arc::clone(&self.departures);
            let arrivals = Arc::clone(&self.arrivals);
            let handler = move |event: notify::Result<notify::Event>| {
                lock(&arrivals).record(&event);
                if matters(&event, Interest::Departures as u8) {
                    departures.fetch_add(1, Ordering::AcqRel);
                }
                if matters(&event, interests.load(Ordering::Acquire)) {
                    SIGNAL.bump();
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

    /// Whether filesystem events can be trusted here; `false` once the handle fell
    /// back to polling (NFS, FUSE, inotify limits).
    pub(crate) fn events(&self) -> bool {
        !lock(&self.watch).polling_only
    }

    /// Starts recording the names that arrive, forgetting those recorded so far.
    /// Returns `false` when no watch for arrivals is active, so nothing is recorded.
    ///
    /// A claimer arms the watch before it reads the directory; if the read finds the
    /// directory empty, every entry that arrives afterwards is in [`Wake::arrivals`].
    pub(crate) fn arm(&self) -> bool {
        let state = lock(&self.watch);
        let watching = state.watching.is_some()
            && self.interests.load(Ordering::Acquire) & Interest::Arrivals as u8 != 0;
        *lock(&self.arrivals) = Arrivals {
            armed: watching,
            ..Arrivals::default()
        };
        watching
    }

    /// Stops recording arrivals: the look that followed [`Wake::arm`] found messages,
    /// so the names would not be used, and a busy queue would pile them up.
    pub(crate) fn disarm(&self) {
        *lock(&self.arrivals) = Arrivals::default();
    }

    /// Takes the names recorded since [`Wake::arm`], or `None` when some arrival may be
    /// missing from them (the watch was dropped or overflowed since, or never armed).
    pub(crate) fn arrivals(&self) -> Option<Vec<OsString>> {
        let mut arrivals = lock(&self.arrivals);
        if !arrivals.armed || arrivals.incomplete {
            return None;
        }
        Some(std::mem::take(&mut arrivals.names))
    }

    /// How many departure events the watch has seen (see [`Interest::Departures`]).
    /// Always 0 where events are not available.
    pub(crate) fn departures(&self) -> u64 {
        self.departures.load(Ordering::Acquire)
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
        lock(&self.arrivals).armed = false;
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
        assert!(
            wake.prepare(dir.path(), Interest::Arrivals),
            "the watch is new"
        );
        assert!(
            !wake.prepare(dir.path(), Interest::Arrivals),
            "the watch exists"
        );
        assert!(
            wake.prepare(dir.path(), Interest::Departures),
            "the interest is new"
        );
        // The generation is read before the event, as the claim loop does, so the
        // event is seen whether or not the sleeper is asleep yet.
        let seen = generation();
        let sleeper = {
            let wake = Arc::clone(&wake);
            std::thread::spawn(move || {
                let start = Instant::now();
                wait_any(&[&wake], seen, Instant::now() + Duration::from_secs(60));
                start.elapsed()
            })
        };
        std::fs::write(dir.path().join("message"), b"x").unwrap();
        let slept = sleeper.join().unwrap();
        assert!(
            slept < Duration::from_secs(60),
            "woken by the event, not the deadline"
        );
        assert!(generation() > seen);
    }

    /// A thread waiting on `bell` with no watches, up to a minute; how long it slept.
    fn spawn_waiter(bell: &Arc<Bell>, seen: u64) -> std::thread::JoinHandle<Duration> {
        let bell = Arc::clone(bell);
        std::thread::spawn(move || {
            let start = Instant::now();
            wait_any_or(&[], seen, Instant::now() + Duration::from_secs(60), &bell);
            start.elapsed()
        })
    }

    #[test]
    fn a_bell_wakes_its_waiter_and_a_ring_is_kept_until_a_wait() {
        let bell = Arc::new(Bell::default());
        let seen = generation();
        let waiter = spawn_waiter(&bell, seen);
        bell.ring();
        let slept = waiter.join().unwrap();
        assert!(
            slept < Duration::from_secs(60),
            "woken by the bell, not the deadline"
        );
        // A ring before the wait makes it return at once; once consumed, it does not
        // again (the deadline ends the second wait).
        bell.ring();
        let seen = generation();
        wait_any_or(&[], seen, Instant::now() + Duration::from_secs(60), &bell);
        let start = Instant::now();
        let seen = generation();
        wait_any_or(&[], seen, Instant::now() + Duration::from_millis(50), &bell);
        assert!(
            start.elapsed() >= Duration::from_millis(50) || generation() != seen,
            "a consumed ring woke the waiter again"
        );
    }

    #[test]
    fn the_signal_wakes_a_waiter_with_a_bell() {
        let bell = Arc::new(Bell::default());
        let seen = generation();
        let waiter = spawn_waiter(&bell, seen);
        wake_all();
        let slept = waiter.join().unwrap();
        assert!(slept < Duration::from_secs(60), "woken by the signal");
        assert!(lock(&BELLS).iter().all(|b| !Arc::ptr_eq(b, &bell)));
    }

    #[test]
    fn claimers_ignore_departures() {
        use notify::event::{CreateKind, RemoveKind};
        let event = |kind| Ok(notify::Event::new(kind));
        let arrivals = Interest::Arrivals as u8;
        let departures = Interest::Departures as u8;
        let moved_in = event(EventKind::Modify(ModifyKind::Name(RenameMode::To)));
        let moved_out = event(EventKind::Modify(ModifyKind::Name(RenameMode::From)));
        assert!(matters(&moved_in, arrivals));
        assert!(!matters(&moved_out, arrivals));
        assert!(matters(&moved_out, departures));
        assert!(!matters(&moved_in, departures));
        assert!(matters(
            &event(EventKind::Create(CreateKind::File)),
            arrivals
        ));
        assert!(matters(
            &event(EventKind::Remove(RemoveKind::File)),
            departures
        ));
        assert!(!matters(
            &event(EventKind::Access(notify::event::AccessKind::Any)),
            arrivals | departures
        ));
    }

    #[test]
    fn arrivals_record_names_until_something_may_be_missed() {
        use notify::event::{CreateKind, Flag};
        let event = |kind, paths: &[&str]| {
            let mut event = notify::Event::new(kind);
            for path in paths {
                event = event.add_path(PathBuf::from(path));
            }
            Ok(event)
        };
        let created = event(EventKind::Create(CreateKind::File), &["/q/incoming/a"]);
        let moved_in = event(
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            &["/q/incoming/b"],
        );
        let moved_within = event(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            &["/q/incoming/x", "/q/incoming/b"],
        );
        let moved_out = event(
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            &["/q/incoming/c"],
        );

        let mut arrivals = Arrivals::default();
        arrivals.record(&created);
        assert!(arrivals.names.is_empty(), "not armed: nothing recorded");

        arrivals.armed = true;
        for e in [&created, &moved_in, &moved_within, &moved_out] {
            arrivals.record(e);
        }
        assert_eq!(arrivals.names, ["a", "b"]);
        assert!(!arrivals.incomplete);

        let overflow = Ok(notify::Event::new(EventKind::Other).set_flag(Flag::Rescan));
        arrivals.record(&overflow);
        assert!(arrivals.incomplete && arrivals.names.is_empty());

        let mut arrivals = Arrivals {
            armed: true,
            ..Arrivals::default()
        };
        for _ in 0..=MAX_ARRIVALS {
            arrivals.record(&created);
        }
        assert!(arrivals.incomplete, "more than {MAX_ARRIVALS} names");
    }

    #[test]
    fn arming_needs_a_watch_for_arrivals() {
        let dir = tempfile::tempdir().unwrap();
        let wake = Wake::new(true);
        assert!(!wake.arm(), "no watch yet");
        assert_eq!(wake.arrivals(), None);
        wake.prepare(dir.path(), Interest::Departures);
        assert!(!wake.arm(), "watching for departures only");
        wake.prepare(dir.path(), Interest::Arrivals);
        assert!(wake.arm());
        assert_eq!(wake.arrivals(), Some(Vec::new()));
    }

    #[test]
    fn polling_only_never_watches() {
        let dir = tempfile::tempdir().unwrap();
        let wake = Wake::new(false);
        assert!(!wake.prepare(dir.path(), Interest::Arrivals));
        // Other tests of this process may bump the signal: wait until the deadline.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            wait_any(&[&wake], generation(), start + Duration::from_millis(50));
        }
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
