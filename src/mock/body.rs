//! What the answers carry: bodies written by hand, keys in the order the real API uses,
//! byte-for-byte deterministic; `Reply`, a complete answer with a fixed body; header values
//! made safe.

use crate::mock::options::{Message, Options, Usage};
use serde_json::Value;

pub(super) const FAULT_MESSAGE: &str = "mock fault";

/// A complete answer with a fixed body.
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) content_type: &'static str,
    pub(super) headers: Vec<(&'static str, String)>,
    pub(super) body: Vec<u8>,
}

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

/// The usage an answer reports: the request's `x-mock-usage`, else the estimate (input
/// from the body's size, output from the text's).
fn usage_of(options: &Options, input_tokens: usize, text: &str) -> Usage {
    options.usage.unwrap_or(Usage {
        input: input_tokens as u64,
        output: token_estimate(text) as u64,
        ..Usage::default()
    })
}

/// A `usage` object; the cache counts only when there are some, as the real API omits
/// nothing but older relays do.
fn usage_json(usage: &Usage, output: u64) -> String {
    let cache = if usage.cache_creation + usage.cache_read > 0 {
        format!(
            r#""cache_creation_input_tokens":{},"cache_read_input_tokens":{},"#,
            usage.cache_creation, usage.cache_read
        )
    } else {
        String::new()
    };
    format!(
        r#"{{"input_tokens":{},{cache}"output_tokens":{output}}}"#,
        usage.input
    )
}

pub(super) fn message_json(message: &Message, input_tokens: usize, options: &Options) -> String {
    let text = message.echo();
    let usage = usage_of(options, input_tokens, &text);
    format!(
        concat!(
            r#"{{"id":"msg_mock","type":"message","role":"assistant","model":{model},"#,
            r#""content":[{{"type":"text","text":{text}}}],"stop_reason":"end_turn","#,
            r#""stop_sequence":null,"usage":{usage}}}"#
        ),
        model = json_string(&message.model),
        text = json_string(&text),
        usage = usage_json(&usage, usage.output),
    )
}

pub(super) fn sse_event(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// `message_start`, `content_block_start`, the deltas, `content_block_stop`,
/// `message_delta`, `message_stop`: the real event sequence, with no ping.
pub(super) fn message_events(
    message: &Message,
    input_tokens: usize,
    options: &Options,
) -> Vec<String> {
    let text = padded_text(&message.echo(), options.deltas, options.event_bytes);
    let usage = usage_of(options, input_tokens, &text);
    // The opening reports one output token; the delta the cumulative count, as the API does.
    let start = format!(
        concat!(
            r#"{{"type":"message_start","message":{{"id":"msg_mock","type":"message","#,
            r#""role":"assistant","model":{model},"content":[],"stop_reason":null,"#,
            r#""stop_sequence":null,"usage":{usage}}}}}"#
        ),
        model = json_string(&message.model),
        usage = usage_json(&usage, 1),
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
        usage.output
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

pub(super) fn json_reply(status: u16, body: String) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        headers: Vec::new(),
        body: body.into_bytes(),
    }
}

pub(super) fn text_reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        content_type: "text/plain; charset=utf-8",
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

pub(super) fn error_reply(status: u16, message: &str) -> Reply {
    json_reply(status, error_json(status, message))
}

pub(super) fn rate_limited_reply(retry_after: Option<&str>) -> Reply {
    let mut reply = error_reply(429, FAULT_MESSAGE);
    if let Some(value) = retry_after {
        reply.headers.push(("retry-after", header_safe(value)));
    }
    reply
}

/// Drops control characters so a caller's text cannot break the response head.
pub(super) fn header_safe(text: &str) -> String {
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
}
