//! Backpressure: pause intake while an output queue holds too much, resume when it
//! has drained below a low watermark.
//!
//! Counting a queue means reading its directory, so it is never done per message.
//! While running, a gauge adds what this Piper published to its last count and reads
//! the directory again only when that estimate reaches the high watermark or the
//! count is older than [`RUNNING_RECOUNT`]. While paused, it reads the directory when
//! woken by a filesystem event in the output's `incoming/` (a downstream claim), at
//! most every [`PAUSED_RECOUNT`], or by the fallback timer.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::{DirectoryQueue, State};

/// How stale a count may get while intake runs.
const RUNNING_RECOUNT: Duration = Duration::from_millis(250);
/// Least time between recounts while paused or near the limit.
const PAUSED_RECOUNT: Duration = Duration::from_millis(10);

/// Watermarks of one output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) high: usize,
    pub(crate) low: usize,
    pub(crate) high_bytes: Option<u64>,
    pub(crate) low_bytes: Option<u64>,
}

#[derive(Debug)]
pub(crate) struct Gauge {
    queue: DirectoryQueue,
    limits: Limits,
    state: Mutex<GaugeState>,
}

#[derive(Debug)]
struct GaugeState {
    /// Messages (and bytes) in the output's `incoming/`: the last count plus what this
    /// Piper added since.
    count: usize,
    bytes: u64,
    measured: Option<Instant>,
    /// The output watch's departure count at the last count.
    departures: u64,
    paused: bool,
}

/// What [`Gauge::admit`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    pub(crate) open: bool,
    pub(crate) change: Option<Change>,
    pub(crate) ask_again: Option<Instant>,
}

/// A change of a gauge's state, for the Piper to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Paused { count: usize, bytes: u64 },
    Resumed { count: usize, bytes: u64 },
}

impl Gauge {
    pub(crate) fn new(queue: DirectoryQueue, limits: Limits) -> Gauge {
        Gauge {
            queue,
            limits,
            state: Mutex::new(GaugeState {
                count: 0,
                bytes: 0,
                measured: None,
                departures: 0,
                paused: false,
            }),
        }
    }

    pub(crate) fn queue(&self) -> &DirectoryQueue {
        &self.queue
    }

    /// Whether intake may go on, whether that just changed, and, while paused, when to
    /// ask again at the latest (messages left the output since it was last counted, but
    /// too recently to count it again).
    pub(crate) fn admit(&self) -> Result<Admission> {
        let mut st = self.lock();
        let departures = self.queue.waker().departures();
        let age = st.measured.map(|t| t.elapsed());
        let near = st.count + 1 >= self.limits.high
            || self.limits.high_bytes.is_some_and(|high| st.bytes >= high);
        let moved = departures != st.departures;
        let mut ask_again = None;
        let due = match (age, st.measured) {
            (Some(age), Some(measured)) if st.paused || near => {
                if age < PAUSED_RECOUNT && moved {
                    ask_again = Some(measured + PAUSED_RECOUNT);
                }
                age >= PAUSED_RECOUNT
            }
            (Some(age), _) => age >= RUNNING_RECOUNT,
            _ => true,
        };
        if due {
            st.count = self.queue.count(State::Incoming)?;
            if self.limits.high_bytes.is_some() {
                st.bytes = self.queue.size(State::Incoming)?;
            }
            st.measured = Some(Instant::now());
            st.departures = departures;
        }
        let (count, bytes) = (st.count, st.bytes);
        let change = if st.paused {
            let below =
                count < self.limits.low && self.limits.low_bytes.is_none_or(|low| bytes < low);
            below.then(|| {
                st.paused = false;
                Change::Resumed { count, bytes }
            })
        } else {
            let over = count >= self.limits.high
                || self.limits.high_bytes.is_some_and(|high| bytes >= high);
            over.then(|| {
                st.paused = true;
                Change::Paused { count, bytes }
            })
        };
        Ok(Admission {
            open: !st.paused,
            change,
            ask_again: ask_again.filter(|_| st.paused),
        })
    }

    /// Whether this gauge holds intake back.
    pub(crate) fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// This Piper published a message of `bytes` into the output.
    pub(crate) fn added(&self, bytes: u64) {
        let mut st = self.lock();
        st.count += 1;
        st.bytes += bytes;
    }

    fn lock(&self) -> MutexGuard<'_, GaugeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
