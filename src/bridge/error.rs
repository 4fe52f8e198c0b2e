//! The bridge's error type.

use std::fmt;

/// What went wrong in a bridge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// A bad setting; says which and what was expected.
    #[error("bad bridge setting: {0}")]
    Config(String),
    /// The local queue failed.
    #[error("bridge queue operation failed")]
    Queue(#[from] crate::Error),
    /// A NATS operation failed (after its retries, where it has them).
    #[error("failed to {op} (NATS {target})")]
    Nats {
        /// What the bridge was doing: "connect", "create the stream", ...
        op: &'static str,
        /// The URL, stream or consumer concerned.
        target: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stream or consumer exists with settings other than the ones asked for;
    /// nothing was changed.
    #[error("NATS {target} exists with other settings: {differences}")]
    Mismatch {
        /// The stream or consumer.
        target: String,
        /// Each difference, `;`-separated.
        differences: String,
    },
    /// The bridge could not start its runtime or a thread.
    #[error("failed to start the bridge's runtime")]
    Runtime(#[source] std::io::Error),
}

impl BridgeError {
    pub(super) fn nats(
        op: &'static str,
        target: impl fmt::Display,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BridgeError {
        BridgeError::Nats {
            op,
            target: target.to_string(),
            source: source.into(),
        }
    }
}
