//! What a bridge connects to and how it paces itself.

use std::time::Duration;

use super::error::BridgeError;

/// Where a bridge connects and how it behaves; shared by [`setup`](super::setup),
/// [`Outbound`](super::Outbound) and [`Inbound`](super::Inbound).
///
/// Setters are non-consuming; bad values are reported when a bridge starts.
///
/// ```
/// use std::time::Duration;
/// use dirq::bridge::BridgeConfig;
///
/// let mut config = BridgeConfig::new("nats://127.0.0.1:4222", "orders");
/// config.replicas(3).duplicate_window(Duration::from_secs(600));
/// assert_eq!(config.subject(), "dirq.orders");
/// assert_eq!(config.consumer_name(), "dirq");
/// ```
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub(super) url: String,
    pub(super) stream: String,
    pub(super) consumer: String,
    /// `None`: 1 when created, anything when checked.
    pub(super) replicas: Option<usize>,
    /// `None`: the server's default (2 min) when created, anything when checked.
    pub(super) duplicate_window: Option<Duration>,
    pub(super) batch: usize,
    pub(super) in_flight: usize,
    pub(super) ack_wait: Duration,
    pub(super) high_watermark: usize,
    pub(super) low_watermark: usize,
    pub(super) drain_timeout: Duration,
    pub(super) name: Option<String>,
}

impl BridgeConfig {
    /// A configuration for the NATS server(s) at `url` (`nats://host:port`, several
    /// separated by commas) and the stream `stream`.
    pub fn new(url: impl Into<String>, stream: impl Into<String>) -> BridgeConfig {
        BridgeConfig {
            url: url.into(),
            stream: stream.into(),
            consumer: "dirq".to_owned(),
            replicas: None,
            duplicate_window: None,
            batch: 1024,
            in_flight: 1024,
            ack_wait: Duration::from_secs(30),
            high_watermark: 10_000,
            low_watermark: 8_000,
            drain_timeout: Duration::from_secs(10),
            name: None,
        }
    }

    /// The durable pull consumer's name. Inbound bridges on many hosts that give the
    /// same name share its messages (one logical queue). Default: `dirq`.
    pub fn consumer(&mut self, name: impl Into<String>) -> &mut Self {
        self.consumer = name.into();
        self
    }

    /// Replicas of the stream that [`setup`](super::setup) creates (1, 3 or 5 in a
    /// cluster), and checks when the stream exists. Default: 1 when created, not
    /// checked.
    pub fn replicas(&mut self, replicas: usize) -> &mut Self {
        self.replicas = Some(replicas);
        self
    }

    /// How long the stream remembers a `Nats-Msg-Id` to drop a republished message;
    /// set by [`setup`](super::setup) and checked when the stream exists. Default: the
    /// server's (2 min) when created, not checked.
    pub fn duplicate_window(&mut self, window: Duration) -> &mut Self {
        self.duplicate_window = Some(window);
        self
    }

    /// Messages claimed (outbound) or stored (inbound) and synced together; an
    /// inbound bridge pulls four batches at a time. Default: 1024 (against 256: 10,100
    /// against 11,800-12,100 messages/s end to end in `benches/bridge.rs`).
    pub fn batch(&mut self, batch: usize) -> &mut Self {
        self.batch = batch;
        self
    }

    /// Outbound: messages published and not yet acknowledged, at most. Default: 1024.
    pub fn in_flight(&mut self, in_flight: usize) -> &mut Self {
        self.in_flight = in_flight;
        self
    }

    /// The consumer's ack wait, set by [`setup`](super::setup): how long the server
    /// waits for an ack before it redelivers; an inbound bridge sends progress acks
    /// while a batch takes longer. Default: 30 s.
    pub fn ack_wait(&mut self, wait: Duration) -> &mut Self {
        self.ack_wait = wait;
        self
    }

    /// Inbound: stop pulling while the queue's `incoming/` holds this many messages,
    /// and resume below `low`. Default: 10,000 and 8,000.
    pub fn watermarks(&mut self, high: usize, low: usize) -> &mut Self {
        self.high_watermark = high;
        self.low_watermark = low;
        self
    }

    /// How long a stopping bridge waits for what is in flight. Default: 10 s.
    pub fn drain_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.drain_timeout = timeout;
        self
    }

    /// The name the bridge advertises under (`dirq status`). Default: `bridge-out
    /// STREAM` or `bridge-in STREAM`.
    pub fn name(&mut self, name: impl Into<String>) -> &mut Self {
        self.name = Some(name.into());
        self
    }

    /// The subject the stream takes and outbound bridges publish to: `dirq.STREAM`.
    pub fn subject(&self) -> String {
        format!("dirq.{}", self.stream)
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The durable consumer's name.
    pub fn consumer_name(&self) -> &str {
        &self.consumer
    }

    /// The NATS URL(s).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub(super) fn check(&self) -> Result<(), BridgeError> {
        let bad = |what: String| Err(BridgeError::Config(what));
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !name_ok(&self.stream) {
            return bad(format!(
                "stream name {:?} must be letters, digits, - and _",
                self.stream
            ));
        }
        if !name_ok(&self.consumer) {
            return bad(format!(
                "consumer name {:?} must be letters, digits, - and _",
                self.consumer
            ));
        }
        if self.batch == 0 || self.in_flight == 0 {
            return bad("batch and in-flight must be at least 1".to_owned());
        }
        if let Some(replicas) = self.replicas.filter(|r| !(1..=5).contains(r)) {
            return bad(format!("replicas must be 1 to 5, not {replicas}"));
        }
        if self.low_watermark > self.high_watermark || self.high_watermark == 0 {
            return bad(format!(
                "watermarks: low {} must not exceed high {} (at least 1)",
                self.low_watermark, self.high_watermark
            ));
        }
        if self.ack_wait < std::time::Duration::from_secs(1) {
            return bad("ack wait must be at least 1 s".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_with_what_was_expected() {
        assert!(BridgeConfig::new("nats://h:4222", "orders").check().is_ok());
        let refused = |config: &BridgeConfig| match config.check() {
            Err(BridgeError::Config(what)) => what,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(refused(&BridgeConfig::new("u", "a.b")).contains("letters, digits"));
        assert!(refused(&BridgeConfig::new("u", "")).contains("stream name"));
        assert!(refused(BridgeConfig::new("u", "s").consumer("c d")).contains("consumer"));
        assert!(refused(BridgeConfig::new("u", "s").replicas(7)).contains("1 to 5"));
        assert!(refused(BridgeConfig::new("u", "s").watermarks(5, 9)).contains("low 9"));
        assert!(refused(BridgeConfig::new("u", "s").batch(0)).contains("at least 1"));
    }
}
