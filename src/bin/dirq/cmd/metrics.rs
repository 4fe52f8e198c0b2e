//! `dirq metrics`: Prometheus text exposition (format 0.0.4) of queues and their Pipers.

use dirq::DirectoryQueue;

use super::report::write_out_text;
use crate::output::CliResult;

pub(crate) fn metrics(queues: &[DirectoryQueue]) -> CliResult {
    write_out_text(&dirq::admin::metrics(queues)?)
}
