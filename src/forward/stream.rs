//! The pass-through pump: the head, then each piece of body written and flushed the moment
//! it is read. After the commit point nothing is retried: an upstream that breaks off
//! mid-body is reported in-band (an SSE `error` event) or by a broken framing, and a
//! client that hangs up stops the upstream read at once.

use crate::forward::answer::{Buffered, Fields, PIECE, Prepared, body_error};
use crate::server::http_out::{BodySink, ClientOut, Framing, error_body};
use crate::upstream::idle;
use crate::usage::Meter;
use std::io::Read;
use std::time::{Duration, Instant};

/// Writes the head and the body to the client, all but its end (`Ended::close` writes
/// that, once the caller has recorded the outcome). A client that hangs up ends the
/// upstream read at once (the upstream connection is dropped with the reader, not pooled)
/// and is nobody's failure.
/// A stream that carries nothing but keep-alives (pings, comments) for `idle` is ended as
/// broken: they are not progress. `meter` reads each piece after it was written (token
/// usage).
pub(crate) fn commit<'o>(
    prepared: Prepared,
    out: &'o mut ClientOut,
    idle: Duration,
    meter: &mut Meter,
) -> Ended<'o> {
    let Prepared {
        status,
        headers,
        framing,
        prefix,
        rest,
        held,
        sse,
        counted: _,
    } = prepared;
    let gone = Ended {
        sink: None,
        end: Pump::ClientGone,
        sse,
    };
    let Some(mut sink) = start(out, status, headers, framing) else {
        return gone;
    };
    // The head goes out now, with the prefix if there is one: a stream's headers must
    // not wait for its next event.
    let sent = if prefix.is_empty() {
        sink.flush()
    } else {
        sink.write_piece(&prefix)
    };
    if sent.is_err() {
        return gone;
    }
    let end = match rest {
        Some(reader) => {
            meter.feed(&prefix);
            // A stream may last minutes: what was held before the commit point (up to
            // 64 KiB of preamble) is not kept for all that time.
            drop((prefix, held));
            pump(reader, &mut sink, sse.then_some(idle), meter)
        }
        None => Pump::Done,
    };
    Ended {
        sink: Some(sink),
        end,
        sse,
    }
}

/// A committed body, all of it written but its end: the last chunk, or the error event
/// or abort of a body that broke off. The caller records the outcome first, so that stats
/// read once the client has seen the end already include it. (A body passed on with a
/// content-length ends with its last byte, which the pump wrote: there the record may
/// follow the client's read by a moment.)
pub(crate) struct Ended<'o> {
    sink: Option<BodySink<'o>>,
    end: Pump,
    sse: bool,
}

impl Ended<'_> {
    /// The upstream's failure, if it broke off after the commit point.
    pub(crate) fn broke_off(&self) -> Option<&str> {
        match &self.end {
            Pump::UpstreamBroke(reason) => Some(reason),
            Pump::Done | Pump::ClientGone => None,
        }
    }

    /// Writes the end.
    pub(crate) fn close(self) {
        match (self.sink, self.end) {
            (Some(sink), Pump::Done) => {
                let _client_may_be_gone = sink.finish();
            }
            (Some(sink), Pump::UpstreamBroke(_)) => end_broken_body(sink, self.sse),
            _ => {}
        }
    }
}

/// Writes the head; the header list is freed at once (a stream holds its thread for long).
fn start(
    out: &mut ClientOut,
    status: u16,
    headers: Fields,
    framing: Framing,
) -> Option<BodySink<'_>> {
    let fields: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    out.start(status, &fields, framing).ok()
}

/// An event stream's read size (see `pump`).
const EVENT_PIECE: usize = 2 * 1024;

enum Pump {
    Done,
    ClientGone,
    UpstreamBroke(String),
}

/// Copies the body piece by piece, each piece written and flushed as it arrives. With
/// `ping_limit` (an event stream), pieces that hold only `ping` events are not progress:
/// past the limit without progress the stream is broken.
fn pump(
    mut reader: ureq::BodyReader<'static>,
    sink: &mut BodySink,
    ping_limit: Option<Duration>,
    meter: &mut Meter,
) -> Pump {
    // An event stream's pieces are events of a few hundred bytes, and a stream holds its
    // buffer for minutes: 2 KiB, not `PIECE`, per stream (a larger burst takes a few more
    // writes). Other bodies are bulk, read in `PIECE`s.
    let size = if ping_limit.is_some() {
        EVENT_PIECE
    } else {
        PIECE
    };
    let mut piece = vec![0u8; size];
    let mut progress_at = Instant::now();
    loop {
        let n = match reader.read(&mut piece) {
            Ok(0) if sink.is_short() => {
                return Pump::UpstreamBroke("the body ended before its content-length".into());
            }
            Ok(0) => return Pump::Done,
            Ok(n) => n,
            // The wait was cut because the client went away (upstream/idle.rs): nobody's failure.
            Err(_) if idle::client_went_away() => return Pump::ClientGone,
            Err(e) => return Pump::UpstreamBroke(body_error(&e)),
        };
        if sink.write_piece(&piece[..n]).is_err() {
            return Pump::ClientGone;
        }
        meter.feed(&piece[..n]);
        match ping_limit {
            Some(limit) if keep_alive_only(&piece[..n]) => {
                if progress_at.elapsed() >= limit {
                    let reason = "the stream carried only keep-alives (pings, comments) for longer than idle_timeout";
                    return Pump::UpstreamBroke(reason.into());
                }
            }
            _ => progress_at = Instant::now(),
        }
    }
}

/// A piece that carries nothing, a keep-alive rather than progress: `ping` events, SSE
/// comments (`: keep-alive`, which relays send where Anthropic sends pings) and blank
/// lines. Any other line is progress, the rest of an event begun in an earlier piece
/// included.
fn keep_alive_only(piece: &[u8]) -> bool {
    let mut in_ping = false;
    piece
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .all(|line| {
            if let Some(name) = line.strip_prefix(b"event:") {
                in_ping = name.trim_ascii() == b"ping";
                return in_ping;
            }
            let data_of_ping = in_ping && line.starts_with(b"data:");
            if line.is_empty() {
                in_ping = false;
            }
            line.is_empty() || line.starts_with(b":") || data_of_ping
        })
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

pub(crate) fn deliver_buffered(out: &mut ClientOut, answer: &Buffered) {
    let headers: Vec<(&str, &[u8])> = answer
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    let framing = Framing::Length(answer.body.len() as u64);
    if let Ok(mut sink) = out.start(answer.status, &headers, framing)
        && sink.write_piece(&answer.body).is_ok()
    {
        let _client_may_be_gone = sink.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::keep_alive_only;

    #[test]
    fn pings_comments_and_blank_lines_are_not_progress() {
        let ping = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";
        assert!(keep_alive_only(ping));
        assert!(keep_alive_only(&[&ping[..], &ping[..]].concat()));
        assert!(keep_alive_only(b": keep-alive\n\n"));
        assert!(keep_alive_only(b":\r\n\r\n: ping\n\n"));
        assert!(keep_alive_only(b"\n"));
        let delta = b"event: content_block_delta\ndata: {}\n\n";
        assert!(!keep_alive_only(&[&ping[..], &delta[..]].concat()));
        assert!(!keep_alive_only(
            &[&b": keep-alive\n\n"[..], &delta[..]].concat()
        ));
        assert!(!keep_alive_only(delta));
        // Data with no event line, and the rest of an event begun in an earlier piece.
        assert!(!keep_alive_only(
            b"data: {\"type\":\"content_block_delta\"}\n\n"
        ));
        assert!(!keep_alive_only(b"\"text\":\"more\"}}\n\n"));
        // A ping's data does not make a later data line a ping's.
        assert!(!keep_alive_only(
            &[&ping[..], &b"data: {}\n\n"[..]].concat()
        ));
    }
}
