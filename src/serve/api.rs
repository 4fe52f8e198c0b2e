//! The routes and their handlers. Each handler checks what it was given, then does its
//! disk work in one closure on the blocking pool, and answers JSON (or bytes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, Request, State as Shared};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};

use super::auth::{self, Token};
use super::console;
use super::error::ApiError;
use super::registry::Registry;
use super::submit::{self, SubmitOptions};
use super::view;
use crate::{admin, DirectoryQueue, Durability, MessageId};

/// Messages per page when the request does not say; at most [`MAX_LIMIT`].
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// How long a cancel waits for the Piper's answer unless `wait` says; at most 60 s.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// The address of the client, put into each request by the connection loop.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer(pub(super) SocketAddr);

/// What every handler shares: the queues and the settings requests need.
pub(super) struct AppState {
    pub(super) registry: Arc<Registry>,
    /// `None`: read-only.
    pub(super) token: Option<Token>,
    pub(super) max_body: u64,
    pub(super) body_idle_timeout: Duration,
}

impl AppState {
    fn authorize(
        &self,
        headers: &HeaderMap,
        peer: Option<Extension<Peer>>,
        what: &str,
    ) -> Result<(), ApiError> {
        let peer = peer.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |Extension(Peer(p))| p);
        auth::authorize(self.token.as_ref(), headers, peer, what)
    }
}

type App = Shared<Arc<AppState>>;

pub(super) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(console_page))
        .route("/assets/{file}", get(console_asset))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/queues", get(queues))
        .route("/api/v1/queues/{name}", get(queue))
        .route("/api/v1/queues/{name}/ages", get(ages))
        .route("/api/v1/queues/{name}/messages", get(messages).post(submit))
        .route("/api/v1/queues/{name}/messages/{id}", get(message_body))
        .route("/api/v1/queues/{name}/messages/{id}/{action}", post(action))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(common_headers))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

/// One `debug` line per request (`dirq -vv serve`): method, path, status, duration.
async fn log_request(request: Request, next: axum::middleware::Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let start = std::time::Instant::now();
    let response = next.run(request).await;
    tracing::debug!(
        %method,
        path,
        status = response.status().as_u16(),
        ms = start.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    response
}

/// Headers on every answer: no content sniffing, and nothing cached (counts change).
/// No `Access-Control-*` header is ever sent: other origins cannot read answers.
async fn common_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// `value` as a JSON answer with `status`.
fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => {
            ApiError::internal(format!("failed to encode the answer as JSON: {e}")).into_response()
        }
    }
}

/// Runs `work` on the blocking pool.
async fn blocking<T, F>(what: &str, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::from_join(what, &e))?
}

/// The queue named `name`, among those found under the root only.
fn lookup(registry: &Registry, name: &str) -> Result<DirectoryQueue, ApiError> {
    registry.lookup(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "no queue named {name:?} under {}",
            registry.root().display()
        ))
    })
}

/// Makes a change durable on a queue in batch mode, where it waits for a sync.
fn settle(queue: &DirectoryQueue, what: &str) -> Result<(), ApiError> {
    if queue.durability() == Durability::Batch {
        queue.sync().map_err(|e| ApiError::from_queue(what, &e))?;
    }
    Ok(())
}

fn path_error(rejection: &PathRejection) -> ApiError {
    ApiError::bad_request(format!("invalid path: {}", rejection.body_text()))
}

fn query<T: serde::de::DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

fn message_id(id: &str) -> Result<MessageId, ApiError> {
    MessageId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn console_page() -> Response {
    console_response("")
}

async fn console_asset(path: Result<Path<String>, PathRejection>) -> Response {
    match path {
        Ok(Path(file)) => console_response(&file),
        Err(rejection) => path_error(&rejection).into_response(),
    }
}

fn console_response(file: &str) -> Response {
    match console::asset(file) {
        Some((content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, content_type),
                (
                    header::CONTENT_SECURITY_POLICY,
                    console::CONTENT_SECURITY_POLICY,
                ),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            bytes,
        )
            .into_response(),
        None => ApiError::not_found(format!("no console file {file:?}")).into_response(),
    }
}

async fn healthz() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

async fn metrics(Shared(app): App) -> Result<Response, ApiError> {
    let registry = Arc::clone(&app.registry);
    let text = blocking("render metrics", move || {
        let queues: Vec<DirectoryQueue> = registry
            .names()
            .iter()
            .filter_map(|name| registry.lookup(name))
            .collect();
        admin::metrics(&queues).map_err(|e| ApiError::from_queue("render metrics", &e))
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[derive(Serialize)]
struct QueuesView {
    read_only: bool,
    queues: Vec<view::QueueView>,
}

async fn queues(Shared(app): App) -> Result<Response, ApiError> {
    let registry = Arc::clone(&app.registry);
    let read_only = app.token.is_none();
    let queues = blocking("list queues", move || {
        let mut views = Vec::new();
        for name in registry.names() {
            let Some(queue) = registry.lookup(&name) else {
                continue;
            };
            match view::queue(&registry, &name, &queue) {
                Ok(view) => views.push(view),
                // Removed since the last walk: the next one drops it.
                Err(e) => tracing::debug!(queue = %name, error = %e, "skipped a queue"),
            }
        }
        Ok(views)
    })
    .await?;
    Ok(json(StatusCode::OK, &QueuesView { read_only, queues }))
}

async fn queue(
    Shared(app): App,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|r| path_error(&r))?;
    let registry = Arc::clone(&app.registry);
    let view = blocking("describe queue", move || {
        let queue = lookup(&registry, &name)?;
        view::queue(&registry, &name, &queue)
            .map_err(|e| ApiError::from_queue(&format!("describe queue {name:?}"), &e))
    })
    .await?;
    Ok(json(StatusCode::OK, &view))
}

async fn ages(
    Shared(app): App,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|r| path_error(&r))?;
    let registry = Arc::clone(&app.registry);
    let view = blocking("read ages", move || {
        let queue = lookup(&registry, &name)?;
        view::ages(&queue)
            .map_err(|e| ApiError::from_queue(&format!("read the ages in queue {name:?}"), &e))
    })
    .await?;
    Ok(json(StatusCode::OK, &view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesQuery {
    state: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn messages(
    Shared(app): App,
    name: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|r| path_error(&r))?;
    let q: MessagesQuery = query(&uri)?;
    let state_name = q.state.unwrap_or_else(|| "incoming".to_owned());
    let state = state_name.parse::<crate::State>().map_err(|_| {
        ApiError::bad_request(format!(
            "unknown state {state_name:?}: expected one of {}",
            crate::State::ALL.map(|s| s.as_str()).join(", ")
        ))
    })?;
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {limit}"
        )));
    }
    let registry = Arc::clone(&app.registry);
    let view = blocking("list messages", move || {
        let queue = lookup(&registry, &name)?;
        view::messages(&queue, state, offset, limit).map_err(|e| {
            ApiError::from_queue(&format!("list {state_name:?} of queue {name:?}"), &e)
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &view))
}

async fn message_body(
    Shared(app): App,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((name, id)) = path.map_err(|r| path_error(&r))?;
    let id = message_id(&id)?;
    let registry = Arc::clone(&app.registry);
    let (state, bytes) = blocking("read message", move || {
        let queue = lookup(&registry, &name)?;
        admin::peek(&queue, &id)
            .map_err(|e| ApiError::from_queue(&format!("read message {id} of queue {name:?}"), &e))
    })
    .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::HeaderName::from_static("x-dirq-state"),
                state.as_str(),
            ),
        ],
        bytes,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitQuery {
    not_before: Option<String>,
    hold: Option<bool>,
    group: Option<String>,
    ordered: Option<bool>,
}

async fn submit(
    Shared(app): App,
    name: Result<Path<String>, PathRejection>,
    peer: Option<Extension<Peer>>,
    request: Request,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|r| path_error(&r))?;
    let (parts, body) = request.into_parts();
    app.authorize(&parts.headers, peer, &format!("submit to queue {name:?}"))?;
    let q: SubmitQuery = query(&parts.uri)?;
    let options = SubmitOptions::parse(
        q.not_before.as_deref(),
        q.hold.unwrap_or(false),
        q.group.as_deref(),
        q.ordered.unwrap_or(false),
        parts.headers.get("idempotency-key"),
    )?;
    if let Some(length) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if length > app.max_body {
            return Err(submit::too_large(app.max_body));
        }
    }
    let registry = Arc::clone(&app.registry);
    let lookup_name = name.clone();
    let queue = blocking("submit", move || lookup(&registry, &lookup_name)).await?;
    let stored = submit::submit(queue, options, body, app.max_body, app.body_idle_timeout).await?;
    let status = if stored.new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(
        status,
        &serde_json::json!({ "id": stored.id.to_string(), "stored": stored.new, "state": stored.state }),
    ))
}

/// What an action may do, by its name in the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Hold,
    Release,
    Requeue,
    Delete,
    Flush,
    Cancel,
}

impl Action {
    const ALL: [(&'static str, Action); 6] = [
        ("hold", Action::Hold),
        ("release", Action::Release),
        ("requeue", Action::Requeue),
        ("delete", Action::Delete),
        ("flush", Action::Flush),
        ("cancel", Action::Cancel),
    ];

    fn parse(name: &str) -> Result<Action, ApiError> {
        Action::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown action {name:?}: expected one of {}",
                    Action::ALL.map(|(n, _)| n).join(", ")
                ))
            })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionQuery {
    /// `cancel`: back to incoming/ rather than errors/.
    requeue: Option<bool>,
    /// `cancel`: seconds to wait for the Piper's answer.
    wait: Option<u64>,
    /// `requeue`: keep the attempt count rather than start again at zero.
    keep_attempts: Option<bool>,
}

async fn action(
    Shared(app): App,
    path: Result<Path<(String, String, String)>, PathRejection>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let Path((name, id, action_name)) = path.map_err(|r| path_error(&r))?;
    let what = format!("{action_name} message {id} of queue {name:?}");
    app.authorize(&headers, peer, &what)?;
    let action = Action::parse(&action_name)?;
    let id = message_id(&id)?;
    let q: ActionQuery = query(&uri)?;
    let wait = match q.wait {
        Some(seconds) if seconds > 60 => {
            return Err(ApiError::bad_request(format!(
                "wait must be at most 60 seconds, not {seconds}"
            )))
        }
        Some(seconds) => Duration::from_secs(seconds),
        None => CANCEL_WAIT,
    };
    let registry = Arc::clone(&app.registry);
    let answer_id = id.to_string();
    let (from, to) = blocking("act on message", move || {
        let queue = lookup(&registry, &name)?;
        let failed = |e: crate::Error| ApiError::from_queue(&what, &e);
        let moved = match action {
            Action::Hold => {
                admin::hold(&queue, &id).map(|from| (Some(from), Some(crate::State::Hold)))
            }
            Action::Release => admin::unhold(&queue, &id)
                .map(|()| (Some(crate::State::Hold), Some(crate::State::Incoming))),
            Action::Requeue => admin::requeue(&queue, &id, q.keep_attempts.unwrap_or(false))
                .map(|()| (Some(crate::State::Errors), Some(crate::State::Incoming))),
            Action::Delete => admin::delete(&queue, &id).map(|from| (Some(from), None)),
            Action::Flush => admin::flush(&queue, &id)
                .map(|()| (Some(crate::State::Deferred), Some(crate::State::Incoming))),
            Action::Cancel => {
                let to = if q.requeue.unwrap_or(false) {
                    admin::CancelTo::Incoming
                } else {
                    admin::CancelTo::Errors
                };
                admin::cancel_timeout(&queue, &id, to, wait)
                    .map(|to| (Some(crate::State::Pending), Some(to)))
            }
        }
        .map_err(failed)?;
        settle(&queue, &what)?;
        Ok(moved)
    })
    .await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "id": answer_id,
            "action": action_name,
            "ok": true,
            "from": from.map(|s| s.as_str()),
            "state": to.map(|s| s.as_str()),
        }),
    ))
}
