//! Claiming: the oldest message of `incoming/`, now, within a time, or whenever it
//! comes.

use std::time::{Duration, Instant};

use super::{DirectoryQueue, Message};
use crate::engine::wake::{self, Interest};
use crate::error::Result;
use crate::format::state::State;

impl DirectoryQueue {
    /// Claims the oldest message in `incoming/`, if there is one, without blocking.
    ///
    /// The message moves to `pending/` and belongs to the returned [`Message`] until
    /// one of its terminals (commit, forward, fail, release) is called. Entries that
    /// are not regular files (symlinks, FIFOs, sockets, devices, directories), files
    /// with more than one hard link and empty files are moved to `errors/` with a
    /// reason on the way; they are never followed, read or blocked on. Names starting
    /// with `.` are skipped (files in progress).
    ///
    /// Losing a race with another claimer is not an error: the next message is tried.
    ///
    /// # Errors
    ///
    /// An [`Error`](crate::Error) naming the path, when `incoming/` cannot be read or a message
    /// cannot be opened or moved (for example `EACCES`). The next call moves on to the
    /// following message.
    ///
    /// # Durability
    ///
    /// A claim syncs nothing: whether a crash leaves the message in `incoming/` or in
    /// `pending/`, it is processed again (recovery requeues it), and the terminal that
    /// ends the claim syncs every directory it depends on.
    pub fn try_claim(&self) -> Result<Option<Message>> {
        loop {
            let Some(claimed) = self.engine().try_claim()? else {
                return Ok(None);
            };
            let expired = claimed.expired;
            let message = Message::claimed(self.clone(), claimed.id, claimed.file, claimed.size);
            if !expired {
                return Ok(Some(message));
            }
            message.fail("expired").map_err(|e| e.into_error())?;
        }
    }

    /// Claims the oldest message, waiting as long as it takes for one to arrive.
    ///
    /// An idle claimer is woken by a filesystem event within milliseconds of a message
    /// arriving, and rescans every [rescan interval](crate::QueueBuilder::rescan_interval)
    /// in case an event was missed.
    ///
    /// # Errors
    ///
    /// As [`try_claim`](DirectoryQueue::try_claim).
    ///
    /// # Durability
    ///
    /// As [`try_claim`](DirectoryQueue::try_claim).
    pub fn claim(&self) -> Result<Message> {
        loop {
            if let Some(message) =
                self.claim_deadline(Instant::now() + Duration::from_secs(3600))?
            {
                return Ok(message);
            }
        }
    }

    /// Claims the oldest message, waiting at most `timeout` for one to arrive.
    ///
    /// # Errors
    ///
    /// As [`try_claim`](DirectoryQueue::try_claim).
    ///
    /// # Durability
    ///
    /// As [`try_claim`](DirectoryQueue::try_claim).
    pub fn claim_timeout(&self, timeout: Duration) -> Result<Option<Message>> {
        match Instant::now().checked_add(timeout) {
            Some(deadline) => self.claim_deadline(deadline),
            None => self.claim().map(Some),
        }
    }

    /// Claims the oldest message, waiting until `deadline` for one to arrive.
    ///
    /// # Errors
    ///
    /// As [`try_claim`](DirectoryQueue::try_claim).
    ///
    /// # Durability
    ///
    /// As [`try_claim`](DirectoryQueue::try_claim).
    pub fn claim_deadline(&self, deadline: Instant) -> Result<Option<Message>> {
        let inner = self.engine();
        let incoming = &inner.dir(State::Incoming).path;
        loop {
            let seen = wake::generation();
            if let Some(message) = self.try_claim()? {
                return Ok(Some(message));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if inner.wake().prepare(incoming, Interest::Arrivals) {
                // The watch is new: anything that arrived before it sent no event.
                continue;
            }
            let until = deadline.min(inner.next_wake(now));
            wake::wait_any(&[inner.wake()], seen, until);
        }
    }
}
