//! CPU work per proxied request, counted rather than timed: the instructions the proxy
//! executes for one request (valgrind's callgrind, the difference of two runs of different
//! lengths, so start-up and shutdown cancel out), beside nginx's for the same requests when
//! it is installed (one process, proxying to the same mock: `common::nginx`'s config). Timings on this shared 2-core
//! machine move by a quarter from run to run; these counts move by well under 1 %, so a
//! change's effect on the proxy's own work shows at once. They do not count the kernel's
//! work (system calls, scheduling), which the `throughput` bench's timings include.
//!
//! `cargo bench --bench instructions` (about a minute; prints a note and exits when valgrind
//! is not installed: `apt-get install valgrind`).

#[allow(dead_code)]
mod common;

use failover_proxy::mock::control::MockUpstream;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SHORT: &str = r#"{"model":"claude-bench","max_tokens":64,"messages":[{"role":"user","content":"Hello, this is a benchmark request of roughly three hundred bytes, about the size of a short chat turn sent by a client. It asks for nothing in particular and says so at some length."}]}"#;

/// The headers Claude Code sends beside `content-type` (its API key replaced).
const CLAUDE_CODE: [(&str, &str); 16] = [
    ("accept", "application/json"),
    (
        "anthropic-beta",
        "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14",
    ),
    ("anthropic-dangerous-direct-browser-access", "true"),
    ("anthropic-version", "2023-06-01"),
    ("user-agent", "claude-cli/2.0.14 (external, cli)"),
    ("x-app", "cli"),
    ("x-stainless-arch", "x64"),
    ("x-stainless-lang", "js"),
    ("x-stainless-os", "Linux"),
    ("x-stainless-package-version", "0.60.0"),
    ("x-stainless-retry-count", "0"),
    ("x-stainless-runtime", "node"),
    ("x-stainless-runtime-version", "v22.14.0"),
    ("x-stainless-timeout", "600"),
    (
        "x-claude-code-session-id",
        "5f0e2c1a-1111-2222-3333-444455556666",
    ),
    ("x-api-key", "sk-client-key"),
];

struct Case {
    name: &'static str,
    /// The two runs' lengths (a multiple of 4: four clients share them).
    runs: (usize, usize),
    headers: &'static [(&'static str, &'static str)],
    body: String,
    log_level: &'static str,
}

fn main() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("valgrind is not installed (apt-get install valgrind): nothing to count");
        return;
    }
    let mock = MockUpstream::start().expect("mock");
    let cases = [
        Case {
            name: "300 B body, 3 headers",
            runs: (200, 1000),
            headers: &[],
            body: SHORT.to_string(),
            log_level: "warn",
        },
        Case {
            name: "300 B body, Claude Code's 17 headers",
            runs: (200, 1000),
            headers: &CLAUDE_CODE,
            body: SHORT.to_string(),
            log_level: "warn",
        },
        Case {
            name: "the same, logged (--log-level info)",
            runs: (200, 1000),
            headers: &CLAUDE_CODE,
            body: SHORT.to_string(),
            log_level: "info",
        },
        Case {
            name: "100 KB body, Claude Code's headers",
            runs: (40, 200),
            headers: &CLAUDE_CODE,
            body: conversation(100 * 1024),
            log_level: "warn",
        },
    ];
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    println!("instructions per request (the proxy's own work; not the kernel's)");
    println!(
        "{:<40} {:>14} {:>10} {:>8}",
        "request", "failover-proxy", "nginx", "ratio"
    );
    for case in &cases {
        let proxy = per_request(case, &Target::Proxy(mock.url()));
        let beside = nginx
            .filter(|_| case.log_level == "warn")
            .map(|binary| per_request(case, &Target::Nginx(binary, mock.addr())));
        let (n, ratio) = beside.map_or((String::from("-"), String::from("-")), |n| {
            (n.to_string(), format!("{:.2}", proxy as f64 / n as f64))
        });
        println!("{:<40} {proxy:>14} {n:>10} {ratio:>8}", case.name);
    }
    if nginx.is_none() {
        println!("(nginx is not installed: apt-get install nginx-light for its column)");
    }
}

/// What runs under valgrind: the proxy (in front of the mock at this URL), or nginx (this
/// binary, in front of the mock at this address).
enum Target {
    Proxy(String),
    Nginx(&'static str, SocketAddr),
}

fn per_request(case: &Case, target: &Target) -> u64 {
    let (few, many) = case.runs;
    let counted = count(case, many, target) - count(case, few, target);
    counted / (many - few) as u64
}

/// A JSON request of about `size` bytes, shaped like a long conversation.
fn conversation(size: usize) -> String {
    let turn = "The quick brown fox jumps over the lazy dog, \\\"quoted\\\". ".repeat(40);
    let mut messages = Vec::new();
    while messages.len() * turn.len() < size {
        let role = ["user", "assistant"][messages.len() % 2];
        messages.push(format!(
            r#"{{"role":"{role}","content":[{{"type":"text","text":"{turn}"}}]}}"#
        ));
    }
    format!(
        r#"{{"model":"claude-bench","max_tokens":64,"messages":[{}],"metadata":{{"user_id":"user_1_account_2_session_3"}}}}"#,
        messages.join(",")
    )
}

/// Instructions `target` executed (start to exit) serving `requests` requests of `case`.
fn count(case: &Case, requests: usize, target: &Target) -> u64 {
    let dir = std::env::temp_dir().join(format!("fp-instr-{}-{requests}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let out = dir.join("callgrind.out");
    let addr = free_port();
    let mut command = Command::new("valgrind");
    command
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()));
    match target {
        Target::Proxy(mock) => {
            let config = dir.join("config.json");
            let endpoints = serde_json::json!({"endpoints": [{"name": "mock",
                "base_url": mock, "api_key": "sk-bench-0123456789"}]});
            std::fs::write(&config, endpoints.to_string()).expect("config");
            command
                .arg(env!("CARGO_BIN_EXE_failover-proxy"))
                .args(["serve", "--log-level", case.log_level, "--listen"])
                .arg(addr.to_string())
                .arg("--config")
                .arg(&config);
        }
        Target::Nginx(binary, mock) => {
            let one_process = "daemon off; master_process off;";
            let conf = common::nginx::conf(*mock, addr, &dir, one_process);
            std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
            command
                .arg(binary)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-p")
                .arg(&dir);
        }
    }
    let mut process = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("valgrind");
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens under valgrind");
        std::thread::sleep(Duration::from_millis(50));
    }
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let request = request(case);
            std::thread::spawn(move || send(addr, &request, requests / 4))
        })
        .collect();
    clients.into_iter().for_each(|c| c.join().expect("client"));
    let _ = Command::new("kill")
        .args(["-INT", &process.id().to_string()])
        .status();
    let _ = process.wait();
    let text = std::fs::read_to_string(&out).expect("callgrind's output");
    let _ = std::fs::remove_dir_all(&dir);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|n| n.trim().parse().ok())
        .expect("callgrind's totals")
}

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address")
}

fn request(case: &Case) -> Vec<u8> {
    let mut head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        case.body.len()
    );
    for (name, value) in case.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    [head.as_bytes(), case.body.as_bytes()].concat()
}

/// `count` requests, one after another on one keep-alive connection; each must be a 200.
fn send(addr: SocketAddr, request: &[u8], count: usize) {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    for _ in 0..count {
        writer.write_all(request).expect("send");
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("a length");
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).expect("body");
    }
}
