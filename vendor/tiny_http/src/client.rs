use ascii::AsciiString;

use std::io::Result as IoResult;
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Write};

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{HTTPVersion, Header, HeaderField, Method, StatusCode};
use crate::limits::{Answering, ConnState, Limits};
use crate::request::{parse_content_length, RequestCreationError};
use crate::util::RefinedTcpStream;
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    limits: Arc<Limits>,

    // what the requests of this connection tell this thread (a body left unread, a close)
    state: Arc<ConnState>,

    // no request read yet: the head's wait counts from the connection's start
    first: bool,
}

/// Why no request came out of a head.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum HeadError {
    /// The client went away, or a kept-alive connection stayed idle too long: close
    /// without an answer.
    Closed,
    /// Answer this status and message, then close.
    Refused(u16, &'static str),
}

/// How long a refused connection keeps reading (and discarding) what the client still
/// sends, so that closing with unread data does not reset the connection before the
/// client has read the answer (nginx's lingering close, bounded).
const LINGER: Duration = Duration::from_secs(2);
/// Past this many discarded bytes, lingering stops once the answer is out.
const LINGER_BYTES: usize = 1 << 20;

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        limits: Arc<Limits>,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();
        if let Some(wait) = limits.send_timeout {
            // A failure leaves this connection's writes unbounded, as 0.12 left them all.
            let _unbounded_on_failure = write_socket.set_write_timeout(Some(wait));
        }

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(4096, read_socket));
        let first_header = source.next().unwrap();
        let sink = SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket));
        let state = ConnState::new(Some(sink.shared()));

        ClientConnection {
            source,
            sink,
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            limits,
            state,
            first: true,
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// What this connection's requests and the registry share.
    pub(crate) fn state(&self) -> &Arc<ConnState> {
        &self.state
    }

    /// Answers `status` on the connection thread itself and closes (a connection refused
    /// before any request was read).
    pub(crate) fn refuse_now(&mut self, status: u16, message: &str) {
        refuse(&mut self.sink, &self.state, &self.limits, status, message);
    }

    /// Reads the next request head and makes it a `Request`; on a refusal, answers it and
    /// lingers. `None`: the connection is done.
    fn read(&mut self) -> Option<Request> {
        let reader = self.next_header_source.turn();
        if self.state.body_left.load(Ordering::SeqCst) {
            linger(reader, &self.state);
            return None;
        }
        if self.no_more_requests || self.state.closed.load(Ordering::SeqCst) {
            return None;
        }
        // The wait for the first request counts from the accept (`ConnState::new`, on the
        // accept thread, in accept order): a connection whose thread started late is not
        // the younger for it when the longest-idle one is evicted.
        if !self.first {
            self.state.set_idle();
        }
        let head = read_head(reader, &self.limits, &self.state, self.first)
            .and_then(|head| check_framing(&head).map(|length| (head, length)));
        self.first = false;
        let (head, length) = match head {
            Ok(head) => head,
            Err(HeadError::Closed) => return None,
            Err(HeadError::Refused(status, message)) => {
                refuse(&mut self.sink, &self.state, &self.limits, status, message);
                linger(reader, &self.state);
                return None;
            }
        };
        // Most bodies came with their head: the socket is read for the body only when it
        // has not, and only then does that read need `body_timeout`.
        if length.is_none_or(|length| length > reader.buffer().len()) {
            reader
                .get_ref()
                .set_read_timeout(self.limits.body_timeout)
                .ok();
        }

        // building the writer for the request
        let writer = Answering::new(self.sink.next().unwrap(), &self.state);

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        let request = crate::request::new_request(
            self.secure,
            head.method,
            head.target,
            head.version,
            head.headers,
            self.remote_addr.as_ref().ok().copied().flatten(),
            data_source,
            writer,
            Some(self.state.clone()),
        );
        match request {
            Ok(request) => Some(request),
            Err(RequestCreationError::ExpectationFailed) => {
                refuse(
                    &mut self.sink,
                    &self.state,
                    &self.limits,
                    417,
                    "the only expectation supported is 100-continue",
                );
                None
            }
            Err(RequestCreationError::CreationIoError(e)) if is_timeout(&e) => {
                refuse(
                    &mut self.sink,
                    &self.state,
                    &self.limits,
                    408,
                    "the request body did not arrive in time",
                );
                None
            }
            // A small body is read here, whole, before the handler sees the request: one
            // cut short gets the same 400 the handler gives a larger one (the client may
            // only have closed its sending side).
            Err(RequestCreationError::CreationIoError(e))
                if e.kind() == ErrorKind::ConnectionAborted =>
            {
                refuse(
                    &mut self.sink,
                    &self.state,
                    &self.limits,
                    400,
                    "cannot read the request body: the connection ended before the body's content-length",
                );
                None
            }
            Err(RequestCreationError::CreationIoError(_)) => None,
        }
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        let rq = self.read()?;

        // updating the status of the connection
        let connection_header = rq
            .headers()
            .iter()
            .find(|h| h.field.equiv("Connection"))
            .map(|h| h.value.as_str());

        let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

        match lowercase {
            Some(ref val) if val.contains("close") => self.no_more_requests = true,
            Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
            Some(ref val)
                if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
            {
                self.no_more_requests = true
            }
            None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
            _ => (),
        };

        // returning the request
        Some(rq)
    }
}

/// Writes an answer of the connection thread's own, then ends the stream.
fn refuse(
    sink: &mut SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,
    state: &ConnState,
    limits: &Limits,
    status: u16,
    message: &str,
) {
    let (content_type, body) = (limits.error_body)(status, message);
    // Clients retry an overloaded (529) or unavailable (503) answer: say when.
    let retry = if status == 529 || status == 503 {
        "retry-after: 1\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n",
        StatusCode(status).default_reason_phrase(),
        body.len()
    );
    let mut writer = sink.next().unwrap();
    let written = writer
        .write_all(head.as_bytes())
        .and_then(|_| writer.write_all(&body))
        .and_then(|_| writer.flush());
    drop(writer);
    let _client_may_be_gone = written;
    state.close();
}

/// Reads and discards what the client still sends, until it closes, for at most `LINGER`
/// (and `LINGER_BYTES` once the answer is out).
fn linger(reader: &mut BufReader<RefinedTcpStream>, state: &ConnState) {
    let deadline = Instant::now() + LINGER;
    let mut discarded = reader.buffer().len();
    reader.consume(discarded);
    let mut scratch = [0u8; 8192];
    loop {
        if discarded >= LINGER_BYTES && state.closed.load(Ordering::SeqCst) {
            return;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || reader.get_ref().set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match reader.get_mut().read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(n) => discarded += n,
        }
    }
}

/// A parsed request head.
pub(crate) struct Head {
    pub(crate) method: Method,
    pub(crate) target: String,
    pub(crate) version: HTTPVersion,
    pub(crate) headers: Vec<Header>,
}

/// Reads one request head within `limits`: the wait for its first byte is the keep-alive
/// wait (the header wait on a new connection), the rest must come within the header wait.
fn read_head(
    reader: &mut BufReader<RefinedTcpStream>,
    limits: &Limits,
    state: &ConnState,
    first: bool,
) -> Result<Head, HeadError> {
    let mut deadline = limits.header_timeout.map(|wait| Instant::now() + wait);
    if reader.buffer().is_empty() {
        if first {
            fill(reader, deadline)?;
        } else {
            wait_while_idle(reader, limits, state)?;
            deadline = limits.header_timeout.map(|wait| Instant::now() + wait);
        }
    }
    // Busy from the first byte of a head: no longer a candidate for eviction.
    if !state.try_busy() {
        return Err(HeadError::Closed);
    }
    let mut left = limits.max_head_bytes;
    // One buffer for every line of the head, not one allocation per line.
    let mut line = Vec::with_capacity(256);
    let mut next_line = |reader: &mut BufReader<RefinedTcpStream>, line: &mut Vec<u8>| {
        read_line(reader, &mut left, deadline, line)
    };
    next_line(reader, &mut line)?;
    // RFC 9112 2.2: empty lines before a request line are ignored (the budget bounds them).
    while line.is_empty() {
        next_line(reader, &mut line)?;
    }
    if line.len() > limits.max_line_bytes {
        return Err(HeadError::Refused(414, "the request line is longer than 8 KiB"));
    }
    let (method, target, version) = parse_request_line(&line)?;
    let mut headers = Vec::new();
    loop {
        next_line(reader, &mut line)?;
        if line.is_empty() {
            break;
        }
        if line.len() > limits.max_line_bytes {
            return Err(HeadError::Refused(431, "a header line is longer than 8 KiB"));
        }
        if headers.len() == limits.max_header_fields {
            return Err(HeadError::Refused(
                431,
                "the request has too many header fields",
            ));
        }
        headers.push(parse_header_line(&line)?);
    }
    Ok(Head {
        method,
        target,
        version,
        headers,
    })
}

/// Waits for a kept-alive connection's next request: closed silently once it has been idle
/// for `keepalive_timeout` with no answer still being written (a client does not send its
/// next request during a long stream).
fn wait_while_idle(
    reader: &mut BufReader<RefinedTcpStream>,
    limits: &Limits,
    state: &ConnState,
) -> Result<(), HeadError> {
    loop {
        let deadline = limits.keepalive_timeout.map(|wait| Instant::now() + wait);
        match fill(reader, deadline) {
            Err(HeadError::Refused(408, _)) if state.answering.load(Ordering::SeqCst) > 0 => {}
            Err(HeadError::Refused(408, _)) => return Err(HeadError::Closed),
            other => return other,
        }
    }
}

/// Waits for bytes in the read buffer until `deadline`.
fn fill(
    reader: &mut BufReader<RefinedTcpStream>,
    deadline: Option<Instant>,
) -> Result<(), HeadError> {
    let timed_out = HeadError::Refused(408, "the request head did not arrive in time");
    loop {
        let wait = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(wait) if !wait.is_zero() => Some(wait),
                _ => return Err(timed_out),
            },
            None => None,
        };
        if reader.get_ref().set_read_timeout(wait).is_err() {
            return Err(HeadError::Closed);
        }
        match reader.fill_buf() {
            Ok([]) => return Err(HeadError::Closed),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(timed_out),
            Err(_) => return Err(HeadError::Closed),
        }
    }
}

/// A socket read timeout shows as either kind, depending on the platform.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads one line (ended by LF, with or without CR before it) without its line end,
/// into `line` (cleared first), counting it against `left`.
fn read_line(
    reader: &mut BufReader<RefinedTcpStream>,
    left: &mut usize,
    deadline: Option<Instant>,
    line: &mut Vec<u8>,
) -> Result<(), HeadError> {
    line.clear();
    loop {
        if reader.buffer().is_empty() {
            fill(reader, deadline)?;
        }
        let available = reader.buffer();
        let end = available.iter().position(|&b| b == b'\n');
        let take = end.map_or(available.len(), |i| i + 1);
        if take > *left {
            return Err(HeadError::Refused(
                431,
                "the request head is larger than 64 KiB",
            ));
        }
        *left -= take;
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if end.is_some() {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(());
        }
    }
}

/// RFC 9110 5.6.2: the characters of a method or a header name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `METHOD SP TARGET SP HTTP/x.y`, nothing more: no control character, no second space.
fn parse_request_line(line: &[u8]) -> Result<(Method, String, HTTPVersion), HeadError> {
    let bad = HeadError::Refused(400, "the request line is malformed");
    if !line.iter().all(|&b| b.is_ascii_graphic() || b == b' ') {
        return Err(bad);
    }
    let text = std::str::from_utf8(line)
        .map_err(|_| HeadError::Refused(400, "the request line is malformed"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    if method.is_empty() || !method.bytes().all(is_tchar) || target.is_empty() {
        return Err(bad);
    }
    let method = method
        .parse()
        .map_err(|_| HeadError::Refused(400, "the request line is malformed"))?;
    Ok((method, target.to_owned(), parse_http_version(version)?))
}

/// `name: value`: the name a token right before the colon, the value visible ASCII,
/// spaces and tabs; no folded continuation lines.
fn parse_header_line(line: &[u8]) -> Result<Header, HeadError> {
    let bad = HeadError::Refused(400, "a header line is malformed");
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HeadError::Refused(400, "a header line is malformed"))?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(bad);
    }
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let value = &line[colon + 1..];
    let start = value
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    let value = &value[start..end];
    if !value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(HeadError::Refused(
            400,
            "a header value has a character that is not allowed",
        ));
    }
    let field = HeaderField::from_bytes(name.to_vec())
        .map_err(|_| HeadError::Refused(400, "a header line is malformed"))?;
    let value = AsciiString::from_ascii(value.to_vec())
        .map_err(|_| HeadError::Refused(400, "a header line is malformed"))?;
    Ok(Header { field, value })
}

/// The body's framing must be unambiguous (request smuggling): one `content-length`
/// that is a plain decimal, or `transfer-encoding: chunked` alone (HTTP/1.1 only).
/// The body's length: `Some(n)` for `content-length: n` (0 without either header), None
/// for a chunked body.
pub(crate) fn check_framing(head: &Head) -> Result<Option<usize>, HeadError> {
    let named = |name: &'static str| head.headers.iter().filter(move |h| h.field.equiv(name));
    let mut lengths = named("Content-Length");
    let mut encodings = named("Transfer-Encoding");
    if let Some(encoding) = encodings.next() {
        if head.version == HTTPVersion(1, 0) {
            return Err(HeadError::Refused(
                400,
                "transfer-encoding is not allowed in HTTP/1.0",
            ));
        }
        if lengths.next().is_some() {
            return Err(HeadError::Refused(
                400,
                "content-length and transfer-encoding must not come together",
            ));
        }
        if encodings.next().is_some() || !encoding.value.as_str().eq_ignore_ascii_case("chunked") {
            return Err(HeadError::Refused(
                501,
                "the only transfer-encoding supported is chunked",
            ));
        }
        return Ok(None);
    }
    let Some(length) = lengths.next() else {
        return Ok(Some(0));
    };
    if lengths.next().is_some() {
        return Err(HeadError::Refused(400, "content-length must be given once"));
    }
    match parse_content_length(length.value.as_str()) {
        Some(length) => Ok(Some(length)),
        None => Err(HeadError::Refused(
            400,
            "content-length must be a decimal number",
        )),
    }
}

/// `HTTP/1.0` and `HTTP/1.1`; another `HTTP/d.d` is 505, anything else 400.
fn parse_http_version(version: &str) -> Result<HTTPVersion, HeadError> {
    match version {
        "HTTP/1.0" => Ok(HTTPVersion(1, 0)),
        "HTTP/1.1" => Ok(HTTPVersion(1, 1)),
        _ => {
            let b = version.as_bytes();
            let shaped = b.len() == 8
                && version.starts_with("HTTP/")
                && b[5].is_ascii_digit()
                && b[6] == b'.'
                && b[7].is_ascii_digit();
            if shaped {
                Err(HeadError::Refused(
                    505,
                    "only HTTP/1.0 and HTTP/1.1 are supported",
                ))
            } else {
                Err(HeadError::Refused(400, "the request line is malformed"))
            }
        }
    }
}

#[cfg(test)]
mod test {
    use super::{check_framing, parse_header_line, parse_request_line, Head, HeadError};
    use crate::common::HTTPVersion;

    #[test]
    fn request_lines_are_strict() {
        let (method, path, ver) = parse_request_line(b"GET /hello HTTP/1.1").unwrap();
        assert!(method == crate::Method::Get);
        assert_eq!(path, "/hello");
        assert_eq!(ver, HTTPVersion(1, 1));
        let bad = HeadError::Refused(400, "the request line is malformed");
        for line in [
            &b"GET /hello"[..],
            b"qsd qsd qsd",
            b"GET  /hello HTTP/1.1",
            b"GET /a b HTTP/1.1",
            b"GET /hello HTTP/1.1 ",
            b"GET /a\rb HTTP/1.1",
            b"GET /a\x00b HTTP/1.1",
            b"G(T / HTTP/1.1",
            b"GET / HTTP/0.9x",
        ] {
            assert_eq!(
                parse_request_line(line).err(),
                Some(bad.clone()),
                "{:?}",
                line
            );
        }
        assert_eq!(
            parse_request_line(b"GET / HTTP/2.0").err(),
            Some(HeadError::Refused(
                505,
                "only HTTP/1.0 and HTTP/1.1 are supported"
            ))
        );
    }

    #[test]
    fn header_lines_are_strict() {
        let h = parse_header_line(b"Content-Type:  text/plain \t").unwrap();
        assert_eq!(h.field.as_str().as_str(), "Content-Type");
        assert_eq!(h.value.as_str(), "text/plain");
        for line in [
            &b"Content-Length : 5"[..],
            b" folded: value",
            b"\tfolded: value",
            b"no colon",
            b": empty name",
            b"x-a: b\rc",
            b"x-a: \xc3\xa9",
        ] {
            assert!(parse_header_line(line).is_err(), "{:?}", line);
        }
    }

    fn head(version: HTTPVersion, lines: &[&[u8]]) -> Head {
        Head {
            method: crate::Method::Post,
            target: "/".into(),
            version,
            headers: lines
                .iter()
                .map(|l| parse_header_line(l).unwrap())
                .collect(),
        }
    }

    #[test]
    fn framing_must_be_unambiguous() {
        let v11 = || HTTPVersion(1, 1);
        let status = |h: Head| match check_framing(&h) {
            Ok(_) => 0,
            Err(HeadError::Refused(s, _)) => s,
            Err(HeadError::Closed) => 1,
        };
        assert_eq!(status(head(v11(), &[b"content-length: 41"])), 0);
        assert_eq!(status(head(v11(), &[b"content-length: 041"])), 0);
        assert_eq!(status(head(v11(), &[b"transfer-encoding: Chunked"])), 0);
        for cl in [
            "0x29",
            "+41",
            "-1",
            "4 1",
            "41,41",
            "",
            "99999999999999999999999",
        ] {
            let line = format!("content-length: {cl}");
            assert_eq!(status(head(v11(), &[line.as_bytes()])), 400, "{:?}", cl);
        }
        assert_eq!(
            status(head(v11(), &[b"content-length: 4", b"content-length: 4"])),
            400
        );
        assert_eq!(
            status(head(
                v11(),
                &[b"content-length: 4", b"transfer-encoding: chunked"]
            )),
            400
        );
        assert_eq!(
            status(head(v11(), &[b"transfer-encoding: gzip, chunked"])),
            501
        );
        assert_eq!(
            status(head(
                v11(),
                &[b"transfer-encoding: chunked", b"transfer-encoding: chunked"]
            )),
            501
        );
        assert_eq!(
            status(head(HTTPVersion(1, 0), &[b"transfer-encoding: chunked"])),
            400
        );
    }
}
