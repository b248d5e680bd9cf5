//! The admin API's routes: `serve` checks access (`access`), then answers each `/__qcc__/`
//! route (the status page, stats, health, metrics, logs, the queue actions, reload, an
//! endpoint enabled or disabled), and the browser paths for anyone.
//!
//! Every answer is built from owned snapshots (`Endpoint::health`, `FailureQueue::snapshot`),
//! so no lock is held while JSON is built or written. Keys never appear: endpoints are
//! named by name and id only.

use crate::server::admin::access::access;
use crate::server::admin::answer::{Answer, STATUS_PAGE};
use crate::server::admin::logs::logs;
use crate::server::admin::metrics;
use crate::server::admin::paths::{PREFIX, is_browser_path, path_of};
use crate::server::admin::stats::{endpoint_stats, stats};
use crate::server::http_out::ClientOut;
use crate::state::endpoint::EndpointId;
use crate::state::recovery::{self, Report};
use crate::state::shared::State;
use crate::upstream::call::ClientRequest;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Instant;

/// Answers an admin request; returns the status sent. `listen` is the address the server
/// bound (its real port, also when the config asked for port 0).
pub fn serve(
    state: &State,
    request: &ClientRequest,
    remote: Option<SocketAddr>,
    listen: SocketAddr,
    out: &mut ClientOut,
) -> u16 {
    if is_browser_path(&request.target) {
        return browser_path(request).send(out);
    }
    if let Err(denied) = access(&state.current().config, listen, remote, request) {
        let from = remote.map_or("-".to_string(), |r| r.to_string());
        log::info!("admin request from {from} refused (403): {}", denied.0);
        return denied.send(out);
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
        ("GET", "/metrics") => Answer::Metrics(metrics::render(state)),
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

/// `GET /favicon.ico`: 204, cached for a day, so a browser neither shows a broken icon
/// nor asks again on every page (the status page carries its own icon inline).
/// `GET /robots.txt`: keep crawlers out of a proxy that is on a network.
fn browser_path(request: &ClientRequest) -> Answer {
    let method = request.method.as_str();
    match (method, path_of(&request.target)) {
        ("GET" | "HEAD", "/favicon.ico") => Answer::NoIcon,
        ("GET" | "HEAD", _) => Answer::Robots,
        (_, path) => Answer::Error(
            405,
            "invalid_request_error",
            format!("{path} answers GET and HEAD only"),
        ),
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
