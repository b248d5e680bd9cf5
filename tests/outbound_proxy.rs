//! Outbound proxies (issue 9): an endpoint's `proxy` (HTTP CONNECT or SOCKS5, both written
//! here and counting their tunnels) carries its traffic to a TLS upstream, one tunnel for
//! a run of requests; with no `proxy`, `HTTPS_PROXY` and `NO_PROXY` from the environment
//! apply. Environment variables belong to the whole process, so those run the real
//! binary (`check --probe`) with an environment of its own.

use crate::support::tls::{self, ConnectProxy, Socks5Proxy, TestCa, TlsFront};
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use serde_json::{Value, json};

const REQUESTS: usize = 10;

/// A healthy mock behind a TLS front, and the CA file that trusts it.
struct TlsUpstream {
    mock: MockUpstream,
    front: TlsFront,
    ca_file: tls::TempFile,
}

impl TlsUpstream {
    fn start() -> TlsUpstream {
        let ca = TestCa::new();
        let mock = MockUpstream::start().expect("mock");
        let front = TlsFront::start(&ca, mock.addr());
        TlsUpstream {
            mock,
            front,
            ca_file: ca.write_pem(),
        }
    }

    /// The endpoint config for this upstream, with `settings` added.
    fn endpoint(&self, mut settings: Value) -> Value {
        settings["ca_file"] = json!(self.ca_file.path_str());
        endpoint_json(0, &self.front.url(), settings)
    }
}

/// `REQUESTS` sequential requests through a proxy whose only endpoint goes through
/// `outbound`; all answered by the TLS upstream.
fn send_through(upstream: &TlsUpstream, outbound: &str) {
    let endpoints = [upstream.endpoint(json!({"proxy": outbound}))];
    let proxy = Proxy::start(&[], json!({"endpoints": endpoints}));
    let client = agent();
    for i in 0..REQUESTS {
        let answer = send_message(&client, &proxy.url, &[]);
        assert_eq!(answer.status, 200, "request {i}: {}", answer.text());
    }
    assert_eq!(upstream.mock.successes(), REQUESTS as u64);
    assert_eq!(
        upstream.front.handshakes(),
        1,
        "one TLS session for the run"
    );
}

#[test]
fn an_http_connect_proxy_carries_the_tls_traffic_in_one_reused_tunnel() {
    let upstream = TlsUpstream::start();
    let outbound = ConnectProxy::start();
    send_through(&upstream, &outbound.url());
    assert_eq!(outbound.targets(), [upstream.front.addr().to_string()]);
    assert_eq!(outbound.tunnels(), 1, "{REQUESTS} requests, one tunnel");
}

#[test]
fn a_socks5_proxy_carries_the_tls_traffic_in_one_reused_tunnel() {
    let upstream = TlsUpstream::start();
    let outbound = Socks5Proxy::start();
    send_through(&upstream, &outbound.url());
    assert_eq!(outbound.tunnels(), 1, "{REQUESTS} requests, one tunnel");
}

#[test]
fn https_proxy_from_the_environment_applies_to_an_endpoint_without_proxy() {
    let upstream = TlsUpstream::start();
    let outbound = ConnectProxy::start();
    let config = json!({"endpoints": [upstream.endpoint(json!({}))]});
    let output = tls::check_probe(&config, &[("HTTPS_PROXY", &outbound.url())]);
    let line = tls::probe_line(&output, "ep0");
    assert!(line.starts_with("ok"), "{output}");
    assert_eq!(outbound.targets(), [upstream.front.addr().to_string()]);
}

#[test]
fn no_proxy_from_the_environment_bypasses_https_proxy() {
    let upstream = TlsUpstream::start();
    let outbound = ConnectProxy::start();
    let config = json!({"endpoints": [upstream.endpoint(json!({}))]});
    let env = [
        ("HTTPS_PROXY", outbound.url()),
        ("NO_PROXY", "127.0.0.1".to_string()),
    ];
    let env: Vec<_> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let output = tls::check_probe(&config, &env);
    assert!(
        tls::probe_line(&output, "ep0").starts_with("ok"),
        "{output}"
    );
    assert_eq!(outbound.tunnels(), 0, "NO_PROXY names the upstream's host");
    assert_eq!(upstream.front.handshakes(), 1);
}

/// A tunnel closed by ureq (its answer said `connection: close`) is closed whole. The
/// socket to the proxy under it is no connection to the proxy any more: kept, the next
/// tunnel's CONNECT would go through the old tunnel to the upstream and fail there.
#[test]
fn a_closed_tunnel_leaves_no_socket_for_the_next_connect() {
    let upstream = TlsUpstream::start();
    let outbound = ConnectProxy::start();
    let endpoints = [upstream.endpoint(json!({"proxy": outbound.url()}))];
    let proxy = Proxy::start(&[], json!({"endpoints": endpoints}));
    let client = agent();
    let send = || send_message(&client, &proxy.url, &[]).status;
    assert_eq!(send(), 200, "the first tunnel, kept");
    upstream.mock.set_headers(&[("connection", "close")]);
    assert_eq!(send(), 200, "on the first tunnel, which is then closed");
    upstream.mock.set_headers(&[]);
    assert_eq!(send(), 200, "a second tunnel");
    assert_eq!(outbound.tunnels(), 2);
    let health = &proxy.endpoint_stats(0)["health_status"];
    assert_eq!(health["failed_requests"], 0);
    assert_eq!(health["total_requests"], 3);
}
