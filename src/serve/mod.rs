//! An HTTP API and web console over every queue under a spool root: `dirq serve`.
//!
//! [`ServeConfig`] says where to listen and what to allow; [`ServeConfig::bind`] opens
//! the socket and returns a [`Server`], whose [`run_until`](Server::run_until) serves
//! until a shutdown future completes. The routes, all JSON under `/api/v1` except the
//! body of a message, the metrics and the console:
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/v1/queues` | every queue: counts, bytes, oldest age, rates, Pipers |
//! | `GET /api/v1/queues/{name}` | one queue, the same fields |
//! | `GET /api/v1/queues/{name}/messages?state=S&offset=O&limit=L` | messages of a state, paged |
//! | `GET /api/v1/queues/{name}/messages/{id}` | a message's body, not claimed |
//! | `POST /api/v1/queues/{name}/messages` | submit: 201 `{"id"}` once durable |
//! | `POST /api/v1/queues/{name}/messages/{id}/{action}` | hold, release, requeue, delete, flush, cancel |
//! | `GET /api/v1/queues/{name}/ages` | the age histogram (qshape) |
//! | `GET /metrics` | Prometheus text, as [`admin::metrics`](crate::admin::metrics) |
//! | `GET /healthz` | liveness |
//! | `GET /` | the console |
//!
//! `docs/operator.md` describes each route with an example.
//!
//! # Queues and names
//!
//! The queues are those [`spool::queues`](crate::spool::queues) finds under the root,
//! found again every few seconds and (at most once a second) when a request names one
//! not yet known. A queue's name is its path relative to the root (`site-a/enrich`);
//! in a URL it is one path segment, with `/` percent-encoded (`site-a%2Fenrich`). A name
//! is only ever looked up among the queues found, never joined onto a path, so no
//! request reads outside the root; the walk itself follows no symbolic links.
//!
//! # Security
//!
//! - Every request that changes something needs `Authorization: Bearer <token>` with
//!   the token of [`ServeConfig::token`], compared in constant time (every byte is
//!   looked at whatever the first difference). Without a token the server is
//!   read-only and refuses every change with 403. A missing or wrong token gets 401;
//!   the attempt is logged (`tracing` warn, with the peer address, never the token).
//! - No CORS headers are sent, so no other site's script can read an answer, and a
//!   form from another site cannot set the `Authorization` header: changes are safe
//!   from cross-site request forgery.
//! - A submitted body is streamed to the queue's `tmp/`, never held in memory whole,
//!   and cut off with 413 past [`ServeConfig::max_body`]. A message is either stored
//!   and acknowledged or refused with nothing left behind.
//! - Slow clients time out: [`ServeConfig::header_timeout`] for a request's head (which
//!   also closes a connection idle that long) and [`ServeConfig::body_idle_timeout`]
//!   between pieces of a body. Each connection is
//!   its own task, so idle ones do not hold up others; at most
//!   [`ServeConfig::max_connections`] are served at once, the rest wait to be accepted.
//! - TLS is left to a reverse proxy in front (`docs/operator.md` has an nginx example).
//!
//! # Errors
//!
//! Every error is JSON, `{"error": "..."}`, with a message naming what was wrong and a
//! status that fits: 400 bad input, 401 bad token, 403 read-only, 404 unknown queue,
//! message or route, 405 wrong method, 409 refused by the queue (a claimed message, a
//! duplicate), 408 a body that stalled, 413 a body too large, 500 an I/O error, 503
//! while shutting down.
//!
//! # Known problems
//!
//! - Rates are estimates: finished per second is what live Pipers report, enqueued
//!   per second adds the change in waiting messages between two samples.
//! - An HTTP client that keeps connections alive longer than
//!   [`ServeConfig::header_timeout`] between requests finds them closed: the timeout
//!   runs while the server waits for a request's head, on a new connection and between
//!   requests alike.
//! - A message's body (`GET .../messages/{id}`) is read into memory whole before it is
//!   sent.
//! - The spool root itself, when it is a queue, has the empty name and cannot be named
//!   in a URL: serve the directory above it.

mod api;
mod auth;
mod console;
mod error;
mod registry;
mod server;
mod submit;
mod view;

pub use server::{ServeConfig, Server};
