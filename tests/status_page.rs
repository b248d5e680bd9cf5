//! What the status page stands on (issue 17): the per-minute `history` and the
//! `next_probe_at` of each endpoint in the stats.

use crate::support::*;
use failover_proxy::mock::Fault;
use failover_proxy::time::iso8601;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime};

/// Sums one field over an endpoint's history.
fn total(history: &Value, field: &str) -> u64 {
    let minutes = history.as_array().expect("history is an array");
    minutes.iter().map(|m| m[field].as_u64().expect(field)).sum()
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
    let proxy = Proxy::start(&[&bad_key, &healthy], json!({"recovery_interval": 3600, "recovery_max_interval": 7200}));
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
    assert!(at.as_str().is_some_and(|at| at > in_an_hour.as_str()), "{at}");
    let disable = format!("/__qcc__/endpoints/{}/disable", proxy.id(0));
    assert_eq!(admin_post(&proxy, &disable).0, 200);
    assert_eq!(next_probe_at(&proxy), Value::Null, "disabled: no probes");
    let enable = format!("/__qcc__/endpoints/{}/enable", proxy.id(0));
    assert_eq!(admin_post(&proxy, &enable).0, 200);
    assert_eq!(next_probe_at(&proxy), at);
    assert_eq!(admin_post(&proxy, "/__qcc__/queue/clear").0, 200);
    assert_eq!(next_probe_at(&proxy), Value::Null, "no longer queued");
}
