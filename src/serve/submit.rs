//! Submitting a message over HTTP: the body streamed to the queue's `tmp/` as it
//! arrives, cut off at the limit, and published only once it is complete.
//!
//! The request's body is read on the reactor, frame by frame, each frame handed through
//! a small channel to a blocking task that writes it with
//! [`DirectoryQueue::enqueue_reader`] (or its variants). A body over the limit, a client
//! that stalls or goes away, becomes an error of that reader: the enqueue removes its
//! file in `tmp/` and nothing is published. So a submit is either stored and
//! acknowledged, or refused with nothing left behind.

use std::io::{self, Read};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::error::ApiError;
use crate::queue::Group;
use crate::{admin, DirectoryQueue, Enqueued, Error, MessageId, State};

/// Frames in flight between the reactor and the writer: enough to keep both busy,
/// few enough that a slow disk holds back the client (through TCP) rather than memory.
const CHANNEL_FRAMES: usize = 4;

/// Longest `Idempotency-Key`.
const MAX_KEY_LEN: usize = 128;

/// How a submit places its message.
#[derive(Debug)]
pub(super) struct SubmitOptions {
    not_before: Option<SystemTime>,
    hold: bool,
    group: Option<Group>,
    /// The id an `Idempotency-Key` maps to.
    key: Option<MessageId>,
}

/// What a submit did.
#[derive(Debug)]
pub(super) struct Stored {
    pub(super) id: MessageId,
    /// False when an `Idempotency-Key` named a message that was already there.
    pub(super) new: bool,
    /// Where the message is: a state's name, or [`FINISHED`].
    pub(super) state: &'static str,
}

/// The `state` of an idempotent submit whose message was already processed.
pub(super) const FINISHED: &str = "finished";

impl SubmitOptions {
    /// Checks the query's options and the `Idempotency-Key` header.
    pub(super) fn parse(
        not_before: Option<&str>,
        hold: bool,
        group: Option<&str>,
        ordered: bool,
        key: Option<&HeaderValue>,
    ) -> Result<SubmitOptions, ApiError> {
        let not_before = not_before.map(parse_time).transpose()?;
        if ordered && group.is_none() {
            return Err(ApiError::bad_request("ordered=true needs group=NAME"));
        }
        let group = group
            .map(|name| {
                if ordered {
                    Group::ordered(name)
                } else {
                    Group::new(name)
                }
            })
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let key = key.map(key_id).transpose()?;
        let placements = [not_before.is_some(), hold, group.is_some()];
        if placements.iter().filter(|set| **set).count() > 1 {
            return Err(ApiError::bad_request(
                "not_before, hold and group exclude each other: give at most one",
            ));
        }
        if key.is_some() && placements.iter().any(|set| *set) {
            return Err(ApiError::bad_request(
                "Idempotency-Key works for plain submits only, not with not_before, hold or group",
            ));
        }
        Ok(SubmitOptions {
            not_before,
            hold,
            group,
            key,
        })
    }
}

/// The message id an `Idempotency-Key` maps to: the key itself, so that an operator
/// finds the message under the name the client chose. Keys are 1 to 128 bytes of
/// ASCII letters, digits and `-_.:~+=@`, not starting with `.` (a UUID fits).
fn key_id(key: &HeaderValue) -> Result<MessageId, ApiError> {
    let bytes = key.as_bytes();
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || b"-_.:~+=@".contains(b);
    if bytes.is_empty() || bytes.len() > MAX_KEY_LEN || !bytes.iter().all(allowed) {
        return Err(ApiError::bad_request(format!(
            "invalid Idempotency-Key: expected 1 to {MAX_KEY_LEN} ASCII letters, digits or -_.:~+=@"
        )));
    }
    let key = std::str::from_utf8(bytes).unwrap_or_default();
    MessageId::new(key).map_err(|e| ApiError::bad_request(format!("invalid Idempotency-Key: {e}")))
}

/// `not_before`, as [`admin::parse_time`] reads it.
fn parse_time(text: &str) -> Result<SystemTime, ApiError> {
    admin::parse_time(text).ok_or_else(|| {
        ApiError::bad_request(format!(
            "invalid not_before {text:?}: expected seconds since the epoch or an RFC 3339 time such as 2026-12-01T08:00:00Z"
        ))
    })
}

pub(super) fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "refused the message: the body is larger than the limit of {max} bytes (--max-body)"
        ),
    )
}

/// Stores `body` into `queue` as `options` say, streaming it.
pub(super) async fn submit(
    queue: DirectoryQueue,
    options: SubmitOptions,
    body: Body,
    max: u64,
    idle: Duration,
) -> Result<Stored, ApiError> {
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    let what = format!("submit to {}", queue.root().display());
    let store = tokio::task::spawn_blocking(move || store(&queue, options, BodyReader::new(rx)));
    let read = pump(body, tx, max, idle).await;
    let stored = store.await;
    match (read, stored) {
        (Ok(()), Ok(Ok(stored))) => Ok(stored),
        // The reader failed, so the enqueue did too and removed its file.
        (Err(client), _) => Err(client),
        (Ok(()), Ok(Err(e))) => Err(ApiError::from_queue(&what, &e)),
        (Ok(()), Err(e)) => Err(ApiError::from_join(&what, &e)),
    }
}

/// Moves the body's frames to the writer. Errors are the client's (too large, stalled,
/// broken off) and are also sent to the writer, so that it stores nothing; when the
/// writer stops early (its own error) this returns `Ok` and the writer's error is the
/// answer.
async fn pump(
    mut body: Body,
    tx: mpsc::Sender<io::Result<Bytes>>,
    max: u64,
    idle: Duration,
) -> Result<(), ApiError> {
    let mut length: u64 = 0;
    loop {
        let failure = match tokio::time::timeout(idle, body.frame()).await {
            Ok(None) => return Ok(()),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                length = length.saturating_add(data.len() as u64);
                if length > max {
                    too_large(max)
                } else if tx.send(Ok(data)).await.is_err() {
                    return Ok(());
                } else {
                    continue;
                }
            }
            Ok(Some(Err(e))) => ApiError::bad_request(format!("failed to read the body: {e}")),
            Err(_) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "failed to read the body: nothing arrived for {} s",
                    idle.as_secs_f64()
                ),
            ),
        };
        let _ = tx
            .send(Err(io::Error::other("the request body was refused")))
            .await;
        return Err(failure);
    }
}

/// The body as the writer reads it.
struct BodyReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl BodyReader {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> BodyReader {
        BodyReader {
            rx,
            chunk: Bytes::new(),
        }
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// How far in the future a held submit is deferred before it is moved to `hold/`:
/// deferred, it cannot be claimed meanwhile. Should the server die between the two
/// steps, the message waits in `deferred/` where `dirq ls` shows it.
const HOLD_PARKING: Duration = Duration::from_secs(100 * 365 * 86_400);

fn store(
    queue: &DirectoryQueue,
    options: SubmitOptions,
    mut body: BodyReader,
) -> Result<Stored, Error> {
    if let Some(id) = options.key {
        return store_once(queue, id, body);
    }
    let (id, state) = if let Some(group) = &options.group {
        let id = queue.enqueue_reader_in_group(group, body)?;
        let state = if group.is_ordered() {
            State::Chained
        } else {
            State::Incoming
        };
        (id, state)
    } else if options.hold {
        let id = queue.enqueue_reader_at(body, SystemTime::now() + HOLD_PARKING)?;
        if let Err(e) = admin::hold(queue, &id) {
            // Not acknowledged, so not kept: take it back out of deferred/.
            if let Err(undo) = admin::delete(queue, &id) {
                tracing::warn!(id = %id, error = %undo, "failed to remove a message whose hold failed");
            }
            return Err(e);
        }
        (id, State::Hold)
    } else if let Some(at) = options.not_before {
        let state = if at > SystemTime::now() {
            State::Deferred
        } else {
            State::Incoming
        };
        (queue.enqueue_reader_at(body, at)?, state)
    } else {
        (queue.enqueue_reader(&mut body)?, State::Incoming)
    };
    sync_batch(queue)?;
    Ok(Stored {
        id,
        new: true,
        state: state.as_str(),
    })
}

/// An idempotent submit: the message under the id its key maps to, streamed like any
/// other, and kept unless a message with that id is in the queue, in any state, or was
/// finished recently enough that the queue remembers it
/// ([`DirectoryQueue::enqueue_reader_with_id`], which also makes concurrent calls for
/// one id take turns).
fn store_once(queue: &DirectoryQueue, id: MessageId, body: BodyReader) -> Result<Stored, Error> {
    let (new, state) = match queue.enqueue_reader_with_id(&id, body)? {
        Enqueued::Stored => (true, State::Incoming.as_str()),
        Enqueued::AlreadyQueued(state) => (false, state.as_str()),
        Enqueued::AlreadyFinished => (false, FINISHED),
    };
    if new {
        sync_batch(queue)?;
    }
    Ok(Stored { id, new, state })
}

fn sync_batch(queue: &DirectoryQueue) -> Result<(), Error> {
    if queue.durability() == crate::Durability::Batch {
        queue.sync()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn times_parse_as_epoch_seconds_or_rfc3339() {
        let at = |s: &str| {
            parse_time(s)
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        assert_eq!(at("1764576000"), Some(1_764_576_000));
        assert_eq!(at("2025-12-01T08:00:00Z"), Some(1_764_576_000));
        assert_eq!(at("2025-12-01T09:00:00.250+01:00"), Some(1_764_576_000));
        assert_eq!(at("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(at("2025-13-01T08:00:00Z"), None);
        assert_eq!(at("tomorrow"), None);
        assert_eq!(at("2025-12-01T08:00:00"), None, "an offset is required");
    }

    #[test]
    fn keys_map_to_ids_or_are_refused() {
        let key = |s: &str| key_id(&HeaderValue::from_str(s).expect("a header value"));
        assert_eq!(
            key("7f6c1e0a-52d3-4a8e-9c1b-1234567890ab")
                .map(|id| id.to_string())
                .ok()
                .as_deref(),
            Some("7f6c1e0a-52d3-4a8e-9c1b-1234567890ab")
        );
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "x.meta",
            "with space",
            &"k".repeat(129),
        ] {
            assert!(key(bad).is_err(), "{bad:?} is refused");
        }
    }
}
