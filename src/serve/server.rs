//! The listening socket and the connection loop: configuration, accept, timeouts and
//! graceful shutdown.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::api::{self, Peer};
use super::auth::Token;
use super::registry::Registry;
use crate::error::{Error, Operation, Result};
use crate::Durability;

/// How long a shutdown waits for requests in flight before it drops them.
const DRAIN: Duration = Duration::from_secs(10);

/// What [`Server`] serves and how: the spool root, the address, the token and the
/// limits. Setters take `&mut self` and state their default.
#[derive(Clone)]
pub struct ServeConfig {
    root: PathBuf,
    listen: SocketAddr,
    token: Option<Token>,
    max_body: u64,
    header_timeout: Duration,
    body_idle_timeout: Duration,
    max_connections: usize,
    rescan_interval: Duration,
    sample_interval: Duration,
    durability: Durability,
}

impl fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeConfig")
            .field("root", &self.root)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("max_body", &self.max_body)
            .field("header_timeout", &self.header_timeout)
            .field("body_idle_timeout", &self.body_idle_timeout)
            .field("max_connections", &self.max_connections)
            .field("rescan_interval", &self.rescan_interval)
            .field("sample_interval", &self.sample_interval)
            .field("durability", &self.durability)
            .finish()
    }
}

impl ServeConfig {
    /// Serves the queues under `root`, read-only, on `127.0.0.1:8080`.
    pub fn new(root: impl AsRef<Path>) -> ServeConfig {
        ServeConfig {
            root: root.as_ref().to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            max_body: 16 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            max_connections: 4096,
            rescan_interval: Duration::from_secs(5),
            sample_interval: Duration::from_secs(10),
            durability: Durability::Full,
        }
    }

    /// The address to listen on; port 0 picks a free one ([`Server::local_addr`] says
    /// which). Default: `127.0.0.1:8080`.
    pub fn listen(&mut self, addr: SocketAddr) -> &mut Self {
        self.listen = addr;
        self
    }

    /// The bearer token that every request changing something must carry. Leading and
    /// trailing whitespace is ignored (a token file's final newline). Default: none,
    /// and the server is read-only; an empty token is refused at [`bind`](Self::bind).
    pub fn token(&mut self, token: &str) -> &mut Self {
        self.token = Some(Token::new(token));
        self
    }

    /// The largest body a submit may have, in bytes; a larger one gets 413 and
    /// nothing is stored. Default: 16 MiB.
    pub fn max_body(&mut self, bytes: u64) -> &mut Self {
        self.max_body = bytes;
        self
    }

    /// How long a client may take to send a request's head (line and headers), counted
    /// from when the server starts waiting for it: a connection, new or between
    /// requests, that stays idle this long is closed. Default: 10 s.
    pub fn header_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.header_timeout = timeout;
        self
    }

    /// How long a client may pause while sending a body; the submit then fails with 408
    /// and nothing is stored. Default: 30 s.
    pub fn body_idle_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.body_idle_timeout = timeout;
        self
    }

    /// How many connections are served at once; more wait in the listen backlog.
    /// Default: 4096.
    pub fn max_connections(&mut self, connections: usize) -> &mut Self {
        self.max_connections = connections;
        self
    }

    /// How often the spool is walked again for new or removed queues. Default: 5 s.
    pub fn rescan_interval(&mut self, interval: Duration) -> &mut Self {
        self.rescan_interval = interval;
        self
    }

    /// How often each queue's counts are sampled for the `series` of the API (the
    /// console's charts); 60 samples are kept. Default: 10 s.
    pub fn sample_interval(&mut self, interval: Duration) -> &mut Self {
        self.sample_interval = interval;
        self
    }

    /// The durability of the queues as the server opens them: a submit or an action
    /// is answered once it is durable in this mode (in `Batch`, after a sync of the
    /// queue). Default: [`Durability::Full`].
    pub fn durability(&mut self, durability: Durability) -> &mut Self {
        self.durability = durability;
        self
    }

    /// Opens the listening socket and finds the queues; call
    /// [`Server::run_until`] to serve. Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// - [`Error::Config`] for an empty token, a zero body limit, timeout or
    ///   connection count.
    /// - [`Error::Io`] with [`Operation::Listen`] when the address cannot be bound,
    ///   and with [`Operation::Scan`] when the root cannot be read.
    pub async fn bind(&self) -> Result<Server> {
        self.validate()?;
        let root = self.root.clone();
        let (rescan, durability) = (self.rescan_interval, self.durability);
        let registry =
            tokio::task::spawn_blocking(move || Registry::open(root, rescan, durability))
                .await
                .map_err(|e| Error::io(Operation::Scan, &self.root, std::io::Error::other(e)))??;
        let listener = TcpListener::bind(self.listen)
            .await
            .map_err(|e| Error::io(Operation::Listen, self.listen.to_string(), e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io(Operation::Listen, self.listen.to_string(), e))?;
        Ok(Server {
            listener,
            local_addr,
            config: self.clone(),
            registry: Arc::new(registry),
        })
    }

    fn validate(&self) -> Result<()> {
        let invalid = |field: &'static str, reason: &str| Error::Config {
            target: format!("server for {}", self.root.display()),
            field,
            reason: reason.to_owned(),
        };
        if self.token.as_ref().is_some_and(Token::is_empty) {
            return Err(invalid("token", "must not be empty"));
        }
        if self.max_body == 0 {
            return Err(invalid("max_body", "must be at least 1 byte"));
        }
        for (field, value) in [
            ("header_timeout", self.header_timeout),
            ("body_idle_timeout", self.body_idle_timeout),
            ("rescan_interval", self.rescan_interval),
            ("sample_interval", self.sample_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "must not be zero"));
            }
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        Ok(())
    }
}

/// A bound server: see the [module documentation](super).
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: ServeConfig,
    registry: Arc<Registry>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// The address the server listens on, with the port chosen when it was 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether changes are refused because no token was set.
    pub fn is_read_only(&self) -> bool {
        self.config.token.is_none()
    }

    /// Serves until `shutdown` completes, then stops accepting, closes idle
    /// connections, and waits up to 10 s for requests in flight (a submit in flight
    /// either completes or stores nothing).
    ///
    /// # Errors
    ///
    /// None today: a failed `accept` (out of descriptors, say) is logged and retried
    /// after a short pause. The `Result` leaves room for errors that end serving.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Server {
            listener,
            config,
            registry,
            ..
        } = self;
        let sampler = tokio::spawn(Registry::sample_forever(
            Arc::clone(&registry),
            config.sample_interval,
        ));
        let router = api::router(Arc::new(api::AppState {
            registry,
            token: config.token.clone(),
            max_body: config.max_body,
            body_idle_timeout: config.body_idle_timeout,
        }));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let permits = Arc::new(Semaphore::new(config.max_connections));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout);
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and the like: pause rather than spin.
                        tracing::warn!(error = %e, "failed to accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let router = router.clone();
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(Peer(peer));
                let mut router = router.clone();
                async move { tower_service::Service::call(&mut router, request).await }
            });
            let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(permit);
            });
        }
        drop(listener);
        sampler.abort();
        tracing::info!("shutting down: waiting for requests in flight");
        if tokio::time::timeout(DRAIN, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("requests still in flight after {DRAIN:?}: dropped");
        }
        Ok(())
    }
}
