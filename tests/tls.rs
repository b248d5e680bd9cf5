//! HTTPS upstreams (issue 9): a TLS front with a certificate from a CA made by the test,
//! in front of the project's mock. With the CA in `ca_file` JSON and SSE pass over TLS,
//! SSE still unbuffered, and one TLS connection carries a whole run of requests; without
//! it (or with a certificate for another name) the endpoint fails with a certificate error
//! in plain words, the client is served by a plain-HTTP backup, and neither the stats nor
//! the log line hold the key.

use crate::support::raw::{self, RawClient};
use crate::support::tls::{TempFile, TestCa, TlsFront};
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};

/// The mock, the TLS front before it, the CA file, and a proxy whose first endpoint is
/// the front with `ca_file` set or not. Fields drop in order: the mock first, so nothing
/// the proxy waits for is left holding a worker.
struct TlsRig {
    upstream: MockUpstream,
    front: TlsFront,
    _ca_file: TempFile,
    proxy: Proxy,
}

impl TlsRig {
    /// `backup`: a plain-HTTP second endpoint, when given.
    fn start(
        ca: &TestCa,
        fault: Fault,
        with_ca_file: bool,
        backup: Option<&MockUpstream>,
    ) -> TlsRig {
        let upstream = mock(fault);
        let front = TlsFront::start(ca, upstream.addr());
        let ca_file = ca.write_pem();
        let settings = if with_ca_file {
            json!({"ca_file": ca_file.path_str()})
        } else {
            json!({})
        };
        let mut endpoints = vec![endpoint_json(0, &front.url(), settings)];
        endpoints.extend(backup.map(|b| endpoint_json(1, &b.url(), json!({}))));
        let proxy = Proxy::start(&[], json!({"endpoints": endpoints}));
        TlsRig {
            upstream,
            front,
            _ca_file: ca_file,
            proxy,
        }
    }
}

fn stream_body(client: &mut RawClient) -> Vec<u8> {
    client.send(&raw::messages_request(true, &[]));
    let head = client.read_head().expect("head");
    assert_eq!(head.status, 200, "{head:?}");
    client.read_chunked_body().expect("a whole stream")
}

#[test]
fn with_ca_file_twenty_json_and_sse_requests_succeed_over_one_tls_connection() {
    let ca = TestCa::new();
    let rig = TlsRig::start(&ca, Fault::None, true, None);
    let client = agent();
    let mut raw_client = RawClient::connect(&rig.proxy.url);
    for i in 0..10 {
        let answer = send_message(&client, &rig.proxy.url, &[]);
        assert_eq!(answer.status, 200, "JSON request {i}: {}", answer.text());
        assert!(
            answer.text().contains("mock reply: hello"),
            "{}",
            answer.text()
        );
        let events = stream_body(&mut raw_client);
        let names: Vec<_> = raw::split_events(&events)
            .into_iter()
            .map(raw::event_name)
            .collect();
        assert_eq!(
            names.last().map(String::as_str),
            Some("message_stop"),
            "SSE request {i}"
        );
    }
    assert_eq!(rig.upstream.successes(), 20);
    assert_eq!(
        (rig.front.connections(), rig.front.handshakes()),
        (1, 1),
        "20 sequential requests reuse one TLS connection"
    );
}

/// Every HTTPS connection to an endpoint shares one TLS setup, as one client would: the
/// second and third connections (opened while the first two are busy with streams) resume
/// the session the first one got, instead of a full handshake each. (A TLS setup per
/// connection, as ureq makes for a request with a configuration of its own, held its own
/// copy of the root store, some 60 KiB per HTTPS stream, and never resumed a session.)
#[test]
fn new_tls_connections_to_an_endpoint_resume_the_session_of_the_first() {
    let ca = TestCa::new();
    let rig = TlsRig::start(&ca, Fault::Gated, true, None);
    let mut clients = Vec::new();
    for n in 1..=3 {
        let mut client = RawClient::connect(&rig.proxy.url);
        client.send(&raw::messages_request(true, &[]));
        let head = client.read_head().expect("the head of a held stream");
        assert_eq!(head.status, 200, "stream {n}: {head:?}");
        clients.push(client);
    }
    assert_eq!(
        (rig.front.handshakes(), rig.front.resumed()),
        (3, 2),
        "three held streams, three TLS connections, two of them resumed"
    );
}

#[test]
fn sse_over_tls_reaches_the_client_event_by_event_while_the_upstream_holds_the_next() {
    let ca = TestCa::new();
    let rig = TlsRig::start(&ca, Fault::Gated, true, None);
    let mut client = RawClient::connect(&rig.proxy.url);
    client.send(&raw::messages_request(true, &[("x-mock-events", "2")]));
    let head = client.read_head().expect("the head, while event 1 is held");
    assert_eq!(head.status, 200, "{head:?}");
    let mut events = client.events();
    // The mock sends event 0 at once and each later one only after a release: each event
    // read here came through while the upstream was holding the next.
    for index in 0..7 {
        let event = events
            .next_event()
            .unwrap_or_else(|e| panic!("event {index} held back over TLS: {e}"))
            .expect("the stream ended early");
        assert!(!raw::event_name(&event).is_empty(), "event {index}");
        rig.upstream.release(1);
    }
    assert_eq!(events.next_event().expect("the terminator"), None);
}

/// The endpoint's certificate check fails: the client is served by the backup, and the
/// stats and the log name the certificate error in plain words, never the key.
fn assert_certificate_failure_fails_over(rig: &TlsRig, backup: &MockUpstream, words: &[&str]) {
    let mark = log_mark();
    for _ in 0..3 {
        let answer = send_message(&agent(), &rig.proxy.url, &[]);
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.header("x-mock-upstream"), Some("backup"));
    }
    assert_eq!(
        rig.upstream.requests(),
        0,
        "no request crossed a refused certificate"
    );
    assert_eq!(backup.successes(), 3);
    let stats = rig.proxy.endpoint_stats(0);
    let last_error = stats["health_status"]["last_error"]
        .as_str()
        .unwrap_or_default();
    for word in words {
        assert!(
            last_error.contains(word),
            "no {word:?} in last_error {last_error:?}"
        );
    }
    let lines = log_lines_since(mark, &[&rig.proxy.id(0), "failed", "certificate"]);
    assert!(!lines.is_empty(), "no log line names the certificate error");
    assert!(!all_log_text().contains(&key(0)), "a key reached the log");
    assert!(
        !stats.to_string().contains(&key(0)),
        "a key reached the stats"
    );
}

#[test]
fn without_ca_file_the_unknown_ca_is_a_certificate_error_and_traffic_fails_over() {
    let ca = TestCa::new();
    let backup = MockUpstream::start_named("backup", Fault::None).expect("mock");
    let rig = TlsRig::start(&ca, Fault::None, false, Some(&backup));
    assert_certificate_failure_fails_over(&rig, &backup, &["TLS", "certificate", "ca_file"]);
}

#[test]
fn a_certificate_for_another_name_is_a_certificate_error_and_traffic_fails_over() {
    let ca = TestCa::for_names(&["relay.example"]);
    let backup = MockUpstream::start_named("backup", Fault::None).expect("mock");
    let rig = TlsRig::start(&ca, Fault::None, true, Some(&backup));
    assert_certificate_failure_fails_over(&rig, &backup, &["TLS", "certificate", "not valid for"]);
}

#[test]
fn a_mock_fault_crosses_the_tls_front_unchanged() {
    // The rig's own check: a fault injected by the mock crosses the TLS front unchanged.
    let ca = TestCa::new();
    let rig = TlsRig::start(&ca, Fault::Status(529), true, None);
    let answer = send_message(&agent(), &rig.proxy.url, &[]);
    assert_eq!(answer.status, 529, "{}", answer.text());
    let body: Value = answer.json();
    assert_eq!(body["error"]["type"], "overloaded_error");
}
