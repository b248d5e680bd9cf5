//! Short-request throughput and latency: direct to the mock upstream, through the proxy,
//! and through nginx when it is installed, at 1, 16 and 64 keep-alive clients, in the same
//! run. Prints figures; asserts nothing about time.
//!
//! Two tables: the bench's own clients (a thread each, in this process), then, when wrk
//! is installed, wrk's (two event-loop threads in a process of their own: how PERF-NOTES.md
//! and issue 13's targets measured), three rounds interleaved, medians.
//!
//! `cargo bench --bench throughput` (set `SECONDS=N` for longer cells; default 3).

mod common;

use failover_proxy::mock::control::MockUpstream;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const BODY: &str = r#"{"model":"claude-bench","max_tokens":64,"messages":[{"role":"user","content":"Hello, this is a benchmark request of roughly three hundred bytes, about the size of a short chat turn sent by a client. It asks for nothing in particular and says so at some length."}]}"#;

fn main() {
    // BENCH_LOG=FILE: the proxy logs as `serve --log-file FILE` does (and to stderr).
    if let Ok(path) = std::env::var("BENCH_LOG") {
        failover_proxy::cli::logging::init(log::LevelFilter::Info, Some(path.as_ref()))
            .expect("logger");
    }
    let seconds: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let upstream = MockUpstream::start().expect("mock");
    let workers = std::env::var("WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64usize);
    let (server, _) = common::start_proxy(&upstream, workers);
    println!(
        "short requests ({} B body), {seconds} s per cell, proxy workers {workers}",
        BODY.len()
    );
    let nginx = common::nginx::Nginx::start(upstream.addr());
    println!(
        "{:>8} {:>12} {:>10} {:>10}   {:>12} {:>10} {:>10}   {:>7}   {:>10} {:>8} {:>8}   {:>9} {:>9}",
        "clients",
        "direct rps",
        "p50 µs",
        "p99 µs",
        "proxy rps",
        "p50 µs",
        "p99 µs",
        "ratio",
        "nginx rps",
        "p50 µs",
        "p99 µs",
        "vs nginx",
        "p99 vs"
    );
    let length = Duration::from_secs(seconds);
    for clients in [1, 16, 64] {
        let direct = run(upstream.addr(), clients, length);
        let proxied = run(server.addr(), clients, length);
        let beside = nginx.as_ref().map(|n| run(n.addr, clients, length));
        let (n_rps, n50, n99) = beside
            .as_ref()
            .map_or((f64::NAN, 0, 0), |n| (n.rps, n.p50, n.p99));
        println!(
            "{clients:>8} {:>12.0} {:>10} {:>10}   {:>12.0} {:>10} {:>10}   {:>7.2}   {n_rps:>10.0} {n50:>8} {n99:>8}   {:>9.2} {:>9.2}",
            direct.rps,
            direct.p50,
            direct.p99,
            proxied.rps,
            proxied.p50,
            proxied.p99,
            proxied.rps / direct.rps,
            proxied.rps / n_rps,
            proxied.p99 as f64 / n99 as f64,
        );
    }
    if nginx.is_none() {
        println!("(nginx is not installed: apt-get install nginx-light for its columns)");
    }
    println!(
        "upstream connections accepted: {}",
        upstream.connections_accepted()
    );
    for clients in [1, 16] {
        let d = run(upstream.addr(), clients, Duration::from_secs(seconds));
        let p = run(server.addr(), clients, Duration::from_secs(seconds));
        println!(
            "max latency at {clients} clients: direct {} µs, proxy {} µs",
            d.max, p.max
        );
    }
    let mut targets = vec![("direct", upstream.addr()), ("proxy", server.addr())];
    targets.extend(nginx.as_ref().map(|n| ("nginx", n.addr)));
    with_wrk(&targets, seconds);
    server.shutdown(Duration::from_secs(5));
}

/// The wrk table: for each connection count, each target's median req/s, p50 and p99 of
/// three rounds (a round runs every cell once, so a noisy minute touches all alike), and
/// the proxy's ratios to nginx.
fn with_wrk(targets: &[(&str, SocketAddr)], seconds: u64) {
    use common::wrk;
    if !wrk::installed() {
        println!(
            "(wrk is not installed: apt-get install wrk for the table measured as PERF-NOTES.md was)"
        );
        return;
    }
    const COUNTS: [usize; 3] = [1, 16, 64];
    let mut cells: Vec<Vec<Vec<wrk::Cell>>> = COUNTS
        .iter()
        .map(|_| targets.iter().map(|_| Vec::new()).collect())
        .collect();
    for _round in 0..3 {
        for (c, &connections) in COUNTS.iter().enumerate() {
            for (t, (_, addr)) in targets.iter().enumerate() {
                cells[c][t].extend(wrk::run(*addr, connections, seconds, BODY));
            }
        }
    }
    println!("\nwrk -t2 --latency, {seconds} s per cell, medians of 3 interleaved rounds:");
    println!(
        "{:>5} {:>8} {:>10} {:>9} {:>9}",
        "conns", "target", "rps", "p50 µs", "p99 µs"
    );
    for (c, &connections) in COUNTS.iter().enumerate() {
        let medians: Vec<Option<[f64; 3]>> = cells[c].iter().map(|runs| medians(runs)).collect();
        for ((name, _), m) in targets.iter().zip(&medians) {
            match m {
                Some([rps, p50, p99]) => {
                    println!("{connections:>5} {name:>8} {rps:>10.0} {p50:>9.0} {p99:>9.0}")
                }
                None => println!("{connections:>5} {name:>8}   (wrk failed or saw errors)"),
            }
        }
        if let (Some(Some(d)), Some(Some(p)), Some(Some(n))) =
            (medians.first(), medians.get(1), medians.get(2))
        {
            println!(
                "{connections:>5} proxy: {:.2}x nginx's rps, p99 {:.2}x nginx's, p50 +{:.0} µs over direct (nginx +{:.0})",
                p[0] / n[0],
                p[2] / n[2],
                p[1] - d[1],
                n[1] - d[1],
            );
        }
    }
}

/// The median rps, p50 and p99 of some runs; None without runs.
fn medians(runs: &[common::wrk::Cell]) -> Option<[f64; 3]> {
    let median = |f: fn(&common::wrk::Cell) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    Some([median(|c| c.rps)?, median(|c| c.p50)?, median(|c| c.p99)?])
}

struct Cell {
    rps: f64,
    p50: u128,
    p99: u128,
    max: u128,
}

fn run(addr: SocketAddr, clients: usize, length: Duration) -> Cell {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || client(addr, &stop))
        })
        .collect();
    std::thread::sleep(length);
    stop.store(true, Ordering::SeqCst);
    let mut latencies: Vec<u128> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Cell {
        rps: latencies.len() as f64 / length.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
        max: latencies.last().copied().unwrap_or(0),
    }
}

/// One keep-alive connection sending requests back to back; latencies in µs.
fn client(addr: SocketAddr, stop: &AtomicBool) -> Vec<u128> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).ok();
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut latencies = Vec::with_capacity(100_000);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        if writer.write_all(request.as_bytes()).is_err() || !read_response(&mut reader) {
            break;
        }
        latencies.push(started.elapsed().as_micros());
    }
    latencies
}

/// Reads one Content-Length response; false on any error.
fn read_response(reader: &mut BufReader<TcpStream>) -> bool {
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).is_ok()
}
