//! The queues found under the spool root, by name, found again periodically and on a
//! miss, with a short history of each one's counts for the charts and rates.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::Result;
use crate::{DirectoryQueue, Durability, State};

/// Samples kept per queue: 10 minutes at the default interval of 10 s.
pub(super) const SERIES_LEN: usize = 60;

/// A lookup of an unknown name walks the spool again at most this often, so that
/// requests for names that do not exist cannot make the server walk without pause.
const MISS_RESCAN: Duration = Duration::from_secs(1);

/// The counts of one queue at one time.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    /// Seconds since the epoch.
    pub(super) unix: u64,
    pub(super) at: Instant,
    /// Indexed like [`State::ALL`].
    pub(super) counts: [usize; State::ALL.len()],
}

impl Sample {
    pub(super) fn take(queue: &DirectoryQueue) -> Result<Sample> {
        let counts = queue.counts()?;
        Ok(Sample {
            unix: unix_now(),
            at: Instant::now(),
            counts: State::ALL.map(|state| counts.get(state)),
        })
    }

    /// Messages not yet finished: everything but `tmp/`.
    pub(super) fn unfinished(&self) -> usize {
        State::ALL
            .iter()
            .zip(self.counts)
            .filter(|(state, _)| **state != State::Tmp)
            .map(|(_, n)| n)
            .sum()
    }
}

struct Entry {
    queue: DirectoryQueue,
    series: VecDeque<Sample>,
}

struct Found {
    queues: BTreeMap<String, Entry>,
    scanned: Instant,
}

/// The queues under one root. Every method that walks or reads the disk blocks: call
/// them on the blocking pool.
pub(super) struct Registry {
    root: PathBuf,
    rescan: Duration,
    durability: Durability,
    found: Mutex<Found>,
}

impl Registry {
    /// Walks `root` once.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) with `Scan` when the root cannot be read.
    pub(super) fn open(
        root: PathBuf,
        rescan: Duration,
        durability: Durability,
    ) -> Result<Registry> {
        // The root itself must be readable; errors below it are logged and skipped.
        std::fs::read_dir(&root)
            .map_err(|e| crate::Error::io(crate::error::Operation::Scan, &root, e))?;
        let registry = Registry {
            root,
            rescan,
            durability,
            found: Mutex::new(Found {
                queues: BTreeMap::new(),
                scanned: Instant::now(),
            }),
        };
        registry.scan();
        Ok(registry)
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> MutexGuard<'_, Found> {
        // A panic while holding the lock leaves the map consistent (every change is one
        // insert or remove), so a poisoned lock is used as it is.
        self.found
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Walks the root again: new queues are opened, vanished ones dropped, known ones
    /// keep their handle and series.
    pub(super) fn scan(&self) {
        let mut paths = BTreeMap::new();
        for found in crate::spool::queues(&self.root) {
            match found {
                Ok(found) => {
                    paths.insert(found.name().to_owned(), found.path().to_path_buf());
                }
                Err(e) => tracing::debug!(error = %e, "skipped part of the spool"),
            }
        }
        let known: Vec<String> = self.lock().queues.keys().cloned().collect();
        let mut opened = Vec::new();
        for (name, path) in &paths {
            if known.contains(name) {
                continue;
            }
            // create(false): the server never makes directories; a queue Mentat made
            // without hold/ or deferred/ is served without them.
            match DirectoryQueue::builder(path)
                .create(false)
                .durability(self.durability)
                .open()
            {
                Ok(queue) => opened.push((name.clone(), queue)),
                Err(e) => tracing::warn!(queue = %name, error = %e, "failed to open a queue"),
            }
        }
        let mut found = self.lock();
        found.queues.retain(|name, _| paths.contains_key(name));
        for (name, queue) in opened {
            if !found.queues.contains_key(&name) {
                tracing::info!(queue = %name, "found a queue");
            }
            found.queues.entry(name).or_insert_with(|| Entry {
                queue,
                series: VecDeque::new(),
            });
        }
        found.scanned = Instant::now();
    }

    /// The names of the queues, sorted.
    pub(super) fn names(&self) -> Vec<String> {
        self.lock().queues.keys().cloned().collect()
    }

    /// The queue named `name`, walking the root again first when it is not known and
    /// the last walk is older than a second.
    pub(super) fn lookup(&self, name: &str) -> Option<DirectoryQueue> {
        let stale = {
            let found = self.lock();
            if let Some(entry) = found.queues.get(name) {
                return Some(entry.queue.clone());
            }
            found.scanned.elapsed() >= MISS_RESCAN
        };
        if stale {
            self.scan();
        }
        self.lock()
            .queues
            .get(name)
            .map(|entry| entry.queue.clone())
    }

    /// The samples of `name`, oldest first.
    pub(super) fn series(&self, name: &str) -> Vec<Sample> {
        self.lock()
            .queues
            .get(name)
            .map(|entry| entry.series.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Samples every queue's counts once.
    fn sample(&self) {
        let queues: Vec<(String, DirectoryQueue)> = self
            .lock()
            .queues
            .iter()
            .map(|(name, entry)| (name.clone(), entry.queue.clone()))
            .collect();
        for (name, queue) in queues {
            match Sample::take(&queue) {
                Ok(sample) => {
                    if let Some(entry) = self.lock().queues.get_mut(&name) {
                        if entry.series.len() == SERIES_LEN {
                            entry.series.pop_front();
                        }
                        entry.series.push_back(sample);
                    }
                }
                Err(e) => tracing::debug!(queue = %name, error = %e, "failed to sample a queue"),
            }
        }
    }

    /// Walks the root every rescan interval and samples every `every`, until the task
    /// is aborted.
    pub(super) async fn sample_forever(registry: Arc<Registry>, every: Duration) {
        let tick = registry.rescan.min(every);
        let mut last_sample: Option<Instant> = None;
        let mut last_scan = Instant::now();
        loop {
            let sample = last_sample.is_none_or(|at| at.elapsed() >= every);
            let scan = last_scan.elapsed() >= registry.rescan;
            let this = Arc::clone(&registry);
            let work = tokio::task::spawn_blocking(move || {
                if scan {
                    this.scan();
                }
                if sample {
                    this.sample();
                }
            });
            if work.await.is_err() {
                tracing::warn!("sampling the queues failed");
            }
            if scan {
                last_scan = Instant::now();
            }
            if sample {
                last_sample = Some(Instant::now());
            }
            tokio::time::sleep(tick).await;
        }
    }
}

pub(super) fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

pub(super) fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
