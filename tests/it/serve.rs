//! `dirq serve`: the HTTP API over a real socket, with a real HTTP client, against the
//! real binary (and the library's server where a setting has no flag).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use dirq::{DirectoryQueue, State};
use serde_json::Value;

use crate::util::{dirq, signal, tempdir, wait_until};

pub(crate) const TOKEN: &str = "s3cret-token-for-tests";

/// A `dirq serve` process on a free port, stopped when dropped.
pub(crate) struct Serve {
    child: Child,
    pub(crate) base: String,
    /// The rest of standard output after the first line.
    pub(crate) banner: Vec<String>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Serve {
    /// Serves `root` with the test token (unless `token` is false) and `extra` flags.
    pub(crate) fn start(root: &Path, token: bool, extra: &[&str]) -> Serve {
        let dir = tempdir();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the token file");
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod 600 the token file");
        let stderr = dir.path().join("stderr");
        let mut command = dirq();
        command
            .arg("serve")
            .arg(root)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("create the stderr file"));
        if token {
            command.arg("--token-file").arg(&token_file);
        }
        let mut child = command.spawn().expect("start dirq serve");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        out.read_line(&mut first).expect("read the first line");
        let base = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line names the address, got {first:?}"))
            .to_owned();
        let mut banner = Vec::new();
        if !token {
            let mut second = String::new();
            out.read_line(&mut second).expect("read the second line");
            banner.push(second.trim().to_owned());
        }
        Serve {
            child,
            base,
            banner,
            stderr,
            _dir: dir,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_owned()
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit.
    fn stop(mut self) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        self.child.wait().expect("wait for dirq serve")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client that hands back every status rather than failing on 4xx and 5xx.
pub(crate) fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// Status and body text of a GET.
pub(crate) fn get(url: &str) -> (u16, String) {
    let mut response = client().get(url).call().expect("GET");
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().expect("body"))
}

pub(crate) fn get_json(url: &str) -> Value {
    let (status, body) = get(url);
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Status and JSON of a POST with `token` (or none) and `body`.
pub(crate) fn post(url: &str, token: Option<&str>, body: &[u8]) -> (u16, Value) {
    post_with(url, token, &[], body)
}

pub(crate) fn post_with(
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    let mut request = client().post(url);
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request.send(body).expect("POST");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().expect("body");
    let json =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON from POST {url}: {text:?}"));
    (status, json)
}

/// The `error` of an error answer, asserting there is one.
fn error_of(json: &Value) -> &str {
    json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("an error message in {json}"))
}

/// A spool with queues `a` and `site/b`.
fn spool() -> (tempfile::TempDir, DirectoryQueue, DirectoryQueue) {
    let dir = tempdir();
    let a = DirectoryQueue::open(dir.path().join("a")).expect("queue a");
    let b = DirectoryQueue::open(dir.path().join("site/b")).expect("queue site/b");
    (dir, a, b)
}

#[test]
fn lists_every_queue_with_the_fields_the_console_reads() {
    let (dir, _a, b) = spool();
    b.enqueue(b"one").expect("enqueue");
    b.enqueue(b"two").expect("enqueue");
    let serve = Serve::start(dir.path(), true, &[]);
    let all = get_json(&serve.url("/api/v1/queues"));
    assert_eq!(all["read_only"], false);
    let names: Vec<&str> = all["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .map(|q| q["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["a", "site/b"]);
    let q = &all["queues"][1];
    for state in State::ALL {
        assert!(
            q["counts"][state.as_str()].is_u64(),
            "count of {state} in {q}"
        );
    }
    assert_eq!(q["counts"]["incoming"], 2);
    assert_eq!(q["bytes"], 6);
    assert!(q["oldest_age_seconds"].as_f64().is_some(), "{q}");
    assert!(q["rates"]["enqueued_per_second"].is_number());
    assert!(q["rates"]["finished_per_second"].is_number());
    assert!(q["series"].is_array());
    assert!(
        q["backpressure"].is_null(),
        "no Piper, no backpressure to tell"
    );
    assert_eq!(q["pipers"], serde_json::json!([]));
    assert!(
        all["queues"][0]["oldest_age_seconds"].is_null(),
        "a is empty"
    );

    // One queue, its name percent-encoded as one segment.
    let one = get_json(&serve.url("/api/v1/queues/site%2Fb"));
    assert_eq!(one["name"], "site/b");
    assert_eq!(one["counts"]["incoming"], 2);
    let (status, _) = get(&serve.url("/healthz"));
    assert_eq!(status, 200);
}

#[test]
fn names_resolve_only_among_the_queues_found() {
    let (dir, _a, _b) = spool();
    let outside = tempdir();
    let secret = DirectoryQueue::open(outside.path().join("secret")).expect("outside queue");
    secret.enqueue(b"outside secret").expect("enqueue");
    // A link in the spool to a queue outside it, and a link inside a queue's incoming/
    // to a file outside.
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("evil"))
        .expect("symlink to a queue");
    std::fs::write(outside.path().join("passwd"), b"outside secret").expect("outside file");
    std::os::unix::fs::symlink(
        outside.path().join("passwd"),
        dir.path()
            .join("a/incoming/1700000000.000000000.h.1.00000000.msg"),
    )
    .expect("symlink in incoming/");
    let serve = Serve::start(dir.path(), true, &[]);

    let names: Vec<String> = get_json(&serve.url("/api/v1/queues"))["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .map(|q| q["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(names, ["a", "site/b"], "the link is not a queue");
    for path in [
        "/api/v1/queues/evil",
        "/api/v1/queues/evil/messages",
        "/api/v1/queues/..%2F..%2Fetc",
        "/api/v1/queues/%2E%2E",
        "/api/v1/queues/site",
        "/api/v1/queues/a%2F..%2Fsite%2Fb",
    ] {
        let (status, body) = get(&serve.url(path));
        assert_eq!(status, 404, "GET {path}: {body}");
        assert!(!body.contains("outside secret"));
        let json: Value = serde_json::from_str(&body).expect("JSON error");
        assert!(error_of(&json).contains("no queue named"), "{json}");
    }
    let (status, body) =
        get(&serve.url("/api/v1/queues/a/messages/1700000000.000000000.h.1.00000000.msg"));
    assert_ne!(status, 200, "a symlink is never read: {body}");
    assert!(!body.contains("outside secret"), "{body}");
    assert!(
        serde_json::from_str::<Value>(&body).is_ok(),
        "JSON error: {body}"
    );
    let (status, _) = post(
        &serve.url("/api/v1/queues/evil/messages"),
        Some(TOKEN),
        b"x",
    );
    assert_eq!(status, 404);
    assert_eq!(
        secret.count(State::Incoming).expect("count"),
        1,
        "nothing added outside"
    );
}

#[test]
fn bad_ids_are_refused_with_400() {
    let (dir, a, _b) = spool();
    a.enqueue(b"x").expect("enqueue");
    let serve = Serve::start(dir.path(), true, &[]);
    for id in [
        ".hidden",
        "..",
        "a%2Fb",
        "%2E%2E%2Fincoming",
        "x%00y",
        "z.meta",
    ] {
        let (status, body) = get(&serve.url(&format!("/api/v1/queues/a/messages/{id}")));
        assert_eq!(status, 400, "GET id {id}: {body}");
        assert!(body.contains("message id"), "{body}");
        let (status, json) = post(
            &serve.url(&format!("/api/v1/queues/a/messages/{id}/delete")),
            Some(TOKEN),
            b"",
        );
        assert_eq!(status, 400, "delete id {id}: {json}");
    }
    assert_eq!(a.count(State::Incoming).expect("count"), 1);
}

#[test]
fn submit_stores_and_the_body_reads_back_without_a_claim() {
    let (dir, a, _b) = spool();
    let serve = Serve::start(dir.path(), true, &[]);
    let (status, json) = post(
        &serve.url("/api/v1/queues/a/messages"),
        Some(TOKEN),
        b"hello",
    );
    assert_eq!(status, 201, "{json}");
    let id = json["id"].as_str().expect("an id").to_owned();
    assert_eq!(a.count(State::Incoming).expect("count"), 1);

    let mut response = client()
        .get(serve.url(&format!("/api/v1/queues/a/messages/{id}")))
        .call()
        .expect("GET body");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-dirq-state")
            .and_then(|v| v.to_str().ok()),
        Some("incoming")
    );
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/octet-stream")
    );
    assert_eq!(response.body_mut().read_to_vec().expect("body"), b"hello");
    assert_eq!(a.count(State::Incoming).expect("count"), 1, "not claimed");
    let (status, body) = get(&serve.url("/api/v1/queues/a/messages/1.nope.msg"));
    assert_eq!(status, 404, "{body}");

    // An empty body is refused; nothing stored.
    let (status, json) = post(
        &serve.url("/api/v1/queues/a/messages"),
        Some(TOKEN),
        b"  \n",
    );
    assert_eq!(status, 400, "{json}");
    assert!(error_of(&json).contains("empty"), "{json}");

    // Placement: later, on hold, in a group.
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    let secs = later
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    let (status, json) = post(
        &serve.url(&format!("/api/v1/queues/a/messages?not_before={secs}")),
        Some(TOKEN),
        b"later",
    );
    assert_eq!(
        (status, json["state"].as_str()),
        (201, Some("deferred")),
        "{json}"
    );
    let (status, json) = post(
        &serve.url("/api/v1/queues/a/messages?not_before=2100-01-01T00:00:00Z"),
        Some(TOKEN),
        b"much later",
    );
    assert_eq!(
        (status, json["state"].as_str()),
        (201, Some("deferred")),
        "{json}"
    );
    let (status, json) = post(
        &serve.url("/api/v1/queues/a/messages?hold=true"),
        Some(TOKEN),
        b"held",
    );
    assert_eq!(
        (status, json["state"].as_str()),
        (201, Some("hold")),
        "{json}"
    );
    let (status, json) = post(
        &serve.url("/api/v1/queues/a/messages?group=nightly&ordered=true"),
        Some(TOKEN),
        b"first",
    );
    assert_eq!(status, 201, "{json}");
    let (status, json) = post(
        &serve.url("/api/v1/queues/a/messages?group=nightly&ordered=true"),
        Some(TOKEN),
        b"second",
    );
    assert_eq!(
        (status, json["state"].as_str()),
        (201, Some("chained")),
        "{json}"
    );
    let counts = a.counts().expect("counts");
    assert_eq!(
        (
            counts.incoming,
            counts.get(State::Deferred),
            counts.get(State::Hold),
            counts.get(State::Chained)
        ),
        (2, 2, 1, 1)
    );
    for bad in [
        "not_before=tomorrow",
        "hold=maybe",
        "ordered=true",
        "hold=true&group=g",
        "colour=blue",
    ] {
        let (status, json) = post(
            &serve.url(&format!("/api/v1/queues/a/messages?{bad}")),
            Some(TOKEN),
            b"x",
        );
        assert_eq!(status, 400, "{bad}: {json}");
        error_of(&json);
    }
    assert_eq!(
        a.counts().expect("counts").unfinished(),
        6,
        "nothing more stored"
    );
    assert_eq!(a.count(State::Tmp).expect("count"), 0);
}

#[test]
fn messages_are_listed_by_state_and_paged_with_failure_reasons() {
    let (dir, a, _b) = spool();
    for i in 0..5 {
        a.enqueue(format!("m{i}")).expect("enqueue");
    }
    let failed = a.try_claim().expect("claim").expect("a message");
    let failed_id = failed.id().to_string();
    failed.fail("parser said no").expect("fail");
    let serve = Serve::start(dir.path(), true, &[]);

    let errors = get_json(&serve.url("/api/v1/queues/a/messages?state=errors"));
    assert_eq!(
        (errors["state"].as_str(), errors["total"].as_u64()),
        (Some("errors"), Some(1))
    );
    let m = &errors["messages"][0];
    assert_eq!(m["id"], failed_id.as_str());
    assert_eq!(m["reason"], "parser said no");
    assert_eq!(m["size"], 2);
    assert_eq!(m["attempts"], 1);
    assert!(
        m["age_seconds"].is_number() && m["due"].is_null() && m["owner"].is_null(),
        "{m}"
    );

    let page = get_json(&serve.url("/api/v1/queues/a/messages?state=incoming&offset=1&limit=2"));
    assert_eq!(
        (
            page["total"].as_u64(),
            page["offset"].as_u64(),
            page["limit"].as_u64()
        ),
        (Some(4), Some(1), Some(2))
    );
    let ids: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    let mut all: Vec<String> = a
        .ids(State::Incoming)
        .expect("ids")
        .map(|id| id.expect("id").to_string())
        .collect();
    all.sort_by_key(|name| dirq::MessageId::new(name).expect("an id"));
    assert_eq!(ids, all[1..3]);

    for bad in [
        "state=nonsense",
        "limit=0",
        "limit=100000",
        "offset=-1",
        "bogus=1",
    ] {
        let (status, body) = get(&serve.url(&format!("/api/v1/queues/a/messages?{bad}")));
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("\"error\""), "{body}");
    }
}

#[test]
fn actions_move_messages_as_the_cli_does() {
    let (dir, a, _b) = spool();
    let id = a.enqueue(b"x").expect("enqueue").to_string();
    let serve = Serve::start(dir.path(), true, &[]);
    let act = |id: &str, action: &str| {
        post(
            &serve.url(&format!("/api/v1/queues/a/messages/{id}/{action}")),
            Some(TOKEN),
            b"",
        )
    };

    let (status, json) = act(&id, "hold");
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        (
            json["ok"].as_bool(),
            json["action"].as_str(),
            json["id"].as_str()
        ),
        (Some(true), Some("hold"), Some(id.as_str()))
    );
    assert_eq!(a.count(State::Hold).expect("count"), 1);
    let (status, json) = act(&id, "hold");
    assert_eq!(status, 404, "not waiting any more: {json}");
    let (status, json) = act(&id, "release");
    assert_eq!(status, 200, "{json}");
    assert_eq!(a.count(State::Incoming).expect("count"), 1);

    let message = a.try_claim().expect("claim").expect("the message");
    let (status, json) = act(&id, "hold");
    assert_eq!(status, 409, "claimed: {json}");
    let (status, json) = act(&id, "cancel");
    assert_eq!(status, 409, "claimed by no Piper: {json}");
    assert!(error_of(&json).contains("cancel"), "{json}");
    message.fail("broken").expect("fail");
    let (status, json) = act(&id, "requeue");
    assert_eq!(status, 200, "{json}");
    assert_eq!(a.count(State::Incoming).expect("count"), 1);

    let later = a
        .enqueue_at(
            b"later",
            std::time::SystemTime::now() + Duration::from_secs(3600),
        )
        .expect("enqueue_at")
        .to_string();
    let (status, json) = act(&later, "flush");
    assert_eq!(status, 200, "{json}");
    assert_eq!(a.count(State::Incoming).expect("count"), 2);
    let (status, json) = act(&id, "delete");
    assert_eq!(
        (status, json["from"].as_str()),
        (200, Some("incoming")),
        "{json}"
    );
    assert_eq!(a.count(State::Incoming).expect("count"), 1);
    let (status, json) = act(&id, "delete");
    assert_eq!(status, 404, "{json}");
    let (status, json) = act(&later, "explode");
    assert_eq!(status, 400, "{json}");
    assert!(error_of(&json).contains("unknown action"), "{json}");
    let (status, body) = get(&serve.url(&format!("/api/v1/queues/a/messages/{later}/hold")));
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("not allowed"), "{body}");
}

#[test]
fn changes_need_the_token_and_a_wrong_one_changes_nothing() {
    let (dir, a, _b) = spool();
    let id = a.enqueue(b"x").expect("enqueue").to_string();
    let serve = Serve::start(dir.path(), true, &[]);
    let wrong = "not-the-token";
    for token in [None, Some(wrong), Some("")] {
        let (status, json) = post(&serve.url("/api/v1/queues/a/messages"), token, b"new");
        assert_eq!(status, 401, "{token:?}: {json}");
        assert!(error_of(&json).contains("token"), "{json}");
        let (status, json) = post(
            &serve.url(&format!("/api/v1/queues/a/messages/{id}/delete")),
            token,
            b"",
        );
        assert_eq!(status, 401, "{token:?}: {json}");
    }
    // Other schemes and a token with something after it are wrong too.
    let (status, _) = post_with(
        &serve.url("/api/v1/queues/a/messages"),
        None,
        &[("Authorization", &format!("Basic {TOKEN}"))],
        b"x",
    );
    assert_eq!(status, 401);
    let (status, _) = post(
        &serve.url("/api/v1/queues/a/messages"),
        Some(&format!("{TOKEN}x")),
        b"x",
    );
    assert_eq!(status, 401);
    assert_eq!(
        a.count(State::Incoming).expect("count"),
        1,
        "nothing changed"
    );
    assert_eq!(a.count(State::Tmp).expect("count"), 0);
    wait_until(Duration::from_secs(10), "the refusals in the log", || {
        serve.stderr().matches("refused a request").count() >= 8
    });
    let log = serve.stderr();
    assert!(
        !log.contains(wrong) && !log.contains(TOKEN),
        "the log never shows a token: {log}"
    );
    assert!(
        !log.contains("readable by others"),
        "the token file is 0600: {log}"
    );
    let (status, _) = post(&serve.url("/api/v1/queues/a/messages"), Some(TOKEN), b"new");
    assert_eq!(status, 201);
}

#[test]
fn without_a_token_file_serve_is_read_only() {
    let (dir, a, _b) = spool();
    let id = a.enqueue(b"x").expect("enqueue").to_string();
    let serve = Serve::start(dir.path(), false, &[]);
    assert_eq!(serve.banner, ["read-only: no --token-file"]);
    assert_eq!(get_json(&serve.url("/api/v1/queues"))["read_only"], true);
    let (status, json) = post(&serve.url("/api/v1/queues/a/messages"), Some(TOKEN), b"new");
    assert_eq!(status, 403, "{json}");
    assert!(error_of(&json).contains("read-only"), "{json}");
    let (status, json) = post(
        &serve.url(&format!("/api/v1/queues/a/messages/{id}/hold")),
        None,
        b"",
    );
    assert_eq!(status, 403, "{json}");
    assert_eq!(a.count(State::Incoming).expect("count"), 1);
}

#[test]
fn a_body_over_the_limit_gets_413_and_nothing_is_stored() {
    let (dir, a, _b) = spool();
    let serve = Serve::start(dir.path(), true, &["--max-body", "1KiB"]);
    let (status, json) = post(
        &serve.url("/api/v1/queues/a/messages"),
        Some(TOKEN),
        &[b'x'; 1024],
    );
    assert_eq!(status, 201, "exactly the limit: {json}");
    let (status, json) = post(
        &serve.url("/api/v1/queues/a/messages"),
        Some(TOKEN),
        &[b'x'; 4096],
    );
    assert_eq!(status, 413, "{json}");
    assert!(error_of(&json).contains("1024 bytes"), "{json}");
    // Without a length: chunked, cut off while streaming.
    let mut reader: &[u8] = &[b'y'; 4096];
    let mut response = client()
        .post(serve.url("/api/v1/queues/a/messages"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .send(ureq::SendBody::from_reader(&mut reader))
        .expect("POST chunked");
    assert_eq!(response.status().as_u16(), 413);
    let text = response.body_mut().read_to_string().expect("body");
    assert!(text.contains("larger than the limit"), "{text}");
    assert_eq!(
        a.count(State::Incoming).expect("count"),
        1,
        "only the one within the limit"
    );
    wait_until(Duration::from_secs(10), "tmp/ to be empty", || {
        a.count(State::Tmp).expect("count") == 0
    });
}

#[test]
fn an_idempotency_key_stores_a_retried_submit_once() {
    let (dir, a, _b) = spool();
    let remembers = DirectoryQueue::builder(dir.path().join("remembers"))
        .remember_finished(Duration::from_secs(3600))
        .open()
        .expect("a queue remembering finished ids");
    let serve = Serve::start(dir.path(), true, &[]);
    let key = "7f6c1e0a-52d3-4a8e-9c1b-1234567890ab";
    let submit = |body: &[u8]| {
        post_with(
            &serve.url("/api/v1/queues/a/messages"),
            Some(TOKEN),
            &[("Idempotency-Key", key)],
            body,
        )
    };
    let (status, first) = submit(b"payload");
    assert_eq!(status, 201, "{first}");
    let (status, again) = submit(b"payload");
    assert_eq!(status, 200, "{again}");
    assert_eq!(first["id"], again["id"]);
    assert_eq!(again["stored"], false);
    assert_eq!(a.count(State::Incoming).expect("count"), 1);
    // Also once the message was claimed.
    let message = a.try_claim().expect("claim").expect("the message");
    let (_, claimed) = submit(b"payload");
    assert_eq!(
        (claimed["id"].clone(), claimed["state"].as_str()),
        (first["id"].clone(), Some("pending"))
    );
    message.fail("kept").expect("fail");
    let (_, failed) = submit(b"payload");
    assert_eq!(failed["state"], "errors");
    let counts = a.counts().expect("counts");
    assert_eq!((counts.unfinished(), counts.errors), (0, 1));
    for bad in ["../x", ".hidden", "has space", "x.meta"] {
        let (status, json) = post_with(
            &serve.url("/api/v1/queues/a/messages"),
            Some(TOKEN),
            &[("Idempotency-Key", bad)],
            b"p",
        );
        assert_eq!(status, 400, "{bad}: {json}");
        assert!(error_of(&json).contains("Idempotency-Key"), "{json}");
    }
    assert_eq!(a.counts().expect("counts").unfinished(), 0);

    // A queue that remembers finished ids refuses the retry of a processed message too.
    let url = serve.url("/api/v1/queues/remembers/messages");
    let submit = || {
        post_with(
            &url,
            Some(TOKEN),
            &[("Idempotency-Key", "order-17")],
            b"ship it",
        )
    };
    let (status, first) = submit();
    assert_eq!(status, 201, "{first}");
    remembers
        .try_claim()
        .expect("claim")
        .expect("the order")
        .commit()
        .expect("commit");
    let (status, again) = submit();
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (again["id"].as_str(), again["state"].as_str()),
        (Some("order-17"), Some("finished"))
    );
    assert_eq!(
        remembers.counts().expect("counts").unfinished(),
        0,
        "not stored again"
    );
}

#[test]
fn ages_metrics_and_console() {
    let (dir, a, _b) = spool();
    a.enqueue(b"x").expect("enqueue");
    let serve = Serve::start(dir.path(), true, &[]);
    let ages = get_json(&serve.url("/api/v1/queues/a/ages"));
    assert_eq!(
        ages["buckets_minutes"],
        serde_json::json!([5, 10, 20, 40, 80, 160, 320, 640, 1280])
    );
    assert_eq!(ages["states"]["incoming"]["total"], 1);
    assert_eq!(ages["states"]["incoming"]["counts"][0], 1);
    assert_eq!(
        ages["states"]["incoming"]["counts"]
            .as_array()
            .map(Vec::len),
        Some(10)
    );

    let mut response = client()
        .get(serve.url("/metrics"))
        .call()
        .expect("GET /metrics");
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    let text = response.body_mut().read_to_string().expect("metrics");
    let lines: Vec<std::io::Result<String>> = text.lines().map(|l| Ok(l.to_owned())).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).expect("valid Prometheus text");
    let incoming = scrape.samples.iter().find(|s| {
        s.metric == "dirq_messages"
            && s.labels.get("state") == Some("incoming")
            && s.labels.get("queue").is_some_and(|q| q.ends_with("/a"))
    });
    assert!(
        matches!(incoming.map(|s| &s.value), Some(prometheus_parse::Value::Gauge(v)) if *v == 1.0),
        "{text}"
    );

    let mut page = client().get(serve.url("/")).call().expect("GET /");
    assert_eq!(page.status().as_u16(), 200);
    let headers = page.headers().clone();
    assert!(
        headers.get("content-security-policy").is_some(),
        "CSP on the console"
    );
    assert_eq!(
        headers
            .get("x-content-type-options")
            .and_then(|v| v.to_str().ok()),
        Some("nosniff")
    );
    assert!(
        !headers
            .keys()
            .any(|k| k.as_str().starts_with("access-control-")),
        "no CORS: {headers:?}"
    );
    assert!(page
        .body_mut()
        .read_to_string()
        .expect("page")
        .contains("/assets/app.js"));
    let (status, _) = get(&serve.url("/assets/app.js"));
    assert_eq!(status, 200);
    for missing in [
        "/assets/nope.js",
        "/assets/..%2Fconsole.rs",
        "/nothing/here",
        "/api/v2/queues",
    ] {
        let (status, body) = get(&serve.url(missing));
        assert_eq!(status, 404, "{missing}: {body}");
        assert!(body.contains("\"error\""), "{body}");
    }
}

#[test]
fn a_queue_made_after_start_is_found_when_named() {
    let (dir, _a, _b) = spool();
    let serve = Serve::start(dir.path(), true, &[]);
    DirectoryQueue::open(dir.path().join("late")).expect("a new queue");
    wait_until(Duration::from_secs(20), "the new queue to be found", || {
        get(&serve.url("/api/v1/queues/late")).0 == 200
    });
}

#[test]
fn sigterm_stops_serve_gracefully() {
    let (dir, _a, _b) = spool();
    let serve = Serve::start(dir.path(), true, &[]);
    // An idle keep-alive connection must not hold up the stop.
    let mut idle = TcpStream::connect(serve.addr()).expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).expect("an answer");
    assert_eq!(&head, b"HTTP/1.1 200");
    let status = serve.stop();
    assert!(status.success(), "exit status {status}");
}

/// The library's server, for settings the command line does not offer.
pub(crate) fn library_server(
    root: &Path,
    configure: impl FnOnce(&mut dirq::serve::ServeConfig),
) -> (
    tokio::runtime::Runtime,
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut config = dirq::serve::ServeConfig::new(root);
    config
        .listen("127.0.0.1:0".parse().expect("an address"))
        .token(TOKEN);
    configure(&mut config);
    let server = runtime.block_on(config.bind()).expect("bind");
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(server.run_until(async move {
        let _ = stopped.await;
    }));
    (runtime, addr, stop)
}

/// Reads until the server closes the connection; true when it did.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn slow_clients_time_out_and_store_nothing() {
    let (dir, a, _b) = spool();
    let (_runtime, addr, _stop) = library_server(dir.path(), |c| {
        c.header_timeout(Duration::from_millis(300))
            .body_idle_timeout(Duration::from_millis(300));
    });
    // A head that never ends.
    let mut slow_head = TcpStream::connect(addr).expect("connect");
    slow_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("part of a head");
    assert!(
        closed_by_server(&mut slow_head),
        "the server closes a stalled head"
    );
    // A body that stops half-way.
    let mut slow_body = TcpStream::connect(addr).expect("connect");
    write!(
        slow_body,
        "POST /api/v1/queues/a/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\nhalf"
    )
    .expect("part of a body");
    slow_body
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = slow_body.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(a.count(State::Incoming).expect("count"), 0);
    wait_until(Duration::from_secs(10), "tmp/ to be empty", || {
        a.count(State::Tmp).expect("count") == 0
    });
    // Bad settings are refused at bind.
    let mut config = dirq::serve::ServeConfig::new(dir.path());
    config.token("  \n");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let error = runtime.block_on(config.bind()).expect_err("an empty token");
    assert!(error.to_string().contains("token"), "{error}");
}

#[test]
fn pipers_show_in_the_queue_and_cancel_stops_a_running_message() {
    let (dir, a, _b) = spool();
    let id = a.enqueue(b"slow job").expect("enqueue").to_string();
    let mut piper = dirq()
        .arg("exec")
        .arg(dir.path().join("a"))
        // Slow the first time only: once cancelled back to incoming/, the message is
        // claimed again and finishes, so that the Piper stops at once at the end.
        .args([
            "--",
            "sh",
            "-c",
            "if [ \"$DIRQ_ATTEMPT\" = 1 ]; then exec sleep 60; fi",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dirq exec");
    let serve = Serve::start(dir.path(), true, &[]);
    wait_until(
        Duration::from_secs(30),
        "the Piper to claim the message",
        || {
            a.count(State::Pending).expect("count") == 1
                && get_json(&serve.url("/api/v1/queues/a"))["pipers"]
                    .as_array()
                    .is_some_and(|p| !p.is_empty())
        },
    );
    let q = get_json(&serve.url("/api/v1/queues/a"));
    let p = &q["pipers"][0];
    assert_eq!(p["pid"].as_u64(), Some(u64::from(piper.id())), "{p}");
    assert_eq!(
        (
            p["alive"].as_bool(),
            p["breaker"].as_str(),
            p["backpressure"].as_bool()
        ),
        (Some(true), Some("closed"), Some(false)),
        "{p}"
    );
    assert!(p["name"].is_string() && p["host"].is_string(), "{p}");
    assert!(
        p["heartbeat_age_seconds"]
            .as_f64()
            .is_some_and(|age| age >= 0.0),
        "{p}"
    );
    assert_eq!(q["backpressure"], false, "a live Piper, not paused");

    let (status, json) = post(
        &serve.url(&format!(
            "/api/v1/queues/a/messages/{id}/cancel?requeue=true&wait=30"
        )),
        Some(TOKEN),
        b"",
    );
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        (json["from"].as_str(), json["state"].as_str()),
        (Some("pending"), Some("incoming")),
        "{json}"
    );
    // Stop the Piper (and the command it may have started again) gracefully.
    signal(piper.id(), "TERM");
    let status = piper.wait().expect("wait for dirq exec");
    assert!(
        status.code().is_some(),
        "dirq exec exited on its own: {status}"
    );
}
