//! A request body sent with `transfer-encoding: chunked` (RFC 9112 7.1), read strictly and
//! within bounds.
//!
//! failover-proxy: tiny_http 0.12 used `chunked_transfer`'s decoder, which kept a
//! chunk-size line of any length in memory (300 MiB of digits from one connection was
//! 300 MiB of resident memory, outside any body limit), took `+1f` and spaces around the
//! digits, and reported the end of the body when the connection ended in the middle of a
//! chunk, so that a body cut short was passed on as if whole.

use std::io::{self, ErrorKind, Read};

/// The longest chunk-size line, extensions included, line end excluded.
const MAX_SIZE_LINE: usize = 4096;
/// A chunk size has at most this many hex digits (64 bits).
const MAX_SIZE_DIGITS: usize = 16;

pub struct ChunkedReader<R> {
    source: R,
    /// Bytes left in the chunk being read; None between chunks.
    left: Option<u64>,
    /// The last chunk and the final line end were read.
    done: bool,
}

fn malformed(why: &'static str) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, why)
}

impl<R: Read> ChunkedReader<R> {
    pub fn new(source: R) -> ChunkedReader<R> {
        ChunkedReader {
            source,
            left: None,
            done: false,
        }
    }

    /// One read of the source; its end, before the body's, is an error.
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.source.read(buf) {
                Ok(0) => {
                    let why = "the connection ended inside a chunked body";
                    return Err(io::Error::new(ErrorKind::UnexpectedEof, why));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn byte(&mut self) -> io::Result<u8> {
        let mut byte = [0u8; 1];
        self.read_some(&mut byte)?;
        Ok(byte[0])
    }

    /// CR LF, nothing else.
    fn line_end(&mut self) -> io::Result<()> {
        match (self.byte()?, self.byte()?) {
            (b'\r', b'\n') => Ok(()),
            _ => Err(malformed("a chunk does not end with CR LF")),
        }
    }

    /// `1*HEXDIG *( BWS ";" extension ) CRLF`: the size; extensions are skipped.
    fn size_line(&mut self) -> io::Result<u64> {
        let bad = || malformed("a chunk-size line is malformed");
        let (mut size, mut digits, mut part) = (0u64, 0, Part::Digits);
        for _ in 0..=MAX_SIZE_LINE {
            let byte = self.byte()?;
            match (part, byte) {
                (_, b'\r') if digits > 0 => {
                    return match self.byte()? {
                        b'\n' => Ok(size),
                        _ => Err(bad()),
                    };
                }
                (Part::Digits | Part::Space, b';') if digits > 0 => part = Part::Extension,
                (Part::Digits | Part::Space, b' ' | b'\t') if digits > 0 => part = Part::Space,
                (Part::Extension, b' ' | b'\t' | b'!'..=b'~') => {}
                (Part::Digits, _) if digits < MAX_SIZE_DIGITS => {
                    let digit = (byte as char).to_digit(16).ok_or_else(bad)?;
                    size = size << 4 | u64::from(digit);
                    digits += 1;
                }
                _ => return Err(bad()),
            }
        }
        Err(malformed("a chunk-size line is longer than 4 KiB"))
    }
}

/// Where a chunk-size line is being read.
#[derive(Clone, Copy)]
enum Part {
    Digits,
    /// Spaces after the digits: only `;` or the line end may follow.
    Space,
    Extension,
}

impl<R: Read> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let left = match self.left {
            Some(left) => left,
            None => match self.size_line()? {
                0 => {
                    // No trailer fields: the body ends with an empty line.
                    self.line_end()?;
                    self.done = true;
                    return Ok(0);
                }
                size => size,
            },
        };
        let want = std::convert::TryFrom::try_from(left)
            .map_or(buf.len(), |left: usize| left.min(buf.len()));
        let read = self.read_some(&mut buf[..want])?;
        let left = left - read as u64;
        self.left = if left == 0 {
            self.line_end()?;
            None
        } else {
            Some(left)
        };
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::ChunkedReader;
    use std::io::{ErrorKind, Read};

    fn decode(body: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ChunkedReader::new(body).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn chunks_with_extensions_and_upper_case_sizes_are_joined() {
        let body = b"5\r\nhello\r\n1A ; name=value\r\n..........................\r\n0\r\n\r\nNEXT";
        let mut reader = ChunkedReader::new(&body[..]);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        assert_eq!(out, [&b"hello"[..], &[b'.'; 26]].concat());
        // Nothing past the body was read.
        assert_eq!(reader.source, b"NEXT");
    }

    #[test]
    fn malformed_size_lines_are_refused() {
        for body in [
            &b"+5\r\nhello\r\n0\r\n\r\n"[..],
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"10000000000000005\r\nhello\r\n0\r\n\r\n",
            b"5;\x01\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhello\r\n0\r\ntrailer: x\r\n\r\n",
        ] {
            let err = decode(body).expect_err(&String::from_utf8_lossy(body));
            assert_eq!(err.kind(), ErrorKind::InvalidData, "{body:?}");
        }
    }

    #[test]
    fn a_size_line_is_bounded_however_long_it_goes_on() {
        let mut body = b"5;".to_vec();
        body.extend(std::iter::repeat_n(b'a', 1 << 20));
        let err = decode(&body).unwrap_err();
        assert_eq!(err.to_string(), "a chunk-size line is longer than 4 KiB");
        let digits = vec![b'0'; 1 << 20];
        assert_eq!(decode(&digits).unwrap_err().kind(), ErrorKind::InvalidData);
    }

    #[test]
    fn a_body_cut_short_anywhere_is_an_error_not_an_end() {
        let whole = b"5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(decode(whole).unwrap(), b"hello");
        for cut in 0..whole.len() {
            let err = decode(&whole[..cut]).expect_err(&format!("cut at {cut}"));
            assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "cut at {cut}");
        }
    }
}
