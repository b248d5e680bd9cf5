//! The quarantine lifecycle end to end: probes, recovery, back-off, panic mode, and a
//! clean shutdown of the real binary.

use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use failover_proxy::state::health::Outcome;
use serde_json::json;
use std::time::{Duration, Instant};

fn queued(proxy: &Proxy) -> Vec<String> {
    let stats = proxy.stats();
    let ids = stats["failed_endpoints"].as_array().unwrap();
    ids.iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Requests the mock received at `path` (probes go to /v1/messages too, so count by body).
fn probes_received(mock: &MockUpstream) -> usize {
    mock.recorded()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("health check"))
        .count()
}

#[test]
fn a_failed_endpoint_is_quarantined_gets_no_traffic_and_comes_back() {
    let primary = MockUpstream::start_named("primary", Fault::Status(500)).unwrap();
    let backup = MockUpstream::start_named("backup", Fault::None).unwrap();
    let proxy = Proxy::start(
        &[&primary, &backup],
        json!({"recovery_interval": 0.2, "recovery_max_interval": 0.2}),
    );
    let client = agent();
    for _ in 0..3 {
        assert_eq!(send_message(&client, &proxy.url, &[]).status, 200);
    }
    assert_eq!(queued(&proxy), vec![proxy.id(0)]);
    // While queued, the primary gets probes only, never client traffic.
    let before = primary.requests() as usize - probes_received(&primary);
    for _ in 0..20 {
        let answer = send_message(&client, &proxy.url, &[]);
        assert_eq!(answer.header("x-mock-upstream"), Some("backup"));
    }
    assert_eq!(
        primary.requests() as usize - probes_received(&primary),
        before
    );
    primary.set_fault(Fault::None);
    assert!(within(Duration::from_secs(5), || queued(&proxy).is_empty()));
    let stats = proxy.stats();
    assert_eq!(stats["failure_queue_stats"]["total_recovered"], 1);
    assert_eq!(
        proxy.endpoint_stats(0)["health_status"]["status"],
        "healthy"
    );
    let answer = send_message(&client, &proxy.url, &[]);
    assert_eq!(answer.header("x-mock-upstream"), Some("primary"));
}

#[test]
fn a_probe_answered_without_the_code_leaves_the_endpoint_queued() {
    let primary = mock(Fault::Status(401));
    let backup = mock(Fault::None);
    let proxy = Proxy::start(&[&primary, &backup], json!({"recovery_interval": 0.1}));
    assert_eq!(send_message(&agent(), &proxy.url, &[]).status, 200);
    assert_eq!(queued(&proxy), vec![proxy.id(0)]);
    // 200 with an error inside: no echo of the code.
    primary.set_fault(Fault::SoftError200);
    assert!(within(Duration::from_secs(5), || {
        proxy.stats()["failure_queue_stats"]["total_still_failed"].as_u64() >= Some(2)
    }));
    assert_eq!(queued(&proxy), vec![proxy.id(0)]);
    assert_eq!(proxy.stats()["failure_queue_stats"]["total_recovered"], 0);
}

/// With interval 0.1 s and max 0.8 s, failed probes wait 0.2, 0.4, 0.8, 0.8 … s (a fixed
/// schedule would wait 0.1 s each time). Each failed probe logs the wait before the next
/// one, so the first four such lines, in order, are the back-off; and every one of them is
/// a probe the mock received and the endpoint counted. That a round waits for them is
/// checked with the clock handed in, in `src/state/recovery.rs`'s unit test.
#[test]
fn probe_delays_double_after_each_failure() {
    let primary = mock(Fault::Status(401));
    let backup = mock(Fault::None);
    let proxy = Proxy::start(
        &[&primary, &backup],
        json!({"recovery_interval": 0.1, "recovery_max_interval": 0.8}),
    );
    let mark = log_mark();
    assert_eq!(send_message(&agent(), &proxy.url, &[]).status, 200);
    let id = proxy.id(0);
    let still_failing = || log_lines_since(mark, &["is still failing", &id]);
    wait_until("four failed probes", || still_failing().len() >= 4);
    let waits: Vec<String> = still_failing()
        .iter()
        .take(4)
        .map(|line| {
            let (_, wait) = line.rsplit_once("next probe in ").expect("a wait");
            wait.to_string()
        })
        .collect();
    assert_eq!(waits, ["0.2s", "0.4s", "0.8s", "0.8s"]);
    let verify = proxy.stats()["endpoint_verify_counts"][&id]
        .as_u64()
        .unwrap();
    assert!(verify >= 4, "{verify}");
    assert!(probes_received(&primary) >= 4);
}

/// A probe blocked on a hung endpoint holds no lock: traffic and stats go on meanwhile.
#[test]
fn a_hanging_probe_delays_neither_requests_nor_stats() {
    let hung = mock(Fault::Hang);
    let backup = mock(Fault::None);
    let config = json!({
        "recovery_interval": 0.1,
        "endpoints": [
            endpoint_json(0, &hung.url(), json!({"timeout": 30})),
            endpoint_json(1, &backup.url(), json!({})),
        ],
    });
    let proxy = Proxy::start(&[], config);
    // Quarantined as a 401 would (through the proxy's own `record`), so that the first
    // request the hung mock gets is the first probe.
    let endpoint = proxy.state.current().endpoints[0].clone();
    let refused = Outcome::AuthFailure("HTTP 401".into());
    proxy.state.record(&endpoint, &refused, Duration::ZERO);
    assert_eq!(queued(&proxy), vec![proxy.id(0)]);
    wait_until("a probe reaches the hung endpoint", || hung.requests() == 1);
    let client = agent();
    for _ in 0..50 {
        let answer = send_message(&client, &proxy.url, &[]);
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let stats = proxy.stats();
    assert_eq!(stats["total_requests"], 50);
    // That probe has not come back (it waits for the endpoint's `timeout`, 30 s, and the
    // round waits for it): no probe result was applied, so nothing above waited for it.
    assert_eq!(stats["failure_queue_stats"]["total_verified"], 0);
    assert_eq!(stats["endpoint_verify_counts"][proxy.id(0)], 0);
    assert_eq!(hung.requests(), 1);
    drop(hung);
}

/// Rule 5: every endpoint quarantined, the first-quarantined one healthy again at its
/// mock: the client's request succeeds at once, without waiting for a probe round.
#[test]
fn panic_mode_tries_the_endpoint_quarantined_first() {
    let first = MockUpstream::start_named("first", Fault::Status(401)).unwrap();
    let second = MockUpstream::start_named("second", Fault::Status(401)).unwrap();
    let proxy = Proxy::start(&[&first, &second], json!({"recovery_interval": 600}));
    let client = agent();
    let answer = send_message(&client, &proxy.url, &[]);
    assert_eq!(answer.status, 401);
    assert_eq!(queued(&proxy).len(), 2);
    // Both queued and both still failing: one attempt, then 503 in the error shape.
    let before = first.requests() + second.requests();
    let answer = send_message(&client, &proxy.url, &[]);
    assert_eq!(answer.status, 503);
    assert_eq!(answer.json()["type"], "error");
    assert_eq!(first.requests() + second.requests(), before + 1);
    first.set_fault(Fault::None);
    let answer = send_message(&client, &proxy.url, &[]);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-mock-upstream"), Some("first"));
}

#[test]
fn queue_clear_returns_every_endpoint_and_retry_probes_now() {
    let a = mock(Fault::Status(401));
    let b = mock(Fault::Status(401));
    let proxy = Proxy::start(&[&a, &b], json!({"recovery_interval": 600}));
    assert_eq!(send_message(&agent(), &proxy.url, &[]).status, 401);
    assert_eq!(queued(&proxy).len(), 2);
    a.set_fault(Fault::None);
    let (status, body) = post(&proxy.url, "/__qcc__/queue/retry", "", &[]);
    assert_eq!(status, 200);
    let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["probed"].as_array().unwrap().len(), 2);
    assert_eq!(queued(&proxy), vec![proxy.id(1)]);
    let (status, _) = post(&proxy.url, "/__qcc__/queue/clear", "", &[]);
    assert_eq!(status, 200);
    assert!(queued(&proxy).is_empty());
    assert_eq!(
        proxy.endpoint_stats(1)["health_status"]["status"],
        "healthy"
    );
}

mod shutdown {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};

    fn config_file(body: &serde_json::Value) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "fp-shutdown-{}-{}.json",
            std::process::id(),
            crate::support::unique()
        ));
        std::fs::write(&path, body.to_string()).unwrap();
        path
    }

    /// Starts `serve` and reads its log until it says where it listens.
    fn serve(config: &std::path::Path) -> (Child, String, std::thread::JoinHandle<Vec<String>>) {
        serve_with(config, &[])
    }

    fn serve_with(
        config: &std::path::Path,
        extra: &[&str],
    ) -> (Child, String, std::thread::JoinHandle<Vec<String>>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_failover-proxy"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--log-level", "info"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("serve exited early").unwrap();
            if let Some(at) = line.find("listening on ") {
                let rest = &line[at + "listening on ".len()..];
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect());
        (child, url, rest)
    }

    #[test]
    fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
        let slow = mock(Fault::SlowBody { delay_ms: 300 });
        let config = config_file(&json!({"endpoints": [endpoint_json(0, &slow.url(), json!({}))]}));
        let (mut child, url, log) = serve(&config);
        let clients: Vec<_> = (0..5)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || post_message(&url, &[]))
            })
            .collect();
        assert!(within(Duration::from_secs(5), || slow.requests() == 5));
        let pid = child.id() as libc::pid_t;
        // SAFETY: sends a signal to our own child process; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let sent = Instant::now();
        for c in clients {
            let (status, body) = c.join().unwrap();
            assert_eq!(status, 200);
            let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(reply["type"], "message");
        }
        let exit = child.wait().unwrap();
        assert_eq!(exit.code(), Some(0));
        assert!(sent.elapsed() < failover_proxy::server::listen::DRAIN_GRACE);
        let log = log.join().unwrap().join("\n");
        // "stopped" is logged only when every worker and the recovery thread were joined.
        assert!(log.contains("stopped"), "{log}");
        std::fs::remove_file(config).unwrap();
    }

    #[test]
    fn a_taken_port_exits_one_with_one_line() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let config = config_file(
            &json!({"endpoints": [{"base_url": "http://127.0.0.1:9", "api_key": "k"}]}),
        );
        let out = Command::new(env!("CARGO_BIN_EXE_failover-proxy"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", &addr])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("cannot listen on {addr}")),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        std::fs::remove_file(config).unwrap();
    }

    fn stats_of(url: &str) -> serde_json::Value {
        let (status, body) = get(&format!("{url}/__qcc__/stats"));
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    /// An endpoint keeps its health across a reload while its id is unchanged; an invalid
    /// file changes nothing; SIGHUP does what `POST /__qcc__/reload` does.
    #[test]
    fn reload_keeps_health_by_id_and_refuses_a_bad_file() {
        let failing = mock(Fault::Status(500));
        let backup = mock(Fault::None);
        let other = mock(Fault::None);
        let a = endpoint_json(0, &failing.url(), json!({}));
        let config =
            config_file(&json!({"endpoints": [a, endpoint_json(1, &backup.url(), json!({}))]}));
        let (mut child, url, _log) = serve(&config);
        assert_eq!(post_message(&url, &[]).0, 200);
        let id = stats_of(&url)["endpoints"][0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let a50 = endpoint_json(0, &failing.url(), json!({"weight": 50}));
        let c = endpoint_json(2, &other.url(), json!({}));
        std::fs::write(&config, json!({"endpoints": [a50, c]}).to_string()).unwrap();
        assert_eq!(post(&url, "/__qcc__/reload", "", &[]).0, 200);
        let stats = stats_of(&url);
        let endpoints = stats["endpoints"].as_array().unwrap();
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[0]["id"], id.as_str());
        assert_eq!(endpoints[0]["weight"], 50);
        assert_eq!(endpoints[0]["health_status"]["failed_requests"], 1);
        std::fs::write(&config, "{\"endpoints\": [").unwrap();
        assert_eq!(post(&url, "/__qcc__/reload", "", &[]).0, 400);
        assert_eq!(stats_of(&url)["endpoints"].as_array().unwrap().len(), 2);
        std::fs::write(
            &config,
            json!({"endpoints": [endpoint_json(2, &other.url(), json!({}))]}).to_string(),
        )
        .unwrap();
        // SAFETY: sends a signal to our own child process.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) },
            0
        );
        assert!(within(Duration::from_secs(5), || {
            stats_of(&url)["endpoints"].as_array().unwrap().len() == 1
        }));
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
        assert_eq!(child.wait().unwrap().code(), Some(0));
        std::fs::remove_file(config).unwrap();
    }

    /// `GET /__qcc__/logs` serves the tail of `--log-file`, filtered by level and text.
    #[test]
    fn the_log_api_serves_the_filtered_tail_of_the_log_file() {
        let failing = mock(Fault::Status(500));
        let backup = mock(Fault::None);
        let endpoints = [
            endpoint_json(0, &failing.url(), json!({})),
            endpoint_json(1, &backup.url(), json!({})),
        ];
        let config = config_file(&json!({"endpoints": endpoints}));
        let log = config.with_extension("log");
        let (mut child, url, _stderr) = serve_with(&config, &["--log-file", log.to_str().unwrap()]);
        for _ in 0..3 {
            assert_eq!(post_message(&url, &[]).0, 200);
        }
        let logs = |query: &str| {
            let (status, body) = get(&format!("{url}/__qcc__/logs?{query}"));
            assert_eq!(status, 200);
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        };
        // The log-writer thread writes a line just after it is logged: wait for the last.
        let queued = "grep=entered%20the%20failure%20queue";
        wait_until("the queue entry in the log file", || {
            logs(queued)["lines"].as_array().unwrap().len() == 1
        });
        let answer = logs("lines=2&level=warn&grep=failed");
        let lines = answer["lines"].as_array().unwrap();
        assert_eq!(lines.len(), 2, "{answer}");
        for line in lines {
            let line = line.as_str().unwrap();
            assert!(line.contains("[WARN]") && line.contains("failed"), "{line}");
            assert!(!line.contains(&key(0)), "{line}");
        }
        let answer = logs(queued);
        assert_eq!(answer["lines"].as_array().unwrap().len(), 1, "{answer}");
        // SAFETY: sends a signal to our own child process.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
        assert_eq!(child.wait().unwrap().code(), Some(0));
        std::fs::remove_file(config).unwrap();
        std::fs::remove_file(log).unwrap();
    }
}
