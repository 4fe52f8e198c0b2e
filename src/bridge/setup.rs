//! Creating, or checking, the stream and its durable pull consumer.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self as js, ErrorCode};

use super::config::BridgeConfig;
use super::error::BridgeError;
use super::nats::{self, consumer_target, stream_target};

/// What [`setup`] found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SetupReport {
    /// Whether the stream was created now (else it existed and its settings matched).
    pub stream_created: bool,
    /// Whether the consumer was created now.
    pub consumer_created: bool,
    /// The stream's replicas.
    pub replicas: usize,
    /// The stream's duplicate window.
    pub duplicate_window: Duration,
    /// The subject the stream takes.
    pub subject: String,
    /// Messages waiting for the consumer (its `num_pending`: after crashes, the
    /// stream's message count is not the backlog).
    pub pending: u64,
    /// Messages delivered to the consumer and not acked yet (its `num_ack_pending`).
    /// After a server crash it can count a message the stream no longer holds.
    pub unacked: u64,
    /// Messages the stream holds (acked ones are removed from a work-queue stream).
    pub messages: u64,
}

/// Most messages a consumer hands out unacknowledged; an inbound bridge pulls at most
/// a few batches ahead, so this is never the limit in practice.
const MAX_ACK_PENDING: i64 = 20_000;

/// Creates the work-queue file stream `config.stream_name()` on the subject
/// `dirq.NAME` and its durable pull consumer, or checks that they exist with the
/// settings asked for. Idempotent: run it at every deployment.
///
/// # Errors
///
/// [`BridgeError::Config`] for bad settings; [`BridgeError::Nats`] when no server
/// answers within a few seconds or refuses; [`BridgeError::Mismatch`] when the stream
/// or consumer exists with other settings (nothing is changed then).
pub fn setup(config: &BridgeConfig) -> Result<SetupReport, BridgeError> {
    config.check()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BridgeError::Runtime)?;
    runtime.block_on(setup_async(config))
}

async fn setup_async(config: &BridgeConfig) -> Result<SetupReport, BridgeError> {
    let conn = nats::connect(config, "dirq bridge setup").await?;
    let (mut stream, stream_created) = stream(&conn.js, config).await?;
    let info = stream
        .info()
        .await
        .map_err(|e| BridgeError::nats("read the stream's settings", stream_target(config), e))?
        .clone();
    let (consumer, consumer_created) = consumer(&stream, config, true).await?;
    let pending = consumer.cached_info().num_pending;
    let unacked = consumer.cached_info().num_ack_pending as u64;
    Ok(SetupReport {
        stream_created,
        consumer_created,
        replicas: info.config.num_replicas,
        duplicate_window: info.config.duplicate_window,
        subject: config.subject(),
        pending,
        unacked,
        messages: info.state.messages,
    })
}

/// The stream, created if missing; `true` when created now.
async fn stream(
    js: &js::Context,
    config: &BridgeConfig,
) -> Result<(stream::Stream, bool), BridgeError> {
    let target = stream_target(config);
    match js.get_stream(&config.stream).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| BridgeError::nats("read the stream's settings", &target, e))?;
            check_stream(&info.config, config)?;
            Ok((existing, false))
        }
        Err(e) if matches!(e.kind(), js::context::GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            let wanted = stream::Config {
                name: config.stream.clone(),
                subjects: vec![config.subject()],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                num_replicas: config.replicas.unwrap_or(1),
                duplicate_window: config.duplicate_window.unwrap_or(Duration::from_secs(120)),
                ..Default::default()
            };
            let created = js
                .create_stream(wanted)
                .await
                .map_err(|e| BridgeError::nats("create the stream", &target, e))?;
            Ok((created, true))
        }
        Err(e) => Err(BridgeError::nats("look up the stream", target, e)),
    }
}

fn check_stream(found: &stream::Config, config: &BridgeConfig) -> Result<(), BridgeError> {
    let mut differences = Vec::new();
    if found.retention != RetentionPolicy::WorkQueue {
        differences.push(format!("retention {:?}, not WorkQueue", found.retention));
    }
    if found.storage != StorageType::File {
        differences.push(format!("storage {:?}, not File", found.storage));
    }
    if !found.subjects.contains(&config.subject()) {
        differences.push(format!(
            "subjects {:?}, without {}",
            found.subjects,
            config.subject()
        ));
    }
    if let Some(replicas) = config.replicas.filter(|r| *r != found.num_replicas) {
        differences.push(format!("{} replicas, not {replicas}", found.num_replicas));
    }
    if let Some(window) = config
        .duplicate_window
        .filter(|w| *w != found.duplicate_window)
    {
        differences.push(format!(
            "duplicate window {:?}, not {window:?}",
            found.duplicate_window
        ));
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(BridgeError::Mismatch {
            target: stream_target(config),
            differences: differences.join("; "),
        })
    }
}

/// The durable pull consumer; created if missing and `create`; `true` when created now.
pub(super) async fn consumer(
    stream: &stream::Stream,
    config: &BridgeConfig,
    create: bool,
) -> Result<(PullConsumer, bool), BridgeError> {
    let target = consumer_target(config);
    let existed = stream.consumer_info(&config.consumer).await.is_ok();
    let found = if create {
        let wanted = pull::Config {
            durable_name: Some(config.consumer.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            deliver_policy: DeliverPolicy::All,
            // Never give up on a message: the destination absorbs redeliveries, and a
            // message the server stopped delivering would be lost.
            max_deliver: -1,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        };
        stream
            .get_or_create_consumer(&config.consumer, wanted)
            .await
            .map_err(|e| BridgeError::nats("create the consumer", &target, e))?
    } else {
        stream.get_consumer(&config.consumer).await.map_err(|e| {
            BridgeError::nats("look up the consumer (run `dirq bridge setup`)", &target, e)
        })?
    };
    let settings = &found.cached_info().config;
    if settings.ack_policy != AckPolicy::Explicit {
        return Err(BridgeError::Mismatch {
            target,
            differences: format!("ack policy {:?}, not Explicit", settings.ack_policy),
        });
    }
    Ok((found, !existed))
}

/// The stream, for the bridges (which do not create it).
pub(super) async fn existing_stream(
    js: &js::Context,
    config: &BridgeConfig,
) -> Result<stream::Stream, BridgeError> {
    js.get_stream(&config.stream).await.map_err(|e| {
        BridgeError::nats(
            "look up the stream (run `dirq bridge setup`)",
            stream_target(config),
            e,
        )
    })
}
