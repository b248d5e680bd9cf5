//! Soak (issue 14): the real binary under mixed traffic while its upstreams cycle through
//! every fault mode. Ignored by default; run it with
//!
//! `SOAK_SECONDS=300 cargo test --release --test tests soak -- --ignored --nocapture`
//!
//! (5 minutes when `SOAK_SECONDS` is unset). Loopback only; it stops by itself. At the end:
//! every request got exactly one complete answer or a well-formed error, the request
//! counter is exact, the failure queue counted each entry once, memory is back within 10 %
//! of its value after warm-up and the threads are back near their idle count.

use crate::support::binary::Binary;
use crate::support::raw::{self, RawClient};
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The faults each flaky upstream goes through, two seconds each.
fn faults() -> Vec<Fault> {
    vec![
        Fault::None,
        Fault::Status(529),
        Fault::Hang,
        Fault::PingStall { events: 2 },
        Fault::SseCutAfter { events: 3 },
        Fault::Reset,
        Fault::SlowBody { delay_ms: 30 },
        Fault::RateLimited {
            retry_after: Some("1".into()),
        },
        Fault::SoftError200,
        Fault::SseErrorFirst,
        Fault::PingStall { events: 4 },
    ]
}

#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    errors: AtomicU64,
    abandoned: AtomicU64,
    streams: AtomicU64,
}

/// One request as a client makes it; false if the answer was not complete or well formed.
fn one_request(url: &str, stream: bool, give_up: bool, tally: &Tally) -> Result<(), String> {
    let mut client = RawClient::connect(url);
    client.set_read_timeout(Duration::from_secs(30));
    client.send(&raw::messages_request(stream, &[]));
    if give_up {
        tally.abandoned.fetch_add(1, Ordering::SeqCst);
        client.hang_up();
        return Ok(());
    }
    let head = client.read_head().map_err(|e| format!("no head: {e}"))?;
    let body = if head.is_chunked() {
        client.read_chunked_body()
    } else {
        let length = head.content_length().ok_or("no framing")?;
        client.read_exact_body(length)
    };
    tally.answered.fetch_add(1, Ordering::SeqCst);
    let body = match body {
        Ok(body) => body,
        // A stream or body broken after the commit point: cut, never hung.
        Err(_) if head.status == 200 => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", head.status)),
    };
    if head.status != 200 {
        tally.errors.fetch_add(1, Ordering::SeqCst);
        let error: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("{}: not JSON: {e}", head.status))?;
        return match error["type"] == "error" {
            true => Ok(()),
            false => Err(format!("{}: not an error shape: {error}", head.status)),
        };
    }
    if head.is_chunked() {
        tally.streams.fetch_add(1, Ordering::SeqCst);
        let events = raw::split_events(&body);
        let last = events
            .last()
            .map(|e| raw::event_name(e))
            .unwrap_or_default();
        if last != "message_stop" && last != "error" {
            return Err(format!("a stream ending with {last:?}"));
        }
    }
    Ok(())
}

fn rss_kib(binary: &Binary) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", binary.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
#[ignore = "a long soak: SOAK_SECONDS=300 cargo test --release --test tests soak -- --ignored --nocapture"]
fn soak_mixed_traffic_through_cycling_faults() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let flaky: Vec<MockUpstream> = (0..2).map(|_| mock(Fault::None)).collect();
    let steady = mock(Fault::None);
    let urls = vec![flaky[0].url(), flaky[1].url(), steady.url()];
    // Short waits, so that a hung or stalled upstream costs seconds, not minutes.
    let endpoints: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| endpoint_json(i, url, json!({"timeout": 3, "stream_timeout": 2})))
        .collect();
    let binary = Binary::serve(
        &urls,
        json!({"idle_timeout": 1, "recovery_interval": 0.5, "recovery_max_interval": 1,
               "probe": {"kind": "http"}, "rate_limit_cooldown": 1, "workers": 8,
               "endpoints": endpoints}),
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let problems = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut injected = vec![0u64; faults().len()];
    let (warm_rss, warm_threads) = std::thread::scope(|scope| {
        for client in 0..8 {
            let (url, stop, tally, problems) = (
                binary.url.clone(),
                stop.clone(),
                tally.clone(),
                problems.clone(),
            );
            scope.spawn(move || {
                let mut n = client as u64;
                while !stop.load(Ordering::SeqCst) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let stream = n >> 60 < 8;
                    let give_up = (n >> 40).is_multiple_of(10);
                    if let Err(problem) = one_request(&url, stream, give_up, &tally) {
                        problems.lock().push(problem);
                    }
                }
            });
        }
        let mut warm = None;
        let mut round = 0;
        while Instant::now() < deadline {
            for (i, upstream) in flaky.iter().enumerate() {
                let index = (round + i * 5) % faults().len();
                injected[index] += 1;
                upstream.set_fault(faults()[index].clone());
            }
            round += 1;
            std::thread::sleep(Duration::from_secs(2));
            // Warmed up: every fault seen once, pools and allocator arenas at their size.
            let warm_up = Duration::from_secs(30.min(seconds / 3));
            if warm.is_none() && started.elapsed() >= warm_up {
                warm = Some((rss_kib(&binary), binary.threads()));
            }
        }
        stop.store(true, Ordering::SeqCst);
        flaky.iter().for_each(|u| u.set_fault(Fault::None));
        warm.expect("a warm-up sample")
    });
    println!("after warm-up: RSS {warm_rss} KiB, {warm_threads} threads");
    let answered = tally.answered.load(Ordering::SeqCst);
    let abandoned = tally.abandoned.load(Ordering::SeqCst);
    let problems = problems.lock().clone();
    // Everything in flight ends: gone clients' waits end within a second.
    wait_until("no request in flight", || {
        let stats = binary.stats();
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["in_flight"] == 0)
    });
    // A request between two attempts (a back-off) is counted when it ends.
    within(Duration::from_secs(10), || {
        binary.stats()["total_requests"] == answered + abandoned
    });
    let stats = binary.stats();
    within(Duration::from_secs(15), || binary.threads() <= 8 + 16);
    let (rss, threads) = (rss_kib(&binary), binary.threads());
    let entries = binary.log().matches("entered the failure queue").count() as u64;
    println!(
        "{seconds} s: {answered} answered ({} errors, {} streams), {abandoned} abandoned, \
         faults injected {injected:?}, {} problems; end: RSS {rss} KiB, {threads} threads; \
         queue entries {entries}",
        tally.errors.load(Ordering::SeqCst),
        tally.streams.load(Ordering::SeqCst),
        problems.len()
    );
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(stats["total_requests"], answered + abandoned);
    assert_eq!(stats["failure_queue_stats"]["total_failed"], entries);
    assert!(threads <= 8 + 16, "{threads} threads after the soak");
    assert!(
        rss * 10 <= warm_rss * 11,
        "RSS {rss} KiB after, {warm_rss} KiB after warm-up"
    );
}
