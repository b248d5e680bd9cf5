//! Health probes: the one request the recovery thread sends to a quarantined endpoint.
//!
//! `conversation` is qcc's check: a tiny real conversation whose answer must contain a
//! fresh random code, so a relay that answers 200 with canned or cached text does not pass.
//! `http` is a plain `GET base_url + path`, passed on any 2xx.
//!
//! A result's detail starts with where a failure lies, in the words `check --probe` shows
//! a user: `connect:`, `TLS:`, `outbound proxy:` (from `call::describe_error`),
//! `auth:` (401: the key; 403: what the key may do), or `probe:` (the endpoint answered, but not as it should).

use crate::config::validated::{Probe, ProbeKind};
use crate::state::endpoint::Endpoint;
use crate::time::random_u64;
use std::time::Duration;

/// A probe never waits longer than this for headers, whatever the endpoint's `timeout`:
/// a hung endpoint must not hold a recovery round for ten minutes.
pub const MAX_PROBE_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq)]
pub struct ProbeResult {
    pub recovered: bool,
    /// Plain words: what was sent and what came back.
    pub detail: String,
}

pub fn run(endpoint: &Endpoint, probe: &Probe) -> ProbeResult {
    match probe.kind {
        ProbeKind::Conversation => conversation(endpoint, probe),
        ProbeKind::Http => http_get(endpoint, &probe.path),
    }
}

/// Six characters of A-Z0-9.
pub fn fresh_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..6)
        .map(|_| ALPHABET[(random_u64() % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// A probe request with the endpoint's key in the header(s) its `auth` names, as a
/// forwarded request has it.
fn request(endpoint: &Endpoint, method: &str, path: &str) -> ureq::http::request::Builder {
    let mut builder = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", endpoint.config.base_url));
    for (name, value) in crate::upstream::call::key_headers(endpoint) {
        builder = builder.header(name, value.clone());
    }
    builder.header("anthropic-version", "2023-06-01")
}

fn wait(endpoint: &Endpoint) -> Option<Duration> {
    Some(endpoint.config.timeout.min(MAX_PROBE_WAIT))
}

fn conversation(endpoint: &Endpoint, probe: &Probe) -> ProbeResult {
    let code = fresh_code();
    let body = serde_json::json!({
        "model": probe.model,
        "max_tokens": probe.max_tokens,
        "messages": [{
            "role": "user",
            "content": format!("This is a health check. Reply with this code and nothing else: {code}"),
        }],
    })
    .to_string();
    let builder =
        request(endpoint, "POST", "/v1/messages").header("content-type", "application/json");
    let mut response = match call(endpoint, builder, body) {
        Ok(r) => r,
        Err(failure) => return failure,
    };
    let status = response.status().as_u16();
    if status != 200 {
        return refused("POST /v1/messages", status);
    }
    let text = match response
        .body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_vec()
    {
        Ok(bytes) => answer_text(&bytes),
        Err(e) => return failed(format!("probe: the answer broke off: {e}")),
    };
    if text.contains(&code) {
        ProbeResult {
            recovered: true,
            detail: "answered 200 with the code".into(),
        }
    } else {
        failed("probe: answered 200 without the code".into())
    }
}

/// A status that fails the probe, with what it means for the endpoint.
fn refused(request: &str, status: u16) -> ProbeResult {
    use crate::upstream::call::Class;
    let meaning = match crate::upstream::call::classify(status) {
        Class::Auth => {
            return failed(format!(
                "auth: {request} answered HTTP {status}: the key was refused"
            ));
        }
        Class::Forbidden => {
            return failed(format!(
                "auth: {request} answered HTTP {status}: the key may not make this request"
            ));
        }
        Class::RateLimited => ": rate limited",
        Class::Failure => ": the endpoint is failing",
        Class::Invalid => ": not a final answer",
        Class::ClientError | Class::Success => "",
    };
    failed(format!("probe: {request} answered HTTP {status}{meaning}"))
}

/// The concatenated `text` of the answer's content blocks.
fn answer_text(body: &[u8]) -> String {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    value["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

/// Sends the probe with its bounded waits; a failed call is already a `ProbeResult`.
fn call<B: ureq::AsSendBody>(
    endpoint: &Endpoint,
    builder: ureq::http::request::Builder,
    body: B,
) -> Result<ureq::http::Response<ureq::Body>, ProbeResult> {
    let req = builder
        .body(body)
        .map_err(|e| failed(format!("probe: cannot build the request: {e}")))?;
    let agent = &endpoint.agent;
    let req = agent
        .configure_request(req)
        .timeout_recv_response(wait(endpoint))
        .timeout_recv_body(wait(endpoint))
        .build();
    agent
        .run(req)
        .map_err(|e| failed(crate::upstream::call::describe_error(&e)))
}

fn http_get(endpoint: &Endpoint, path: &str) -> ProbeResult {
    match call(endpoint, request(endpoint, "GET", path), ()) {
        Ok(mut r) if r.status().is_success() => {
            let _drained_for_reuse = r.body_mut().with_config().limit(1 << 20).read_to_vec();
            ProbeResult {
                recovered: true,
                detail: format!("GET {path} answered HTTP {}", r.status().as_u16()),
            }
        }
        Ok(r) => refused(&format!("GET {path}"), r.status().as_u16()),
        Err(failure) => failure,
    }
}

fn failed(detail: String) -> ProbeResult {
    ProbeResult {
        recovered: false,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_six_of_a_z_0_9_and_fresh() {
        let a = fresh_code();
        assert_eq!(a.len(), 6);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        );
        assert_ne!(a, fresh_code());
    }

    #[test]
    fn answer_text_joins_text_blocks() {
        let body = br#"{"content":[{"type":"text","text":"ab"},{"type":"tool_use"},{"type":"text","text":"C1"}]}"#;
        assert_eq!(answer_text(body), "abC1");
        assert_eq!(answer_text(b"nope"), "");
    }
}
