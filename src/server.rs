//! The HTTP side facing clients: tiny_http and a fixed pool of worker threads. The only
//! module that knows tiny_http.
//!
//! tiny_http's accept thread parses requests and queues them; `workers` threads take them
//! with `recv()` and serve each one start to finish (read the body, forward, stream the
//! answer). A worker is busy for as long as its stream lasts, so `workers` bounds both
//! concurrency and the threads that can block on upstreams.

use crate::admin;
use crate::config::Config;
use crate::forward::{self, send_error};
use crate::http_out::{ClientOut, error_body};
use crate::recovery::RecoveryThread;
use crate::state::State;
use crate::upstream::ClientRequest;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, error, info, warn};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ureq::http::uri::PathAndQuery;
use ureq::http::{HeaderName, HeaderValue, Method};

/// How long a shutdown waits for in-flight requests before it exits anyway.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

pub struct Server {
    http: Arc<tiny_http::Server>,
    workers: Vec<JoinHandle<()>>,
    /// Disconnected once every worker has returned (each holds a sender).
    workers_done: Receiver<()>,
    stopping: Arc<AtomicBool>,
    recovery: RecoveryThread,
    addr: SocketAddr,
}

impl Server {
    /// Binds the listen address of the current config and starts the workers.
    pub fn start(state: Arc<State>) -> Result<Server, String> {
        let generation = state.current();
        let listen = generation.config.listen;
        let http =
            bind(&generation.config).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = http
            .server_addr()
            .to_ip()
            .ok_or_else(|| format!("cannot listen on {listen}: not an IP socket"))?;
        let http = Arc::new(http);
        let stopping = Arc::new(AtomicBool::new(false));
        let request_ids = Arc::new(AtomicU64::new(1));
        let (done, workers_done) = crossbeam_channel::bounded::<()>(0);
        let workers = (0..generation.config.workers)
            .map(|i| {
                let (http, state, stopping, ids, done) = (
                    http.clone(),
                    state.clone(),
                    stopping.clone(),
                    request_ids.clone(),
                    done.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        worker_loop(&http, &state, &stopping, &ids, addr);
                        drop(done);
                    })
                    .map_err(|e| format!("cannot start worker threads: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(done);
        let recovery = RecoveryThread::start(state)?;
        info!("listening on http://{addr} with {} workers", workers.len());
        Ok(Server {
            http,
            workers,
            workers_done,
            stopping,
            recovery,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving: each worker finishes the request it is serving and those already
    /// queued, then returns; the recovery thread stops after its current round. Waits at
    /// most `grace` for all of that; returns false if something was still running then
    /// (those threads are left to the process exit).
    pub fn shutdown(self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        self.stopping.store(true, Ordering::SeqCst);
        let drained = self.wake_workers_until_done(deadline);
        if drained {
            for worker in self.workers {
                let _ = worker.join();
            }
        } else {
            let busy = self.workers.iter().filter(|w| !w.is_finished()).count();
            warn!("{busy} request(s) still in flight after the grace period; not waiting");
        }
        self.recovery.stop(deadline) && drained
    }
}

/// Binds with TCP_NODELAY set on the listening socket, so every accepted connection has
/// it: a streamed event is one small write, and Nagle's algorithm would hold it back until
/// the previous one was acknowledged (up to 40 ms with delayed ACKs).
fn bind(config: &Config) -> Result<tiny_http::Server, Box<dyn std::error::Error + Send + Sync>> {
    let listener = std::net::TcpListener::bind(config.listen)?;
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    tiny_http::Server::from_listener_with_limits(listener, None, limits(config))
}

/// What a client connection may send before any of our code sees a request (contract
/// rule 8; the vendored tiny_http enforces it and answers in Anthropic's error shape).
fn limits(config: &Config) -> tiny_http::Limits {
    tiny_http::Limits {
        max_head_bytes: MAX_HEAD_BYTES,
        max_header_fields: MAX_HEADER_FIELDS,
        header_timeout: Some(config.client_header_timeout),
        body_timeout: Some(config.client_body_timeout),
        keepalive_timeout: Some(config.keepalive_timeout),
        error_body: |status, message| ("application/json", error_body(error_kind(status), message)),
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
        _ => "api_error",
    }
}

impl Server {
    /// tiny_http's `unblock` queues one wake-up token that any `recv` or `try_recv` may
    /// take, so a draining worker can eat another's token: keep handing out one token per
    /// running worker until all have returned.
    fn wake_workers_until_done(&self, deadline: Instant) -> bool {
        loop {
            let running = self.workers.iter().filter(|w| !w.is_finished()).count();
            for _ in 0..running {
                self.http.unblock();
            }
            let wait = deadline.min(Instant::now() + Duration::from_millis(50));
            match self.workers_done.recv_deadline(wait) {
                Err(RecvTimeoutError::Disconnected) => return true,
                _ if Instant::now() >= deadline => return false,
                _ => {}
            }
        }
    }
}

fn worker_loop(
    http: &tiny_http::Server,
    state: &State,
    stopping: &AtomicBool,
    ids: &AtomicU64,
    listen: SocketAddr,
) {
    loop {
        match http.recv() {
            Ok(request) => serve_guarded(state, request, ids, listen),
            Err(_) if stopping.load(Ordering::SeqCst) => break,
            Err(e) => debug!("recv: {e}"),
        }
        if stopping.load(Ordering::SeqCst) {
            break;
        }
    }
    // Requests tiny_http accepted before the stop are served, not dropped.
    while let Ok(Some(request)) = http.try_recv() {
        serve_guarded(state, request, ids, listen);
    }
}

/// A bug that panics while serving one request must not take a worker out of the pool:
/// the client gets tiny_http's 500 (or a cut response), the worker goes on.
fn serve_guarded(state: &State, request: tiny_http::Request, ids: &AtomicU64, listen: SocketAddr) {
    let id = ids.fetch_add(1, Ordering::Relaxed);
    let served =
        std::panic::catch_unwind(AssertUnwindSafe(|| serve_one(state, request, id, listen)));
    if served.is_err() {
        error!("#{id}: the worker panicked while serving this request");
    }
}

fn serve_one(state: &State, mut request: tiny_http::Request, id: u64, listen: SocketAddr) {
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
    let checked = check_head(config, &request).and_then(|mut head| {
        if admin::is_admin_path(&head.target) {
            admin::access(config, listen, remote, &head)
                .map_err(|denied| (403, "permission_error", denied.0.into()))?;
        } else {
            check_access(config, &head).map_err(|m| (401, "authentication_error", m.into()))?;
        }
        head.body = read_body(config, &mut request)?;
        Ok(head)
    });
    let mut out = ClientOut::new(request.into_writer(), http10, head)
        .with_closer(Box::new(move || connection.iter().for_each(|c| c.close())));
    let request = match checked {
        Ok(r) => r,
        Err((status, kind, message)) => {
            send_error(&mut out, status, kind, &message);
            // The body may be unread: what follows on the connection is not a request.
            out.close();
            info!("#{id} {line} → {status} ({message})");
            return;
        }
    };
    if admin::is_admin_path(&request.target) {
        let status = admin::serve(state, &request, remote, listen, &mut out);
        debug!("#{id} {line} → {status} (admin)");
        return;
    }
    let served = forward::forward(state, &generation, &request, &mut out);
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

/// How much of the body one read asks for: the buffer grows with what arrives, never
/// with what the client claims.
const BODY_PIECE: usize = 64 * 1024;

/// Reads the body in bounded pieces (each read bounded by `client_body_timeout` on the
/// socket): 413 past `max_body_bytes`, 408 for a client that stalls, 400 for a body that
/// breaks off or a malformed chunk. `model_override` applies here.
fn read_body(config: &Config, request: &mut tiny_http::Request) -> Result<Vec<u8>, Rejection> {
    let max = config.max_body_bytes;
    let mut body = Vec::with_capacity(request.body_length().unwrap_or(0).min(BODY_PIECE));
    let reader = request.as_reader();
    let mut piece = [0u8; 8192];
    loop {
        let n = match reader.read(&mut piece) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
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
        };
        if body.len() + n > max {
            return Err(too_large(max));
        }
        body.extend_from_slice(&piece[..n]);
    }
    if let Some(model) = &config.model_override {
        crate::rewrite::override_model(&mut body, model);
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
