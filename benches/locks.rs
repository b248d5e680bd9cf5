//! Lock cost (issue 7): what the health mutex and selection cost beside one proxied
//! request, measured in one run. Prints figures and asserts nothing about time.
//!
//! - One health update: `Endpoint::record` (the design: `HealthStatus` behind one
//!   `parking_lot::Mutex`, one lock scope per attempt) against `AtomicHealth` below, a
//!   minimal lock-free variant with the same clock reads, uncontended and with 2, 4 and 8
//!   threads hammering one endpoint (on this 2-core machine, 4 and 8 are oversubscribed).
//!   Contended figures are wall time over all threads' updates: ns per update, as the
//!   endpoint sees them.
//! - Selection: `State::candidates` (enabled, queue lock, health lock per endpoint) and
//!   `Selector::pick` over 10 and 100 endpoints, as `forward` does for each attempt.
//! - One full request: `POST /v1/messages` through the real proxy to the mock over
//!   loopback, sequential on one keep-alive connection (median of several hundred), and
//!   the same straight to the mock, so each cost above can be quoted as a share of it.
//!
//! A plain `Instant` loop rather than criterion: the figures needed are ns per operation
//! and a median, the whole run must stay under a minute on 2 cores, and criterion would
//! add a dependency tree to build. Each figure is the median of 7 rounds.
//!
//! Run: `cargo bench --bench locks` (about 20 s).

use failover_proxy::config::validated::{Config, EndpointConfig, Overrides, Strategy};
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::server::listen::Server;
use failover_proxy::state::endpoint::Endpoint;
use failover_proxy::state::health::{Outcome, Verdict};
use failover_proxy::state::shared::State;
use serde_json::json;
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ROUNDS: usize = 7;
const UPDATES_PER_ROUND: u64 = 200_000;
const SELECTIONS_PER_ROUND: u64 = 20_000;
const REQUESTS: usize = 500;
const MAX_FAILURES: u32 = 3;

/// The lock-free comparison: every field its own atomic. It is not a drop-in design (the
/// fields are not updated together, so a reader can see a total without its failure, and
/// a threshold crossing needs its own compare-exchange), which is what it would trade for
/// whatever the figures show.
#[derive(Default)]
struct AtomicHealth {
    total_requests: AtomicU64,
    failed_requests: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Sum of response times in µs; the mean is this over `total_requests`.
    response_micros: AtomicU64,
    last_check_millis: AtomicU64,
}

impl AtomicHealth {
    /// The same work as `HealthStatus::record` for the outcomes it can express, with the
    /// same two clock reads (`Instant::now` in `Endpoint::record`, `SystemTime::now` for
    /// `last_check`).
    fn record(&self, success: bool, elapsed: Duration) -> Verdict {
        let _now = black_box(Instant::now());
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.total_requests.fetch_add(1, Ordering::Relaxed);
        self.response_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.last_check_millis
            .store(wall.as_millis() as u64, Ordering::Relaxed);
        if success {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return Verdict::Keep;
        }
        self.failed_requests.fetch_add(1, Ordering::Relaxed);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= MAX_FAILURES {
            Verdict::Quarantine
        } else {
            Verdict::Keep
        }
    }
}

fn endpoint_config(i: usize) -> EndpointConfig {
    let base_url = format!("http://127.0.0.1:9/bench-{i}");
    let api_key = format!("sk-bench-{i}-0123456789abcdef");
    let mut config = EndpointConfig::with_defaults(&format!("bench{i}"), &base_url, &api_key)
        .expect("a valid endpoint");
    config.max_failures = MAX_FAILURES;
    config
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// ns per update: `threads` threads each doing `UPDATES_PER_ROUND / threads` updates on the
/// same target at once, wall time over all of them; median of `ROUNDS`.
fn hammer(threads: usize, update: &(dyn Fn() + Sync)) -> f64 {
    let per_thread = UPDATES_PER_ROUND / threads as u64;
    let rounds = (0..ROUNDS).map(|_| {
        let barrier = Barrier::new(threads + 1);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    for _ in 0..per_thread {
                        update();
                    }
                });
            }
            barrier.wait();
            let started = Instant::now();
            // The scope joins every thread before it returns.
            started
        })
        .elapsed()
    });
    median(
        rounds
            .map(|wall| wall.as_nanos() as f64 / (per_thread * threads as u64) as f64)
            .collect(),
    )
}

fn health_updates() -> (f64, Vec<(usize, f64, f64)>) {
    let endpoint = Endpoint::new(endpoint_config(0), ureq::Agent::new_with_defaults());
    let atomic = AtomicHealth::default();
    let elapsed = Duration::from_millis(120);
    let mutex_update = || {
        black_box(endpoint.record(black_box(&Outcome::Success), elapsed));
    };
    let atomic_update = || {
        black_box(atomic.record(black_box(true), elapsed));
    };
    let clock_only = || {
        black_box(Instant::now());
        black_box(SystemTime::now());
    };
    let clocks = hammer(1, &clock_only);
    let rows: Vec<_> = [1, 2, 4, 8]
        .into_iter()
        .map(|threads| {
            (
                threads,
                hammer(threads, &mutex_update),
                hammer(threads, &atomic_update),
            )
        })
        .collect();
    // Every update was counted: the lock lost none while being hammered.
    let expected = UPDATES_PER_ROUND * ROUNDS as u64 * rows.len() as u64;
    assert_eq!(endpoint.health().total_requests, expected);
    (clocks, rows)
}

/// A state with `n` endpoints (one of them queued and one cooling down, so the filters do
/// their work), and the ns of one `candidates` + `pick`, median of `ROUNDS`.
fn selection(n: usize, strategy: Strategy) -> f64 {
    let endpoints: Vec<_> = (0..n)
        .map(|i| {
            json!({"name": format!("e{i}"), "base_url": format!("http://127.0.0.1:9/s{i}"),
                        "api_key": format!("sk-select-{i}-0123456789")})
        })
        .collect();
    let text =
        json!({"listen": "127.0.0.1:0", "strategy": strategy.name(), "endpoints": endpoints});
    let config =
        Config::from_json(&text.to_string(), &Overrides::default(), &|_| None).expect("config");
    let state = State::new(config).expect("state");
    let generation = state.current();
    state.queue.add(generation.endpoints[0].id());
    let until = Instant::now() + Duration::from_secs(3600);
    let limited = Outcome::RateLimited {
        until,
        reason: "429".into(),
    };
    generation.endpoints[1].record(&limited, Duration::ZERO);
    let samples = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..SELECTIONS_PER_ROUND {
                let candidates = state.candidates(&generation, Instant::now());
                black_box(generation.selector.pick(black_box(&candidates)));
            }
            started.elapsed().as_nanos() as f64 / SELECTIONS_PER_ROUND as f64
        })
        .collect();
    median(samples)
}

/// Median µs of `REQUESTS` sequential `POST /v1/messages` to `url` on one connection.
fn request_micros(url: &str) -> f64 {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let body = json!({"model": "claude-bench", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hello"}]})
    .to_string();
    let one = || {
        let started = Instant::now();
        let mut response = agent
            .post(format!("{url}/v1/messages"))
            .header("content-type", "application/json")
            .send(body.as_str())
            .expect("request");
        assert_eq!(response.status().as_u16(), 200);
        black_box(response.body_mut().read_to_vec().expect("body"));
        started.elapsed().as_secs_f64() * 1e6
    };
    for _ in 0..50 {
        one();
    }
    median((0..REQUESTS).map(|_| one()).collect())
}

fn full_requests() -> (f64, f64) {
    let mock = MockUpstream::start().expect("mock");
    let text = json!({"listen": "127.0.0.1:0", "workers": 4,
                      "endpoints": [{"base_url": mock.url(), "api_key": "sk-bench-0123456789"}]});
    let config =
        Config::from_json(&text.to_string(), &Overrides::default(), &|_| None).expect("config");
    let server = Server::start(Arc::new(State::new(config).expect("state"))).expect("server");
    let proxy_url = format!("http://{}", server.addr());
    let mut proxied = Vec::new();
    let mut direct = Vec::new();
    // Alternate, so a machine busy with something else hurts both alike.
    for _ in 0..3 {
        proxied.push(request_micros(&proxy_url));
        direct.push(request_micros(&mock.url()));
    }
    server.shutdown(Duration::from_secs(5));
    (median(proxied), median(direct))
}

fn main() {
    let run_started = Instant::now();
    let (proxied_us, direct_us) = full_requests();
    let request_ns = proxied_us * 1e3;
    let share = |ns: f64| ns / request_ns * 100.0;
    println!("one request, POST /v1/messages, sequential on one keep-alive connection:");
    println!("  through the proxy    {proxied_us:8.1} µs median (of {REQUESTS} x 3 rounds)");
    println!("  direct to the mock   {direct_us:8.1} µs median");
    println!("  the proxy adds       {:8.1} µs", proxied_us - direct_us);

    let (clocks, rows) = health_updates();
    println!();
    println!(
        "one health update, ns per update (wall time over all threads; % of a proxied request):"
    );
    println!("  threads   Mutex<HealthStatus>         atomics");
    for (threads, mutex, atomic) in &rows {
        println!(
            "  {threads:>7}   {mutex:8.1} ns ({:6.3} %)   {atomic:8.1} ns ({:6.3} %)",
            share(*mutex),
            share(*atomic)
        );
    }
    println!("  (of which the two clock reads, uncontended: {clocks:.1} ns)");

    println!();
    println!(
        "selection, State::candidates + Selector::pick, ns per pick (% of a proxied request):"
    );
    for strategy in [Strategy::Weighted, Strategy::LeastConnections] {
        for n in [10, 100] {
            let ns = selection(n, strategy);
            println!(
                "  {:<18} {n:>3} endpoints   {ns:9.1} ns ({:6.3} %)",
                strategy.name(),
                share(ns)
            );
        }
    }
    println!();
    println!("whole run: {:.1} s", run_started.elapsed().as_secs_f64());
}
