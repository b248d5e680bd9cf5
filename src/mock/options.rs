//! What shapes an answer besides the fault in force: the request's `x-mock-*` headers
//! (`Options`) and the message in its body (`Message`).

use crate::mock::fault::{Fault, parse_fault};
use crate::mock::request::Request;
use serde_json::Value;
use std::time::Duration;

const MAX_DELTA_EVENTS: usize = 100_000;
const MAX_STREAM_TEXT_BYTES: usize = 64 * 1024 * 1024;
const DEFAULT_DELTA_EVENTS: usize = 5;

/// The per-request knobs, from the `x-mock-*` headers and the default fault.
pub(super) struct Options {
    pub(super) fault: Fault,
    pub(super) deltas: usize,
    pub(super) event_bytes: usize,
    pub(super) delay: Duration,
    /// `x-mock-usage`: the usage the answer reports instead of the estimate.
    pub(super) usage: Option<Usage>,
}

/// Token counts an answer reports: `x-mock-usage: input=25,output=15,cache_creation=7,
/// cache_read=11` (any subset; the rest are 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Usage {
    pub(super) input: u64,
    pub(super) output: u64,
    pub(super) cache_creation: u64,
    pub(super) cache_read: u64,
}

impl Usage {
    fn parse(value: &str) -> Result<Usage, String> {
        let mut usage = Usage::default();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, number) = part.split_once('=').unwrap_or((part, ""));
            let number: u64 = number
                .trim()
                .parse()
                .map_err(|_| format!("x-mock-usage: {part:?} is not name=number"))?;
            let slot = match name.trim() {
                "input" => &mut usage.input,
                "output" => &mut usage.output,
                "cache_creation" => &mut usage.cache_creation,
                "cache_read" => &mut usage.cache_read,
                other => return Err(format!("x-mock-usage: unknown count {other:?}")),
            };
            *slot = number;
        }
        Ok(usage)
    }
}

impl Options {
    pub(super) fn read(request: &Request, default: Fault) -> Result<Options, String> {
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
        let usage = request
            .header("x-mock-usage")
            .map(Usage::parse)
            .transpose()?;
        Ok(Options {
            usage,
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

/// The parts of a `/v1/messages` body the answer depends on.
pub(super) struct Message {
    pub(super) model: String,
    pub(super) user_text: String,
    pub(super) stream: bool,
}

impl Message {
    /// `None` when the body is not a JSON object.
    pub(super) fn parse(body: &[u8]) -> Option<Message> {
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
    pub(super) fn echo(&self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_any_subset_of_the_four_counts() {
        let usage = Usage::parse("input=25, output=15,cache_creation=7,cache_read=11");
        let all = Usage {
            input: 25,
            output: 15,
            cache_creation: 7,
            cache_read: 11,
        };
        assert_eq!(usage, Ok(all));
        let only = Usage {
            output: 3,
            ..Usage::default()
        };
        assert_eq!(Usage::parse("output=3"), Ok(only));
        assert!(Usage::parse("outputs=3").is_err());
        assert!(Usage::parse("output=-3").is_err());
    }

    #[test]
    fn last_user_text_reads_strings_and_blocks() {
        let body = br#"{"messages":[{"role":"user","content":"first"},{"role":"assistant","content":"x"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"image"},{"type":"text","text":"b"}]}]}"#;
        let message = Message::parse(body).map(|m| m.user_text);
        assert_eq!(message.as_deref(), Some("ab"));
    }
}
