//! Deciding the answer, pure, no sockets: the route's healthy answer, then the fault in
//! force replacing or reshaping it, and the counter it moves.

use crate::mock::body::{
    FAULT_MESSAGE, Reply, error_reply, json_reply, message_events, message_json,
    rate_limited_reply, text_reply,
};
use crate::mock::fault::Fault;
use crate::mock::options::{Message, Options};
use crate::mock::request::Request;
use crate::mock::shared::{Outcome, Shared};
use std::sync::atomic::Ordering;
use std::time::Duration;

const MODELS_JSON: &str = r#"{"data":[{"id":"claude-mock","type":"model"}],"has_more":false}"#;
const SOFT_ERROR_JSON: &str = r#"{"type":"error","error":{"type":"api_error","message":"soft"}}"#;
const SSE_ERROR_EVENT: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

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

/// A chunked SSE answer, one event per chunk.
pub(super) struct Stream {
    pub(super) events: Vec<String>,
    pub(super) delay: Duration,
    pub(super) gated: bool,
    pub(super) cut_after: Option<usize>,
    pub(super) pings_after: Option<usize>,
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
pub(super) enum Action {
    Reply(Reply),
    SlowReply(Reply, Duration),
    /// The full Content-Length, half the body, then a close.
    HalfReply(Reply),
    Stream(Stream),
    Reset,
    Hang,
}

/// Decides the answer and the counter it moves, from the request and the fault in force.
pub(super) fn plan(shared: &Shared, request: &Request) -> (Outcome, Action) {
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
        Action::Reply(json_reply(
            200,
            message_json(message, input_tokens, options),
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_ignores_the_query_string() {
        assert_eq!(Route::of("POST", "/v1/messages?beta=true"), Route::Messages);
        assert_eq!(Route::of("HEAD", "/"), Route::Root);
        assert_eq!(Route::of("GET", "/v1/messages"), Route::NotFound);
    }
}
