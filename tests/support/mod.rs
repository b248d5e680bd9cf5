//! Shared helpers for the integration tests: a proxy started in-process on 127.0.0.1:0
//! in front of mock upstreams, a real HTTP client (ureq), and a log capture.

#![allow(dead_code)]

pub mod binary;
pub mod quota;
pub mod raw;
pub mod tls;

use failover_proxy::config::validated::{Config, Overrides};
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use failover_proxy::server::listen::Server;
use failover_proxy::state::shared::State;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Every log line of the test process. Tests run in parallel, so a test counts only the
/// lines that name its own endpoint ids (each test's mocks have their own ports, hence
/// their own ids).
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LINES
            .lock()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

pub fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        log::set_boxed_logger(Box::new(Capture)).expect("one logger per test process");
        log::set_max_level(log::LevelFilter::Debug);
    });
}

/// Log lines containing every one of `needles`.
pub fn log_lines_with(needles: &[&str]) -> Vec<String> {
    LINES
        .lock()
        .iter()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .cloned()
        .collect()
}

pub fn all_log_text() -> String {
    LINES.lock().join("\n")
}

/// A running proxy in front of some mocks.
pub struct Proxy {
    pub state: Arc<State>,
    server: Option<Server>,
    pub url: String,
}

impl Proxy {
    /// `extra` is merged into the config's top level; `endpoints` is built from the mocks
    /// (names "ep0", "ep1", …, keys "sk-test-key-<i>-0123456789abcdef") unless `extra`
    /// gives its own.
    pub fn start(mocks: &[&MockUpstream], extra: Value) -> Proxy {
        capture_logs();
        let endpoints: Vec<Value> = mocks
            .iter()
            .enumerate()
            .map(|(i, m)| json!({"name": format!("ep{i}"), "base_url": m.url(), "api_key": key(i)}))
            .collect();
        let mut config = json!({"listen": "127.0.0.1:0", "workers": 16, "endpoints": endpoints});
        for (k, v) in extra.as_object().expect("extra must be an object") {
            config[k] = v.clone();
        }
        Proxy::from_json(&config.to_string())
    }

    pub fn from_json(text: &str) -> Proxy {
        capture_logs();
        let config = Config::from_json(text, &Overrides::default(), &|_| None).expect("config");
        let state = Arc::new(State::new(config).expect("state"));
        let server = Server::start(state.clone()).expect("server");
        let url = format!("http://{}", server.addr());
        Proxy {
            state,
            server: Some(server),
            url,
        }
    }

    pub fn stats(&self) -> Value {
        let (status, body) = get(&format!("{}/__qcc__/stats", self.url));
        assert_eq!(status, 200);
        serde_json::from_slice(&body).expect("stats JSON")
    }

    /// The id of endpoint i, as the stats show it.
    pub fn id(&self, i: usize) -> String {
        self.state.current().endpoints[i].id().to_string()
    }

    pub fn endpoint_stats(&self, i: usize) -> Value {
        endpoint_in(&self.stats(), &self.id(i)).clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown(Duration::from_secs(10));
        }
    }
}

pub fn key(i: usize) -> String {
    format!("sk-test-key-{i}-0123456789abcdef")
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

pub fn message_body() -> String {
    json!({"model": "claude-test", "max_tokens": 16,
           "messages": [{"role": "user", "content": "hello"}]})
    .to_string()
}

/// POST /v1/messages through the proxy; returns status, selected headers and body.
pub fn post_message(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    post(url, "/v1/messages", &message_body(), headers)
}

pub fn post(url: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let mut req = agent()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(body).expect("request");
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_vec().expect("body");
    (status, body)
}

pub fn get(url: &str) -> (u16, Vec<u8>) {
    let mut resp = agent().get(url).call().expect("request");
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_vec().expect("body"))
}

pub fn mock(fault: Fault) -> MockUpstream {
    MockUpstream::start_with(fault).expect("mock upstream")
}

/// A response as the client saw it, every header kept (names lower-case).
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(n, _)| n == name);
        found.map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

/// POST /v1/messages through `client` (one agent keeps its connection to the proxy alive).
pub fn send_message(client: &ureq::Agent, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = client
        .post(format!("{url}/v1/messages"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(message_body()).expect("request");
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = resp.body_mut().read_to_vec().expect("body");
    Answer {
        status: resp.status().as_u16(),
        headers,
        body,
    }
}

/// Endpoint `i` as `Proxy::start` names it (name "ep<i>", key `key(i)`), plus `settings`;
/// for configs whose endpoints are not all mocks, or need settings of their own.
pub fn endpoint_json(i: usize, base_url: &str, settings: Value) -> Value {
    let mut endpoint = json!({"name": format!("ep{i}"), "base_url": base_url, "api_key": key(i)});
    for (k, v) in settings.as_object().expect("settings must be an object") {
        endpoint[k] = v.clone();
    }
    endpoint
}

/// A loopback URL whose port refuses connections: bound to learn a free port, then released.
pub fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

/// How many log lines there are so far: a mark for `log_lines_since`, so a count is not
/// disturbed by lines an earlier test logged for an endpoint with the same id.
pub fn log_mark() -> usize {
    LINES.lock().len()
}

/// Log lines after `mark` containing every one of `needles`.
pub fn log_lines_since(mark: usize, needles: &[&str]) -> Vec<String> {
    let lines = LINES.lock();
    let found = lines
        .iter()
        .skip(mark)
        .filter(|l| needles.iter().all(|n| l.contains(n)));
    found.cloned().collect()
}

/// Polls `done` every 10 ms until it holds; fails after five seconds (a safety net, not a
/// claim about time). `what` names the condition in the failure message.
pub fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `done` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn within(limit: Duration, done: impl Fn() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// Waits out the last 30 s of a UTC day: a test that checks "today's" usage must not see
/// the day change under it.
pub fn clear_of_midnight_utc() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let left = 86_400 - now.as_secs() % 86_400;
    if left <= 30 {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

/// A number unique within this test process, for temp file names.
pub fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Endpoint `id`'s entry in a `/__qcc__/stats` answer.
pub fn endpoint_in<'a>(stats: &'a Value, id: &str) -> &'a Value {
    let endpoints = stats["endpoints"].as_array().expect("endpoints");
    endpoints
        .iter()
        .find(|e| e["id"] == id)
        .expect("endpoint in stats")
}
