//! `GET /__qcc__/stats`: qcc's stats and more, as JSON, from owned snapshots (each
//! endpoint's health, its per-minute history and its next probe time).

use crate::state::endpoint::{Endpoint, EndpointId, Quota};
use crate::state::shared::State;
use crate::time::{iso8601, unix_seconds};
use crate::usage::{Book, Price, Usage, cost, price_of, total, utc_day};
use serde_json::{Value, json};
use std::collections::BTreeMap;
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
    let next_probe_at = next_probe_at(state, e).map(iso8601);
    let config = &state.current().config;
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
        "usage": usage(&config.prices, &e.usage(), wall),
        "quota": quota(&e.quota(), config.quota_reserve, now, wall),
    })
}

/// Tokens since start and on the current UTC day, each by kind, with the estimated cost
/// where `prices` prices the models; and since start by model.
fn usage(prices: &BTreeMap<String, Price>, book: &Book, wall: SystemTime) -> Value {
    let by_model: serde_json::Map<String, Value> = book
        .by_model()
        .iter()
        .map(|(model, u)| {
            let cost = price_of(prices, model).map(|p| p.cost(u));
            (model.clone(), usage_fields(u, cost))
        })
        .collect();
    let sum = |models: &BTreeMap<String, Usage>| usage_fields(&total(models), cost(prices, models));
    let mut all = sum(book.by_model());
    all["today"] = sum(&book.today(utc_day(wall)));
    all["by_model"] = Value::Object(by_model);
    all
}

fn usage_fields(u: &Usage, cost: Option<f64>) -> Value {
    json!({
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "cost_usd": cost,
    })
}

/// The last rate-limit report (every field null until an answer carried one) and, while
/// it keeps the endpoint out of rotation, until when.
fn quota(quota: &Quota, reserve: u64, now: Instant, wall: SystemTime) -> Value {
    let r = quota.report.clone().unwrap_or_default();
    let skipped_until = quota
        .skip_until
        .filter(|&until| until > now)
        .map(|until| iso8601(wall + (until - now)));
    json!({
        "requests_remaining": r.requests.remaining,
        "tokens_remaining": r.tokens_remaining(),
        "reset": r.reset(reserve).map(iso8601),
        "unified_status": r.unified_status,
        "unified_reset": r.unified_reset.map(iso8601),
        "utilization_5h": r.utilization_5h,
        "utilization_7d": r.utilization_7d,
        "skipped_until": skipped_until,
    })
}

/// When a queued, enabled endpoint may next be probed, as the recovery schedule has it.
/// `None` for an endpoint that is not queued, is disabled (it gets no probes), or was
/// queued since the last round (the next round probes it). A time in the past means
/// it is due: the recovery thread probes it on its next tick.
fn next_probe_at(state: &State, e: &Endpoint) -> Option<SystemTime> {
    if !e.is_enabled() || !state.queue.contains(e.id()) {
        return None;
    }
    state.schedule.next_probe_at(e.id())
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
