//! The admin API under `/__qcc__/`, answered by the proxy itself from snapshots.
//!
//! Every answer is built from owned snapshots (`Endpoint::health`, `FailureQueue::snapshot`),
//! so no lock is held while JSON is built or written. Keys never appear: endpoints are
//! named by name and id only.

use crate::endpoint::{Endpoint, EndpointId};
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
        send_error(
            out,
            401,
            "authentication_error",
            "the admin API needs admin_token",
        );
        return 401;
    }
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((request.target.as_str(), ""));
    let route = path.trim_start_matches(PREFIX).trim_end_matches('/');
    let answer = match (request.method.as_str(), route) {
        ("GET", "") => Answer::Page(STATUS_PAGE),
        ("GET", "/stats") => Answer::Json(200, stats(state)),
        ("GET", "/health") => health(state),
        ("GET", "/metrics") => Answer::Metrics(crate::metrics::render(state)),
        ("GET", "/logs") => logs(state, query),
        ("POST", "/queue/retry") => Answer::Json(200, reports(&recovery::round(state, true))),
        ("POST", "/queue/clear") => {
            let ids: Vec<String> = recovery::clear(state)
                .iter()
                .map(|id| id.to_string())
                .collect();
            Answer::Json(200, json!({ "cleared": ids }))
        }
        ("POST", "/reload") => match state.reload_from_source() {
            Ok(()) => Answer::Json(200, json!({ "reloaded": true })),
            Err(e) => Answer::Error(400, "invalid_request_error", format!("reload refused: {e}")),
        },
        ("POST", r) if r.starts_with("/endpoints/") => switch_endpoint(state, r),
        _ => Answer::Error(
            404,
            "not_found_error",
            format!("no admin route {} {path}", request.method),
        ),
    };
    answer.send(out)
}

/// What an admin route answers; `send` writes it and returns the status.
enum Answer {
    Json(u16, Value),
    Page(&'static str),
    Metrics(String),
    Error(u16, &'static str, String),
}

impl Answer {
    fn send(self, out: &mut ClientOut) -> u16 {
        let (status, content_type, body) = match self {
            Answer::Json(status, v) => (status, "application/json", v.to_string().into_bytes()),
            Answer::Page(html) => (200, "text/html; charset=utf-8", html.as_bytes().to_vec()),
            Answer::Metrics(text) => (200, "text/plain; version=0.0.4", text.into_bytes()),
            Answer::Error(status, kind, message) => {
                send_error(out, status, kind, &message);
                return status;
            }
        };
        let _client_may_be_gone = out.send(status, content_type, &body);
        status
    }
}

/// `POST /__qcc__/endpoints/{id}/enable` or `/disable`.
fn switch_endpoint(state: &State, route: &str) -> Answer {
    let parts: Vec<&str> = route.trim_start_matches("/endpoints/").split('/').collect();
    let [id, action] = parts[..] else {
        return Answer::Error(404, "not_found_error", format!("no admin route {route}"));
    };
    let on = match action {
        "enable" => true,
        "disable" => false,
        _ => return Answer::Error(404, "not_found_error", format!("no admin route {route}")),
    };
    let generation = state.current();
    let Some(endpoint) = EndpointId::parse(id).and_then(|id| generation.endpoint(id)) else {
        return Answer::Error(
            404,
            "not_found_error",
            format!("no endpoint with id {id:?}"),
        );
    };
    endpoint.set_enabled(on);
    log::info!(
        "endpoint {} ({}) {} by the operator",
        endpoint.name(),
        endpoint.id(),
        if on { "enabled" } else { "disabled" }
    );
    Answer::Json(200, endpoint_stats(state, endpoint, Instant::now()))
}

/// `GET /__qcc__/logs?lines=N&level=LEVEL&grep=TEXT`: the tail of `--log-file`.
fn logs(state: &State, query: &str) -> Answer {
    let Some(path) = state.source.get().and_then(|s| s.log_file.clone()) else {
        return Answer::Error(
            404,
            "not_found_error",
            "no log file: start serve with --log-file".into(),
        );
    };
    let params = parse_query(query);
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let lines = param("lines")
        .and_then(|n| n.parse().ok())
        .unwrap_or(100usize)
        .min(10_000);
    let min_level = param("level").and_then(|l| l.parse::<log::Level>().ok());
    let grep = param("grep").unwrap_or("");
    let tail = match crate::logfile::tail(&path, lines, min_level, grep) {
        Ok(tail) => tail,
        Err(e) => return Answer::Error(500, "api_error", format!("cannot read the log file: {e}")),
    };
    Answer::Json(
        200,
        json!({ "file": path.display().to_string(), "lines": tail }),
    )
}

/// `a=1&b=x%20y` → pairs, percent-decoded (`+` is a space, as forms send it).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
fn health(state: &State) -> Answer {
    let generation = state.current();
    let now = Instant::now();
    let eligible = generation
        .endpoints
        .iter()
        .filter(|e| state.is_eligible(e, now))
        .count();
    let status = if eligible > 0 { 200 } else { 503 };
    let word = if eligible > 0 { "ok" } else { "unavailable" };
    Answer::Json(
        status,
        json!({ "status": word, "eligible_endpoints": eligible }),
    )
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

/// The status page: self-contained HTML that polls `/__qcc__/stats`.
const STATUS_PAGE: &str = include_str!("status_page.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let q = parse_query("lines=20&grep=entered%20the+queue&level=warn&flag");
        assert_eq!(q[0], ("lines".into(), "20".into()));
        assert_eq!(q[1], ("grep".into(), "entered the queue".into()));
        assert_eq!(q[3], ("flag".into(), "".into()));
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn admin_paths() {
        assert!(is_admin_path("/__qcc__/stats?x=1"));
        assert!(is_admin_path("/__qcc__"));
        assert!(!is_admin_path("/__qcc__x"));
        assert!(!is_admin_path("/v1/messages"));
    }
}
