//! Capacity (issue 13), against the real binary over loopback: no stream waits for another,
//! connections are bounded and idle ones make room, running out of descriptors is
//! survived, the status endpoint answers when every connection is held, and SIGTERM stops
//! accepting at once. Nothing here asserts a time: each test holds its streams open with the
//! mock's gate and checks what the proxy did meanwhile.

use crate::support::binary::Binary;
use crate::support::raw::{self, RawClient};
use crate::support::tls::{LoopbackServer, read_request};
use crate::support::*;
use failover_proxy::mock::fault::Fault;
use serde_json::json;
use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Opens a stream through the proxy and reads its head and first event; the rest is read
/// by `finish`.
fn open_stream(url: &str) -> RawClient {
    open_stream_with(url, &raw::messages_request(true, &[]))
}

/// `open_stream` with the request given.
fn open_stream_with(url: &str, request: &[u8]) -> RawClient {
    let mut client = RawClient::connect(url);
    client.set_read_timeout(Duration::from_secs(60));
    client.send(request);
    let head = client.read_head().expect("the stream's head");
    assert_eq!(head.status, 200);
    let first = client.events().next_event().expect("a first event");
    assert_eq!(raw::event_name(&first.expect("an event")), "message_start");
    client
}

/// Reads a stream to its end; true if it ended with `message_stop`.
fn finish(mut client: RawClient) -> bool {
    let mut last = String::new();
    let mut events = client.events();
    while let Ok(Some(event)) = events.next_event() {
        last = raw::event_name(&event);
    }
    last == "message_stop"
}

#[test]
fn a_thousand_streams_are_open_at_once_under_a_1024_descriptor_limit() {
    const STREAMS: usize = 1000;
    let gated = mock(Fault::Gated);
    let binary = Binary::serve_with_nofile(&[gated.url()], json!({}), Some("1024:"));
    let started = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (url, started) = (binary.url.clone(), started.clone());
            // Started over about a second, as a busy team's clients would.
            std::thread::sleep(Duration::from_micros(1000));
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .stack_size(128 * 1024)
                .spawn(move || {
                    let client = open_stream(&url);
                    started.fetch_add(1, Ordering::SeqCst);
                    finish(client)
                })
                .expect("a client thread")
        })
        .collect();
    // The gate holds every stream open: each first event that arrives arrived while all
    // the other streams were still running.
    let all_open = within(Duration::from_secs(120), || {
        started.load(Ordering::SeqCst) == STREAMS
    });
    let open = started.load(Ordering::SeqCst);
    gated.set_fault(Fault::None);
    let completed = clients
        .into_iter()
        .map(|c| c.join().expect("a client"))
        .filter(|&done| done)
        .count();
    assert!(
        all_open,
        "only {open} of {STREAMS} streams were open at once"
    );
    assert_eq!(completed, STREAMS);
}

#[test]
fn five_thousand_idle_connections_keep_threads_bounded_and_a_new_client_is_served() {
    let up = mock(Fault::None);
    let binary = Binary::serve(&[up.url()], json!({"max_connections": 1000}));
    let addr = binary.url.trim_start_matches("http://").to_string();
    let idle: Vec<TcpStream> = (0..5000)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Every connection was taken, and the oldest 4000 were closed to make room for newer
    // ones: each of those sees the end of the stream, with no answer.
    for (i, socket) in idle[..4000].iter().enumerate() {
        socket.set_read_timeout(Some(raw::SAFETY_TIMEOUT)).unwrap();
        let read = (&*socket).read(&mut [0u8; 1]);
        assert!(
            matches!(read, Ok(0)),
            "connection {i} was not closed: {read:?}"
        );
    }
    // Threads of evicted connections go back to the pool (and the pool's idle ones beyond
    // `workers` exit after 5 s): the count settles near the bound.
    let settled = within(Duration::from_secs(20), || binary.threads() < 1100);
    let threads = binary.threads();
    assert!(settled, "{threads} threads for 1000 connections");
    let (status, _) = post_message(&binary.url, &[]);
    assert_eq!(status, 200);
    assert!(binary.threads() < 1100);
    drop(idle);
}

#[test]
fn running_out_of_descriptors_is_survived() {
    let up = mock(Fault::None);
    let mut binary = Binary::serve_with_nofile(&[up.url()], json!({}), Some("64:64"));
    let addr = binary.url.trim_start_matches("http://").to_string();
    let crowd: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(&addr).expect("connect (the backlog takes it)"))
        .collect();
    let exhausted = within(Duration::from_secs(10), || {
        binary.log().contains("accepting a connection failed")
    });
    drop(crowd);
    assert!(
        exhausted,
        "the descriptors never ran out:\n{}",
        binary.log()
    );
    // Once the crowd is gone the listener accepts again.
    let served = within(Duration::from_secs(20), || {
        agent()
            .post(format!("{}/v1/messages", binary.url))
            .send(message_body())
            .is_ok_and(|r| r.status() == 200)
    });
    assert!(served, "the listener never recovered:\n{}", binary.log());
    assert!(binary.alive());
    assert!(!binary.stderr().contains("panicked"), "{}", binary.stderr());
}

#[test]
fn health_answers_and_the_overflow_gets_529_while_every_connection_is_held() {
    let gated = mock(Fault::Gated);
    let binary = Binary::serve(&[gated.url()], json!({"max_connections": 4}));
    let held: Vec<RawClient> = (0..4).map(|_| open_stream(&binary.url)).collect();
    let (status, body) = get(&format!("{}/__qcc__/health", binary.url));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    overloaded(&binary.url, &raw::messages_request(false, &[]));
    assert_eq!(gated.requests(), 4);
    gated.set_fault(Fault::None);
    assert!(held.into_iter().all(finish));
}

/// Sends `request` on a new connection, which must get 529 `overloaded_error` with
/// `retry-after: 1` and then close; the error's message.
fn overloaded(url: &str, request: &[u8]) -> String {
    let mut client = RawClient::connect(url);
    client.set_read_timeout(Duration::from_secs(10));
    client.send(request);
    let head = client.read_head().unwrap();
    assert_eq!(head.status, 529);
    assert_eq!(head.header("retry-after"), Some("1"));
    let body = client
        .read_exact_body(head.content_length().unwrap())
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["type"], "overloaded_error");
    assert!(client.sees_close());
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A messages request whose body is `size` bytes or a few more (in `system`, which the
/// mock does not echo), with `headers` beside its content type.
fn request_of(size: usize, stream: bool, headers: &[(&str, &str)]) -> Vec<u8> {
    let body = json!({"model": "claude-test", "max_tokens": 16, "stream": stream,
                      "system": "x".repeat(size),
                      "messages": [{"role": "user", "content": "hello"}]});
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    raw::request("POST", "/v1/messages", &all, body.to_string().as_bytes())
}

/// The status of the answer to `request` on a new connection.
fn status_of(url: &str, request: &[u8]) -> u16 {
    let mut client = RawClient::connect(url);
    client.set_read_timeout(Duration::from_secs(10));
    client.send(request);
    client.read_head().expect("an answer").status
}

#[test]
fn the_request_bodies_held_at_once_are_bounded_by_max_body_memory() {
    let up = mock(Fault::Gated);
    let limits = json!({"max_body_bytes": 1_000_000, "max_body_memory": 1_500_000});
    let binary = Binary::serve(&[up.url()], limits);
    // A stream past its commit point holds no body: its 600 KB was given back when its
    // answer was committed, so 900 KB more fit while it runs.
    let stream = open_stream_with(&binary.url, &request_of(600_000, true, &[]));
    assert_eq!(
        status_of(&binary.url, &request_of(900_000, false, &[])),
        200
    );
    // A request that waits for its upstream's answer holds its 600 KB...
    let mut waiting = RawClient::connect(&binary.url);
    waiting.send(&request_of(600_000, false, &[("x-mock-fault", "hang")]));
    wait_until("the upstream has the waiting request", || {
        up.requests() == 3
    });
    // ...so 900 KB more would pass 1.5 MB: 529 before it is all read, nothing forwarded.
    let message = overloaded(&binary.url, &request_of(900_000, false, &[]));
    assert!(message.contains("max_body_memory"), "{message}");
    assert_eq!(up.requests(), 3);
    // What fits beside it still goes through.
    assert_eq!(
        status_of(&binary.url, &request_of(100_000, false, &[])),
        200
    );
    // The waiting client goes away: its request ends, its share comes back (the proxy
    // sees the client gone within a second), and 900 KB fit again.
    waiting.hang_up();
    let fits = within(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(100));
        status_of(&binary.url, &request_of(900_000, false, &[])) == 200
    });
    assert!(fits, "the share of a request that ended was not given back");
    up.set_fault(Fault::None);
    assert!(finish(stream));
}

#[test]
fn sigterm_stops_accepting_at_once_and_lets_the_stream_finish() {
    let gated = mock(Fault::Gated);
    let mut binary = Binary::serve(&[gated.url()], json!({}));
    let stream = open_stream(&binary.url);
    let addr = binary.url.trim_start_matches("http://").to_string();
    let outcome = std::thread::scope(|scope| {
        let exit = scope.spawn(|| binary.terminate());
        // The process is draining (the stream is held open by the gate) and must refuse
        // new connections meanwhile.
        let refused = within(Duration::from_secs(10), || {
            TcpStream::connect(&addr).is_err()
        });
        gated.set_fault(Fault::None);
        let finished = finish(stream);
        (refused, finished, exit.join().expect("terminate"))
    });
    let (refused, finished, code) = outcome;
    assert!(refused, "the listener kept accepting during the drain");
    assert!(finished, "the stream in flight did not finish");
    assert_eq!(code, Some(0));
}

/// The size of the relay's answers in the tests of answers held before the commit point.
const ANSWER: usize = 600_000;

/// A JSON answer of `ANSWER` bytes (its text pads it out).
fn big_answer() -> String {
    let frame = json!({"type": "message", "role": "assistant", "model": "claude-test",
                       "content": [{"type": "text", "text": ""}],
                       "usage": {"input_tokens": 5, "output_tokens": 7}});
    let pad = ANSWER - frame.to_string().len();
    let mut answer = frame;
    answer["content"][0]["text"] = json!("x".repeat(pad));
    answer.to_string()
}

/// A relay that sends `big_answer`'s head and first 90 % at once and the rest when `gate`
/// opens (or after 30 s, when the test has failed), with a content-length or chunked;
/// one answer a connection. (A body of unknown length takes its part of
/// `max_body_memory` as it arrives: two halves would fit in 1 MB.)
fn half_then_gate(gate: Arc<AtomicBool>, chunked: bool) -> LoopbackServer {
    use std::io::Write;
    LoopbackServer::start(move |mut socket| {
        if read_request(&mut socket).is_none() {
            return;
        }
        let body = big_answer();
        let (first, rest) = body.split_at(ANSWER / 10 * 9);
        let framing = match chunked {
            true => "transfer-encoding: chunked".to_string(),
            false => format!("content-length: {ANSWER}"),
        };
        let piece = |text: &str| match chunked {
            true => format!("{:x}\r\n{text}\r\n", text.len()),
            false => text.to_string(),
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n{framing}\r\n\r\n"
        );
        let _proxy_may_be_gone = socket.write_all((head + &piece(first)).as_bytes());
        for _ in 0..3000 {
            if gate.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let end = if chunked { "0\r\n\r\n" } else { "" };
        let _proxy_may_be_gone = socket.write_all((piece(rest) + end).as_bytes());
    })
}

/// A client of the proxy in its own thread: sends a small request, notes when the answer's
/// head arrives, and returns the whole body.
fn answer_in_background(url: &str, head_seen: Arc<AtomicBool>) -> JoinHandle<Vec<u8>> {
    let mut client = RawClient::connect(url);
    client.set_read_timeout(Duration::from_secs(60));
    client.send(&raw::messages_request(false, &[]));
    std::thread::spawn(move || {
        let head = client.read_head().expect("the answer's head");
        assert_eq!(head.status, 200);
        head_seen.store(true, Ordering::SeqCst);
        match head.content_length() {
            Some(n) => client.read_exact_body(n),
            None => client.read_chunked_body(),
        }
        .expect("the answer's body")
    })
}

#[test]
fn answers_read_whole_take_their_part_of_max_body_memory_and_one_that_does_not_fit_passes_on() {
    for chunked in [false, true] {
        let gate = Arc::new(AtomicBool::new(false));
        let relay = half_then_gate(gate.clone(), chunked);
        let limits = json!({"max_body_bytes": 1_000_000, "max_body_memory": 1_000_000});
        let binary = Binary::serve(&[format!("http://{}", relay.addr())], limits);
        // Two answers of 600 KB. The first to arrive is read whole before the commit point
        // (its head waits for its last byte, so a break or a soft error in it could still
        // fail over). The second does not fit beside it in 1 MB, so it passes on as it
        // comes: its head and what was read reach the client while the gate is closed.
        let seen = [(); 2].map(|_| Arc::new(AtomicBool::new(false)));
        let clients = seen
            .clone()
            .map(|seen| answer_in_background(&binary.url, seen));
        let heads = || seen.iter().filter(|s| s.load(Ordering::SeqCst)).count();
        wait_until("one answer's head has arrived", || heads() >= 1);
        // Time for a second head to show if it was passed on too (the assertion cannot
        // fail for a proxy that is slow, only for one that does not read answers whole).
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            heads(),
            1,
            "chunked {chunked}: one answer read whole, one passed on"
        );
        gate.store(true, Ordering::SeqCst);
        for client in clients {
            let body = client.join().expect("client thread");
            assert!(
                body == big_answer().as_bytes(),
                "chunked {chunked}: a body changed"
            );
        }
        // Only the answer read whole was metered: a meter on the one passed on would keep
        // a copy of what did not fit.
        let usage = &binary.stats()["endpoints"][0]["usage"];
        assert_eq!(usage["output_tokens"], 7, "chunked {chunked}: {usage}");
        // Both answers gave their part back: a request of 900 KB fits again (with 600 KB
        // still held it would get 529).
        assert_eq!(
            status_of(&binary.url, &request_of(900_000, false, &[])),
            200
        );
        assert_eq!(relay.accepted(), 3);
    }
}
