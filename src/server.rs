//! The HTTP side facing clients: tiny_http, one thread per open connection. The only
//! module that knows tiny_http.
//!
//! The vendored tiny_http accepts connections (at most `max_connections`, idle ones making
//! room for new ones), reads each request head on its connection's thread under the
//! `Limits`, and calls `serve_guarded` on that same thread: the request is served start to
//! finish there (check the head, read the body, admin or forward, stream the answer), then
//! the thread reads the connection's next request. No request waits behind another
//! connection's, and nothing crosses threads on the way. `workers` threads are kept ready.

use crate::admin;
use crate::config::validated::Config;
use crate::forward::failover::{self, send_error};
use crate::http_out::{ClientOut, Framing, error_body};
use crate::state::recovery::RecoveryThread;
use crate::state::shared::State;
use crate::upstream::call::ClientRequest;
use crate::upstream::idle;
use log::{error, info, warn};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use ureq::http::uri::PathAndQuery;
use ureq::http::{HeaderName, HeaderValue, Method};

/// How long a shutdown waits for in-flight requests before it exits anyway.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Connections let in beyond `max_connections` while every other one is busy: each gets
/// its status request served (`/__qcc__/health` answers however busy the proxy is) or 529.
const OVERFLOW_CONNECTIONS: usize = 32;

pub struct Server {
    http: tiny_http::Server,
    serving: Arc<Serving>,
    recovery: RecoveryThread,
    addr: SocketAddr,
}

/// What every connection thread shares.
struct Serving {
    state: Arc<State>,
    /// The address the listener got (the admin API's same-origin check).
    listen: SocketAddr,
    stopping: AtomicBool,
    /// Requests being served now (the drain waits for 0).
    in_flight: AtomicUsize,
    ids: AtomicU64,
}

impl Server {
    /// Binds the listen address of the current config and starts serving.
    pub fn start(state: Arc<State>) -> Result<Server, String> {
        let generation = state.current();
        let config = &generation.config;
        let listen = config.listen;
        raise_descriptor_limit();
        let listener = bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let serving = Arc::new(Serving {
            state: state.clone(),
            listen: addr,
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            ids: AtomicU64::new(1),
        });
        let shared = serving.clone();
        let handler = Arc::new(move |request| serve_guarded(&shared, request));
        let http = tiny_http::Server::from_listener_with_handler(listener, limits(config), handler)
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let recovery = RecoveryThread::start(state)?;
        info!(
            "listening on http://{addr} (at most {} connections, {} threads kept ready)",
            config.max_connections, config.workers
        );
        Ok(Server {
            http,
            serving,
            recovery,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving: the listener closes at once, idle connections close, each request
    /// in progress finishes (its answer says `connection: close`); the recovery thread
    /// stops after its current round. Waits at most `grace` for all of that; returns false
    /// if something was still running then (left to the process exit).
    pub fn shutdown(self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        self.serving.stopping.store(true, Ordering::SeqCst);
        self.http.stop_accepting();
        let drained = self.wait_for_requests(deadline);
        if !drained {
            let busy = self.serving.in_flight.load(Ordering::SeqCst);
            warn!("{busy} request(s) still in flight after the grace period; not waiting");
        }
        self.recovery.stop(deadline) && drained
    }

    /// Closes idle connections (again and again: a connection whose request just ended
    /// becomes idle) until no request is in progress or `deadline` passes.
    fn wait_for_requests(&self, deadline: Instant) -> bool {
        loop {
            self.http.close_idle_connections();
            if self.serving.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// With TCP_NODELAY set on the listening socket, so every accepted connection has it: a
/// streamed event is one small write, and Nagle's algorithm would hold it back until the
/// previous one was acknowledged (up to 40 ms with delayed ACKs). The backlog is the
/// kernel's maximum, not std's 128: a burst of new clients beyond the backlog has its SYNs
/// dropped and waits a second for the retransmission.
fn bind(listen: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&listen.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The kernel caps it at `net.core.somaxconn` (4096 by default since Linux 5.4).
const LISTEN_BACKLOG: i32 = 4096;

/// A streaming client costs three descriptors (its socket twice, the upstream's), and
/// systemd's default soft limit of 1024 would refuse connections long before
/// `max_connections`: raise the soft limit to the hard one, as nginx's
/// `worker_rlimit_nofile` and Go's runtime do.
fn raise_descriptor_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => log::debug!("descriptor limit {limit}"),
        Err(e) => warn!("cannot raise the descriptor limit: {e}"),
    }
}

/// What a client connection may send before any of our code sees a request (contract
/// rule 8; the vendored tiny_http enforces it and answers in Anthropic's error shape),
/// and how many connections may be open.
fn limits(config: &Config) -> tiny_http::Limits {
    tiny_http::Limits {
        max_head_bytes: MAX_HEAD_BYTES,
        max_header_fields: MAX_HEADER_FIELDS,
        header_timeout: Some(config.client_header_timeout),
        body_timeout: Some(config.client_body_timeout),
        keepalive_timeout: Some(config.keepalive_timeout),
        error_body: |status, message| ("application/json", error_body(error_kind(status), message)),
        max_connections: Some(config.max_connections),
        overflow_connections: OVERFLOW_CONNECTIONS,
        ready_threads: config.workers.min(config.max_connections),
    }
}

/// The request line and headers together, line ends included.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
pub const MAX_HEADER_FIELDS: usize = 100;

/// Anthropic's error type for a status the proxy answers itself.
fn error_kind(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        400..=499 => "invalid_request_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// A bug that panics while serving one request must not take its connection thread's
/// other work with it: the client gets a 500 (or a cut answer) and the connection closes
/// (`ClientOut`), and the panic is logged.
fn serve_guarded(serving: &Serving, request: tiny_http::Request) {
    let id = serving.ids.fetch_add(1, Ordering::Relaxed);
    serving.in_flight.fetch_add(1, Ordering::SeqCst);
    let served = std::panic::catch_unwind(AssertUnwindSafe(|| serve_one(serving, request, id)));
    serving.in_flight.fetch_sub(1, Ordering::SeqCst);
    if served.is_err() {
        error!("#{id}: a panic while serving this request");
    }
}

fn serve_one(serving: &Serving, mut request: tiny_http::Request, id: u64) {
    let (state, listen) = (&*serving.state, serving.listen);
    let started = Instant::now();
    let remote = request.remote_addr().copied();
    let http10 = request.http_version() == &tiny_http::HTTPVersion(1, 0);
    let head = request.method() == &tiny_http::Method::Head;
    // Quoted in log lines: the client chose these bytes.
    let line = format!("{} {:?}", request.method().as_str(), request.url());
    // One generation for the whole request: a reload in the middle does not split it.
    let generation = state.current();
    let config = &generation.config;
    let connection = request.connection();
    let watched = connection.clone();
    let overflow = connection.as_ref().is_some_and(|c| c.is_overflow());
    let checked = check_request(config, listen, overflow, &mut request);
    let mut out = ClientOut::new(request.into_writer(), http10, head)
        .with_closer(Box::new(move || connection.iter().for_each(|c| c.close())));
    if serving.stopping.load(Ordering::SeqCst) || overflow {
        out.close_after_answer();
    }
    let request = match checked {
        Ok(r) => r,
        Err((status, kind, message)) => {
            // The body may be unread: the connection closes after this answer, and the
            // answer says so (a keep-alive client must not send into a closed connection).
            out.close_after_answer();
            send_refusal(&mut out, status, kind, &message);
            info!("#{id} {line} → {status} ({message})");
            return;
        }
    };
    if admin::is_admin_path(&request.target) {
        let status = admin::serve(state, &request, remote, listen, &mut out);
        log::debug!("#{id} {line} → {status} (admin)");
        return;
    }
    // Every upstream wait of this request looks at its client: one that went away ends
    // the upstream request (and its cost) within a second.
    let client_gone = move || watched.as_ref().is_some_and(|c| c.peer_closed());
    let served = idle::watching(client_gone, || {
        failover::forward(state, &generation, &request, &mut out)
    });
    state.counters.latency.observe(started.elapsed());
    let endpoint = served
        .endpoint
        .map(|e| e.to_string())
        .unwrap_or_else(|| "-".into());
    info!(
        "#{id} {line} → {} via {endpoint} after {} attempt(s) in {} ms",
        served.status,
        served.attempts,
        started.elapsed().as_millis()
    );
}

type Rejection = (u16, &'static str, String);

/// Everything a request must pass before it is served, in the order that costs least:
/// the head (target, headers, declared length), the connection's place (an overflow
/// connection serves the admin API only), access (admin or tokens), and only then the
/// body.
fn check_request(
    config: &Config,
    listen: SocketAddr,
    overflow: bool,
    request: &mut tiny_http::Request,
) -> Result<ClientRequest, Rejection> {
    let mut head = check_head(config, request)?;
    let admin = admin::is_admin_path(&head.target);
    if overflow && !admin {
        return Err(overloaded());
    }
    if admin {
        let remote = request.remote_addr().copied();
        admin::access(config, listen, remote, &head)
            .map_err(|denied| (403, "permission_error", denied.0.into()))?;
    } else {
        check_access(config, &head).map_err(|m| (401, "authentication_error", m.into()))?;
    }
    head.body = read_body(config, request)?;
    Ok(head)
}

/// A connection let in beyond `max_connections` gets this for anything but the admin API.
fn overloaded() -> Rejection {
    let message = "every connection the proxy may hold is busy (max_connections); retry shortly";
    (529, "overloaded_error", message.into())
}

/// A refusal in Anthropic's error shape; 529 says when to retry, as Anthropic's does.
fn send_refusal(out: &mut ClientOut, status: u16, kind: &str, message: &str) {
    if status != 529 {
        return send_error(out, status, kind, message);
    }
    let body = error_body(kind, message);
    let headers = [
        ("content-type", &b"application/json"[..]),
        ("retry-after", &b"1"[..]),
    ];
    if let Ok(mut sink) = out.start(529, &headers, Framing::Length(body.len() as u64))
        && sink.write_piece(&body).is_ok()
    {
        let _client_may_be_gone = sink.finish();
    }
}

/// The request head as the upstream request will carry it (body still unread): 400 for a
/// target, method or header the upstream request could not carry, 413 for a declared
/// body larger than `max_body_bytes`. None of these reaches an upstream.
fn check_head(config: &Config, request: &tiny_http::Request) -> Result<ClientRequest, Rejection> {
    let bad = |message: String| (400, "invalid_request_error", message);
    let target = request.url().to_string();
    if !target.starts_with('/') || PathAndQuery::from_str(&target).is_err() {
        return Err(bad(
            "the request target is not a valid path and query".into()
        ));
    }
    let method = Method::from_bytes(request.method().as_str().as_bytes())
        .map_err(|_| bad("the request method is not valid".into()))?;
    let mut headers = Vec::with_capacity(request.headers().len());
    for h in request.headers() {
        let name = HeaderName::from_bytes(h.field.as_str().as_str().as_bytes())
            .map_err(|_| bad("a header name is not valid".into()))?;
        let value = HeaderValue::from_bytes(h.value.as_str().as_bytes())
            .map_err(|_| bad(format!("the value of header {name} is not valid")))?;
        headers.push((name, value));
    }
    if request
        .body_length()
        .is_some_and(|n| n > config.max_body_bytes)
    {
        return Err(too_large(config.max_body_bytes));
    }
    Ok(ClientRequest {
        method,
        target,
        headers,
        body: Vec::new(),
    })
}

fn too_large(max: usize) -> Rejection {
    (
        413,
        "request_too_large",
        format!("the request body is larger than max_body_bytes ({max} bytes)"),
    )
}

/// How much of the body one read asks for at most: the buffer grows with what arrives,
/// never with what the client claims.
const BODY_PIECE: usize = 64 * 1024;
/// One read of a chunked body, whose length nobody declared.
const CHUNKED_PIECE: usize = 8 * 1024;

/// Reads the body in bounded pieces (each read bounded by `client_body_timeout` on the
/// socket): 413 past `max_body_bytes`, 408 for a client that stalls, 400 for a body that
/// breaks off or a malformed chunk. `model_override` applies here.
fn read_body(config: &Config, request: &mut tiny_http::Request) -> Result<Vec<u8>, Rejection> {
    let max = config.max_body_bytes;
    let declared = request.body_length();
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(BODY_PIECE));
    let reader = request.as_reader();
    loop {
        // Read into the vector itself (a stack buffer would stay resident in every
        // connection thread's stack), in pieces: it grows with what arrives, up to what
        // was declared, never by what was claimed alone.
        let len = body.len();
        let want = declared.map_or(CHUNKED_PIECE, |n| n.saturating_sub(len).max(1));
        body.resize(len + want.min(BODY_PIECE).min(max + 1 - len), 0);
        let read = reader.read(&mut body[len..]);
        body.truncate(len + read.as_ref().map_or(0, |n| *n));
        match read {
            Ok(0) => break,
            Ok(_) if body.len() > max => return Err(too_large(max)),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err((
                    408,
                    "invalid_request_error",
                    "the request body stalled for longer than client_body_timeout".into(),
                ));
            }
            Err(e) => {
                let message = format!("cannot read the request body: {e}");
                return Err((400, "invalid_request_error", message));
            }
        }
    }
    if let Some(model) = &config.model_override {
        crate::forward::rewrite::override_model(&mut body, model);
    }
    Ok(body)
}

/// Rule 2: with `access_tokens` set, the client must present one as `x-api-key` or
/// `Authorization: Bearer`. Checked from the head, before any body byte is read.
fn check_access(config: &Config, request: &ClientRequest) -> Result<(), &'static str> {
    let tokens = &config.access_tokens;
    if tokens.is_empty() {
        return Ok(());
    }
    let presented = [
        request.header("x-api-key"),
        request
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer ")),
    ];
    let allowed = presented
        .into_iter()
        .flatten()
        .any(|p| tokens.iter().any(|t| t.matches(p.trim())));
    if allowed {
        Ok(())
    } else {
        Err("a valid access token is required (x-api-key or Authorization: Bearer)")
    }
}
