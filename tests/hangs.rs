//! Hangs, stalls and clients that give up (issue 14), through the real proxy over
//! loopback: a hung or stalled endpoint costs seconds and never the client's request, a
//! client that goes away ends its upstream request, `max_in_flight` caps an endpoint, and
//! each misbehaving upstream is an endpoint failure with a clean failover.

use crate::support::raw::{self, RawClient};
use crate::support::tls::{LoopbackServer, read_request};
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};
use std::io::Write;
use std::time::Duration;

/// A proxy in front of `first` (with `settings`) and a healthy second endpoint.
fn first_then_healthy(first: &str, settings: Value, extra: Value) -> (MockUpstream, Proxy) {
    let healthy = MockUpstream::start_named("healthy", Fault::None).expect("mock");
    let endpoints = [
        endpoint_json(0, first, settings),
        endpoint_json(1, &healthy.url(), json!({})),
    ];
    let mut config = json!({"endpoints": endpoints});
    for (k, v) in extra.as_object().expect("an object") {
        config[k] = v.clone();
    }
    let proxy = Proxy::start(&[], config);
    (healthy, proxy)
}

/// A whole stream through the proxy: its head and its event names.
fn stream_names(url: &str) -> (raw::Head, Vec<String>) {
    let mut client = RawClient::connect(url);
    client.set_read_timeout(Duration::from_secs(30));
    client.send(&raw::messages_request(true, &[]));
    let head = client.read_head().expect("a head");
    let body = client.read_chunked_body().expect("a chunked body");
    let names = raw::split_events(&body)
        .into_iter()
        .map(raw::event_name)
        .collect();
    (head, names)
}

fn failed(proxy: &Proxy, i: usize) -> u64 {
    proxy.endpoint_stats(i)["health_status"]["failed_requests"]
        .as_u64()
        .expect("failed_requests")
}

#[test]
fn a_hung_first_endpoint_costs_streams_only_stream_timeout() {
    let hung = mock(Fault::Hang);
    let settings = json!({"stream_timeout": 2, "max_failures": 100});
    let (healthy, proxy) = first_then_healthy(&hung.url(), settings, json!({}));
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let url = proxy.url.clone();
            std::thread::spawn(move || stream_names(&url))
        })
        .collect();
    for client in clients {
        let (head, names) = client.join().expect("a client");
        assert_eq!(head.status, 200);
        assert_eq!(head.header("x-mock-upstream"), Some("healthy"));
        assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    }
    assert_eq!((hung.requests(), healthy.requests()), (10, 10));
    assert_eq!(failed(&proxy, 0), 10);
    let last_error = proxy.endpoint_stats(0)["health_status"]["last_error"].clone();
    assert!(
        last_error.to_string().contains("stream_timeout"),
        "{last_error}"
    );
}

#[test]
fn a_stream_stalled_after_its_preamble_fails_over_unseen() {
    let stalled = mock(Fault::PingStall { events: 2 });
    let (healthy, proxy) =
        first_then_healthy(&stalled.url(), json!({"stream_timeout": 1}), json!({}));
    let (head, names) = stream_names(&proxy.url);
    assert_eq!(head.header("x-mock-upstream"), Some("healthy"));
    let starts = names.iter().filter(|n| *n == "message_start").count();
    assert_eq!(starts, 1, "{names:?}");
    assert!(
        !names.iter().any(|n| n == "ping" || n == "error"),
        "{names:?}"
    );
    assert_eq!((stalled.requests(), healthy.requests()), (1, 1));
    assert_eq!(failed(&proxy, 0), 1);
}

#[test]
fn pings_alone_after_the_first_content_end_the_stream_as_a_failure() {
    // message_start, content_block_start, one delta: committed; then only pings.
    let stalled = mock(Fault::PingStall { events: 3 });
    let proxy = Proxy::start(&[&stalled], json!({"idle_timeout": 0.5}));
    let (head, names) = stream_names(&proxy.url);
    assert_eq!(head.status, 200);
    assert_eq!(
        names[..3],
        [
            "message_start",
            "content_block_start",
            "content_block_delta"
        ]
    );
    assert!(
        names[3..names.len() - 1].iter().all(|n| n == "ping"),
        "{names:?}"
    );
    assert_eq!(names.last().map(String::as_str), Some("error"));
    // An answer is recorded before its end goes out: stats read once the client has seen
    // the end include it.
    assert_eq!(failed(&proxy, 0), 1);
}

#[test]
fn comments_alone_after_the_first_content_end_the_stream_as_a_failure() {
    // A relay that stalls after its first content, sending SSE comments where Anthropic
    // would send pings.
    let relay = LoopbackServer::start(|mut socket| {
        if read_request(&mut socket).is_none() {
            return;
        }
        let opening = concat!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n",
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,",
            "\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
        );
        let mut sent = socket.write_all(opening.as_bytes());
        // Until the proxy goes away, or 30 s (then the test has failed already).
        for _ in 0..300 {
            if sent.is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
            sent = socket.write_all(b": keep-alive\n\n");
        }
    });
    let proxy = only_behind(&relay, json!({"idle_timeout": 0.5}));
    let mut client = RawClient::connect(&proxy.url);
    client.set_read_timeout(Duration::from_secs(20));
    client.send(&raw::messages_request(true, &[]));
    assert_eq!(client.read_head().expect("a head").status, 200);
    let body = client.read_chunked_body().expect("a stream that ends");
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("text_delta"), "{body}");
    assert!(body.contains(": keep-alive"), "{body}");
    assert!(
        body.trim_end().ends_with("}") && body.contains("event: error"),
        "{body}"
    );
    assert_eq!(failed(&proxy, 0), 1, "recorded before the end went out");
    let last_error = proxy.endpoint_stats(0)["health_status"]["last_error"].to_string();
    assert!(last_error.contains("only keep-alives"), "{last_error}");
}

#[test]
fn abandoned_requests_leave_no_upstream_connection_open() {
    let hung = mock(Fault::Hang);
    let proxy = Proxy::start(&[&hung], json!({}));
    let clients: Vec<RawClient> = (0..20)
        .map(|_| {
            let mut client = RawClient::connect(&proxy.url);
            client.send(&raw::messages_request(false, &[]));
            client
        })
        .collect();
    wait_until("20 requests waiting upstream", || hung.requests() == 20);
    assert_eq!(hung.open_connections(), 20);
    clients.into_iter().for_each(RawClient::hang_up);
    // Each wait looks at its client every 500 ms; the mock notices a closed connection
    // within its own 200 ms tick.
    wait_until("every upstream connection closed", || {
        hung.open_connections() == 0
    });
    let health = proxy.endpoint_stats(0)["health_status"].clone();
    assert_eq!(
        health["total_requests"], 0,
        "a client leaving is nobody's failure: {health}"
    );
    assert_eq!(health["failed_requests"], 0);
}

#[test]
fn max_in_flight_caps_an_endpoint_and_the_rest_go_to_the_next() {
    let capped = MockUpstream::start_named("capped", Fault::Gated).expect("mock");
    let other = MockUpstream::start_named("other", Fault::Gated).expect("mock");
    let endpoints = [
        endpoint_json(0, &capped.url(), json!({"max_in_flight": 5})),
        endpoint_json(1, &other.url(), json!({})),
    ];
    let proxy = Proxy::start(&[], json!({"endpoints": endpoints}));
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let url = proxy.url.clone();
            std::thread::spawn(move || stream_names(&url))
        })
        .collect();
    wait_until("12 streams open", || {
        capped.requests() + other.requests() == 12
    });
    assert_eq!((capped.requests(), other.requests()), (5, 7));
    assert_eq!(proxy.endpoint_stats(0)["in_flight"], 5);
    capped.set_fault(Fault::None);
    other.set_fault(Fault::None);
    for client in clients {
        let (_, names) = client.join().expect("a client");
        assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    }
    assert_eq!(failed(&proxy, 0) + failed(&proxy, 1), 0);
}

/// An upstream that reads each request (head and `content-length` body) and answers it
/// with `answer`, then closes.
fn raw_upstream(answer: &'static [u8], trickle: bool) -> LoopbackServer {
    LoopbackServer::start(move |mut socket| {
        if read_request(&mut socket).is_none() {
            return;
        }
        if trickle {
            // A byte at a time, for as long as the proxy reads.
            for byte in answer {
                if socket.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        } else {
            let _ = socket.write_all(answer);
        }
        let _ = socket.shutdown(std::net::Shutdown::Both);
    })
}

/// `upstream` first, a healthy mock second: the client gets the healthy answer and the
/// first endpoint one failure whose last error says `why`.
fn fails_over(upstream: LoopbackServer, settings: Value, why: &str) {
    let url = format!("http://{}", upstream.addr());
    let (healthy, proxy) = first_then_healthy(&url, settings, json!({}));
    let answer = send_message(&agent(), &proxy.url, &[]);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-mock-upstream"), Some("healthy"));
    assert_eq!(healthy.requests(), 1);
    assert_eq!(failed(&proxy, 0), 1);
    let last_error = proxy.endpoint_stats(0)["health_status"]["last_error"].to_string();
    assert!(last_error.contains(why), "{why:?} not in {last_error}");
}

#[test]
fn a_response_head_over_the_limit_is_the_endpoints_failure() {
    let big = format!(
        "HTTP/1.1 200 OK\r\nx-pad: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        "a".repeat(70_000)
    );
    fails_over(
        raw_upstream(big.leak().as_bytes(), false),
        json!({}),
        "response header is too big",
    );
}

#[test]
fn a_body_shorter_than_its_content_length_is_the_endpoints_failure() {
    let short = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"type\":\"message\"}";
    fails_over(raw_upstream(short, false), json!({}), "broke off");
}

#[test]
fn a_chunked_json_body_that_breaks_off_fails_over() {
    // Relays often send JSON answers chunked: such a body is read whole before the commit
    // point, as one with a content-length is, so its break still fails over.
    let broken = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n";
    fails_over(raw_upstream(broken, false), json!({}), "broke off");
}

#[test]
fn a_status_that_is_no_final_answer_is_the_endpoints_failure_and_never_relayed() {
    let answers: [&[u8]; 2] = [
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nbytes of another protocol",
        b"HTTP/1.1 600 Nonsense\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    ];
    for answer in answers {
        let why = "is not a final answer";
        fails_over(raw_upstream(answer, false), json!({}), why);
        // Alone, it is no "last upstream response" either: the client gets 502.
        let upstream = raw_upstream(answer, false);
        let proxy = only_behind(&upstream, json!({"max_attempts": 1}));
        let reply = send_message(&agent(), &proxy.url, &[]);
        assert_eq!(reply.status, 502, "{}", reply.text());
    }
}

/// The proxy with `upstream` as its only endpoint and `extra` settings.
fn only_behind(upstream: &LoopbackServer, mut extra: Value) -> Proxy {
    let url = format!("http://{}", upstream.addr());
    extra["endpoints"] = json!([endpoint_json(0, &url, json!({}))]);
    Proxy::start(&[], extra)
}

/// A 200 JSON answer sent chunked, one chunk per part.
fn chunked_json(parts: &[&str]) -> &'static [u8] {
    let mut answer = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for part in parts {
        answer.push_str(&format!("{:x}\r\n{part}\r\n", part.len()));
    }
    answer.push_str("0\r\n\r\n");
    answer.leak().as_bytes()
}

#[test]
fn a_soft_error_in_a_chunked_json_body_fails_over() {
    let soft = [
        r#"{"type":"error","error":{"type":"#,
        r#""overloaded_error","message":"x"}}"#,
    ];
    fails_over(
        raw_upstream(chunked_json(&soft), false),
        json!({}),
        "error inside (overloaded_error)",
    );
}

#[test]
fn a_chunked_json_answer_reaches_the_client_whole_with_its_length() {
    let answer = r#"{"type":"message","content":[],"usage":{"input_tokens":3,"output_tokens":4}}"#;
    let (a, b) = answer.split_at(30);
    let upstream = raw_upstream(chunked_json(&[a, b]), false);
    let proxy = only_behind(&upstream, json!({}));
    let mut client = RawClient::connect(&proxy.url);
    client.send(&raw::messages_request(false, &[]));
    let head = client.read_head().expect("a head");
    assert_eq!(head.status, 200);
    assert_eq!(head.content_length(), Some(answer.len()));
    let body = client.read_exact_body(answer.len()).unwrap();
    assert_eq!(body, answer.as_bytes());
    assert_eq!(failed(&proxy, 0), 0);
}

#[test]
fn a_chunked_body_of_another_type_is_committed_at_its_head_and_its_break_reaches_the_client() {
    // Not JSON, so possibly a stream under another name: passed on as it comes. The break
    // cannot fail over then: the client's body ends broken, and the endpoint is charged.
    let broken = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\nzz\r\n";
    let upstream = raw_upstream(broken, false);
    let proxy = only_behind(&upstream, json!({}));
    let mut client = RawClient::connect(&proxy.url);
    client.send(&raw::messages_request(false, &[]));
    let head = client.read_head().expect("the committed head");
    assert_eq!(head.status, 200);
    assert!(
        client.read_chunked_body().is_err(),
        "the broken body looks complete"
    );
    assert_eq!(failed(&proxy, 0), 1, "recorded before the end went out");
    let last_error = proxy.endpoint_stats(0)["health_status"]["last_error"].to_string();
    assert!(last_error.contains("broke off"), "{last_error}");
}

#[test]
fn a_body_that_trickles_forever_is_cut_at_timeout() {
    let body = "x".repeat(1000);
    let trickle = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{body}"
    );
    fails_over(
        raw_upstream(trickle.leak().as_bytes(), true),
        json!({"timeout": 1}),
        "timeout",
    );
}

/// An upstream that closes each kept-alive connection right after its answer: the proxy
/// must see that before it sends the next request on it (the liveness probe when a pooled
/// connection is taken out, `upstream/wire.rs`), so every request is answered and the
/// endpoint never fails.
#[test]
fn a_pooled_connection_the_upstream_closed_is_not_used_again() {
    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 18\r\n\r\n{\"type\":\"message\"}";
    let upstream = raw_upstream(answer, false);
    let proxy = only_behind(&upstream, json!({}));
    for i in 0..3 {
        let answer = send_message(&agent(), &proxy.url, &[]);
        assert_eq!(answer.status, 200, "request {i}: {}", answer.text());
        // The upstream's close reaches the proxy's socket before the next request.
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(upstream.accepted(), 3);
    assert_eq!(failed(&proxy, 0), 0);
}
