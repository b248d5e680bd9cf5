//! Forwarding and failover through the real proxy over loopback.

use crate::support::raw::{self, RawClient};
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{BorrowedFd, RawFd};

#[test]
fn forwards_to_a_healthy_endpoint_with_its_key() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    let (status, body) = post_message(&proxy.url, &[("x-api-key", "client-key")]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let rec = up.recorded();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].header("x-api-key"), Some(key(0).as_str()));
    assert_eq!(
        rec[0].header("authorization"),
        Some(format!("Bearer {}", key(0)).as_str())
    );
    assert_eq!(rec[0].header("anthropic-version"), Some("2023-06-01"));
    // The upstream's own host, not the one the client addressed (the proxy).
    let hosts: Vec<_> = rec[0].headers.iter().filter(|(n, _)| n == "host").collect();
    assert_eq!(hosts.len(), 1, "{:?}", rec[0].headers);
    assert_eq!(hosts[0].1, up.addr().to_string());
}

/// `idle_timeout` bounds the wait for each body piece (here the slow endpoint's first SSE
/// event, which comes 30 s after its head), while the endpoint's `timeout` alone bounds the
/// wait for headers. Before the commit point that is a failure of the slow endpoint, and the
/// fast one answers. (1 s: far from the slow endpoint's 30 s, and longer than a busy
/// machine would stall the fast mock between its head and its first event.)
#[test]
fn idle_timeout_cuts_a_silent_stream_and_fails_over() {
    let slow = MockUpstream::start_named("slow", Fault::SlowBody { delay_ms: 30_000 }).unwrap();
    let fast = MockUpstream::start_named("fast", Fault::None).unwrap();
    let proxy = Proxy::start(&[&slow, &fast], json!({"idle_timeout": 1}));
    let body = json!({"model": "m", "max_tokens": 5, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let mut client = RawClient::connect(&proxy.url);
    let request = raw::request(
        "POST",
        "/v1/messages",
        &[("content-type", "application/json")],
        body.as_bytes(),
    );
    client.send(&request);
    let head = client.read_head().expect("head");
    assert_eq!(head.status, 200, "{}", head.text);
    assert_eq!(head.header("x-mock-upstream"), Some("fast"));
    let body = client
        .read_chunked_body()
        .expect("the fast endpoint's stream");
    let events = raw::split_events(&body);
    assert_eq!(
        raw::event_name(events.last().expect("events")),
        "message_stop"
    );
    assert_eq!((slow.requests(), fast.requests()), (1, 1));
    let h = proxy.endpoint_stats(0)["health_status"].clone();
    assert_eq!(
        (h["total_requests"].as_u64(), h["failed_requests"].as_u64()),
        (Some(1), Some(1)),
        "{h}"
    );
    assert!(
        h["last_error"].as_str().unwrap().contains("idle_timeout"),
        "{h}"
    );
    assert_eq!(
        proxy.endpoint_stats(1)["health_status"]["failed_requests"],
        0
    );
}

#[test]
fn a_client_400_comes_back_after_one_attempt_and_leaves_health_unchanged() {
    let primary = MockUpstream::start_named("primary", Fault::None).expect("mock");
    let secondary = MockUpstream::start_named("secondary", Fault::None).expect("mock");
    let proxy = Proxy::start(&[&primary, &secondary], json!({}));
    let before = proxy.endpoint_stats(0)["health_status"].clone();
    let answer = send_message(&agent(), &proxy.url, &[("x-mock-fault", "400")]);
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(answer.header("x-mock-upstream"), Some("primary"));
    assert_eq!(answer.json()["error"]["type"], "invalid_request_error");
    assert_eq!((primary.requests(), secondary.requests()), (1, 0));
    assert_eq!(proxy.endpoint_stats(0)["health_status"], before);
    assert_eq!(proxy.stats()["failed_endpoints"], json!([]));
}

/// The credentials an upstream request carried, in arrival order.
fn credentials(request: &failover_proxy::mock::request::Recorded) -> Vec<(String, String)> {
    let is_credential = |n: &str| n == "x-api-key" || n == "authorization";
    let found = request.headers.iter().filter(|(n, _)| is_credential(n));
    found.cloned().collect()
}

/// Issue 12: `auth` picks the header(s) that carry the endpoint's key, for forwarded
/// requests and for both kinds of probe alike; the client's own credentials never pass.
#[test]
fn auth_chooses_the_key_headers_of_forwarded_requests_and_probes() {
    let x_api_key = || ("x-api-key".to_string(), key(0));
    let bearer = || ("authorization".to_string(), format!("Bearer {}", key(0)));
    let cases = [
        (json!({"auth": "x-api-key"}), vec![x_api_key()]),
        (json!({"auth": "bearer"}), vec![bearer()]),
        (json!({"auth": "both"}), vec![x_api_key(), bearer()]),
        (json!({}), vec![x_api_key(), bearer()]),
    ];
    for (settings, expected) in cases {
        let up = mock(Fault::None);
        let endpoints = [endpoint_json(0, &up.url(), settings.clone())];
        let proxy = Proxy::start(&[], json!({"endpoints": endpoints}));
        let client_credentials = [
            ("x-api-key", "client-key"),
            ("authorization", "Bearer client-token"),
        ];
        let answer = send_message(&agent(), &proxy.url, &client_credentials);
        assert_eq!(answer.status, 200, "{settings}: {}", answer.text());
        let generation = proxy.state.current();
        let endpoint = &generation.endpoints[0];
        for kind in ["conversation", "http"] {
            let config = json!({"probe": {"kind": kind}, "endpoints": [{"base_url": "http://a", "api_key": "k"}]});
            let probe = failover_proxy::config::validated::Config::from_json(
                &config.to_string(),
                &Default::default(),
                &|_| None,
            )
            .expect("config")
            .probe;
            let result = failover_proxy::upstream::probe::run(endpoint, &probe);
            assert!(result.recovered, "{settings} {kind}: {result:?}");
        }
        let recorded = up.recorded();
        let seen: Vec<_> = recorded
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str()))
            .collect();
        let expected_requests = [
            ("POST", "/v1/messages"),
            ("POST", "/v1/messages"),
            ("GET", "/v1/models"),
        ];
        assert_eq!(seen, expected_requests, "{settings}");
        for request in &recorded {
            assert_eq!(
                credentials(request),
                expected,
                "{settings} {}",
                request.path
            );
        }
    }
}

/// An access token the secrets test's clients present.
const ACCESS_TOKEN: &str = "tok-client-access-5e7a1c9b3d";

/// Client requests that meet a refused key, a 5xx, a dead port, quarantine, panic mode and
/// the access check; every answer the client got.
fn answers_from_a_run_with_every_kind_of_failure(proxy: &Proxy) -> Vec<Answer> {
    let client = agent();
    let bearer = format!("Bearer {ACCESS_TOKEN}");
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(send_message(
            &client,
            &proxy.url,
            &[("x-api-key", ACCESS_TOKEN)],
        ));
        answers.push(send_message(
            &client,
            &proxy.url,
            &[("authorization", &bearer)],
        ));
    }
    answers.push(send_message(
        &client,
        &proxy.url,
        &[("x-api-key", "tok-wrong")],
    ));
    answers.push(send_message(&client, &proxy.url, &[]));
    answers
}

#[test]
fn no_api_key_or_access_token_appears_in_logs_stats_or_error_bodies() {
    let refuses_key = MockUpstream::start_with(Fault::Status(401)).expect("mock");
    let fails = MockUpstream::start_with(Fault::Status(500)).expect("mock");
    let endpoints = [
        endpoint_json(0, &refuses_key.url(), json!({})),
        endpoint_json(1, &fails.url(), json!({})),
        endpoint_json(2, &refused_url(), json!({})),
    ];
    let proxy = Proxy::start(
        &[],
        json!({"endpoints": endpoints, "access_tokens": [ACCESS_TOKEN]}),
    );
    let answers = answers_from_a_run_with_every_kind_of_failure(&proxy);
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    // The run did go through failures, quarantine, panic mode and the access check.
    assert!(
        statuses.contains(&500) && statuses.contains(&503),
        "{statuses:?}"
    );
    assert_eq!(statuses[statuses.len() - 2..], [401, 401]);
    let (_, health) = get(&format!("{}/__qcc__/health", proxy.url));
    let mut seen = vec![
        proxy.stats().to_string(),
        String::from_utf8_lossy(&health).into_owned(),
    ];
    for a in &answers {
        seen.push(a.text());
        seen.extend(a.headers.iter().map(|(n, v)| format!("{n}: {v}")));
    }
    seen.push(all_log_text());
    let secrets = [key(0), key(1), key(2), ACCESS_TOKEN.to_string()];
    for text in &seen {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{secret} leaked in: {text}"
            );
        }
    }
}

/// The proxy's end of the client connection whose client end is `client`, found among this
/// process's descriptors (the proxy runs in-process): whether it has TCP_NODELAY. None if
/// no descriptor is that connection.
fn proxy_end_has_nodelay(proxy: SocketAddr, client: SocketAddr) -> Option<bool> {
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let name = entry.expect("a descriptor").file_name();
        let Ok(fd) = name.to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for a few read-only socket calls. If
        // another test's thread closes it meanwhile, the calls fail (EBADF), or ask a new
        // object that took its number, whose addresses then do not match.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let addr = |a: std::io::Result<socket2::SockAddr>| a.ok().and_then(|a| a.as_socket());
        if addr(socket.local_addr()) == Some(proxy) && addr(socket.peer_addr()) == Some(client) {
            return socket.tcp_nodelay().ok();
        }
    }
    None
}

/// Regression: a response head and its body leave in two flushes, so on a client socket
/// without TCP_NODELAY Nagle holds the body of every answer after the first on a kept-alive
/// connection back until the client's delayed ACK (40 ms on Linux). The fix sets
/// TCP_NODELAY on every accepted client socket; this checks the proxy's end of a kept-alive
/// connection for it, rather than timing answers on a busy machine.
#[test]
fn client_connections_have_tcp_nodelay_so_nagle_never_holds_an_answer_back() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    let proxy_addr: SocketAddr = proxy.url["http://".len()..].parse().unwrap();
    let stream = TcpStream::connect(proxy_addr).expect("connect");
    stream.set_read_timeout(Some(raw::SAFETY_TIMEOUT)).unwrap();
    let client_addr = stream.local_addr().unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    // Two answers on one connection: it is accepted, served and kept alive.
    for _ in 0..2 {
        writer
            .write_all(&raw::messages_request(false, &[]))
            .unwrap();
        let mut length = None;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200 "), "{line}");
        while line != "\r\n" {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0; length.expect("content-length")];
        reader.read_exact(&mut body).unwrap();
    }
    assert_eq!(proxy_end_has_nodelay(proxy_addr, client_addr), Some(true));
}

/// Mid-stream, `idle_timeout` ends a stream whose upstream went silent: the client gets
/// what was sent, then exactly one `event: error`, and the endpoint one failure.
#[test]
fn idle_timeout_mid_stream_ends_with_one_error_event() {
    let silent = mock(Fault::Gated);
    let proxy = Proxy::start(&[&silent], json!({"idle_timeout": 0.3}));
    let body = json!({"model": "m", "max_tokens": 5, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let (status, answer) = post(&proxy.url, "/v1/messages", &body, &[]);
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("event: message_start"), "{text}");
    assert_eq!(text.matches("event: error").count(), 1, "{text}");
    assert!(text.contains("\"type\":\"error\""), "{text}");
    // An answer is recorded before its end goes out: stats read once the client has seen
    // the end include it.
    assert_eq!(
        proxy.endpoint_stats(0)["health_status"]["failed_requests"],
        1
    );
    let h = proxy.endpoint_stats(0)["health_status"].clone();
    assert!(
        h["last_error"].as_str().unwrap().contains("idle_timeout"),
        "{h}"
    );
    silent.set_fault(Fault::None);
}

/// The proxy sends a request's head and the first piece of its body in one write
/// (`upstream/coalesce.rs`): bodies of every size around the output buffer's edge, and a
/// request without a body, reach the upstream byte for byte, each as one request.
#[test]
fn request_bodies_of_every_size_reach_the_upstream_whole() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    let body_of = |size: usize| {
        let empty = r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":""}]}"#;
        let text = "x".repeat(size - empty.len());
        format!(
            r#"{{"model":"m","max_tokens":5,"messages":[{{"role":"user","content":"{text}"}}]}}"#
        )
    };
    // The output buffer holds 8 KiB + 64 + the longest base URL or key; the head takes a
    // few hundred bytes of it: every size from 7 to 8.5 KiB crosses the edge.
    let mut sizes: Vec<usize> = (7 * 1024..8704).step_by(61).collect();
    sizes.extend([100, 16 * 1024 + 3, 150 * 1024]);
    let mut client = RawClient::connect(&proxy.url);
    for &size in &sizes {
        let body = body_of(size);
        let headers = [("content-type", "application/json")];
        client.send(&raw::request(
            "POST",
            "/v1/messages",
            &headers,
            body.as_bytes(),
        ));
        let head = client.read_head().expect("an answer");
        assert_eq!(head.status, 200, "{size}: {}", head.text);
        let length = head.content_length().expect("a content-length");
        client.read_exact_body(length).expect("the answer's body");
        let recorded = up.recorded();
        let last = recorded.last().expect("a recorded request");
        assert_eq!(last.body.len(), size);
        assert!(
            last.body == body.as_bytes(),
            "{size}: the body arrived changed"
        );
    }
    client.send(&raw::request("GET", "/v1/models", &[], b""));
    let head = client.read_head().expect("an answer to GET");
    let recorded = up.recorded();
    assert_eq!(
        recorded.last().map(|r| r.method.as_str()),
        Some("GET"),
        "{}",
        head.text
    );
    assert_eq!(recorded.len(), sizes.len() + 1);
}

/// Sends `n` streaming requests at once and holds them (the mock's gate) until all `n`
/// are in flight on endpoint 0, then lets them finish and waits until none is.
fn held_at_once(proxy: &Proxy, up: &MockUpstream, n: usize) {
    up.set_fault(Fault::Gated);
    let body = json!({"model": "m", "max_tokens": 5, "stream": true,
                      "messages": [{"role": "user", "content": "hold"}]})
    .to_string();
    let held: Vec<_> = (0..n)
        .map(|_| {
            let (url, body) = (proxy.url.clone(), body.clone());
            std::thread::spawn(move || post(&url, "/v1/messages", &body, &[]).0)
        })
        .collect();
    let in_flight = || proxy.endpoint_stats(0)["in_flight"].as_u64();
    wait_until("all held at once", || in_flight() == Some(n as u64));
    up.set_fault(Fault::None);
    for status in held.into_iter().map(|h| h.join().unwrap()) {
        assert_eq!(status, 200);
    }
    // An attempt leaves flight only after its upstream answer is dropped: the connection
    // is back in the pool by then.
    wait_until("none in flight", || in_flight() == Some(0));
}

/// Upstream connections outlive their requests: requests one after another share one;
/// three at once take three, and three more at once after them open none.
#[test]
fn upstream_connections_are_kept_for_the_next_requests() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    for _ in 0..4 {
        assert_eq!(post_message(&proxy.url, &[]).0, 200);
    }
    assert_eq!(up.connections_accepted(), 1);
    held_at_once(&proxy, &up, 3);
    assert_eq!(up.connections_accepted(), 3);
    held_at_once(&proxy, &up, 3);
    assert_eq!(up.connections_accepted(), 3);
}

/// An answer with `connection: close` ends its connection: the next request opens another
/// rather than write to a socket the upstream is closing.
#[test]
fn a_connection_the_answer_closes_is_not_kept() {
    let up = mock(Fault::None);
    up.set_headers(&[("connection", "close")]);
    let proxy = Proxy::start(&[&up], json!({}));
    for _ in 0..3 {
        assert_eq!(post_message(&proxy.url, &[]).0, 200);
    }
    assert_eq!(up.connections_accepted(), 3);
}

/// An upstream that closes idle connections sooner than the proxy would reuse them (Node's
/// keep-alive timeout is 5 s): a kept connection is looked at before it is used, so a
/// closed one costs the request nothing and the endpoint no failure.
#[test]
fn a_kept_connection_the_upstream_closed_is_not_used_again() {
    let up = mock(Fault::None);
    up.set_close_after_answer(true);
    let proxy = Proxy::start(&[&up], json!({}));
    for n in 1..=3 {
        assert_eq!(post_message(&proxy.url, &[]).0, 200);
        wait_until("the upstream closed its end", || up.open_connections() == 0);
        assert_eq!(up.connections_accepted(), n);
    }
    let health = &proxy.endpoint_stats(0)["health_status"];
    assert_eq!(health["failed_requests"], 0);
    assert_eq!(health["total_requests"], 3);
}
