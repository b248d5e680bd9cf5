//! The threaded end-to-end stress suite of issue 7: many clients through the real proxy to
//! three mock upstreams whose fault changes under them (healthy → 500 → hang → 429 →
//! healthy), with recovery rounds every 100 ms racing the traffic. The run is bounded in
//! time and in count; the checks at the end are exact, not statistical:
//!
//! - every request got one complete answer (a JSON body that parses, or an event stream
//!   that ends with `message_stop` or an `error` event), and the proxy counted each once;
//! - per endpoint, attempts recorded in its health + probes sent to it = requests its mock
//!   received, and the mock's successes + failures = its requests;
//! - over all endpoints, the mocks' failures not recorded in health are exactly the probes
//!   that failed (`total_still_failed`), their successes likewise the probes that passed;
//! - queue entries (`total_failed`) = "entered the failure queue" lines = "recovered" lines
//!   = `total_recovered` once the queue is empty;
//! - after the mocks are healthy again and a forced recovery round, nothing is queued.

use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const CLIENTS: usize = 20;
/// A bound on each client's requests, besides the time the faults take to play out.
const MAX_REQUESTS_PER_CLIENT: usize = 5_000;
/// How long each fault lasts on a mock; the mocks are a step apart in the cycle.
const STEP: Duration = Duration::from_millis(250);
const CYCLES: usize = 2;
/// The endpoints' `timeout`. Far longer than a step: a hung attempt ends when its mock's
/// fault changes (the mock closes it, a failure before the headers). And far longer than a
/// busy machine may stall a thread: with 0.5 s, an attempt sometimes timed out before its
/// body was sent ("timed out (send body)"), so the proxy recorded an attempt that the mock,
/// which counts whole requests, never saw.
const TIMEOUT_SECONDS: f64 = 5.0;

/// Per endpoint. The queue holds the first and last out of service through their hang
/// step; the second is never queued, so its hang and 429 steps meet client traffic.
const MAX_FAILURES: [u32; 3] = [3, 1_000_000, 10];

/// Each mock's faults in turn, healthy for two steps; mock i starts i steps in, so most
/// steps have a healthy mock and one step has none.
fn cycle() -> [Fault; 5] {
    [
        Fault::None,
        Fault::None,
        Fault::Status(500),
        Fault::Hang,
        Fault::RateLimited { retry_after: None },
    ]
}

/// Sets each mock's fault for every step of `CYCLES` cycles, then all of them healthy.
fn play_faults(mocks: &[MockUpstream]) {
    let faults = cycle();
    for step in 0..CYCLES * faults.len() {
        for (i, mock) in mocks.iter().enumerate() {
            mock.set_fault(faults[(step + i) % faults.len()].clone());
        }
        std::thread::sleep(STEP);
    }
    for mock in mocks {
        mock.set_fault(Fault::None);
    }
}

/// The answers a client may get: an upstream's, or the proxy's 502 (no upstream answered)
/// or 503 (no endpoint eligible).
const STATUSES: [u16; 5] = [200, 429, 500, 502, 503];

/// What one client saw.
#[derive(Default)]
struct Tally {
    sent: u64,
    answered: u64,
    ok: u64,
    /// Answers by status: 200, 429, 500, 502, 503.
    statuses: [u64; 5],
}

/// Sends requests until `stop` (or the count bound), every third one streamed; each
/// answer must be whole.
fn client(url: &str, thread: usize, stop: &AtomicBool) -> Tally {
    let agent = agent();
    let mut tally = Tally::default();
    for n in 0..MAX_REQUESTS_PER_CLIENT {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = (thread + n).is_multiple_of(3);
        let body = json!({"model": "claude-test", "max_tokens": 16, "stream": stream,
                          "messages": [{"role": "user", "content": format!("c{thread} r{n}")}]});
        tally.sent += 1;
        let mut response = agent
            .post(format!("{url}/v1/messages"))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap_or_else(|e| panic!("client {thread} request {n}: {e}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = response
            .body_mut()
            .read_to_vec()
            .unwrap_or_else(|e| panic!("client {thread} request {n} ({status}): body: {e}"));
        let text = String::from_utf8_lossy(&body);
        let context = format!("client {thread} request {n}: {status} {content_type}: {text}");
        let Some(kind) = STATUSES.iter().position(|&s| s == status) else {
            panic!("unexpected status: {context}");
        };
        tally.statuses[kind] += 1;
        if content_type.starts_with("text/event-stream") {
            assert!(stream && status == 200, "{context}");
            let last = last_event_name(&text);
            assert!(
                last == Some("message_stop") || last == Some("error"),
                "{context}"
            );
        } else {
            let value: Value = serde_json::from_slice(&body).expect(&context);
            let kind = if status == 200 { "message" } else { "error" };
            assert_eq!(value["type"], kind, "{context}");
        }
        tally.answered += 1;
        tally.ok += u64::from(status == 200);
    }
    tally
}

/// The name of the last event of a complete event stream (one that ends with a blank line).
fn last_event_name(text: &str) -> Option<&str> {
    let text = text.strip_suffix("\n\n")?;
    let last = text.rsplit("\n\n").next()?;
    last.lines()
        .find_map(|l| l.strip_prefix("event:"))
        .map(str::trim)
}

fn number(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a count: {value}"))
}

/// Per endpoint: (attempts recorded in its health, failed ones, probes sent to it).
fn health_and_probes(stats: &Value, id: &str) -> (u64, u64, u64) {
    let health = &endpoint_in(stats, id)["health_status"];
    let probes = number(&stats["endpoint_verify_counts"][id]);
    (
        number(&health["total_requests"]),
        number(&health["failed_requests"]),
        probes,
    )
}

/// Stats once every request the mocks received is accounted for, as an attempt or as a
/// probe, and every probe result is applied. A probe the mock has counted may still be on
/// its way back to a recovery round that began before the forced one emptied the queue,
/// and `recovery::apply` counts a probe on the endpoint before it counts it in the queue
/// stats; so this waits for both (bounded). It never waits for a relation to stop
/// overshooting, which would be a bug.
fn settled_stats(proxy: &Proxy, mocks: &[MockUpstream], ids: &[String]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = proxy.stats();
        let mut probes_total = 0;
        let received = mocks.iter().zip(ids).all(|(m, id)| {
            let (attempts, _, probes) = health_and_probes(&stats, id);
            probes_total += probes;
            attempts + probes == m.requests()
        });
        let verified = number(&stats["failure_queue_stats"]["total_verified"]);
        let settled = received && verified == probes_total;
        if settled || Instant::now() > deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stress_faults_changing_under_traffic_and_http_probe_rounds_count_exactly() {
    run(json!({"strategy": "round_robin", "probe": {"kind": "http"}}));
}

#[test]
fn stress_faults_changing_under_traffic_and_conversation_probe_rounds_count_exactly() {
    run(json!({"strategy": "least_connections", "probe": {"kind": "conversation"}}));
}

/// One stress run; `settings` (strategy, probe) are merged into the config.
fn run(settings: Value) {
    let mocks: Vec<MockUpstream> = (0..3)
        .map(|i| MockUpstream::start_named(&format!("ep{i}"), Fault::None).expect("mock"))
        .collect();
    let endpoints: Vec<Value> = mocks
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let settings = json!({"timeout": TIMEOUT_SECONDS, "max_failures": MAX_FAILURES[i]});
            endpoint_json(i, &m.url(), settings)
        })
        .collect();
    let mut config = json!({
        "endpoints": endpoints, "workers": 24,
        "recovery_interval": 0.1, "recovery_max_interval": 0.2, "rate_limit_cooldown": 0.3,
    });
    for (k, v) in settings.as_object().expect("settings") {
        config[k] = v.clone();
    }
    let proxy = Proxy::start(&[], config);
    let mark = log_mark();
    let ids: Vec<String> = (0..mocks.len()).map(|i| proxy.id(i)).collect();

    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let (url, stop) = (&proxy.url, &stop);
                scope.spawn(move || client(url, t, stop))
            })
            .collect();
        play_faults(&mocks);
        // Some traffic on the healthy mocks before the clients stop.
        std::thread::sleep(STEP);
        stop.store(true, Ordering::SeqCst);
        clients
            .into_iter()
            .map(|c| c.join().expect("client thread"))
            .collect()
    });
    let sent: u64 = tallies.iter().map(|t| t.sent).sum();
    let answered: u64 = tallies.iter().map(|t| t.answered).sum();
    let ok: u64 = tallies.iter().map(|t| t.ok).sum();
    let mut statuses = [0u64; 5];
    for t in &tallies {
        for (all, n) in statuses.iter_mut().zip(t.statuses) {
            *all += n;
        }
    }
    assert_eq!(answered, sent);
    assert!(
        sent >= CLIENTS as u64,
        "{sent} requests in {:?}",
        started.elapsed()
    );

    // Every request is counted before its answer is written (`failover::served`, then
    // `deliver`), so the counts below need no wait; an attempt streamed to the client is
    // recorded only after its last piece, which `settled_stats` waits for.
    let (status, body) = post(&proxy.url, "/__qcc__/queue/retry", "", &[]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let stats = settled_stats(&proxy, &mocks, &ids);
    let context = format!("{sent} requests ({ok} ok): {stats:#}");
    assert_eq!(number(&stats["total_requests"]), sent, "{context}");
    assert_eq!(number(&stats["successful_requests"]), ok, "{context}");
    assert_eq!(number(&stats["failed_requests"]), sent - ok, "{context}");
    assert_eq!(stats["failed_endpoints"], json!([]), "{context}");
    assert_eq!(stats["failure_queue_size"], 0, "{context}");

    let (mut unrecorded_failures, mut unrecorded_successes, mut probes_total) = (0, 0, 0);
    for (i, (mock, id)) in mocks.iter().zip(&ids).enumerate() {
        assert_eq!(mock.fault(), Fault::None);
        assert_eq!(mock.client_errors(), 0, "ep{i}");
        assert_eq!(mock.successes() + mock.failures(), mock.requests(), "ep{i}");
        let (attempts, failed, probes) = health_and_probes(&stats, id);
        assert_eq!(attempts + probes, mock.requests(), "ep{i}: {context}");
        // What the mock saw but health did not record can only be this endpoint's probes
        // (the two checks above make these add up to `probes`); which of them failed is
        // checked against the queue's counts below.
        let failures = mock.failures() - failed;
        let successes = mock.successes() - (attempts - failed);
        unrecorded_failures += failures;
        unrecorded_successes += successes;
        probes_total += probes;
    }
    let queue = &stats["failure_queue_stats"];
    let context = format!(
        "{context}\nmocks (requests, successes, failures): {:?}",
        mocks
            .iter()
            .map(|m| (m.requests(), m.successes(), m.failures()))
            .collect::<Vec<_>>()
    );
    assert_eq!(number(&queue["total_verified"]), probes_total, "{context}");
    assert_eq!(
        number(&queue["total_still_failed"]),
        unrecorded_failures,
        "{context}"
    );
    assert_eq!(
        number(&queue["total_recovered"]),
        unrecorded_successes,
        "{context}"
    );

    let lines_for = |what: &str| -> u64 {
        let count = ids
            .iter()
            .map(|id| log_lines_since(mark, &[what, id.as_str()]).len())
            .sum::<usize>();
        count as u64
    };
    let total_failed = number(&queue["total_failed"]);
    let total_recovered = number(&queue["total_recovered"]);
    // Each line is logged a moment after the count it reports moved (`state::record_attempt`,
    // `recovery::apply`): wait for them (bounded), then compare exactly.
    let entered_line = "entered the failure queue";
    let recovered_line = "recovered and is back in service";
    wait_until("every queue entry and every recovery is logged", || {
        lines_for(entered_line) >= total_failed && lines_for(recovered_line) >= total_recovered
    });
    let (entered, recovered) = (lines_for(entered_line), lines_for(recovered_line));
    assert_eq!(total_failed, entered, "{context}");
    // Nothing but a passed probe took an endpoint out, and the queue is empty.
    assert_eq!(total_failed, recovered, "{context}");
    // A passed probe counts only when it takes the endpoint out (`FailureQueue::record_probe`),
    // and the schedule's claim keeps an overlapping round from probing it again.
    assert_eq!(total_recovered, recovered, "{context}");
    eprintln!(
        "stress {settings}: {sent} requests in {:?}, by status {STATUSES:?}: {statuses:?}; \
         {total_failed} queue entries, {probes_total} probes ({unrecorded_successes} passed)",
        started.elapsed()
    );
    assert!(
        total_failed > 0,
        "the faults never queued an endpoint: {context}"
    );
}
