//! Capacity (issue 13): many concurrent streams through the real binary (default config),
//! beside direct to the mock and nginx (when installed) in the same run, and the proxy's
//! memory idle and under that load. Prints figures; asserts nothing about time.
//!
//! Each stream is `POST /v1/messages` with `"stream": true` to the project's mock: 20 SSE
//! events 200 ms apart; the streams start evenly over one second. A raw socket client
//! stamps the first event, the first text delta and the end of each stream.
//!
//! Run: `cargo bench --bench capacity` (`STREAMS=N`, default 1000; about 20 s). With
//! `TLS=1` one more round goes through a second proxy whose upstream is HTTPS (the test
//! suite's TLS front before the mock), as real traffic is: its memory beside the plain one.

mod common;
#[path = "../tests/support/raw.rs"]
mod raw;
#[path = "../tests/support/tls.rs"]
#[allow(dead_code)]
mod tls;

/// What `tls.rs` asks of its parent module: a number unique in this process.
fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

use common::nginx::Nginx;
use failover_proxy::mock::control::MockUpstream;
use raw::RawClient;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const GAP_MS: u64 = 200;
const DELTAS: usize = 15; // the mock adds 5 events around its text deltas

/// The proxy as a user runs it: `serve` with the default config in front of the mock.
struct ProxyProcess {
    child: Child,
    url: String,
    config: std::path::PathBuf,
}

impl ProxyProcess {
    /// In front of one endpoint, `base_url` (and its `ca_file`, if any).
    fn start(base_url: &str, ca_file: Option<&str>) -> ProxyProcess {
        let name = format!("fp-bench-{}-{}.json", std::process::id(), unique());
        let config = std::env::temp_dir().join(name);
        let text = serde_json::json!({"endpoints": [{"name": "mock", "base_url": base_url,
            "api_key": "sk-bench-0123456789", "ca_file": ca_file}]});
        std::fs::write(&config, text.to_string()).expect("config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_failover-proxy"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "warn",
                "--config",
            ])
            .arg(&config)
            .stderr(Stdio::piped())
            .spawn()
            .expect("failover-proxy serve");
        // `--log-level warn` hides the "listening on" line: find the port from /proc.
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = loop {
            if let Some(port) = listening_port(pid) {
                break format!("http://127.0.0.1:{port}");
            }
            assert!(Instant::now() < deadline, "the proxy did not start");
            thread::sleep(Duration::from_millis(20));
        };
        let stderr = child.stderr.take().expect("stderr");
        thread::spawn(move || BufReader::new(stderr).lines().for_each(drop));
        ProxyProcess { child, url, config }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// The port `pid` listens on, from its socket inodes and /proc/net/tcp.
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            link.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // state 0A is LISTEN
        let listening = fields.get(3) == Some(&"0A")
            && inodes.iter().any(|i| fields.get(9) == Some(&i.as_str()));
        let port = fields.get(1)?.rsplit(':').next()?;
        listening
            .then(|| u16::from_str_radix(port, 16).ok())
            .flatten()
    })
}

/// One stream as the client saw it, in ms from its request.
struct Stamps {
    first_event: f64,
    first_delta: f64,
    end: Instant,
}

fn run_stream(url: &str, request: &[u8]) -> Option<Stamps> {
    let mut client = RawClient::connect(url);
    client.set_read_timeout(Duration::from_secs(120));
    let sent = Instant::now();
    client.send(request);
    let head = client.read_head().ok()?;
    if head.status != 200 {
        return None;
    }
    let ms = |at: Instant| (at - sent).as_secs_f64() * 1000.0;
    let (mut first_event, mut first_delta) = (None, None);
    let mut events = client.events();
    while let Some(event) = events.next_event().ok()? {
        let now = Instant::now();
        first_event.get_or_insert(ms(now));
        if first_delta.is_none() && raw::event_name(&event) == "content_block_delta" {
            first_delta = Some(ms(now));
        }
    }
    Some(Stamps {
        first_event: first_event?,
        first_delta: first_delta?,
        end: Instant::now(),
    })
}

struct Round {
    completed: usize,
    first_event: Vec<f64>,
    first_delta: Vec<f64>,
    /// From the first request to the end of the last stream, in s.
    last_end: f64,
    peak_rss_mib: f64,
}

/// `streams` streams to `url` started evenly over a second, sampling `rss` meanwhile.
fn run_round(url: &str, streams: usize, rss: &(dyn Fn() -> u64 + Sync)) -> Round {
    let deltas = DELTAS.to_string();
    let gap = GAP_MS.to_string();
    let request = Arc::new(raw::messages_request(
        true,
        &[("x-mock-events", &deltas), ("x-mock-delay-ms", &gap)],
    ));
    let done = AtomicBool::new(false);
    let peak = AtomicU64::new(0);
    let started = Instant::now();
    let results: Vec<Option<Stamps>> = thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss(), Ordering::SeqCst);
                thread::sleep(Duration::from_millis(50));
            }
        });
        let handles: Vec<_> = (0..streams)
            .map(|i| {
                let (url, request) = (url.to_string(), request.clone());
                let at = started + Duration::from_secs(1) * i as u32 / streams as u32;
                thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || {
                        thread::sleep(at.saturating_duration_since(Instant::now()));
                        run_stream(&url, &request)
                    })
                    .expect("a client thread")
            })
            .collect();
        let results = handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect();
        done.store(true, Ordering::SeqCst);
        results
    });
    let ok: Vec<Stamps> = results.into_iter().flatten().collect();
    Round {
        completed: ok.len(),
        first_event: ok.iter().map(|s| s.first_event).collect(),
        first_delta: ok.iter().map(|s| s.first_delta).collect(),
        last_end: ok
            .iter()
            .map(|s| (s.end - started).as_secs_f64())
            .fold(0.0, f64::max),
        peak_rss_mib: peak.load(Ordering::SeqCst) as f64 / 1024.0,
    }
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_round(label: &str, streams: usize, r: &Round) {
    println!(
        "{label:<16} {:>5}/{streams:<5} {:>8.1}/{:<8.1} {:>8.1}/{:<8.1} {:>8.2} {:>9.1}",
        r.completed,
        percentile(&r.first_event, 50.0),
        percentile(&r.first_event, 99.0),
        percentile(&r.first_delta, 50.0),
        percentile(&r.first_delta, 99.0),
        r.last_end,
        r.peak_rss_mib,
    );
}

fn main() {
    let streams: usize = std::env::var("STREAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mock = MockUpstream::start().expect("mock upstream");
    let proxy = ProxyProcess::start(&mock.url(), None);
    let proxy_pid = proxy.child.id();
    thread::sleep(Duration::from_secs(1));
    let idle = common::rss_kib(proxy_pid) as f64 / 1024.0;
    println!(
        "{streams} streams of 20 events {GAP_MS} ms apart, started over 1 s; failover-proxy idle RSS {idle:.1} MiB"
    );
    println!(
        "{:<16} {:>11} {:>17} {:>17} {:>8} {:>9}",
        "target", "completed", "1st event p50/p99", "1st delta p50/p99", "last s", "peak MiB"
    );
    let no_rss = || 0;
    let direct = run_round(&mock.url(), streams, &no_rss);
    print_round("direct", streams, &direct);
    let through = run_round(&proxy.url, streams, &|| common::rss_kib(proxy_pid));
    print_round("failover-proxy", streams, &through);
    match Nginx::start(mock.addr()) {
        Some(nginx) => {
            let round = run_round(&nginx.url(), streams, &|| nginx.rss_kib());
            print_round("nginx", streams, &round);
        }
        None => println!("nginx           (not installed: apt-get install nginx-light)"),
    }
    println!(
        "failover-proxy vs direct: first delta p99 {:+.1} ms, last stream {:+.0} ms",
        percentile(&through.first_delta, 99.0) - percentile(&direct.first_delta, 99.0),
        (through.last_end - direct.last_end) * 1000.0
    );
    if std::env::var_os("TLS").is_some() {
        https_round(&mock, streams);
    }
}

/// The same streams through a proxy whose upstream is HTTPS: each stream's connection
/// carries a TLS session, and its thread made a handshake.
fn https_round(mock: &MockUpstream, streams: usize) {
    let ca = tls::TestCa::new();
    let pem = ca.write_pem();
    let front = tls::TlsFront::start(&ca, mock.addr());
    let proxy = ProxyProcess::start(&front.url(), Some(pem.path_str()));
    let pid = proxy.child.id();
    thread::sleep(Duration::from_secs(1));
    let round = run_round(&proxy.url, streams, &|| common::rss_kib(pid));
    print_round("proxy, https up", streams, &round);
}
