//! What an upstream answered, made ready for the client or kept as a failure.
//!
//! Everything here happens before the commit point (the first byte to the client): a
//! non-streaming body of known length is read whole and checked for a soft error (a 2xx
//! whose JSON says `"type":"error"`), an event stream is read up to its first event and
//! checked for an `error` event, a failed attempt's answer is kept for rule 5. Headers are
//! filtered here too: hop-by-hop and framing headers never pass; everything else does.

use crate::body_budget::Share;
use crate::json_fields::{top_level, value};
use crate::server::http_out::{ClientOut, Framing};
use crate::upstream::call::{ClientRequest, HOP_BY_HOP};
use crate::usage::{Counted, Counts};
use std::io::Read;
use ureq::http::{self, HeaderMap, HeaderName, HeaderValue};

/// At most this much is read from an upstream body at a time; whatever a read returns is
/// written and flushed at once (stream.rs) or kept (here).
pub(crate) const PIECE: usize = 8 * 1024;

/// Non-streaming bodies up to this size are read whole before the commit point, so a
/// failure while reading them can still fail over.
pub(crate) const BUFFER_CAP: u64 = 8 * 1024 * 1024;

/// A failed attempt's body is kept (for rule 5's "last upstream response") up to this.
const ERROR_BODY_CAP: usize = 256 * 1024;

/// A stream's preamble is held back at most this long (then committed as it is).
const PREAMBLE_CAP: usize = 64 * 1024;

/// A stream's preamble is read this much at a time. A preamble is 1-2 KiB, and every
/// stream holds its own until its first content (1,000 streams starting at once hold 1,000
/// preambles): reading it in `PIECE`s grew each buffer to 16 KiB (measured with
/// heaptrack), 2 KiB reads keep it near 4 KiB. Smaller reads only mean more copies out of
/// ureq's buffer, never more system calls.
const OPENING_READ: usize = 2 * 1024;

/// An answer's headers as the client gets them, moved out of ureq's map (an answer from
/// Anthropic has 20-odd; copying each name and value cost two allocations apiece).
pub(crate) type Fields = Vec<(HeaderName, HeaderValue)>;

/// An upstream response held in memory: a failed attempt's answer, or a small body.
pub(crate) struct Buffered {
    pub(crate) status: u16,
    pub(crate) headers: Fields,
    pub(crate) body: Vec<u8>,
    /// The body's part of `max_body_memory`, when it was read whole (a soft error);
    /// kept only to be given back with the body.
    pub(crate) _held: Option<Share>,
}

/// What an answer read whole before the commit point may hold: a part of
/// `max_body_memory`, the budget request bodies come from. A relay that answered 8 MiB to
/// each of 4096 requests would otherwise make the proxy hold 32 GiB. An answer that does
/// not fit is passed on as it comes, unchecked, rather than refused.
pub(crate) struct Room {
    /// None where nothing is counted (a request made in a test).
    share: Option<Share>,
    limit: usize,
}

impl Room {
    /// Room for the answers to `request`, beside its own body.
    pub(crate) fn beside(request: &ClientRequest, limit: usize) -> Room {
        Room {
            share: request.held.as_ref().map(Share::sibling),
            limit,
        }
    }

    fn take(&mut self, bytes: u64) -> bool {
        let Some(share) = self.share.as_mut() else {
            return true;
        };
        usize::try_from(bytes).is_ok_and(|bytes| share.grow(bytes, self.limit))
    }

    fn give_back(&mut self, bytes: usize) {
        if let Some(share) = self.share.as_mut() {
            share.give_back(bytes);
        }
    }
}

/// A successful response ready to be committed: the head, what was read of the body
/// before the commit point, and the rest still to be streamed.
pub(crate) struct Prepared {
    pub(crate) status: u16,
    pub(crate) headers: Fields,
    pub(crate) framing: Framing,
    pub(crate) prefix: Vec<u8>,
    pub(crate) rest: Option<ureq::BodyReader<'static>>,
    /// The prefix's part of `max_body_memory` (a body read whole), given back with it.
    pub(crate) held: Option<Share>,
    pub(crate) sse: bool,
    /// The usage of a JSON body read whole, counted as it was checked for a soft error
    /// (one parse of the body, not two): `Some(None)` when it said nothing of usage, None
    /// when the body is still to be metered.
    pub(crate) counted: Option<Option<Counted>>,
}

/// ` (overloaded_error)` when the answer is in Anthropic's error shape; only the type is
/// kept, since a relay's message text could quote anything, a key included.
pub(crate) fn error_kind(answer: &Buffered) -> String {
    soft_error_type(&answer.body)
        .map(|kind| format!(" ({kind})"))
        .unwrap_or_default()
}

/// The `error.type` of a body in Anthropic's error shape.
pub(crate) fn soft_error_type(body: &[u8]) -> Option<String> {
    let [kind, error] = top_level(body, ["type", "error"]);
    soft_error(kind, error)
}

/// `error.type` when the top-level `type` is `"error"`, from the two fields' texts.
fn soft_error(kind: Option<&[u8]>, error: Option<&[u8]>) -> Option<String> {
    (value::<String>(kind).as_deref() == Some("error")).then(|| error_type(value(error)))
}

/// An error shape's `error.type`, printable and short ("error" when it has none).
fn error_type(error: Option<serde_json::Value>) -> String {
    let error = error.unwrap_or_default();
    let kind = error["type"].as_str().unwrap_or("error");
    kind.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// A whole 2xx JSON body's soft error type (`soft_error_type`) and its usage, from one
/// scan of the body (`json_fields`: the content, most of a large answer, is skipped).
fn read_whole(body: &[u8]) -> (Option<String>, Option<Option<Counted>>) {
    let [kind, error, model, usage] = top_level(body, ["type", "error", "model", "usage"]);
    let counts = Counts::read(model, usage);
    (soft_error(kind, error), Some(counts.counted()))
}

/// The upstream's headers as the client gets them: hop-by-hop and framing headers out
/// (the framing is ours), everything else untouched, in the map's order (the values of a
/// repeated header together).
pub(crate) fn client_headers(headers: HeaderMap) -> Fields {
    let listed: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let passes = |n: &HeaderName| {
        let n = n.as_str();
        !HOP_BY_HOP.contains(&n) && n != "content-length" && !listed.iter().any(|t| t == n)
    };
    let mut fields: Fields = Vec::with_capacity(headers.len());
    let mut passing = false;
    // The map gives a name once, then None for each further value of it: the name is
    // moved, and copied only for a header that comes more than once.
    for (name, value) in headers {
        match name {
            Some(name) => {
                passing = passes(&name);
                if passing {
                    fields.push((name, value));
                }
            }
            None if passing => {
                let name = fields.last().map(|(n, _)| n.clone());
                fields.extend(name.map(|n| (n, value)));
            }
            None => {}
        }
    }
    fields
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

/// Whether the header's value starts with `prefix` (lower case), in any case.
fn header_starts_with(headers: &HeaderMap, name: http::header::HeaderName, prefix: &str) -> bool {
    headers.get(name).is_some_and(|v| {
        let start = v.as_bytes().trim_ascii().get(..prefix.len());
        start.is_some_and(|s| s.eq_ignore_ascii_case(prefix.as_bytes()))
    })
}

fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"))
}

/// Reads a failed attempt's body (bounded) so it can be the "last upstream response".
pub(crate) fn buffer_error(
    status: u16,
    headers: HeaderMap,
    mut reader: ureq::BodyReader,
) -> Buffered {
    let mut body = Vec::new();
    let _partial_is_fine = (&mut reader)
        .take(ERROR_BODY_CAP as u64)
        .read_to_end(&mut body);
    Buffered {
        status,
        headers: client_headers(headers),
        body,
        _held: None,
    }
}

/// A response without a body for this request: HEAD, 1xx, 204, 304.
fn has_no_body(status: u16, request: &ClientRequest) -> bool {
    request.method == http::Method::HEAD || status < 200 || status == 204 || status == 304
}

/// A response passed on as it comes (client errors, large or open-ended bodies).
pub(crate) fn pass_through(
    status: u16,
    headers: HeaderMap,
    reader: ureq::BodyReader<'static>,
    request: &ClientRequest,
    out: &ClientOut,
) -> Prepared {
    let length = content_length(&headers);
    let framing = match (has_no_body(status, request), length) {
        (true, Some(n)) if request.method == http::Method::HEAD => Framing::Length(n),
        (true, _) => Framing::NoBody,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => out.open_ended(),
    };
    let sse = header_starts_with(&headers, http::header::CONTENT_TYPE, "text/event-stream");
    Prepared {
        status,
        headers: client_headers(headers),
        framing,
        prefix: Vec::new(),
        rest: (framing != Framing::NoBody).then_some(reader),
        held: None,
        sse,
        counted: None,
    }
}

pub(crate) type NotCommitted = (String, Option<Buffered>);

/// Everything a 2xx/3xx needs before the commit point: a small body read whole and checked
/// for a soft error, an event stream's first event read and checked for an error event.
/// A body read whole takes its part of `room` first; one that does not fit passes on.
pub(crate) fn prepare_success(
    status: u16,
    headers: HeaderMap,
    mut reader: ureq::BodyReader<'static>,
    request: &ClientRequest,
    out: &ClientOut,
    mut room: Room,
) -> Result<Prepared, NotCommitted> {
    let sse = header_starts_with(&headers, http::header::CONTENT_TYPE, "text/event-stream");
    let length = content_length(&headers).filter(|&n| n <= BUFFER_CAP);
    if has_no_body(status, request) || is_encoded(&headers) {
        return Ok(pass_through(status, headers, reader, request, out));
    }
    if let (false, Some(n)) = (sse, length) {
        if !room.take(n) {
            log::debug!("an answer of {n} bytes passes on unchecked: max_body_memory is full");
            let prepared = pass_through(status, headers, reader, request, out);
            return Ok(unmetered(prepared));
        }
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
        return whole(status, headers, body, room, reader, request, out);
    }
    let json = header_starts_with(&headers, http::header::CONTENT_TYPE, "application/json");
    if json && content_length(&headers).is_none() {
        // A JSON body of unknown length (chunked, or up to the connection's end), as relays
        // often send one: read up to the same bound before committing, so that a soft
        // error or a break within it still fails over. Past the bound it is passed on with
        // what was read in front, and so is one that does not fit in `room`. (Other
        // bodies of unknown length may be streams under another name: they pass on as
        // they come.)
        let mut body = Vec::new();
        match read_within(&mut reader, &mut body, &mut room) {
            Err(e) => return Err((body_error(&e), None)),
            Ok(true) => return whole(status, headers, body, room, reader, request, out),
            Ok(false) => {}
        }
        let mut prepared = pass_through(status, headers, reader, request, out);
        if body.len() as u64 <= BUFFER_CAP {
            prepared = unmetered(prepared);
        }
        prepared.prefix = body;
        prepared.held = room.share;
        return Ok(prepared);
    }
    let mut prepared = pass_through(status, headers, reader, request, out);
    if sse {
        let Some(rest) = prepared.rest.as_mut() else {
            return Ok(prepared);
        };
        let (opening, how) = read_opening(rest).map_err(|e| (body_error(&e), None))?;
        prepared.prefix = opening;
        match how {
            Opening::Content | Opening::Capped => {}
            Opening::Ended => {
                return Err(("the stream ended before its first content".into(), None));
            }
            Opening::Error => {
                let answer = Buffered {
                    status,
                    headers: prepared.headers,
                    body: prepared.prefix,
                    _held: None,
                };
                let reason = "the stream sent an error event before its first content";
                return Err((reason.into(), Some(answer)));
            }
        }
    }
    Ok(prepared)
}

/// An answer passed on because it did not fit in `max_body_memory` is not metered either:
/// the meter would keep a copy of it (up to 1 MiB) for its usage.
fn unmetered(mut prepared: Prepared) -> Prepared {
    prepared.counted = Some(None);
    prepared
}

/// Reads a body of unknown length whole, in pieces that each take their part of `room`
/// first: true when it ended within `BUFFER_CAP` (and a piece), false when it is longer or
/// did not fit (`body` then holds what was read).
fn read_within(
    reader: &mut ureq::BodyReader<'static>,
    body: &mut Vec<u8>,
    room: &mut Room,
) -> std::io::Result<bool> {
    loop {
        if body.len() as u64 > BUFFER_CAP || !room.take(PIECE as u64) {
            return Ok(false);
        }
        // Up to a whole piece, or the end of the body (a read of zero).
        let read = (&mut *reader).take(PIECE as u64).read_to_end(body)?;
        room.give_back(PIECE - read);
        if read < PIECE {
            return Ok(true);
        }
    }
}

/// A 2xx/3xx body read whole before the commit point (with its part of `max_body_memory`):
/// a JSON one in Anthropic's error shape is a soft error (not committed); otherwise its
/// usage is read and it goes out with its length.
fn whole(
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    room: Room,
    reader: ureq::BodyReader<'static>,
    request: &ClientRequest,
    out: &ClientOut,
) -> Result<Prepared, NotCommitted> {
    let json = header_starts_with(&headers, http::header::CONTENT_TYPE, "application/json");
    let (soft_error, counted) = match json && status < 300 {
        true => read_whole(&body),
        false => (None, None),
    };
    if let Some(kind) = soft_error {
        let answer = Buffered {
            status,
            headers: client_headers(headers),
            body,
            _held: room.share,
        };
        return Err((
            format!("HTTP {status} with an error inside ({kind})"),
            Some(answer),
        ));
    }
    let mut prepared = pass_through(status, headers, reader, request, out);
    prepared.framing = Framing::Length(body.len() as u64);
    prepared.prefix = body;
    prepared.held = room.share;
    prepared.rest = None;
    prepared.counted = counted;
    Ok(prepared)
}

/// Why a body read failed, in words a user acts on.
pub(crate) fn body_error(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::TimedOut || e.to_string().contains("timeout") {
        "the body stalled for longer than idle_timeout".into()
    } else {
        format!("the body broke off: {e}")
    }
}

/// How a stream's opening ended: the point where it may be committed, or why not.
#[derive(Debug, PartialEq)]
enum Opening {
    /// A content event arrived (`content_block_delta`, or `message_delta` /
    /// `message_stop` for an empty answer): commit, with everything before it.
    Content,
    /// The preamble filled `PREAMBLE_CAP` without content: commit what there is.
    Capped,
    /// An `error` event came before any content.
    Error,
    /// The body ended before any content.
    Ended,
}

/// Events that are the answer itself, not its preamble.
const CONTENT_EVENTS: [&str; 3] = ["content_block_delta", "message_delta", "message_stop"];

/// Reads a stream's preamble (`message_start`, `content_block_start`, `ping`) up to its
/// first content event: until then nothing has reached the client, so a hang or a stall
/// after the preamble can still fail over, and the preamble goes out in one flush with
/// the first content.
fn read_opening(reader: &mut ureq::BodyReader<'static>) -> std::io::Result<(Vec<u8>, Opening)> {
    let mut buf = Vec::new();
    let mut scanned = 0;
    loop {
        while let Some(end) = event_end(&buf[scanned..]) {
            let event = &buf[scanned..scanned + end];
            scanned += end;
            let name = event_type(event);
            if name == "error" || is_error_data(event) {
                return Ok((buf, Opening::Error));
            }
            if CONTENT_EVENTS.contains(&name.as_str()) {
                return Ok((buf, Opening::Content));
            }
        }
        if buf.len() >= PREAMBLE_CAP {
            return Ok((buf, Opening::Capped));
        }
        // Read into the vector itself: a buffer on the stack stays resident in every
        // connection thread's stack for as long as the thread lives.
        let len = buf.len();
        buf.resize(len + OPENING_READ, 0);
        let n = reader.read(&mut buf[len..])?;
        buf.truncate(len + n);
        if n == 0 {
            return Ok((buf, Opening::Ended));
        }
    }
}

/// The length of the first complete event in `buf`, its blank line included.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An event's name: its `event:` line, else its data's `type`.
fn event_type(event: &[u8]) -> String {
    let text = String::from_utf8_lossy(event);
    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix).map(str::trim))
            .map(str::to_string)
    };
    if let Some(name) = line("event:") {
        return name;
    }
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    line("data:")
        .and_then(|data| serde_json::from_str::<Typed>(&data).ok())
        .and_then(|typed| typed.kind)
        .unwrap_or_default()
}

/// An event whose data is Anthropic's error shape.
fn is_error_data(event: &[u8]) -> bool {
    String::from_utf8_lossy(event).lines().any(|line| {
        line.trim_end_matches('\r')
            .strip_prefix("data:")
            .is_some_and(|data| soft_error_type(data.trim().as_bytes()).is_some())
    })
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
        // An error shape inside the content is the model's text, not the answer's.
        let quoted = br#"{"content":[{"type":"error","error":{"type":"x"}}],"type":"message"}"#;
        assert_eq!(soft_error_type(quoted), None);
        let (kind, counted) =
            read_whole(br#"{"model":"m","usage":{"output_tokens":2},"type":"message"}"#);
        assert_eq!(kind, None);
        let counted = counted.flatten().expect("usage");
        assert_eq!(
            (counted.model.as_deref(), counted.usage.output_tokens),
            (Some("m"), 2)
        );
        assert_eq!(soft_error_type(b"not json"), None);
        assert_eq!(event_type(b"event: error\ndata: {}\n\n"), "error");
        let data_only =
            b"data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\r\n\r\n";
        assert_eq!(event_type(data_only), "error");
        assert!(is_error_data(data_only));
        assert_eq!(
            event_type(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"),
            "ping"
        );
    }

    /// Every header but the hop-by-hop and framing ones reaches the client, a repeated one
    /// with each of its values, in the map's order.
    #[test]
    fn client_headers_drop_hop_by_hop_and_framing_and_keep_every_value() {
        let mut upstream = HeaderMap::new();
        let pairs = [
            ("content-type", "application/json"),
            ("set-cookie", "a=1"),
            ("connection", "keep-alive, X-Hop"),
            ("set-cookie", "b=2"),
            ("x-hop", "dropped: listed in connection"),
            ("keep-alive", "timeout=5"),
            ("content-length", "99"),
            ("transfer-encoding", "chunked"),
            ("anthropic-ratelimit-requests-remaining", "7"),
        ];
        for (name, value) in pairs {
            upstream.append(name, HeaderValue::from_static(value));
        }
        let got: Vec<(String, String)> = client_headers(upstream)
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let expected = [
            ("content-type", "application/json"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("anthropic-ratelimit-requests-remaining", "7"),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()));
        assert_eq!(got, expected);
    }

    #[test]
    fn events_end_at_a_blank_line_of_either_kind() {
        assert_eq!(event_end(b"event: a\ndata: 1\n\nevent: b"), Some(18));
        assert_eq!(event_end(b"event: a\r\ndata: 1\r\n\r\nnext"), Some(21));
        assert_eq!(event_end(b"event: a\ndata: 1\n"), None);
    }
}
