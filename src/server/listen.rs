//! The server: binding the listener, the `Limits` every client connection is read under,
//! starting tiny_http (one thread per open connection, `workers` kept ready) and the
//! recovery thread, and the shutdown that drains them.
//!
//! The vendored tiny_http accepts connections (at most `max_connections`, idle ones making
//! room for new ones), reads each request head on its connection's thread under the
//! `Limits`, and calls `serve::serve_guarded` on that same thread: the request is served
//! start to finish there (check the head, read the body, admin or forward, stream the
//! answer), then the thread reads the connection's next request. No request waits behind
//! another connection's, and nothing crosses threads on the way.

use crate::config::validated::Config;
use crate::server::http_out::error_body;
use crate::server::serve::{Serving, serve_guarded};
use crate::state::recovery::RecoveryThread;
use crate::state::shared::State;
use log::{info, warn};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
            bodies: Default::default(),
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
        max_line_bytes: crate::upstream::agent::MAX_LINE_BYTES,
        header_timeout: Some(config.client_header_timeout),
        body_timeout: Some(config.client_body_timeout),
        send_timeout: Some(config.client_send_timeout),
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
