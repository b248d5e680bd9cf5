//! One client request on its connection's thread, start to finish: the head checked
//! (target, access, declared length) before the body is read in bounded pieces, then the
//! admin API or the failover loop. A panic while serving is caught here.

use crate::body_budget::{BodyBudget, Share};
use crate::config::validated::Config;
use crate::forward::failover::{self, send_error};
use crate::server::admin::access::access;
use crate::server::admin::paths::is_admin_path;
use crate::server::admin::routes;
use crate::server::http_out::{ClientOut, Framing, error_body};
use crate::state::shared::State;
use crate::upstream::call::ClientRequest;
use crate::upstream::idle;
use log::{error, info};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use ureq::http::uri::PathAndQuery;
use ureq::http::{HeaderName, HeaderValue, Method};

/// What every connection thread shares.
pub(super) struct Serving {
    pub(super) state: Arc<State>,
    /// The address the listener got (the admin API's same-origin check).
    pub(super) listen: SocketAddr,
    pub(super) stopping: AtomicBool,
    /// Requests being served now (the drain waits for 0).
    pub(super) in_flight: AtomicUsize,
    pub(super) ids: AtomicU64,
    /// Bytes of request bodies held now, all connections together (`max_body_memory`).
    pub(super) bodies: Arc<BodyBudget>,
}

/// A bug that panics while serving one request must not take its connection thread's
/// other work with it: the client gets a 500 (or a cut answer) and the connection closes
/// (`ClientOut`), and the panic is logged.
pub(super) fn serve_guarded(serving: &Serving, request: tiny_http::Request) {
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
    // Quoted in log lines: the client chose these bytes. Built only for a log that
    // takes it (one request's allocations showed in profiles).
    let line = log::log_enabled!(log::Level::Info)
        .then(|| format!("{} {:?}", request.method().as_str(), request.url()))
        .unwrap_or_default();
    // One generation for the whole request: a reload in the middle does not split it.
    let generation = state.current();
    let config = &generation.config;
    let connection = request.connection();
    let watched = connection.clone();
    let overflow = connection.as_ref().is_some_and(|c| c.is_overflow());
    let checked = check_request(config, listen, overflow, &mut request, &serving.bodies);
    let mut out = ClientOut::new(request.into_writer(), http10, head)
        .with_closer(Box::new(move || connection.iter().for_each(|c| c.close())));
    if serving.stopping.load(Ordering::SeqCst) || overflow {
        out.close_after_answer();
    }
    let mut request = match checked {
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
    if is_admin_path(&request.target) {
        let status = routes::serve(state, &request, remote, listen, &mut out);
        log::debug!("#{id} {line} → {status} (admin)");
        return;
    }
    // Every upstream wait of this request looks at its client: one that went away ends
    // the upstream request (and its cost) within a second.
    let client_gone = move || watched.as_ref().is_some_and(|c| c.peer_closed());
    let served = idle::watching(client_gone, || {
        failover::forward(state, &generation, &mut request, &mut out)
    });
    state.counters.latency.observe(started.elapsed());
    info!(
        "#{id} {line} → {} via {} after {} attempt(s) in {} ms",
        served.status,
        Via(served.endpoint),
        served.attempts,
        started.elapsed().as_millis()
    );
}

/// The endpoint that answered, as the request log line names it.
struct Via(Option<crate::state::endpoint::EndpointId>);

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => id.fmt(f),
            None => f.write_str("-"),
        }
    }
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
    bodies: &Arc<BodyBudget>,
) -> Result<ClientRequest, Rejection> {
    let mut head = check_head(config, request)?;
    let admin = is_admin_path(&head.target);
    if overflow && !admin {
        return Err(overloaded());
    }
    if admin {
        let remote = request.remote_addr().copied();
        access(config, listen, remote, &head)
            .map_err(|denied| (403, "permission_error", denied.0.into()))?;
    } else {
        check_access(config, &head).map_err(|m| (401, "authentication_error", m.into()))?;
    }
    let mut share = bodies.share();
    head.body = read_body(config, request, &mut share)?;
    head.held = Some(share);
    Ok(head)
}

/// A body that would take the bodies held past `max_body_memory`.
fn bodies_overloaded() -> Rejection {
    let message =
        "the proxy holds as many request bodies as it may (max_body_memory); retry shortly";
    (529, "overloaded_error", message.into())
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
    // Every value is a slice of one shared buffer: a client's 15-odd headers cost one
    // allocation, not one each plus one more each time an attempt copies them.
    let values = request
        .headers()
        .iter()
        .map(|h| h.value.as_str().as_bytes());
    let mut all = Vec::with_capacity(values.clone().map(<[u8]>::len).sum());
    values.for_each(|v| all.extend_from_slice(v));
    let all = bytes::Bytes::from(all);
    let mut start = 0;
    let mut headers = Vec::with_capacity(request.headers().len());
    for h in request.headers() {
        let name = HeaderName::from_bytes(h.field.as_str().as_str().as_bytes())
            .map_err(|_| bad("a header name is not valid".into()))?;
        let end = start + h.value.as_str().len();
        let value = HeaderValue::from_maybe_shared(all.slice(start..end))
            .map_err(|_| bad(format!("the value of header {name} is not valid")))?;
        start = end;
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
        held: None,
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
/// breaks off or a malformed chunk, 529 when it would take the bodies held past
/// `max_body_memory` (`share` counts what it holds). `model_override` applies here.
fn read_body(
    config: &Config,
    request: &mut tiny_http::Request,
    share: &mut Share,
) -> Result<Vec<u8>, Rejection> {
    let max = config.max_body_bytes;
    let declared = request.body_length();
    // One byte over what was declared: the read that finds the body's end asks for one
    // more byte, which then needs no bigger buffer (a reallocation per request).
    let capacity = declared.map_or(0, |n| n.saturating_add(1));
    let mut body = Vec::with_capacity(capacity.min(BODY_PIECE));
    // The bytes read so far: the front of `body`, whose length is what was ever zeroed.
    let mut filled = 0;
    let reader = request.as_reader();
    loop {
        // Read into the vector itself (a stack buffer would stay resident in every
        // connection thread's stack), in pieces: it grows with what arrives, up to what
        // was declared, never by what was claimed alone. Each byte is zeroed once
        // (zeroing a whole piece before every read, however little it then got, cost
        // 64 KiB of memset a read).
        let want = declared.map_or(CHUNKED_PIECE, |n| n.saturating_sub(filled).max(1));
        let room = want.min(BODY_PIECE).min(max + 1 - filled);
        if !share.grow(room, config.max_body_memory) {
            return Err(bodies_overloaded());
        }
        if body.len() < filled + room {
            body.resize(filled + room, 0);
        }
        let read = reader.read(&mut body[filled..filled + room]);
        let got = read.as_ref().map_or(0, |n| *n);
        filled += got;
        share.give_back(room - got);
        match read {
            Ok(0) => break,
            Ok(_) if filled > max => return Err(too_large(max)),
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
    body.truncate(filled);
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
