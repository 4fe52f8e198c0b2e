//! Operator tools: look at, repair and edit a queue from outside its workers.
//!
//! These are the library side of the `dirq` command's `ls`, `cat`, `check`, `hold`,
//! `unhold`, `flush`, `requeue`, `delete`, `purge` and `edit`: functions that take a
//! [`DirectoryQueue`](crate::DirectoryQueue) and work on any message in any state.
//! Workers do not need them; they claim, and recover what dead workers left.
//!
//! - listing: [`list`], [`info`], [`failure`], [`peek`], [`ages`], [`pipers`];
//! - editing: [`hold`], [`unhold`], [`flush`], [`flush_all`], [`requeue`], [`delete`],
//!   [`purge`], [`replace`] (new content for a waiting message);
//! - checking: [`check`] and [`repair`], `postsuper -s` for this layout;
//! - history: [`history`], [`visit_history`], [`history_counts`] (the outcomes Pipers wrote in
//!   `history/`) and [`job_log`] (a command's output, `history/logs/<id>.log`).
//!
//! This layer uses the queue API and, for what the queue does not offer, the
//! engine's methods; the queue layer never imports it.

mod check;
mod edit;
mod flush;
mod history;
mod hold;
mod listing;
mod replace;

pub use crate::format::history::{HistoryOutcome, HistoryRecord};
pub use check::{check, repair, Problem, ProblemKind, RepairReport};
pub use edit::{delete, purge, requeue, PurgeReport};
pub use flush::{flush, flush_all};
pub use history::{history, history_counts, job_log, visit_history, HistoryCounts, HistoryFilter};
pub use hold::{hold, unhold};
pub use listing::{ages, failure, info, list, peek, pipers, MessageInfo};
pub use replace::replace;
