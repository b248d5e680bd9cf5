//! `/__qcc__/metrics`: the same numbers as `/__qcc__/stats`, in Prometheus text format
//! (version 0.0.4), plus a histogram of client request durations.
//!
//! Built from the same snapshots as the stats, so the two agree exactly after a run.

use crate::state::endpoint::Endpoint;
use crate::state::health::HealthStatus;
use crate::state::histogram::{BUCKETS, Histogram};
use crate::state::shared::State;
use crate::usage::price_of;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One metric family: its HELP and TYPE lines, then a sample per (labels, value); empty
/// labels write a bare sample.
fn write_family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    family(out, name, kind, help);
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

fn bare(value: f64) -> Vec<(String, f64)> {
    vec![(String::new(), value)]
}

pub fn render(state: &State) -> String {
    let mut out = String::with_capacity(4096);
    let c = &state.counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    write_family(
        &mut out,
        "failover_proxy_requests_total",
        "counter",
        "Client requests answered, by outcome (success: status below 400).",
        &[
            ("outcome=\"success\"".into(), load(&c.successful_requests)),
            ("outcome=\"failure\"".into(), load(&c.failed_requests)),
        ],
    );
    write_family(
        &mut out,
        "failover_proxy_failovers_total",
        "counter",
        "Client requests answered by an endpoint other than the first one tried.",
        &bare(load(&c.failovers)),
    );
    endpoint_families(&mut out, state);
    usage_families(&mut out, state);
    quota_families(&mut out, state);
    queue_families(&mut out, state);
    duration_histogram(&mut out, &c.latency);
    write_family(
        &mut out,
        "failover_proxy_uptime_seconds",
        "gauge",
        "Seconds since the proxy started.",
        &bare(state.started.elapsed().as_secs_f64()),
    );
    out
}

fn endpoint_families(out: &mut String, state: &State) {
    let generation = state.current();
    let now = Instant::now();
    let rows: Vec<(String, HealthStatus, &Endpoint)> = generation
        .endpoints
        .iter()
        .map(|e| {
            let labels = format!("endpoint=\"{}\",id=\"{}\"", escape(e.name()), e.id());
            (labels, e.health(), e.as_ref())
        })
        .collect();
    let per_endpoint = |value: &dyn Fn(&HealthStatus, &Endpoint) -> f64| -> Vec<(String, f64)> {
        rows.iter()
            .map(|(l, h, e)| (l.clone(), value(h, e)))
            .collect()
    };
    let attempts: Vec<(String, f64)> = rows
        .iter()
        .flat_map(|(labels, h, _)| {
            [
                (
                    format!("{labels},outcome=\"success\""),
                    (h.total_requests - h.failed_requests) as f64,
                ),
                (
                    format!("{labels},outcome=\"failure\""),
                    h.failed_requests as f64,
                ),
            ]
        })
        .collect();
    write_family(
        out,
        "failover_proxy_endpoint_attempts_total",
        "counter",
        "Upstream attempts recorded in an endpoint's health, by outcome.",
        &attempts,
    );
    write_family(
        out,
        "failover_proxy_endpoint_in_flight",
        "gauge",
        "Requests in flight to an endpoint right now.",
        &per_endpoint(&|_, e| e.in_flight() as f64),
    );
    write_family(
        out,
        "failover_proxy_endpoint_eligible",
        "gauge",
        "1 while an endpoint gets traffic (enabled, not queued, not cooling down, quota not spent).",
        &per_endpoint(&|_, e| f64::from(u8::from(state.is_eligible(e, now)))),
    );
    write_family(
        out,
        "failover_proxy_endpoint_consecutive_failures",
        "gauge",
        "An endpoint's current run of failures.",
        &per_endpoint(&|h, _| f64::from(h.consecutive_failures)),
    );
    write_family(
        out,
        "failover_proxy_endpoint_probes_total",
        "counter",
        "Recovery probes sent to an endpoint.",
        &per_endpoint(&|_, e| e.probes() as f64),
    );
}

/// Tokens by endpoint, model and kind (the contract's labels), and the estimated cost
/// where the config prices the model.
fn usage_families(out: &mut String, state: &State) {
    let generation = state.current();
    let prices = &generation.config.prices;
    let mut tokens = Vec::new();
    let mut costs = Vec::new();
    for e in &generation.endpoints {
        for (model, u) in e.usage().by_model() {
            let labels = format!(
                "endpoint=\"{}\",model=\"{}\"",
                escape(e.name()),
                escape(model)
            );
            for (kind, n) in u.kinds() {
                tokens.push((format!("{labels},type=\"{kind}\""), n as f64));
            }
            if let Some(price) = price_of(prices, model) {
                costs.push((labels, price.cost(u)));
            }
        }
    }
    write_family(
        out,
        "failover_proxy_tokens_total",
        "counter",
        "Tokens the upstreams reported using, by endpoint, model and kind.",
        &tokens,
    );
    write_family(
        out,
        "failover_proxy_cost_usd_total",
        "counter",
        "Estimated cost in USD of those tokens, for the models the config prices.",
        &costs,
    );
}

/// The last rate-limit report of each endpoint that had one.
fn quota_families(out: &mut String, state: &State) {
    let generation = state.current();
    let now = Instant::now();
    let mut requests = Vec::new();
    let mut tokens = Vec::new();
    let mut utilization = Vec::new();
    let mut spent = Vec::new();
    for e in &generation.endpoints {
        let labels = format!("endpoint=\"{}\",id=\"{}\"", escape(e.name()), e.id());
        spent.push((labels.clone(), f64::from(u8::from(e.is_spent(now)))));
        let Some(report) = e.quota().report else {
            continue;
        };
        if let Some(n) = report.requests.remaining {
            requests.push((labels.clone(), n as f64));
        }
        if let Some(n) = report.tokens_remaining() {
            tokens.push((labels.clone(), n as f64));
        }
        for (window, value) in [("5h", report.utilization_5h), ("7d", report.utilization_7d)] {
            if let Some(v) = value {
                utilization.push((format!("{labels},window=\"{window}\""), v));
            }
        }
    }
    let families = [
        (
            "failover_proxy_quota_requests_remaining",
            "Requests left, as an endpoint's last answer said.",
            requests,
        ),
        (
            "failover_proxy_quota_tokens_remaining",
            "Tokens left under the tightest token limit, as an endpoint's last answer said.",
            tokens,
        ),
        (
            "failover_proxy_quota_utilization",
            "A subscription window's utilization (a fraction), as an endpoint's last answer said.",
            utilization,
        ),
        (
            "failover_proxy_quota_spent",
            "1 while an endpoint is skipped because its quota is spent.",
            spent,
        ),
    ];
    for (name, help, samples) in families {
        write_family(out, name, "gauge", help, &samples);
    }
}

fn queue_families(out: &mut String, state: &State) {
    let (queued, stats) = state.queue.snapshot();
    write_family(
        out,
        "failover_proxy_failure_queue_size",
        "gauge",
        "Endpoints in the failure queue now.",
        &bare(queued.len() as f64),
    );
    write_family(
        out,
        "failover_proxy_failure_queue_entries_total",
        "counter",
        "Entries into the failure queue (an endpoint already queued is not counted again).",
        &bare(stats.total_failed as f64),
    );
    write_family(
        out,
        "failover_proxy_probes_total",
        "counter",
        "Recovery probes of queued endpoints, by result.",
        &[
            ("result=\"recovered\"".into(), stats.total_recovered as f64),
            (
                "result=\"still_failed\"".into(),
                stats.total_still_failed as f64,
            ),
        ],
    );
}

fn duration_histogram(out: &mut String, h: &Histogram) {
    let name = "failover_proxy_request_duration_seconds";
    family(
        out,
        name,
        "histogram",
        "Time from a client request's arrival to the end of its answer.",
    );
    let mut cumulative = 0;
    for (i, bound) in BUCKETS.iter().enumerate() {
        cumulative += h.counts[i].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += h.counts[BUCKETS.len()].load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum {sum:.6}");
    let _ = writeln!(out, "{name}_count {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(70));
        h.observe(Duration::from_secs(1000));
        let mut out = String::new();
        duration_histogram(&mut out, &h);
        assert!(out.contains("_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("_bucket{le=\"300\"} 2\n"), "{out}");
        assert!(out.contains("_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("_count 3\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
