//! Hostile input (issue 12), each case as an attacker or a careless client sends it, to the
//! real binary over loopback: the exact answer, the process still alive, the upstreams
//! untouched where the request was refused, the endpoints' health unchanged where the
//! fault was the client's, and one answer for one request.

use crate::support::binary::Binary;
use crate::support::raw::{self, RawClient};
use crate::support::tls::{LoopbackServer, read_head};
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;

/// Two healthy mocks behind the real binary, with `extra` settings.
fn two_behind_binary(extra: Value) -> (MockUpstream, MockUpstream, Binary) {
    let (a, b) = (mock(Fault::None), mock(Fault::None));
    let binary = Binary::serve(&[a.url(), b.url()], extra);
    (a, b, binary)
}

/// The next answer on `client`: its status and its JSON body (content-length framed).
fn answer(client: &mut RawClient) -> (u16, Value) {
    let head = client.read_head().expect("an answer head");
    let length = head.content_length().expect("a content-length");
    let body = client.read_exact_body(length).expect("the answer body");
    let json = serde_json::from_slice(&body).expect("a JSON body");
    (head.status, json)
}

/// Sends `bytes` on a new connection; the one answer it gets, after which the
/// connection must close (nothing more comes: no second answer).
fn only_answer(url: &str, bytes: &[u8]) -> (u16, Value) {
    let mut client = RawClient::connect(url);
    client.send(bytes);
    let got = answer(&mut client);
    assert!(
        client.sees_close(),
        "the connection stays open after {got:?}"
    );
    got
}

fn error_type(body: &Value) -> &str {
    assert_eq!(body["type"], "error", "{body}");
    body["error"]["type"].as_str().expect("an error type")
}

/// Neither endpoint was asked, or charged: no request reached a mock, no health changed,
/// nothing is queued.
fn untouched(a: &MockUpstream, b: &MockUpstream, binary: &Binary) {
    assert_eq!((a.requests(), b.requests()), (0, 0));
    let stats = binary.stats();
    assert_eq!(stats["failure_queue_size"], 0, "{stats}");
    for endpoint in stats["endpoints"].as_array().expect("endpoints") {
        let health = &endpoint["health_status"];
        assert_eq!(health["total_requests"], 0, "{endpoint}");
        assert_eq!(health["consecutive_failures"], 0, "{endpoint}");
        assert_eq!(endpoint["is_healthy"], true, "{endpoint}");
    }
}

/// After the hostile part: still alive, and an ordinary request is answered.
fn still_serves(binary: &mut Binary) {
    assert!(binary.alive(), "the proxy died:\n{}", binary.stderr());
    let (status, body) = post_message(&binary.url, &[]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(!binary.stderr().contains("panicked"), "{}", binary.stderr());
}

/// `bytes` to a fresh binary with `extra` settings: the one answer, its status and error
/// type as given, nothing asked of the upstreams, the proxy still serving.
fn refused_once(extra: Value, bytes: &[u8], status: u16, kind: &str) {
    let (a, b, mut binary) = two_behind_binary(extra);
    let (got, body) = only_answer(&binary.url, bytes);
    assert_eq!((got, error_type(&body)), (status, kind));
    untouched(&a, &b, &binary);
    still_serves(&mut binary);
}

fn head_with(lines: &[&str]) -> Vec<u8> {
    let mut text = String::from("POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\n");
    for line in lines {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// A request that must never run: it disables endpoint `id` through the admin API.
fn smuggled(id: &str) -> String {
    format!(
        "POST /__qcc__/endpoints/{id}/disable HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n"
    )
}

fn enabled(binary: &Binary) -> Vec<bool> {
    let stats = binary.stats();
    let endpoints = stats["endpoints"].as_array().expect("endpoints");
    endpoints.iter().map(|e| e["enabled"] == true).collect()
}

#[test]
fn a_terabyte_content_length_gets_413_at_once_and_the_proxy_lives() {
    let (a, b, mut binary) = two_behind_binary(json!({}));
    // Five in a row: the shipped systemd unit gives up after five crashes.
    for _ in 0..5 {
        let mut bytes = head_with(&[
            "content-type: application/json",
            "content-length: 1099511627776",
        ]);
        bytes.extend_from_slice(&[b'x'; 1000]);
        let (status, body) = only_answer(&binary.url, &bytes);
        assert_eq!(status, 413);
        assert_eq!(error_type(&body), "request_too_large");
    }
    untouched(&a, &b, &binary);
    still_serves(&mut binary);
}

#[test]
fn expect_100_continue_over_the_limit_gets_413_without_100_or_a_wait() {
    // The body is never sent: the answer must not wait for it.
    let bytes = head_with(&["content-length: 1001", "expect: 100-continue"]);
    refused_once(
        json!({"max_body_bytes": 1000}),
        &bytes,
        413,
        "request_too_large",
    );
}

#[test]
fn a_target_the_upstream_cannot_carry_is_the_clients_400_and_no_endpoint_is_touched() {
    let (a, b, mut binary) = two_behind_binary(json!({}));
    for target in [
        "/v1/messages<x>",
        "/v1/messages<x>",
        "/v1/messages<x>",
        "*",
        "http://evil.example/v1/messages",
    ] {
        let request = raw::request("POST", target, &[], b"{}");
        let (status, body) = only_answer(&binary.url, &request);
        assert_eq!(status, 400, "{target}");
        assert_eq!(error_type(&body), "invalid_request_error");
    }
    untouched(&a, &b, &binary);
    still_serves(&mut binary);
}

#[test]
fn a_head_over_64_kib_or_100_fields_gets_431_and_never_reaches_an_upstream() {
    let (a, b, mut binary) = two_behind_binary(json!({}));
    let long = format!("x-long: {}", "a".repeat(200 * 1024));
    let (status, body) = only_answer(&binary.url, &head_with(&[&long]));
    assert_eq!(status, 431);
    assert_eq!(error_type(&body), "invalid_request_error");
    let many: Vec<String> = (0..101).map(|i| format!("x-field-{i}: {i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let (status, _) = only_answer(&binary.url, &head_with(&many));
    assert_eq!(status, 431);
    // 100 fields in all is still a request (host is one of them).
    let ninety_nine = &many[..98];
    let mut client = RawClient::connect(&binary.url);
    let mut bytes = head_with(ninety_nine);
    bytes.truncate(bytes.len() - 2);
    bytes.extend_from_slice(b"content-length: 2\r\n\r\n{}");
    client.send(&bytes);
    assert_eq!(answer(&mut client).0, 200);
    // A 4 MB header line: whatever the client manages to read, the proxy lives on.
    let mut socket = TcpStream::connect(binary.url.trim_start_matches("http://")).unwrap();
    socket.set_read_timeout(Some(raw::SAFETY_TIMEOUT)).unwrap();
    let huge = format!("x-huge: {}", "b".repeat(4 << 20));
    let _may_be_reset = socket.write_all(&head_with(&[&huge]));
    let _may_be_reset = socket.read(&mut [0u8; 64]);
    assert_eq!(a.requests() + b.requests(), 1);
    still_serves(&mut binary);
}

#[test]
fn ambiguous_framing_is_refused_and_the_body_never_runs_as_a_request() {
    let (a, b, mut binary) = two_behind_binary(json!({"max_body_bytes": 1000}));
    let id = binary.stats()["endpoints"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let body = smuggled(&id);
    let length = format!("content-length: {}", body.len());
    let cases: Vec<(Vec<String>, u16)> = vec![
        (vec!["content-length: 0x29".into()], 400),
        (vec!["content-length: +41".into()], 400),
        (vec!["content-length: 41, 41".into()], 400),
        (vec![length.clone(), length.clone()], 400),
        (
            vec![length.clone(), "transfer-encoding: chunked".into()],
            400,
        ),
        (
            vec!["transfer-encoding: chunked".into(), length.clone()],
            400,
        ),
        (vec!["transfer-encoding: xchunked".into()], 501),
        (vec!["transfer-encoding: gzip, chunked".into()], 501),
        (vec!["content-length : 0".into()], 400),
        (vec!["x-fold: a".into(), " content-length: 0".into()], 400),
    ];
    for (lines, expected) in cases {
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut bytes = head_with(&lines);
        bytes.extend_from_slice(body.as_bytes());
        let (status, answer) = only_answer(&binary.url, &bytes);
        assert_eq!(status, expected, "{lines:?}");
        let kind = if status == 501 {
            "api_error"
        } else {
            "invalid_request_error"
        };
        assert_eq!(error_type(&answer), kind, "{lines:?}");
    }
    // A chunked body over max_body_bytes: 413, and the rest of its chunks are not read
    // as requests.
    let mut bytes = head_with(&["transfer-encoding: chunked"]);
    for _ in 0..3 {
        let data = format!("{}{}", "x".repeat(600), body);
        bytes.extend_from_slice(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes());
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes.extend_from_slice(body.as_bytes());
    let (status, answer) = only_answer(&binary.url, &bytes);
    assert_eq!(status, 413);
    assert_eq!(error_type(&answer), "request_too_large");
    assert_eq!(enabled(&binary), vec![true, true]);
    untouched(&a, &b, &binary);
    still_serves(&mut binary);
}

#[test]
fn access_tokens_are_checked_from_the_head_before_any_body_byte() {
    let (a, b, mut binary) = two_behind_binary(json!({"access_tokens": ["tok-0123456789"]}));
    // The body is announced and never sent: the 401 must not wait for it.
    let bytes = head_with(&["content-length: 100000"]);
    let (status, body) = only_answer(&binary.url, &bytes);
    assert_eq!(status, 401);
    assert_eq!(error_type(&body), "authentication_error");
    untouched(&a, &b, &binary);
    assert!(binary.alive());
}

#[test]
fn a_body_that_stalls_gets_408_after_client_body_timeout() {
    let mut bytes = head_with(&["content-length: 1000"]);
    bytes.extend_from_slice(&[b'{'; 10]);
    let extra = json!({"client_body_timeout": 0.3});
    refused_once(extra, &bytes, 408, "invalid_request_error");
}

#[test]
fn a_body_cut_short_is_refused_and_never_forwarded() {
    let (a, b, mut binary) = two_behind_binary(json!({}));
    let start = r#"{"model":"claude-test","max_tokens":16,"messages":[{"role":"user","content":""#;
    let padded = format!("{start}{}", "x".repeat(3000));
    let mut by_length = head_with(&["content-type: application/json", "content-length: 5000"]);
    by_length.extend_from_slice(padded.as_bytes());
    let mut chunked = head_with(&[
        "content-type: application/json",
        "transfer-encoding: chunked",
    ]);
    chunked.extend_from_slice(format!("1388\r\n{padded}").as_bytes());
    // A body of at most 1 KiB is read before the request reaches the proxy's own code.
    let mut small = head_with(&["content-type: application/json", "content-length: 500"]);
    small.extend_from_slice(start.as_bytes());
    for bytes in [by_length, chunked, small] {
        // The client ends its side in the middle of the body, and waits for the answer.
        let mut client = RawClient::connect(&binary.url);
        client.send(&bytes);
        client.close_write();
        let (status, body) = answer(&mut client);
        assert_eq!((status, error_type(&body)), (400, "invalid_request_error"));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("the connection ended"), "{message}");
    }
    untouched(&a, &b, &binary);
    still_serves(&mut binary);
}

#[test]
fn an_endless_chunk_size_line_is_refused_at_4_kib() {
    // 0.12's decoder kept the line in memory whatever its length: 300 MiB of digits from
    // one connection was 300 MiB of memory, outside every body limit.
    for line in ["0".repeat(100_000), format!("5;{}", "e".repeat(100_000))] {
        let mut bytes = head_with(&["transfer-encoding: chunked"]);
        bytes.extend_from_slice(line.as_bytes());
        let extra = json!({});
        refused_once(extra, &bytes, 400, "invalid_request_error");
    }
    let strict = ["+5\r\nhello\r\n0\r\n\r\n", "5 x\r\nhello\r\n0\r\n\r\n"];
    for chunks in strict {
        let mut bytes = head_with(&["transfer-encoding: chunked"]);
        bytes.extend_from_slice(chunks.as_bytes());
        refused_once(json!({}), &bytes, 400, "invalid_request_error");
    }
}

#[test]
fn a_slowloris_head_is_cut_at_client_header_timeout() {
    let bytes = b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n";
    let extra = json!({"client_header_timeout": 0.3});
    refused_once(extra, bytes, 408, "invalid_request_error");
}

#[test]
fn a_client_that_stops_reading_is_cut_at_client_send_timeout_and_its_upstream_request_with_it() {
    let up = mock(Fault::None);
    let mut binary = Binary::serve(&[up.url()], json!({"client_send_timeout": 0.3}));
    let mut client = RawClient::connect(&binary.url);
    // 32 MiB of events, far more than the socket buffers between the upstream and a client
    // that reads nothing: the proxy's writes wait on the client.
    let big = [("x-mock-events", "2000"), ("x-mock-event-bytes", "16384")];
    client.send(&raw::messages_request(true, &big));
    wait_until("the upstream request began", || up.requests() == 1);
    // The mock gives up a blocked write only after 30 s: the upstream connection closes
    // within `wait_until`'s 5 s only because the proxy gave up on the client and ended it.
    wait_until("the upstream request ended", || up.open_connections() == 0);
    client.set_read_timeout(std::time::Duration::from_secs(5));
    let head = client.read_head().expect("the stream's head");
    assert_eq!(head.status, 200);
    let end = client
        .read_chunked_body()
        .expect_err("the whole stream arrived");
    assert!(
        !matches!(
            end.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "the connection was left open: {end}"
    );
    // The client's fault, not the endpoint's.
    let health = &binary.stats()["endpoints"][0]["health_status"];
    assert_eq!(health["failed_requests"], 0, "{health}");
    still_serves(&mut binary);
}

#[test]
fn a_newline_in_the_target_forges_no_log_line() {
    let (a, b, mut binary) = two_behind_binary(json!({}));
    let bytes = b"GET /v1/models\nINFO forged request line HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n";
    let (status, _) = only_answer(&binary.url, bytes);
    assert_eq!(status, 400);
    // A target with characters a log reader could misread is quoted in the log line.
    let (status, _) = get(&format!("{}/v1/models?note=%22%20x", binary.url));
    assert_eq!(status, 200);
    still_serves(&mut binary);
    // The request line is logged after the answer, by the log-writer thread.
    let quoted = "GET \"/v1/models?note=%22%20x\"";
    wait_until("the quoted request line in the log", || {
        binary.log().contains(quoted)
    });
    let log = binary.log();
    assert!(!log.contains("forged"), "{log}");
    assert_eq!(a.requests() + b.requests(), 2);
}

#[test]
fn an_http10_keep_alive_client_gets_a_stream_it_can_end() {
    let (_a, _b, binary) = two_behind_binary(json!({}));
    let mut request = raw::messages_request(true, &[("connection", "keep-alive")]);
    let at = request.windows(8).position(|w| w == b"HTTP/1.1").unwrap();
    request[at..at + 8].copy_from_slice(b"HTTP/1.0");
    let mut client = RawClient::connect(&binary.url);
    client.send(&request);
    let head = client.read_head().unwrap();
    assert_eq!(head.status, 200);
    assert!(head.text.starts_with("HTTP/1.0 200"), "{}", head.text);
    assert_eq!(head.header("connection"), Some("close"));
    assert_eq!(head.content_length(), None);
    // The end of the body is the end of the connection, and it comes.
    let mut body = Vec::new();
    while let Some(byte) = client
        .read_byte()
        .expect("the stream ends by a close, not a wait")
    {
        body.push(byte);
    }
    let events = raw::split_events(&body);
    assert_eq!(raw::event_name(events.last().unwrap()), "message_stop");
}

#[test]
fn a_body_broken_under_content_length_closes_the_client_connection() {
    // Committed at its head (encoded, so not read whole first), then cut short.
    let upstream = LoopbackServer::start(|mut socket| {
        if read_head(&mut socket).is_ok() {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: 1000\r\n\r\n";
            let _ = socket.write_all(head.as_bytes());
            let _ = socket.write_all(&[0x1f; 100]);
        }
        let _ = socket.shutdown(std::net::Shutdown::Both);
    });
    let binary = Binary::serve(&[format!("http://{}", upstream.addr())], json!({}));
    let mut client = RawClient::connect(&binary.url);
    client.send(&raw::request("GET", "/v1/models", &[], b""));
    let head = client.read_head().unwrap();
    assert_eq!((head.status, head.content_length()), (200, Some(1000)));
    assert_eq!(client.read_exact_body(100).unwrap(), vec![0x1f; 100]);
    assert!(
        client.sees_close(),
        "the client is left waiting for 900 bytes"
    );
    // An answer is recorded before its end goes out: stats read once the client has seen
    // the end include it.
    let health = &binary.stats()["endpoints"][0]["health_status"];
    assert_eq!(health["failed_requests"], 1);
}

#[test]
fn a_pipelined_request_after_a_complete_body_is_still_served() {
    // The strict framing must not break honest keep-alive: two requests in one write.
    let (a, b, binary) = two_behind_binary(json!({}));
    let mut bytes = raw::messages_request(false, &[]);
    bytes.extend_from_slice(&raw::messages_request(false, &[]));
    let mut client = RawClient::connect(&binary.url);
    client.send(&bytes);
    assert_eq!(answer(&mut client).0, 200);
    assert_eq!(answer(&mut client).0, 200);
    assert_eq!(a.requests() + b.requests(), 2);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_keepalive_timeout_without_an_answer() {
    let (_a, _b, binary) = two_behind_binary(json!({"keepalive_timeout": 0.3}));
    let mut client = RawClient::connect(&binary.url);
    client.send(&raw::messages_request(false, &[]));
    assert_eq!(answer(&mut client).0, 200);
    assert!(client.sees_close(), "an idle connection is held open");
}

#[test]
fn a_stream_longer_than_keepalive_timeout_keeps_its_connection() {
    let (a, b, binary) = two_behind_binary(json!({"keepalive_timeout": 0.3}));
    let mut client = RawClient::connect(&binary.url);
    let slow = [("x-mock-fault", "slow"), ("x-mock-delay-ms", "150")];
    client.send(&raw::messages_request(true, &slow));
    let head = client.read_head().unwrap();
    assert!(head.is_chunked());
    let body = client.read_chunked_body().unwrap();
    let events = raw::split_events(&body);
    assert_eq!(raw::event_name(events.last().unwrap()), "message_stop");
    // The stream took over a second; the connection was not idle meanwhile.
    client.send(&raw::messages_request(false, &[]));
    assert_eq!(answer(&mut client).0, 200);
    assert_eq!(a.requests() + b.requests(), 2);
}

/// A POST of `{}` to `target` with `lines` in its head.
fn post_with(target: &str, lines: &[&str]) -> Vec<u8> {
    let mut text = format!("POST {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n");
    for line in lines {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("content-type: application/json\r\ncontent-length: 2\r\n\r\n{}");
    text.into_bytes()
}

#[test]
fn a_line_of_8_kib_is_forwarded_and_a_longer_one_refused_without_charging_an_endpoint() {
    let (a, b, mut binary) = two_behind_binary(json!({}));
    let header = |len: usize| format!("x-long: {}", "h".repeat(len - "x-long: ".len()));
    let target = |len: usize| {
        let pad = len - "POST  HTTP/1.1".len() - "/v1/messages?pad=".len();
        format!("/v1/messages?pad={}", "t".repeat(pad))
    };
    let longest = [
        post_with(&target(8192), &[]),
        post_with("/v1/messages", &[&header(8192)]),
    ];
    for request in longest {
        let mut client = RawClient::connect(&binary.url);
        client.send(&request);
        assert_eq!(answer(&mut client).0, 200);
    }
    assert_eq!((a.requests(), b.requests()), (2, 0));
    let too_long = [
        (post_with(&target(8193), &[]), 414),
        (post_with("/v1/messages", &[&header(8193)]), 431),
    ];
    for (request, status) in too_long {
        let (got, body) = only_answer(&binary.url, &request);
        assert_eq!((got, error_type(&body)), (status, "invalid_request_error"));
    }
    assert_eq!((a.requests(), b.requests()), (2, 0));
    let stats = binary.stats();
    for endpoint in stats["endpoints"].as_array().expect("endpoints") {
        assert_eq!(
            endpoint["health_status"]["consecutive_failures"], 0,
            "{endpoint}"
        );
    }
    still_serves(&mut binary);
}
