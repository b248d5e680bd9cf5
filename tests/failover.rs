//! Failover through the real proxy over loopback: a broken primary in front of a healthy
//! secondary, the 401, 403 and 429 rules, and what the client gets when every attempt failed.

use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Keeps the recovery thread from probing a quarantined endpoint during a test (its first
/// tick comes one interval after start), so every upstream request counted is the proxy's.
const NO_RECOVERY: f64 = 600.0;

fn named(name: &str, fault: Fault) -> MockUpstream {
    MockUpstream::start_named(name, fault).expect("mock upstream")
}

/// A proxy whose primary (ep0) is `primary_url` with `settings`, and whose secondary (ep1)
/// is the healthy mock `secondary`.
fn proxy_with_primary(primary_url: &str, settings: Value, secondary: &MockUpstream) -> Proxy {
    let endpoints = [
        endpoint_json(0, primary_url, settings),
        endpoint_json(1, &secondary.url(), json!({})),
    ];
    Proxy::start(
        &[],
        json!({"endpoints": endpoints, "recovery_interval": NO_RECOVERY}),
    )
}

/// Sends 100 sequential client requests on one kept-alive connection, as Claude Code does,
/// and asserts every one is a 200 from the secondary; returns the proxy, for the caller's
/// checks on the primary, and how long each request took.
fn hundred_requests_all_answered_by_the_secondary(
    primary_url: &str,
    settings: Value,
) -> (Proxy, Vec<Duration>) {
    let secondary = named("secondary", Fault::None);
    let proxy = proxy_with_primary(primary_url, settings, &secondary);
    let client = agent();
    let mut took = Vec::new();
    for n in 0..100 {
        let started = Instant::now();
        let answer = send_message(&client, &proxy.url, &[]);
        took.push(started.elapsed());
        assert_eq!(answer.status, 200, "request {n}: {}", answer.text());
        assert_eq!(
            answer.header("x-mock-upstream"),
            Some("secondary"),
            "request {n}"
        );
        if n < 4 {
            let primary_attempts = &proxy.endpoint_stats(0)["health_status"]["total_requests"];
            assert_eq!(*primary_attempts, (n + 1).min(3), "after request {n}");
        }
    }
    assert_eq!(secondary.requests(), 100);
    (proxy, took)
}

/// The primary got exactly 3 attempts, all failures, and sits in the failure queue.
///
/// Why 3: with max_failures = 3 (the default) and priority_failover, each of the first three
/// client requests tries the primary first; it fails, and the loop then prefers the endpoint
/// this request has tried least, the untried secondary, which answers. So the primary gets
/// one attempt per request (max_attempts_per_endpoint = 2 is never reached; the 100-request
/// loop checks the count after each of the first requests), its third consecutive failure
/// quarantines it, and requests 4 to 100 never reach it.
fn assert_primary_quarantined_after_three_attempts(proxy: &Proxy) {
    let health = &proxy.endpoint_stats(0)["health_status"];
    assert_eq!(health["total_requests"], 3, "{health}");
    assert_eq!(health["failed_requests"], 3, "{health}");
    assert_eq!(health["consecutive_failures"], 3, "{health}");
    let stats = proxy.stats();
    assert_eq!(stats["failed_endpoints"], json!([proxy.id(0)]));
    assert_eq!(stats["failure_queue_stats"]["total_failed"], 1);
}

fn primary_fault_fails_over_to_the_secondary(fault: Fault) {
    let primary = named("primary", fault);
    let (proxy, _) = hundred_requests_all_answered_by_the_secondary(&primary.url(), json!({}));
    assert_eq!(primary.requests(), 3);
    assert_primary_quarantined_after_three_attempts(&proxy);
}

#[test]
fn primary_500_fails_over_and_100_requests_get_200_from_the_secondary() {
    primary_fault_fails_over_to_the_secondary(Fault::Status(500));
}

#[test]
fn primary_529_fails_over_and_100_requests_get_200_from_the_secondary() {
    primary_fault_fails_over_to_the_secondary(Fault::Status(529));
}

/// A 200 whose JSON body is Anthropic's error shape (a relay that wraps an upstream
/// error) is a failure like a 529: the client never sees it.
#[test]
fn primary_200_with_an_error_inside_fails_over_and_100_requests_get_200_from_the_secondary() {
    let primary = named("primary", Fault::SoftError200);
    let (proxy, _) = hundred_requests_all_answered_by_the_secondary(&primary.url(), json!({}));
    assert_eq!(primary.requests(), 3);
    assert_primary_quarantined_after_three_attempts(&proxy);
    let health = &proxy.endpoint_stats(0)["health_status"];
    let last_error = health["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("with an error inside"), "{health}");
}

#[test]
fn primary_connection_refused_fails_over_and_100_requests_get_200_from_the_secondary() {
    let (proxy, _) = hundred_requests_all_answered_by_the_secondary(&refused_url(), json!({}));
    assert_primary_quarantined_after_three_attempts(&proxy);
}

#[test]
fn primary_hanging_past_its_timeout_fails_over_and_100_requests_get_200_from_the_secondary() {
    let primary = named("primary", Fault::Hang);
    let settings = json!({"timeout": 0.5});
    let (proxy, took) = hundred_requests_all_answered_by_the_secondary(&primary.url(), settings);
    assert_eq!(primary.requests(), 3);
    assert_primary_quarantined_after_three_attempts(&proxy);
    // The first three waited out the primary's 0.5 s before failing over. (No upper bound
    // here: the client's 30 s timeout catches a proxy that ignores `timeout`.)
    for (n, t) in took[..3].iter().enumerate() {
        assert!(*t >= Duration::from_millis(500), "request {n} took {t:?}");
    }
    let health = &proxy.endpoint_stats(0)["health_status"];
    let last_error = health["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("timed out"), "{health}");
}

#[test]
fn a_401_puts_the_endpoint_in_the_failure_queue_after_one_request() {
    let primary = named("primary", Fault::Status(401));
    let secondary = named("secondary", Fault::None);
    let proxy = proxy_with_primary(&primary.url(), json!({}), &secondary);
    let mark = log_mark();
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-mock-upstream"), Some("secondary"));
    let stats = proxy.stats();
    assert_eq!(stats["failed_endpoints"], json!([proxy.id(0)]));
    assert_eq!(stats["failure_queue_stats"]["total_failed"], 1);
    let queued = log_lines_since(mark, &["entered the failure queue", &proxy.id(0)]);
    assert_eq!(queued.len(), 1, "{queued:?}");
    // Quarantined: the next request does not touch it.
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.header("x-mock-upstream"), Some("secondary"));
    assert_eq!((primary.requests(), secondary.requests()), (1, 2));
}

/// A health record as a never-used endpoint has it.
fn assert_untouched(health: &Value) {
    assert_eq!(health["status"], "unknown", "{health}");
    assert_eq!(health["total_requests"], 0, "{health}");
    assert_eq!(health["failed_requests"], 0, "{health}");
    assert_eq!(health["consecutive_failures"], 0, "{health}");
    assert_eq!(health["last_error"], Value::Null, "{health}");
}

#[test]
fn a_403_fails_over_and_leaves_the_first_endpoints_health_untouched() {
    let primary = named("primary", Fault::Status(403));
    let secondary = named("secondary", Fault::None);
    let proxy = proxy_with_primary(&primary.url(), json!({}), &secondary);
    let before = proxy.endpoint_stats(0)["health_status"].clone();
    assert_untouched(&before);
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-mock-upstream"), Some("secondary"));
    assert_eq!((primary.requests(), secondary.requests()), (1, 1));
    let primary_stats = proxy.endpoint_stats(0);
    assert_eq!(primary_stats["health_status"], before);
    assert_eq!(primary_stats["cooldown_until"], Value::Null);
    assert_eq!(primary_stats["is_healthy"], true);
    let stats = proxy.stats();
    assert_eq!(stats["failed_endpoints"], json!([]));
    assert_eq!(stats["failure_queue_stats"]["total_failed"], 0);
    // Neither queued nor cooling: the next request asks the primary first again.
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.header("x-mock-upstream"), Some("secondary"));
    assert_eq!((primary.requests(), secondary.requests()), (2, 2));
    assert_eq!(proxy.endpoint_stats(0)["health_status"], before);
}

#[test]
fn when_every_endpoint_answers_403_the_client_gets_the_last_403_as_it_came() {
    let first = named("first", Fault::Status(403));
    let second = named("second", Fault::Status(403));
    let proxy = two_failing_endpoints(&first.url(), &second.url());
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.status, 403, "{}", answer.text());
    assert_eq!(answer.header("x-mock-upstream"), Some("second"));
    let expected =
        json!({"type": "error", "error": {"type": "permission_error", "message": "mock fault"}});
    assert_eq!(answer.json(), expected);
    // A 403 is not retried on the endpoint that gave it: one attempt each.
    assert_eq!((first.requests(), second.requests()), (1, 1));
    let stats = proxy.stats();
    assert_eq!(stats["failed_requests"], 1);
    assert_eq!(stats["failed_endpoints"], json!([]));
    for i in 0..2 {
        assert_untouched(&proxy.endpoint_stats(i)["health_status"]);
    }
}

#[test]
fn a_429_with_retry_after_2_skips_the_endpoint_for_2_seconds_then_uses_it_again() {
    let limited = Fault::RateLimited {
        retry_after: Some("2".into()),
    };
    let primary = named("primary", limited);
    let secondary = named("secondary", Fault::None);
    let proxy = proxy_with_primary(&primary.url(), json!({}), &secondary);
    let sent = Instant::now();
    let answer = send_message(&agent(), &proxy.url, &[]);
    let answered = Instant::now();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-mock-upstream"), Some("secondary"));
    assert_eq!(primary.requests(), 1);
    // The cooldown began after `sent` and before `answered`: it ends 2 s after a moment
    // between them.
    let endpoint = proxy.state.current().endpoints[0].clone();
    let until = endpoint
        .health()
        .cooldown_until
        .expect("the primary cools down");
    assert!(sent + Duration::from_secs(2) <= until, "{until:?}");
    assert!(until <= answered + Duration::from_secs(2), "{until:?}");
    assert!(proxy.endpoint_stats(0)["cooldown_until"].is_string());
    // Eligible again exactly when the cooldown ends, and not a moment before.
    let just_before = until - Duration::from_millis(1);
    assert!(!proxy.state.is_eligible(&endpoint, just_before));
    assert!(proxy.state.is_eligible(&endpoint, until));
    // Requests meanwhile go to the secondary. A request whose answer came before `until`
    // was routed during the cooldown; a later one (a very slow machine) proves nothing
    // either way and is not checked. The primary's count is read before the clock, so
    // when the clock says "before until", no request reached it during the cooldown.
    for n in 0..5 {
        let answer = send_message(&agent(), &proxy.url, &[]);
        let primary_requests = primary.requests();
        if Instant::now() < until {
            assert_eq!(answer.header("x-mock-upstream"), Some("secondary"), "{n}");
            assert_eq!(
                primary_requests, 1,
                "the primary was used while cooling down"
            );
        }
    }
    assert_eq!(
        proxy.stats()["failed_endpoints"],
        json!([]),
        "a 429 must not queue the endpoint"
    );
    // After the cooldown the primary is first again (priority_failover).
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    primary.set_fault(Fault::None);
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-mock-upstream"), Some("primary"));
    assert_eq!(primary.requests(), 2);
}

/// Issue 12: this date overflowed the clock arithmetic and panicked the worker, so the
/// client got nothing and the healthy secondary was never tried.
#[test]
fn a_429_whose_retry_after_overflows_the_clock_fails_over_and_cools_down_at_most_a_day() {
    let limited = Fault::RateLimited {
        retry_after: Some("Wed, 21 Oct 400000000000 07:28:00 GMT".into()),
    };
    let primary = named("primary", limited);
    let secondary = named("secondary", Fault::None);
    let endpoints = [
        endpoint_json(0, &primary.url(), json!({})),
        endpoint_json(1, &secondary.url(), json!({})),
    ];
    let config = json!({"endpoints": endpoints, "recovery_interval": NO_RECOVERY,
                        "rate_limit_cooldown": 600});
    let proxy = Proxy::start(&[], config);
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-mock-upstream"), Some("secondary"));
    assert_eq!((primary.requests(), secondary.requests()), (1, 1));
    // Alive, and the primary is skipped while it cools down.
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.header("x-mock-upstream"), Some("secondary"));
    assert_eq!((primary.requests(), secondary.requests()), (1, 2));
    // The date is not a date: the cooldown is rate_limit_cooldown, within MAX_COOLDOWN.
    let until = proxy.state.current().endpoints[0]
        .health()
        .cooldown_until
        .expect("the primary cools down");
    let now = Instant::now();
    assert!(until <= now + failover_proxy::upstream::call::MAX_COOLDOWN);
    assert!(
        until <= now + Duration::from_secs(600),
        "not rate_limit_cooldown"
    );
    let primary_stats = proxy.endpoint_stats(0);
    let health = &primary_stats["health_status"];
    assert_eq!(health["failed_requests"], 1, "{health}");
    assert_eq!(health["consecutive_failures"], 0, "{health}");
    assert_eq!(
        health["last_error"], "HTTP 429 (rate_limit_error): rate limited",
        "{health}"
    );
    assert!(
        primary_stats["cooldown_until"].is_string(),
        "{primary_stats}"
    );
    assert_eq!(proxy.stats()["failed_endpoints"], json!([]));
}

/// Two endpoints that fail on every attempt but stay eligible (max_failures far away).
fn two_failing_endpoints(first: &str, second: &str) -> Proxy {
    let eligible = json!({"max_failures": 1000});
    let endpoints = [
        endpoint_json(0, first, eligible.clone()),
        endpoint_json(1, second, eligible),
    ];
    Proxy::start(
        &[],
        json!({"endpoints": endpoints, "recovery_interval": NO_RECOVERY}),
    )
}

#[test]
fn when_every_attempt_fails_the_client_gets_the_last_upstream_response() {
    let first = named("first", Fault::Status(500));
    let second = named("second", Fault::Status(503));
    let proxy = two_failing_endpoints(&first.url(), &second.url());
    let answer = send_message(&agent(), &proxy.url, &[]);
    // Attempts: first, second, first again, second again (max_attempts_per_endpoint = 2);
    // the last one is the second's 503, passed on with its own body and headers.
    assert_eq!((first.requests(), second.requests()), (2, 2));
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.header("x-mock-upstream"), Some("second"));
    let expected =
        json!({"type": "error", "error": {"type": "api_error", "message": "mock fault"}});
    assert_eq!(answer.json(), expected);
}

/// `{"type":"error","error":{"type":<kind>,"message":<text>}}` and nothing else; returns the kind.
fn assert_anthropic_error_shape(answer: &Answer) -> String {
    let body = answer.json();
    let object = body.as_object().expect("an object");
    assert_eq!(object.len(), 2, "{body}");
    assert_eq!(body["type"], "error", "{body}");
    let error = body["error"].as_object().expect("error is an object");
    assert_eq!(error.len(), 2, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    error["type"]
        .as_str()
        .expect("error.type is a string")
        .to_string()
}

#[test]
fn when_no_upstream_answers_at_all_the_client_gets_502_in_anthropic_error_shape() {
    let resets = named("resets", Fault::Reset);
    let proxy = two_failing_endpoints(&refused_url(), &resets.url());
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(assert_anthropic_error_shape(&answer), "api_error");
    // Every attempt was made: 2 per endpoint.
    assert_eq!(resets.requests(), 2);
    assert_eq!(
        proxy.endpoint_stats(0)["health_status"]["total_requests"],
        2
    );
}

#[test]
fn with_every_endpoint_quarantined_one_attempt_goes_to_the_earliest_queued_then_503() {
    let first = named("first", Fault::Status(500));
    let second = named("second", Fault::Status(500));
    let once = json!({"max_failures": 1});
    let endpoints = [
        endpoint_json(0, &first.url(), once.clone()),
        endpoint_json(1, &second.url(), once),
    ];
    let config = json!({"endpoints": endpoints, "recovery_interval": NO_RECOVERY});
    let proxy = Proxy::start(&[], config);
    // First request: first fails (queued), second fails (queued): the last response.
    assert_eq!(send_message(&agent(), &proxy.url, &[]).status, 500);
    assert_eq!((first.requests(), second.requests()), (1, 1));
    // Nothing is eligible: one attempt on the endpoint queued earliest, then 503.
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(assert_anthropic_error_shape(&answer), "overloaded_error");
    assert_eq!((first.requests(), second.requests()), (2, 1));
}
