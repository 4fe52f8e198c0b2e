//! Alerts: a storm of failures folded into an alert and a summary with its count,
//! timeouts, the breaker opening and closing, delivery by HTTP POST, pipeline keys,
//! and `dirq watch` for an old message and a silent Piper.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use dirq::MessageId;

use crate::util::{assert_succeeded, dirq, exec_drain, wait_until, TestQueue};

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// An alert command that appends "KIND COUNT ID" to `log`.
fn logging_hook(log: &Path) -> String {
    format!(
        "echo \"$DIRQ_ALERT $DIRQ_COUNT ${{DIRQ_ID:--}}\" >> {}",
        s(log)
    )
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// 300 failures within the interval: one alert at once, one summary with the other 299
/// when the Piper stops.
#[test]
fn a_storm_of_failures_sends_an_alert_and_a_summary() {
    let t = TestQueue::new();
    let ids: Vec<MessageId> = (0..300)
        .map(|i| t.queue.enqueue(format!("m{i}").as_bytes()).unwrap())
        .collect();
    let log = t.dir.path().join("alerts.log");
    let hook = logging_hook(&log);
    let out = exec_drain(
        t.root(),
        &[
            "-j",
            "4",
            "--no-breaker",
            "--alert-cmd",
            &hook,
            "--alert-interval",
            "1h",
        ],
        "exit 1",
    );
    assert_succeeded(&out, "exec with alerts");
    let got = lines(&log);
    assert_eq!(got.len(), 2, "{got:?}");
    let first: Vec<&str> = got[0].split(' ').collect();
    let summary: Vec<&str> = got[1].split(' ').collect();
    assert_eq!(&first[..2], ["failed", "1"]);
    assert_eq!(&summary[..2], ["failed", "299"]);
    for alert in [&first, &summary] {
        assert!(ids.iter().any(|id| id.to_string() == alert[2]), "{alert:?}");
    }
}

#[test]
fn a_timeout_raises_a_timeout_alert() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"slow").unwrap();
    let log = t.dir.path().join("alerts.log");
    let hook = logging_hook(&log);
    let out = exec_drain(
        t.root(),
        &[
            "--timeout",
            "0.2",
            "--kill-grace",
            "0",
            "--alert-cmd",
            &hook,
        ],
        "sleep 30",
    );
    assert_succeeded(&out, "exec with a timeout");
    assert_eq!(lines(&log), [format!("timeout 1 {id}")]);
}

/// Two failures open the breaker; after its cooldown a probe succeeds and closes it.
#[test]
fn the_breaker_opening_and_closing_are_alerts() {
    let t = TestQueue::new();
    for body in ["bad", "bad", "good", "good"] {
        t.queue.enqueue(body.as_bytes()).unwrap();
    }
    let log = t.dir.path().join("alerts.log");
    let hook = logging_hook(&log);
    let out = exec_drain(
        t.root(),
        &[
            "--breaker-failures",
            "2",
            "--breaker-cooldown",
            "0.3",
            "--alert-cmd",
            &hook,
            "--alert-interval",
            "1h",
        ],
        "test \"$(cat)\" = good",
    );
    assert_succeeded(&out, "exec with a breaker");
    let kinds: Vec<String> = lines(&log)
        .iter()
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    for want in ["breaker-open", "breaker-closed"] {
        assert!(kinds.iter().any(|k| k == want), "{want} in {kinds:?}");
    }
}

/// An `http://` URL gets each alert as a JSON document in a POST.
#[test]
fn alerts_are_posted_as_json() {
    let t = TestQueue::new();
    let id = t.queue.enqueue(b"x").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/dirq", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the body is complete: the headers, then Content-Length bytes.
        loop {
            let n = stream.read(&mut buf).unwrap();
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if body.len() >= length || n == 0 {
                    stream
                        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                        .unwrap();
                    return (head.to_owned(), body.to_owned());
                }
            }
        }
    });
    let out = exec_drain(t.root(), &["--alert-url", &url], "echo no >&2; exit 4");
    assert_succeeded(&out, "exec with an alert URL");
    let (head, body) = server.join().unwrap();
    assert!(head.starts_with("POST /hooks/dirq HTTP/1.1"), "{head}");
    let alert: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(alert["alert"], "failed");
    assert_eq!(alert["id"], id.to_string());
    assert_eq!(alert["count"], 1);
    assert_eq!(alert["queue"], s(t.root()));
    assert!(
        alert["reason"].as_str().unwrap().starts_with("exit 4"),
        "{alert}"
    );
}

/// Bad alert settings are refused before anything runs, naming the setting, in a
/// pipeline file as on the command line.
#[test]
fn bad_alert_settings_are_refused() {
    let t = TestQueue::new();
    t.queue.enqueue(b"kept").unwrap();
    for (extra, want) in [
        (["--alert-url", "https://example.org/"], "alert url"),
        (["--alert-interval", "0"], "alert interval"),
        (["--alert-stale-after", "2s"], "alert stale after"),
    ] {
        let out = exec_drain(t.root(), &extra, "cat");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
    }
    let file = t.dir.path().join("pipeline.toml");
    std::fs::write(
        &file,
        format!(
            "[defaults]\nalert_url = \"ftp://x\"\n\n[[stage]]\nname = \"x\"\ninput = \"{}\"\ncommand = \"cat\"\n",
            s(t.root())
        ),
    )
    .unwrap();
    crate::util::assert_stage_refused(
        &["run", "--check", s(&file)],
        "alert_url",
        "invalid alert url",
    );
    assert_eq!(t.queue.counts().unwrap().incoming, 1);
}

/// `dirq watch --once` finds a message older than the limit and a Piper whose
/// liveness file went silent (here, one a crashed process left behind).
#[test]
fn watch_finds_old_messages_and_silent_pipers() {
    let t = TestQueue::new();
    let old = MessageId::new("1700000000.000000001.test.1.00000001.msg").unwrap();
    t.queue.enqueue_with_id(&old, b"old").unwrap();
    let pipers = t.root().join("pipers");
    std::fs::create_dir_all(&pipers).unwrap();
    std::fs::write(
        pipers.join("gone.json"),
        r#"{"stage": "gone", "host": "h", "pid": 999999, "heartbeat_ms": 1700000000000}"#,
    )
    .unwrap();
    let out = crate::util::run(&[
        "watch",
        s(t.root()),
        "--alert-max-age",
        "1h",
        "--alert-stale-after",
        "10s",
        "--once",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let alerts: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[0]["alert"], "age");
    assert_eq!(alerts[1]["alert"], "stale");
    assert!(alerts[1]["reason"].as_str().unwrap().contains("\"gone\""));

    // Nothing to find: exit 0, nothing printed.
    let fresh = crate::util::TestQueue::new();
    fresh.queue.enqueue(b"new").unwrap();
    let out = crate::util::run(&["watch", s(fresh.root()), "--alert-max-age", "1h", "--once"]);
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
}

/// A running `dirq watch` delivers through the alert command and stops on SIGTERM.
#[test]
fn watch_runs_the_alert_command_until_stopped() {
    let t = TestQueue::new();
    let old = MessageId::new("1700000000.000000001.test.1.00000001.msg").unwrap();
    t.queue.enqueue_with_id(&old, b"old").unwrap();
    let log = t.dir.path().join("alerts.log");
    let mut watch = dirq()
        .args([
            "watch",
            s(t.root()),
            "--alert-max-age",
            "1m",
            "--every",
            "0.1",
        ])
        .args(["--alert-cmd", &logging_hook(&log), "--alert-interval", "1h"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "the age alert", || {
        !lines(&log).is_empty()
    });
    crate::util::signal(watch.id(), "TERM");
    assert!(watch.wait().unwrap().success());
    let got = lines(&log);
    assert_eq!(got[0], "age 1 -");
    // The rounds after the first were folded into one summary at the stop.
    assert!(got.len() <= 2, "{got:?}");
}
