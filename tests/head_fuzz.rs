//! A property test over the request-head path (issue 12): raw bytes into the real binary,
//! from a seeded generator: a failure names the case, and the same cases run every time.
//!
//! Each case is one connection: a mutated request head whose body is itself a complete
//! request, then the client's half-close. The mutations keep the head's line structure
//! (no line feed is inserted or removed) and leave the `content-length` either exact or
//! invalid, so a correct server gives at most one answer, and the request in the body
//! never runs as a request of its own. Whatever the bytes, the process never panics and
//! keeps serving. Plain garbage heads check only that last part.

use crate::support::binary::Binary;
use crate::support::raw;
use crate::support::*;
use failover_proxy::mock::fault::Fault;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};

/// A small deterministic generator (xorshift64*): the same seed gives the same cases.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// The request that must never run: the mock would record its path.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n";

/// `content-length` values that are not the exact length (`N` stands for it) in any valid
/// spelling, or are that length with leading zeros or surrounding blanks (still exact).
const LENGTHS: [&str; 16] = [
    "N",
    "0N",
    " N\t",
    "0x29",
    "+N",
    "-N",
    "N,N",
    "N N",
    "",
    "N.0",
    "NN",
    "1e3",
    "N;",
    "\u{b}N",
    "99999999999999999999999",
    "N\r",
];

const METHODS: [&str; 6] = ["POST", "GET", "P@ST", "", "POST POST", "\u{0}"];
const VERSIONS: [&str; 7] = [
    "HTTP/1.1",
    "HTTP/1.0",
    "HTTP/2.0",
    "HTTP/1.1 ",
    "http/1.1",
    "HTTP/1",
    "",
];
const EXTRA_LINES: [&str; 9] = [
    "transfer-encoding: chunked",
    "Transfer-Encoding : chunked",
    "content-length: 0",
    "content-length: N",
    " transfer-encoding: chunked",
    "transfer-encoding: identity",
    "expect: 100-continue",
    "expect: something-else",
    "x-pad: \u{7f}",
];

/// One mutated head (line ends included) carrying `SMUGGLED` as its body.
fn mutated_case(rng: &mut Rng) -> Vec<u8> {
    let n = SMUGGLED.len().to_string();
    let method = if rng.below(4) == 0 {
        rng.pick(&METHODS)
    } else {
        "POST"
    };
    let version = if rng.below(4) == 0 {
        rng.pick(&VERSIONS)
    } else {
        "HTTP/1.1"
    };
    let length = if rng.below(2) == 0 {
        rng.pick(&LENGTHS)
    } else {
        "N"
    };
    let mut lines: Vec<Vec<u8>> = vec![
        format!("{method} /v1/messages {version}").into_bytes(),
        b"host: 127.0.0.1".to_vec(),
        b"content-type: application/json".to_vec(),
        b"x-fuzz: abcdefghijklmnop".to_vec(),
    ];
    if rng.below(3) == 0 {
        let at = 1 + rng.below(lines.len());
        lines.insert(at, rng.pick(&EXTRA_LINES).replace('N', &n).into_bytes());
    }
    // Bytes are inserted, deleted or replaced outside the content-length line; a line
    // feed is never added or removed there.
    for _ in 0..rng.below(4) {
        let line = rng.below(lines.len());
        let bytes = &mut lines[line];
        let at = rng.below(bytes.len() + 1);
        let byte = loop {
            let b = rng.below(256) as u8;
            if b != b'\n' {
                break b;
            }
        };
        match rng.below(3) {
            0 => bytes.insert(at, byte),
            1 if at < bytes.len() => {
                bytes.remove(at);
            }
            _ if at < bytes.len() => bytes[at] = byte,
            _ => bytes.push(byte),
        }
    }
    let length = format!("content-length: {}", length.replace('N', &n));
    lines.insert(1, length.into_bytes());
    let mut head = lines.join(&b"\r\n"[..]);
    head.extend_from_slice(b"\r\n\r\n");
    head.extend_from_slice(SMUGGLED.as_bytes());
    head
}

/// The files of `tests/corpus/<kind>`, by name.
pub fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("a corpus file"))
        })
        .collect()
}

/// Up to 300 bytes of anything, a line feed included.
fn garbage_case(rng: &mut Rng) -> Vec<u8> {
    (0..rng.below(300)).map(|_| rng.below(256) as u8).collect()
}

/// Sends `bytes`, half-closes, and reads every answer until the proxy closes: how many
/// answers came. A malformed answer fails the test.
fn answers_to(url: &str, bytes: &[u8]) -> usize {
    let mut socket = TcpStream::connect(url.trim_start_matches("http://")).expect("connect");
    socket.set_read_timeout(Some(raw::SAFETY_TIMEOUT)).unwrap();
    // The proxy may refuse and close before it read everything: a reset is fine.
    let _may_be_refused_early = socket.write_all(bytes);
    let _may_be_closed = socket.shutdown(Shutdown::Write);
    let mut reader = BufReader::new(socket);
    let mut count = 0;
    loop {
        let mut status_line = String::new();
        match reader.read_line(&mut status_line) {
            Ok(0) => return count,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return count,
            Err(e) => panic!("no end to the answers ({count} so far): {e}"),
            Ok(_) => {}
        }
        assert!(status_line.starts_with("HTTP/1."), "{status_line:?}");
        // `100 Continue` is an interim answer, without a body.
        let interim = status_line.split(' ').nth(1) == Some("100");
        count += usize::from(!interim);
        let mut length = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("a header line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("name: value");
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse::<u64>().expect("a length"));
            }
        }
        let length = match (interim, length) {
            (true, _) => 0,
            (false, length) => length.expect("every final answer here has a content-length"),
        };
        std::io::copy(&mut reader.by_ref().take(length), &mut std::io::sink()).unwrap();
    }
}

#[test]
fn no_request_head_crashes_the_proxy_or_gets_two_answers() {
    let upstream = mock(Fault::None);
    let mut binary = Binary::serve(&[upstream.url()], json!({}));
    let seed = 0x9e37_79b9_7f4a_7c15;
    let mut rng = Rng(seed);
    for case in 0..600 {
        let bytes = mutated_case(&mut rng);
        let answers = answers_to(&binary.url, &bytes);
        let shown = String::from_utf8_lossy(&bytes);
        assert!(
            answers <= 1,
            "seed {seed:#x} case {case}: {answers} answers to {shown:?}"
        );
        let smuggled = upstream.recorded().iter().any(|r| r.path == "/smuggled");
        assert!(
            !smuggled,
            "seed {seed:#x} case {case}: the body ran as a request: {shown:?}"
        );
    }
    for _ in 0..300 {
        let bytes = garbage_case(&mut rng);
        answers_to(&binary.url, &bytes);
    }
    // The corpus (tests/corpus/heads): each as it is gets at most one answer; mutated
    // (any byte, line feeds included) it may be any number of requests, so only the
    // answers' shape and the process are checked.
    let seeds = corpus("heads");
    for (name, seed) in &seeds {
        let answers = answers_to(&binary.url, seed);
        assert!(answers <= 1, "{name}: {answers} answers");
    }
    let smuggled = upstream.recorded().iter().any(|r| r.path == "/smuggled");
    assert!(!smuggled, "a corpus case's body ran as a request");
    for (_, seed) in &seeds {
        for _ in 0..50 {
            let mut bytes = seed.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(bytes.len());
                match rng.below(3) {
                    0 => bytes[at] = rng.below(256) as u8,
                    1 => bytes.insert(at, rng.below(256) as u8),
                    _ => drop(bytes.remove(at)),
                }
            }
            answers_to(&binary.url, &bytes);
        }
    }
    assert!(binary.alive(), "the proxy died:\n{}", binary.stderr());
    assert!(!binary.stderr().contains("panicked"), "{}", binary.stderr());
    let (status, _) = post_message(&binary.url, &[]);
    assert_eq!(status, 200);
}
