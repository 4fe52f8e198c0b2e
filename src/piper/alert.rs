//! Alerts: a command and/or an HTTP POST when a message fails or times out, the
//! failure breaker opens or closes, a Piper goes silent, or a queue's oldest message is
//! older than a limit (the FAIL and TIMEOUT alerts of a job state server).
//!
//! [`Alerts`] folds a storm into a few deliveries: the first alert of a kind for a queue
//! goes out at once, the ones after it within the [interval](AlertPolicy::interval) are
//! counted, and one summary carries their number once the interval has passed (or when
//! the sender stops). Deliveries run on a thread of their own, so a slow hook never holds
//! up a worker; raising an alert only takes a lock and counts.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Result};
use crate::format::meta::rfc3339;
use crate::sys;

/// How long a hook command may run before it is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an HTTP delivery may take to connect, and then to answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the sender looks for summaries that are due.
const TICK: Duration = Duration::from_millis(250);

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AlertKind {
    /// A message went to `errors/`: its stage failed it, or its last retry did (a dead
    /// letter).
    Failed,
    /// A message's processing ran past its timeout.
    Timeout,
    /// The failure breaker opened: intake is paused.
    BreakerOpen,
    /// The failure breaker closed again: intake resumed.
    BreakerClosed,
    /// A Piper on the queue stopped updating its liveness file (hung or dead).
    Stale,
    /// The queue's oldest waiting message is older than the limit.
    Age,
}

impl AlertKind {
    /// The name in `DIRQ_ALERT` and in the JSON document: `failed`, `timeout`,
    /// `breaker-open`, `breaker-closed`, `stale`, `age`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Failed => "failed",
            AlertKind::Timeout => "timeout",
            AlertKind::BreakerOpen => "breaker-open",
            AlertKind::BreakerClosed => "breaker-closed",
            AlertKind::Stale => "stale",
            AlertKind::Age => "age",
        }
    }
}

/// One alert, as a hook gets it in its environment and a URL in its JSON document.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Alert {
    /// What happened.
    pub kind: AlertKind,
    /// The stage (Piper) that raised it, or `watch` for `dirq watch`.
    pub stage: String,
    /// The queue it is about.
    pub queue: PathBuf,
    /// The message it is about, if one (the last one, in a summary).
    pub id: Option<String>,
    /// What happened, in words (the failure reason, the breaker's figures, ...).
    pub reason: String,
    /// How many events this alert stands for: 1, or more in a summary.
    pub count: u64,
    /// When the first of them happened.
    pub since: SystemTime,
}

impl Alert {
    /// An alert of `kind` about `queue`, raised by `stage`, happening now.
    pub fn new(
        kind: AlertKind,
        stage: impl Into<String>,
        queue: impl Into<PathBuf>,
        reason: impl Into<String>,
    ) -> Alert {
        Alert {
            kind,
            stage: stage.into(),
            queue: queue.into(),
            id: None,
            reason: reason.into(),
            count: 1,
            since: SystemTime::now(),
        }
    }

    /// The same alert, about message `id`.
    pub fn with_id(mut self, id: impl Into<String>) -> Alert {
        self.id = Some(id.into());
        self
    }

    /// The JSON document an alert URL receives.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "alert": self.kind.as_str(),
            "stage": self.stage,
            "queue": self.queue.to_string_lossy(),
            "id": self.id,
            "reason": self.reason,
            "count": self.count,
            "since": rfc3339(self.since),
            "time": rfc3339(SystemTime::now()),
            "host": sys::hostname(),
            "pid": sys::pid(),
        })
    }
}

/// Where alerts go, how often, and the limits that raise the monitoring alerts.
///
/// ```
/// use std::time::Duration;
/// use dirq::piper::AlertPolicy;
///
/// let mut alerts = AlertPolicy::new();
/// alerts
///     .command("logger -t dirq \"$DIRQ_ALERT on $DIRQ_QUEUE: $DIRQ_REASON (x$DIRQ_COUNT)\"")
///     .url("http://127.0.0.1:9093/dirq")
///     .interval(Duration::from_secs(300))
///     .max_age(Duration::from_secs(3600));
/// assert!(alerts.is_enabled());
/// ```
#[derive(Debug, Clone)]
pub struct AlertPolicy {
    command: Option<OsString>,
    url: Option<String>,
    interval: Duration,
    max_age: Option<Duration>,
    stale_after: Option<Duration>,
}

impl Default for AlertPolicy {
    fn default() -> AlertPolicy {
        AlertPolicy::new()
    }
}

impl AlertPolicy {
    /// No destination (alerts off), one alert per kind and queue a minute, no age or
    /// silence limit.
    pub fn new() -> AlertPolicy {
        AlertPolicy {
            command: None,
            url: None,
            interval: Duration::from_secs(60),
            max_age: None,
            stale_after: None,
        }
    }

    /// A shell command (`sh -c`) run for each alert, with `DIRQ_ALERT` (the
    /// [kind](AlertKind::as_str)), `DIRQ_STAGE`, `DIRQ_QUEUE`, `DIRQ_ID` (when about
    /// one message), `DIRQ_REASON`, `DIRQ_COUNT` (events it stands for), `DIRQ_SINCE`
    /// (RFC 3339, the first of them), `DIRQ_HOST` and `DIRQ_PID` in its environment.
    /// It is killed after 30 s.
    pub fn command(&mut self, command: impl Into<OsString>) -> &mut Self {
        self.command = Some(command.into());
        self
    }

    /// An `http://` URL that gets each alert as a JSON document in a `POST` (`alert`,
    /// `stage`, `queue`, `id`, `reason`, `count`, `since`, `time`, `host`, `pid`). Plain
    /// HTTP only: for HTTPS, call `curl` from the [command](Self::command).
    pub fn url(&mut self, url: impl Into<String>) -> &mut Self {
        self.url = Some(url.into());
        self
    }

    /// At most one alert per kind and queue in this time; the others are counted into
    /// a summary sent when it has passed. More than zero. Default: 60 s.
    pub fn interval(&mut self, interval: Duration) -> &mut Self {
        self.interval = interval;
        self
    }

    /// Raise [`AlertKind::Age`] when a queue's oldest waiting message is older than
    /// this (a Piper checks its inputs every 10 s). More than zero. Default: none.
    pub fn max_age(&mut self, age: Duration) -> &mut Self {
        self.max_age = Some(age);
        self
    }

    /// Raise [`AlertKind::Stale`] when another Piper on the same queue has not updated
    /// its liveness file for this long (a Piper checks every 10 s). At least 10 s.
    /// Default: none.
    pub fn stale_after(&mut self, after: Duration) -> &mut Self {
        self.stale_after = Some(after);
        self
    }

    /// Whether alerts go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.command.is_some() || self.url.is_some()
    }

    /// Checks the settings, as [`Alerts::start`] and
    /// [`PiperBuilder::build`](super::PiperBuilder::build) do, for a tool that validates
    /// a configuration before anything starts.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the setting: an empty command, a URL that is not
    /// `http://HOST[:PORT][/PATH]`, a zero interval or age, a silence limit under 10 s.
    pub fn check(&self) -> Result<()> {
        self.problem()
            .map_err(|(field, reason)| Error::config("alerts", field, reason))
    }

    /// The first setting out of range: its name and why.
    pub(crate) fn problem(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.command.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(("alert command", "must not be empty".to_owned()));
        }
        if let Some(url) = &self.url {
            HttpTarget::parse(url).map_err(|e| ("alert url", e))?;
        }
        if self.interval.is_zero() {
            return Err(("alert interval", "must be more than zero".to_owned()));
        }
        if self.max_age.is_some_and(|a| a.is_zero()) {
            return Err(("alert max age", "must be more than zero".to_owned()));
        }
        if self
            .stale_after
            .is_some_and(|a| a < Duration::from_secs(10))
        {
            return Err((
                "alert stale after",
                "must be at least 10s (Pipers update their liveness file every few seconds)"
                    .to_owned(),
            ));
        }
        Ok(())
    }
}

/// The monitoring alerts `policy`'s limits find in `queue` now, raised by `stage`: an
/// [`AlertKind::Age`] when its oldest waiting message is older than the
/// [age limit](AlertPolicy::max_age), an [`AlertKind::Stale`] for each other Piper on it
/// silent for longer than the [silence limit](AlertPolicy::stale_after). A Piper with
/// these limits checks its inputs every 10 s; `dirq watch` checks any queue.
///
/// # Errors
///
/// [`Error::Io`] when `incoming/` cannot be read for the oldest message's age.
pub fn queue_alerts(
    queue: &crate::DirectoryQueue,
    policy: &AlertPolicy,
    stage: &str,
) -> Result<Vec<Alert>> {
    let mut found = Vec::new();
    if let Some(limit) = policy.max_age {
        if let Some(age) = queue.oldest_age()?.filter(|age| *age > limit) {
            let reason = format!(
                "the oldest waiting message is {}s old (limit {}s)",
                age.as_secs(),
                limit.as_secs()
            );
            found.push(Alert::new(AlertKind::Age, stage, queue.root(), reason));
        }
    }
    if let Some(limit) = policy.stale_after {
        for reason in super::liveness::silent_pipers(queue.root(), limit) {
            found.push(Alert::new(AlertKind::Stale, stage, queue.root(), reason));
        }
    }
    Ok(found)
}

/// A running alert sender.
///
/// The first alert of a kind for a queue is delivered at once; the ones after it within
/// the [interval](AlertPolicy::interval) are counted, and one summary carries their
/// number ([`Alert::count`]) once the interval has passed. Deliveries run on a thread of
/// its own, so [`raise`](Alerts::raise) never waits for a hook. Dropping it (or
/// [`stop`](Alerts::stop)) sends the summaries still due and waits for the deliveries
/// in progress.
pub struct Alerts {
    shared: Arc<(Mutex<Throttle>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// Where deliveries go: the policy's destinations, or (in tests) a list.
#[derive(Clone)]
enum Sink {
    Policy(AlertPolicy),
    #[cfg(test)]
    Collect(Arc<Mutex<Vec<Alert>>>),
}

struct Slot {
    last_sent: Option<Instant>,
    pending: Option<Alert>,
}

struct Throttle {
    interval: Duration,
    slots: HashMap<(AlertKind, PathBuf), Slot>,
    outbox: VecDeque<Alert>,
    stopping: bool,
}

impl Throttle {
    /// Counts `alert` in, and queues what is due for delivery.
    fn raise(&mut self, alert: Alert, now: Instant) {
        let interval = self.interval;
        let slot = self
            .slots
            .entry((alert.kind, alert.queue.clone()))
            .or_insert(Slot {
                last_sent: None,
                pending: None,
            });
        let quiet = slot
            .last_sent
            .is_none_or(|t| now.duration_since(t) >= interval);
        match slot.pending.as_mut() {
            None if quiet => {
                slot.last_sent = Some(now);
                self.outbox.push_back(alert);
            }
            None => slot.pending = Some(alert),
            Some(pending) => {
                pending.count += alert.count;
                pending.id = alert.id.or(pending.id.take());
                pending.reason = alert.reason;
            }
        }
    }

    /// Queues the summaries whose interval has passed, or all of them when stopping.
    fn flush(&mut self, now: Instant) {
        let (interval, stopping) = (self.interval, self.stopping);
        for slot in self.slots.values_mut() {
            let due = stopping
                || slot
                    .last_sent
                    .is_none_or(|t| now.duration_since(t) >= interval);
            if due {
                if let Some(summary) = slot.pending.take() {
                    slot.last_sent = Some(now);
                    self.outbox.push_back(summary);
                }
            }
        }
    }
}

impl Alerts {
    /// Starts a sender for `policy`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a setting out of range (an empty command, a URL that is
    /// not `http://HOST[:PORT][/PATH]`, a zero interval or age, a silence limit under
    /// 10 s); [`Error::Io`] when its thread cannot be started.
    pub fn start(policy: &AlertPolicy) -> Result<Alerts> {
        policy.check()?;
        Alerts::with_sink(policy.interval, Sink::Policy(policy.clone()))
    }

    fn with_sink(interval: Duration, sink: Sink) -> Result<Alerts> {
        let shared = Arc::new((
            Mutex::new(Throttle {
                interval,
                slots: HashMap::new(),
                outbox: VecDeque::new(),
                stopping: false,
            }),
            Condvar::new(),
        ));
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("dirq-alerts".to_owned())
            .spawn(move || deliver_loop(&for_thread, &sink))
            .map_err(|e| Error::io(crate::error::Operation::StartThread, "dirq-alerts", e))?;
        Ok(Alerts {
            shared,
            thread: Some(thread),
        })
    }

    /// Raises `alert`: delivered now, or counted into the next summary of its kind and
    /// queue. Never waits for a delivery.
    pub fn raise(&self, alert: Alert) {
        let (throttle, wake) = &*self.shared;
        throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .raise(alert, Instant::now());
        wake.notify_one();
    }

    /// Sends the summaries still due, waits for every delivery, and stops.
    pub fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        let (throttle, wake) = &*self.shared;
        throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stopping = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Alerts {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").finish_non_exhaustive()
    }
}

fn deliver_loop(shared: &(Mutex<Throttle>, Condvar), sink: &Sink) {
    let (throttle, wake) = shared;
    loop {
        let (batch, stopping) = {
            let mut state = throttle.lock().unwrap_or_else(PoisonError::into_inner);
            if state.outbox.is_empty() && !state.stopping {
                state = wake
                    .wait_timeout(state, TICK)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            state.flush(Instant::now());
            (state.outbox.drain(..).collect::<Vec<_>>(), state.stopping)
        };
        for alert in &batch {
            deliver(sink, alert);
        }
        if stopping && batch.is_empty() {
            return;
        }
    }
}

fn deliver(sink: &Sink, alert: &Alert) {
    match sink {
        Sink::Policy(policy) => {
            if let Some(command) = &policy.command {
                run_hook(command, alert);
            }
            if let Some(url) = &policy.url {
                if let Err(e) = HttpTarget::parse(url).and_then(|t| t.post(&alert.to_json())) {
                    tracing::warn!(%url, alert = alert.kind.as_str(), error = %e, "cannot deliver an alert");
                }
            }
        }
        #[cfg(test)]
        Sink::Collect(list) => list.lock().unwrap().push(alert.clone()),
    }
}

fn run_hook(command: &OsString, alert: &Alert) {
    let mut hook = Command::new("sh");
    hook.arg("-c")
        .arg(command)
        .env("DIRQ_ALERT", alert.kind.as_str())
        .env("DIRQ_STAGE", &alert.stage)
        .env("DIRQ_QUEUE", &alert.queue)
        .env("DIRQ_REASON", &alert.reason)
        .env("DIRQ_COUNT", alert.count.to_string())
        .env("DIRQ_SINCE", rfc3339(alert.since))
        .env("DIRQ_HOST", sys::hostname())
        .env("DIRQ_PID", sys::pid().to_string())
        .stdin(Stdio::null());
    match &alert.id {
        Some(id) => hook.env("DIRQ_ID", id),
        None => hook.env_remove("DIRQ_ID"),
    };
    let result = hook.spawn().and_then(|mut child| {
        match sys::wait_child_timeout(&mut child, HOOK_TIMEOUT)? {
            Some(status) => Ok(status),
            None => {
                let _ = child.kill();
                child.wait()
            }
        }
    });
    match result {
        Ok(status) if status.success() => {}
        Ok(status) => {
            tracing::warn!(alert = alert.kind.as_str(), %status, "the alert command failed")
        }
        Err(e) => {
            tracing::warn!(alert = alert.kind.as_str(), error = %e, "cannot run the alert command")
        }
    }
}

/// An `http://host[:port][/path]` URL.
struct HttpTarget {
    host: String,
    port: u16,
    path: String,
}

impl HttpTarget {
    fn parse(url: &str) -> std::result::Result<HttpTarget, String> {
        let bad = |why: &str| format!("{url:?}: {why}");
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            bad("only http:// URLs are supported (call curl from the alert command for https)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => (
                host,
                port.parse::<u16>()
                    .map_err(|_| bad("the port is not a number from 0 to 65535"))?,
            ),
            _ => (authority, 80),
        };
        if host.is_empty() || host.contains(['@', ' ']) || path.contains([' ', '\r', '\n']) {
            return Err(bad("not a URL like http://host:port/path"));
        }
        Ok(HttpTarget {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    fn post(&self, document: &serde_json::Value) -> std::result::Result<(), String> {
        let body = document.to_string();
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let address = (host, self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let mut stream = TcpStream::connect_timeout(&address, HTTP_TIMEOUT)
            .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        let _ = stream.set_read_timeout(Some(HTTP_TIMEOUT));
        let _ = stream.set_write_timeout(Some(HTTP_TIMEOUT));
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: dirq/{}\r\n\r\n{body}",
            self.path,
            self.host,
            self.port,
            body.len(),
            env!("CARGO_PKG_VERSION"),
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| format!("cannot send to {address}: {e}"))?;
        let mut head = [0u8; 64];
        let n = stream
            .read(&mut head)
            .map_err(|e| format!("no answer from {address}: {e}"))?;
        let status = std::str::from_utf8(&head[..n])
            .ok()
            .and_then(|line| line.split(' ').nth(1))
            .unwrap_or("");
        if status.starts_with('2') {
            Ok(())
        } else {
            Err(format!("{address} answered {status:?}, not 2xx"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collecting(interval: Duration) -> (Alerts, Arc<Mutex<Vec<Alert>>>) {
        let list = Arc::new(Mutex::new(Vec::new()));
        let alerts = Alerts::with_sink(interval, Sink::Collect(Arc::clone(&list))).unwrap();
        (alerts, list)
    }

    #[test]
    fn a_storm_is_one_alert_then_one_summary_with_its_count() {
        let (alerts, list) = collecting(Duration::from_secs(3600));
        for i in 0..10_000 {
            alerts.raise(
                Alert::new(AlertKind::Failed, "s", "/q", format!("exit {i}"))
                    .with_id(format!("m{i}")),
            );
        }
        alerts.raise(Alert::new(AlertKind::Timeout, "s", "/q", "timeout"));
        alerts.raise(Alert::new(AlertKind::Failed, "s", "/other", "exit 1"));
        alerts.stop();
        let list = list.lock().unwrap();
        let failed: Vec<_> = list
            .iter()
            .filter(|a| a.kind == AlertKind::Failed && a.queue == std::path::Path::new("/q"))
            .collect();
        assert_eq!(failed.len(), 2, "{list:?}");
        assert_eq!((failed[0].count, failed[0].id.as_deref()), (1, Some("m0")));
        assert_eq!(
            (failed[1].count, failed[1].id.as_deref()),
            (9_999, Some("m9999"))
        );
        assert_eq!(failed[1].reason, "exit 9999");
        assert_eq!(
            list.len(),
            4,
            "one timeout and one for the other queue: {list:?}"
        );
    }

    #[test]
    fn a_summary_goes_out_once_the_interval_has_passed() {
        let (alerts, list) = collecting(Duration::from_millis(100));
        for _ in 0..3 {
            alerts.raise(Alert::new(AlertKind::Age, "watch", "/q", "old"));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while list.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "no summary");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(list.lock().unwrap()[1].count, 2);
        drop(alerts);
    }

    #[test]
    fn bad_settings_are_refused() {
        let field = |policy: &AlertPolicy| policy.problem().err().map(|(f, _)| f);
        assert_eq!(field(AlertPolicy::new().command("")), Some("alert command"));
        for url in [
            "https://x/",
            "ftp://x",
            "http://",
            "http://x:port/",
            "http://a b/",
        ] {
            assert_eq!(
                field(AlertPolicy::new().url(url)),
                Some("alert url"),
                "{url}"
            );
        }
        assert_eq!(
            field(AlertPolicy::new().interval(Duration::ZERO)),
            Some("alert interval")
        );
        assert_eq!(
            field(AlertPolicy::new().stale_after(Duration::from_secs(1))),
            Some("alert stale after")
        );
        let target = HttpTarget::parse("http://127.0.0.1:9093/hooks/dirq").unwrap();
        assert_eq!(
            (target.host.as_str(), target.port, target.path.as_str()),
            ("127.0.0.1", 9093, "/hooks/dirq")
        );
        assert_eq!(HttpTarget::parse("http://example").unwrap().port, 80);
    }
}
