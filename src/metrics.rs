//! `/__qcc__/metrics`: the same numbers as `/__qcc__/stats`, in Prometheus text format
//! (version 0.0.4), plus a histogram of client request durations.
//!
//! Built from the same snapshots as the stats, so the two agree exactly after a run.

use crate::state::State;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the duration buckets, in seconds: LLM requests run from milliseconds
/// (errors, count_tokens) to many minutes (long streams).
pub const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A cumulative-on-read histogram: each observation increments one bucket.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

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

pub fn render(state: &State) -> String {
    let mut out = String::with_capacity(4096);
    let c = &state.counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    family(
        &mut out,
        "failover_proxy_requests_total",
        "counter",
        "Client requests answered, by outcome (success: status below 400).",
    );
    let _ = writeln!(
        out,
        "failover_proxy_requests_total{{outcome=\"success\"}} {}",
        load(&c.successful_requests)
    );
    let _ = writeln!(
        out,
        "failover_proxy_requests_total{{outcome=\"failure\"}} {}",
        load(&c.failed_requests)
    );
    family(
        &mut out,
        "failover_proxy_failovers_total",
        "counter",
        "Client requests answered by an endpoint other than the first one tried.",
    );
    let _ = writeln!(out, "failover_proxy_failovers_total {}", load(&c.failovers));
    endpoint_families(&mut out, state);
    queue_families(&mut out, state);
    duration_histogram(&mut out, &c.latency);
    family(
        &mut out,
        "failover_proxy_uptime_seconds",
        "gauge",
        "Seconds since the proxy started.",
    );
    let _ = writeln!(
        out,
        "failover_proxy_uptime_seconds {:.3}",
        state.started.elapsed().as_secs_f64()
    );
    out
}

fn endpoint_families(out: &mut String, state: &State) {
    let generation = state.current();
    let now = Instant::now();
    let rows: Vec<(
        String,
        crate::health::HealthStatus,
        &crate::endpoint::Endpoint,
    )> = generation
        .endpoints
        .iter()
        .map(|e| {
            let labels = format!("endpoint=\"{}\",id=\"{}\"", escape(e.name()), e.id());
            (labels, e.health(), e.as_ref())
        })
        .collect();
    family(
        out,
        "failover_proxy_endpoint_attempts_total",
        "counter",
        "Upstream attempts recorded in an endpoint's health, by outcome.",
    );
    for (labels, h, _) in &rows {
        let _ = writeln!(
            out,
            "failover_proxy_endpoint_attempts_total{{{labels},outcome=\"success\"}} {}",
            h.total_requests - h.failed_requests
        );
        let _ = writeln!(
            out,
            "failover_proxy_endpoint_attempts_total{{{labels},outcome=\"failure\"}} {}",
            h.failed_requests
        );
    }
    family(
        out,
        "failover_proxy_endpoint_in_flight",
        "gauge",
        "Requests in flight to an endpoint right now.",
    );
    for (labels, _, e) in &rows {
        let _ = writeln!(
            out,
            "failover_proxy_endpoint_in_flight{{{labels}}} {}",
            e.in_flight()
        );
    }
    family(
        out,
        "failover_proxy_endpoint_eligible",
        "gauge",
        "1 while an endpoint gets traffic (enabled, not queued, not cooling down).",
    );
    for (labels, _, e) in &rows {
        let _ = writeln!(
            out,
            "failover_proxy_endpoint_eligible{{{labels}}} {}",
            state.is_eligible(e, now) as u8
        );
    }
    family(
        out,
        "failover_proxy_endpoint_consecutive_failures",
        "gauge",
        "An endpoint's current run of failures.",
    );
    for (labels, h, _) in &rows {
        let _ = writeln!(
            out,
            "failover_proxy_endpoint_consecutive_failures{{{labels}}} {}",
            h.consecutive_failures
        );
    }
    family(
        out,
        "failover_proxy_endpoint_probes_total",
        "counter",
        "Recovery probes sent to an endpoint.",
    );
    for (labels, _, e) in &rows {
        let _ = writeln!(
            out,
            "failover_proxy_endpoint_probes_total{{{labels}}} {}",
            e.probes()
        );
    }
}

fn queue_families(out: &mut String, state: &State) {
    let (queued, stats) = state.queue.snapshot();
    family(
        out,
        "failover_proxy_failure_queue_size",
        "gauge",
        "Endpoints in the failure queue now.",
    );
    let _ = writeln!(out, "failover_proxy_failure_queue_size {}", queued.len());
    family(
        out,
        "failover_proxy_failure_queue_entries_total",
        "counter",
        "Entries into the failure queue (an endpoint already queued is not counted again).",
    );
    let _ = writeln!(
        out,
        "failover_proxy_failure_queue_entries_total {}",
        stats.total_failed
    );
    family(
        out,
        "failover_proxy_probes_total",
        "counter",
        "Recovery probes of queued endpoints, by result.",
    );
    let _ = writeln!(
        out,
        "failover_proxy_probes_total{{result=\"recovered\"}} {}",
        stats.total_recovered
    );
    let _ = writeln!(
        out,
        "failover_proxy_probes_total{{result=\"still_failed\"}} {}",
        stats.total_still_failed
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
