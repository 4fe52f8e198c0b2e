//! The web console in a real browser: headless Chromium, driven over WebDriver through
//! Debian's chromedriver, against the real `dirq serve` binary on a real socket.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::util::{dirq, exec_drain, names_in, run_ok, run_with_input, skip, tempdir};
use crate::webdriver::{self, Browser};

/// Long enough for a page load plus a couple of 2 s polls on a busy machine.
const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "console-test-token";

/// A running `dirq serve`, killed when dropped.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    /// Starts `dirq serve ROOT --listen ADDR [--token-file FILE]` and waits for the first
    /// line of its output, which says where it listens.
    fn start(root: &Path, listen: &str, token_file: Option<&Path>) -> Serve {
        let mut command = dirq();
        command
            .arg("serve")
            .arg(root)
            .args(["--listen", listen])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(file) = token_file {
            command.arg("--token-file").arg(file);
        }
        let mut child = command.spawn().expect("start dirq serve");
        let mut first = String::new();
        let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first);
        let serve = |url| Serve { child, url };
        let Some(addr) = read.ok().and_then(|_| address_in(&first)) else {
            drop(serve(String::new()));
            panic!("dirq serve did not say where it listens: {first:?}");
        };
        serve(format!("http://{addr}"))
    }

    fn port(&self) -> &str {
        self.url.rsplit(':').next().expect("a port")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `127.0.0.1:PORT` in a line such as "listening on http://127.0.0.1:41234".
fn address_in(line: &str) -> Option<String> {
    let start = line.find("127.0.0.1:")?;
    let rest = &line[start + "127.0.0.1:".len()..];
    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!port.is_empty()).then(|| format!("127.0.0.1:{port}"))
}

/// A spool with two queues: `site-a/enrich` with three waiting messages and two failed
/// ones (with the stderr tail of the failing command), and `mail` with one.
fn spool() -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    let root = dir.path().join("spool");
    let enrich = root.join("site-a/enrich");
    let mail = root.join("mail");
    run_ok(&["init", path(&enrich), path(&mail)]);
    for body in [&b"{\"user\": 1}"[..], b"{\"user\": 2}"] {
        run_with_input(&["push", path(&enrich)], body);
    }
    exec_drain(
        &enrich,
        &[],
        "echo 'lookup failed: no user <b>2</b>' >&2; exit 3",
    );
    let failed = names_in(&enrich.join("errors"));
    assert_eq!(
        failed.iter().filter(|n| !n.ends_with(".meta")).count(),
        2,
        "both messages failed: {failed:?}"
    );
    for n in 3..6 {
        run_with_input(
            &["push", path(&enrich)],
            format!("{{\"user\": {n}}}").as_bytes(),
        );
    }
    run_with_input(&["push", path(&mail)], b"Subject: hello\n\nworld\n");
    (dir, root)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Whether a message file of `id` is in `state` of `queue`.
fn on_disk(queue: &Path, state: &str, id: &str) -> bool {
    let dir = queue.join(state);
    dir.is_dir() && names_in(&dir).iter().any(|name| name.ends_with(id))
}

/// The text of a queue's count cell on the overview.
fn overview_count(browser: &Browser, queue: &str, state: &str) -> Option<String> {
    browser.text(&format!(
        "tr[data-queue=\"{queue}\"] td[data-state=\"{state}\"]"
    ))
}

#[test]
fn console_shows_queues_acts_with_the_token_and_notices_a_lost_server() {
    if let Some(reason) = webdriver::missing() {
        skip("serve_console", &reason);
        return;
    }
    let (dir, root) = spool();
    let enrich = root.join("site-a/enrich");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token file");
    let serve = Serve::start(&root, "127.0.0.1:0", Some(&token_file));
    let browser = Browser::start(1280, 900);

    // The overview: every queue with its counts.
    browser.goto(&format!("{}/", serve.url));
    browser.wait_for(WAIT, "the overview's counts", |b| {
        overview_count(b, "site-a/enrich", "incoming").as_deref() == Some("3")
            && overview_count(b, "site-a/enrich", "errors").as_deref() == Some("2")
            && overview_count(b, "mail", "incoming").as_deref() == Some("1")
    });
    assert_eq!(browser.text("#status").as_deref(), Some("live"));
    assert!(
        !browser.visible("#lost"),
        "no lost-server banner while serving"
    );

    // A queue's page, reached by its link: its waiting messages, one row each.
    browser.click("tr[data-queue=\"site-a/enrich\"] a");
    browser.wait_for(WAIT, "the queue's page with its three messages", |b| {
        b.text("#queue-name").as_deref() == Some("site-a/enrich")
            && b.script(
                "return document.querySelectorAll('#messages-body tr[data-id]').length",
                json!([]),
            ) == json!(3)
    });
    let id = browser
        .script(
            "return document.querySelector('#messages-body tr[data-id]').dataset.id",
            json!([]),
        )
        .as_str()
        .expect("a message id")
        .to_owned();
    assert!(on_disk(&enrich, "incoming", &id), "{id} waits in incoming/");

    // The failed messages show their reason, the stderr tail of the command, as text.
    browser.click("#tab-errors");
    browser.wait_for(WAIT, "the failure reason in the errors tab", |b| {
        b.text("#messages-body")
            .is_some_and(|t| t.contains("lookup failed: no user <b>2</b>"))
    });
    browser.click("#tab-incoming");
    browser.wait_for(WAIT, "the incoming tab again", |b| {
        b.visible(&format!("#messages-body tr[data-id=\"{id}\"]"))
    });

    // A message's body, shown as text.
    browser.click(&format!("button[data-view=\"{id}\"]"));
    browser.wait_for(WAIT, "the message body", |b| {
        b.text("#body-text")
            .is_some_and(|t| t.starts_with("{\"user\": "))
    });

    // Holding without the token, then with a wrong one: refused visibly, nothing moves.
    let hold = format!("button[data-action=\"hold\"][data-id=\"{id}\"]");
    for attempt in ["", "not-the-token"] {
        browser.click(&hold);
        browser.wait_for(WAIT, "the confirmation dialog", |b| {
            b.visible("#confirm[open]")
        });
        assert!(browser.visible("#token"), "the dialog asks for the token");
        browser.type_into("#token", attempt);
        browser.click("#confirm-ok");
        browser.wait_for(WAIT, "the server's refusal in the dialog", |b| {
            b.text("#confirm-error").is_some_and(|t| t.contains("401"))
        });
        assert!(
            on_disk(&enrich, "incoming", &id),
            "a refused hold moves nothing"
        );
        assert!(
            !on_disk(&enrich, "hold", &id),
            "a refused hold moves nothing"
        );
        browser.click("#confirm-cancel");
        browser.wait_for(WAIT, "the dialog to close", |b| {
            !b.visible("#confirm[open]")
        });
    }
    assert!(
        browser
            .script("return sessionStorage.getItem('dirq-token')", json!([]))
            .is_null(),
        "a refused token is not kept"
    );

    // Holding with the token: the message moves on disk and in the page.
    browser.click(&hold);
    browser.wait_for(WAIT, "the confirmation dialog", |b| {
        b.visible("#confirm[open]")
    });
    browser.type_into("#token", TOKEN);
    browser.click("#confirm-ok");
    browser.wait_for(WAIT, "the hold to be reported", |b| {
        !b.visible("#confirm[open]") && b.text("#action-result").is_some_and(|t| t.contains("held"))
    });
    assert!(on_disk(&enrich, "hold", &id), "{id} is in hold/");
    assert!(!on_disk(&enrich, "incoming", &id), "{id} left incoming/");
    browser.wait_for(WAIT, "the page to show the move", |b| {
        !b.visible(&format!("#messages-body tr[data-id=\"{id}\"]"))
            && b.text("#tab-hold .tab-count").as_deref() == Some("1")
            && b.text("#tab-incoming .tab-count").as_deref() == Some("2")
    });
    browser.click("#tab-hold");
    browser.wait_for(WAIT, "the held message in the hold tab", |b| {
        b.visible(&format!("#messages-body tr[data-id=\"{id}\"]"))
    });
    assert_eq!(
        browser.script("return sessionStorage.getItem('dirq-token')", json!([])),
        json!(TOKEN),
        "an accepted token is kept for the tab's session"
    );

    // The page kept to its Content-Security-Policy and threw no script error (the
    // refused holds above are logged as failed requests, which is expected).
    let errors = browser.console_errors();
    assert!(
        !errors
            .iter()
            .any(|e| e.contains("Content Security Policy") || e.contains("Uncaught")),
        "the browser console shows problems: {errors:#?}"
    );

    // A screenshot of the page as it stands, as docs/console.png was taken: with
    // DIRQ_CONSOLE_SCREENSHOT=FILE the test keeps it there.
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG screenshot");
    let (width, height) = png_size(&png).expect("a PNG header");
    assert!(
        width > 0 && height > 0,
        "an empty screenshot: {width}x{height}"
    );
    if let Some(file) = std::env::var_os("DIRQ_CONSOLE_SCREENSHOT") {
        std::fs::write(&file, &png).expect("write the screenshot");
    }

    // The server goes away: the page says so, and recovers when it is back.
    let port = serve.port().to_owned();
    drop(serve);
    browser.wait_for(WAIT, "the lost-server banner", |b| b.visible("#lost"));
    assert_eq!(browser.text("#status").as_deref(), Some("disconnected"));
    let serve = Serve::start(&root, &format!("127.0.0.1:{port}"), Some(&token_file));
    browser.wait_for(WAIT, "the page to recover", |b| {
        !b.visible("#lost") && b.text("#status").as_deref() == Some("live")
    });
    drop(serve);
}

#[test]
fn console_of_a_read_only_serve_offers_no_actions() {
    if let Some(reason) = webdriver::missing() {
        skip("serve_console", &reason);
        return;
    }
    let (_dir, root) = spool();
    let serve = Serve::start(&root, "127.0.0.1:0", None);
    let browser = Browser::start(1280, 900);
    browser.goto(&format!("{}/#/queue/site-a%2Fenrich/incoming", serve.url));
    browser.wait_for(WAIT, "the queue's messages, read-only", |b| {
        b.text("#mode").as_deref() == Some("read-only")
            && b.visible("#messages-body tr[data-id] button[data-action=\"hold\"]")
    });
    let enabled = browser.script(
        "return [...document.querySelectorAll('#messages-body button[data-action]')] \
         .filter((b) => !b.disabled).length",
        json!([]),
    );
    assert_eq!(enabled, json!(0), "every action button is disabled");
    // The message bodies can still be read.
    browser.click("#messages-body button[data-view]");
    browser.wait_for(WAIT, "the message body", |b| {
        b.text("#body-text")
            .is_some_and(|t| t.starts_with("{\"user\": "))
    });
}

/// Width and height from a PNG's IHDR chunk, which follows the 8-byte signature.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    let ihdr = png.get(8..24)?;
    if &ihdr[4..8] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&ihdr[8..12]), be(&ihdr[12..16])))
}
