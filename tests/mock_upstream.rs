//! Self-tests of the mock upstream in `src/mock/`, through a raw socket client (to see
//! resets, hangs, chunks and cut streams as they are) and through ureq (to check that a
//! real client accepts what it writes). Everything stays on 127.0.0.1 and every read has
//! a timeout, so a broken mock fails a test instead of hanging it.

use std::io;
use std::thread;
use std::time::{Duration, Instant};

use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};

use crate::support::raw::{self, Head, Headers, RawClient};
use crate::support::wait_until;

/// A raw client on one fresh connection to `mock`.
fn connect(mock: &MockUpstream) -> RawClient {
    RawClient::connect(&mock.url())
}

/// The body `head` announces with its `content-length`.
fn read_sized_body(client: &mut RawClient, head: &Head) -> io::Result<Vec<u8>> {
    client.read_exact_body(head.content_length().expect("length"))
}

/// A fixed-length response: head and parsed JSON body.
fn read_json(client: &mut RawClient) -> (Head, Value) {
    let head = client.read_head().expect("head");
    let body = read_sized_body(client, &head).expect("body");
    (head, serde_json::from_slice(&body).expect("json body"))
}

fn chat_body(text: &str, stream: bool) -> String {
    json!({
        "model": "claude-test",
        "max_tokens": 16,
        "stream": stream,
        "messages": [
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": text}]}
        ]
    })
    .to_string()
}

/// A JSON `POST`; `headers` are extra.
fn post(path: &str, body: &str, headers: Headers) -> Vec<u8> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    raw::request("POST", path, &all, body.as_bytes())
}

fn messages(text: &str, stream: bool, headers: Headers) -> Vec<u8> {
    post("/v1/messages", &chat_body(text, stream), headers)
}

fn sse_parts(chunk: &[u8]) -> (String, Value) {
    let text = std::str::from_utf8(chunk).expect("utf-8 event");
    let rest = text.strip_prefix("event: ").expect("event line");
    let (name, rest) = rest.split_once("\ndata: ").expect("data line");
    let data = rest.strip_suffix("\n\n").expect("blank line");
    (
        name.to_string(),
        serde_json::from_str(data).expect("event json"),
    )
}

fn delta_text(chunks: &[Vec<u8>]) -> String {
    let deltas = chunks
        .iter()
        .map(|c| sse_parts(c))
        .filter(|(n, _)| n == "content_block_delta");
    deltas
        .map(|(_, data)| data["delta"]["text"].as_str().unwrap_or("").to_string())
        .collect()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

#[test]
fn healthy_json_reply_echoes_the_last_user_message() {
    let mock = MockUpstream::start().expect("start").name("alpha");
    let url = format!("{}/v1/messages?beta=true", mock.url());
    let mut response = agent()
        .post(&url)
        .header("content-type", "application/json")
        .header("X-Api-Key", "secret")
        .send(chat_body("probe-4711", false))
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-mock-upstream")
            .map(|v| v.as_bytes()),
        Some(&b"alpha"[..])
    );
    let body: Value =
        serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(body["content"][0]["text"], "mock reply: probe-4711");
    assert_eq!(body["model"], "claude-test");
    assert_eq!(body["type"], "message");
    assert_eq!(body["stop_reason"], "end_turn");
    let recorded = mock.recorded();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path, "/v1/messages?beta=true");
    assert_eq!(recorded[0].header("x-api-key"), Some("secret"));
    assert_eq!(
        recorded[0].body,
        chat_body("probe-4711", false).into_bytes()
    );
    assert_eq!(
        (mock.requests(), mock.successes(), mock.failures()),
        (1, 1, 0)
    );
}

#[test]
fn sse_stream_has_the_real_event_sequence_and_is_byte_deterministic() {
    let mock = MockUpstream::start().expect("start");
    let mut client = connect(&mock);
    let mut runs = Vec::new();
    for _ in 0..2 {
        // Both on one keep-alive connection.
        client.send(&messages("hello stream", true, &[]));
        let head = client.read_head().expect("head");
        let chunks = client.read_chunks().expect("chunks");
        runs.push((head, chunks));
    }
    let (head, chunks) = &runs[0];
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    let names: Vec<String> = chunks.iter().map(|c| sse_parts(c).0).collect();
    let mut expected = vec!["message_start", "content_block_start"];
    expected.extend(["content_block_delta"; 5]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    assert_eq!(delta_text(chunks), "mock reply: hello stream");
    assert_eq!(sse_parts(&chunks[0]).1["message"]["model"], "claude-test");
    assert_eq!(
        runs[0], runs[1],
        "the same request must give the same bytes"
    );
}

#[test]
fn event_headers_set_count_size_and_delay() {
    let mock = MockUpstream::start().expect("start");
    let mut client = connect(&mock);
    let headers = [
        ("x-mock-events", "3"),
        ("x-mock-event-bytes", "100"),
        ("x-mock-delay-ms", "30"),
    ];
    let started = Instant::now();
    client.send(&messages("sized", true, &headers));
    client.read_head().expect("head");
    let chunks = client.read_chunks().expect("chunks");
    // A lower bound only, which no slowness can break: each of the 8 events follows a pause
    // of at least 30 ms, all of them after the request was sent.
    assert!(
        started.elapsed() >= Duration::from_millis(8 * 30),
        "a delay before each of 8 events"
    );
    assert_eq!(chunks.len(), 3 + 5);
    let text = delta_text(&chunks);
    assert_eq!(text.len(), 300);
    assert!(text.starts_with("mock reply: sized..."));
}

#[test]
fn status_faults_answer_the_anthropic_error_shape() {
    let mock = MockUpstream::start_with(Fault::Status(500)).expect("start");
    let mut client = connect(&mock);
    client.send(&messages("x", false, &[]));
    let (head, body) = read_json(&mut client);
    assert_eq!(head.status, 500);
    assert_eq!(
        body,
        json!({"type":"error","error":{"type":"api_error","message":"mock fault"}})
    );
    mock.set_fault(Fault::Status(529));
    client.send(&messages("x", true, &[]));
    let (head, body) = read_json(&mut client);
    assert_eq!(head.status, 529);
    assert_eq!(body["error"]["type"], "overloaded_error");
    assert_eq!(
        (mock.requests(), mock.failures(), mock.successes()),
        (2, 2, 0)
    );
}

#[test]
fn rate_limits_carry_retry_after() {
    let mock = MockUpstream::start_with(Fault::RateLimited {
        retry_after: Some("7".to_string()),
    })
    .expect("start");
    let url = format!("{}/v1/messages", mock.url());
    let response = agent()
        .post(&url)
        .send(chat_body("x", false))
        .expect("request");
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"7"[..])
    );
    mock.set_fault(Fault::None);
    let response = agent()
        .post(&url)
        .header("x-mock-fault", "429")
        .send(chat_body("x", false))
        .expect("request");
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(mock.failures(), 2);
}

#[test]
fn reset_closes_without_an_answer() {
    let mock = MockUpstream::start_with(Fault::Reset).expect("start");
    let mut client = connect(&mock);
    client.send(&messages("x", false, &[]));
    assert!(client.sees_close());
    let url = format!("{}/v1/messages", mock.url());
    assert!(agent().post(&url).send(chat_body("x", false)).is_err());
    assert_eq!((mock.requests(), mock.failures()), (2, 2));
}

#[test]
fn hang_ends_when_the_fault_changes() {
    let mock = MockUpstream::start_with(Fault::Hang).expect("start");
    let mut client = connect(&mock);
    client.send(&messages("x", false, &[]));
    wait_until("the mock has the request", || mock.requests() == 1);
    assert_eq!(mock.failures(), 1, "counted while hanging");
    assert_eq!(mock.open_connections(), 1);
    mock.set_fault(Fault::None);
    // Nothing else would close it: the hang is forever, and the read waits at most
    // `SAFETY_TIMEOUT` before it fails the test.
    assert!(
        client.sees_close(),
        "a hang changed away ends without an answer"
    );
    let mut client = connect(&mock);
    client.send(&messages("after", false, &[]));
    assert_eq!(read_json(&mut client).0.status, 200);
}

#[test]
fn header_hang_survives_a_change_to_hang_and_ends_at_shutdown() {
    let mock = MockUpstream::start().expect("start");
    let mut client = connect(&mock);
    client.send(&messages("x", false, &[("x-mock-fault", "hang")]));
    wait_until("the mock has the request", || mock.requests() == 1);
    mock.set_fault(Fault::Hang);
    client.set_read_timeout(Duration::from_millis(300));
    let still = client.read_byte();
    assert!(still.is_err(), "still hanging, got {still:?}");
    client.set_read_timeout(raw::SAFETY_TIMEOUT);
    ends_within_the_safety_net("shutdown", move || mock.shutdown());
    assert!(client.sees_close());
}

#[test]
fn header_override_beats_the_default_fault() {
    let mock = MockUpstream::start_with(Fault::Status(503)).expect("start");
    let mut client = connect(&mock);
    client.send(&messages("x", false, &[("x-mock-fault", "none")]));
    assert_eq!(read_json(&mut client).0.status, 200);
    mock.set_fault(Fault::None);
    client.send(&messages("x", false, &[("x-mock-fault", "502")]));
    let (head, body) = read_json(&mut client);
    assert_eq!(head.status, 502);
    assert_eq!(body["error"]["type"], "api_error");
    client.send(&messages("x", false, &[("x-mock-fault", "explode")]));
    assert_eq!(read_json(&mut client).0.status, 400);
    assert_eq!(mock.fault(), Fault::None);
    assert_eq!(
        (mock.successes(), mock.failures(), mock.client_errors()),
        (1, 1, 1)
    );
}

#[test]
fn counters_move_once_per_request_before_the_answer() {
    let mock = MockUpstream::start().expect("start");
    let mut client = connect(&mock);
    // Headers, then the successes, failures and client errors expected after the request.
    let plan: [(Headers, u64, u64, u64); 5] = [
        (&[], 1, 0, 0),
        (&[("x-mock-fault", "500")], 1, 1, 0),
        (&[("x-mock-fault", "soft")], 1, 2, 0),
        (
            &[("x-mock-fault", "slow"), ("x-mock-delay-ms", "1")],
            2,
            2,
            0,
        ),
        (&[("x-mock-events", "many")], 2, 2, 1),
    ];
    for (index, (headers, successes, failures, client_errors)) in plan.into_iter().enumerate() {
        client.send(&messages("count", false, headers));
        read_json(&mut client);
        assert_eq!(mock.requests(), index as u64 + 1);
        assert_eq!(
            (mock.successes(), mock.failures(), mock.client_errors()),
            (successes, failures, client_errors)
        );
    }
    client.send(b"GET /v1/models HTTP/1.1\r\nhost: mock\r\n\r\n");
    assert_eq!(read_json(&mut client).1["data"][0]["id"], "claude-mock");
    client.send(b"HEAD / HTTP/1.1\r\nhost: mock\r\n\r\n");
    let head = client.read_head().expect("head");
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("0"))
    );
    client.send(b"GET /nowhere HTTP/1.1\r\nhost: mock\r\n\r\n");
    assert_eq!(read_json(&mut client).0.status, 404);
    assert_eq!(
        (mock.requests(), mock.successes(), mock.client_errors()),
        (8, 4, 2)
    );
    assert_eq!(mock.recorded().len(), 8);
}

#[test]
fn soft_and_sse_error_faults() {
    let mock = MockUpstream::start_with(Fault::SoftError200).expect("start");
    let mut client = connect(&mock);
    client.send(&messages("x", false, &[]));
    let (head, body) = read_json(&mut client);
    assert_eq!(
        (head.status, head.header("content-type")),
        (200, Some("application/json"))
    );
    assert_eq!(
        body,
        json!({"type":"error","error":{"type":"api_error","message":"soft"}})
    );
    mock.set_fault(Fault::SseErrorFirst);
    client.send(&messages("x", true, &[]));
    assert_eq!(client.read_head().expect("head").status, 200);
    let chunks = client.read_chunks().expect("chunks");
    assert_eq!(
        chunks,
        vec![b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n".to_vec()]
    );
    client.send(&messages("x", false, &[]));
    assert_eq!(read_json(&mut client).0.status, 529);
    assert_eq!(mock.failures(), 3);
}

#[test]
fn cut_stream_ends_without_the_final_chunk() {
    let mock = MockUpstream::start_with(Fault::SseCutAfter { events: 4 }).expect("start");
    let mut client = connect(&mock);
    client.send(&messages("x", true, &[]));
    assert_eq!(client.read_head().expect("head").status, 200);
    for _ in 0..4 {
        assert!(client.read_chunk().expect("event").is_some());
    }
    assert!(
        client.read_chunk().is_err(),
        "no fifth event and no terminating chunk"
    );
    let mut client = connect(&mock);
    client.send(&messages("x", false, &[]));
    let head = client.read_head().expect("head");
    assert!(
        read_sized_body(&mut client, &head).is_err(),
        "half a body, then a close"
    );
    assert_eq!(mock.failures(), 2);
}

#[test]
fn gated_stream_sends_its_opening_then_one_event_per_release() {
    let mock = MockUpstream::start_with(Fault::Gated).expect("start");
    let mut client = connect(&mock);
    client.send(&messages("x", true, &[]));
    assert_eq!(client.read_head().expect("head").status, 200);
    // The opening: message_start, content_block_start and the first delta.
    let opening: Vec<String> = (0..3)
        .map(|_| sse_parts(&client.read_chunk().expect("opening").expect("event")).0)
        .collect();
    assert_eq!(
        opening,
        [
            "message_start",
            "content_block_start",
            "content_block_delta"
        ]
    );
    client.set_read_timeout(Duration::from_millis(300));
    assert!(
        client.read_chunk().is_err(),
        "the next event waits for a release"
    );
    client.set_read_timeout(raw::SAFETY_TIMEOUT);
    mock.release(2);
    let next = client.read_chunk().expect("fourth").expect("event");
    assert_eq!(sse_parts(&next).0, "content_block_delta");
    assert!(client.read_chunk().expect("fifth").is_some());
    mock.set_fault(Fault::None);
    let rest = client.read_chunks().expect("rest after the gate opened");
    assert_eq!(rest.len(), 10 - 5);
    assert_eq!(mock.successes(), 1);
}

#[test]
fn slow_body_arrives_in_pieces_but_whole() {
    let mock = MockUpstream::start_with(Fault::SlowBody { delay_ms: 100 }).expect("start");
    let mut client = connect(&mock);
    let sent = Instant::now();
    client.send(&messages("slowly", false, &[]));
    let head = client.read_head().expect("head");
    let body = read_sized_body(&mut client, &head).expect("body");
    // A lower bound only, which no slowness can break: each of the four pieces follows a
    // pause of at least 100 ms, all of them after the request was sent.
    assert!(sent.elapsed() >= Duration::from_millis(400));
    let body: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["content"][0]["text"], "mock reply: slowly");
    assert_eq!(mock.successes(), 1);
}

#[test]
fn chunked_request_body_with_expect_continue() {
    let mock = MockUpstream::start().expect("start");
    let mut client = connect(&mock);
    let body = chat_body("chunky", false);
    let (first, second) = body.split_at(10);
    client.send(
        b"POST /v1/messages HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n",
    );
    assert_eq!(
        client.read_line().expect("continue"),
        "HTTP/1.1 100 Continue\r\n"
    );
    assert_eq!(client.read_line().expect("blank"), "\r\n");
    let chunked = format!(
        "{:x}\r\n{first}\r\n{:x};ext=1\r\n{second}\r\n0\r\n\r\n",
        first.len(),
        second.len()
    );
    client.send(chunked.as_bytes());
    let (head, reply) = read_json(&mut client);
    assert_eq!(head.status, 200);
    assert_eq!(reply["content"][0]["text"], "mock reply: chunky");
    assert_eq!(mock.recorded()[0].body, body.into_bytes());
}

#[test]
fn ten_megabyte_body_is_read_whole() {
    let mock = MockUpstream::start().expect("start");
    let big = "x".repeat(10 * 1024 * 1024);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": big}]}).to_string();
    let url = format!("{}/v1/messages/count_tokens", mock.url());
    let mut response = agent().post(&url).send(&body).expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let reply: Value =
        serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(reply["input_tokens"], body.len() / 4);
    assert_eq!(mock.recorded()[0].body.len(), body.len());
}

#[test]
fn count_tokens_404_counts_as_neither() {
    let mock = MockUpstream::start().expect("start");
    mock.set_count_tokens_404(true);
    let mut client = connect(&mock);
    client.send(&post("/v1/messages/count_tokens", "{}", &[]));
    let (head, body) = read_json(&mut client);
    assert_eq!(
        (head.status, body["error"]["type"].as_str()),
        (404, Some("not_found_error"))
    );
    assert_eq!(
        (
            mock.requests(),
            mock.successes(),
            mock.failures(),
            mock.client_errors()
        ),
        (1, 0, 0, 0)
    );
}

#[test]
fn malformed_request_gets_400_and_a_close() {
    let mock = MockUpstream::start().expect("start");
    let mut client = connect(&mock);
    client.send(b"this is not http\r\n\r\n");
    let (head, body) = read_json(&mut client);
    assert_eq!(
        (head.status, head.header("connection")),
        (400, Some("close"))
    );
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(client.sees_close());
    let mut client = connect(&mock);
    client.send(&post("/v1/messages", "{not json", &[]));
    assert_eq!(read_json(&mut client).0.status, 400);
    assert_eq!((mock.requests(), mock.client_errors()), (1, 2));
}

#[test]
fn shutdown_ends_gated_streams_and_idle_connections_promptly() {
    let mock = MockUpstream::start_with(Fault::Gated).expect("start");
    let mut gated = connect(&mock);
    gated.send(&messages("x", true, &[]));
    gated.read_head().expect("head");
    for _ in 0..3 {
        gated.read_chunk().expect("the opening");
    }
    let mut idle = connect(&mock);
    idle.send(b"GET / HTTP/1.1\r\nhost: mock\r\n\r\n");
    idle.read_head().expect("head");
    ends_within_the_safety_net("drop", move || drop(mock));
    assert!(
        gated.read_chunk().is_err(),
        "the gated stream is closed, not finished"
    );
    assert!(idle.sees_close());
}

#[test]
fn hang_ends_when_the_client_goes_away() {
    let mock = MockUpstream::start_with(Fault::Hang).expect("start");
    let mut client = connect(&mock);
    client.send(&messages("x", false, &[]));
    wait_until("the mock has the request", || mock.requests() == 1);
    assert_eq!(mock.open_connections(), 1);
    drop(client);
    wait_until("the mock closed its end", || mock.open_connections() == 0);
    assert_eq!(mock.connections_accepted(), 1);
}

/// Runs `work` (a shutdown or a drop, which must end hung and gated connections rather
/// than wait for them) on its own thread and waits for it within `wait_until`'s bound, so
/// a mock that waits forever fails the test instead of hanging it.
fn ends_within_the_safety_net(what: &str, work: impl FnOnce() + Send + 'static) {
    let worker = thread::spawn(work);
    wait_until(what, || worker.is_finished());
    worker.join().expect(what);
}
