//! `failover-proxy demo`: the whole lifecycle in about 12 seconds, with no config and no
//! network. Three mock upstreams on loopback (one healthy, one flaky, one dead), the real
//! proxy in front of them, and four client threads sending streaming and non-streaming
//! requests through it. A live view shows each endpoint's state; the endpoints' state
//! changes (quarantine, cooldown, recovery) are printed as they happen; a summary follows.
//!
//! The script: `flaky` and `dead` share priority 1, `healthy` is the priority-2 backup.
//! `dead` resets every connection and is quarantined within the first requests. At 3 s
//! `flaky` starts answering 529 and is quarantined too, so traffic fails over to `healthy`;
//! at 6 s `flaky` is well again, a probe brings it back, and traffic returns to it.

use crate::config::validated::{Config, Overrides};
use crate::mock::control::MockUpstream;
use crate::mock::fault::Fault;
use crate::server::listen::Server;
use crate::state::shared::State;
use parking_lot::Mutex;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const RUN_FOR: Duration = Duration::from_secs(12);
const FLAKY_FAILS_AT: Duration = Duration::from_secs(3);
const FLAKY_HEALS_AT: Duration = Duration::from_secs(6);
const CLIENTS: usize = 4;

/// What the demo's clients saw.
#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    errors: AtomicU64,
    streams: AtomicU64,
}

pub fn run() -> Result<(), String> {
    let start = Instant::now();
    let events = install_event_printer(start);
    let mock = |name: &str, fault: Fault| {
        MockUpstream::start_named(name, fault)
            .map_err(|e| format!("cannot start a mock upstream: {e}"))
    };
    let flaky = mock("flaky", Fault::None)?;
    let dead = mock("dead", Fault::Reset)?;
    let healthy = mock("healthy", Fault::None)?;
    let state = Arc::new(State::new(demo_config(&flaky, &dead, &healthy)?)?);
    let server = Server::start(state.clone())?;
    let url = format!("http://{}", server.addr());
    println!("failover-proxy demo: proxy on {url}, three mock upstreams on loopback");
    println!(
        "  flaky  (priority 1) {}  healthy now, fails at {}s, heals at {}s",
        flaky.url(),
        FLAKY_FAILS_AT.as_secs(),
        FLAKY_HEALS_AT.as_secs()
    );
    println!(
        "  dead   (priority 1) {}  resets every connection",
        dead.url()
    );
    println!("  healthy(priority 2) {}  the backup", healthy.url());
    println!();
    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (url, tally, done) = (url.clone(), tally.clone(), done.clone());
            std::thread::spawn(move || client_loop(i, &url, &tally, &done))
        })
        .collect();
    let live = std::io::stdout().is_terminal();
    let mut flaky_failing = false;
    while start.elapsed() < RUN_FOR {
        std::thread::sleep(Duration::from_millis(500));
        let t = start.elapsed();
        if !flaky_failing && t >= FLAKY_FAILS_AT && t < FLAKY_HEALS_AT {
            flaky.set_fault(Fault::Status(529));
            flaky_failing = true;
            events.lock().push(format!(
                "{:>5.1}s  [demo] flaky starts answering 529 overloaded",
                t.as_secs_f64()
            ));
        } else if flaky_failing && t >= FLAKY_HEALS_AT {
            flaky.set_fault(Fault::None);
            flaky_failing = false;
            events.lock().push(format!(
                "{:>5.1}s  [demo] flaky is healthy again (the proxy does not know yet)",
                t.as_secs_f64()
            ));
        }
        show(&state, &events, &tally, t, live);
    }
    done.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.join();
    }
    server.shutdown(Duration::from_secs(5));
    summary(&state, &tally)
}

fn demo_config(
    flaky: &MockUpstream,
    dead: &MockUpstream,
    healthy: &MockUpstream,
) -> Result<Config, String> {
    let config = json!({
        "listen": "127.0.0.1:0",
        "workers": 8,
        "strategy": "round_robin",
        "recovery_interval": 0.5,
        "recovery_max_interval": 2,
        "connect_timeout": 2,
        "idle_timeout": 5,
        "probe": { "kind": "conversation", "model": "claude-demo", "max_tokens": 20 },
        "endpoints": [
            { "name": "flaky", "base_url": flaky.url(), "api_key": "sk-demo-flaky-0000000000000000", "priority": 1, "timeout": 5 },
            { "name": "dead", "base_url": dead.url(), "api_key": "sk-demo-dead-00000000000000000", "priority": 1, "timeout": 5 },
            { "name": "healthy", "base_url": healthy.url(), "api_key": "sk-demo-healthy-00000000000000", "priority": 2, "timeout": 5 },
        ],
    });
    Config::from_json(&config.to_string(), &Overrides::default(), &|_| None)
        .map_err(|e| format!("demo config: {e}"))
}

/// Each client alternates a plain and a streaming request, ~20 a second.
fn client_loop(i: usize, url: &str, tally: &Tally, done: &AtomicBool) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .new_agent();
    let mut n = 0usize;
    while !done.load(Ordering::SeqCst) {
        let stream = (n + i) % 2 == 1;
        let body = json!({
            "model": "claude-demo", "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": format!("demo request {i}-{n}")}],
        })
        .to_string();
        let ok = agent
            .post(format!("{url}/v1/messages"))
            .header("content-type", "application/json")
            .send(body.as_str())
            .ok()
            .and_then(|mut r| {
                let complete = r.body_mut().read_to_vec().ok()?;
                let good = r.status() == 200
                    && !(stream && String::from_utf8_lossy(&complete).contains("event: error"));
                Some(good)
            })
            .unwrap_or(false);
        if ok {
            tally.answered.fetch_add(1, Ordering::Relaxed);
            tally.streams.fetch_add(stream as u64, Ordering::Relaxed);
        } else {
            tally.errors.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// State-change log lines (quarantine, cooldown, recovery) go to the live view; per-request
/// lines are left out.
struct EventPrinter {
    start: Instant,
    lines: Arc<Mutex<Vec<String>>>,
}

impl log::Log for EventPrinter {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, record: &log::Record) {
        let text = record.args().to_string();
        let wanted = [
            "entered the failure queue",
            "recovered",
            "cools down",
            "still failing",
            "no endpoint is eligible",
        ];
        if wanted.iter().any(|w| text.contains(w)) {
            let t = self.start.elapsed().as_secs_f64();
            self.lines.lock().push(format!("{t:>5.1}s  {text}"));
        }
    }
    fn flush(&self) {}
}

fn install_event_printer(start: Instant) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let printer = EventPrinter {
        start,
        lines: lines.clone(),
    };
    if log::set_boxed_logger(Box::new(printer)).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    lines
}

fn show(state: &State, events: &Mutex<Vec<String>>, tally: &Tally, t: Duration, live: bool) {
    let new_events: Vec<String> = std::mem::take(&mut *events.lock());
    let mut stdout = std::io::stdout().lock();
    if live {
        // Events scroll above; the table is redrawn in place below them.
        let _ = write!(stdout, "\x1b[J");
    }
    for line in new_events {
        let _ = writeln!(stdout, "{line}");
    }
    if live {
        let screen = table(state, tally, t);
        let _ = write!(stdout, "{screen}\x1b[{}A", screen.lines().count());
    } else if t.as_millis() % 2000 < 500 {
        // Into a file or pipe: one line every 2 s instead of a redrawn table.
        let _ = writeln!(stdout, "{}", one_line(state, tally, t));
    }
    let _ = stdout.flush();
}

/// Each endpoint's state as the live view names it.
fn states(state: &State) -> Vec<(String, &'static str, u64, u64, u64)> {
    let now = Instant::now();
    state
        .current()
        .endpoints
        .iter()
        .map(|e| {
            let h = e.health();
            let word = if state.queue.contains(e.id()) {
                "QUEUED"
            } else if e.is_cooling(now) {
                "cooling"
            } else {
                h.status.as_str()
            };
            (
                e.name().to_string(),
                word,
                h.total_requests,
                h.failed_requests,
                e.probes(),
            )
        })
        .collect()
}

fn headline(state: &State, tally: &Tally, t: Duration) -> String {
    format!(
        "t={:>4.1}s  answered {}  client errors {}  failovers {}",
        t.as_secs_f64(),
        tally.answered.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
        state.counters.failovers.load(Ordering::Relaxed),
    )
}

fn table(state: &State, tally: &Tally, t: Duration) -> String {
    let mut screen = headline(state, tally, t) + "\n";
    screen += &format!(
        "  {:<8} {:<10} {:>9} {:>8} {:>7}\n",
        "endpoint", "state", "attempts", "failed", "probes"
    );
    for (name, word, attempts, failed, probes) in states(state) {
        screen += &format!("  {name:<8} {word:<10} {attempts:>9} {failed:>8} {probes:>7}\n");
    }
    screen
}

fn one_line(state: &State, tally: &Tally, t: Duration) -> String {
    let endpoints: Vec<String> = states(state)
        .into_iter()
        .map(|(name, word, attempts, failed, _)| {
            format!("{name} {word} {attempts}/{failed} failed")
        })
        .collect();
    format!("{}  |  {}", headline(state, tally, t), endpoints.join(", "))
}

fn summary(state: &State, tally: &Tally) -> Result<(), String> {
    let (_, queue) = state.queue.snapshot();
    let errors = tally.errors.load(Ordering::Relaxed);
    let mut stdout = std::io::stdout().lock();
    if std::io::stdout().is_terminal() {
        let _ = write!(stdout, "\x1b[J");
    }
    let _ = writeln!(stdout, "\nsummary");
    let _ = writeln!(
        stdout,
        "  requests answered      {} ({} streamed)",
        tally.answered.load(Ordering::Relaxed),
        tally.streams.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        stdout,
        "  failovers              {}",
        state.counters.failovers.load(Ordering::Relaxed)
    );
    let _ = writeln!(stdout, "  quarantines            {}", queue.total_failed);
    let _ = writeln!(stdout, "  recoveries             {}", queue.total_recovered);
    let _ = writeln!(
        stdout,
        "  probes still failing   {}",
        queue.total_still_failed
    );
    let _ = writeln!(stdout, "  client-visible errors  {errors}");
    if errors > 0 {
        return Err(format!("{errors} client request(s) saw an error"));
    }
    Ok(())
}
