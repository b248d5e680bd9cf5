//! Streaming latency end to end (issue 4): time to first event and per-event delay through
//! the proxy against direct to the mock upstream, at 1 and 50 concurrent streams, from the
//! same run, quoted as the proxy's added milliseconds at p50 and p99. Prints figures and
//! asserts nothing about time.
//!
//! Each stream is `POST /v1/messages` with `"stream": true` to the project's mock, paced by
//! `x-mock-delay-ms`: 20 events, each sent 20 ms after the one before (the first 20 ms
//! after the request). A raw socket client stamps each event as it completes. Direct and
//! proxied rounds alternate, so a machine busy with something else hurts both alike.
//!
//! Run: `cargo bench --bench stream` (about 30 s).

mod common;
#[path = "../tests/support/raw.rs"]
mod raw;

use common::start_proxy;
use failover_proxy::mock::control::MockUpstream;
use raw::RawClient;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Events per stream; the mock always adds 5 around its text deltas.
const EVENTS: usize = 20;
const GAP: Duration = Duration::from_millis(20);
/// Rounds per target: one stream per round at c=1, `c` streams at once otherwise.
const SERIAL_ROUNDS: usize = 20;
const CONCURRENT_ROUNDS: usize = 4;
const CONCURRENT: usize = 50;

/// One stream as the client saw it: when the request went out, when each event completed,
/// and which event was the first content (the first `content_block_delta`).
struct Timeline {
    sent: Instant,
    events: Vec<Instant>,
    first_content: usize,
}

/// The samples of one (target, concurrency) cell, in milliseconds.
#[derive(Default)]
struct Samples {
    /// Request written → first event complete (includes the mock's 20 ms before it). The
    /// proxy holds a stream's preamble until its first content, so through the proxy the
    /// first event arrives with the first content.
    first_event: Vec<f64>,
    /// Request written → first content event complete: what a user waits for.
    first_content: Vec<f64>,
    /// Event c+k − first content event − k × 20 ms, for k ≥ 1: how late each later event
    /// is against the schedule the first content set. A delay the proxy adds to every
    /// event alike shows in `first_content` (it takes the same path), not here.
    event_delay: Vec<f64>,
    /// Event k − event k−1 after the first content: the pacing as it arrives (20 ms
    /// ideally; the preamble the proxy holds arrives at once, so it is left out).
    gap: Vec<f64>,
}

impl Samples {
    fn add(&mut self, timeline: &Timeline) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let first = timeline.events[0];
        self.first_event.push(ms(first - timeline.sent));
        let content = timeline.events[timeline.first_content];
        self.first_content.push(ms(content - timeline.sent));
        let after = &timeline.events[timeline.first_content..];
        for (k, at) in after.iter().enumerate().skip(1) {
            self.event_delay
                .push(ms(*at - content) - ms(GAP * k as u32));
            self.gap.push(ms(*at - after[k - 1]));
        }
    }
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stream_request() -> Vec<u8> {
    let deltas = (EVENTS - 5).to_string();
    let delay = GAP.as_millis().to_string();
    let controls = [
        ("x-mock-events", deltas.as_str()),
        ("x-mock-delay-ms", delay.as_str()),
    ];
    raw::messages_request(true, &controls)
}

/// One stream to `url`, start to end.
fn run_stream(url: &str, request: &[u8]) -> Timeline {
    let mut client = RawClient::connect(url);
    let sent = Instant::now();
    client.send(request);
    let head = client.read_head().expect("response head");
    assert_eq!(head.status, 200, "{head:?}");
    let mut reader = client.events();
    let mut events = Vec::with_capacity(EVENTS);
    let mut first_content = None;
    while let Some(event) = reader.next_event().expect("an event") {
        if first_content.is_none() && raw::event_name(&event) == "content_block_delta" {
            first_content = Some(events.len());
        }
        events.push(Instant::now());
    }
    assert_eq!(events.len(), EVENTS, "a whole stream");
    let first_content = first_content.expect("a content event");
    Timeline {
        sent,
        events,
        first_content,
    }
}

/// `streams` streams to `url` started together; their timelines.
fn run_round(url: &str, streams: usize) -> Vec<Timeline> {
    let request = Arc::new(stream_request());
    let start = Arc::new(Barrier::new(streams));
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let (url, request, start) = (url.to_string(), request.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                run_stream(&url, &request)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("stream thread"))
        .collect()
}

/// Alternates direct and proxied rounds of `streams` streams; samples for each.
fn measure(direct: &str, proxy: &str, streams: usize, rounds: usize) -> (Samples, Samples) {
    let (mut d, mut p) = (Samples::default(), Samples::default());
    for _ in 0..rounds {
        run_round(direct, streams).iter().for_each(|t| d.add(t));
        run_round(proxy, streams).iter().for_each(|t| p.add(t));
    }
    (d, p)
}

fn print_header() {
    println!(
        "{:<22} {:<14} {:>17} {:>17} {:>17}",
        "streams", "metric (ms)", "direct p50/p99", "proxy p50/p99", "added p50/p99"
    );
}

fn print_rows(label: &str, direct: &Samples, proxy: &Samples) {
    let rows = [
        ("first event", &direct.first_event, &proxy.first_event),
        ("first content", &direct.first_content, &proxy.first_content),
        ("event delay", &direct.event_delay, &proxy.event_delay),
        ("event gap", &direct.gap, &proxy.gap),
    ];
    for (metric, d, p) in rows {
        let (d50, d99) = (percentile(d, 50.0), percentile(d, 99.0));
        let (p50, p99) = (percentile(p, 50.0), percentile(p, 99.0));
        println!(
            "{label:<22} {metric:<14} {d50:>8.2}/{d99:<8.2} {p50:>8.2}/{p99:<8.2} {:>+8.2}/{:<+8.2}",
            p50 - d50,
            p99 - d99
        );
    }
}

fn main() {
    let started = Instant::now();
    let mock = MockUpstream::start().expect("mock upstream");
    let (server, proxy) = start_proxy(&mock, 64);
    let direct = mock.url();
    println!(
        "streams of {EVENTS} SSE events {} ms apart; proxy with its default 64 ready threads",
        GAP.as_millis()
    );
    measure(&direct, &proxy, 4, 1); // warm-up: connections, pools, page faults
    print_header();
    let (d, p) = measure(&direct, &proxy, 1, SERIAL_ROUNDS);
    print_rows("1", &d, &p);
    let (d, p) = measure(&direct, &proxy, CONCURRENT, CONCURRENT_ROUNDS);
    print_rows(&CONCURRENT.to_string(), &d, &p);
    server.shutdown(Duration::from_secs(5));
    println!("(run took {:.1} s)", started.elapsed().as_secs_f64());
}
