//! The pass-through pump: the head, then each piece of body written and flushed the moment
//! it is read. After the commit point nothing is retried: an upstream that breaks off
//! mid-body is reported in-band (an SSE `error` event) or by a broken framing, and a
//! client that hangs up stops the upstream read at once.

use crate::answer::{Buffered, Prepared, body_error};
use crate::http_out::{BodySink, ClientOut, Framing, error_body};
use std::io::Read;

/// At most this much is read from an upstream body at a time; whatever a read returns is
/// written and flushed at once.
pub(crate) const PIECE: usize = 8 * 1024;

/// Writes the head and the body to the client; returns the upstream's failure if it broke
/// off after the commit point (an endpoint failure). A client that hangs up ends the
/// upstream read at once (the upstream connection is dropped with the reader, not pooled)
/// and is nobody's failure.
pub(crate) fn commit(prepared: Prepared, out: &mut ClientOut) -> Option<String> {
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
            Ok(0) if sink.is_short() => {
                return Pump::UpstreamBroke("the body ended before its content-length".into());
            }
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

pub(crate) fn deliver_buffered(out: &mut ClientOut, answer: &Buffered) {
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
