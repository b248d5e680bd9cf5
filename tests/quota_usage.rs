//! Quota-aware routing and token usage through the real proxy: rate-limit headers move
//! traffic before a 429, a rejected subscription waits for its unified reset, and every
//! answer's usage is counted exactly, per endpoint and model, in stats and metrics.

use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use failover_proxy::time::iso8601;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn named(name: &str, fault: Fault) -> MockUpstream {
    MockUpstream::start_named(name, fault).expect("mock upstream")
}

/// The usage every answer of these tests reports (the mock's `x-mock-usage`).
const USAGE: &str = "input=25,output=15,cache_creation=7,cache_read=11";

fn stream_body() -> String {
    json!({"model": "claude-test", "max_tokens": 16, "stream": true,
           "messages": [{"role": "user", "content": "hello"}]})
    .to_string()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn ten_json_answers_and_ten_streams_are_counted_exactly() {
    clear_of_midnight_utc();
    let upstream = named("counted", Fault::None);
    let proxy = Proxy::start(
        &[&upstream],
        json!({"prices": {"claude-test": {"input": 3, "output": 15, "cache_write": 3.75, "cache_read": 0.3}}}),
    );
    let headers = [("x-mock-usage", USAGE)];
    for _ in 0..10 {
        let (status, body) = post_message(&proxy.url, &headers);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    for _ in 0..10 {
        let (status, body) = post(&proxy.url, "/v1/messages", &stream_body(), &headers);
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        // The stream reached the client whole: its opening usage (output 1) and the
        // cumulative delta (output 15) both passed through untouched.
        assert!(text.contains(r#""output_tokens":1}"#), "{text}");
        assert!(text.contains(r#""usage":{"output_tokens":15}"#), "{text}");
        assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }
    // An answer's usage is counted once it has been written: each answer's in one step,
    // so once the input side of all 20 is in, everything is.
    wait_until("all 20 answers counted", || {
        proxy.endpoint_stats(0)["usage"]["input_tokens"] == 500
    });
    let usage = &proxy.endpoint_stats(0)["usage"];
    let expected = json!({"input_tokens": 500, "output_tokens": 300,
                          "cache_creation_input_tokens": 140, "cache_read_input_tokens": 220});
    for field in [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ] {
        assert_eq!(usage[field], expected[field], "{field}: {usage}");
        assert_eq!(
            usage["today"][field], expected[field],
            "today {field}: {usage}"
        );
        assert_eq!(
            usage["by_model"]["claude-test"][field], expected[field],
            "{usage}"
        );
    }
    let cost = (500.0 * 3.0 + 300.0 * 15.0 + 140.0 * 3.75 + 220.0 * 0.3) / 1e6;
    let shown = usage["cost_usd"].as_f64().expect("a cost");
    assert!((shown - cost).abs() < 1e-12, "{shown} != {cost}");

    let (_, body) = get(&format!("{}/__qcc__/metrics", proxy.url));
    let text = String::from_utf8(body).unwrap();
    let tokens = |kind: &str| {
        let series = format!(
            "failover_proxy_tokens_total{{endpoint=\"ep0\",model=\"claude-test\",type=\"{kind}\"}}"
        );
        metric(&text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(
        [
            tokens("input"),
            tokens("output"),
            tokens("cache_creation"),
            tokens("cache_read")
        ],
        [500.0, 300.0, 140.0, 220.0]
    );
    let series = "failover_proxy_cost_usd_total{endpoint=\"ep0\",model=\"claude-test\"}";
    let priced = metric(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert!((priced - cost).abs() < 1e-9);
}

#[test]
fn answers_without_usage_count_nothing_and_errors_count_nothing() {
    let upstream = named("uncounted", Fault::None);
    let proxy = Proxy::start(&[&upstream], json!({}));
    let (status, _) = post(&proxy.url, "/v1/messages", "not json", &[]);
    assert_eq!(status, 400);
    let (status, _) = post_message(
        &proxy.url,
        &[("x-mock-fault", "500"), ("x-mock-usage", USAGE)],
    );
    assert_eq!(status, 500);
    let usage = &proxy.endpoint_stats(0)["usage"];
    assert_eq!(usage["input_tokens"], 0, "{usage}");
    assert_eq!(usage["cost_usd"], Value::Null, "{usage}");
}

/// An answer saying no request is left moves traffic to the next endpoint until the reset
/// it names, with no 429 and no mark on the endpoint's health; the sessions bound to it
/// move too, and stay where they moved.
#[test]
fn an_endpoint_with_no_requests_left_gets_no_traffic_until_its_reset() {
    let spent = named("spent", Fault::None);
    let spare = named("spare", Fault::None);
    let proxy = Proxy::start(&[&spent, &spare], json!({}));
    // Whole seconds: the reset header is believed to the second.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let reset = UNIX_EPOCH + Duration::from_secs(now.as_secs() + 3);
    spent.set_headers(&[
        ("anthropic-ratelimit-requests-limit", "50"),
        ("anthropic-ratelimit-requests-remaining", "0"),
        ("anthropic-ratelimit-requests-reset", &iso8601(reset)),
    ]);
    let client = agent();
    let session = [("x-claude-code-session-id", "quota-session")];
    let first = send_message(&client, &proxy.url, &[session[0], ("x-mock-usage", USAGE)]);
    assert_eq!(first.header("x-mock-upstream"), Some("spent"));
    // The last request the account allows was answered; the next ones go elsewhere.
    let mut moved = 0;
    while SystemTime::now() + Duration::from_millis(200) < reset {
        let answer = send_message(&client, &proxy.url, &[]);
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-mock-upstream"), Some("spare"));
        let bound = send_message(&client, &proxy.url, &session);
        assert_eq!(bound.header("x-mock-upstream"), Some("spare"));
        moved += 2;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(moved >= 4, "{moved}");
    let stats = proxy.endpoint_stats(0);
    assert_eq!(stats["is_healthy"], false);
    assert_eq!(stats["quota"]["requests_remaining"], 0);
    assert_eq!(stats["quota"]["reset"], iso8601(reset));
    assert!(stats["quota"]["skipped_until"].is_string(), "{stats}");
    assert_eq!(stats["health_status"]["failed_requests"], 0);
    assert_eq!(proxy.stats()["failure_queue_size"], 0);
    // The window resets: the account reports requests again and gets traffic back.
    spent.set_headers(&[("anthropic-ratelimit-requests-remaining", "49")]);
    let returned = within(Duration::from_secs(5), || {
        send_message(&client, &proxy.url, &[]).header("x-mock-upstream") == Some("spent")
    });
    assert!(returned, "traffic never came back after the reset");
    assert!(SystemTime::now() >= reset);
    // The session stays where it moved.
    let bound = send_message(&client, &proxy.url, &session);
    assert_eq!(bound.header("x-mock-upstream"), Some("spare"));
    assert_eq!(spent.failures(), 0);
    assert_eq!(
        proxy.endpoint_stats(0)["health_status"]["failed_requests"],
        0
    );
}

/// A subscription that says `rejected` is out until its unified reset, even when its 429
/// says `retry-after: 2`: retrying after 2 s would only earn another 429.
#[test]
fn a_rejected_429_keeps_the_endpoint_out_until_the_unified_reset() {
    let limited = named(
        "limited",
        Fault::RateLimited {
            retry_after: Some("2".into()),
        },
    );
    let spare = named("spare", Fault::None);
    let proxy = Proxy::start(&[&limited, &spare], json!({}));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let reset_secs = now.as_secs() + 7; // at least 6 s away
    let reset = UNIX_EPOCH + Duration::from_secs(reset_secs);
    limited.set_headers(&[
        ("anthropic-ratelimit-unified-status", "rejected"),
        ("anthropic-ratelimit-unified-reset", &reset_secs.to_string()),
    ]);
    let client = agent();
    let first = send_message(&client, &proxy.url, &[]);
    assert_eq!(first.header("x-mock-upstream"), Some("spare"));
    assert_eq!(limited.requests(), 1);
    // The account's limit lifts; the proxy still waits for the reset it was told.
    limited.set_fault(Fault::None);
    limited.set_headers(&[]);
    while SystemTime::now() + Duration::from_millis(300) < reset {
        let answer = send_message(&client, &proxy.url, &[]);
        assert_eq!(answer.header("x-mock-upstream"), Some("spare"));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        limited.requests(),
        1,
        "the endpoint got traffic before its unified reset"
    );
    let stats = proxy.endpoint_stats(0);
    // The 429's own cooldown lasts until the unified reset, not `retry-after`'s 2 s
    // (the quota's skip says the same: either alone keeps the endpoint out).
    let cooldown = stats["cooldown_until"].as_str().expect("cooling down");
    assert!(
        cooldown > iso8601(reset - Duration::from_millis(1500)).as_str(),
        "{cooldown}"
    );
    assert_eq!(stats["quota"]["unified_reset"], iso8601(reset));
    assert_eq!(stats["health_status"]["failed_requests"], 1);
    let returned = within(Duration::from_secs(5), || {
        send_message(&client, &proxy.url, &[]).header("x-mock-upstream") == Some("limited")
    });
    assert!(returned, "traffic never came back after the unified reset");
}
