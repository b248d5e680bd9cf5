//! `GET /__qcc__/stats`: qcc's stats and more, as JSON, from owned snapshots (each
//! endpoint's health, its per-minute history and its next probe time).

use crate::state::endpoint::{Endpoint, EndpointId};
use crate::state::shared::State;
use crate::time::{iso8601, unix_seconds};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

/// qcc's stats, and more: see the contract's admin section for the fields.
pub fn stats(state: &State) -> Value {
    let generation = state.current();
    let now = Instant::now();
    let (queued, queue_stats) = state.queue.snapshot();
    let ids: Vec<EndpointId> = generation.endpoints.iter().map(|e| e.id()).collect();
    state.history.retain(&ids);
    let endpoints: Vec<Value> = generation
        .endpoints
        .iter()
        .map(|e| endpoint_stats(state, e, now))
        .collect();
    let healthy = endpoints
        .iter()
        .filter(|e| e["is_healthy"] == Value::Bool(true))
        .count();
    let c = &state.counters;
    json!({
        "total_requests": c.total_requests.load(Ordering::Relaxed),
        "successful_requests": c.successful_requests.load(Ordering::Relaxed),
        "failed_requests": c.failed_requests.load(Ordering::Relaxed),
        "start_time": iso8601(state.start_time),
        "uptime": state.started.elapsed().as_secs_f64(),
        "last_used_endpoint_id": state.last_used().map(|id| id.to_string()),
        "strategy": generation.config.strategy.name(),
        "total_endpoints": endpoints.len(),
        "healthy_endpoints": healthy,
        "endpoints": endpoints,
        "failed_endpoints": queued.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
        "failure_queue_size": queued.len(),
        "endpoint_verify_counts": generation
            .endpoints
            .iter()
            .map(|e| (e.id().to_string(), Value::from(e.probes())))
            .collect::<serde_json::Map<String, Value>>(),
        "failure_queue_stats": {
            "total_failed": queue_stats.total_failed,
            "total_verified": queue_stats.total_verified,
            "total_recovered": queue_stats.total_recovered,
            "total_still_failed": queue_stats.total_still_failed,
        },
    })
}

pub(super) fn endpoint_stats(state: &State, e: &Endpoint, now: Instant) -> Value {
    let h = e.health();
    let wall = SystemTime::now();
    let cooldown_until = h
        .cooldown_until
        .filter(|&until| until > now)
        .map(|until| iso8601(wall + (until - now)));
    let next_probe_at = next_probe_at(state, e).map(|at| iso8601(wall_time(at, now, wall)));
    json!({
        "id": e.id().to_string(),
        "name": e.name(),
        "base_url": e.config.base_url,
        "priority": e.config.priority,
        "weight": e.config.weight,
        "enabled": e.is_enabled(),
        "health_status": {
            "status": h.status.as_str(),
            "consecutive_failures": h.consecutive_failures,
            "total_requests": h.total_requests,
            "failed_requests": h.failed_requests,
            "success_rate": h.success_rate(),
            "avg_response_time": h.avg_response_time,
            "last_error": h.last_error,
            "last_check": h.last_check.map(iso8601),
            "last_check_unix": h.last_check.map(unix_seconds),
        },
        "is_healthy": state.is_eligible(e, now),
        "in_flight": e.in_flight(),
        "cooldown_until": cooldown_until,
        "next_probe_at": next_probe_at,
        "history": history(state, e.id(), wall),
    })
}

/// When a queued, enabled endpoint may next be probed, as the recovery schedule has it.
/// `None` for an endpoint that is not queued, is disabled (it gets no probes), or was
/// queued since the last round (the next round probes it). A time in the past means
/// it is due: the recovery thread probes it on its next tick.
fn next_probe_at(state: &State, e: &Endpoint) -> Option<Instant> {
    if !e.is_enabled() || !state.queue.contains(e.id()) {
        return None;
    }
    state.schedule.next_probe_at(e.id())
}

/// The wall-clock time of `at`, given that `now` is `wall`.
fn wall_time(at: Instant, now: Instant, wall: SystemTime) -> SystemTime {
    if at >= now {
        wall + (at - now)
    } else {
        wall - (now - at)
    }
}

/// The last 60 minutes of an endpoint's attempts, oldest first (see `state/history.rs`).
fn history(state: &State, id: EndpointId, wall: SystemTime) -> Value {
    let samples = state.history.samples(id, wall);
    let minutes: Vec<Value> = samples
        .iter()
        .map(|s| {
            json!({
                "start": s.start,
                "requests": s.requests,
                "errors": s.errors,
                "p50_ms": s.p50_ms.map(round_ms),
                "p95_ms": s.p95_ms.map(round_ms),
            })
        })
        .collect();
    Value::Array(minutes)
}

/// Milliseconds to a tenth: the estimate is no finer than its buckets.
fn round_ms(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}
