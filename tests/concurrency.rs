//! Exact accounting under concurrency: qcc's scenario (requests failing on the same
//! endpoints at the same moment), counts that add up exactly under random faults through
//! the real proxy, and stress tests of the health and queue locks on the library types.

use crate::support::*;
use failover_proxy::config::validated::{Config, EndpointConfig, Overrides};
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use failover_proxy::state::endpoint::Endpoint;
use failover_proxy::state::health::Outcome;
use failover_proxy::state::shared::State;
use serde_json::{Value, json};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Runs `work(thread index)` on `threads` threads released together by a barrier; the
/// results in thread order.
fn run_together<T: Send>(threads: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (&barrier, &work);
                scope.spawn(move || {
                    barrier.wait();
                    work(t)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    })
}

#[test]
fn qcc_scenario_10_simultaneous_requests_on_2_failing_endpoints_queue_each_exactly_once() {
    let first = mock(Fault::Status(500));
    let second = mock(Fault::Status(500));
    let proxy = Proxy::start(&[&first, &second], json!({"recovery_interval": 600}));
    let mark = log_mark();
    let statuses = run_together(10, |_| send_message(&agent(), &proxy.url, &[]).status);
    // The last upstream response, or 503 for a request that found both already queued.
    assert!(
        statuses.iter().all(|s| [500, 503].contains(s)),
        "{statuses:?}"
    );
    let stats = proxy.stats();
    let mut ids = vec![proxy.id(0), proxy.id(1)];
    ids.sort();
    assert_eq!(stats["failed_endpoints"], json!(ids));
    assert_eq!(stats["failure_queue_size"], 2);
    assert_eq!(stats["failure_queue_stats"]["total_failed"], 2);
    for id in &ids {
        let lines = log_lines_since(mark, &["entered the failure queue", id]);
        assert_eq!(lines.len(), 1, "{id}: {lines:?}");
    }
}

const CLIENT_THREADS: usize = 32;
const REQUESTS_PER_THREAD: usize = 50;
const FAULTS: [&str; 4] = ["none", "500", "529", "reset"];

/// splitmix64: a seeded, reproducible stream of choices.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the client must get for a request carrying `x-mock-fault: fault`, which every
/// endpoint applies: 200, the last upstream's 5xx, or 502 when none answered.
fn expected_status(fault: &str) -> u16 {
    match fault {
        "none" => 200,
        "reset" => 502,
        status => status.parse().expect("a status"),
    }
}

/// One client thread: 50 requests on one kept-alive connection with seeded random faults,
/// each answer checked; returns how many carried a fault.
fn client_with_random_faults(url: &str, thread: usize) -> u64 {
    let client = agent();
    let mut rng = 0x5eed_0000 + thread as u64;
    let mut faulted = 0;
    for n in 0..REQUESTS_PER_THREAD {
        let fault = FAULTS[(next_random(&mut rng) % FAULTS.len() as u64) as usize];
        let answer = send_message(&client, url, &[("x-mock-fault", fault)]);
        let context = format!("thread {thread} request {n} ({fault})");
        assert_eq!(
            answer.status,
            expected_status(fault),
            "{context}: {}",
            answer.text()
        );
        faulted += u64::from(fault != "none");
    }
    faulted
}

#[test]
fn random_faults_from_32_threads_of_50_requests_count_exactly_per_endpoint_and_in_total() {
    let mocks: Vec<MockUpstream> = (0..3)
        .map(|i| MockUpstream::start_named(&format!("ep{i}"), Fault::None).expect("mock"))
        .collect();
    let never_queued = json!({"max_failures": 1_000_000});
    let endpoints: Vec<Value> = mocks
        .iter()
        .enumerate()
        .map(|(i, m)| endpoint_json(i, &m.url(), never_queued.clone()))
        .collect();
    // weighted spreads first attempts over all 3; one attempt per endpoint keeps it fast
    // (no back-off sleeps).
    let config = json!({"endpoints": endpoints, "workers": 32, "strategy": "weighted",
                        "max_attempts_per_endpoint": 1, "recovery_interval": 600});
    let proxy = Proxy::start(&[], config);
    let faulted: u64 = run_together(CLIENT_THREADS, |t| client_with_random_faults(&proxy.url, t))
        .iter()
        .sum();
    let total = (CLIENT_THREADS * REQUESTS_PER_THREAD) as u64;
    // Final once every client has its answers: the proxy counts a request before it writes
    // the answer (`failover::served`, then `deliver`), and records each attempt before it
    // writes anything (a JSON body is read whole first, an error answer is kept back).
    let stats = proxy.stats();
    assert_eq!(stats["total_requests"], total);
    assert_eq!(stats["successful_requests"], total - faulted);
    assert_eq!(stats["failed_requests"], faulted);
    for (i, m) in mocks.iter().enumerate() {
        let health = &endpoint_in(&stats, &proxy.id(i))["health_status"];
        assert_eq!(health["total_requests"], m.requests(), "ep{i}: {health}");
        assert_eq!(health["failed_requests"], m.failures(), "ep{i}: {health}");
    }
    // A faulted request fails on all 3 endpoints; any other succeeds on its first attempt.
    let upstream_requests: u64 = mocks.iter().map(MockUpstream::requests).sum();
    assert_eq!(upstream_requests, (total - faulted) + 3 * faulted);
    assert_eq!(stats["failed_endpoints"], json!([]));
}

fn stress_endpoint() -> Endpoint {
    let config = EndpointConfig::with_defaults(
        "stress",
        "http://127.0.0.1:9/health-stress",
        "sk-stress-key-0123456789abcdef",
    )
    .expect("a valid endpoint");
    Endpoint::new(config, ureq::Agent::new_with_defaults())
}

/// Thread t's i-th outcome: every other one a success, the rest each kind of failure in
/// turn, starting with a different kind on each thread.
fn stress_outcome(t: usize, i: usize) -> Outcome {
    let reason = || "HTTP 500".to_string();
    if i.is_multiple_of(2) {
        return Outcome::Success;
    }
    match (t + i / 2) % 3 {
        0 => Outcome::Failure(reason()),
        1 => Outcome::AuthFailure(reason()),
        _ => Outcome::RateLimited {
            until: Instant::now(),
            reason: reason(),
        },
    }
}

#[test]
fn health_updates_from_64_threads_of_10000_count_exactly() {
    let endpoint = stress_endpoint();
    let failed: u64 = run_together(64, |t| {
        let mut failed = 0;
        for i in 0..10_000 {
            let outcome = stress_outcome(t, i);
            endpoint.record(&outcome, Duration::from_millis(10));
            failed += u64::from(outcome != Outcome::Success);
        }
        failed
    })
    .iter()
    .sum();
    let health = endpoint.health();
    assert_eq!(health.total_requests, 640_000);
    assert_eq!(health.failed_requests, failed);
    assert_eq!(failed, 320_000);
    assert_eq!(health.success_rate(), 50.0);
}

#[test]
fn failures_recorded_from_64_threads_queue_the_endpoint_once_and_log_it_once() {
    let text = r#"{"listen": "127.0.0.1:0", "endpoints": [{"base_url": "http://127.0.0.1:9/state-stress",
                   "api_key": "sk-state-stress-0123456789"}]}"#;
    let config = Config::from_json(text, &Overrides::default(), &|_| None).expect("config");
    let state = State::new(config).expect("state");
    capture_logs();
    let mark = log_mark();
    let endpoint = state.current().endpoints[0].clone();
    run_together(64, |_| {
        for _ in 0..200 {
            let failure = Outcome::Failure("HTTP 500".into());
            state.record(&endpoint, &failure, Duration::from_millis(1));
        }
    });
    let (queued, queue_stats) = state.queue.snapshot();
    assert_eq!(queued, vec![endpoint.id()]);
    assert_eq!(queue_stats.total_failed, 1);
    let health = endpoint.health();
    assert_eq!(
        (health.total_requests, health.failed_requests),
        (12_800, 12_800)
    );
    assert_eq!(health.consecutive_failures, 12_800);
    let id = endpoint.id().to_string();
    let lines = log_lines_since(mark, &["entered the failure queue", &id]);
    assert_eq!(lines.len(), 1, "{lines:?}");
}
