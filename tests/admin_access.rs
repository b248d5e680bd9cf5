//! The admin API's access rule against a web page in the user's browser (issue 12): a
//! loopback connection is not enough without the admin token; the `Host` must name this
//! machine, an `Origin` must be the proxy's own, and a state-changing call must not be
//! cross-site. Each request is sent as exact bytes, so the test decides every header.

use crate::support::raw::{Headers, RawClient};
use crate::support::*;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};

const BAD_HOST: &str = "the admin API needs a loopback Host (localhost, 127.0.0.1 or [::1]) \
                        or the listen address, or admin_token as Authorization: Bearer";
const FOREIGN_ORIGIN: &str = "the admin API does not answer other web pages: use the status \
                              page at /__qcc__/, a client that sends no Origin (curl), or \
                              admin_token as Authorization: Bearer";
const FORWARDED: &str =
    "this admin request came through another proxy: send admin_token as Authorization: Bearer";
const CROSS_SITE: &str = "a state-changing admin call must be same-origin (Sec-Fetch-Site \
                          same-origin or none): use curl, or admin_token as Authorization: \
                          Bearer";

/// The 403 body the proxy sends with `message`.
fn refusal(message: &str) -> Value {
    json!({"type": "error", "error": {"type": "permission_error", "message": message}})
}

/// `host:port` of the proxy, as a browser that typed its URL would send it.
fn authority(proxy: &Proxy) -> String {
    proxy.url.strip_prefix("http://").unwrap().to_string()
}

/// The proxy's port.
fn port(proxy: &Proxy) -> String {
    authority(proxy).rsplit_once(':').unwrap().1.to_string()
}

/// Sends `method path` with exactly `headers` (no `Host` unless given) over a fresh
/// connection, in `version`; returns the status and the body as JSON.
fn send_raw(proxy: &Proxy, version: &str, method: &str, path: &str, headers: Headers) -> Answer {
    let mut text = format!("{method} {path} {version}\r\nconnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        text.push_str("content-length: 0\r\n");
    }
    text.push_str("\r\n");
    let mut client = RawClient::connect(&proxy.url);
    client.send(text.as_bytes());
    let head = client.read_head().expect("a response head");
    let length = head.content_length().expect("a content-length");
    let body = client.read_exact_body(length).expect("the body");
    Answer {
        status: head.status,
        headers: head.headers,
        body,
    }
}

fn admin(proxy: &Proxy, method: &str, path: &str, headers: Headers) -> Answer {
    send_raw(proxy, "HTTP/1.1", method, path, headers)
}

/// The ids in the failure queue.
fn queued(proxy: &Proxy) -> Value {
    proxy.stats()["failed_endpoints"].clone()
}

#[test]
fn a_foreign_host_gets_403_and_changes_nothing() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    let rebound = format!("evil.example:{}", port(&proxy));
    for host in [
        "evil.example",
        rebound.as_str(),
        "a.localhost",
        "127.0.0.1.evil.example",
    ] {
        for path in ["/__qcc__/stats", "/__qcc__/", "/__qcc__/metrics"] {
            let answer = admin(&proxy, "GET", path, &[("host", host)]);
            assert_eq!(answer.status, 403, "{host} {path}");
            assert_eq!(answer.json(), refusal(BAD_HOST), "{host} {path}");
        }
    }
    let disable = format!("/__qcc__/endpoints/{}/disable", proxy.id(0));
    let answer = admin(&proxy, "POST", &disable, &[("host", "evil.example")]);
    assert_eq!(answer.status, 403);
    assert_eq!(answer.json(), refusal(BAD_HOST));
    assert_eq!(proxy.endpoint_stats(0)["enabled"], true);
    assert_eq!(up.requests(), 0);
}

/// A reverse proxy on the same host connects from loopback and may send a loopback `Host`
/// of its own; the header it adds shows the request is not the local user's.
#[test]
fn a_relayed_request_gets_403() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    let host = authority(&proxy);
    let headers = [("host", host.as_str()), ("x-forwarded-for", "192.0.2.7")];
    let answer = admin(&proxy, "GET", "/__qcc__/stats", &headers);
    assert_eq!(answer.status, 403);
    assert_eq!(answer.json(), refusal(FORWARDED));
}

#[test]
fn loopback_names_and_the_listen_address_are_served() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    let port = port(&proxy);
    let hosts = [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "[::1]".to_string(),
        authority(&proxy),
    ];
    for host in &hosts {
        let answer = admin(&proxy, "GET", "/__qcc__/stats", &[("host", host)]);
        assert_eq!(answer.status, 200, "{host}");
        assert_eq!(answer.json()["total_endpoints"], 1, "{host}");
    }
}

/// Without a `Host` the request cannot show it is not a rebinding page's: 403, in
/// HTTP/1.1 (where `Host` is required) and in HTTP/1.0 alike.
#[test]
fn a_missing_host_gets_403() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let answer = send_raw(&proxy, version, "GET", "/__qcc__/stats", &[]);
        assert_eq!(answer.status, 403, "{version}");
        assert_eq!(answer.json(), refusal(BAD_HOST), "{version}");
    }
}

#[test]
fn a_foreign_origin_can_neither_read_stats_nor_clear_the_queue() {
    let up = mock(Fault::Status(401));
    let proxy = Proxy::start(&[&up], json!({"recovery_interval": 600}));
    assert_eq!(send_message(&agent(), &proxy.url, &[]).status, 401);
    assert_eq!(queued(&proxy), json!([proxy.id(0)]));
    let host = authority(&proxy);
    let from_evil = [("host", host.as_str()), ("origin", "http://evil.example")];

    let read = admin(&proxy, "GET", "/__qcc__/stats", &from_evil);
    assert_eq!(read.status, 403);
    assert_eq!(read.json(), refusal(FOREIGN_ORIGIN));

    let clear = admin(&proxy, "POST", "/__qcc__/queue/clear", &from_evil);
    assert_eq!(clear.status, 403);
    assert_eq!(clear.json(), refusal(FOREIGN_ORIGIN));
    assert_eq!(queued(&proxy), json!([proxy.id(0)]));

    let null_origin = [("host", host.as_str()), ("origin", "null")];
    let clear = admin(&proxy, "POST", "/__qcc__/queue/clear", &null_origin);
    assert_eq!(clear.status, 403);
    assert_eq!(clear.json(), refusal(FOREIGN_ORIGIN));
    assert_eq!(queued(&proxy), json!([proxy.id(0)]));
    assert_eq!(up.requests(), 1);
}

#[test]
fn a_cross_site_post_gets_403_and_a_same_origin_one_is_served() {
    let up = mock(Fault::Status(401));
    let proxy = Proxy::start(&[&up], json!({"recovery_interval": 600}));
    assert_eq!(send_message(&agent(), &proxy.url, &[]).status, 401);
    let host = authority(&proxy);
    let origin = format!("http://{host}");
    let same_origin = [("host", host.as_str()), ("origin", origin.as_str())];

    for site in ["cross-site", "same-site"] {
        let mut headers = same_origin.to_vec();
        headers.push(("sec-fetch-site", site));
        let clear = admin(&proxy, "POST", "/__qcc__/queue/clear", &headers);
        assert_eq!(clear.status, 403, "{site}");
        assert_eq!(clear.json(), refusal(CROSS_SITE), "{site}");
        assert_eq!(queued(&proxy), json!([proxy.id(0)]), "{site}");
    }

    let read = admin(&proxy, "GET", "/__qcc__/stats", &same_origin);
    assert_eq!(read.status, 200);
    assert_eq!(read.json()["failed_endpoints"], json!([proxy.id(0)]));

    let mut headers = same_origin.to_vec();
    headers.push(("sec-fetch-site", "same-origin"));
    let clear = admin(&proxy, "POST", "/__qcc__/queue/clear", &headers);
    assert_eq!(clear.status, 200);
    assert_eq!(clear.json(), json!({"cleared": [proxy.id(0)]}));
    assert_eq!(queued(&proxy), json!([]));
}

#[test]
fn the_admin_token_admits_any_host_and_origin() {
    let up = mock(Fault::None);
    let token = "admin-secret-token-123";
    let proxy = Proxy::start(&[&up], json!({"admin_token": token}));
    let bearer = format!("Bearer {token}");
    let hostile = [
        ("host", "evil.example"),
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ];

    let mut with_token = hostile.to_vec();
    with_token.push(("authorization", bearer.as_str()));
    let read = admin(&proxy, "GET", "/__qcc__/stats", &with_token);
    assert_eq!(read.status, 200);
    assert_eq!(read.json()["total_endpoints"], 1);
    let clear = admin(&proxy, "POST", "/__qcc__/queue/clear", &with_token);
    assert_eq!(clear.status, 200);
    assert_eq!(clear.json(), json!({"cleared": []}));

    let mut wrong_token = hostile.to_vec();
    wrong_token.push(("authorization", "Bearer admin-secret-token-124"));
    let read = admin(&proxy, "GET", "/__qcc__/stats", &wrong_token);
    assert_eq!(read.status, 403);
    assert_eq!(read.json(), refusal(BAD_HOST));
    assert!(!all_log_text().contains(token));
}
