//! Stats, metrics, the admin API's access rule, and keys kept out of every output (issue 6).

use crate::support::*;
use failover_proxy::admin;
use failover_proxy::http_out::ClientOut;
use failover_proxy::mock::{Fault, MockUpstream};
use failover_proxy::upstream::ClientRequest;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

fn metrics(proxy: &Proxy) -> HashMap<String, f64> {
    let (status, body) = get(&format!("{}/__qcc__/metrics", proxy.url));
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let mut labels: Vec<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            (format!("{}{{{}}}", s.metric, labels.join(",")), value)
        })
        .collect()
}

/// A run with successes, failovers, a quarantine, a 429 and a client error.
fn busy_proxy(mocks: &[MockUpstream]) -> Proxy {
    let refs: Vec<&MockUpstream> = mocks.iter().collect();
    let proxy = Proxy::start(
        &refs,
        json!({"recovery_interval": 600, "strategy": "round_robin"}),
    );
    let client = agent();
    for fault in [
        "none", "500", "529", "none", "429", "400", "reset", "none", "none",
    ] {
        send_message(&client, &proxy.url, &[("x-mock-fault", fault)]);
    }
    mocks[0].set_fault(Fault::Status(401));
    for _ in 0..4 {
        send_message(&client, &proxy.url, &[]);
    }
    proxy
}

#[test]
fn metrics_parse_and_agree_exactly_with_stats() {
    let mocks = vec![mock(Fault::None), mock(Fault::None)];
    let proxy = busy_proxy(&mocks);
    let m = metrics(&proxy);
    let stats = proxy.stats();
    let num = |v: &Value| v.as_f64().unwrap();
    assert_eq!(
        m["failover_proxy_requests_total{outcome=success}"],
        num(&stats["successful_requests"])
    );
    assert_eq!(
        m["failover_proxy_requests_total{outcome=failure}"],
        num(&stats["failed_requests"])
    );
    assert_eq!(
        m["failover_proxy_failure_queue_size{}"],
        num(&stats["failure_queue_size"])
    );
    let q = &stats["failure_queue_stats"];
    assert_eq!(
        m["failover_proxy_failure_queue_entries_total{}"],
        num(&q["total_failed"])
    );
    for e in stats["endpoints"].as_array().unwrap() {
        let labels = format!(
            "endpoint={},id={}",
            e["name"].as_str().unwrap(),
            e["id"].as_str().unwrap()
        );
        let h = &e["health_status"];
        let failed =
            m[&format!("failover_proxy_endpoint_attempts_total{{{labels},outcome=failure}}")];
        let ok = m[&format!("failover_proxy_endpoint_attempts_total{{{labels},outcome=success}}")];
        assert_eq!(failed, num(&h["failed_requests"]));
        assert_eq!(ok + failed, num(&h["total_requests"]));
    }
    let total = num(&stats["total_requests"]);
    assert_eq!(total, 13.0);
    assert_eq!(m["failover_proxy_request_duration_seconds_count{}"], total);
}

/// A writer the test can read back after the proxy wrote a response into it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn admin_status(proxy: &Proxy, remote: &str, token: Option<&str>) -> u16 {
    let listen = proxy.url.strip_prefix("http://").unwrap();
    let mut headers = vec![("host".parse().unwrap(), listen.parse().unwrap())];
    if let Some(t) = token {
        headers.push((
            "authorization".parse().unwrap(),
            format!("Bearer {t}").parse().unwrap(),
        ));
    }
    let request = ClientRequest {
        method: ureq::http::Method::GET,
        target: "/__qcc__/stats".into(),
        headers,
        body: Vec::new(),
    };
    let buffer = Shared::default();
    let mut out = ClientOut::new(Box::new(buffer.clone()), false, false);
    let status = admin::serve(
        &proxy.state,
        &request,
        Some(remote.parse().unwrap()),
        listen.parse().unwrap(),
        &mut out,
    );
    let written = String::from_utf8_lossy(&buffer.0.lock()).into_owned();
    assert!(
        written.starts_with(&format!("HTTP/1.1 {status} ")),
        "{written}"
    );
    status
}

/// The admin API decides by the client's address: loopback, or the admin token (403
/// otherwise; `admin_access.rs` has the checks of `Host` and `Origin`).
#[test]
fn admin_from_another_machine_needs_the_token() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({"admin_token": "admin-secret-token-123"}));
    assert_eq!(admin_status(&proxy, "127.0.0.1:5000", None), 200);
    assert_eq!(admin_status(&proxy, "[::1]:5000", None), 200);
    assert_eq!(admin_status(&proxy, "192.0.2.7:5000", None), 403);
    assert_eq!(admin_status(&proxy, "192.0.2.7:5000", Some("wrong")), 403);
    assert_eq!(
        admin_status(&proxy, "192.0.2.7:5000", Some("admin-secret-token-123")),
        200
    );
    let no_token = Proxy::start(&[&up], json!({}));
    assert_eq!(
        admin_status(&no_token, "192.0.2.7:5000", Some("anything")),
        403
    );
}

#[test]
fn access_tokens_guard_the_proxy() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({"access_tokens": ["client-token-abc"]}));
    let client = agent();
    let refused = send_message(&client, &proxy.url, &[("x-api-key", "nope")]);
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["error"]["type"], "authentication_error");
    assert_eq!(up.requests(), 0);
    let by_key = send_message(&client, &proxy.url, &[("x-api-key", "client-token-abc")]);
    assert_eq!(by_key.status, 200);
    let by_bearer = send_message(
        &client,
        &proxy.url,
        &[("authorization", "Bearer client-token-abc")],
    );
    assert_eq!(by_bearer.status, 200);
    // The client's token is replaced by the endpoint's key upstream.
    assert!(
        up.recorded()
            .iter()
            .all(|r| r.header("x-api-key") == Some(key(0).as_str()))
    );
}

#[test]
fn keys_never_appear_in_stats_metrics_status_or_logs() {
    let mocks = vec![mock(Fault::None), mock(Fault::None)];
    let proxy = busy_proxy(&mocks);
    let (_, metrics_text) = get(&format!("{}/__qcc__/metrics", proxy.url));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_failover-proxy"))
        .args(["status", "--url", &proxy.url])
        .output()
        .unwrap();
    assert!(status.status.success());
    let outputs = [
        proxy.stats().to_string(),
        String::from_utf8_lossy(&metrics_text).into_owned(),
        String::from_utf8_lossy(&status.stdout).into_owned(),
        all_log_text(),
    ];
    for (i, text) in outputs.iter().enumerate() {
        for k in [key(0), key(1)] {
            assert!(!text.contains(&k), "output {i} holds a key");
        }
    }
    assert!(String::from_utf8_lossy(&status.stdout).contains(&proxy.id(0)));
}

#[test]
fn endpoints_can_be_disabled_and_enabled_at_run_time() {
    let a = MockUpstream::start_named("a", Fault::None).unwrap();
    let b = MockUpstream::start_named("b", Fault::None).unwrap();
    let proxy = Proxy::start(&[&a, &b], json!({}));
    let client = agent();
    let path = |action: &str| format!("/__qcc__/endpoints/{}/{action}", proxy.id(0));
    assert_eq!(post(&proxy.url, &path("disable"), "", &[]).0, 200);
    assert_eq!(proxy.endpoint_stats(0)["enabled"], false);
    assert_eq!(
        send_message(&client, &proxy.url, &[]).header("x-mock-upstream"),
        Some("b")
    );
    assert_eq!(post(&proxy.url, &path("enable"), "", &[]).0, 200);
    assert_eq!(
        send_message(&client, &proxy.url, &[]).header("x-mock-upstream"),
        Some("a")
    );
    assert_eq!(
        post(&proxy.url, "/__qcc__/endpoints/00000000/enable", "", &[]).0,
        404
    );
}

#[test]
fn count_tokens_404_is_answered_locally_and_is_not_a_failure() {
    let up = mock(Fault::None);
    up.set_count_tokens_404(true);
    let proxy = Proxy::start(&[&up], json!({}));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "a".repeat(400)}]});
    let count_tokens = || {
        post(
            &proxy.url,
            "/v1/messages/count_tokens",
            &body.to_string(),
            &[],
        )
    };
    let (status, answer) = count_tokens();
    assert_eq!(status, 200);
    let estimate: Value = serde_json::from_slice(&answer).unwrap();
    assert!(
        estimate["input_tokens"].as_u64().unwrap() >= 100,
        "{estimate}"
    );
    assert_eq!(up.requests(), 1);
    let h = &proxy.endpoint_stats(0)["health_status"];
    assert_eq!(h["failed_requests"], 0);
    up.set_count_tokens_404(false);
    let (status, answer) = count_tokens();
    assert_eq!(status, 200);
    // The upstream's own count when it has one: the mock's is body length / 4.
    let upstream: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(
        upstream["input_tokens"].as_u64().unwrap() as usize,
        body.to_string().len() / 4
    );
}

#[test]
fn model_override_rewrites_the_body_and_its_length() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(
        &[&up],
        json!({"model_override": "claude-override-model-with-a-long-name"}),
    );
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.status, 200);
    let recorded = &up.recorded()[0];
    let sent: Value = serde_json::from_slice(&recorded.body).unwrap();
    assert_eq!(sent["model"], "claude-override-model-with-a-long-name");
    let length: usize = recorded.header("content-length").unwrap().parse().unwrap();
    assert_eq!(length, recorded.body.len());
}
