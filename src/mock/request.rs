//! Reading one request off a connection by hand, within bounds: the head, then the body
//! by `Content-Length` or chunked (`Expect: 100-continue` answered); and `Recorded`, a
//! request as the upstream received it.

use crate::mock::conn::Conn;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// Bounds what one request head may take, so a garbage client cannot grow memory.
const MAX_HEAD_BYTES: u64 = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Large enough for the 10 MB+ bodies the tests send, small enough to refuse nonsense.
const MAX_BODY_BYTES: usize = 128 * 1024 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// One request as the upstream received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// The request target, query string included.
    pub path: String,
    /// In arrival order, names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Decoded (chunked request bodies are de-chunked).
    pub body: Vec<u8>,
}

impl Recorded {
    /// The first value of a header; `name` must be lower-case.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

pub(super) struct Request {
    pub(super) method: String,
    pub(super) path: String,
    http10: bool,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl Request {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// HTTP/1.0 always closes (no keep-alive negotiation here); 1.1 on `connection: close`.
    pub(super) fn wants_close(&self) -> bool {
        let connection = self.header("connection").unwrap_or("");
        self.http10
            || connection
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
    }

    fn expects_continue(&self) -> bool {
        !self.http10
            && self
                .header("expect")
                .is_some_and(|value| value.eq_ignore_ascii_case("100-continue"))
    }
}

pub(super) enum ReadError {
    /// The connection broke or closed mid-request: end it quietly.
    Io(io::Error),
    /// The request is malformed: answer this status, then close.
    Bad(u16, &'static str),
}

impl From<io::Error> for ReadError {
    fn from(err: io::Error) -> ReadError {
        ReadError::Io(err)
    }
}

fn eof() -> ReadError {
    ReadError::Io(io::ErrorKind::UnexpectedEof.into())
}

/// One whole request; `None` when the client closed cleanly between requests.
pub(super) fn read_request(conn: &mut Conn) -> Result<Option<Request>, ReadError> {
    let Some(mut request) = read_head(&mut conn.reader)? else {
        return Ok(None);
    };
    let framing = body_framing(&request)?;
    if framing != Framing::Empty && request.expects_continue() {
        conn.writer.write_all(CONTINUE)?;
    }
    request.body = match framing {
        Framing::Empty => Vec::new(),
        Framing::Length(len) => read_exact_body(&mut conn.reader, len)?,
        Framing::Chunked => read_chunked_body(&mut conn.reader)?,
    };
    Ok(Some(request))
}

fn read_head(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>, ReadError> {
    let mut budget = MAX_HEAD_BYTES;
    // Stray empty lines before a request line are allowed (RFC 9112, 2.2).
    let line = loop {
        match read_line(reader, &mut budget)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => {}
            Some(line) => break line,
        }
    };
    let (method, path, http10) = parse_request_line(&line)?;
    let headers = read_headers(reader, &mut budget)?;
    Ok(Some(Request {
        method,
        path,
        http10,
        headers,
        body: Vec::new(),
    }))
}

fn parse_request_line(line: &str) -> Result<(String, String, bool), ReadError> {
    let bad = ReadError::Bad(400, "malformed request line");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphabetic());
    if !method_ok || !target.starts_with('/') {
        return Err(bad);
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(bad),
    };
    Ok((method.to_string(), target.to_string(), http10))
}

fn read_headers(
    reader: &mut BufReader<TcpStream>,
    budget: &mut u64,
) -> Result<Vec<(String, String)>, ReadError> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, budget)?.ok_or_else(eof)?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() == MAX_HEADERS {
            return Err(ReadError::Bad(431, "too many headers"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Bad(400, "malformed header"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(ReadError::Bad(400, "malformed header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
}

/// One line without its CRLF, within `budget` bytes; `None` at end of input.
fn read_line(
    reader: &mut BufReader<TcpStream>,
    budget: &mut u64,
) -> Result<Option<String>, ReadError> {
    let mut line = Vec::new();
    let read = reader.by_ref().take(*budget).read_until(b'\n', &mut line)?;
    *budget -= read as u64;
    if line.last() != Some(&b'\n') {
        if *budget == 0 {
            return Err(ReadError::Bad(431, "request head too large"));
        }
        return if read == 0 { Ok(None) } else { Err(eof()) };
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
}

/// Transfer-Encoding wins over Content-Length (RFC 9112, 6.3).
fn body_framing(request: &Request) -> Result<Framing, ReadError> {
    if let Some(encoding) = request.header("transfer-encoding") {
        let last = encoding.rsplit(',').next().unwrap_or("").trim();
        if !last.eq_ignore_ascii_case("chunked") {
            return Err(ReadError::Bad(400, "unsupported transfer-encoding"));
        }
        return Ok(Framing::Chunked);
    }
    let mut length = None;
    for (name, value) in &request.headers {
        if name != "content-length" {
            continue;
        }
        let parsed: usize = value
            .parse()
            .map_err(|_| ReadError::Bad(400, "malformed content-length"))?;
        if length.is_some_and(|seen| seen != parsed) {
            return Err(ReadError::Bad(400, "conflicting content-length"));
        }
        length = Some(parsed);
    }
    match length {
        None | Some(0) => Ok(Framing::Empty),
        Some(len) if len > MAX_BODY_BYTES => Err(ReadError::Bad(413, "body too large")),
        Some(len) => Ok(Framing::Length(len)),
    }
}

fn read_exact_body(reader: &mut BufReader<TcpStream>, len: usize) -> Result<Vec<u8>, ReadError> {
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(body)
}

fn read_chunked_body(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let size = read_chunk_size(reader)?;
        if size == 0 {
            skip_trailers(reader)?;
            return Ok(body);
        }
        let end = body
            .len()
            .checked_add(size)
            .filter(|end| *end <= MAX_BODY_BYTES)
            .ok_or(ReadError::Bad(413, "body too large"))?;
        let start = body.len();
        body.resize(end, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf)?;
        if crlf != *b"\r\n" {
            return Err(ReadError::Bad(400, "malformed chunk"));
        }
    }
}

fn read_chunk_size(reader: &mut BufReader<TcpStream>) -> Result<usize, ReadError> {
    let mut budget = 1024;
    let line = read_line(reader, &mut budget)?.ok_or_else(eof)?;
    let digits = line.split(';').next().unwrap_or("").trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ReadError::Bad(400, "malformed chunk size"));
    }
    usize::from_str_radix(digits, 16).map_err(|_| ReadError::Bad(413, "body too large"))
}

fn skip_trailers(reader: &mut BufReader<TcpStream>) -> Result<(), ReadError> {
    let mut budget = MAX_HEAD_BYTES;
    loop {
        let line = read_line(reader, &mut budget)?.ok_or_else(eof)?;
        if line.is_empty() {
            return Ok(());
        }
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}
