//! A small WebDriver client (the W3C protocol: JSON over HTTP) that drives headless
//! Chromium through Debian's `chromedriver`, for the console's browser test.
//!
//! Only what the test needs: open a page, find elements by CSS selector, read their text,
//! click, type, run a script, take a screenshot. Every wait is [`Browser::wait_for`] with a
//! deadline. Dropping a [`Browser`] ends the session (which closes Chromium), kills
//! chromedriver, and kills any Chromium process still using the session's profile
//! directory, so nothing outlives a failed test.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key W3C WebDriver uses for an element reference in JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long one WebDriver command may take before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Why a browser could not be driven here, or `None` when chromium and chromedriver exist.
pub fn missing() -> Option<String> {
    [CHROMIUM, CHROMEDRIVER]
        .iter()
        .find(|p| !Path::new(p).exists())
        .map(|p| format!("{p} is not installed (apt-get install chromium chromium-driver)"))
}

/// A WebDriver error answer: its `error` code (`no such element`, `stale element
/// reference`, ...) and message.
#[derive(Debug)]
pub struct WebDriverError {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A headless Chromium session driven through its own chromedriver.
pub struct Browser {
    driver: Child,
    base: String,
    agent: ureq::Agent,
    profile: tempfile::TempDir,
    session: Option<String>,
}

/// An element found in the page, valid until the page redraws it.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session with a fresh
    /// profile and a `width`×`height` window.
    pub fn start(width: u32, height: u32) -> Browser {
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let stdout = driver.stdout.take().expect("chromedriver stdout");
        let mut lines = BufReader::new(stdout).lines();
        // "ChromeDriver was started successfully on port 41235."
        let port = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = driver.kill();
                let _ = driver.wait();
                panic!("chromedriver exited before saying its port");
            };
            if let Some(rest) = line.split("successfully on port ").nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                break digits.parse::<u16>().expect("chromedriver port");
            }
        };
        // Keep draining chromedriver's output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(COMMAND_TIMEOUT))
            .build()
            .into();
        let profile = tempfile::Builder::new()
            .prefix("dirq-chromium-")
            .tempdir()
            .expect("chromium profile directory");
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            agent,
            profile,
            session: None,
        };
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-extensions".to_owned(),
            "--hide-scrollbars".to_owned(),
            "--force-device-scale-factor=1".to_owned(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", browser.profile.path().display()),
        ];
        let created = browser
            .command(
                "POST",
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                    "goog:loggingPrefs": {"browser": "ALL"},
                }}}),
            )
            .unwrap_or_else(|e| panic!("start a Chromium session: {e}"));
        let id = created["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        browser.session = Some(id);
        browser
    }

    fn session_path(&self, rest: &str) -> String {
        format!(
            "/session/{}{rest}",
            self.session.as_deref().expect("a session")
        )
    }

    /// Sends one command and returns its `value`, or the WebDriver error.
    fn command(&self, method: &str, path: &str, body: Value) -> Result<Value, WebDriverError> {
        let url = format!("{}{path}", self.base);
        let response = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self
                .agent
                .post(&url)
                .content_type("application/json")
                .send(body.to_string()),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let text = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap_or_else(|e| panic!("read the answer to {method} {path}: {e}"));
        let answer: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path} answered non-JSON ({e}): {text}"));
        let value = answer.get("value").cloned().unwrap_or(Value::Null);
        if response.status().is_success() {
            return Ok(value);
        }
        Err(WebDriverError {
            code: value["error"].as_str().unwrap_or("unknown").to_owned(),
            message: value["message"].as_str().unwrap_or_default().to_owned(),
        })
    }

    fn must(&self, method: &str, rest: &str, body: Value) -> Value {
        let path = self.session_path(rest);
        self.command(method, &path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Opens `url` and waits for it to load.
    pub fn goto(&self, url: &str) {
        self.must("POST", "/url", json!({ "url": url }));
    }

    /// The first element matching the CSS `selector`, if any now.
    pub fn find(&self, selector: &str) -> Option<Element> {
        let path = self.session_path("/element");
        match self.command(
            "POST",
            &path,
            json!({"using": "css selector", "value": selector}),
        ) {
            Ok(value) => Some(Element(
                value[ELEMENT_KEY]
                    .as_str()
                    .unwrap_or_else(|| panic!("find {selector}: no element in {value}"))
                    .to_owned(),
            )),
            Err(e) if e.code == "no such element" => None,
            Err(e) => panic!("find {selector}: {e}"),
        }
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns
    /// what it returns.
    pub fn script(&self, script: &str, args: Value) -> Value {
        self.must(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
    }

    /// The rendered text of the first element matching `selector` (its text content for
    /// an SVG element), or `None` when there is none or it is hidden, read in one
    /// step so a redraw between finding and reading cannot fail the test.
    pub fn text(&self, selector: &str) -> Option<String> {
        let value = self.script(
            "const e = document.querySelector(arguments[0]); \
             if (!e || e.closest('[hidden]')) return null; \
             return e.innerText ?? e.textContent;",
            json!([selector]),
        );
        value.as_str().map(str::to_owned)
    }

    /// Whether an element matching `selector` is in the page and not hidden.
    pub fn visible(&self, selector: &str) -> bool {
        self.text(selector).is_some()
    }

    /// Waits until `condition` holds, polling the page; panics naming `what` after
    /// `timeout`, with the page's text to show what it showed instead.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&Browser) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !condition(self) {
            if Instant::now() >= deadline {
                let page = self.text("body").unwrap_or_default();
                panic!("timed out after {timeout:?} waiting for {what}; the page shows:\n{page}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks the element matching `selector`, finding it again if a redraw replaced it
    /// between finding and clicking.
    pub fn click(&self, selector: &str) {
        self.on_element(selector, |element| {
            self.command(
                "POST",
                &self.session_path(&format!("/element/{}/click", element.0)),
                json!({}),
            )
        });
    }

    /// Replaces the value of the input matching `selector` with `text`, as typed keys.
    pub fn type_into(&self, selector: &str, text: &str) {
        self.on_element(selector, |element| {
            self.command(
                "POST",
                &self.session_path(&format!("/element/{}/clear", element.0)),
                json!({}),
            )?;
            if text.is_empty() {
                return Ok(Value::Null);
            }
            self.command(
                "POST",
                &self.session_path(&format!("/element/{}/value", element.0)),
                json!({ "text": text }),
            )
        });
    }

    fn on_element(
        &self,
        selector: &str,
        mut act: impl FnMut(&Element) -> Result<Value, WebDriverError>,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let result = match self.find(selector) {
                Some(element) => act(&element),
                None => Err(WebDriverError {
                    code: "no such element".to_owned(),
                    message: selector.to_owned(),
                }),
            };
            match result {
                Ok(_) => return,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.code.as_str(),
                            "stale element reference" | "no such element"
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("act on {selector}: {e}"),
            }
        }
    }

    /// The browser console's messages at level SEVERE (script errors, refused requests,
    /// Content-Security-Policy violations) since the last call, as text.
    pub fn console_errors(&self) -> Vec<String> {
        let entries = self.must("POST", "/se/log", json!({"type": "browser"}));
        entries
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e["level"] == "SEVERE")
                    .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A PNG screenshot of the window.
    pub fn screenshot(&self) -> Vec<u8> {
        let encoded = self.must("GET", "/screenshot", Value::Null);
        base64_decode(encoded.as_str().expect("base64 screenshot"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = self
                .agent
                .delete(format!("{}/session/{session}", self.base))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // A Chromium left behind (the session could not be ended) is found by the profile
        // directory on its command line, which only this browser uses.
        let profile = self.profile.path().to_string_lossy().into_owned();
        for pid in processes_mentioning(&profile) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The ids of processes whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Standard base64 (with padding), as WebDriver sends screenshots.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:#x}"),
        }
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for chunk in clean.chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|&c| c != b'=').collect();
        let mut n = 0u32;
        for (i, &c) in data.iter().enumerate() {
            n |= value(c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..data.len()]);
    }
    out
}

#[test]
fn base64_decodes_padded_input() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("YWJj"), b"abc");
}
