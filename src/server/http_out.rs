//! Writing responses to the client by hand, on the raw connection writer.
//!
//! tiny_http's own chunked encoder holds back 8 KiB before it sends anything, which stalls
//! server-sent events; so every response is written here: the head, then the body framed by
//! `content-length` or by chunks we frame ourselves, flushed after every piece.

use std::io::{self, Write};

/// How the body of a response is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `content-length: N`.
    Length(u64),
    /// `transfer-encoding: chunked`, one chunk per piece.
    Chunked,
    /// No length: the body ends when the connection closes (HTTP/1.0 clients).
    Close,
    /// A response that has no body (HEAD, 204, 304); the head keeps its headers.
    NoBody,
}

/// The client side of one exchange: the raw writer and what the client can take.
///
/// A connection whose answer cannot be taken as complete must not be used again: an
/// answer ended by the end of the connection, one that broke off, one never written (a
/// panic unwinding past it) all close the connection, and a refused request closes it
/// because its body was not read.
pub struct ClientOut {
    writer: Box<dyn Write + Send>,
    /// An HTTP/1.0 client cannot read chunks.
    pub http10: bool,
    /// A HEAD request gets a head only.
    pub head_request: bool,
    progress: Progress,
    closer: Option<Box<dyn Fn() + Send>>,
    /// The answer says `connection: close`, and the connection closes after it.
    close_after: bool,
}

/// How far the answer got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    /// Nothing written yet.
    Fresh,
    /// The head went out; the body is not complete.
    Started,
    /// A complete answer.
    Done,
}

/// A body being written: frames and flushes each piece.
pub struct BodySink<'a> {
    out: &'a mut ClientOut,
    framing: Framing,
    /// Body bytes written so far.
    written: u64,
}

impl ClientOut {
    pub fn new(writer: Box<dyn Write + Send>, http10: bool, head_request: bool) -> ClientOut {
        ClientOut {
            writer,
            http10,
            head_request,
            progress: Progress::Fresh,
            closer: None,
            close_after: false,
        }
    }

    /// `close` flushes what was written and ends the client connection.
    pub fn with_closer(mut self, close: Box<dyn Fn() + Send>) -> ClientOut {
        self.closer = Some(close);
        self
    }

    /// This answer is the connection's last: it says so in its head, and the connection
    /// closes once the answer is complete (a server that is stopping).
    pub fn close_after_answer(&mut self) {
        self.close_after = true;
    }

    /// Ends the connection after what was written: no further request is read from it.
    pub fn close(&mut self) {
        let _client_may_be_gone = self.writer.flush();
        if let Some(close) = &self.closer {
            close();
        }
    }

    /// The framing for a body of unknown length, as this client can read it.
    pub fn open_ended(&self) -> Framing {
        if self.http10 {
            Framing::Close
        } else {
            Framing::Chunked
        }
    }

    /// Writes the status line and headers (`headers` must not hold framing headers; this
    /// adds them), and returns the sink for the body. The head is flushed with the first
    /// piece of body (one packet for a small response), or by `BodySink::flush`.
    pub fn start(
        &mut self,
        status: u16,
        headers: &[(&str, &[u8])],
        framing: Framing,
    ) -> io::Result<BodySink<'_>> {
        self.progress = Progress::Started;
        let framing = if self.head_request && framing != Framing::NoBody {
            // Keep the length a GET would have had, send no body.
            self.write_head(status, headers, framing)?;
            Framing::NoBody
        } else {
            self.write_head(status, headers, framing)?;
            framing
        };
        Ok(BodySink {
            out: self,
            framing,
            written: 0,
        })
    }

    fn write_head(
        &mut self,
        status: u16,
        headers: &[(&str, &[u8])],
        framing: Framing,
    ) -> io::Result<()> {
        let mut head = Vec::with_capacity(256);
        let version = if self.http10 {
            "HTTP/1.0 "
        } else {
            "HTTP/1.1 "
        };
        head.extend_from_slice(version.as_bytes());
        push_decimal(&mut head, status.into());
        head.push(b' ');
        head.extend_from_slice(reason_phrase(status).as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        match framing {
            Framing::Length(n) => {
                head.extend_from_slice(b"content-length: ");
                push_decimal(&mut head, n);
                head.extend_from_slice(b"\r\n");
            }
            Framing::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Framing::Close => head.extend_from_slice(b"connection: close\r\n"),
            Framing::NoBody => {}
        }
        if self.close_after && framing != Framing::Close {
            head.extend_from_slice(b"connection: close\r\n");
        }
        head.extend_from_slice(b"\r\n");
        self.writer.write_all(&head)
    }

    /// A complete small response (errors, admin answers).
    pub fn send(&mut self, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
        let headers = [("content-type", content_type.as_bytes())];
        let mut sink = self.start(status, &headers, Framing::Length(body.len() as u64))?;
        sink.write_piece(body)?;
        sink.finish()
    }
}

impl BodySink<'_> {
    /// Sends what was written so far (the head, before a body that is not there yet).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.writer.flush()
    }

    /// Writes one piece and flushes it: nothing waits for a buffer to fill.
    pub fn write_piece(&mut self, piece: &[u8]) -> io::Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        let w = &mut self.out.writer;
        self.written += piece.len() as u64;
        match self.framing {
            Framing::NoBody => return Ok(()),
            Framing::Chunked => {
                write!(w, "{:x}\r\n", piece.len())?;
                w.write_all(piece)?;
                w.write_all(b"\r\n")?;
            }
            Framing::Length(_) | Framing::Close => w.write_all(piece)?,
        }
        w.flush()
    }

    /// Ends the body cleanly; a body that only the end of the connection delimits gets it.
    /// A body shorter than its `content-length` cannot end cleanly: it is aborted.
    pub fn finish(self) -> io::Result<()> {
        if self.is_short() {
            self.abort()?;
            return Err(io::Error::other(
                "the body is shorter than its content-length",
            ));
        }
        if self.framing == Framing::Chunked {
            self.out.writer.write_all(b"0\r\n\r\n")?;
        }
        self.out.writer.flush()?;
        self.out.progress = Progress::Done;
        if self.framing == Framing::Close || self.out.close_after {
            self.out.close();
        }
        Ok(())
    }

    /// Ends the body so the client cannot take it for complete: a chunked body gets a
    /// malformed chunk line (HTTP/1.1 has no other in-band way to say "broken"), so the
    /// client reports an error instead of waiting.
    pub fn abort(self) -> io::Result<()> {
        let written = match self.framing {
            Framing::Chunked => self.out.writer.write_all(b"!\r\n"),
            _ => Ok(()),
        };
        self.out.close();
        written
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// True while fewer bytes were written than the `content-length` announced.
    pub fn is_short(&self) -> bool {
        matches!(self.framing, Framing::Length(n) if self.written < n)
    }
}

impl Drop for ClientOut {
    /// An answer left incomplete (a panic, a write error, a broken body) ends the
    /// connection; one never begun gets a 500 first, so the client is not left waiting.
    fn drop(&mut self) {
        match self.progress {
            Progress::Done => {}
            Progress::Started => self.close(),
            Progress::Fresh => {
                let body = error_body("api_error", "the proxy failed to answer this request");
                let _client_may_be_gone = self.send(500, "application/json", &body);
                self.close();
            }
        }
    }
}

/// Anthropic's error shape: `{"type":"error","error":{"type":KIND,"message":MESSAGE}}`.
pub fn error_body(kind: &str, message: &str) -> Vec<u8> {
    let value = serde_json::json!({
        "type": "error",
        "error": { "type": kind, "message": message },
    });
    value.to_string().into_bytes()
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Site Overloaded",
        _ => "",
    }
}

/// Appends `n` in decimal: a head's status and length, written per answer, without the
/// formatting machinery (`write!`).
fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn decimals_are_written_whole() {
        for n in [0, 7, 200, 1_000_000, u64::MAX] {
            let mut buf = b"x".to_vec();
            push_decimal(&mut buf, n);
            assert_eq!(buf, format!("x{n}").into_bytes());
        }
    }

    /// A writer the test can read back, and a count of the closes asked for.
    #[derive(Clone, Default)]
    struct Wire(Arc<parking_lot::Mutex<Vec<u8>>>, Arc<AtomicUsize>);

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn out(wire: &Wire, http10: bool) -> ClientOut {
        let closes = wire.1.clone();
        ClientOut::new(Box::new(wire.clone()), http10, false)
            .with_closer(Box::new(move || _ = closes.fetch_add(1, Ordering::SeqCst)))
    }

    fn text(wire: &Wire) -> String {
        String::from_utf8_lossy(&wire.0.lock()).into_owned()
    }

    #[test]
    fn an_answer_never_begun_gets_a_500_and_a_close() {
        let wire = Wire::default();
        drop(out(&wire, false));
        let body = error_body("api_error", "the proxy failed to answer this request");
        let body = String::from_utf8(body).unwrap();
        assert!(text(&wire).starts_with("HTTP/1.1 500 "), "{}", text(&wire));
        assert!(
            text(&wire).ends_with(&format!("\r\n\r\n{body}")),
            "{}",
            text(&wire)
        );
        assert_eq!(wire.1.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_answer_left_half_written_closes_the_connection() {
        let wire = Wire::default();
        let mut client = out(&wire, false);
        let mut sink = client.start(200, &[], Framing::Chunked).unwrap();
        sink.write_piece(b"partial").unwrap();
        drop(client);
        assert_eq!(wire.1.load(Ordering::SeqCst), 1);
        assert!(!text(&wire).contains("0\r\n\r\n"), "{}", text(&wire));
    }

    #[test]
    fn a_complete_answer_keeps_the_connection_unless_only_a_close_can_end_it() {
        let wire = Wire::default();
        let mut client = out(&wire, false);
        client.send(200, "text/plain", b"ok").unwrap();
        drop(client);
        assert_eq!(wire.1.load(Ordering::SeqCst), 0);

        let wire = Wire::default();
        let mut client = out(&wire, true);
        let framing = client.open_ended();
        assert_eq!(framing, Framing::Close);
        let mut sink = client.start(200, &[], framing).unwrap();
        sink.write_piece(b"streamed").unwrap();
        sink.finish().unwrap();
        assert_eq!(wire.1.load(Ordering::SeqCst), 1);
        drop(client);
        assert_eq!(wire.1.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_body_shorter_than_its_content_length_is_aborted_not_finished() {
        let wire = Wire::default();
        let mut client = out(&wire, false);
        let mut sink = client.start(200, &[], Framing::Length(10)).unwrap();
        sink.write_piece(b"four").unwrap();
        assert!(sink.is_short());
        assert!(sink.finish().is_err());
        assert_eq!(wire.1.load(Ordering::SeqCst), 1);
    }
}
