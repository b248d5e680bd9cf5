//! Forwarding and failover through the real proxy over loopback.

use crate::support::*;
use failover_proxy::mock::Fault;
use serde_json::json;

#[test]
fn forwards_to_a_healthy_endpoint_with_its_key() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    let (status, body) = post_message(&proxy.url, &[("x-api-key", "client-key")]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let rec = up.recorded();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].header("x-api-key"), Some(key(0).as_str()));
    assert_eq!(rec[0].header("authorization"), Some(format!("Bearer {}", key(0)).as_str()));
    assert_eq!(rec[0].header("anthropic-version"), Some("2023-06-01"));
}

/// `idle_timeout` bounds the wait for each body piece (here the first SSE event, 1 s late),
/// while the endpoint's `timeout` alone bounds the wait for headers.
#[test]
fn idle_timeout_cuts_a_silent_stream_and_fails_over() {
    let slow = mock(Fault::None);
    let fast = failover_proxy::mock::MockUpstream::start_named("fast", Fault::None).unwrap();
    let proxy = Proxy::start(&[&slow, &fast], json!({"idle_timeout": 0.3}));
    let body = json!({"model": "m", "max_tokens": 5, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let (status, answer) = post(
        &proxy.url,
        "/v1/messages",
        &body,
        &[("x-mock-delay-ms", "1000")],
    );
    // The header applies to both endpoints, so both time out; both failures are recorded.
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&answer));
    let h = proxy.endpoint_stats(0)["health_status"].clone();
    assert_eq!(h["failed_requests"], 2);
    assert!(h["last_error"].as_str().unwrap().contains("idle_timeout"), "{h}");
}
