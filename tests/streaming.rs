//! Streaming pass-through (contract rule 7, issue 4) through the real proxy, with a raw
//! socket client over loopback: each event reaches the client while the upstream still
//! holds the next one, the bytes arrive unchanged, an error event before the commit point
//! fails over, a stream cut after it ends with one `event: error`, and a client that hangs
//! up frees its worker without counting against the endpoint. Nothing here asserts how
//! long anything takes; every read has a timeout only as a safety net.

use crate::support::raw::{self, Head, RawClient};
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};

/// A proxy in front of one mock. Fields drop in declaration order: the mock goes first
/// and closes whatever it still holds, so a failing test never leaves a proxy worker
/// blocked on a gated stream while the proxy shuts down.
struct Rig {
    upstream: MockUpstream,
    proxy: Proxy,
}

impl Rig {
    fn start(fault: Fault, extra: Value) -> Rig {
        let upstream = mock(fault);
        let proxy = Proxy::start(&[&upstream], extra);
        Rig { upstream, proxy }
    }

    fn client(&self) -> RawClient {
        RawClient::connect(&self.proxy.url)
    }

    fn failed_requests(&self) -> u64 {
        let health = &self.proxy.endpoint_stats(0)["health_status"];
        health["failed_requests"].as_u64().expect("failed_requests")
    }
}

/// The event names of a mock stream with `deltas` text deltas, in order.
fn mock_event_names(deltas: usize) -> Vec<&'static str> {
    let mut names = vec!["message_start", "content_block_start"];
    names.extend(std::iter::repeat_n("content_block_delta", deltas));
    names.extend(["content_block_stop", "message_delta", "message_stop"]);
    names
}

fn event_names(body: &[u8]) -> Vec<String> {
    raw::split_events(body)
        .into_iter()
        .map(raw::event_name)
        .collect()
}

/// Sends `request` to `url` and reads a whole chunked answer, terminator included.
fn streamed(url: &str, request: &[u8]) -> (Head, Vec<u8>) {
    let mut client = RawClient::connect(url);
    client.send(request);
    let head = client.read_head().expect("response head");
    assert_eq!(head.status, 200, "{head:?}");
    assert!(head.is_chunked(), "a stream is chunked: {head:?}");
    let body = client
        .read_chunked_body()
        .expect("a chunked body that ends with its terminator");
    (head, body)
}

/// Another request on the same connection gets a well-formed answer: the previous
/// response carried exactly the bytes its head announced.
fn assert_connection_is_clean(client: &mut RawClient) {
    client.send(&raw::request("GET", "/__qcc__/health", &[], b""));
    let head = client
        .read_head()
        .expect("the next response starts right after the previous one");
    assert_eq!(head.status, 200);
}

fn assert_anthropic_error_shape(data: &Value) {
    assert_eq!(data["type"], "error", "{data}");
    assert!(data["error"]["type"].is_string(), "{data}");
    assert!(data["error"]["message"].is_string(), "{data}");
    assert_eq!(data.as_object().map(|o| o.len()), Some(2), "{data}");
}

/// The gated mock sends event 0 at once and each later event only after one
/// `release(1)`. The client must read each event whole through the proxy before the test
/// releases the next, so the proxy cannot be waiting for more bytes before it forwards.
fn assert_each_event_arrives_before_the_next_release(event_bytes: usize) {
    let rig = Rig::start(Fault::Gated, json!({}));
    let mut client = rig.client();
    let size = event_bytes.to_string();
    let controls = [
        ("x-mock-events", "3"),
        ("x-mock-event-bytes", size.as_str()),
    ];
    client.send(&raw::messages_request(true, &controls));
    let head = client.read_head().expect("the head, while event 1 is held");
    assert_eq!(
        (head.status, head.header("content-type")),
        (200, Some("text/event-stream"))
    );
    let expected = mock_event_names(3);
    let mut events = client.events();
    for (index, name) in expected.iter().enumerate() {
        let event = events
            .next_event()
            .unwrap_or_else(|e| panic!("event {index} held back while the upstream waits: {e}"))
            .expect("the stream ended early");
        let (got, data) = raw::event_parts(&event);
        assert_eq!(got, *name, "event {index}");
        if got == "content_block_delta" {
            let text = data["delta"]["text"].as_str().expect("delta text");
            assert_eq!(text.len(), event_bytes, "event {index} has the asked size");
        }
        if index + 1 < expected.len() {
            rig.upstream.release(1);
        }
    }
    assert_eq!(events.next_event().expect("the terminator"), None);
}

#[test]
fn small_events_reach_the_client_while_the_upstream_holds_the_next() {
    assert_each_event_arrives_before_the_next_release(30);
}

#[test]
fn twenty_kib_events_reach_the_client_while_the_upstream_holds_the_next() {
    assert_each_event_arrives_before_the_next_release(20 * 1024);
}

#[test]
fn a_fifty_event_stream_arrives_byte_identical_to_the_direct_one() {
    let rig = Rig::start(Fault::None, json!({}));
    let controls = [("x-mock-events", "45"), ("x-mock-event-bytes", "100")];
    let request = raw::messages_request(true, &controls);
    let (_, direct) = streamed(&rig.upstream.url(), &request);
    let (_, proxied) = streamed(&rig.proxy.url, &request);
    assert_eq!(raw::split_events(&direct).len(), 50);
    assert!(
        proxied == direct,
        "the proxied body differs from the direct one:\n{}\n---\n{}",
        String::from_utf8_lossy(&proxied),
        String::from_utf8_lossy(&direct)
    );
}

#[test]
fn an_error_as_first_event_fails_over_to_a_clean_stream() {
    let failing = MockUpstream::start_named("failing", Fault::SseErrorFirst).expect("mock");
    let healthy = MockUpstream::start_named("healthy", Fault::None).expect("mock");
    let proxy = Proxy::start(&[&failing, &healthy], json!({}));
    let (head, body) = streamed(&proxy.url, &raw::messages_request(true, &[]));
    assert_eq!(head.header("x-mock-upstream"), Some("healthy"));
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("event: error"), "{text}");
    assert_eq!(event_names(&body), mock_event_names(5));
    assert_eq!((failing.requests(), healthy.requests()), (1, 1));
}

#[test]
fn a_stream_cut_midway_ends_with_one_error_event_and_marks_the_endpoint() {
    let rig = Rig::start(Fault::SseCutAfter { events: 3 }, json!({}));
    let before = rig.failed_requests();
    let (_, body) = streamed(&rig.proxy.url, &raw::messages_request(true, &[]));
    let names = event_names(&body);
    let cut_after_three = &mock_event_names(5)[..3];
    assert_eq!(
        names[..3],
        *cut_after_three,
        "the events sent before the cut"
    );
    assert_eq!(names[3..], ["error"], "then exactly one error event");
    let events = raw::split_events(&body);
    assert_anthropic_error_shape(&raw::event_parts(events[3]).1);
    // An answer is recorded before its end goes out: stats read once the client has seen
    // the end include it.
    assert_eq!(rig.failed_requests(), before + 1);
}

#[test]
fn a_client_hanging_up_midstream_frees_the_worker_and_spares_the_endpoint() {
    let rig = Rig::start(Fault::Gated, json!({"workers": 1}));
    let before = rig.failed_requests();
    // Long enough (about 1 MB) that the proxy cannot finish it into a closed socket.
    let controls = [("x-mock-events", "1000"), ("x-mock-event-bytes", "1000")];
    let mut client = rig.client();
    client.send(&raw::messages_request(true, &controls));
    client.read_head().expect("head");
    let first = client
        .events()
        .next_event()
        .expect("event 0")
        .expect("an event");
    assert_eq!(raw::event_name(&first), "message_start");
    client.hang_up();
    rig.upstream.release(mock_event_names(1000).len() - 1);
    wait_until("the proxy closes its upstream connection", || {
        rig.upstream.open_connections() == 0
    });
    let mut next = rig.client();
    next.send(&raw::messages_request(false, &[]));
    let head = next
        .read_head()
        .expect("the only worker serves the next request");
    assert_eq!(head.status, 200);
    assert_eq!(
        rig.failed_requests(),
        before,
        "a client hang-up is not the endpoint's fault"
    );
}

#[test]
fn a_plain_json_answer_keeps_its_content_length() {
    let rig = Rig::start(Fault::None, json!({}));
    let mut direct = RawClient::connect(&rig.upstream.url());
    direct.send(&raw::messages_request(false, &[]));
    let direct_head = direct.read_head().expect("direct head");
    let length = direct_head
        .content_length()
        .expect("the mock sends a length");
    let direct_body = direct.read_exact_body(length).expect("direct body");
    let mut client = rig.client();
    client.send(&raw::messages_request(false, &[]));
    let head = client.read_head().expect("head");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("transfer-encoding"), None, "{head:?}");
    assert_eq!(head.content_length(), Some(length), "{head:?}");
    assert_eq!(client.read_exact_body(length).expect("body"), direct_body);
    assert_connection_is_clean(&mut client);
}

#[test]
fn head_requests_get_the_upstream_head_and_no_body() {
    let rig = Rig::start(Fault::None, json!({}));
    for path in ["/", "/v1/models"] {
        let head_request = raw::request("HEAD", path, &[], b"");
        let mut direct = RawClient::connect(&rig.upstream.url());
        direct.send(&head_request);
        let direct_head = direct.read_head().expect("direct head");
        let mut client = rig.client();
        client.send(&head_request);
        let head = client.read_head().expect("head");
        assert_eq!(head.status, 200, "HEAD {path}");
        assert_eq!(
            head.content_length(),
            direct_head.content_length(),
            "HEAD {path}"
        );
        assert_connection_is_clean(&mut client);
    }
}
