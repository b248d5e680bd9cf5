//! The ureq agents that connect to upstreams: TLS roots, outbound proxies, timeouts, and
//! the connection pool.
//!
//! Agents are configured for a proxy, not a browser: no redirects followed, 4xx/5xx
//! returned as responses, no automatic `user-agent`, `accept` or `accept-encoding` (the
//! client's own headers pass through; the proxy never asks for an encoding the client did
//! not), no decompression. One agent (one connection pool) is shared by every endpoint that
//! needs no CA file and no outbound proxy and has the same `timeout`; the others get their
//! own.

use crate::config::validated::{Config, EndpointConfig};
use crate::upstream::idle::IdleConnector;
use crate::upstream::pool::PoolConnector;
use crate::upstream::wire::WireConnector;
use std::time::Duration;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

/// Ten years: long enough never to cut a stream.
const NO_BODY_DEADLINE: Duration = Duration::from_secs(10 * 365 * 86_400);

/// An agent's settings for endpoints whose `timeout` is `timeout`. The timeout is the
/// agent's, not each request's: ureq builds a new TLS configuration (the whole root store,
/// an empty session cache) for every connection a request-level configuration opens,
/// about 60 KiB held by each HTTPS connection and no session ever resumed.
fn base_config(
    config: &Config,
    timeout: Duration,
) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    // The wait for the response headers, and the sending of the head and body should the
    // upstream stop reading (both sends get it, so the socket's needs no change between).
    let timeout = Some(timeout);
    ureq::Agent::config_builder()
        .timeout_send_request(timeout)
        .timeout_recv_response(timeout)
        .timeout_send_body(timeout)
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent("")
        .accept("")
        .accept_encoding("")
        .allow_non_standard_methods(true)
        // Proxies are chosen per endpoint below, as curl would, not by ureq's own reading
        // of the environment (one proxy for every scheme).
        .proxy(None)
        .timeout_connect(Some(config.connect_timeout))
        // Not a deadline: it only makes ureq label body reads `RecvBody`, which is how
        // `idle::IdleTransport` knows to apply `idle_timeout` to them.
        .timeout_recv_body(Some(NO_BODY_DEADLINE))
        // ureq's default buffers are 128 KiB each way per upstream connection: 256 MiB for
        // 1000 open streams. A response head must fit the input buffer (Anthropic's are
        // 1-2 KiB; nginx's own limit is 4-8 KiB).
        .input_buffer_size(UPSTREAM_INPUT_BUFFER)
        .max_response_header_size(MAX_RESPONSE_HEAD)
        .output_buffer_size(output_buffer(config))
        // ureq's pool is off: idle connections are kept by `pool::PoolConnector`.
        .max_idle_connections(0)
        .tls_config(
            TlsConfig::builder()
                .root_certs(RootCerts::PlatformVerifier)
                .build(),
        )
}

/// How long an upstream connection may wait idle for its next request (ureq's default
/// for its own pool).
const MAX_IDLE_AGE: Duration = Duration::from_secs(15);

/// The idle connections kept per upstream host: every worker may hold one connection to
/// the same upstream, and a smaller pool would close connections needed a moment later.
fn idle_per_host(config: &Config) -> usize {
    config.workers.max(64)
}

/// The largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// The read buffer of an upstream connection. ureq borrows its free part as scratch space
/// to send a request body and grows it to 10 KiB for that (`LazyBuffers::tmp_and_output`),
/// then shrinks it back to this size on its next use: a smaller buffer was zeroed again
/// for every request (a sixth of the instructions callgrind counted in ureq's call). At
/// 10 KiB it is allocated and zeroed once per connection, and the memory is what the
/// regrown buffer held anyway.
const UPSTREAM_INPUT_BUFFER: usize = 10 * 1024;

/// The longest request line or header line a client may send, line end excluded (nginx's
/// `large_client_header_buffers`); the server answers 414 or 431 beyond it.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

/// ureq writes a request head line by line into the output buffer and fails the call
/// when one line does not fit: that would fail every endpoint in turn for what is the
/// client's fault. So the buffer holds the longest line the proxy can send: a client's
/// line, with the endpoint's base path in front of its target or its key in a header,
/// and 64 bytes for the method, the version, a header name and the line end. Request
/// bodies go out in writes of this size.
fn output_buffer(config: &Config) -> usize {
    let ours = config
        .endpoints
        .iter()
        .map(|e| e.base_url.len().max(e.api_key.expose().len()));
    MAX_LINE_BYTES + ours.max().unwrap_or(0) + 64
}

/// The agents shared by endpoints without a CA file or an outbound proxy: one per
/// `timeout` (one in all with the default config), made as they are first needed.
#[derive(Default)]
pub struct SharedAgents(Vec<(Duration, ureq::Agent)>);

impl SharedAgents {
    fn get(&mut self, config: &Config, timeout: Duration) -> ureq::Agent {
        if let Some((_, agent)) = self.0.iter().find(|(t, _)| *t == timeout) {
            return agent.clone();
        }
        let agent = new_agent(base_config(config, timeout).build(), config);
        self.0.push((timeout, agent.clone()));
        agent
    }
}

/// Every upstream connection ends in `IdleConnector`, which bounds each body read, and
/// `WireConnector`, which saves writes and probes, and is kept between requests by
/// `PoolConnector`; host names go through `CachingResolver`.
fn new_agent(agent_config: ureq::config::Config, config: &Config) -> ureq::Agent {
    use crate::upstream::resolve::CachingResolver;
    use ureq::unversioned::transport::{Connector, DefaultConnector};
    let connector = DefaultConnector::new()
        .chain(IdleConnector {
            idle: config.idle_timeout,
        })
        .chain(WireConnector);
    let pooled = PoolConnector::new(connector, idle_per_host(config), MAX_IDLE_AGE);
    ureq::Agent::with_parts(agent_config, pooled, CachingResolver::new())
}

/// The agent for one endpoint: the shared one, or its own when it has a CA file or goes
/// through an outbound proxy (those change how connections are made, so they cannot
/// share a pool).
pub fn agent_for(
    config: &Config,
    endpoint: &EndpointConfig,
    shared: &mut SharedAgents,
) -> Result<ureq::Agent, String> {
    let proxy = proxy_for(endpoint, &|name| std::env::var(name).ok());
    if endpoint.ca_file.is_none() && proxy.is_none() {
        return Ok(shared.get(config, endpoint.timeout));
    }
    let mut builder = base_config(config, endpoint.timeout);
    if let Some(path) = &endpoint.ca_file {
        let roots = root_certs_with(path)?;
        builder = builder.tls_config(TlsConfig::builder().root_certs(roots).build());
    }
    if let Some(url) = proxy {
        let proxy = ureq::Proxy::new(&url)
            .map_err(|e| format!("endpoint {}: proxy {url:?}: {e}", endpoint.name))?;
        builder = builder.proxy(Some(proxy));
    }
    Ok(new_agent(builder.build(), config))
}

/// The endpoint's outbound proxy: its own `proxy`, else the environment as curl reads it:
/// `https_proxy`/`HTTPS_PROXY` for an https upstream, `http_proxy` for an http one (curl
/// ignores upper-case `HTTP_PROXY`, which a CGI request could set), then
/// `all_proxy`/`ALL_PROXY`; none when `no_proxy`/`NO_PROXY` covers the upstream's host.
pub fn proxy_for(
    endpoint: &EndpointConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    if let Some(own) = &endpoint.proxy {
        return Some(own.clone());
    }
    let var = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| env(n).filter(|v| !v.trim().is_empty()))
    };
    let https = endpoint.base_url.starts_with("https://");
    let scheme_proxy = if https {
        var(&["https_proxy", "HTTPS_PROXY"])
    } else {
        var(&["http_proxy"])
    };
    let proxy = scheme_proxy.or_else(|| var(&["all_proxy", "ALL_PROXY"]))?;
    let no_proxy = var(&["no_proxy", "NO_PROXY"]).unwrap_or_default();
    (!no_proxy_covers(&no_proxy, host_of(&endpoint.base_url))).then_some(proxy)
}

/// The host of `scheme://host[:port]/…`, without brackets for IPv6.
fn host_of(base_url: &str) -> &str {
    let rest = base_url.split("://").nth(1).unwrap_or(base_url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// curl's rule: `*` covers everything; `example.com` and `.example.com` cover that host and
/// its subdomains; an IP covers that IP. Ports in entries are ignored.
fn no_proxy_covers(list: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.').to_ascii_lowercase();
        let entry = entry.split(':').next().unwrap_or("");
        entry == "*"
            || (!entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}"))))
    })
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
    let pem = std::fs::read(ca_file).map_err(|e| format!("ca_file {}: {e}", ca_file.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validated::{Config, Overrides};

    fn endpoint(base_url: &str, proxy: Option<&str>) -> EndpointConfig {
        let text = serde_json::json!({"endpoints": [{"base_url": base_url, "api_key": "k", "proxy": proxy}]});
        let config =
            Config::from_json(&text.to_string(), &Overrides::default(), &|_| None).unwrap();
        config.endpoints[0].clone()
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn environment_proxies_follow_curl() {
        let https = endpoint("https://api.example.com", None);
        let http = endpoint("http://relay.example.com:8080", None);
        let vars = [
            ("HTTPS_PROXY", "http://secure:1"),
            ("HTTP_PROXY", "http://upper:2"),
            ("ALL_PROXY", "socks5://all:3"),
        ];
        assert_eq!(
            proxy_for(&https, &env(&vars)).as_deref(),
            Some("http://secure:1")
        );
        // Upper-case HTTP_PROXY is ignored; ALL_PROXY applies instead.
        assert_eq!(
            proxy_for(&http, &env(&vars)).as_deref(),
            Some("socks5://all:3")
        );
        let lower = [("http_proxy", "http://lower:4")];
        assert_eq!(
            proxy_for(&http, &env(&lower)).as_deref(),
            Some("http://lower:4")
        );
        assert_eq!(proxy_for(&https, &env(&lower)), None);
    }

    #[test]
    fn no_proxy_and_an_endpoint_proxy_win() {
        let https = endpoint("https://api.example.com", None);
        let covered = [
            ("HTTPS_PROXY", "http://p:1"),
            ("NO_PROXY", "localhost, .example.com"),
        ];
        assert_eq!(proxy_for(&https, &env(&covered)), None);
        let other = [
            ("HTTPS_PROXY", "http://p:1"),
            ("no_proxy", "example.org,api.example"),
        ];
        assert_eq!(
            proxy_for(&https, &env(&other)).as_deref(),
            Some("http://p:1")
        );
        let own = endpoint("https://api.example.com", Some("socks5://own:9"));
        assert_eq!(
            proxy_for(&own, &env(&covered)).as_deref(),
            Some("socks5://own:9")
        );
        assert!(no_proxy_covers("*", "anything"));
        assert_eq!(host_of("http://[::1]:8080/v1"), "::1");
        assert_eq!(host_of("https://user@host.example:443"), "host.example");
    }

    #[test]
    fn the_output_buffer_holds_the_longest_line_with_a_base_path() {
        let path = format!("/relay/{}", "p".repeat(300));
        let text = serde_json::json!({"endpoints": [
            {"base_url": "https://a.example", "api_key": "k"},
            {"base_url": format!("https://b.example{path}"), "api_key": "k"},
        ]});
        let config =
            Config::from_json(&text.to_string(), &Overrides::default(), &|_| None).unwrap();
        // The client's longest request line, its target behind the longest base path.
        let target = "t".repeat(MAX_LINE_BYTES - "POST  HTTP/1.1".len());
        let line = format!("POST {path}{target} HTTP/1.1\r\n");
        assert!(output_buffer(&config) >= line.len(), "{}", line.len());
    }
}
