//! A raw HTTP/1.1 client over one loopback connection, for what a real client library
//! hides: the exact head, the chunk framing, each piece as it arrives, and hanging up in
//! the middle of a body. Shared by the integration tests and `benches/stream.rs` (which
//! includes this file by path), so it depends on std and serde_json only.

#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// A safety net only: a read that waits this long fails the test instead of hanging it.
/// Nothing is asserted about how long anything takes.
pub const SAFETY_TIMEOUT: Duration = Duration::from_secs(5);

pub type Headers<'a> = &'a [(&'a str, &'a str)];

pub struct RawClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// A response head: the status and the headers, names lower-cased.
#[derive(Debug, PartialEq)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The whole head as it arrived, status line to blank line, for byte comparisons.
    pub text: String,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(key, _)| key == name);
        found.map(|(_, value)| value.as_str())
    }

    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.parse().ok()
    }

    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
}

impl RawClient {
    /// Connects to `url` (`http://127.0.0.1:PORT`, as `Proxy::url` and `MockUpstream::url`
    /// give it).
    pub fn connect(url: &str) -> RawClient {
        let addr = url.strip_prefix("http://").expect("an http:// url");
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(SAFETY_TIMEOUT))
            .expect("read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone the socket"));
        RawClient {
            reader,
            writer: stream,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send the request");
    }

    /// Sets how long a read may wait before it fails (`SAFETY_TIMEOUT` after `connect`):
    /// shorter, to see that nothing arrives for a while.
    pub fn set_read_timeout(&self, timeout: Duration) {
        self.writer
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
    }

    /// One line as it arrived, CRLF included; the end of the stream is an error.
    pub fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line)
    }

    pub fn read_head(&mut self) -> io::Result<Head> {
        let status_line = self.read_line()?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut text = status_line;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line()?;
            text.push_str(&line);
            let line = line.trim_end();
            if line.is_empty() {
                return Ok(Head {
                    status,
                    headers,
                    text,
                });
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| io::Error::other(format!("bad header line {line:?}")))?;
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
    }

    /// One chunk's data; `None` for the terminating chunk. A malformed size line (such as
    /// a sender's deliberate `!`) is an error.
    pub fn read_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let size_line = self.read_line()?;
        let size = usize::from_str_radix(size_line.trim(), 16)
            .map_err(|_| io::Error::other(format!("bad chunk size line {size_line:?}")))?;
        if size == 0 {
            self.skip_trailers()?;
            return Ok(None);
        }
        let mut data = vec![0; size + 2];
        self.reader.read_exact(&mut data)?;
        if !data.ends_with(b"\r\n") {
            return Err(io::Error::other("chunk data not followed by CRLF"));
        }
        data.truncate(size);
        Ok(Some(data))
    }

    /// Reads the trailer section after the last chunk, up to its blank line.
    fn skip_trailers(&mut self) -> io::Result<()> {
        while self.read_line()? != "\r\n" {}
        Ok(())
    }

    /// Each chunk's data of a chunked response, in order, up to and including its
    /// terminator.
    pub fn read_chunks(&mut self) -> io::Result<Vec<Vec<u8>>> {
        let mut chunks = Vec::new();
        while let Some(chunk) = self.read_chunk()? {
            chunks.push(chunk);
        }
        Ok(chunks)
    }

    /// The decoded body of a chunked response, up to and including its terminator.
    pub fn read_chunked_body(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(chunk) = self.read_chunk()? {
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    pub fn read_exact_body(&mut self, length: usize) -> io::Result<Vec<u8>> {
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok(body)
    }

    /// The next byte; `None` at the end of the stream. Waiting past the read timeout is an
    /// error.
    pub fn read_byte(&mut self) -> io::Result<Option<u8>> {
        let mut byte = [0; 1];
        let read = self.reader.read(&mut byte)?;
        Ok((read == 1).then_some(byte[0]))
    }

    /// True when the server closed the connection (an end of stream or a reset) without
    /// sending another byte.
    pub fn sees_close(&mut self) -> bool {
        match self.read_byte() {
            Ok(byte) => byte.is_none(),
            Err(err) => err.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    /// Ends what the client sends; it can still read (a half-close).
    pub fn close_write(&self) {
        let _already_closed_is_fine = self.writer.shutdown(Shutdown::Write);
    }

    /// Closes both directions and the socket: the client hangs up.
    pub fn hang_up(self) {
        let _already_closed_is_fine = self.writer.shutdown(Shutdown::Both);
    }

    /// Reads the events of a chunked `text/event-stream` body one at a time.
    pub fn events(&mut self) -> EventReader<'_> {
        EventReader {
            client: self,
            pending: Vec::new(),
            ended: false,
        }
    }
}

/// Splits a chunked body into SSE events, whatever the chunk boundaries are.
pub struct EventReader<'a> {
    client: &'a mut RawClient,
    pending: Vec<u8>,
    ended: bool,
}

impl EventReader<'_> {
    /// The next complete event (ending with its blank line); `None` once the body ended
    /// (with nothing left over: a partial event at the end is an error).
    pub fn next_event(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(end) = find(&self.pending, b"\n\n") {
                let rest = self.pending.split_off(end + 2);
                return Ok(Some(std::mem::replace(&mut self.pending, rest)));
            }
            if self.ended {
                if self.pending.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::other("the body ended inside an event"));
            }
            match self.client.read_chunk()? {
                Some(chunk) => self.pending.extend_from_slice(&chunk),
                None => self.ended = true,
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The events of a decoded SSE body.
pub fn split_events(body: &[u8]) -> Vec<&[u8]> {
    let mut events = Vec::new();
    let mut rest = body;
    while let Some(end) = find(rest, b"\n\n") {
        events.push(&rest[..end + 2]);
        rest = &rest[end + 2..];
    }
    assert!(rest.is_empty(), "a partial event at the end of the body");
    events
}

/// An event's name (its `event:` line) and its `data:` parsed as JSON.
pub fn event_parts(event: &[u8]) -> (String, Value) {
    let text = std::str::from_utf8(event).expect("a UTF-8 event");
    let field = |prefix: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .map(str::trim)
            .unwrap_or_default()
    };
    let data = serde_json::from_str(field("data:")).expect("event data is JSON");
    (field("event:").to_string(), data)
}

pub fn event_name(event: &[u8]) -> String {
    event_parts(event).0
}

/// A request as bytes, with `host` and, when there is a body, `content-length`.
pub fn request(method: &str, path: &str, headers: Headers, body: &[u8]) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        text.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// `POST /v1/messages` saying "hello", streamed or not; `headers` are extra (the mock's
/// `x-mock-*` controls, for instance).
pub fn messages_request(stream: bool, headers: Headers) -> Vec<u8> {
    let body = json!({
        "model": "claude-test",
        "max_tokens": 16,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}]
    })
    .to_string();
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request("POST", "/v1/messages", &all, body.as_bytes())
}
