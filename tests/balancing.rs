//! Strategies and session affinity through the real proxy (issue 6).

use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::json;

fn named(names: &[&str]) -> Vec<MockUpstream> {
    names
        .iter()
        .map(|n| MockUpstream::start_named(n, Fault::None).unwrap())
        .collect()
}

/// Which upstream answered each of `n` sequential requests.
fn answered_by(url: &str, n: usize, headers: &[(&str, &str)]) -> Vec<String> {
    let client = agent();
    (0..n)
        .map(|_| {
            let answer = send_message(&client, url, headers);
            assert_eq!(answer.status, 200);
            answer.header("x-mock-upstream").unwrap().to_string()
        })
        .collect()
}

#[test]
fn weighted_three_to_one_is_exact_and_spread() {
    let mocks = named(&["heavy", "light"]);
    let config = json!({
        "strategy": "weighted",
        "endpoints": [
            endpoint_json(0, &mocks[0].url(), json!({"weight": 3})),
            endpoint_json(1, &mocks[1].url(), json!({"weight": 1})),
        ],
    });
    let proxy = Proxy::start(&[], config);
    let order = answered_by(&proxy.url, 400, &[]);
    assert_eq!(order.iter().filter(|n| *n == "heavy").count(), 300);
    assert_eq!(order.iter().filter(|n| *n == "light").count(), 100);
    let longest_heavy_run = order
        .split(|n| n == "light")
        .map(|run| run.len())
        .max()
        .unwrap();
    assert!(longest_heavy_run <= 3, "{longest_heavy_run}");
}

#[test]
fn round_robin_alternates_exactly() {
    let mocks = named(&["a", "b"]);
    let proxy = Proxy::start(&[&mocks[0], &mocks[1]], json!({"strategy": "round_robin"}));
    let order = answered_by(&proxy.url, 10, &[]);
    assert_eq!(order, ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b"]);
}

/// One stream held open on `a` (gated): the next request goes to `b`, which has none.
#[test]
fn least_connections_prefers_the_endpoint_with_fewer_open_streams() {
    let a = MockUpstream::start_named("a", Fault::Gated).unwrap();
    let b = MockUpstream::start_named("b", Fault::None).unwrap();
    let proxy = Proxy::start(&[&a, &b], json!({"strategy": "least_connections"}));
    let url = proxy.url.clone();
    let held = std::thread::spawn(move || {
        let body = json!({"model": "m", "max_tokens": 5, "stream": true,
                          "messages": [{"role": "user", "content": "hold"}]});
        post(&url, "/v1/messages", &body.to_string(), &[])
    });
    let in_flight = |i: usize| proxy.endpoint_stats(i)["in_flight"].as_u64().unwrap();
    let settle = |i: usize, n: u64| {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while in_flight(i) != n && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(in_flight(i), n);
    };
    settle(0, 1);
    for _ in 0..5 {
        // The previous answer reached us a moment before its worker let go of `b`: a tie
        // (1 and 1) would go to `a`, so wait for `b` to be idle, as it would be in real life.
        settle(1, 0);
        let answer = send_message(&agent(), &proxy.url, &[]);
        assert_eq!(answer.header("x-mock-upstream"), Some("b"));
    }
    a.set_fault(Fault::None);
    let (status, _) = held.join().unwrap();
    assert_eq!(status, 200);
}

#[test]
fn priority_two_gets_traffic_only_while_priority_one_is_ineligible() {
    let mocks = named(&["p1a", "p1b", "p2"]);
    let config = json!({
        "strategy": "round_robin",
        "recovery_interval": 600,
        "endpoints": [
            endpoint_json(0, &mocks[0].url(), json!({"priority": 1})),
            endpoint_json(1, &mocks[1].url(), json!({"priority": 1})),
            endpoint_json(2, &mocks[2].url(), json!({"priority": 2})),
        ],
    });
    let proxy = Proxy::start(&[], config);
    let order = answered_by(&proxy.url, 6, &[]);
    assert!(!order.contains(&"p2".to_string()), "{order:?}");
    mocks[0].set_fault(Fault::Status(401));
    let order = answered_by(&proxy.url, 6, &[]);
    assert!(order.iter().all(|n| n == "p1b"), "{order:?}");
    mocks[1].set_fault(Fault::Status(401));
    let order = answered_by(&proxy.url, 6, &[]);
    assert!(order.iter().all(|n| n == "p2"), "{order:?}");
    assert_eq!(mocks[2].requests(), 6);
}

fn claude_code_body(session: &str) -> String {
    let user_id = json!({"device_id": "d".repeat(64), "account_uuid": "", "session_id": session});
    json!({"model": "claude-test", "max_tokens": 16, "metadata": {"user_id": user_id.to_string()},
           "messages": [{"role": "user", "content": "hi"}]})
    .to_string()
}

fn answered_by_session(url: &str, session: &str) -> String {
    let client = agent();
    let mut resp = client
        .post(format!("{url}/v1/messages"))
        .header("content-type", "application/json")
        .send(claude_code_body(session))
        .unwrap();
    assert_eq!(resp.status(), 200);
    let name = resp
        .headers()
        .get("x-mock-upstream")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let _ = resp.body_mut().read_to_vec();
    name
}

#[test]
fn a_claude_code_session_stays_on_one_endpoint_and_moves_together() {
    let mocks = named(&["a", "b", "c"]);
    let proxy = Proxy::start(
        &[&mocks[0], &mocks[1], &mocks[2]],
        json!({"strategy": "round_robin", "recovery_interval": 600}),
    );
    let first = answered_by_session(&proxy.url, "session-1");
    for _ in 0..19 {
        assert_eq!(answered_by_session(&proxy.url, "session-1"), first);
    }
    let index = ["a", "b", "c"].iter().position(|n| *n == first).unwrap();
    mocks[index].set_fault(Fault::Status(401));
    let moved = answered_by_session(&proxy.url, "session-1");
    assert_ne!(moved, first);
    for _ in 0..19 {
        assert_eq!(answered_by_session(&proxy.url, "session-1"), moved);
    }
}

#[test]
fn different_sessions_spread_under_weighted() {
    let mocks = named(&["a", "b"]);
    let proxy = Proxy::start(&[&mocks[0], &mocks[1]], json!({"strategy": "weighted"}));
    let names: Vec<String> = (0..20)
        .map(|i| answered_by_session(&proxy.url, &format!("s-{i}")))
        .collect();
    // Equal weights, deterministic SWRR: new sessions alternate.
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 10);
    // And each session sticks to where it started.
    for (i, name) in names.iter().enumerate() {
        assert_eq!(&answered_by_session(&proxy.url, &format!("s-{i}")), name);
    }
}
