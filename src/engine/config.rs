//! The settings of an open queue handle.

use std::time::Duration;

use super::durability::Durability;
use super::retry::RetryPolicy;

/// Settings of an open queue handle.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) create: bool,
    pub(crate) dir_mode: u32,
    pub(crate) file_mode: u32,
    pub(crate) durability: Durability,
    pub(crate) rescan_interval: Duration,
    pub(crate) orphan_grace: Duration,
    pub(crate) tmp_max_age: Duration,
    pub(crate) max_age: Option<Duration>,
    pub(crate) retry: RetryPolicy,
    /// The time to live of `seen/` records to store as the queue's setting; `None`:
    /// use the stored one.
    pub(crate) remember_finished: Option<Duration>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            create: true,
            dir_mode: 0o775,
            file_mode: 0o664,
            durability: Durability::Full,
            rescan_interval: Duration::from_secs(1),
            orphan_grace: Duration::ZERO,
            tmp_max_age: Duration::from_secs(3600),
            max_age: None,
            retry: RetryPolicy::default(),
            remember_finished: None,
        }
    }
}
