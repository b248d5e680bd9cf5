//! Writing answers on the socket: a reply in one write, slowly, or cut in half; a stream one
//! chunk per event (paced, gated, cut, or stalled on pings); a hang until the wait ends.

use crate::mock::body::{Reply, sse_event};
use crate::mock::conn::{Conn, Next, client_gone};
use crate::mock::plan::{Action, Stream};
use crate::mock::shared::{Shared, Wake};
use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The gap between two pings of a stalled stream (`PingStall`).
const PING_GAP: Duration = Duration::from_millis(100);
const SLOW_BODY_PIECES: usize = 4;

/// What every answer on this request shares.
pub(super) struct Exchange {
    pub(super) name: String,
    pub(super) close: bool,
    pub(super) head_only: bool,
    /// Fields every answer carries, as `set_headers` had them when the request came.
    pub(super) headers: Vec<(String, String)>,
    /// The fault generation this request was planned under: a wait (hang, gate) ends on
    /// a change after it, even one made before the wait began.
    pub(super) seen: u64,
}

impl Exchange {
    fn next(&self) -> Next {
        if self.close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }
}

pub(super) fn execute(
    shared: &Shared,
    conn: &mut Conn,
    action: Action,
    exchange: &Exchange,
) -> io::Result<Next> {
    match action {
        Action::Reply(reply) => write_reply(conn, &reply, exchange),
        Action::SlowReply(reply, delay) => write_slow_reply(shared, conn, &reply, delay, exchange),
        Action::HalfReply(reply) => write_half_reply(conn, &reply, exchange),
        Action::Stream(stream) => write_stream(shared, conn, &stream, exchange),
        Action::Reset => Ok(Next::Close),
        Action::Hang => {
            hang(shared, &conn.writer, exchange.seen);
            Ok(Next::Close)
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Mock",
    }
}

/// The status line and the given fields, plus the fields every answer carries.
fn head(status: u16, fields: &[(&str, &str)], exchange: &Exchange) -> Vec<u8> {
    let mut text = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    let connection = [("connection", "close")];
    let close_field: &[(&str, &str)] = if exchange.close { &connection } else { &[] };
    let name_field = [("x-mock-upstream", exchange.name.as_str())];
    let extra: Vec<(&str, &str)> = exchange
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let all = fields
        .iter()
        .chain(&extra)
        .chain(&name_field)
        .chain(close_field);
    for (name, value) in all {
        for part in [*name, ": ", *value, "\r\n"] {
            text.push_str(part);
        }
    }
    text.push_str("\r\n");
    text.into_bytes()
}

fn reply_head(reply: &Reply, exchange: &Exchange) -> Vec<u8> {
    let length = reply.body.len().to_string();
    let mut fields = vec![
        ("content-type", reply.content_type),
        ("content-length", length.as_str()),
    ];
    fields.extend(
        reply
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str())),
    );
    head(reply.status, &fields, exchange)
}

/// Head and body in one write.
pub(super) fn write_reply(conn: &mut Conn, reply: &Reply, exchange: &Exchange) -> io::Result<Next> {
    let mut bytes = reply_head(reply, exchange);
    if !exchange.head_only {
        bytes.extend_from_slice(&reply.body);
    }
    conn.writer.write_all(&bytes)?;
    Ok(exchange.next())
}

/// The head at once, then the body in `SLOW_BODY_PIECES` pieces, each after `delay`.
fn write_slow_reply(
    shared: &Shared,
    conn: &mut Conn,
    reply: &Reply,
    delay: Duration,
    exchange: &Exchange,
) -> io::Result<Next> {
    if exchange.head_only {
        return write_reply(conn, reply, exchange);
    }
    conn.writer.write_all(&reply_head(reply, exchange))?;
    let piece_len = reply.body.len().div_ceil(SLOW_BODY_PIECES).max(1);
    for piece in reply.body.chunks(piece_len) {
        if !shared.pause(delay) {
            return Ok(Next::Close);
        }
        conn.writer.write_all(piece)?;
    }
    Ok(exchange.next())
}

fn write_half_reply(conn: &mut Conn, reply: &Reply, exchange: &Exchange) -> io::Result<Next> {
    let mut bytes = reply_head(reply, exchange);
    bytes.extend_from_slice(&reply.body[..reply.body.len() / 2]);
    conn.writer.write_all(&bytes)?;
    Ok(Next::Close)
}

fn write_stream(
    shared: &Shared,
    conn: &mut Conn,
    stream: &Stream,
    exchange: &Exchange,
) -> io::Result<Next> {
    let fields = [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("transfer-encoding", "chunked"),
    ];
    conn.writer.write_all(&head(200, &fields, exchange))?;
    let mut gated = stream.gated;
    let mut seen = exchange.seen;
    let opening = stream
        .events
        .iter()
        .position(|e| is_content_event(e))
        .unwrap_or(0);
    for (index, event) in stream.events.iter().enumerate() {
        if stream.cut_after == Some(index) {
            return Ok(Next::Close);
        }
        if stream.pings_after == Some(index) {
            ping_forever(shared, conn)?;
            return Ok(Next::Close);
        }
        if gated && index > opening {
            match wait_gate(shared, &conn.writer, &mut seen) {
                Wake::Permit => {}
                Wake::Changed => gated = false,
                Wake::Stopped | Wake::Tick => return Ok(Next::Close),
            }
        }
        if !stream.delay.is_zero() && !shared.pause(stream.delay) {
            return Ok(Next::Close);
        }
        write_chunk(&mut conn.writer, event.as_bytes())?;
    }
    if stream.cut_after.is_some() {
        return Ok(Next::Close);
    }
    conn.writer.write_all(b"0\r\n\r\n")?;
    Ok(exchange.next())
}

/// An event that is the answer itself (a text delta, or the end of an empty answer), not
/// its preamble.
fn is_content_event(event: &str) -> bool {
    ["content_block_delta", "message_delta", "message_stop"]
        .iter()
        .any(|name| event.starts_with(&format!("event: {name}\n")))
}

/// A `ping` every `PING_GAP` until the client goes away or the mock stops.
fn ping_forever(shared: &Shared, conn: &mut Conn) -> io::Result<()> {
    let ping = sse_event("ping", r#"{"type": "ping"}"#);
    while shared.pause(PING_GAP) && !client_gone(&conn.writer) {
        write_chunk(&mut conn.writer, ping.as_bytes())?;
    }
    Ok(())
}

/// One chunk in one write, so each SSE event leaves as a unit.
fn write_chunk(writer: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    writer.write_all(&chunk)
}

/// Waits for a permit; `Tick` here means the client went away.
fn wait_gate(shared: &Shared, stream: &TcpStream, seen: &mut u64) -> Wake {
    loop {
        match shared.gate_tick(seen) {
            Wake::Tick if client_gone(stream) => return Wake::Tick,
            Wake::Tick => {}
            wake => return wake,
        }
    }
}

/// Holds the request until shutdown, a fault change away from `Hang`, or the client
/// going away; the caller then closes without answering.
fn hang(shared: &Shared, stream: &TcpStream, mut seen: u64) {
    loop {
        match shared.hang_tick(&mut seen) {
            Wake::Tick if client_gone(stream) => return,
            Wake::Tick | Wake::Permit => {}
            Wake::Stopped | Wake::Changed => return,
        }
    }
}
