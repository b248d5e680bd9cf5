//! The status page in a real browser (issue 17): headless Chromium from Debian's package
//! loads `/__qcc__/` from a proxy with one quarantined endpoint. The page must show it as
//! quarantined, with its charts, at 375 and 1280 px; its "Retry queue" button must probe
//! it, and a call that fails must say why on the page.
//!
//! Chromium is not installed by the test: without `/usr/bin/chromium` it prints why and
//! passes (`.ci/run` installs it). The screenshots and the DOM stay in
//! `target/tmp/status-page/` to be looked at.
//!
//! The click is a real one, sent over the DevTools protocol on `--remote-debugging-pipe`
//! (file descriptors 3 and 4, messages ended by a NUL byte): no WebSocket client needed.

use crate::support::quota::{QuotaScene, utc_clock};
use crate::support::*;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The longest a Chromium run may take; it is killed after that (a safety net).
const BROWSER_DEADLINE: Duration = Duration::from_secs(90);

/// Where the screenshots and DOM dumps are kept (`target/tmp/status-page/`).
fn artefacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&dir).expect("create the artefact directory");
    dir
}

fn chromium_is_installed() -> bool {
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    eprintln!(
        "SKIPPED: the status page browser test needs {CHROMIUM} (Debian: apt-get install -y \
         chromium; .ci/run installs it)"
    );
    false
}

/// Flags for every run: headless, as root in CI (no sandbox), a profile of its own, and
/// nothing that reaches beyond loopback by itself (updates, sync, pings). The page shows
/// local clock times: in UTC, a test can say which.
fn chromium(profile: &Path) -> Command {
    let mut command = Command::new(CHROMIUM);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-pings",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .env("TZ", "UTC")
        .stdin(Stdio::null());
    command
}

/// Waits for a Chromium process, killing it after `BROWSER_DEADLINE`.
fn wait_bounded(mut child: Child, what: &str) {
    let deadline = Instant::now() + BROWSER_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("wait on chromium") {
            assert!(status.success(), "chromium {what}: {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {what} took longer than {BROWSER_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `--screenshot` of `url` at `width`×`height` after the page's script ran (virtual time:
/// the budget passes as fast as the page lets it).
fn screenshot(url: &str, width: u32, height: u32, file: &Path) {
    let profile = tempdir("shot");
    let child = chromium(&profile)
        .arg(format!("--screenshot={}", file.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg("--virtual-time-budget=3000")
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    wait_bounded(child, "--screenshot");
    let _ = std::fs::remove_dir_all(profile);
    let png = std::fs::read(file).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG: {}", file.display());
}

/// `--dump-dom` of `url` after its script ran: the page as the script left it. The virtual
/// time budget does not wait for a slow real fetch of the stats (a loaded machine), so a
/// dump without the endpoint cards is taken again, three times at most.
fn dump_dom(url: &str, file: &Path) -> String {
    let mut dom = String::new();
    for _ in 0..3 {
        dom = dump_dom_once(url, file);
        if dom.contains("<article class=\"card") {
            break;
        }
    }
    dom
}

fn dump_dom_once(url: &str, file: &Path) -> String {
    let profile = tempdir("dom");
    let child = chromium(&profile)
        .args(["--dump-dom", "--virtual-time-budget=3000", url])
        .stdout(File::create(file).expect("the DOM file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    wait_bounded(child, "--dump-dom");
    let _ = std::fs::remove_dir_all(profile);
    std::fs::read_to_string(file).expect("the DOM")
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fp-chromium-{what}-{}-{}",
        std::process::id(),
        unique()
    ));
    std::fs::create_dir_all(&dir).expect("a profile directory");
    dir
}

/// The element that opens with `<tag` and carries `data-id="id"`, up to `</tag>`.
fn element_with_id<'a>(dom: &'a str, tag: &str, id: &str) -> &'a str {
    let marker = format!("data-id=\"{id}\"");
    let open = format!("<{tag}");
    let start = dom
        .match_indices(&open)
        .map(|(at, _)| at)
        .find(|&at| dom[at..].split('>').next().unwrap_or("").contains(&marker))
        .unwrap_or_else(|| panic!("no <{tag} {marker}> in the DOM"));
    let close = format!("</{tag}>");
    let end = dom[start..].find(&close).expect("the element's end") + start;
    &dom[start..end]
}

#[test]
fn the_status_page_shows_the_quarantine_and_its_retry_button_probes() {
    if !chromium_is_installed() {
        return;
    }
    let bad_key = mock(Fault::Status(401));
    let healthy = mock(Fault::None);
    // No probe but the operator's: the recovery interval is an hour.
    let proxy = Proxy::start(
        &[&bad_key, &healthy],
        json!({"recovery_interval": 3600, "recovery_max_interval": 7200}),
    );
    for _ in 0..3 {
        assert_eq!(post_message(&proxy.url, &[]).0, 200);
    }
    let (quarantined, serving) = (proxy.id(0), proxy.id(1));
    assert_eq!(proxy.stats()["failed_endpoints"], json!([quarantined]));
    let page = format!("{}/__qcc__/", proxy.url);
    let dir = artefacts();

    screenshot(&page, 375, 2000, &dir.join("status-page-375.png"));
    screenshot(&page, 1280, 1200, &dir.join("status-page-1280.png"));
    let dom = dump_dom(&page, &dir.join("status-page-dom.html"));

    let card = element_with_id(&dom, "article", &quarantined);
    assert!(card.contains("class=\"card c-quarantined\""), "{card}");
    assert!(card.contains(">quarantined</span>"), "{card}");
    assert!(card.contains("HTTP 401"), "{card}");
    assert_eq!(card.matches("<svg").count(), 3, "three charts: {card}");
    // The one attempt it got is a bar in the attempts and the failures chart.
    assert_eq!(card.matches("<rect").count(), 2, "{card}");
    let other = element_with_id(&dom, "article", &serving);
    assert!(other.contains(">healthy</span>"), "{other}");
    assert_eq!(other.matches("<svg").count(), 3, "{other}");
    let row = element_with_id(&dom, "tr", &quarantined);
    assert!(row.contains(">quarantined</span>"), "{row}");
    assert!(row.contains("with the next recovery round"), "{row}");
    for button in ["retry", "clear", "reload"] {
        assert!(
            dom.contains(&format!("<button id=\"{button}\"")),
            "{button}"
        );
    }
    assert_eq!(bad_key.requests(), 1, "the page reached no upstream");

    // The upstream works again; the operator clicks "Retry queue".
    bad_key.set_fault(Fault::None);
    let mut browser = Devtools::launch();
    let tab = browser.open(&page);
    let state = format!("document.querySelector('article[data-id=\"{quarantined}\"] .state')");
    browser.wait_until(&tab, &format!("{state}?.textContent === 'quarantined'"));
    browser.evaluate(&tab, "document.getElementById('retry').click()");
    let message = "document.getElementById('message')";
    browser.wait_until(
        &tab,
        &format!("{message}.textContent.startsWith('Retry: ')"),
    );
    let said = browser.evaluate(&tab, &format!("{message}.textContent"));
    let recovered = format!("Retry: ep0 ({quarantined}) recovered: ");
    assert!(said.as_str().unwrap().starts_with(&recovered), "{said}");
    let stats = proxy.stats();
    assert_eq!(stats["failure_queue_stats"]["total_verified"], 1);
    assert_eq!(stats["failure_queue_stats"]["total_recovered"], 1);
    assert_eq!(stats["failed_endpoints"], json!([]));
    browser.wait_until(&tab, &format!("{state}.textContent === 'healthy'"));

    // A call that fails says why: this proxy has no config file to reload.
    browser.evaluate(&tab, "document.getElementById('reload').click()");
    browser.wait_until(
        &tab,
        &format!("{message}.textContent.startsWith('Error: ')"),
    );
    let said = browser.evaluate(&tab, &format!("{message}.textContent"));
    assert_eq!(
        said,
        "Error: Reload failed (HTTP 400): reload refused: this proxy was not started from a \
         config file"
    );
    let class = browser.evaluate(&tab, &format!("{message}.className"));
    assert_eq!(class, "error");
}

/// Each card shows its endpoint's tokens today (the four kinds in the title) and its quota
/// report, and a skipped endpoint's badge says until when: five endpoints left in five
/// states by real answers (see `QuotaScene`). Text from the DOM as Chromium writes it
/// (`<` as `&lt;`).
#[test]
fn the_status_page_shows_tokens_today_and_each_quota() {
    if !chromium_is_installed() {
        return;
    }
    let scene = QuotaScene::start();
    let page = format!("{}/__qcc__/", scene.proxy.url);
    let dir = artefacts();
    screenshot(&page, 375, 2400, &dir.join("status-page-quota-375.png"));
    let dom = dump_dom(&page, &dir.join("status-page-quota-dom.html"));
    let (reset, unified, passed) = (
        utc_clock(scene.reset),
        utc_clock(scene.unified_reset),
        utc_clock(scene.passed_reset),
    );
    let kinds = |input, output, write, read| {
        format!(
            "today (UTC): input {input}, output {output}, cache write {write}, cache read {read}"
        )
    };
    let expected = [
        (
            "healthy",
            kinds(12000, 250, 40, 10),
            "12.3k $0.04".to_string(),
            format!("49 requests left, 7000 tokens left, resets at {reset}"),
            format!("req 49 · tok 7.0k · reset {reset}"),
        ),
        (
            "healthy",
            kinds(900, 50, 0, 0),
            "950".to_string(),
            format!(
                "42 % of the 5-hour window used, 90 % of the 7-day window used, subscription \
                 status allowed_warning, resets at {unified}"
            ),
            format!("5h 42 % · 7d 90 % · reset {unified}"),
        ),
        (
            &*format!("quota spent until {reset}"),
            kinds(25, 15, 7, 11),
            "58 &lt;$0.01".to_string(),
            format!("0 requests left, resets at {reset}"),
            format!("req 0 · reset {reset}"),
        ),
        (
            "healthy",
            kinds(4_000_000, 100_000, 0, 0),
            "4.1M $13.50".to_string(),
            format!("subscription status rejected, resets at {passed}"),
            format!("rejected · reset {passed}"),
        ),
        (
            "no traffic yet",
            kinds(0, 0, 0, 0),
            "0".to_string(),
            "no answer has reported its rate limits yet".to_string(),
            "–".to_string(),
        ),
    ];
    for (i, (state, tokens_title, tokens, quota_title, quota)) in expected.iter().enumerate() {
        let card = element_with_id(&dom, "article", &scene.proxy.id(i));
        let tokens = format!("<dd class=\"tokens\" title=\"{tokens_title}\">{tokens}</dd>");
        assert!(card.contains(&tokens), "ep{i}: {tokens} not in {card}");
        let quota = format!("<dd class=\"quota\" title=\"{quota_title}\">{quota}</dd>");
        assert!(card.contains(&quota), "ep{i}: {quota} not in {card}");
        assert!(
            card.contains(&format!(">{state}</span>")),
            "ep{i}: {state}: {card}"
        );
    }
    let spent = element_with_id(&dom, "article", &scene.proxy.id(2));
    assert!(spent.contains("class=\"card c-spent\""), "{spent}");
    assert!(spent.contains("<dt>tokens today</dt>") && spent.contains("<dt>quota</dt>"));
}

/// Headless Chromium driven over `--remote-debugging-pipe`: commands go to its fd 3,
/// answers and events come from its fd 4, each a JSON text ended by NUL.
struct Devtools {
    child: Child,
    commands: File,
    answers: BufReader<File>,
    next_id: u64,
    profile: PathBuf,
    /// Dropped (with the session) to call off the watchdog that kills a browser which
    /// outlives `BROWSER_DEADLINE`: a read from a hung browser would block forever.
    _watchdog: mpsc::Sender<()>,
}

/// A page attached in flat mode: commands to it carry its session id.
struct Tab {
    session: String,
}

impl Devtools {
    fn launch() -> Devtools {
        let (to_browser_read, to_browser_write) = pipe();
        let (from_browser_read, from_browser_write) = pipe();
        let profile = tempdir("devtools");
        let mut command = chromium(&profile);
        command
            .args(["--remote-debugging-pipe", "about:blank"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec the closure only calls fcntl, dup2 and close,
        // which are async-signal-safe, on descriptors this process owns. It moves the
        // browser's ends of the pipes to 3 and 4 (by way of descriptors above 10, so
        // neither can overwrite the other); dup2's copies are not close-on-exec.
        unsafe {
            command.pre_exec(move || {
                let read = libc::fcntl(to_browser_read, libc::F_DUPFD, 10);
                let write = libc::fcntl(from_browser_write, libc::F_DUPFD, 10);
                if read < 0 || write < 0 || libc::dup2(read, 3) < 0 || libc::dup2(write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(read);
                libc::close(write);
                Ok(())
            });
        }
        let child = command.spawn().expect("start chromium");
        // SAFETY: these descriptors came from pipe2 above and nothing else owns them.
        let (commands, answers) = unsafe {
            libc::close(to_browser_read);
            libc::close(from_browser_write);
            (
                File::from_raw_fd(to_browser_write),
                File::from_raw_fd(from_browser_read),
            )
        };
        Devtools {
            _watchdog: watchdog(child.id()),
            child,
            commands,
            answers: BufReader::new(answers),
            next_id: 0,
            profile,
        }
    }

    /// Opens `url` in a new tab and attaches to it.
    fn open(&mut self, url: &str) -> Tab {
        let target = self.call(None, "Target.createTarget", json!({ "url": url }));
        let target_id = target["targetId"].clone();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        Tab {
            session: attached["sessionId"].as_str().expect("a session").into(),
        }
    }

    /// The value of a JavaScript expression in the tab (promises awaited).
    fn evaluate(&mut self, tab: &Tab, expression: &str) -> Value {
        let params =
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true });
        let result = self.call(Some(&tab.session), "Runtime.evaluate", params);
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Polls `condition` every 50 ms until it is true; fails after 30 seconds (a safety
    /// net for a busy machine, not a claim about time).
    fn wait_until(&mut self, tab: &Tab, condition: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.evaluate(tab, condition) != Value::Bool(true) {
            assert!(Instant::now() < deadline, "never true: {condition}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends one command and returns its result, skipping the events that come between.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("write to chromium");
        loop {
            let mut raw = Vec::new();
            let n = self
                .answers
                .read_until(0, &mut raw)
                .expect("read from chromium");
            assert!(n > 0, "chromium closed its DevTools pipe during {method}");
            raw.pop();
            let answer: Value = serde_json::from_slice(&raw).expect("a DevTools message");
            if answer["id"] != id {
                continue;
            }
            assert!(answer.get("error").is_none(), "{method}: {answer}");
            return answer["result"].clone();
        }
    }
}

/// Kills process `pid` after `BROWSER_DEADLINE` unless the returned sender is dropped
/// first. Drop it before reaping the process, so the pid cannot have been reused.
fn watchdog(pid: u32) -> mpsc::Sender<()> {
    let (call_off, called_off) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if called_off.recv_timeout(BROWSER_DEADLINE) == Err(RecvTimeoutError::Timeout) {
            eprintln!("chromium ran longer than {BROWSER_DEADLINE:?}: killed");
            // SAFETY: a signal to our own child, not yet reaped (see above).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
    call_off
}

impl Drop for Devtools {
    /// Asks the browser to close (a killed one leaves helper processes that go on
    /// writing to the profile, which then cannot be removed), kills it if it has not
    /// exited within five seconds, then removes the profile.
    fn drop(&mut self) {
        let close = json!({ "id": 0, "method": "Browser.close" }).to_string();
        let _gone_already = self.commands.write_all(format!("{close}\0").as_bytes());
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (call_off, _) = mpsc::channel();
        drop(std::mem::replace(&mut self._watchdog, call_off));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A pipe whose two ends are close-on-exec in this process (the child gets copies).
fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let done = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(done, 0, "pipe2: {}", std::io::Error::last_os_error());
    (fds[0], fds[1])
}
