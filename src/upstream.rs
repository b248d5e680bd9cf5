//! Talking to upstreams: the ureq agents, the request as the upstream sees it (rewritten
//! headers, the endpoint's key), and the classification of what came back.
//!
//! Agents are configured for a proxy, not a browser: no redirects followed, 4xx/5xx
//! returned as responses, no automatic `user-agent`, `accept` or `accept-encoding` (the
//! client's own headers pass through; the proxy never asks for an encoding the client did
//! not), no decompression. One agent (one connection pool) is shared by every endpoint that
//! needs no TLS or proxy settings of its own.

use crate::config::{Config, EndpointConfig};
use crate::endpoint::Endpoint;
use crate::idle::IdleConnector;
use std::time::{Duration, Instant, SystemTime};
use ureq::http::{self, HeaderMap, HeaderName, HeaderValue};
use ureq::tls::{Certificate, RootCerts, TlsConfig};

/// Headers that belong to one connection, never forwarded in either direction (RFC 9110
/// 7.6.1), plus `proxy-connection`, which old clients still send.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A client request after it was read whole; the body is held once and lent to every
/// attempt.
#[derive(Debug)]
pub struct ClientRequest {
    pub method: http::Method,
    /// Path and query exactly as the client sent them.
    pub target: String,
    /// Lower-case names, in the client's order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
}

impl ClientRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .and_then(|(_, v)| v.to_str().ok())
    }
}

fn base_config(config: &Config) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent("")
        .accept("")
        .accept_encoding("")
        .allow_non_standard_methods(true)
        .timeout_connect(Some(config.connect_timeout))
        // Not a deadline: it only makes ureq label body reads `RecvBody`, which is how
        // `idle::IdleTransport` knows to apply `idle_timeout` to them.
        .timeout_recv_body(Some(NO_BODY_DEADLINE))
        // Every worker may hold one connection to the same upstream; a smaller pool would
        // close connections that are needed again a moment later.
        .max_idle_connections(4 * config.workers.max(64))
        .max_idle_connections_per_host(config.workers.max(64))
        .tls_config(TlsConfig::builder().root_certs(RootCerts::PlatformVerifier).build())
}

/// Ten years: long enough never to cut a stream.
const NO_BODY_DEADLINE: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The agent shared by every endpoint without `ca_file` or `proxy`; environment proxy
/// variables apply to it, as they do in curl.
pub fn shared_agent(config: &Config) -> ureq::Agent {
    new_agent(base_config(config).build(), config)
}

/// Every upstream connection ends in `IdleConnector`, which bounds each body read.
fn new_agent(agent_config: ureq::config::Config, config: &Config) -> ureq::Agent {
    use ureq::unversioned::{resolver::DefaultResolver, transport::{Connector, DefaultConnector}};
    let connector = DefaultConnector::new().chain(IdleConnector {
        idle: config.idle_timeout,
    });
    ureq::Agent::with_parts(agent_config, connector, DefaultResolver::default())
}

/// The agent for one endpoint: the shared one, or its own when it has a CA file or an
/// outbound proxy (those change how connections are made, so they cannot share a pool).
pub fn agent_for(
    config: &Config,
    endpoint: &EndpointConfig,
    shared: &ureq::Agent,
) -> Result<ureq::Agent, String> {
    if endpoint.ca_file.is_none() && endpoint.proxy.is_none() {
        return Ok(shared.clone());
    }
    let mut builder = base_config(config);
    if let Some(path) = &endpoint.ca_file {
        builder = builder.tls_config(
            TlsConfig::builder()
                .root_certs(root_certs_with(path)?)
                .build(),
        );
    }
    if let Some(url) = &endpoint.proxy {
        let proxy = ureq::Proxy::new(url)
            .map_err(|e| format!("endpoint {}: proxy {url:?}: {e}", endpoint.name))?;
        builder = builder.proxy(Some(proxy));
    }
    Ok(new_agent(builder.build(), config))
}

/// The operating system's trust store (the PEM bundle OpenSSL would use) plus the
/// endpoint's own CA file.
fn root_certs_with(ca_file: &std::path::Path) -> Result<RootCerts, String> {
    let mut certs = Vec::new();
    let system = std::env::var("SSL_CERT_FILE")
        .unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".to_string());
    if let Ok(pem) = std::fs::read(&system) {
        certs.extend(pem_certs(&pem));
    }
    let pem = std::fs::read(ca_file)
        .map_err(|e| format!("ca_file {}: {e}", ca_file.display()))?;
    let own = pem_certs(&pem);
    if own.is_empty() {
        return Err(format!(
            "ca_file {}: no PEM certificate in it",
            ca_file.display()
        ));
    }
    certs.extend(own);
    Ok(RootCerts::new_with_certs(&certs))
}

fn pem_certs(pem: &[u8]) -> Vec<Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// The headers the upstream gets: the client's, less hop-by-hop ones, `host` (ureq sets
/// the upstream's), the framing (ureq sets it from the body), `expect` (answered locally)
/// and the client's credentials; plus the endpoint's key both ways and a default
/// `anthropic-version`.
pub fn upstream_headers(request: &ClientRequest, endpoint: &Endpoint) -> HeaderMap {
    let dropped_by_connection = connection_tokens(&request.headers);
    let mut headers = HeaderMap::with_capacity(request.headers.len() + 3);
    for (name, value) in &request.headers {
        let n = name.as_str();
        let skip = HOP_BY_HOP.contains(&n)
            || matches!(
                n,
                "host" | "content-length" | "expect" | "x-api-key" | "authorization"
            )
            || dropped_by_connection.iter().any(|t| t == n);
        if !skip {
            headers.append(name.clone(), value.clone());
        }
    }
    let key = endpoint.config.api_key.expose();
    if let Ok(mut v) = HeaderValue::from_str(key) {
        v.set_sensitive(true);
        headers.insert("x-api-key", v);
    }
    if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {key}")) {
        v.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, v);
    }
    if !headers.contains_key("anthropic-version") {
        headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    }
    headers
}

/// Header names listed in `Connection`, which are hop-by-hop for this message.
pub fn connection_tokens(headers: &[(HeaderName, HeaderValue)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n == http::header::CONNECTION)
        .filter_map(|(_, v)| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Sends one attempt and waits for the response headers (bounded by the endpoint's
/// `timeout`; the body is read later by the caller, each read bounded by `idle_timeout`).
pub fn send(
    endpoint: &Endpoint,
    request: &ClientRequest,
) -> Result<http::Response<ureq::Body>, ureq::Error> {
    let uri = format!("{}{}", endpoint.config.base_url, request.target);
    let mut builder = http::Request::builder()
        .method(request.method.clone())
        .uri(uri);
    if let Some(h) = builder.headers_mut() {
        *h = upstream_headers(request, endpoint);
    }
    let agent = &endpoint.agent;
    let timeout = Some(endpoint.config.timeout);
    if request.body.is_empty() && !matches!(request.method.as_str(), "POST" | "PUT" | "PATCH") {
        let req = builder.body(()).map_err(ureq::Error::from)?;
        let req = agent
            .configure_request(req)
            .timeout_recv_response(timeout)
            .timeout_send_body(timeout)
            .build();
        agent.run(req)
    } else {
        let req = builder
            .body(request.body.as_slice())
            .map_err(ureq::Error::from)?;
        let req = agent
            .configure_request(req)
            .timeout_recv_response(timeout)
            .timeout_send_body(timeout)
            .build();
        agent.run(req)
    }
}

/// How an upstream status counts (contract rule 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Success,
    /// Any 4xx other than 401, 403, 408, 429: the client's mistake, passed back untouched.
    ClientError,
    /// 401 or 403: the endpoint's key is bad.
    Auth,
    /// 429.
    RateLimited,
    /// 408 or 5xx.
    Failure,
}

pub fn classify(status: u16) -> Class {
    match status {
        401 | 403 => Class::Auth,
        429 => Class::RateLimited,
        408 | 500..=599 => Class::Failure,
        400..=499 => Class::ClientError,
        _ => Class::Success,
    }
}

/// No cooldown is believed beyond a day: a bogus header must not retire an endpoint.
const MAX_COOLDOWN: Duration = Duration::from_secs(86_400);

/// When a rate-limited endpoint may be used again: `retry-after` (seconds or HTTP date),
/// else the earliest `anthropic-ratelimit-*-reset`, else the configured default.
pub fn cooldown_until(headers: &HeaderMap, default: Duration, now: Instant) -> Instant {
    let wall = SystemTime::now();
    let until_wall = |t: SystemTime| t.duration_since(wall).unwrap_or(Duration::ZERO);
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let from_retry_after = text("retry-after").and_then(|v| {
        v.trim()
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .or_else(|| crate::time::parse_http_date(v).map(until_wall))
    });
    let from_reset = || {
        headers
            .iter()
            .filter(|(n, _)| {
                let n = n.as_str();
                n.starts_with("anthropic-ratelimit-") && n.ends_with("-reset")
            })
            .filter_map(|(_, v)| crate::time::parse_rfc3339(v.to_str().ok()?))
            .min()
            .map(until_wall)
    };
    let wait = from_retry_after.or_else(from_reset).unwrap_or(default);
    now + wait.min(MAX_COOLDOWN)
}

/// A plain-words reason for a failed call, for logs and `last_error` (never holds a key:
/// ureq's errors name hosts and phases, not headers).
pub fn describe_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(phase) => format!("timed out ({phase})"),
        ureq::Error::ConnectionFailed => "connection failed".to_string(),
        ureq::Error::HostNotFound => "host not found".to_string(),
        ureq::Error::Io(io) => format!("i/o error: {io}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_follow_rule_3() {
        assert_eq!(classify(200), Class::Success);
        assert_eq!(classify(304), Class::Success);
        assert_eq!(classify(400), Class::ClientError);
        assert_eq!(classify(404), Class::ClientError);
        assert_eq!(classify(413), Class::ClientError);
        assert_eq!(classify(401), Class::Auth);
        assert_eq!(classify(403), Class::Auth);
        assert_eq!(classify(408), Class::Failure);
        assert_eq!(classify(429), Class::RateLimited);
        assert_eq!(classify(500), Class::Failure);
        assert_eq!(classify(529), Class::Failure);
    }

    #[test]
    fn cooldown_reads_retry_after_then_reset_headers() {
        let now = Instant::now();
        let default = Duration::from_secs(30);
        let mut h = HeaderMap::new();
        assert_eq!(cooldown_until(&h, default, now), now + default);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(cooldown_until(&h, default, now), now + Duration::from_secs(2));
        h.insert("retry-after", HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(cooldown_until(&h, default, now), now);
        let mut h = HeaderMap::new();
        let soon = crate::time::iso8601(SystemTime::now() + Duration::from_secs(120));
        let later = crate::time::iso8601(SystemTime::now() + Duration::from_secs(600));
        h.insert("anthropic-ratelimit-tokens-reset", HeaderValue::from_str(&later).unwrap());
        h.insert("anthropic-ratelimit-requests-reset", HeaderValue::from_str(&soon).unwrap());
        let wait = cooldown_until(&h, default, now) - now;
        assert!(wait > Duration::from_secs(110) && wait <= Duration::from_secs(120), "{wait:?}");
    }
}
