//! Bodies pass through untouched (contract rule 1, issue 9): a gzip JSON answer and a
//! gzip event stream reach the client as the upstream's own bytes with their
//! `content-encoding` (the stream still piece by piece), no `accept-encoding` is added
//! for a client that sent none, Claude Code-sized and 10 MB request bodies reach the
//! second upstream byte-identical after a failover, and `HEAD /` and `?beta=true` pass.

use crate::support::raw::{self, RawClient};
use crate::support::tls::{LoopbackServer, read_request};
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use flate2::Compression;
use flate2::write::GzEncoder;
use parking_lot::Mutex;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

/// An upstream that answers every request with the same bytes, given in pieces: the first
/// at once, each later one after a `release`. It records every request head.
struct FixedUpstream {
    server: LoopbackServer,
    heads: Arc<Mutex<Vec<String>>>,
    permits: crossbeam_channel::Sender<()>,
}

impl FixedUpstream {
    fn start(pieces: Vec<Vec<u8>>) -> FixedUpstream {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (permits, gate) = crossbeam_channel::unbounded();
        let log = heads.clone();
        let server = LoopbackServer::start(move |mut socket| {
            while let Some(head) = read_request(&mut socket) {
                log.lock().push(head);
                if !answer(&mut socket, &pieces, &gate) {
                    return;
                }
            }
        });
        FixedUpstream {
            server,
            heads,
            permits,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    fn release(&self) {
        self.permits.send(()).expect("the upstream is running");
    }

    /// The last request head, lower-cased.
    fn last_head(&self) -> String {
        let heads = self.heads.lock();
        heads.last().expect("a request").to_ascii_lowercase()
    }
}

fn proxy_before(upstream: &FixedUpstream) -> Proxy {
    let endpoints = [endpoint_json(0, &upstream.url(), json!({}))];
    Proxy::start(&[], json!({"endpoints": endpoints}))
}

/// Writes the pieces, each after the first waiting for a permit; false when it broke off.
fn answer(
    socket: &mut TcpStream,
    pieces: &[Vec<u8>],
    gate: &crossbeam_channel::Receiver<()>,
) -> bool {
    for (index, piece) in pieces.iter().enumerate() {
        if index > 0 && gate.recv_timeout(raw::SAFETY_TIMEOUT).is_err() {
            return false;
        }
        if socket.write_all(piece).is_err() {
            return false;
        }
    }
    true
}

/// `parts` gzip-compressed as one stream, each part flushed so that the bytes so far
/// decode to it: the compressed pieces, in order.
fn gzip_parts(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    let mut pieces = Vec::new();
    let mut sent = 0;
    for part in parts {
        encoder.write_all(part).expect("compress");
        encoder.flush().expect("sync flush");
        pieces.push(encoder.get_ref()[sent..].to_vec());
        sent = encoder.get_ref().len();
    }
    let all = encoder.finish().expect("gzip trailer");
    pieces
        .last_mut()
        .expect("a part")
        .extend_from_slice(&all[sent..]);
    pieces
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
    framed.extend_from_slice(data);
    framed.extend_from_slice(b"\r\n");
    framed
}

const JSON_REPLY: &[u8] = br#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"compressed hello"}],"model":"claude-test","stop_reason":"end_turn","usage":{"input_tokens":5,"output_tokens":2}}"#;
const EVENTS: [&[u8]; 2] = [
    b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
    b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

/// A gzip JSON answer with its length: one piece.
fn gzip_json_upstream() -> (FixedUpstream, Vec<u8>) {
    let body = gzip_parts(&[JSON_REPLY]).concat();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let piece = [head.as_bytes(), &body].concat();
    (FixedUpstream::start(vec![piece]), body)
}

fn gzip_message(client: &mut RawClient, headers: raw::Headers) -> raw::Head {
    client.send(&raw::messages_request(false, headers));
    let head = client.read_head().expect("head");
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-encoding"), Some("gzip"), "{head:?}");
    head
}

#[test]
fn a_gzip_json_answer_reaches_the_client_byte_identical_with_its_encoding() {
    let (upstream, gzipped) = gzip_json_upstream();
    let proxy = proxy_before(&upstream);
    let mut client = RawClient::connect(&proxy.url);
    let head = gzip_message(&mut client, &[("accept-encoding", "gzip")]);
    let body = client
        .read_exact_body(head.content_length().expect("a length"))
        .expect("body");
    assert_eq!(body, gzipped, "the upstream's own bytes");
    assert_eq!(gunzip(&body), JSON_REPLY);
    assert!(
        upstream
            .last_head()
            .contains("\r\naccept-encoding: gzip\r\n"),
        "{}",
        upstream.last_head()
    );
}

#[test]
fn a_client_without_accept_encoding_gets_what_the_upstream_sent_and_none_is_added() {
    let (upstream, gzipped) = gzip_json_upstream();
    let proxy = proxy_before(&upstream);
    let mut client = RawClient::connect(&proxy.url);
    let head = gzip_message(&mut client, &[]);
    let body = client
        .read_exact_body(head.content_length().expect("a length"))
        .expect("body");
    assert_eq!(body, gzipped);
    assert!(
        !upstream.last_head().contains("accept-encoding"),
        "{}",
        upstream.last_head()
    );
    // The mock records every header: nothing encoding-related was added there either.
    let mock = mock(Fault::None);
    let proxy = Proxy::start(&[&mock], json!({}));
    assert_eq!(post_message(&proxy.url, &[]).0, 200);
    let recorded = mock.recorded().pop().expect("a request");
    assert_eq!(
        recorded.header("accept-encoding"),
        None,
        "{:?}",
        recorded.headers
    );
    assert_eq!(recorded.header("te"), None, "{:?}", recorded.headers);
}

#[test]
fn a_gzip_event_stream_streams_byte_identical_with_its_encoding() {
    let parts = gzip_parts(&EVENTS);
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n";
    let first = [head.as_bytes(), &chunk(&parts[0])].concat();
    let rest = [chunk(&parts[1]), b"0\r\n\r\n".to_vec()].concat();
    let upstream = FixedUpstream::start(vec![first, rest]);
    let proxy = proxy_before(&upstream);
    let mut client = RawClient::connect(&proxy.url);
    client.send(&raw::messages_request(true, &[("accept-encoding", "gzip")]));
    let head = client
        .read_head()
        .expect("head, while the upstream holds the rest");
    assert_eq!(head.header("content-encoding"), Some("gzip"), "{head:?}");
    let mut received = Vec::new();
    while received.len() < parts[0].len() {
        let piece = client
            .read_chunk()
            .expect("the first gzip piece, while the rest is held");
        received.extend(piece.expect("the stream ended early"));
    }
    assert_eq!(
        received, parts[0],
        "the first piece arrived whole before the rest was sent"
    );
    assert_eq!(
        gunzip_prefix(&received),
        EVENTS[0],
        "and it decodes to the first event"
    );
    upstream.release();
    received.extend(client.read_chunked_body().expect("the rest"));
    assert_eq!(received, parts.concat(), "the upstream's own bytes");
    assert_eq!(gunzip(&received), EVENTS.concat());
}

/// What the bytes of an unfinished gzip stream decode to so far.
fn gunzip_prefix(bytes: &[u8]) -> Vec<u8> {
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    decoder.write_all(bytes).expect("valid gzip so far");
    decoder.flush().expect("flush");
    decoder.get_ref().clone()
}

/// A `/v1/messages` body of about `size` bytes: a long first user turn (the history
/// Claude Code sends), then a short last one the mock echoes. Varied text, so a lost or
/// moved piece would show.
fn large_message(size: usize) -> String {
    let history: String = (0..size)
        .map(|i| (b'a' + ((i * 7 + i / 26) % 26) as u8) as char)
        .collect();
    json!({"model": "claude-test", "max_tokens": 16, "messages": [
        {"role": "user", "content": history},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "hello"}]})
    .to_string()
}

/// The first endpoint fails with `fault` once; the body reaches the second unchanged.
fn assert_large_body_fails_over_byte_identical(size: usize, fault: Fault) {
    let first = MockUpstream::start_named("first", fault).expect("mock");
    let second = MockUpstream::start_named("second", Fault::None).expect("mock");
    let proxy = Proxy::start(&[&first, &second], json!({}));
    let body = large_message(size);
    let client = agent();
    let mut response = client
        .post(format!("{}/v1/messages?beta=true", proxy.url))
        .header("content-type", "application/json")
        .send(body.as_str())
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-mock-upstream")
            .map(|v| v.as_bytes()),
        Some(&b"second"[..])
    );
    response.body_mut().read_to_vec().expect("body");
    assert_eq!(first.requests(), 1, "failed over once");
    let recorded = second.recorded().pop().expect("a request");
    assert_eq!(recorded.body.len(), body.len());
    assert!(
        recorded.body == body.as_bytes(),
        "the body changed on its way"
    );
    assert_eq!(recorded.path, "/v1/messages?beta=true");
}

#[test]
fn a_120_kb_body_failing_over_after_a_500_reaches_the_second_upstream_byte_identical() {
    assert_large_body_fails_over_byte_identical(120 * 1024, Fault::Status(500));
}

#[test]
fn a_10_mb_body_failing_over_after_a_reset_reaches_the_second_upstream_byte_identical() {
    assert_large_body_fails_over_byte_identical(10 * 1024 * 1024, Fault::Reset);
}

#[test]
fn head_slash_is_answered_200_without_a_body_and_a_beta_query_passes_through() {
    let upstream = mock(Fault::None);
    let proxy = Proxy::start(&[&upstream], json!({}));
    let mut client = RawClient::connect(&proxy.url);
    client.send(&raw::request("HEAD", "/", &[], b""));
    let head = client.read_head().expect("head");
    assert_eq!(head.status, 200, "{head:?}");
    client.send(&raw::request(
        "POST",
        "/v1/messages?beta=true",
        &[("content-type", "application/json")],
        message_body().as_bytes(),
    ));
    let next = client
        .read_head()
        .expect("the next answer right after the bodiless one");
    assert_eq!(next.status, 200, "{next:?}");
    let recorded = upstream.recorded();
    let seen: Vec<_> = recorded
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    assert_eq!(seen, [("HEAD", "/"), ("POST", "/v1/messages?beta=true")]);
}
