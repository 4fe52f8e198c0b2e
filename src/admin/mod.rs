//! Operator tools: look at, repair and edit a queue from outside its workers.
//!
//! These are the library side of the `dirq` command's `ls`, `cat`, `check`, `hold`,
//! `unhold`, `flush`, `requeue`, `delete`, `purge`, `edit` and `cancel`: functions that take a
//! [`DirectoryQueue`](crate::DirectoryQueue) and work on any message in any state.
//! Workers do not need them; they claim, and recover what dead workers left.
//!
//! - listing: [`list`], [`info`], [`failure`], [`peek`], [`ages`] (and [`age_histogram`]),
//!   [`pipers`];
//! - editing: [`hold`], [`unhold`], [`flush`], [`flush_all`], [`requeue`], [`delete`],
//!   [`requeue_group`], [`purge`], [`replace`] (new content for a waiting message);
//! - running messages: [`cancel_timeout`] and [`cancel_deadline`] make the Piper
//!   processing a message abandon it (`dirq cancel`);
//! - metrics: [`metrics`], the Prometheus exposition of `dirq metrics`;
//! - times: [`parse_time`], the times `dirq push --at` and `dirq serve` take;
//! - checking: [`check`] and [`repair`], `postsuper -s` for this layout;
//! - history: [`history`], [`visit_history`], [`history_counts`] (the outcomes Pipers
//!   wrote in `history/`) and [`job_log`] (a command's output, `history/logs/<id>.log`).
//!
//! This layer uses the queue API and, for what the queue does not offer, the
//! engine's methods; the queue layer never imports it.

mod cancel;
mod check;
mod edit;
mod flush;
mod history;
mod hold;
mod listing;
mod metrics;
mod replace;
mod time;

pub use crate::format::history::{HistoryOutcome, HistoryRecord};
pub use cancel::{cancel_deadline, cancel_timeout, remove_stale_cancels, CancelTo};
pub use check::{check, repair, Problem, ProblemKind, RepairReport};
pub use edit::{delete, purge, requeue, requeue_group, PurgeReport};
pub use flush::{flush, flush_all};
pub use history::{history, history_counts, job_log, visit_history, HistoryCounts, HistoryFilter};
pub use hold::{hold, unhold};
pub use listing::{
    age_histogram, ages, failure, info, list, peek, pipers, MessageInfo, AGE_BUCKETS_MINUTES,
};
pub use metrics::metrics;
pub use replace::replace;
pub use time::parse_time;

/// The error of `op` on message `id` when no state it acts on holds it: kind
/// `ResourceBusy` saying `claimed` when the message is in `pending/` (a worker has it),
/// else kind `NotFound` saying `missing`; `path` names where it was looked for.
fn not_waiting(
    queue: &crate::DirectoryQueue,
    op: crate::error::Operation,
    path: std::path::PathBuf,
    id: &crate::MessageId,
    claimed: &str,
    missing: &str,
) -> crate::Error {
    let pending = queue.engine().dir(crate::State::Pending);
    let (kind, why) = if pending.dir.stat_at(id.as_os_str()).is_ok() {
        (std::io::ErrorKind::ResourceBusy, claimed)
    } else {
        (std::io::ErrorKind::NotFound, missing)
    };
    crate::Error::io(op, path, std::io::Error::new(kind, why))
}
