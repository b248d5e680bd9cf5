//! The failover loop: choose an endpoint, call it, classify the answer, record it, and
//! either deliver the answer or try the next endpoint.
//!
//! The commit point is the first byte written to the client. Before it, any endpoint
//! failure (including a soft error inside a 200, a stream whose first event is an error,
//! a body cut short) may fail over; after it, never. So a non-streaming body of known
//! length is read whole before it is committed, and an event stream is held back only
//! until its first event has been seen.

use crate::endpoint::{Endpoint, EndpointId, InFlight};
use crate::health::Outcome;
use crate::http_out::{BodySink, ClientOut, Framing, error_body};
use crate::state::{Generation, State};
use crate::upstream::{self, Class, ClientRequest, HOP_BY_HOP};
use serde_json::json;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use ureq::http::{self, HeaderMap};

/// Non-streaming bodies up to this size are read whole before the commit point, so a
/// failure while reading them can still fail over.
const BUFFER_CAP: u64 = 8 * 1024 * 1024;
/// A failed attempt's body is kept (for rule 5's "last upstream response") up to this.
const ERROR_BODY_CAP: usize = 256 * 1024;
/// The first SSE event is looked for in at most this many bytes.
const FIRST_EVENT_CAP: usize = 64 * 1024;
const PIECE: usize = 16 * 1024;

/// What happened to one client request, for the request log line.
#[derive(Clone, Copy, Debug)]
pub struct Served {
    pub status: u16,
    pub attempts: u32,
    pub endpoint: Option<EndpointId>,
}

/// An upstream response held in memory: a failed attempt's answer, or a small body.
struct Buffered {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// A successful response ready to be committed: the head, what was read of the body
/// before the commit point, and the rest still to be streamed.
struct Prepared {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    framing: Framing,
    prefix: Vec<u8>,
    rest: Option<ureq::BodyReader<'static>>,
    sse: bool,
}

enum Attempt<'a> {
    /// An answer for the client, ready to be committed.
    Ready(Ready<'a>),
    /// The endpoint failed; its answer, if it gave one.
    Failed(Option<Buffered>),
    /// The endpoint has no `count_tokens` (it answered 404): estimate locally (rule 10).
    NoCountTokens,
}

/// An answer ready to go to the client, and what to record about it.
struct Ready<'a> {
    prepared: Prepared,
    /// Time to headers, for a success to be recorded; None for a client error (rule 3:
    /// it does not count against the endpoint's health).
    success_after: Option<Duration>,
    /// The attempt stays in flight while its body streams.
    _in_flight: InFlight<'a>,
}

/// Serves one client request through the endpoints of the current generation.
pub fn forward(
    state: &State,
    generation: &Generation,
    request: &ClientRequest,
    out: &mut ClientOut,
) -> Served {
    let config = &generation.config;
    let mut tries = vec![0u32; generation.endpoints.len()];
    let mut last: Option<Buffered> = None;
    let mut attempts = 0;
    let mut panicked = false;
    let session = session(state, generation, request);
    while attempts < config.max_attempts && !panicked {
        let now = Instant::now();
        let bound = session
            .as_ref()
            .and_then(|s| s.bound)
            .filter(|_| attempts == 0);
        let index = match bound.or_else(|| next_endpoint(state, generation, &tries, now)) {
            Some(index) => index,
            None if attempts == 0 => match panic_endpoint(generation) {
                Some(index) => {
                    panicked = true;
                    index
                }
                None => break,
            },
            None => break,
        };
        if tries[index] > 0 {
            std::thread::sleep(backoff(tries[index]));
        }
        tries[index] += 1;
        attempts += 1;
        let endpoint = &generation.endpoints[index];
        if panicked {
            log::warn!(
                "no endpoint is eligible; one last attempt on {} ({})",
                endpoint.name(),
                endpoint.id()
            );
        }
        match attempt(state, &generation.config, endpoint, request, out) {
            Attempt::Ready(ready) => {
                let status = ready.prepared.status;
                state.note_used(endpoint.id());
                if let Some(s) = session.as_ref().filter(|_| status < 400) {
                    let ttl = config.affinity_ttl;
                    state
                        .affinity
                        .bind(&s.key, endpoint.id(), ttl, Instant::now());
                }
                if attempts > 1 {
                    state.counters.failovers.fetch_add(1, Ordering::Relaxed);
                }
                // Counted before the client can see the answer, so stats read right after
                // it already include it.
                let done = served(state, status < 400, status, attempts, Some(endpoint.id()));
                deliver(state, endpoint, ready, out);
                return done;
            }
            Attempt::Failed(answer) => last = answer.or(last),
            Attempt::NoCountTokens => {
                let estimate = json!({ "input_tokens": estimate_tokens(&request.body) });
                let done = served(state, true, 200, attempts, None);
                let _client_may_be_gone =
                    out.send(200, "application/json", estimate.to_string().as_bytes());
                return done;
            }
        }
    }
    // Every attempt failed: whatever the status, the request did not succeed.
    match last {
        Some(answer) if !panicked => {
            let done = served(state, false, answer.status, attempts, None);
            deliver_buffered(out, &answer);
            done
        }
        _ if panicked || attempts == 0 => {
            let done = served(state, false, 503, attempts, None);
            send_error(
                out,
                503,
                "overloaded_error",
                "no upstream endpoint is available",
            );
            done
        }
        _ => {
            let done = served(state, false, 502, attempts, None);
            send_error(out, 502, "api_error", "no upstream endpoint answered");
            done
        }
    }
}

/// Commits a ready answer and records it: a body already read whole before it is written
/// (its outcome is known), a streamed one after its end (a break mid-stream is a failure).
fn deliver(state: &State, endpoint: &Endpoint, ready: Ready, out: &mut ClientOut) {
    let Ready {
        prepared,
        success_after,
        _in_flight,
    } = ready;
    let Some(elapsed) = success_after else {
        commit(prepared, out);
        return;
    };
    if prepared.rest.is_none() {
        state.record(endpoint, &Outcome::Success, elapsed);
        commit(prepared, out);
        return;
    }
    let outcome = match commit(prepared, out) {
        Some(reason) => Outcome::Failure(reason),
        None => Outcome::Success,
    };
    state.record(endpoint, &outcome, elapsed);
}

/// A request's session and the endpoint it is bound to, if that endpoint is eligible;
/// a binding to an endpoint that is not is dropped (a new one is made on success).
struct Session {
    key: String,
    bound: Option<usize>,
}

fn session(state: &State, generation: &Generation, request: &ClientRequest) -> Option<Session> {
    let ttl = generation.config.affinity_ttl;
    if ttl.is_zero() {
        return None;
    }
    let key = crate::affinity::session_key(request)?;
    let now = Instant::now();
    let id = state.affinity.lookup(&key, ttl, now);
    let bound = id.and_then(|id| {
        generation
            .endpoints
            .iter()
            .position(|e| e.id() == id && state.is_eligible(e, now))
    });
    if id.is_some() && bound.is_none() {
        state.affinity.forget(&key);
    }
    Some(Session { key, bound })
}

fn served(
    state: &State,
    ok: bool,
    status: u16,
    attempts: u32,
    endpoint: Option<EndpointId>,
) -> Served {
    let counters = &state.counters;
    counters.total_requests.fetch_add(1, Ordering::Relaxed);
    if ok {
        counters.successful_requests.fetch_add(1, Ordering::Relaxed);
    } else {
        counters.failed_requests.fetch_add(1, Ordering::Relaxed);
    }
    Served {
        status,
        attempts,
        endpoint,
    }
}

/// The next endpoint to try: eligible, under its per-request attempt limit, preferring
/// endpoints this request has tried least (a failed endpoint is retried only after every
/// other one had its turn), then by the strategy.
fn next_endpoint(
    state: &State,
    generation: &Generation,
    tries: &[u32],
    now: Instant,
) -> Option<usize> {
    let limit = generation.config.max_attempts_per_endpoint;
    let open: Vec<_> = state
        .candidates(generation, now)
        .into_iter()
        .filter(|c| tries[c.index] < limit)
        .collect();
    let fewest = open.iter().map(|c| tries[c.index]).min()?;
    let least_tried: Vec<_> = open
        .into_iter()
        .filter(|c| tries[c.index] == fewest)
        .collect();
    generation.selector.pick(&least_tried)
}

/// Rule 5: with no endpoint eligible at all, the enabled one whose quarantine or
/// cooldown began earliest gets one attempt.
fn panic_endpoint(generation: &Generation) -> Option<usize> {
    generation
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.is_enabled())
        .min_by_key(|(_, e)| e.out_since().unwrap_or_else(Instant::now))
        .map(|(index, _)| index)
}

/// A second attempt on the same endpoint waits 100 ms × 2^(n-1), ±50 % jitter, at most 2 s.
fn backoff(previous_tries: u32) -> Duration {
    let base = 100u64 << previous_tries.saturating_sub(1).min(4);
    let jitter = crate::time::random_u64() % base;
    Duration::from_millis((base / 2 + jitter).min(2000))
}

fn attempt<'a>(
    state: &State,
    config: &crate::config::Config,
    endpoint: &'a Endpoint,
    request: &ClientRequest,
    out: &ClientOut,
) -> Attempt<'a> {
    let in_flight = endpoint.begin();
    let started = Instant::now();
    let response = match upstream::send(endpoint, request) {
        Ok(response) => response,
        Err(e) => {
            let reason = upstream::describe_error(&e);
            state.record(endpoint, &Outcome::Failure(reason), started.elapsed());
            return Attempt::Failed(None);
        }
    };
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let reader = body.into_reader();
    let failed = |state: &State, outcome: Outcome, answer: Buffered| {
        state.record(endpoint, &outcome, elapsed);
        Attempt::Failed(Some(answer))
    };
    match upstream::classify(status) {
        Class::ClientError if status == 404 && is_count_tokens(request) => {
            let _drained_for_reuse = buffer_error(status, &parts.headers, reader);
            Attempt::NoCountTokens
        }
        Class::ClientError => Attempt::Ready(Ready {
            prepared: pass_through(status, &parts.headers, reader, request, out),
            success_after: None,
            _in_flight: in_flight,
        }),
        Class::Auth => {
            let answer = buffer_error(status, &parts.headers, reader);
            let reason = format!("HTTP {status}{}: the key was refused", error_kind(&answer));
            failed(state, Outcome::AuthFailure(reason), answer)
        }
        Class::RateLimited => {
            let default = config.rate_limit_cooldown;
            let until = upstream::cooldown_until(&parts.headers, default, Instant::now());
            let answer = buffer_error(status, &parts.headers, reader);
            let reason = format!("HTTP 429{}: rate limited", error_kind(&answer));
            failed(state, Outcome::RateLimited { until, reason }, answer)
        }
        Class::Failure => {
            let answer = buffer_error(status, &parts.headers, reader);
            let reason = format!("HTTP {status}{}", error_kind(&answer));
            failed(state, Outcome::Failure(reason), answer)
        }
        Class::Success => match prepare_success(status, &parts.headers, reader, request, out) {
            Err((reason, answer)) => {
                state.record(endpoint, &Outcome::Failure(reason), elapsed);
                Attempt::Failed(answer)
            }
            Ok(prepared) => Attempt::Ready(Ready {
                prepared,
                success_after: Some(elapsed),
                _in_flight: in_flight,
            }),
        },
    }
}

fn is_count_tokens(request: &ClientRequest) -> bool {
    request.method == http::Method::POST
        && request.target.split('?').next() == Some("/v1/messages/count_tokens")
}

/// About four characters a token: the text of `system`, `messages` and `tools`, counted
/// the way a tokenizer would roughly see it. An estimate, as the contract allows.
fn estimate_tokens(body: &[u8]) -> u64 {
    fn chars(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::String(s) => s.chars().count(),
            serde_json::Value::Array(a) => a.iter().map(chars).sum(),
            serde_json::Value::Object(o) => o.iter().map(|(k, v)| k.len() + chars(v)).sum(),
            serde_json::Value::Null => 0,
            _ => 1,
        }
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (body.len() as u64).div_ceil(4);
    };
    let total: usize = ["system", "messages", "tools"]
        .iter()
        .map(|f| chars(&value[*f]))
        .sum();
    (total as u64).div_ceil(4).max(1)
}

/// `model_override`: the `model` of a JSON body replaced, the body re-serialised (its new
/// length is what goes upstream: qcc sent the old Content-Length and was refused).
pub fn override_model(body: &mut Vec<u8>, model: &str) {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let Some(object) = value.as_object_mut() else {
        return;
    };
    if !object.contains_key("model") {
        return;
    }
    object.insert("model".into(), serde_json::Value::from(model));
    if let Ok(bytes) = serde_json::to_vec(&value) {
        *body = bytes;
    }
}

/// ` (overloaded_error)` when the answer is in Anthropic's error shape; only the type is
/// kept, since a relay's message text could quote anything, a key included.
fn error_kind(answer: &Buffered) -> String {
    soft_error_type(&answer.body)
        .map(|kind| format!(" ({kind})"))
        .unwrap_or_default()
}

/// The `error.type` of a body in Anthropic's error shape.
fn soft_error_type(body: &[u8]) -> Option<String> {
    /// Only the two fields looked at: serde skips the rest of a large message without
    /// building it (a `Value` of every 2xx body showed up in profiles).
    #[derive(serde::Deserialize)]
    struct Top {
        #[serde(rename = "type")]
        kind: Option<String>,
        error: Option<serde_json::Value>,
    }
    if !body.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    let top: Top = serde_json::from_slice(body).ok()?;
    if top.kind.as_deref() != Some("error") {
        return None;
    }
    let error = top.error.unwrap_or_default();
    let kind = error["type"].as_str().unwrap_or("error");
    Some(
        kind.chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect(),
    )
}

/// The upstream's headers as the client gets them: hop-by-hop and framing headers out
/// (the framing is ours), everything else untouched.
fn client_headers(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let listed: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(n, _)| {
            let n = n.as_str();
            !HOP_BY_HOP.contains(&n) && n != "content-length" && !listed.iter().any(|t| t == n)
        })
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn header_starts_with(headers: &HeaderMap, name: http::header::HeaderName, prefix: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with(prefix))
}

fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"))
}

/// Reads a failed attempt's body (bounded) so it can be the "last upstream response".
fn buffer_error(status: u16, headers: &HeaderMap, mut reader: ureq::BodyReader) -> Buffered {
    let mut body = Vec::new();
    let _partial_is_fine = (&mut reader)
        .take(ERROR_BODY_CAP as u64)
        .read_to_end(&mut body);
    Buffered {
        status,
        headers: client_headers(headers),
        body,
    }
}

/// A response without a body for this request: HEAD, 1xx, 204, 304.
fn has_no_body(status: u16, request: &ClientRequest) -> bool {
    request.method == http::Method::HEAD || status < 200 || status == 204 || status == 304
}

/// A response passed on as it comes (client errors, large or open-ended bodies).
fn pass_through(
    status: u16,
    headers: &HeaderMap,
    reader: ureq::BodyReader<'static>,
    request: &ClientRequest,
    out: &ClientOut,
) -> Prepared {
    let length = content_length(headers);
    let framing = match (has_no_body(status, request), length) {
        (true, Some(n)) if request.method == http::Method::HEAD => Framing::Length(n),
        (true, _) => Framing::NoBody,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => out.open_ended(),
    };
    Prepared {
        status,
        headers: client_headers(headers),
        framing,
        prefix: Vec::new(),
        rest: (framing != Framing::NoBody).then_some(reader),
        sse: header_starts_with(headers, http::header::CONTENT_TYPE, "text/event-stream"),
    }
}

type NotCommitted = (String, Option<Buffered>);

/// Everything a 2xx/3xx needs before the commit point: a small body read whole and checked
/// for a soft error, an event stream's first event read and checked for an error event.
fn prepare_success(
    status: u16,
    headers: &HeaderMap,
    mut reader: ureq::BodyReader<'static>,
    request: &ClientRequest,
    out: &ClientOut,
) -> Result<Prepared, NotCommitted> {
    let sse = header_starts_with(headers, http::header::CONTENT_TYPE, "text/event-stream");
    let length = content_length(headers).filter(|&n| n <= BUFFER_CAP);
    if has_no_body(status, request) || is_encoded(headers) {
        return Ok(pass_through(status, headers, reader, request, out));
    }
    if let (false, Some(n)) = (sse, length) {
        let mut body = Vec::with_capacity(n as usize);
        // To the end, not `take(n)`: ureq returns the connection to its pool only once its
        // reader has reported the end of the body (it enforces the length itself).
        let read = reader.read_to_end(&mut body);
        if let Err(e) = read {
            return Err((body_error(&e), None));
        }
        if body.len() as u64 != n {
            return Err(("response body ended early".into(), None));
        }
        let json = header_starts_with(headers, http::header::CONTENT_TYPE, "application/json");
        if let Some(kind) = soft_error_type(&body).filter(|_| json && status < 300) {
            let answer = Buffered {
                status,
                headers: client_headers(headers),
                body,
            };
            return Err((
                format!("HTTP {status} with an error inside ({kind})"),
                Some(answer),
            ));
        }
        let mut prepared = pass_through(status, headers, reader, request, out);
        prepared.prefix = body;
        prepared.rest = None;
        return Ok(prepared);
    }
    let mut prepared = pass_through(status, headers, reader, request, out);
    if sse {
        let Some(rest) = prepared.rest.as_mut() else {
            return Ok(prepared);
        };
        prepared.prefix = read_first_event(rest).map_err(|e| (body_error(&e), None))?;
        if first_event_is_error(&prepared.prefix) {
            let answer = Buffered {
                status,
                headers: prepared.headers,
                body: prepared.prefix,
            };
            return Err(("the stream opened with an error event".into(), Some(answer)));
        }
    }
    Ok(prepared)
}

/// Why a body read failed, in words a user acts on.
fn body_error(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::TimedOut || e.to_string().contains("timeout") {
        "the body stalled for longer than idle_timeout".into()
    } else {
        format!("the body broke off: {e}")
    }
}

/// Reads until the first complete SSE event (a blank line), the cap, or the end.
fn read_first_event(reader: &mut ureq::BodyReader<'static>) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut piece = [0u8; PIECE];
    while buf.len() < FIRST_EVENT_CAP && !has_event_end(&buf) {
        let n = reader.read(&mut piece)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&piece[..n]);
    }
    Ok(buf)
}

fn has_event_end(buf: &[u8]) -> bool {
    buf.windows(2).any(|w| w == b"\n\n") || buf.windows(4).any(|w| w == b"\r\n\r\n")
}

/// An SSE event named `error`, or whose data is Anthropic's error shape.
fn first_event_is_error(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let event = text.split("\n\n").next().unwrap_or("");
    event.lines().any(|line| {
        let line = line.trim_end_matches('\r');
        if let Some(name) = line.strip_prefix("event:") {
            return name.trim() == "error";
        }
        line.strip_prefix("data:")
            .is_some_and(|data| soft_error_type(data.trim().as_bytes()).is_some())
    })
}

/// Writes the head and the body to the client; returns the upstream's failure if it broke
/// off after the commit point (an endpoint failure). A client that hangs up ends the
/// upstream read at once (the upstream connection is dropped with the reader, not pooled)
/// and is nobody's failure.
fn commit(prepared: Prepared, out: &mut ClientOut) -> Option<String> {
    let headers: Vec<(&str, &[u8])> = prepared
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    let mut sink = out
        .start(prepared.status, &headers, prepared.framing)
        .ok()?;
    // The head goes out now, with the prefix if there is one: a stream's headers must
    // not wait for its next event.
    let sent = if prepared.prefix.is_empty() {
        sink.flush()
    } else {
        sink.write_piece(&prepared.prefix)
    };
    sent.ok()?;
    let end = match prepared.rest {
        Some(reader) => pump(reader, &mut sink),
        None => Pump::Done,
    };
    match end {
        Pump::Done => {
            let _client_may_be_gone = sink.finish();
            None
        }
        Pump::ClientGone => None,
        Pump::UpstreamBroke(reason) => {
            end_broken_body(sink, prepared.sse);
            Some(reason)
        }
    }
}

enum Pump {
    Done,
    ClientGone,
    UpstreamBroke(String),
}

/// Copies the body piece by piece, each piece written and flushed as it arrives.
fn pump(mut reader: ureq::BodyReader<'static>, sink: &mut BodySink) -> Pump {
    let mut piece = vec![0u8; PIECE];
    loop {
        let n = match reader.read(&mut piece) {
            Ok(0) => return Pump::Done,
            Ok(n) => n,
            Err(e) => return Pump::UpstreamBroke(body_error(&e)),
        };
        if sink.write_piece(&piece[..n]).is_err() {
            return Pump::ClientGone;
        }
    }
}

/// After an upstream failure mid-body: an event stream gets a final `event: error` in
/// Anthropic's shape and a clean end; any other body is ended as broken.
fn end_broken_body(mut sink: BodySink, sse: bool) {
    if sse && sink.framing() != Framing::Length(0) {
        let data = error_body("api_error", "the upstream stream broke off");
        let mut event = b"event: error\ndata: ".to_vec();
        event.extend_from_slice(&data);
        event.extend_from_slice(b"\n\n");
        if sink.write_piece(&event).is_ok() && matches!(sink.framing(), Framing::Chunked) {
            let _client_may_be_gone = sink.finish();
            return;
        }
    }
    let _client_may_be_gone = sink.abort();
}

fn deliver_buffered(out: &mut ClientOut, answer: &Buffered) {
    let headers: Vec<(&str, &[u8])> = answer
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    let framing = Framing::Length(answer.body.len() as u64);
    if let Ok(mut sink) = out.start(answer.status, &headers, framing)
        && sink.write_piece(&answer.body).is_ok()
    {
        let _client_may_be_gone = sink.finish();
    }
}

/// A proxy-made error in Anthropic's shape.
pub fn send_error(out: &mut ClientOut, status: u16, kind: &str, message: &str) {
    let _client_may_be_gone = out.send(status, "application/json", &error_body(kind, message));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_soft_errors_and_error_events() {
        assert_eq!(
            soft_error_type(
                br#" {"type":"error","error":{"type":"overloaded_error","message":"x"}}"#
            ),
            Some("overloaded_error".into())
        );
        assert_eq!(soft_error_type(br#"{"type":"message","content":[]}"#), None);
        assert_eq!(soft_error_type(b"not json"), None);
        assert!(first_event_is_error(b"event: error\ndata: {}\n\n"));
        assert!(first_event_is_error(
            b"data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\r\n\r\n"
        ));
        assert!(!first_event_is_error(
            b"event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: error\n\n"
        ));
    }

    #[test]
    fn model_override_rewrites_only_the_model() {
        let mut body = br#"{"model":"a","max_tokens":5,"messages":[]}"#.to_vec();
        override_model(&mut body, "claude-x");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["model"], "claude-x");
        assert_eq!(v["max_tokens"], 5);
        let mut other = b"not json".to_vec();
        override_model(&mut other, "claude-x");
        assert_eq!(other, b"not json");
    }

    #[test]
    fn token_estimate_counts_text_by_four() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"}]}"#;
        // "role"(4) + "user"(4) + "content"(7) + "abcdefgh"(8) = 23 → 6
        assert_eq!(estimate_tokens(body), 6);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        for tries in 1..10 {
            let d = backoff(tries);
            let base = 100u64 << (tries - 1).min(4);
            assert!(d >= Duration::from_millis(base / 2), "{tries}: {d:?}");
            assert!(
                d <= Duration::from_millis((base * 3 / 2).min(2000)),
                "{tries}: {d:?}"
            );
        }
    }
}
