//! The NATS connection: the one place the bridge calls the client to connect, with the
//! reconnect policy, and the JetStream context over it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

use super::config::BridgeConfig;
use super::error::BridgeError;

/// The header JetStream deduplicates on.
pub(super) const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long a publish waits for its PubAck, and an API request for its answer, before
/// the bridge counts it failed and retries.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The delay before reconnection attempt `attempt`: 50 ms doubling up to
/// [`MAX_BACKOFF`], so a restarted server is found within a few seconds and a dead one
/// is not hammered.
pub(super) fn backoff(attempt: usize) -> Duration {
    let shift = u32::try_from(attempt.min(10)).unwrap_or(10);
    Duration::from_millis(50u64 << shift).min(MAX_BACKOFF)
}

/// A connection and its JetStream context, with a count of the times it was lost.
#[derive(Debug)]
pub(super) struct Connection {
    pub(super) js: jetstream::Context,
    pub(super) disconnects: Arc<AtomicU64>,
}

/// Connects to `config`'s servers. With no server up yet, returns at once and keeps
/// trying in the background (as after a lost connection): requests fail, and are
/// retried, until a server answers.
pub(super) async fn connect(config: &BridgeConfig, name: &str) -> Result<Connection, BridgeError> {
    let disconnects = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&disconnects);
    let url = config.url.clone();
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(backoff)
        .event_callback(move |event| {
            let counter = Arc::clone(&counter);
            let url = url.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        counter.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%url, "lost the NATS connection; reconnecting");
                    }
                    async_nats::Event::Connected => {
                        tracing::info!(%url, "connected to NATS");
                    }
                    other => tracing::debug!(%url, event = %other, "NATS event"),
                }
            }
        });
    let servers: Vec<&str> = config.url.split(',').map(str::trim).collect();
    let client = options
        .connect(servers)
        .await
        .map_err(|e| BridgeError::nats("connect", &config.url, e))?;
    let js = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client);
    Ok(Connection { js, disconnects })
}

/// A short description of `stream` for errors: `stream NAME at URL`.
pub(super) fn stream_target(config: &BridgeConfig) -> String {
    format!("stream {} at {}", config.stream, config.url)
}

/// `consumer NAME of stream NAME at URL`.
pub(super) fn consumer_target(config: &BridgeConfig) -> String {
    format!(
        "consumer {} of stream {} at {}",
        config.consumer, config.stream, config.url
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_50ms_and_stops_at_5s() {
        assert_eq!(backoff(0), Duration::from_millis(50));
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(6), Duration::from_millis(3200));
        assert_eq!(backoff(7), MAX_BACKOFF);
        assert_eq!(backoff(usize::MAX), MAX_BACKOFF);
    }
}
