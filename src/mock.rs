//! A mock Anthropic API upstream with fault injection, for the integration tests and the
//! `demo` command.
//!
//! This module owns a loopback listener (`127.0.0.1:0`), one thread per accepted connection,
//! and the fault that shapes the answers. It speaks just enough HTTP/1.1 by hand (keep-alive,
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
//!
//! # Counters
//! Each complete request adds one to [`MockUpstream::requests`] and to at most one of
//! `successes` (well-formed 2xx, also when slowed or gated), `failures` (an injected
//! fault) or `client_errors` (malformed requests, bad mock headers, invalid JSON, unknown
//! routes). The `count_tokens` 404 adds to none of the three. Counters move before the answer
//! is written, so a test that holds its response already sees them.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::debug;
use parking_lot::{Condvar, Mutex};
use serde_json::Value;

/// Bounds what one request head may take, so a garbage client cannot grow memory.
const MAX_HEAD_BYTES: u64 = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Large enough for the 10 MB+ bodies the tests send, small enough to refuse nonsense.
const MAX_BODY_BYTES: usize = 128 * 1024 * 1024;
const MAX_RECORDED: usize = 1000;
/// The recording keeps at most this many body bytes (but always the newest request).
const MAX_RECORDED_BODY_BYTES: usize = 64 * 1024 * 1024;
/// New connections beyond this are closed at once: thread growth stays bounded.
const MAX_CONNECTIONS: usize = 4096;
const MAX_DELTA_EVENTS: usize = 100_000;
const MAX_STREAM_TEXT_BYTES: usize = 64 * 1024 * 1024;
const DEFAULT_DELTA_EVENTS: usize = 5;
const DEFAULT_SLOW_DELAY_MS: u64 = 20;
const DEFAULT_CUT_AFTER: usize = 3;
/// The gap between two pings of a stalled stream (`PingStall`).
const PING_GAP: Duration = Duration::from_millis(100);
const SLOW_BODY_PIECES: usize = 4;
/// How often a hung or gated request looks whether its client has gone away.
const WAIT_TICK: Duration = Duration::from_millis(200);
/// A client that stops reading cannot hold a connection thread for longer than this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const FAULT_MESSAGE: &str = "mock fault";
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const MODELS_JSON: &str = r#"{"data":[{"id":"claude-mock","type":"model"}],"has_more":false}"#;
const SOFT_ERROR_JSON: &str = r#"{"type":"error","error":{"type":"api_error","message":"soft"}}"#;
const SSE_ERROR_EVENT: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

/// How the upstream misbehaves; the default applies to every request without an
/// `x-mock-fault` header, on every route except `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Healthy.
    None,
    /// Answers this status with an Anthropic error body whose type fits the status.
    Status(u16),
    /// Answers 429, with `retry-after: <value>` when given.
    RateLimited { retry_after: Option<String> },
    /// Reads the request, then closes the connection without answering.
    Reset,
    /// Reads the request and never answers; ends (closing the connection) at shutdown, when
    /// the client goes away, or when `set_fault` sets a fault other than `Hang`.
    Hang,
    /// Sends the head at once, then a fixed body in 4 pieces or each SSE event, after
    /// `delay_ms` each. Counted as a success: the answer is well-formed, only slow.
    SlowBody { delay_ms: u64 },
    /// 200 `application/json` whose body is an error object.
    SoftError200,
    /// Streams: 200 SSE whose only event is an `overloaded_error`; otherwise `Status(529)`.
    SseErrorFirst,
    /// Streams: that many events (of all kinds), then the connection closes without the
    /// final chunk. Fixed bodies: the full Content-Length, half the body, then a close.
    SseCutAfter { events: usize },
    /// Streams: that many events (2: `message_start` and `content_block_start`), then a
    /// `ping` every 100 ms and nothing else, until the client goes away (a stalled relay).
    /// Fixed bodies: as `Hang`.
    PingStall { events: usize },
    /// Streams: the head and the opening at once (every event up to and including the
    /// first content event, the point where a proxy may commit), then one more event per
    /// permit given by [`MockUpstream::release`]. A fault change away from `Gated` opens the
    /// gate (the rest is sent at once); shutdown closes the connection. Fixed bodies are
    /// not gated.
    Gated,
}

/// One request as the upstream received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// The request target, query string included.
    pub path: String,
    /// In arrival order, names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Decoded (chunked request bodies are de-chunked).
    pub body: Vec<u8>,
}

impl Recorded {
    /// The first value of a header; `name` must be lower-case.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

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

    /// When on, `count_tokens` answers 404 `not_found_error`, counted neither as a success
    /// nor as a failure: a real upstream without the endpoint is not unhealthy.
    pub fn set_count_tokens_404(&self, on: bool) {
        self.shared.count_tokens_404.store(on, Ordering::SeqCst);
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

/// State shared by the handle, the accept thread and the connection threads. Each lock
/// guards one small thing and is never held across I/O or together with another.
struct Shared {
    control: Mutex<Control>,
    /// Notified on fault change, release and stop.
    wake: Condvar,
    stopped: AtomicBool,
    name: Mutex<String>,
    count_tokens_404: AtomicBool,
    counters: Counters,
    recorded: Mutex<RecordLog>,
    /// Clones of open sockets, shut down at stop to end blocked reads and writes.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

/// What waiting requests re-check when woken.
struct Control {
    fault: Fault,
    /// Bumped by every `set_fault`, so a waiter can tell a change from a wake-up.
    generation: u64,
    permits: usize,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failures: AtomicU64,
    successes: AtomicU64,
    client_errors: AtomicU64,
}

#[derive(Default)]
struct RecordLog {
    entries: VecDeque<Recorded>,
    body_bytes: usize,
}

impl RecordLog {
    fn push(&mut self, entry: Recorded) {
        self.body_bytes += entry.body.len();
        self.entries.push_back(entry);
        while self.entries.len() > MAX_RECORDED
            || (self.body_bytes > MAX_RECORDED_BODY_BYTES && self.entries.len() > 1)
        {
            if let Some(old) = self.entries.pop_front() {
                self.body_bytes -= old.body.len();
            }
        }
    }
}

/// Which counter an answer moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    ClientError,
    Uncounted,
}

/// Why a waiting request woke up.
enum Wake {
    Stopped,
    /// `set_fault` chose a fault other than the one the wait is for.
    Changed,
    Permit,
    Tick,
}

impl Shared {
    fn new(name: &str, fault: Fault) -> Shared {
        Shared {
            control: Mutex::new(Control {
                fault,
                generation: 0,
                permits: 0,
            }),
            wake: Condvar::new(),
            stopped: AtomicBool::new(false),
            name: Mutex::new(header_safe(name)),
            count_tokens_404: AtomicBool::new(false),
            counters: Counters::default(),
            recorded: Mutex::new(RecordLog::default()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        }
    }

    fn fault(&self) -> Fault {
        self.control.lock().fault.clone()
    }

    fn generation(&self) -> u64 {
        self.control.lock().generation
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Sets the flag under the control lock so no waiter can miss the notification.
    fn stop(&self) {
        {
            let _control = self.control.lock();
            self.stopped.store(true, Ordering::SeqCst);
        }
        self.wake.notify_all();
        let open: Vec<TcpStream> = self.conns.lock().drain().map(|(_, s)| s).collect();
        for stream in &open {
            shutdown_socket(stream);
        }
    }

    /// Keeps a clone of the socket for `stop`; `None` when stopping or full.
    fn register(&self, stream: &TcpStream) -> Option<u64> {
        let clone = stream.try_clone().ok()?;
        let mut conns = self.conns.lock();
        // Checked under the lock: `stop` sets the flag before it drains the map.
        if self.is_stopped() || conns.len() >= MAX_CONNECTIONS {
            return None;
        }
        let id = self.next_conn.fetch_add(1, Ordering::SeqCst);
        conns.insert(id, clone);
        Some(id)
    }

    fn record(&self, request: Request) {
        let entry = Recorded {
            method: request.method,
            path: request.path,
            headers: request.headers,
            body: request.body,
        };
        self.recorded.lock().push(entry);
    }

    fn count(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Success => &self.counters.successes,
            Outcome::Failure => &self.counters.failures,
            Outcome::ClientError => &self.counters.client_errors,
            Outcome::Uncounted => return,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    /// Sleeps for `delay` unless stopped first; false when stopped.
    fn pause(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        let mut control = self.control.lock();
        while !self.is_stopped() && Instant::now() < deadline {
            self.wake.wait_until(&mut control, deadline);
        }
        !self.is_stopped()
    }

    /// One wait of a hung request, at most `WAIT_TICK`.
    fn hang_tick(&self, seen: &mut u64) -> Wake {
        let is_hang = |fault: &Fault| *fault == Fault::Hang;
        let mut control = self.control.lock();
        if let Some(wake) = self.ended(&control, seen, is_hang) {
            return wake;
        }
        self.wake.wait_for(&mut control, WAIT_TICK);
        self.ended(&control, seen, is_hang).unwrap_or(Wake::Tick)
    }

    /// One wait of a gated stream for a permit, at most `WAIT_TICK`.
    fn gate_tick(&self, seen: &mut u64) -> Wake {
        let is_gated = |fault: &Fault| *fault == Fault::Gated;
        let mut control = self.control.lock();
        if control.permits == 0 && self.ended(&control, seen, is_gated).is_none() {
            self.wake.wait_for(&mut control, WAIT_TICK);
        }
        if let Some(wake) = self.ended(&control, seen, is_gated) {
            return wake;
        }
        if control.permits == 0 {
            return Wake::Tick;
        }
        control.permits -= 1;
        Wake::Permit
    }

    /// Whether a wait is over: stopped, or the fault changed to one that `keep` rejects.
    /// A change that `keep` accepts is remembered in `seen` and the wait goes on.
    fn ended(&self, control: &Control, seen: &mut u64, keep: fn(&Fault) -> bool) -> Option<Wake> {
        if self.is_stopped() {
            return Some(Wake::Stopped);
        }
        if control.generation == *seen {
            return None;
        }
        if keep(&control.fault) {
            *seen = control.generation;
            return None;
        }
        Some(Wake::Changed)
    }
}

/// Unregisters a connection however its thread ends.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.conns.lock().remove(&self.id);
    }
}

/// Accepts until stopped; an accept error is logged and retried, never fatal.
fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for incoming in listener.incoming() {
        if shared.is_stopped() {
            break;
        }
        match incoming {
            Ok(stream) => spawn_connection(shared, stream),
            Err(err) => {
                debug!("mock upstream: accept failed: {err}");
                // Out of file descriptors and the like: do not spin.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Connects once to the listener so a blocked `accept` returns and sees the stop flag.
fn wake_accept(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(_) => true,
        Err(err) => {
            debug!("mock upstream: cannot wake the accept thread: {err}");
            false
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream) {
    let Some(id) = shared.register(&stream) else {
        debug!("mock upstream: connection refused (stopping or too many)");
        return;
    };
    let guard = ConnGuard {
        shared: Arc::clone(shared),
        id,
    };
    let spawned = thread::Builder::new()
        .name("mock-conn".to_string())
        .spawn(move || serve_connection(&guard.shared, stream));
    if let Err(err) = spawned {
        debug!("mock upstream: cannot spawn a connection thread: {err}");
    }
}

/// The two halves of one client connection. Answers go straight to the socket, unbuffered,
/// so every SSE chunk leaves at once.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// What the connection does after an answer.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// Serves requests until the client closes, asks to close, or a fault ends the connection.
fn serve_connection(shared: &Shared, stream: TcpStream) {
    let mut conn = match open_conn(stream) {
        Ok(conn) => conn,
        Err(err) => {
            debug!("mock upstream: cannot set the connection up: {err}");
            return;
        }
    };
    loop {
        match serve_one(shared, &mut conn) {
            Ok(Next::KeepAlive) => {}
            Ok(Next::Close) => break,
            Err(err) => {
                debug!("mock upstream: connection ended: {err}");
                break;
            }
        }
    }
    shutdown_socket(&conn.writer);
}

/// No Nagle delay: SSE events and slow pieces must leave as they are written.
fn open_conn(stream: TcpStream) -> io::Result<Conn> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    Ok(Conn {
        reader,
        writer: stream,
    })
}

fn serve_one(shared: &Shared, conn: &mut Conn) -> io::Result<Next> {
    let request = match read_request(conn) {
        Ok(Some(request)) => request,
        Ok(None) => return Ok(Next::Close),
        Err(ReadError::Io(err)) => return Err(err),
        Err(ReadError::Bad(status, message)) => {
            shared.count(Outcome::ClientError);
            let exchange = Exchange {
                name: shared.name.lock().clone(),
                close: true,
                head_only: false,
                seen: 0,
            };
            return write_reply(conn, &error_reply(status, message), &exchange);
        }
    };
    let exchange = Exchange {
        name: shared.name.lock().clone(),
        close: request.wants_close(),
        head_only: request.method == "HEAD",
        // Taken before the fault is: a change between the two is seen as a change.
        seen: shared.generation(),
    };
    let (outcome, action) = plan(shared, &request);
    shared.record(request);
    shared.counters.requests.fetch_add(1, Ordering::SeqCst);
    shared.count(outcome);
    execute(shared, conn, action, &exchange)
}

// ---------------------------------------------------------------------------------------
// Reading requests

struct Request {
    method: String,
    path: String,
    http10: bool,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// HTTP/1.0 always closes (no keep-alive negotiation here); 1.1 on `connection: close`.
    fn wants_close(&self) -> bool {
        let connection = self.header("connection").unwrap_or("");
        self.http10
            || connection
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
    }

    fn expects_continue(&self) -> bool {
        !self.http10
            && self
                .header("expect")
                .is_some_and(|value| value.eq_ignore_ascii_case("100-continue"))
    }
}

enum ReadError {
    /// The connection broke or closed mid-request: end it quietly.
    Io(io::Error),
    /// The request is malformed: answer this status, then close.
    Bad(u16, &'static str),
}

impl From<io::Error> for ReadError {
    fn from(err: io::Error) -> ReadError {
        ReadError::Io(err)
    }
}

fn eof() -> ReadError {
    ReadError::Io(io::ErrorKind::UnexpectedEof.into())
}

/// One whole request; `None` when the client closed cleanly between requests.
fn read_request(conn: &mut Conn) -> Result<Option<Request>, ReadError> {
    let Some(mut request) = read_head(&mut conn.reader)? else {
        return Ok(None);
    };
    let framing = body_framing(&request)?;
    if framing != Framing::Empty && request.expects_continue() {
        conn.writer.write_all(CONTINUE)?;
    }
    request.body = match framing {
        Framing::Empty => Vec::new(),
        Framing::Length(len) => read_exact_body(&mut conn.reader, len)?,
        Framing::Chunked => read_chunked_body(&mut conn.reader)?,
    };
    Ok(Some(request))
}

fn read_head(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>, ReadError> {
    let mut budget = MAX_HEAD_BYTES;
    // Stray empty lines before a request line are allowed (RFC 9112, 2.2).
    let line = loop {
        match read_line(reader, &mut budget)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => {}
            Some(line) => break line,
        }
    };
    let (method, path, http10) = parse_request_line(&line)?;
    let headers = read_headers(reader, &mut budget)?;
    Ok(Some(Request {
        method,
        path,
        http10,
        headers,
        body: Vec::new(),
    }))
}

fn parse_request_line(line: &str) -> Result<(String, String, bool), ReadError> {
    let bad = ReadError::Bad(400, "malformed request line");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphabetic());
    if !method_ok || !target.starts_with('/') {
        return Err(bad);
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(bad),
    };
    Ok((method.to_string(), target.to_string(), http10))
}

fn read_headers(
    reader: &mut BufReader<TcpStream>,
    budget: &mut u64,
) -> Result<Vec<(String, String)>, ReadError> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, budget)?.ok_or_else(eof)?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() == MAX_HEADERS {
            return Err(ReadError::Bad(431, "too many headers"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Bad(400, "malformed header"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(ReadError::Bad(400, "malformed header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
}

/// One line without its CRLF, within `budget` bytes; `None` at end of input.
fn read_line(
    reader: &mut BufReader<TcpStream>,
    budget: &mut u64,
) -> Result<Option<String>, ReadError> {
    let mut line = Vec::new();
    let read = reader.by_ref().take(*budget).read_until(b'\n', &mut line)?;
    *budget -= read as u64;
    if line.last() != Some(&b'\n') {
        if *budget == 0 {
            return Err(ReadError::Bad(431, "request head too large"));
        }
        return if read == 0 { Ok(None) } else { Err(eof()) };
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
}

/// Transfer-Encoding wins over Content-Length (RFC 9112, 6.3).
fn body_framing(request: &Request) -> Result<Framing, ReadError> {
    if let Some(encoding) = request.header("transfer-encoding") {
        let last = encoding.rsplit(',').next().unwrap_or("").trim();
        if !last.eq_ignore_ascii_case("chunked") {
            return Err(ReadError::Bad(400, "unsupported transfer-encoding"));
        }
        return Ok(Framing::Chunked);
    }
    let mut length = None;
    for (name, value) in &request.headers {
        if name != "content-length" {
            continue;
        }
        let parsed: usize = value
            .parse()
            .map_err(|_| ReadError::Bad(400, "malformed content-length"))?;
        if length.is_some_and(|seen| seen != parsed) {
            return Err(ReadError::Bad(400, "conflicting content-length"));
        }
        length = Some(parsed);
    }
    match length {
        None | Some(0) => Ok(Framing::Empty),
        Some(len) if len > MAX_BODY_BYTES => Err(ReadError::Bad(413, "body too large")),
        Some(len) => Ok(Framing::Length(len)),
    }
}

fn read_exact_body(reader: &mut BufReader<TcpStream>, len: usize) -> Result<Vec<u8>, ReadError> {
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(body)
}

fn read_chunked_body(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let size = read_chunk_size(reader)?;
        if size == 0 {
            skip_trailers(reader)?;
            return Ok(body);
        }
        let end = body
            .len()
            .checked_add(size)
            .filter(|end| *end <= MAX_BODY_BYTES)
            .ok_or(ReadError::Bad(413, "body too large"))?;
        let start = body.len();
        body.resize(end, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf)?;
        if crlf != *b"\r\n" {
            return Err(ReadError::Bad(400, "malformed chunk"));
        }
    }
}

fn read_chunk_size(reader: &mut BufReader<TcpStream>) -> Result<usize, ReadError> {
    let mut budget = 1024;
    let line = read_line(reader, &mut budget)?.ok_or_else(eof)?;
    let digits = line.split(';').next().unwrap_or("").trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ReadError::Bad(400, "malformed chunk size"));
    }
    usize::from_str_radix(digits, 16).map_err(|_| ReadError::Bad(413, "body too large"))
}

fn skip_trailers(reader: &mut BufReader<TcpStream>) -> Result<(), ReadError> {
    let mut budget = MAX_HEAD_BYTES;
    loop {
        let line = read_line(reader, &mut budget)?.ok_or_else(eof)?;
        if line.is_empty() {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Deciding the answer: pure, no sockets

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Root,
    Messages,
    CountTokens,
    Models,
    NotFound,
}

impl Route {
    fn of(method: &str, target: &str) -> Route {
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        match (method, path) {
            ("GET" | "HEAD", "/") => Route::Root,
            ("POST", "/v1/messages") => Route::Messages,
            ("POST", "/v1/messages/count_tokens") => Route::CountTokens,
            ("GET" | "HEAD", "/v1/models") => Route::Models,
            _ => Route::NotFound,
        }
    }
}

/// The per-request knobs, from the `x-mock-*` headers and the default fault.
struct Options {
    fault: Fault,
    deltas: usize,
    event_bytes: usize,
    delay: Duration,
}

impl Options {
    fn read(request: &Request, default: Fault) -> Result<Options, String> {
        let delay_ms = number_header(request, "x-mock-delay-ms")?;
        let fault = match request.header("x-mock-fault") {
            Some(value) => parse_fault(value, delay_ms)
                .ok_or_else(|| format!("unknown x-mock-fault value {value:?}"))?,
            None => default,
        };
        let deltas = number_header(request, "x-mock-events")?.unwrap_or(DEFAULT_DELTA_EVENTS);
        let event_bytes = number_header(request, "x-mock-event-bytes")?.unwrap_or(0);
        let text_bytes = deltas.saturating_mul(event_bytes.max(1));
        if deltas > MAX_DELTA_EVENTS || text_bytes > MAX_STREAM_TEXT_BYTES {
            return Err("x-mock-events / x-mock-event-bytes too large".to_string());
        }
        Ok(Options {
            fault,
            deltas,
            event_bytes,
            delay: Duration::from_millis(delay_ms.unwrap_or(0) as u64),
        })
    }
}

fn number_header(request: &Request, name: &str) -> Result<Option<usize>, String> {
    let Some(value) = request.header(name) else {
        return Ok(None);
    };
    value
        .parse()
        .map(Some)
        .map_err(|_| format!("{name} must be a number"))
}

impl Fault {
    /// A fault by its `x-mock-fault` name (`none`, `500`, `429`, `reset`, `hang`, …), as
    /// `failover-proxy mock --fault` takes it.
    pub fn parse(value: &str) -> Option<Fault> {
        parse_fault(value, None)
    }
}

/// The `x-mock-fault` vocabulary; `None` for an unknown value.
fn parse_fault(value: &str, delay_ms: Option<usize>) -> Option<Fault> {
    let value = value.trim().to_ascii_lowercase();
    let fault = match value.as_str() {
        "none" => Fault::None,
        "429" => Fault::RateLimited {
            retry_after: Some("1".to_string()),
        },
        "reset" => Fault::Reset,
        "hang" => Fault::Hang,
        "slow" => Fault::SlowBody {
            delay_ms: delay_ms.map_or(DEFAULT_SLOW_DELAY_MS, |ms| ms as u64),
        },
        "soft" => Fault::SoftError200,
        "sse-error" => Fault::SseErrorFirst,
        "cut" => Fault::SseCutAfter {
            events: DEFAULT_CUT_AFTER,
        },
        "gated" => Fault::Gated,
        "pings" => Fault::PingStall { events: 2 },
        other => {
            return parse_cut(other)
                .or_else(|| parse_pings(other))
                .or_else(|| parse_status(other));
        }
    };
    Some(fault)
}

fn parse_cut(value: &str) -> Option<Fault> {
    let events = value.strip_prefix("cut:")?.parse().ok()?;
    Some(Fault::SseCutAfter { events })
}

fn parse_pings(value: &str) -> Option<Fault> {
    let events = value.strip_prefix("pings:")?.parse().ok()?;
    Some(Fault::PingStall { events })
}

fn parse_status(value: &str) -> Option<Fault> {
    let status: u16 = value.parse().ok()?;
    (400..=599)
        .contains(&status)
        .then_some(Fault::Status(status))
}

/// The parts of a `/v1/messages` body the answer depends on.
struct Message {
    model: String,
    user_text: String,
    stream: bool,
}

impl Message {
    /// `None` when the body is not a JSON object.
    fn parse(body: &[u8]) -> Option<Message> {
        let value: Value = serde_json::from_slice(body).ok()?;
        let object = value.as_object()?;
        let model = object.get("model").and_then(Value::as_str);
        Some(Message {
            model: model.unwrap_or("claude-mock").to_string(),
            user_text: last_user_text(object.get("messages")),
            stream: object.get("stream").and_then(Value::as_bool) == Some(true),
        })
    }

    /// The recovery probe checks that its random code comes back in this text.
    fn echo(&self) -> String {
        format!("mock reply: {}", self.user_text)
    }
}

fn last_user_text(messages: Option<&Value>) -> String {
    let Some(list) = messages.and_then(Value::as_array) else {
        return String::new();
    };
    let is_user = |m: &&Value| m.get("role").and_then(Value::as_str) == Some("user");
    list.iter()
        .rev()
        .find(is_user)
        .map(content_text)
        .unwrap_or_default()
}

/// A string content, or the concatenated `text` of the content's text blocks.
fn content_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|block| block.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|block| block.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// A complete answer with a fixed body.
struct Reply {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

/// A chunked SSE answer, one event per chunk.
struct Stream {
    events: Vec<String>,
    delay: Duration,
    gated: bool,
    cut_after: Option<usize>,
    pings_after: Option<usize>,
}

impl Stream {
    fn new(events: Vec<String>, delay: Duration) -> Stream {
        Stream {
            events,
            delay,
            gated: false,
            cut_after: None,
            pings_after: None,
        }
    }
}

/// What to do on the socket.
enum Action {
    Reply(Reply),
    SlowReply(Reply, Duration),
    /// The full Content-Length, half the body, then a close.
    HalfReply(Reply),
    Stream(Stream),
    Reset,
    Hang,
}

/// Decides the answer and the counter it moves, from the request and the fault in force.
fn plan(shared: &Shared, request: &Request) -> (Outcome, Action) {
    let route = Route::of(&request.method, &request.path);
    if route == Route::Root {
        return (Outcome::Success, Action::Reply(text_reply(200, "")));
    }
    let options = match Options::read(request, shared.fault()) {
        Ok(options) => options,
        Err(message) => return (Outcome::ClientError, bad_request(&message)),
    };
    let message = match route {
        Route::Messages => Message::parse(&request.body),
        _ => None,
    };
    let streaming = message.as_ref().is_some_and(|m| m.stream);
    let healthy = match route {
        Route::Messages => messages_answer(message.as_ref(), request.body.len(), &options),
        _ => other_answer(shared, route, request.body.len()),
    };
    apply_fault(&options.fault, streaming, healthy)
}

fn bad_request(message: &str) -> Action {
    Action::Reply(error_reply(400, message))
}

fn messages_answer(
    message: Option<&Message>,
    body_len: usize,
    options: &Options,
) -> (Outcome, Action) {
    let Some(message) = message else {
        return (
            Outcome::ClientError,
            bad_request("body is not a JSON object"),
        );
    };
    let input_tokens = body_len / 4;
    let action = if message.stream {
        Action::Stream(Stream::new(
            message_events(message, input_tokens, options),
            options.delay,
        ))
    } else {
        Action::Reply(json_reply(200, message_json(message, input_tokens)))
    };
    (Outcome::Success, action)
}

fn other_answer(shared: &Shared, route: Route, body_len: usize) -> (Outcome, Action) {
    match route {
        Route::CountTokens if shared.count_tokens_404.load(Ordering::SeqCst) => {
            let reply = error_reply(404, "count_tokens is not available");
            (Outcome::Uncounted, Action::Reply(reply))
        }
        Route::CountTokens => {
            let body = format!("{{\"input_tokens\":{}}}", body_len / 4);
            (Outcome::Success, Action::Reply(json_reply(200, body)))
        }
        Route::Models => (
            Outcome::Success,
            Action::Reply(json_reply(200, MODELS_JSON.to_string())),
        ),
        Route::Root => (Outcome::Success, Action::Reply(text_reply(200, ""))),
        Route::Messages | Route::NotFound => (
            Outcome::ClientError,
            Action::Reply(error_reply(404, "no such route")),
        ),
    }
}

/// Replaces or reshapes the healthy answer according to the fault.
fn apply_fault(fault: &Fault, streaming: bool, healthy: (Outcome, Action)) -> (Outcome, Action) {
    let failure = |action| (Outcome::Failure, action);
    let (outcome, action) = healthy;
    match fault {
        Fault::None => (outcome, action),
        Fault::Status(status) => failure(Action::Reply(error_reply(*status, FAULT_MESSAGE))),
        Fault::RateLimited { retry_after } => {
            failure(Action::Reply(rate_limited_reply(retry_after.as_deref())))
        }
        Fault::Reset => failure(Action::Reset),
        Fault::Hang => failure(Action::Hang),
        Fault::SoftError200 => failure(Action::Reply(json_reply(200, SOFT_ERROR_JSON.to_string()))),
        Fault::SseErrorFirst if streaming => {
            let events = vec![SSE_ERROR_EVENT.to_string()];
            failure(Action::Stream(Stream::new(events, Duration::ZERO)))
        }
        Fault::SseErrorFirst => failure(Action::Reply(error_reply(529, FAULT_MESSAGE))),
        Fault::SlowBody { delay_ms } => (outcome, slow(action, Duration::from_millis(*delay_ms))),
        Fault::Gated => (outcome, gate(action)),
        Fault::SseCutAfter { events } => failure(cut(action, *events)),
        Fault::PingStall { events } if streaming => failure(ping_stall(action, *events)),
        Fault::PingStall { .. } => failure(Action::Hang),
    }
}

fn ping_stall(action: Action, events: usize) -> Action {
    match action {
        Action::Stream(stream) => Action::Stream(Stream {
            pings_after: Some(events),
            ..stream
        }),
        other => other,
    }
}

fn slow(action: Action, delay: Duration) -> Action {
    match action {
        Action::Reply(reply) => Action::SlowReply(reply, delay),
        Action::Stream(stream) => Action::Stream(Stream { delay, ..stream }),
        other => other,
    }
}

fn gate(action: Action) -> Action {
    match action {
        Action::Stream(stream) => Action::Stream(Stream {
            gated: true,
            ..stream
        }),
        other => other,
    }
}

fn cut(action: Action, events: usize) -> Action {
    match action {
        Action::Reply(reply) => Action::HalfReply(reply),
        Action::Stream(stream) => Action::Stream(Stream {
            cut_after: Some(events),
            ..stream
        }),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// Bodies: written by hand, keys in the order the real API uses, byte-for-byte deterministic

fn json_string(text: &str) -> String {
    Value::from(text).to_string()
}

/// A rough token count; only its determinism matters.
fn token_estimate(text: &str) -> usize {
    (text.len() / 4).max(1)
}

fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

fn error_json(status: u16, message: &str) -> String {
    format!(
        r#"{{"type":"error","error":{{"type":"{}","message":{}}}}}"#,
        error_type(status),
        json_string(message)
    )
}

fn message_json(message: &Message, input_tokens: usize) -> String {
    let text = message.echo();
    format!(
        concat!(
            r#"{{"id":"msg_mock","type":"message","role":"assistant","model":{model},"#,
            r#""content":[{{"type":"text","text":{text}}}],"stop_reason":"end_turn","#,
            r#""stop_sequence":null,"usage":{{"input_tokens":{input},"output_tokens":{output}}}}}"#
        ),
        model = json_string(&message.model),
        text = json_string(&text),
        input = input_tokens,
        output = token_estimate(&text),
    )
}

fn sse_event(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// `message_start`, `content_block_start`, the deltas, `content_block_stop`,
/// `message_delta`, `message_stop`: the real event sequence, with no ping.
fn message_events(message: &Message, input_tokens: usize, options: &Options) -> Vec<String> {
    let text = padded_text(&message.echo(), options.deltas, options.event_bytes);
    let start = format!(
        concat!(
            r#"{{"type":"message_start","message":{{"id":"msg_mock","type":"message","#,
            r#""role":"assistant","model":{model},"content":[],"stop_reason":null,"#,
            r#""stop_sequence":null,"usage":{{"input_tokens":{input},"output_tokens":1}}}}}}"#
        ),
        model = json_string(&message.model),
        input = input_tokens,
    );
    let mut events = Vec::with_capacity(options.deltas + 5);
    events.push(sse_event("message_start", &start));
    events.push(sse_event(
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    ));
    for piece in split_even(&text, options.deltas) {
        let data = format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
            json_string(&piece)
        );
        events.push(sse_event("content_block_delta", &data));
    }
    events.push(sse_event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    ));
    let delta = format!(
        r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{}}}}}"#,
        token_estimate(&text)
    );
    events.push(sse_event("message_delta", &delta));
    events.push(sse_event("message_stop", r#"{"type":"message_stop"}"#));
    events
}

/// The echo followed by `.`s, up to `deltas * event_bytes` characters and at least one
/// per delta. The echo stays a contiguous prefix so a probe code in it is still found.
fn padded_text(echo: &str, deltas: usize, event_bytes: usize) -> String {
    let wanted = deltas.saturating_mul(event_bytes).max(deltas);
    let missing = wanted.saturating_sub(echo.chars().count());
    let mut text = echo.to_string();
    text.extend(std::iter::repeat_n('.', missing));
    text
}

/// Splits into `pieces` parts of nearly equal length in characters.
fn split_even(text: &str, pieces: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    (0..pieces)
        .map(|i| {
            let start = i * chars.len() / pieces;
            let end = (i + 1) * chars.len() / pieces;
            chars[start..end].iter().collect()
        })
        .collect()
}

fn json_reply(status: u16, body: String) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        headers: Vec::new(),
        body: body.into_bytes(),
    }
}

fn text_reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        content_type: "text/plain; charset=utf-8",
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

fn error_reply(status: u16, message: &str) -> Reply {
    json_reply(status, error_json(status, message))
}

fn rate_limited_reply(retry_after: Option<&str>) -> Reply {
    let mut reply = error_reply(429, FAULT_MESSAGE);
    if let Some(value) = retry_after {
        reply.headers.push(("retry-after", header_safe(value)));
    }
    reply
}

// ---------------------------------------------------------------------------------------
// Writing answers

/// What every answer on this request shares.
struct Exchange {
    name: String,
    close: bool,
    head_only: bool,
    /// The fault generation this request was planned under: a wait (hang, gate) ends on
    /// a change after it, even one made before the wait began.
    seen: u64,
}

impl Exchange {
    fn next(&self) -> Next {
        if self.close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }
}

fn execute(
    shared: &Shared,
    conn: &mut Conn,
    action: Action,
    exchange: &Exchange,
) -> io::Result<Next> {
    match action {
        Action::Reply(reply) => write_reply(conn, &reply, exchange),
        Action::SlowReply(reply, delay) => write_slow_reply(shared, conn, &reply, delay, exchange),
        Action::HalfReply(reply) => write_half_reply(conn, &reply, exchange),
        Action::Stream(stream) => write_stream(shared, conn, &stream, exchange),
        Action::Reset => Ok(Next::Close),
        Action::Hang => {
            hang(shared, &conn.writer, exchange.seen);
            Ok(Next::Close)
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Mock",
    }
}

/// The status line and the given fields, plus the fields every answer carries.
fn head(status: u16, fields: &[(&str, &str)], exchange: &Exchange) -> Vec<u8> {
    let mut text = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    let connection = [("connection", "close")];
    let close_field: &[(&str, &str)] = if exchange.close { &connection } else { &[] };
    let name_field = [("x-mock-upstream", exchange.name.as_str())];
    for (name, value) in fields.iter().chain(&name_field).chain(close_field) {
        for part in [*name, ": ", *value, "\r\n"] {
            text.push_str(part);
        }
    }
    text.push_str("\r\n");
    text.into_bytes()
}

fn reply_head(reply: &Reply, exchange: &Exchange) -> Vec<u8> {
    let length = reply.body.len().to_string();
    let mut fields = vec![
        ("content-type", reply.content_type),
        ("content-length", length.as_str()),
    ];
    fields.extend(
        reply
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str())),
    );
    head(reply.status, &fields, exchange)
}

/// Head and body in one write.
fn write_reply(conn: &mut Conn, reply: &Reply, exchange: &Exchange) -> io::Result<Next> {
    let mut bytes = reply_head(reply, exchange);
    if !exchange.head_only {
        bytes.extend_from_slice(&reply.body);
    }
    conn.writer.write_all(&bytes)?;
    Ok(exchange.next())
}

/// The head at once, then the body in `SLOW_BODY_PIECES` pieces, each after `delay`.
fn write_slow_reply(
    shared: &Shared,
    conn: &mut Conn,
    reply: &Reply,
    delay: Duration,
    exchange: &Exchange,
) -> io::Result<Next> {
    if exchange.head_only {
        return write_reply(conn, reply, exchange);
    }
    conn.writer.write_all(&reply_head(reply, exchange))?;
    let piece_len = reply.body.len().div_ceil(SLOW_BODY_PIECES).max(1);
    for piece in reply.body.chunks(piece_len) {
        if !shared.pause(delay) {
            return Ok(Next::Close);
        }
        conn.writer.write_all(piece)?;
    }
    Ok(exchange.next())
}

fn write_half_reply(conn: &mut Conn, reply: &Reply, exchange: &Exchange) -> io::Result<Next> {
    let mut bytes = reply_head(reply, exchange);
    bytes.extend_from_slice(&reply.body[..reply.body.len() / 2]);
    conn.writer.write_all(&bytes)?;
    Ok(Next::Close)
}

fn write_stream(
    shared: &Shared,
    conn: &mut Conn,
    stream: &Stream,
    exchange: &Exchange,
) -> io::Result<Next> {
    let fields = [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("transfer-encoding", "chunked"),
    ];
    conn.writer.write_all(&head(200, &fields, exchange))?;
    let mut gated = stream.gated;
    let mut seen = exchange.seen;
    let opening = stream
        .events
        .iter()
        .position(|e| is_content_event(e))
        .unwrap_or(0);
    for (index, event) in stream.events.iter().enumerate() {
        if stream.cut_after == Some(index) {
            return Ok(Next::Close);
        }
        if stream.pings_after == Some(index) {
            ping_forever(shared, conn)?;
            return Ok(Next::Close);
        }
        if gated && index > opening {
            match wait_gate(shared, &conn.writer, &mut seen) {
                Wake::Permit => {}
                Wake::Changed => gated = false,
                Wake::Stopped | Wake::Tick => return Ok(Next::Close),
            }
        }
        if !stream.delay.is_zero() && !shared.pause(stream.delay) {
            return Ok(Next::Close);
        }
        write_chunk(&mut conn.writer, event.as_bytes())?;
    }
    if stream.cut_after.is_some() {
        return Ok(Next::Close);
    }
    conn.writer.write_all(b"0\r\n\r\n")?;
    Ok(exchange.next())
}

/// An event that is the answer itself (a text delta, or the end of an empty answer), not
/// its preamble.
fn is_content_event(event: &str) -> bool {
    ["content_block_delta", "message_delta", "message_stop"]
        .iter()
        .any(|name| event.starts_with(&format!("event: {name}\n")))
}

/// A `ping` every `PING_GAP` until the client goes away or the mock stops.
fn ping_forever(shared: &Shared, conn: &mut Conn) -> io::Result<()> {
    let ping = sse_event("ping", r#"{"type": "ping"}"#);
    while shared.pause(PING_GAP) && !client_gone(&conn.writer) {
        write_chunk(&mut conn.writer, ping.as_bytes())?;
    }
    Ok(())
}

/// One chunk in one write, so each SSE event leaves as a unit.
fn write_chunk(writer: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    writer.write_all(&chunk)
}

/// Waits for a permit; `Tick` here means the client went away.
fn wait_gate(shared: &Shared, stream: &TcpStream, seen: &mut u64) -> Wake {
    loop {
        match shared.gate_tick(seen) {
            Wake::Tick if client_gone(stream) => return Wake::Tick,
            Wake::Tick => {}
            wake => return wake,
        }
    }
}

/// Holds the request until shutdown, a fault change away from `Hang`, or the client
/// going away; the caller then closes without answering.
fn hang(shared: &Shared, stream: &TcpStream, mut seen: u64) {
    loop {
        match shared.hang_tick(&mut seen) {
            Wake::Tick if client_gone(stream) => return,
            Wake::Tick | Wake::Permit => {}
            Wake::Stopped | Wake::Changed => return,
        }
    }
}

/// Whether the peer closed, seen with a non-blocking peek (any pending bytes mean alive).
fn client_gone(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0; 1];
    let gone = match stream.peek(&mut byte) {
        Ok(read) => read == 0,
        Err(err) => err.kind() != io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).is_err() || gone
}

fn shutdown_socket(stream: &TcpStream) {
    if let Err(err) = stream.shutdown(Shutdown::Both) {
        debug!("mock upstream: socket shutdown: {err}");
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Drops control characters so a caller's text cannot break the response head.
fn header_safe(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_keeps_every_character_in_order() {
        let pieces = split_even("mock reply: hello", 5);
        assert_eq!(pieces.len(), 5);
        assert_eq!(pieces.concat(), "mock reply: hello");
        assert!(pieces.iter().all(|piece| !piece.is_empty()));
    }

    #[test]
    fn padded_text_keeps_the_echo_as_a_prefix() {
        let text = padded_text("mock reply: 42", 4, 10);
        assert_eq!(text.len(), 40);
        assert!(text.starts_with("mock reply: 42."));
        assert_eq!(padded_text("ab", 5, 0), "ab...");
    }

    #[test]
    fn parse_fault_knows_the_header_vocabulary() {
        assert_eq!(parse_fault("500", None), Some(Fault::Status(500)));
        assert_eq!(
            parse_fault("cut:7", None),
            Some(Fault::SseCutAfter { events: 7 })
        );
        assert_eq!(
            parse_fault("slow", Some(5)),
            Some(Fault::SlowBody { delay_ms: 5 })
        );
        assert_eq!(parse_fault("Hang", None), Some(Fault::Hang));
        assert_eq!(parse_fault("200", None), None);
        assert_eq!(parse_fault("explode", None), None);
    }

    #[test]
    fn route_ignores_the_query_string() {
        assert_eq!(Route::of("POST", "/v1/messages?beta=true"), Route::Messages);
        assert_eq!(Route::of("HEAD", "/"), Route::Root);
        assert_eq!(Route::of("GET", "/v1/messages"), Route::NotFound);
    }

    #[test]
    fn last_user_text_reads_strings_and_blocks() {
        let body = br#"{"messages":[{"role":"user","content":"first"},{"role":"assistant","content":"x"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"image"},{"type":"text","text":"b"}]}]}"#;
        let message = Message::parse(body).map(|m| m.user_text);
        assert_eq!(message.as_deref(), Some("ab"));
    }
}
