//! Stats, metrics, the admin API's access rule, and keys kept out of every output (issue 6).

use crate::support::quota::{QuotaScene, utc_clock};
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use failover_proxy::server::admin::routes as admin;
use failover_proxy::server::http_out::ClientOut;
use failover_proxy::upstream::call::ClientRequest;
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

/// Checks an answer's status and the mock that gave it.
fn assert_answer(answer: &Answer, status: u16, upstream: &str) {
    let seen = (answer.status, answer.header("x-mock-upstream"));
    assert_eq!(seen, (status, Some(upstream)), "{}", answer.text());
}

/// A run whose every step is checked as it happens: a success, a client error, three
/// failovers while the first endpoint fails (two 500s, then a 401 that quarantines it),
/// and a 429 from the second with nothing left to fail over to. `REQUESTS`, `FAILOVERS`
/// and `ATTEMPTS` follow from these steps.
fn busy_proxy() -> (Proxy, [MockUpstream; 2]) {
    let mocks = ["a", "b"].map(|name| MockUpstream::start_named(name, Fault::None).unwrap());
    let [a, b] = &mocks;
    let proxy = Proxy::start(&[a, b], json!({"recovery_interval": 600}));
    let client = agent();
    let send = |headers: &[(&str, &str)]| send_message(&client, &proxy.url, headers);
    assert_answer(&send(&[]), 200, "a");
    // A client error goes back as it came, after one attempt, and is no endpoint's fault.
    assert_answer(&send(&[("x-mock-fault", "400")]), 400, "a");
    a.set_fault(Fault::Status(500));
    for _ in 0..2 {
        assert_answer(&send(&[]), 200, "b");
    }
    // A refused key quarantines at once (here it is also the third failure in a row).
    a.set_fault(Fault::Status(401));
    assert_answer(&send(&[]), 200, "b");
    assert_eq!(proxy.stats()["failed_endpoints"], json!([proxy.id(0)]));
    // The only endpoint left answers 429: it cools down, none is left, and the client gets
    // that last answer.
    assert_answer(&send(&[("x-mock-fault", "429")]), 429, "b");
    assert_eq!((a.requests(), b.requests()), (5, 4));
    (proxy, mocks)
}

/// What `busy_proxy` leaves behind: 6 requests, 4 answered below 400 (the success and the
/// three failovers), 2 not (the 400 and the 429). Endpoint a: 1 success and 3 failures
/// recorded (the 400 is not recorded), queued once; endpoint b: 3 successes and the 429.
const REQUESTS: (f64, f64, f64) = (6.0, 4.0, 2.0);
const FAILOVERS: f64 = 3.0;
/// Per endpoint: (attempts recorded, failed ones).
const ATTEMPTS: [(f64, f64); 2] = [(4.0, 3.0), (4.0, 1.0)];

#[test]
fn metrics_parse_and_agree_exactly_with_stats() {
    let (proxy, _mocks) = busy_proxy();
    let (total, ok, failed) = REQUESTS;
    // The duration of a request is observed just after its answer is written.
    let durations = "failover_proxy_request_duration_seconds_count{}";
    wait_until("every request's duration is observed", || {
        metrics(&proxy)[durations] >= total
    });
    let m = metrics(&proxy);
    let stats = proxy.stats();
    let num = |v: &Value| v.as_f64().unwrap();
    assert_eq!(m[durations], total);
    assert_eq!(num(&stats["total_requests"]), total);
    assert_eq!(m["failover_proxy_requests_total{outcome=success}"], ok);
    assert_eq!(num(&stats["successful_requests"]), ok);
    assert_eq!(m["failover_proxy_requests_total{outcome=failure}"], failed);
    assert_eq!(num(&stats["failed_requests"]), failed);
    assert_eq!(m["failover_proxy_failovers_total{}"], FAILOVERS);
    assert_eq!(m["failover_proxy_failure_queue_size{}"], 1.0);
    assert_eq!(num(&stats["failure_queue_size"]), 1.0);
    assert_eq!(stats["failed_endpoints"], json!([proxy.id(0)]));
    assert_eq!(m["failover_proxy_failure_queue_entries_total{}"], 1.0);
    assert_eq!(num(&stats["failure_queue_stats"]["total_failed"]), 1.0);
    for (i, (attempts, failures)) in ATTEMPTS.into_iter().enumerate() {
        let e = endpoint_in(&stats, &proxy.id(i));
        let labels = format!("endpoint=ep{i},id={}", proxy.id(i));
        let h = &e["health_status"];
        let attempts_with = |outcome: &str| {
            m[&format!("failover_proxy_endpoint_attempts_total{{{labels},outcome={outcome}}}")]
        };
        assert_eq!(attempts_with("failure"), failures, "ep{i}");
        assert_eq!(attempts_with("success"), attempts - failures, "ep{i}");
        assert_eq!(num(&h["failed_requests"]), failures, "ep{i}: {h}");
        assert_eq!(num(&h["total_requests"]), attempts, "ep{i}: {h}");
    }
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
        held: None,
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
    let (proxy, _mocks) = busy_proxy();
    let (_, metrics_text) = get(&format!("{}/__qcc__/metrics", proxy.url));
    let status = status_command(&proxy.url);
    let outputs = [
        proxy.stats().to_string(),
        String::from_utf8_lossy(&metrics_text).into_owned(),
        status.clone(),
        all_log_text(),
    ];
    for (i, text) in outputs.iter().enumerate() {
        for k in [key(0), key(1)] {
            assert!(!text.contains(&k), "output {i} holds a key");
        }
    }
    assert!(status.contains(&proxy.id(0)));
}

/// What `failover-proxy status --url <url>` prints (it must succeed).
fn status_command(url: &str) -> String {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_failover-proxy"))
        .args(["status", "--url", url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{}: {stderr}", run.status);
    String::from_utf8(run.stdout).expect("UTF-8")
}

/// The text under `column` in `line`, up to the next column of `header` (or the end),
/// spaces on the right cut off: the table's columns have fixed widths.
fn cell<'a>(header: &str, line: &'a str, column: &str, next: &str) -> &'a str {
    let from = header
        .find(column)
        .unwrap_or_else(|| panic!("no {column}: {header}"));
    let to = header
        .find(next)
        .unwrap_or_else(|| panic!("no {next}: {header}"));
    line.get(from..to.min(line.len())).unwrap_or("").trim_end()
}

/// `status` shows each endpoint's tokens today (with the cost when its models are priced)
/// and what its last quota report said, and calls an endpoint skipped for its quota
/// `spent`: five endpoints left in five different states by real answers.
#[test]
fn status_shows_tokens_today_and_each_endpoints_quota() {
    let scene = QuotaScene::start();
    let output = status_command(&scene.proxy.url);
    eprintln!("{output}");
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 7, "{output}");
    assert!(
        lines[0].starts_with("requests 4 (ok 4, failed 0), uptime "),
        "{output}"
    );
    assert!(
        lines[0].ends_with(", healthy endpoints 4/5, queued 0"),
        "{output}"
    );
    let header = lines[1];
    assert!(
        header.ends_with("tokens today   quota                  last error"),
        "{header}"
    );
    let spent = format!("SPENT until {}Z", utc_clock(scene.reset));
    // The counts are right-aligned in six characters, so they line up; the cost follows.
    let expected = [
        ("ep0", "healthy", " 12.3k $0.04", "req 49 tok 7.0k"),
        ("ep1", "healthy", "   950", "5h 42% 7d 90%"),
        ("ep2", "spent", "    58 <$0.01", spent.as_str()),
        ("ep3", "healthy", "  4.1M $13.50", "rejected"),
        ("ep4", "unknown", "     0", ""),
    ];
    for (i, (line, (name, state, tokens, quota))) in lines[2..].iter().zip(expected).enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[..2], [name, &scene.proxy.id(i)], "{line}");
        assert_eq!(words[3], state, "{line}");
        assert_eq!(
            cell(header, line, "tokens today", "quota"),
            tokens,
            "{line}"
        );
        assert_eq!(cell(header, line, "quota", "last error"), quota, "{line}");
        assert!(line.len() <= 110, "nothing after the quota: {line}");
    }
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
