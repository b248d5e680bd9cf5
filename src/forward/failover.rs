//! The failover loop: choose an endpoint, call it, classify the answer, record it, and
//! either deliver the answer or try the next endpoint.
//!
//! The commit point is the first byte written to the client. Before it, any endpoint
//! failure (including a soft error inside a 200, a stream whose first event is an error,
//! a body cut short) may fail over; after it, never. So a non-streaming body of known
//! length is read whole before it is committed, and an event stream is held back only
//! until its first event has been seen.

use crate::forward::account;
use crate::forward::answer::{self, Buffered, Prepared};
use crate::forward::rewrite::{estimate_tokens, is_count_tokens};
use crate::forward::stream::{commit, deliver_buffered};
use crate::server::http_out::{ClientOut, error_body};
use crate::state::endpoint::{Endpoint, EndpointId, InFlight};
use crate::state::health::Outcome;
use crate::state::shared::{Generation, State};
use crate::upstream::call::{self, BodyFields, Class, ClientRequest};
use crate::upstream::idle;
use crate::usage::Meter;
use serde_json::json;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What happened to one client request, for the request log line.
#[derive(Clone, Copy, Debug)]
pub struct Served {
    pub status: u16,
    pub attempts: u32,
    pub endpoint: Option<EndpointId>,
}

// One per attempt, moved once: boxing `Ready` would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Attempt<'a> {
    /// An answer for the client, ready to be committed.
    Ready(Ready<'a>),
    /// The endpoint failed; its answer, if it gave one.
    Failed(Option<Buffered>),
    /// 403: the endpoint may not serve this request. Its health is untouched and it gets
    /// no second attempt at this request (the answer would be the same); its answer is
    /// kept for rule 5.
    Forbidden(Buffered),
    /// The endpoint has no `count_tokens` (it answered 404): estimate locally (rule 10).
    NoCountTokens,
    /// The endpoint is at `max_in_flight` (another request took its last place since it
    /// was chosen): not an attempt, not a failure.
    Full,
    /// The client went away while the attempt waited: nobody to answer, nothing recorded.
    ClientGone,
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
    request: &mut ClientRequest,
    out: &mut ClientOut,
) -> Served {
    let config = &generation.config;
    let mut tries = vec![0u32; generation.endpoints.len()];
    let mut last: Option<Buffered> = None;
    let mut attempts = 0;
    let mut panicked = false;
    let fields = request.fields();
    let session = session(state, generation, request, &fields);
    let stream = fields.stream;
    while attempts < config.max_attempts && !panicked {
        let Some((index, last_resort)) = choose(state, generation, &session, &tries, attempts)
        else {
            break;
        };
        panicked = last_resort;
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
        let run = || attempt(state, &generation.config, endpoint, request, stream, out);
        match attempt_or_failure(state, endpoint, run) {
            Attempt::Ready(ready) => {
                let status = ready.prepared.status;
                state.note_used(endpoint.id());
                if let Some(s) = session.as_ref().filter(|_| status < 400) {
                    let ttl = config.affinity_ttl;
                    state
                        .affinity
                        .bind(s.key, endpoint.id(), ttl, Instant::now());
                }
                if attempts > 1 {
                    state.counters.failovers.fetch_add(1, Ordering::Relaxed);
                }
                // No attempt follows a committed answer: the body is not held for a stream's
                // minutes.
                request.release_body();
                // Counted before the client can see the answer, so stats read right after
                // it already include it.
                let done = served(state, status < 400, status, attempts, Some(endpoint.id()));
                deliver(state, endpoint, ready, config.idle_timeout, out);
                return done;
            }
            Attempt::Failed(answer) => last = answer.or(last),
            Attempt::Forbidden(answer) => {
                tries[index] = tries[index].max(config.max_attempts_per_endpoint);
                last = Some(answer);
            }
            Attempt::Full => {
                tries[index] = tries[index].max(config.max_attempts_per_endpoint);
                attempts -= 1;
            }
            Attempt::ClientGone => return served(state, false, 499, attempts, None),
            Attempt::NoCountTokens => {
                let estimate = json!({ "input_tokens": estimate_tokens(&request.body) });
                let done = served(state, true, 200, attempts, None);
                let _client_may_be_gone =
                    out.send(200, "application/json", estimate.to_string().as_bytes());
                return done;
            }
        }
    }
    give_up(state, last, panicked, attempts, out)
}

/// The endpoint for the next attempt: the session's on the first attempt if it is
/// eligible, else the strategy's pick; with nothing eligible before any attempt, rule 5's
/// last resort (then `true`).
fn choose(
    state: &State,
    generation: &Generation,
    session: &Option<Session>,
    tries: &[u32],
    attempts: u32,
) -> Option<(usize, bool)> {
    let bound = session
        .as_ref()
        .and_then(|s| s.bound)
        .filter(|_| attempts == 0);
    if let Some(index) = bound.or_else(|| next_endpoint(state, generation, tries, Instant::now())) {
        return Some((index, false));
    }
    if attempts > 0 {
        return None;
    }
    panic_endpoint(generation).map(|index| (index, true))
}

/// Every attempt failed: the last upstream answer (rule 5), else 503 after the last-resort
/// attempt or when no endpoint could be tried, else 502. Whatever the status, the request
/// did not succeed.
fn give_up(
    state: &State,
    last: Option<Buffered>,
    panicked: bool,
    attempts: u32,
    out: &mut ClientOut,
) -> Served {
    match last {
        Some(answer) if !panicked => {
            let done = served(state, false, answer.status, attempts, None);
            deliver_buffered(out, &answer);
            done
        }
        _ if panicked || attempts == 0 => {
            let done = served(state, false, 503, attempts, None);
            let message = "no upstream endpoint is available";
            send_error(out, 503, "overloaded_error", message);
            done
        }
        _ => {
            let done = served(state, false, 502, attempts, None);
            send_error(out, 502, "api_error", "no upstream endpoint answered");
            done
        }
    }
}

/// Commits a ready answer and records it, always before the client can see its end (stats
/// read then include it): a body already read whole before it is written (its outcome
/// and usage are known), a streamed one once all of it but its end is written (a break
/// mid-stream is a failure; its usage is read as it passes).
fn deliver(state: &State, endpoint: &Endpoint, ready: Ready, idle: Duration, out: &mut ClientOut) {
    let Ready {
        mut prepared,
        success_after,
        _in_flight,
    } = ready;
    let Some(elapsed) = success_after else {
        commit(prepared, out, idle, &mut Meter::Off).close();
        return;
    };
    let mut meter = match prepared.counted.take() {
        Some(counted) => Meter::Counted(counted),
        None => account::meter_for(&prepared),
    };
    if prepared.rest.is_none() {
        meter.feed_whole(&prepared.prefix);
        account::count_usage(endpoint, meter);
        state.record(endpoint, &Outcome::Success, elapsed);
        commit(prepared, out, idle, &mut Meter::Off).close();
        return;
    }
    if prepared.sse {
        // Past its first content a stream has no deadline: `idle_timeout` and the ping
        // rule watch it from here.
        idle::set_deadline(None);
    }
    let ended = commit(prepared, out, idle, &mut meter);
    let outcome = match ended.broke_off() {
        Some(reason) => Outcome::Failure(reason.to_string()),
        None => Outcome::Success,
    };
    account::count_usage(endpoint, meter);
    state.record(endpoint, &outcome, elapsed);
    ended.close();
}

/// A request's session and the endpoint it is bound to, if that endpoint is eligible;
/// a binding to an endpoint that is not is dropped (a new one is made on success).
struct Session {
    key: crate::state::affinity::SessionKey,
    bound: Option<usize>,
}

fn session(
    state: &State,
    generation: &Generation,
    request: &ClientRequest,
    fields: &BodyFields,
) -> Option<Session> {
    let ttl = generation.config.affinity_ttl;
    if ttl.is_zero() {
        return None;
    }
    let key = crate::state::affinity::session_key(request, fields)?;
    let now = Instant::now();
    let id = state.affinity.lookup(key, ttl, now);
    let bound = id.and_then(|id| {
        generation
            .endpoints
            .iter()
            .position(|e| e.id() == id && state.is_eligible(e, now))
    });
    if id.is_some() && bound.is_none() {
        state.affinity.forget(key);
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
/// cooldown began earliest gets one attempt (never one at its `max_in_flight`).
fn panic_endpoint(generation: &Generation) -> Option<usize> {
    generation
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.is_enabled() && !e.is_full())
        .min_by_key(|(_, e)| e.out_since().unwrap_or_else(Instant::now))
        .map(|(index, _)| index)
}

/// When an attempt's waits end: a stream's first content within `stream_timeout`, a
/// whole non-streaming answer within `timeout`.
fn deadline(endpoint: &Endpoint, stream: bool, started: Instant) -> (Instant, &'static str) {
    let config = &endpoint.config;
    if stream {
        let no_content = "timed out: no content before stream_timeout";
        (started + config.stream_timeout, no_content)
    } else {
        let no_answer = "timed out: no complete answer within timeout";
        (started + config.timeout, no_answer)
    }
}

/// A second attempt on the same endpoint waits 100 ms × 2^(n-1), ±50 % jitter, at most 2 s.
fn backoff(previous_tries: u32) -> Duration {
    let base = 100u64 << previous_tries.saturating_sub(1).min(4);
    let jitter = crate::time::random_u64() % base;
    Duration::from_millis((base / 2 + jitter).min(2000))
}

/// `last_error` of an attempt that panicked before the commit point.
const INTERNAL_ERROR: &str = "internal error while reading the answer";

/// Runs one attempt's work before the commit point (the call, the classification, the
/// reading of the answer) so that a panic in it, a bug or an answer nobody foresaw, costs
/// that attempt only: nothing has reached the client yet, so the panic is recorded as the
/// endpoint's failure and the loop tries the next endpoint. The unwinding drops the
/// attempt's in-flight guard.
fn attempt_or_failure<'a>(
    state: &State,
    endpoint: &'a Endpoint,
    run: impl FnOnce() -> Attempt<'a>,
) -> Attempt<'a> {
    let started = Instant::now();
    match std::panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(done) => done,
        Err(_panic) => {
            log::error!(
                "endpoint {} ({}): {INTERNAL_ERROR} (a panic); trying the next endpoint",
                endpoint.name(),
                endpoint.id()
            );
            let outcome = Outcome::Failure(INTERNAL_ERROR.into());
            state.record(endpoint, &outcome, started.elapsed());
            Attempt::Failed(None)
        }
    }
}

fn attempt<'a>(
    state: &State,
    config: &crate::config::validated::Config,
    endpoint: &'a Endpoint,
    request: &ClientRequest,
    stream: bool,
    out: &ClientOut,
) -> Attempt<'a> {
    let Some(in_flight) = endpoint.try_begin() else {
        return Attempt::Full;
    };
    let started = Instant::now();
    idle::set_deadline(Some(deadline(endpoint, stream, started)));
    let response = match call::send(endpoint, request) {
        Ok(response) => response,
        Err(_) if idle::client_went_away() => return Attempt::ClientGone,
        Err(e) => {
            let reason = call::describe_error(&e);
            state.record(endpoint, &Outcome::Failure(reason), started.elapsed());
            return Attempt::Failed(None);
        }
    };
    if stream {
        // A stream holds this thread for minutes in shallow reads and writes: give back
        // the stack pages the call went deep into (about 23 KiB a stream).
        crate::thread_stack::release_unused();
    }
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    account::note_quota(config, endpoint, &parts.headers);
    let reader = body.into_reader();
    let failed = |state: &State, outcome: Outcome, answer: Buffered| {
        state.record(endpoint, &outcome, elapsed);
        Attempt::Failed(Some(answer))
    };
    match call::classify(status) {
        Class::ClientError if status == 404 && is_count_tokens(request) => {
            let _drained_for_reuse = answer::buffer_error(status, parts.headers, reader);
            Attempt::NoCountTokens
        }
        Class::ClientError => Attempt::Ready(Ready {
            prepared: answer::pass_through(status, parts.headers, reader, request, out),
            success_after: None,
            _in_flight: in_flight,
        }),
        Class::Auth => {
            let answer = answer::buffer_error(status, parts.headers, reader);
            let reason = format!(
                "HTTP {status}{}: the key was refused",
                answer::error_kind(&answer)
            );
            failed(state, Outcome::AuthFailure(reason), answer)
        }
        Class::Forbidden => {
            let answer = answer::buffer_error(status, parts.headers, reader);
            log::info!(
                "endpoint {} ({}) may not serve this request: HTTP 403{}; trying the next",
                endpoint.name(),
                endpoint.id(),
                answer::error_kind(&answer)
            );
            Attempt::Forbidden(answer)
        }
        Class::RateLimited => {
            let default = config.rate_limit_cooldown;
            let until = call::cooldown_until(&parts.headers, default, Instant::now());
            let answer = answer::buffer_error(status, parts.headers, reader);
            let reason = format!("HTTP 429{}: rate limited", answer::error_kind(&answer));
            failed(state, Outcome::RateLimited { until, reason }, answer)
        }
        Class::Invalid => {
            // Neither kept for rule 5 (the client could do nothing with it) nor read: the
            // connection goes with the reader.
            let reason = format!("HTTP {status} is not a final answer");
            state.record(endpoint, &Outcome::Failure(reason), elapsed);
            Attempt::Failed(None)
        }
        Class::Failure => {
            let answer = answer::buffer_error(status, parts.headers, reader);
            let reason = format!("HTTP {status}{}", answer::error_kind(&answer));
            failed(state, Outcome::Failure(reason), answer)
        }
        Class::Success => {
            let room = answer::Room::beside(request, config.max_body_memory);
            match answer::prepare_success(status, parts.headers, reader, request, out, room) {
                Err(_) if idle::client_went_away() => Attempt::ClientGone,
                Err((reason, answer)) => {
                    state.record(endpoint, &Outcome::Failure(reason), elapsed);
                    Attempt::Failed(answer)
                }
                Ok(prepared) => Attempt::Ready(Ready {
                    prepared,
                    success_after: Some(elapsed),
                    _in_flight: in_flight,
                }),
            }
        }
    }
}

/// A proxy-made error in Anthropic's shape.
pub fn send_error(out: &mut ClientOut, status: u16, kind: &str, message: &str) {
    let _client_may_be_gone = out.send(status, "application/json", &error_body(kind, message));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validated::{Config, Overrides};

    fn one_endpoint_state() -> State {
        let text = r#"{"endpoints":[{"name":"ep","base_url":"http://127.0.0.1:9","api_key":"sk-unit-0123456789"}]}"#;
        State::new(Config::from_json(text, &Overrides::default(), &|_| None).unwrap()).unwrap()
    }

    #[test]
    fn a_panic_before_the_commit_point_is_an_endpoint_failure_and_releases_the_attempt() {
        let state = one_endpoint_state();
        let generation = state.current();
        let endpoint = &generation.endpoints[0];
        let result = attempt_or_failure(&state, endpoint, || {
            let _in_flight = endpoint.begin();
            panic!("a bug while reading the answer");
        });
        assert!(matches!(result, Attempt::Failed(None)));
        assert_eq!(endpoint.in_flight(), 0);
        let h = endpoint.health();
        let counts = (h.total_requests, h.failed_requests, h.consecutive_failures);
        assert_eq!(counts, (1, 1, 1));
        assert_eq!(h.last_error.as_deref(), Some(INTERNAL_ERROR));
        // Without a panic, the attempt's own result passes through and nothing is recorded.
        let result = attempt_or_failure(&state, endpoint, || Attempt::NoCountTokens);
        assert!(matches!(result, Attempt::NoCountTokens));
        assert_eq!(endpoint.health().total_requests, 1);
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
