//! Claude Code-sized traffic (issue 9): `POST /v1/messages?beta=true` with a 120 KB JSON
//! body and a streamed (SSE) reply, through the proxy against direct to the mock, at 1
//! and 16 concurrent clients. Prints requests per second and p50/p99 latency (request
//! written → last byte of the stream read) for both, and the proxy/direct ratios. Asserts
//! nothing about time.
//!
//! Each client keeps one connection alive and sends its requests one after another, as
//! Claude Code does. Latency is measured from the request's first byte written to the
//! stream's last byte read; throughput is requests completed over the round's length. Direct and proxied rounds alternate, so a machine busy with something
//! else hurts both alike.
//!
//! Run: `cargo bench --bench big_bodies` (about 25 s).

mod common;
#[path = "../tests/support/raw.rs"]
mod raw;

use common::start_proxy;
use failover_proxy::mock::control::MockUpstream;
use raw::RawClient;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const BODY_BYTES: usize = 120 * 1024;
const ROUND: Duration = Duration::from_millis(2500);
const ROUNDS: usize = 2;
const CONCURRENCY: [usize; 2] = [1, 16];
const WORKERS: usize = 64;

/// A request like Claude Code's: a long history, then a short last user turn.
fn big_request() -> Vec<u8> {
    let history: String = (0..BODY_BYTES)
        .map(|i| (b'a' + ((i * 7 + i / 26) % 26) as u8) as char)
        .collect();
    let body = serde_json::json!({
        "model": "claude-test", "max_tokens": 16, "stream": true,
        "messages": [{"role": "user", "content": history},
                     {"role": "assistant", "content": "ok"},
                     {"role": "user", "content": "hello"}]
    })
    .to_string();
    let headers = [
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
    ];
    raw::request("POST", "/v1/messages?beta=true", &headers, body.as_bytes())
}

/// One request and its whole streamed answer on `client`; how long it took.
fn exchange(client: &mut RawClient, request: &[u8]) -> Duration {
    let sent = Instant::now();
    client.send(request);
    let head = client.read_head().expect("response head");
    assert_eq!(head.status, 200, "{head:?}");
    let body = client.read_chunked_body().expect("a whole stream");
    assert!(body.ends_with(b"\n\n"), "a complete last event");
    sent.elapsed()
}

/// `clients` clients against `url` for one round; every latency and the round's length.
/// The clients connect one after another, each served once before the next connects:
/// tiny_http 0.12 leaves a burst of new connections queued behind open ones (see the
/// report of issue 9), and this measures the steady state, not that start-up stall.
fn run_round(url: &str, request: &Arc<Vec<u8>>, clients: usize) -> (Vec<Duration>, Duration) {
    let connected: Vec<RawClient> = (0..clients)
        .map(|_| {
            let mut client = RawClient::connect(url);
            exchange(&mut client, request);
            client
        })
        .collect();
    let start = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = connected
        .into_iter()
        .map(|mut client| {
            let (request, start) = (request.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                let until = Instant::now() + ROUND;
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    latencies.push(exchange(&mut client, &request));
                }
                latencies
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let latencies = handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    (latencies, began.elapsed())
}

/// Every latency of a target and the time they took, over all its rounds.
#[derive(Default)]
struct Cell {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Cell {
    fn add(&mut self, (latencies, elapsed): (Vec<Duration>, Duration)) {
        self.latencies.extend(latencies);
        self.elapsed += elapsed;
    }

    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
    }
}

fn measure(direct: &str, proxy: &str, request: &Arc<Vec<u8>>, clients: usize) -> (Cell, Cell) {
    let (mut d, mut p) = (Cell::default(), Cell::default());
    for _ in 0..ROUNDS {
        d.add(run_round(direct, request, clients));
        p.add(run_round(proxy, request, clients));
    }
    (d, p)
}

fn print_row(clients: usize, target: &str, cell: &Cell) {
    println!(
        "{clients:>7}  {target:<13} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>9}",
        cell.rps(),
        cell.percentile_ms(50.0),
        cell.percentile_ms(99.0),
        cell.percentile_ms(100.0),
        cell.latencies.len()
    );
}

fn main() {
    let started = Instant::now();
    let mock = MockUpstream::start().expect("mock upstream");
    let (server, proxy) = start_proxy(&mock, WORKERS);
    let direct = mock.url();
    let request = Arc::new(big_request());
    println!(
        "POST /v1/messages?beta=true, {} byte requests, SSE replies of 10 events; proxy with {WORKERS} workers; {ROUNDS} x {:.1} s per cell",
        request.len(),
        ROUND.as_secs_f64()
    );
    run_round(&proxy, &request, 4); // warm-up: connections, pools, page faults
    println!(
        "{:>7}  {:<13} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "clients", "target", "req/s", "p50 ms", "p99 ms", "max ms", "requests"
    );
    for clients in CONCURRENCY {
        let (d, p) = measure(&direct, &proxy, &request, clients);
        print_row(clients, "direct", &d);
        print_row(clients, "proxy", &p);
        println!(
            "{clients:>7}  {:<13} {:>9.2} {:>9.2} {:>9.2}",
            "proxy/direct",
            p.rps() / d.rps(),
            p.percentile_ms(50.0) / d.percentile_ms(50.0),
            p.percentile_ms(99.0) / d.percentile_ms(99.0)
        );
    }
    server.shutdown(Duration::from_secs(5));
    println!("(run took {:.1} s)", started.elapsed().as_secs_f64());
}
