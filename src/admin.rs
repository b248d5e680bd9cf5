//! The admin API under `/__qcc__/`, answered by the proxy itself from snapshots.
//!
//! Every answer is built from owned snapshots (`Endpoint::health`, `FailureQueue::snapshot`),
//! so no lock is held while JSON is built or written. Keys never appear: endpoints are
//! named by name and id only.

use crate::endpoint::Endpoint;
use crate::forward::send_error;
use crate::http_out::ClientOut;
use crate::recovery::{self, Report};
use crate::state::State;
use crate::time::{iso8601, unix_seconds};
use crate::upstream::ClientRequest;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

pub const PREFIX: &str = "/__qcc__";

pub fn is_admin_path(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or(target);
    path == PREFIX || path.starts_with("/__qcc__/")
}

/// Answers an admin request; returns the status sent.
pub fn serve(
    state: &State,
    request: &ClientRequest,
    remote: Option<SocketAddr>,
    out: &mut ClientOut,
) -> u16 {
    if !allowed(state, request, remote) {
        send_error(out, 401, "authentication_error", "the admin API needs admin_token");
        return 401;
    }
    let path = request.target.split('?').next().unwrap_or("");
    let route = path.trim_start_matches(PREFIX).trim_end_matches('/');
    let (status, body) = match (request.method.as_str(), route) {
        ("GET", "/stats") => (200, stats(state)),
        ("GET", "/health") => health(state),
        ("POST", "/queue/retry") => (200, reports(&recovery::round(state, true))),
        ("POST", "/queue/clear") => {
            let ids: Vec<String> = recovery::clear(state).iter().map(|id| id.to_string()).collect();
            (200, json!({ "cleared": ids }))
        }
        _ => {
            send_error(out, 404, "not_found_error", &format!("no admin route {path}"));
            return 404;
        }
    };
    let _client_may_be_gone = out.send(status, "application/json", body.to_string().as_bytes());
    status
}

/// Loopback clients, or any client with `admin_token` as a Bearer token.
fn allowed(state: &State, request: &ClientRequest, remote: Option<SocketAddr>) -> bool {
    if remote.is_some_and(|r| r.ip().is_loopback()) {
        return true;
    }
    let generation = state.current();
    let Some(token) = &generation.config.admin_token else {
        return false;
    };
    request
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|presented| token.matches(presented.trim()))
}

fn reports(reports: &[Report]) -> Value {
    let probed: Vec<Value> = reports
        .iter()
        .map(|r| {
            json!({
                "id": r.id.to_string(),
                "name": r.name,
                "recovered": r.result.recovered,
                "detail": r.result.detail,
            })
        })
        .collect();
    json!({ "probed": probed })
}

/// 200 while some endpoint is eligible, else 503.
fn health(state: &State) -> (u16, Value) {
    let generation = state.current();
    let now = Instant::now();
    let eligible = generation
        .endpoints
        .iter()
        .filter(|e| state.is_eligible(e, now))
        .count();
    let status = if eligible > 0 { 200 } else { 503 };
    let word = if eligible > 0 { "ok" } else { "unavailable" };
    (status, json!({ "status": word, "eligible_endpoints": eligible }))
}

/// qcc's stats, and more: see the contract's admin section for the fields.
pub fn stats(state: &State) -> Value {
    let generation = state.current();
    let now = Instant::now();
    let (queued, queue_stats) = state.queue.snapshot();
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

fn endpoint_stats(state: &State, e: &Endpoint, now: Instant) -> Value {
    let h = e.health();
    let wall = SystemTime::now();
    let cooldown_until = h
        .cooldown_until
        .filter(|&until| until > now)
        .map(|until| iso8601(wall + (until - now)));
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
    })
}
