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
use crate::http_out::ClientOut;
use crate::recovery::RecoveryThread;
use crate::state::State;
use crate::upstream::ClientRequest;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, error, info, warn};
use std::io::Read;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
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
        let http = bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
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
fn bind(listen: SocketAddr) -> Result<tiny_http::Server, Box<dyn std::error::Error + Send + Sync>> {
    let listener = std::net::TcpListener::bind(listen)?;
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    tiny_http::Server::from_listener(listener, None)
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
    let path = request.url().to_string();
    let method = request.method().as_str().to_string();
    // One generation for the whole request: a reload in the middle does not split it.
    let generation = state.current();
    let parsed = parse_request(&generation.config, &mut request);
    let mut out = ClientOut::new(request.into_writer(), http10, head);
    let request = match parsed {
        Ok(r) => r,
        Err((status, kind, message)) => {
            send_error(&mut out, status, kind, &message);
            info!("#{id} {method} {path} → {status} ({message})");
            return;
        }
    };
    if admin::is_admin_path(&request.target) {
        let status = admin::serve(state, &request, remote, listen, &mut out);
        debug!("#{id} {method} {path} → {status} (admin)");
        return;
    }
    if let Err(message) = check_access(&generation.config, &request) {
        send_error(&mut out, 401, "authentication_error", message);
        info!("#{id} {method} {path} → 401 ({message})");
        return;
    }
    let served = forward::forward(state, &generation, &request, &mut out);
    state.counters.latency.observe(started.elapsed());
    let endpoint = served
        .endpoint
        .map(|e| e.to_string())
        .unwrap_or_else(|| "-".into());
    info!(
        "#{id} {method} {path} → {} via {endpoint} after {} attempt(s) in {} ms",
        served.status,
        served.attempts,
        started.elapsed().as_millis()
    );
}

type Rejection = (u16, &'static str, String);

/// Reads the request whole (bounded by `max_body_bytes`) and checks it is one we can
/// forward: 413 for a body too large, 400 for anything malformed; neither reaches an
/// upstream.
fn parse_request(
    config: &Config,
    request: &mut tiny_http::Request,
) -> Result<ClientRequest, Rejection> {
    let bad = |message: String| (400, "invalid_request_error", message);
    let target = request.url().to_string();
    if !target.starts_with('/') {
        return Err(bad(format!(
            "the request target must be a path, got {target:?}"
        )));
    }
    let method = Method::from_bytes(request.method().as_str().as_bytes())
        .map_err(|_| bad("the request method is not valid".into()))?;
    let mut headers = Vec::with_capacity(request.headers().len());
    for h in request.headers() {
        let name = HeaderName::from_bytes(h.field.as_str().as_str().as_bytes())
            .map_err(|_| bad(format!("header name {:?} is not valid", h.field.as_str())))?;
        let value = HeaderValue::from_bytes(h.value.as_str().as_bytes())
            .map_err(|_| bad(format!("the value of header {name} is not valid")))?;
        headers.push((name, value));
    }
    let mut body = read_body(request, config.max_body_bytes)?;
    if let Some(model) = &config.model_override {
        crate::rewrite::override_model(&mut body, model);
    }
    Ok(ClientRequest {
        method,
        target,
        headers,
        body,
    })
}

fn read_body(request: &mut tiny_http::Request, max: usize) -> Result<Vec<u8>, Rejection> {
    let too_large = || {
        (
            413,
            "request_too_large",
            format!("the request body is larger than max_body_bytes ({max} bytes)"),
        )
    };
    if request.body_length().is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(request.body_length().unwrap_or(0));
    request
        .as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| {
            (
                400,
                "invalid_request_error",
                format!("cannot read the request body: {e}"),
            )
        })?;
    if body.len() > max {
        return Err(too_large());
    }
    Ok(body)
}

/// Rule 2: with `access_tokens` set, the client must present one as `x-api-key` or
/// `Authorization: Bearer`.
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
