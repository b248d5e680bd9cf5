//! A mock Anthropic API upstream with fault injection, for the integration tests and the
//! `demo` command.
//!
//! `MockUpstream` is the handle. The mock owns a loopback listener (`127.0.0.1:0`), one
//! thread per accepted connection (`server.rs`), and the fault that shapes the answers
//! (`fault.rs`, `plan.rs`). It speaks just enough HTTP/1.1 by hand (keep-alive,
//! Content-Length and chunked request bodies, `Expect: 100-continue`, chunked SSE replies)
//! because the faults live at the socket level: a reset, a hang, a body cut in half or a
//! stream cut between two events cannot be produced through an HTTP server crate. It never
//! prints; it logs at debug level only, so the demo stays quiet.
//!
//! # Routes
//! - `POST /v1/messages`: a message echoing `"mock reply: "` + the text of the last user
//!   message, as JSON, or as SSE when the body has `"stream": true`. A body that is not a
//!   JSON object is answered 400.
//! - `POST /v1/messages/count_tokens`: `{"input_tokens": <body length / 4>}`, or a 404 when
//!   [`MockUpstream::set_count_tokens_404`] is on (an upstream without the endpoint).
//! - `GET|HEAD /v1/models`: one model, for HTTP probes.
//! - `GET|HEAD /`: 200 with an empty body. Faults never apply here, so a health check of
//!   the listener itself always passes.
//! - anything else: 404 in the Anthropic error shape. The query string is ignored.
//!
//! # Per-request headers
//! - `x-mock-fault`: overrides the default fault for this request: `none`, a status from
//!   400 to 599 (`429` means [`Fault::RateLimited`] with `retry-after: 1`), `reset`, `hang`,
//!   `slow` (delay from `x-mock-delay-ms`, default 20 ms), `soft`, `sse-error`, `cut`
//!   (after 3 events), `cut:N` (after N events), `gated`, `pings` (the preamble, then only
//!   pings), `pings:N` (N events, then only pings). Other values are answered 400.
//! - `x-mock-events: N`: the number of `content_block_delta` events in a stream (default 5);
//!   a stream always has N + 5 events in all.
//! - `x-mock-event-bytes: N`: pads the streamed text with `.` so that each delta carries
//!   about N bytes (default: no padding, the deltas split the echo text).
//! - `x-mock-delay-ms: N`: the delay before each SSE event (default 0).
//! - `x-mock-usage: input=N,output=N,cache_creation=N,cache_read=N` (any subset): the
//!   usage a message reports, in its JSON body, or split over a stream as the API does
//!   (`message_start` with the input side and one output token, `message_delta` with the
//!   cumulative output). Without it: input from the body's size, output from the text's.
//!
//! # Headers on every answer
//! [`MockUpstream::set_headers`] adds fields to every later answer, a fault's included:
//! rate-limit headers (`anthropic-ratelimit-*`) that say what an account has left.
//!
//! # Counters
//! Each complete request adds one to [`MockUpstream::requests`] and to at most one of
//! `successes` (well-formed 2xx, also when slowed or gated), `failures` (an injected
//! fault) or `client_errors` (malformed requests, bad mock headers, invalid JSON, unknown
//! routes). The `count_tokens` 404 adds to none of the three. Counters move before the answer
//! is written, so a test that holds its response already sees them.

use crate::mock::body::header_safe;
use crate::mock::fault::Fault;
use crate::mock::request::Recorded;
use crate::mock::server::{accept_loop, wake_accept};
use crate::mock::shared::Shared;
use log::debug;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};

/// A running mock upstream; dropping it shuts it down.
pub struct MockUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl MockUpstream {
    /// A healthy upstream on a free loopback port.
    ///
    /// # Errors
    /// When the port cannot be bound or the accept thread cannot be spawned.
    pub fn start() -> io::Result<MockUpstream> {
        Self::start_with(Fault::None)
    }

    /// An upstream whose default fault is `fault`.
    ///
    /// # Errors
    /// As [`MockUpstream::start`].
    pub fn start_with(fault: Fault) -> io::Result<MockUpstream> {
        Self::start_named("mock", fault)
    }

    /// An upstream that answers with `x-mock-upstream: <name>`, so a test can tell which
    /// of several upstreams the proxy chose.
    ///
    /// # Errors
    /// As [`MockUpstream::start`].
    pub fn start_named(name: &str, fault: Fault) -> io::Result<MockUpstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(name, fault));
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("mock-accept".to_string())
            .spawn(move || accept_loop(&accept_shared, &listener))?;
        Ok(MockUpstream {
            shared,
            addr,
            accept: Some(accept),
        })
    }

    /// Sets the `x-mock-upstream` name (default "mock").
    #[must_use]
    pub fn name(self, name: &str) -> MockUpstream {
        *self.shared.name.lock() = header_safe(name);
        self
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the default fault for the requests that follow, and wakes hung and gated
    /// requests so they re-check it.
    pub fn set_fault(&self, fault: Fault) {
        {
            let mut control = self.shared.control.lock();
            control.fault = fault;
            control.generation += 1;
        }
        self.shared.wake.notify_all();
    }

    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// Lets gated streams send `n` more events in all (a counting semaphore shared by
    /// every gated stream of this upstream). Permits not used yet wait for later streams.
    pub fn release(&self, n: usize) {
        {
            let mut control = self.shared.control.lock();
            control.permits = control.permits.saturating_add(n);
        }
        self.shared.wake.notify_all();
    }

    /// Header fields every later answer carries, whatever its status (rate-limit headers,
    /// say); replaces the previous set. Names are kept to token characters, values lose
    /// control characters.
    pub fn set_headers(&self, headers: &[(&str, &str)]) {
        let token = |c: &char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(*c);
        let safe = headers
            .iter()
            .map(|(n, v)| (n.chars().filter(token).collect(), header_safe(v)))
            .filter(|(n, _): &(String, String)| !n.is_empty())
            .collect();
        *self.shared.headers.lock() = safe;
    }

    /// When on, `count_tokens` answers 404 `not_found_error`, counted neither as a success
    /// nor as a failure: a real upstream without the endpoint is not unhealthy.
    pub fn set_count_tokens_404(&self, on: bool) {
        self.shared.count_tokens_404.store(on, Ordering::SeqCst);
    }

    /// When on, each connection is closed after its answer, which says nothing of it (no
    /// `connection: close`): an upstream whose keep-alive timeout ends before its client
    /// comes back (Node's default is 5 s).
    pub fn set_close_after_answer(&self, on: bool) {
        self.shared.close_after_answer.store(on, Ordering::SeqCst);
    }

    /// Complete requests received (head and body read), on every route.
    pub fn requests(&self) -> u64 {
        self.shared.counters.requests.load(Ordering::SeqCst)
    }

    /// Requests answered with an injected fault.
    pub fn failures(&self) -> u64 {
        self.shared.counters.failures.load(Ordering::SeqCst)
    }

    /// Requests answered with a well-formed 2xx.
    pub fn successes(&self) -> u64 {
        self.shared.counters.successes.load(Ordering::SeqCst)
    }

    /// Requests answered 4xx through the client's own mistake: malformed HTTP (these are
    /// not in `requests`), bad `x-mock-*` headers, invalid JSON, unknown routes.
    pub fn client_errors(&self) -> u64 {
        self.shared.counters.client_errors.load(Ordering::SeqCst)
    }

    /// Connections accepted so far (refused ones excepted): lets a test see whether a
    /// client reused its connections.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.next_conn.load(Ordering::SeqCst)
    }

    /// Connections whose thread is still running.
    pub fn open_connections(&self) -> usize {
        self.shared.conns.lock().len()
    }

    /// The last requests, oldest first: at most 1000, and at most 64 MiB of bodies
    /// (the newest request is always kept).
    pub fn recorded(&self) -> Vec<Recorded> {
        self.shared
            .recorded
            .lock()
            .entries
            .iter()
            .cloned()
            .collect()
    }

    /// Same as dropping it.
    pub fn shutdown(self) {}
}

impl Drop for MockUpstream {
    /// Stops the accept loop, wakes every wait, shuts every open socket down (which ends
    /// the connection threads) and joins the accept thread.
    fn drop(&mut self) {
        self.shared.stop();
        let woken = wake_accept(self.addr);
        if let Some(accept) = self.accept.take() {
            // Without the wake-up connection, the accept thread ends on the next connection.
            if woken && accept.join().is_err() {
                debug!("mock upstream: accept thread panicked");
            }
        }
    }
}
