//! The admin API under `/__qcc__/`, answered by the proxy itself from snapshots.
//!
//! Every answer is built from owned snapshots (`Endpoint::health`, `FailureQueue::snapshot`),
//! so no lock is held while JSON is built or written. Keys never appear: endpoints are
//! named by name and id only.

use crate::config::validated::Config;
use crate::forward::failover::send_error;
use crate::server::http_out::{ClientOut, Framing};
use crate::state::endpoint::{Endpoint, EndpointId};
use crate::state::recovery::{self, Report};
use crate::state::shared::State;
use crate::time::{iso8601, unix_seconds};
use crate::upstream::call::ClientRequest;
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};
use ureq::http::Method;

pub const PREFIX: &str = "/__qcc__";

/// What a browser or a crawler asks a web server for by itself. Forwarded, each would
/// reach an upstream with the endpoint's key and count as a failed request there; the
/// proxy answers them itself, to anyone, since they say nothing about it.
const BROWSER_PATHS: [&str; 2] = ["/favicon.ico", "/robots.txt"];

/// The paths the proxy answers itself instead of forwarding: the admin API under
/// `/__qcc__/` and `BROWSER_PATHS`. None of them counts as a request or touches an
/// endpoint.
pub fn is_admin_path(target: &str) -> bool {
    let path = path_of(target);
    path == PREFIX || path.starts_with("/__qcc__/") || is_browser_path(target)
}

fn is_browser_path(target: &str) -> bool {
    BROWSER_PATHS.contains(&path_of(target))
}

fn path_of(target: &str) -> &str {
    target.split('?').next().unwrap_or(target)
}

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
        ("GET", "/metrics") => Answer::Metrics(crate::server::admin::metrics::render(state)),
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

/// What an admin route answers; `send` writes it and returns the status.
enum Answer {
    Json(u16, Value),
    Page(&'static str),
    Metrics(String),
    NoIcon,
    Robots,
    Error(u16, &'static str, String),
}

/// The status page's headers. It runs its own inline script and style and talks to its
/// own origin only; `frame-ancestors 'none'` (and `x-frame-options` for older browsers)
/// keeps another site from framing it to steer an operator's click onto its buttons,
/// which the same-origin rule of `access` could not tell from a real one.
const PAGE_HEADERS: [(&str, &[u8]); 5] = [
    ("content-type", b"text/html; charset=utf-8"),
    (
        "content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
          img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
          frame-ancestors 'none'",
    ),
    ("x-frame-options", b"DENY"),
    ("cache-control", b"no-store"),
    ("referrer-policy", b"no-referrer"),
];

const ROBOTS_TXT: &str = "User-agent: *\nDisallow: /\n";

impl Answer {
    fn send(self, out: &mut ClientOut) -> u16 {
        let (status, content_type, body) = match self {
            Answer::Json(status, v) => (status, "application/json", v.to_string().into_bytes()),
            Answer::Page(html) => return send_with(out, 200, &PAGE_HEADERS, html.as_bytes()),
            Answer::Metrics(text) => (200, "text/plain; version=0.0.4", text.into_bytes()),
            Answer::NoIcon => {
                let headers = [("cache-control", &b"max-age=86400"[..])];
                if let Ok(sink) = out.start(204, &headers, Framing::NoBody) {
                    let _client_may_be_gone = sink.finish();
                }
                return 204;
            }
            Answer::Robots => {
                let headers = [
                    ("content-type", &b"text/plain; charset=utf-8"[..]),
                    ("cache-control", b"max-age=86400"),
                ];
                return send_with(out, 200, &headers, ROBOTS_TXT.as_bytes());
            }
            Answer::Error(status, kind, message) => {
                send_error(out, status, kind, &message);
                return status;
            }
        };
        let _client_may_be_gone = out.send(status, content_type, &body);
        status
    }
}

/// A complete answer with these headers (the framing is added); returns the status.
fn send_with(out: &mut ClientOut, status: u16, headers: &[(&str, &[u8])], body: &[u8]) -> u16 {
    let length = Framing::Length(body.len() as u64);
    if let Ok(mut sink) = out.start(status, headers, length)
        && sink.write_piece(body).is_ok()
    {
        let _client_may_be_gone = sink.finish();
    }
    status
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
    let tail = match crate::server::admin::logfile::tail(&path, lines, min_level, grep) {
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

/// Why an admin request was refused. Every refusal is 403 `permission_error`, whatever
/// failed: the contract names 403, a wrong token is just a request without the admin
/// token, and one answer tells a prober nothing about whether `admin_token` is set. The
/// message says what to do instead; it never repeats what the client sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied(pub &'static str);

impl Denied {
    pub const STATUS: u16 = 403;

    /// Writes the 403 in Anthropic's error shape; returns the status sent.
    pub fn send(self, out: &mut ClientOut) -> u16 {
        send_error(out, Self::STATUS, "permission_error", self.0);
        Self::STATUS
    }
}

const NOT_LOOPBACK: Denied =
    Denied("the admin API answers other machines only with admin_token as Authorization: Bearer");
const FORWARDED: Denied = Denied(
    "this admin request came through another proxy: send admin_token as Authorization: Bearer",
);
const BAD_HOST: Denied = Denied(
    "the admin API needs a loopback Host (localhost, 127.0.0.1 or [::1]) or the listen \
     address, or admin_token as Authorization: Bearer",
);
const FOREIGN_ORIGIN: Denied = Denied(
    "the admin API does not answer other web pages: use the status page at /__qcc__/, a \
     client that sends no Origin (curl), or admin_token as Authorization: Bearer",
);
const CROSS_SITE: Denied = Denied(
    "a state-changing admin call must be same-origin (Sec-Fetch-Site same-origin or none): \
     use curl, or admin_token as Authorization: Bearer",
);

/// Decides from the request head alone whether the admin API may answer, so the server
/// can refuse before it reads a body byte. `listen` is the address the server bound.
///
/// The admin token as a Bearer token admits from anywhere: a web page has no way to learn
/// it. Without it, loopback is not enough, since a page in the user's browser connects
/// from loopback too: by DNS rebinding (its own name resolving to 127.0.0.1, so the
/// browser treats the proxy as that page's origin, but sends that name as `Host`), or by
/// a cross-origin request (which carries the page's `Origin`). So the `Host` must name
/// this machine's loopback or the listen address, an `Origin` must be the proxy's own,
/// and a call that changes state must not be cross-site. `/favicon.ico` and `/robots.txt`
/// are for anyone: their answers are fixed and say nothing about the proxy.
pub fn access(
    config: &Config,
    listen: SocketAddr,
    remote: Option<SocketAddr>,
    request: &ClientRequest,
) -> Result<(), Denied> {
    if is_browser_path(&request.target) || presents_admin_token(config, request) {
        return Ok(());
    }
    if !remote.is_some_and(|r| r.ip().to_canonical().is_loopback()) {
        return Err(NOT_LOOPBACK);
    }
    let relayed = |name: &str| request.headers.iter().any(|(n, _)| n.as_str() == name);
    if relayed("forwarded") || relayed("x-forwarded-for") {
        return Err(FORWARDED);
    }
    let host = single(request, "host")
        .ok()
        .flatten()
        .and_then(Authority::parse)
        .filter(|host| host.is_ours(listen))
        .ok_or(BAD_HOST)?;
    match single(request, "origin") {
        Ok(None) => {}
        Ok(Some(origin)) if is_origin_of(origin, &host) => {}
        _ => return Err(FOREIGN_ORIGIN),
    }
    if request.method != Method::GET && request.method != Method::HEAD {
        match single(request, "sec-fetch-site") {
            Ok(None | Some("same-origin" | "none")) => {}
            _ => return Err(CROSS_SITE),
        }
    }
    Ok(())
}

/// `Authorization: Bearer <admin_token>`, the scheme in any case (RFC 9110 makes it
/// case-insensitive). A wrong or absent token is not an error here: the request is then
/// judged as one without the token.
fn presents_admin_token(config: &Config, request: &ClientRequest) -> bool {
    let Some(token) = &config.admin_token else {
        return false;
    };
    let bearer = request.header("authorization").and_then(|value| {
        let (scheme, credentials) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(credentials.trim())
    });
    bearer.is_some_and(|presented| token.matches(presented))
}

/// The value of a header that may appear at most once. `Err` for two copies or a value
/// that is not visible ASCII: the check cannot tell which one a browser meant, so the
/// caller refuses rather than guess (a value `header()` cannot read must not count as
/// absent).
fn single<'a>(request: &'a ClientRequest, name: &str) -> Result<Option<&'a str>, ()> {
    let mut values = request
        .headers
        .iter()
        .filter(|(n, _)| n.as_str() == name)
        .map(|(_, v)| v.to_str());
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(Ok(value)), None) => Ok(Some(value.trim())),
        _ => Err(()),
    }
}

/// `Origin: http://` + the request's own `Host` (same name, same port once the default
/// 80 is filled in): the page that sent it was served by this proxy under the very name
/// and port the browser used for this request, which is what same-origin means. Any
/// other origin, `null`, or `https://` (the proxy speaks plain HTTP) is foreign.
fn is_origin_of(origin: &str, host: &Authority) -> bool {
    origin
        .strip_prefix("http://")
        .and_then(Authority::parse)
        .is_some_and(|origin| origin == *host)
}

/// A `Host` header (or the authority of an `Origin`) that names an address this check
/// can judge: the name `localhost` or an IP literal, with its port (80 when absent).
/// Anything else, `*.localhost` included, does not parse: RFC 6761 asks resolvers to
/// keep those names on loopback, but glibc's sends them to the DNS server, where a
/// hostile one could rebind them.
#[derive(Debug, PartialEq, Eq)]
struct Authority {
    /// `None` for `localhost`.
    ip: Option<IpAddr>,
    port: u16,
}

impl Authority {
    fn parse(text: &str) -> Option<Authority> {
        let (ip, port) = match text.strip_prefix('[') {
            Some(bracketed) => {
                let (ip, rest) = bracketed.split_once(']')?;
                let ip: Ipv6Addr = ip.parse().ok()?;
                let port = if rest.is_empty() {
                    None
                } else {
                    Some(rest.strip_prefix(':')?)
                };
                (Some(IpAddr::V6(ip).to_canonical()), port)
            }
            None => {
                let (name, port) = match text.rsplit_once(':') {
                    Some((name, port)) => (name, Some(port)),
                    None => (text, None),
                };
                let ip = if name.eq_ignore_ascii_case("localhost") {
                    None
                } else {
                    Some(IpAddr::V4(name.parse::<Ipv4Addr>().ok()?))
                };
                (ip, port)
            }
        };
        let port = match port {
            None => 80,
            Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                digits.parse().ok()?
            }
            Some(_) => return None,
        };
        Some(Authority { ip, port })
    }

    /// `localhost` or a loopback address with any port (an SSH tunnel may change it), or
    /// exactly the address the server listens on.
    fn is_ours(&self, listen: SocketAddr) -> bool {
        match self.ip {
            None => true,
            Some(ip) => {
                ip.is_loopback() || (ip == listen.ip().to_canonical() && self.port == listen.port())
            }
        }
    }
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

fn endpoint_stats(state: &State, e: &Endpoint, now: Instant) -> Value {
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

    const TOKEN: &str = "admin-secret-token-123";

    fn config(admin_token: Option<&str>) -> Config {
        let text = json!({
            "admin_token": admin_token,
            "endpoints": [{"base_url": "http://127.0.0.1:9", "api_key": "sk-test-0123456789"}],
        });
        let overrides = crate::config::validated::Overrides::default();
        Config::from_json(&text.to_string(), &overrides, &|_| None).expect("config")
    }

    fn request(method: Method, headers: &[(&str, &[u8])]) -> ClientRequest {
        let headers = headers
            .iter()
            .map(|(n, v)| {
                (
                    n.parse().unwrap(),
                    ureq::http::HeaderValue::from_bytes(v).unwrap(),
                )
            })
            .collect();
        ClientRequest {
            method,
            target: "/__qcc__/stats".into(),
            headers,
            body: Vec::new(),
        }
    }

    /// `access` for a request from 127.0.0.1 to a proxy bound to 127.0.0.1:7860.
    fn judge(method: Method, headers: &[(&str, &[u8])]) -> Result<(), Denied> {
        let listen = "127.0.0.1:7860".parse().unwrap();
        let remote = Some("127.0.0.1:50000".parse().unwrap());
        access(
            &config(Some(TOKEN)),
            listen,
            remote,
            &request(method, headers),
        )
    }

    #[test]
    fn hosts_that_name_this_machine() {
        let listen: SocketAddr = "192.0.2.1:7860".parse().unwrap();
        let ours = |host: &str| Authority::parse(host).is_some_and(|a| a.is_ours(listen));
        for host in [
            "localhost",
            "LocalHost:1",
            "127.0.0.1",
            "127.1.2.3:7860",
            "[::1]",
            "[::1]:9999",
            "[::ffff:127.0.0.1]:80",
            "192.0.2.1:7860",
        ] {
            assert!(ours(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:7860",
            "a.localhost",
            "localhost.",
            "localhost:",
            "localhost:+80",
            "localhost:65536",
            "127.0.0.1.evil.example",
            "2130706433",
            "::1",
            "[::1",
            "[127.0.0.1]",
            "[::1]x",
            "user@localhost",
            "192.0.2.1",
            "192.0.2.1:7861",
            "192.0.2.2:7860",
        ] {
            assert!(!ours(host), "{host:?}");
        }
    }

    #[test]
    fn loopback_without_token_needs_a_loopback_host() {
        assert_eq!(judge(Method::GET, &[("host", b"localhost:7860")]), Ok(()));
        assert_eq!(judge(Method::GET, &[]), Err(BAD_HOST));
        assert_eq!(
            judge(Method::GET, &[("host", b"evil.example")]),
            Err(BAD_HOST)
        );
        let two_hosts: &[(&str, &[u8])] = &[("host", b"localhost"), ("host", b"evil.example")];
        assert_eq!(judge(Method::GET, two_hosts), Err(BAD_HOST));
        // A wrong token changes nothing: the request is judged as one without a token.
        let wrong = &[
            ("host", &b"localhost"[..]),
            ("authorization", b"Bearer nope"),
        ];
        assert_eq!(judge(Method::GET, wrong), Ok(()));
    }

    #[test]
    fn the_remote_must_be_loopback() {
        let listen = "127.0.0.1:7860".parse().unwrap();
        let plain = request(Method::GET, &[("host", b"127.0.0.1:7860")]);
        let from = |remote: Option<&str>| {
            let remote = remote.map(|r| r.parse().unwrap());
            access(&config(None), listen, remote, &plain)
        };
        assert_eq!(from(Some("[::1]:5000")), Ok(()));
        assert_eq!(from(Some("[::ffff:127.0.0.1]:5000")), Ok(()));
        assert_eq!(from(Some("192.0.2.7:5000")), Err(NOT_LOOPBACK));
        assert_eq!(from(None), Err(NOT_LOOPBACK));
    }

    #[test]
    fn the_admin_token_admits_from_anywhere() {
        let listen = "127.0.0.1:7860".parse().unwrap();
        let remote = Some("192.0.2.7:5000".parse().unwrap());
        let hostile: &[(&str, &[u8])] = &[
            ("host", b"evil.example"),
            ("origin", b"http://evil.example"),
            ("sec-fetch-site", b"cross-site"),
            ("x-forwarded-for", b"192.0.2.8"),
        ];
        for authorization in [format!("Bearer {TOKEN}"), format!("bearer  {TOKEN} ")] {
            let mut headers = hostile.to_vec();
            headers.push(("authorization", authorization.as_bytes()));
            let post = request(Method::POST, &headers);
            assert_eq!(access(&config(Some(TOKEN)), listen, remote, &post), Ok(()));
            // Without admin_token configured, no token admits.
            assert_eq!(
                access(&config(None), listen, remote, &post),
                Err(NOT_LOOPBACK)
            );
        }
        let basic = request(Method::GET, &[("authorization", b"Basic xyz")]);
        assert_eq!(
            access(&config(Some(TOKEN)), listen, remote, &basic),
            Err(NOT_LOOPBACK)
        );
    }

    #[test]
    fn an_origin_must_be_the_host_the_request_names() {
        let with = |host: &'static str, origin: &'static [u8]| {
            judge(
                Method::GET,
                &[("host", host.as_bytes()), ("origin", origin)],
            )
        };
        assert_eq!(with("localhost:7860", b"http://localhost:7860"), Ok(()));
        assert_eq!(with("LOCALHOST:7860", b"http://localhost:7860"), Ok(()));
        assert_eq!(with("localhost", b"http://localhost:80"), Ok(()));
        assert_eq!(with("[::1]:7860", b"http://[::1]:7860"), Ok(()));
        for foreign in [
            &b"http://evil.example"[..],
            b"http://localhost:3000",
            b"http://127.0.0.1:7860",
            b"https://localhost:7860",
            b"http://localhost:7860/",
            b"null",
            b"",
            "http://localh\u{f6}st:7860".as_bytes(),
        ] {
            assert_eq!(
                with("localhost:7860", foreign),
                Err(FOREIGN_ORIGIN),
                "{}",
                String::from_utf8_lossy(foreign)
            );
        }
        let two: &[(&str, &[u8])] = &[
            ("host", b"localhost:7860"),
            ("origin", b"http://localhost:7860"),
            ("origin", b"http://evil.example"),
        ];
        assert_eq!(judge(Method::GET, two), Err(FOREIGN_ORIGIN));
    }

    #[test]
    fn state_changing_calls_must_not_be_cross_site() {
        let with = |method: Method, site: &'static [u8]| {
            judge(
                method,
                &[("host", b"localhost:7860"), ("sec-fetch-site", site)],
            )
        };
        assert_eq!(with(Method::POST, b"same-origin"), Ok(()));
        assert_eq!(with(Method::POST, b"none"), Ok(()));
        assert_eq!(with(Method::POST, b"same-site"), Err(CROSS_SITE));
        assert_eq!(with(Method::POST, b"cross-site"), Err(CROSS_SITE));
        assert_eq!(with(Method::DELETE, b"cross-site"), Err(CROSS_SITE));
        // A link followed from another site may open the status page.
        assert_eq!(with(Method::GET, b"cross-site"), Ok(()));
        assert_eq!(with(Method::HEAD, b"cross-site"), Ok(()));
    }

    #[test]
    fn a_request_relayed_by_another_proxy_needs_the_token() {
        for header in ["forwarded", "x-forwarded-for"] {
            for value in [&b"for=x"[..], "for=\u{f6}".as_bytes()] {
                let headers: &[(&str, &[u8])] = &[("host", b"127.0.0.1:7860"), (header, value)];
                assert_eq!(judge(Method::GET, headers), Err(FORWARDED), "{header}");
            }
        }
    }

    #[test]
    fn admin_paths() {
        assert!(is_admin_path("/__qcc__/stats?x=1"));
        assert!(is_admin_path("/__qcc__"));
        assert!(!is_admin_path("/__qcc__x"));
        assert!(!is_admin_path("/v1/messages"));
        assert!(is_admin_path("/favicon.ico"));
        assert!(is_admin_path("/robots.txt?x"));
        assert!(!is_admin_path("/favicon.ico/x"));
        assert!(!is_admin_path("/v1/robots.txt"));
    }

    #[test]
    fn browser_paths_are_for_anyone() {
        let listen = "127.0.0.1:7860".parse().unwrap();
        let remote = Some("192.0.2.7:5000".parse().unwrap());
        for target in ["/favicon.ico", "/robots.txt"] {
            let mut hostile = request(Method::GET, &[("host", b"evil.example")]);
            hostile.target = target.into();
            assert_eq!(access(&config(None), listen, remote, &hostile), Ok(()));
        }
    }
}
