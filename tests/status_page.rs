//! What the status page stands on (issue 17): the per-minute `history`, the
//! `next_probe_at`, and the `usage` and `quota` (issue 16) of each endpoint in the stats,
//! and the paths a browser asks for by itself (`/favicon.ico`, `/robots.txt`), which the
//! proxy answers and never forwards.

use crate::support::quota::QuotaScene;
use crate::support::raw::RawClient;
use crate::support::*;
use failover_proxy::mock::fault::Fault;
use failover_proxy::time::{iso8601, parse_rfc3339};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime};

/// Sends `method path` with `headers` (and `connection: close`) as exact bytes; returns
/// the status, the headers and the body (none for a 204 or a HEAD).
fn send_raw(url: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut text = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    let mut client = RawClient::connect(url);
    client.send(text.as_bytes());
    let head = client.read_head().expect("a response head");
    let length = match (method, head.content_length()) {
        ("HEAD", _) | (_, None) => 0,
        (_, Some(n)) => n,
    };
    let body = client.read_exact_body(length).expect("the body");
    Answer {
        status: head.status,
        headers: head.headers,
        body,
    }
}

#[test]
fn favicon_and_robots_are_answered_by_the_proxy_for_anyone() {
    let up = mock(Fault::None);
    // With access tokens, a request without one would get 401; these paths need none,
    // and a foreign Host (a browser on another name) is served too.
    let proxy = Proxy::start(&[&up], json!({"access_tokens": ["tok-0123456789abcdef"]}));
    for host in ["127.0.0.1", "evil.example"] {
        let icon = send_raw(&proxy.url, "GET", "/favicon.ico", &[("host", host)]);
        assert_eq!(icon.status, 204, "{host}");
        assert_eq!(icon.header("cache-control"), Some("max-age=86400"));
        assert_eq!(icon.header("content-length"), None);
        let robots = send_raw(&proxy.url, "GET", "/robots.txt", &[("host", host)]);
        assert_eq!(robots.status, 200, "{host}");
        assert_eq!(robots.text(), "User-agent: *\nDisallow: /\n");
        assert_eq!(
            robots.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
    }
    let head = send_raw(&proxy.url, "HEAD", "/robots.txt?x=1", &[("host", "a")]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("26"));
    let post = send_raw(&proxy.url, "POST", "/favicon.ico", &[("host", "a")]);
    assert_eq!(post.status, 405);
    assert_eq!(up.requests(), 0);
    let stats = proxy.stats();
    assert_eq!(stats["total_requests"], 0);
    assert_eq!(
        proxy.endpoint_stats(0)["health_status"]["total_requests"],
        0
    );
}

/// Sums one field over an endpoint's history.
fn total(history: &Value, field: &str) -> u64 {
    let minutes = history.as_array().expect("history is an array");
    minutes
        .iter()
        .map(|m| m[field].as_u64().expect(field))
        .sum()
}

#[test]
fn history_counts_every_attempt_in_its_minute() {
    let failing = mock(Fault::Status(500));
    let healthy = mock(Fault::None);
    // The failing endpoint fails three requests over (max_failures 3), then is queued.
    let proxy = Proxy::start(
        &[&failing, &healthy],
        json!({"max_attempts_per_endpoint": 1, "recovery_interval": 3600, "recovery_max_interval": 7200}),
    );
    for _ in 0..4 {
        let (status, _) = post_message(&proxy.url, &[]);
        assert_eq!(status, 200);
    }
    let minute_of =
        |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() / 60 * 60;
    let before = minute_of(SystemTime::now());
    let stats = proxy.stats();
    let after = minute_of(SystemTime::now());
    for (i, (requests, errors)) in [(3, 3), (4, 0)].into_iter().enumerate() {
        let endpoint = endpoint_in(&stats, &proxy.id(i));
        let history = &endpoint["history"];
        let minutes = history.as_array().unwrap();
        assert_eq!(minutes.len(), 60);
        assert_eq!(total(history, "requests"), requests, "ep{i}");
        assert_eq!(total(history, "errors"), errors, "ep{i}");
        let health = &endpoint["health_status"];
        assert_eq!(health["total_requests"], requests);
        assert_eq!(health["failed_requests"], errors);
        for pair in minutes.windows(2) {
            let step = pair[1]["start"].as_u64().unwrap() - pair[0]["start"].as_u64().unwrap();
            assert_eq!(step, 60);
        }
        for minute in minutes {
            let counted = minute["requests"].as_u64().unwrap() > 0;
            assert_eq!(minute["p50_ms"].is_number(), counted, "{minute}");
            assert_eq!(minute["p95_ms"].is_number(), counted, "{minute}");
        }
        // The last entry is the minute the stats were taken in.
        let last = minutes[59]["start"].as_u64().unwrap();
        assert!((before..=after).contains(&last), "{last}");
    }
}

/// The stats' `next_probe_at` of endpoint 0.
fn next_probe_at(proxy: &Proxy) -> Value {
    proxy.endpoint_stats(0)["next_probe_at"].clone()
}

fn admin_post(proxy: &Proxy, path: &str) -> (u16, Vec<u8>) {
    post(&proxy.url, path, "", &[])
}

#[test]
fn next_probe_at_shows_the_recovery_schedule() {
    let bad_key = mock(Fault::Status(401));
    let healthy = mock(Fault::None);
    let proxy = Proxy::start(
        &[&bad_key, &healthy],
        json!({"recovery_interval": 3600, "recovery_max_interval": 7200}),
    );
    assert_eq!(next_probe_at(&proxy), Value::Null);
    let (status, _) = post_message(&proxy.url, &[]);
    assert_eq!(status, 200);
    assert_eq!(proxy.stats()["failed_endpoints"], json!([proxy.id(0)]));
    // Queued, never probed: the next round probes it; the schedule has no time yet.
    assert_eq!(next_probe_at(&proxy), Value::Null);
    let (status, _) = admin_post(&proxy, "/__qcc__/queue/retry");
    assert_eq!(status, 200);
    // The probe failed: the next one waits twice the interval (two hours).
    let at = next_probe_at(&proxy);
    let in_an_hour = iso8601(SystemTime::now() + Duration::from_secs(3600));
    assert!(
        at.as_str().is_some_and(|at| at > in_an_hour.as_str()),
        "{at}"
    );
    let disable = format!("/__qcc__/endpoints/{}/disable", proxy.id(0));
    assert_eq!(admin_post(&proxy, &disable).0, 200);
    assert_eq!(next_probe_at(&proxy), Value::Null, "disabled: no probes");
    let enable = format!("/__qcc__/endpoints/{}/enable", proxy.id(0));
    assert_eq!(admin_post(&proxy, &enable).0, 200);
    assert_eq!(next_probe_at(&proxy), at);
    assert_eq!(admin_post(&proxy, "/__qcc__/queue/clear").0, 200);
    assert_eq!(next_probe_at(&proxy), Value::Null, "no longer queued");
}

#[test]
fn the_status_page_is_served_with_its_own_icon_and_no_framing() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    for path in ["/__qcc__/", "/__qcc__"] {
        let page = send_raw(&proxy.url, "GET", path, &[("host", "127.0.0.1")]);
        assert_eq!(page.status, 200);
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(page.header("x-frame-options"), Some("DENY"));
        let policy = page.header("content-security-policy").unwrap_or("");
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        assert!(policy.contains("connect-src 'self'"), "{policy}");
        let html = page.text();
        assert!(html.contains("<link rel=\"icon\" href=\"data:image/svg+xml,"));
        // Every URL the page fetches is absolute: from `/__qcc__` (no slash) a relative
        // `stats` would be `/stats`, which the proxy forwards upstream.
        assert!(!html.contains("fetch('stats"), "relative fetch");
        assert!(!html.contains("src=\"http"), "external asset");
        assert!(!html.contains("href=\"http"), "external asset");
    }
    assert_eq!(up.requests(), 0);
}

/// What the status page's "tokens today" and "quota" figures and its "quota spent until"
/// badge stand on, exactly: each endpoint's `usage.today` and `quota` in the stats, left
/// by real answers (see `QuotaScene`; `status_page_browser.rs` checks what Chromium shows).
#[test]
fn the_stats_carry_what_the_tokens_and_quota_figures_show() {
    let scene = QuotaScene::start();
    let stats = scene.proxy.stats();
    let endpoint = |i: usize| endpoint_in(&stats, &scene.proxy.id(i));
    let kinds = [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ];
    // Today's four kinds, and the cost at the scene's prices (none when the only model
    // used has no price).
    let usage = [
        ([12_000, 250, 40, 10], Some(0.039903)),
        ([900, 50, 0, 0], None),
        ([25, 15, 7, 11], Some(0.00032955)),
        ([4_000_000, 100_000, 0, 0], Some(13.5)),
        ([0, 0, 0, 0], None),
    ];
    for (i, (counts, cost)) in usage.into_iter().enumerate() {
        let today = &endpoint(i)["usage"]["today"];
        let shown = kinds.map(|k| today[k].as_u64().expect(k));
        assert_eq!(shown, counts, "ep{i}: {today}");
        match (cost, today["cost_usd"].as_f64()) {
            (Some(cost), Some(shown)) => assert!((shown - cost).abs() < 1e-12, "ep{i}: {today}"),
            (None, None) => {}
            _ => panic!("ep{i}: cost {cost:?}: {today}"),
        }
    }
    let none = json!({"requests_remaining": null, "tokens_remaining": null, "reset": null,
        "unified_status": null, "unified_reset": null, "utilization_5h": null,
        "utilization_7d": null, "skipped_until": null});
    let with = |fields: Value| {
        let mut quota = none.clone();
        for (k, v) in fields.as_object().unwrap() {
            quota[k] = v.clone();
        }
        quota
    };
    let reset = iso8601(scene.reset);
    let mut spent = endpoint(2)["quota"].clone();
    let skipped_until = spent["skipped_until"].take();
    let quotas = [
        with(json!({"requests_remaining": 49, "tokens_remaining": 7000, "reset": reset})),
        with(
            json!({"unified_status": "allowed_warning", "unified_reset": iso8601(scene.unified_reset),
            "utilization_5h": 0.42, "utilization_7d": 0.9}),
        ),
        with(json!({"requests_remaining": 0, "reset": reset})),
        with(json!({"unified_status": "rejected", "unified_reset": iso8601(scene.passed_reset)})),
        none.clone(),
    ];
    for (i, quota) in quotas.iter().enumerate() {
        let shown = if i == 2 {
            &spent
        } else {
            &endpoint(i)["quota"]
        };
        assert_eq!(shown, quota, "ep{i}");
    }
    // The skip ends at the reset the upstream named, give or take the microseconds of
    // turning an `Instant` back into a wall time (the page rounds to the second).
    let until = skipped_until.as_str().expect("ep2 is skipped");
    let whole = parse_rfc3339(until).expect(until);
    let millis: u64 = until[20..23].parse().expect(until);
    let until = whole + Duration::from_millis(millis);
    let off = until
        .max(scene.reset)
        .duration_since(until.min(scene.reset))
        .unwrap();
    assert!(off < Duration::from_millis(100), "{until:?} vs {reset}");
}
