//! wrk as the load generator, when it is installed (`apt-get install wrk`): the tool that
//! PERF-NOTES.md's figures, and issue 13's targets, were measured with. Its two event-loop
//! threads stand for 16 or 64 clients without a thread each; the bench's own clients are
//! a thread each, in the bench's process, and 64 more runnable threads weigh on a proxy
//! with a thread per connection far more than on nginx's two processes.

use std::net::SocketAddr;
use std::process::Command;

/// One wrk run: requests per second, and latency percentiles in µs.
pub struct Cell {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
}

/// Whether `wrk` can be run.
pub fn installed() -> bool {
    Command::new("wrk").arg("--version").output().is_ok()
}

/// `POST /v1/messages` with `body`, keep-alive, over `connections` for `seconds`; None
/// when wrk fails or an answer is not a 2xx.
pub fn run(addr: SocketAddr, connections: usize, seconds: u64, body: &str) -> Option<Cell> {
    let script = std::env::temp_dir().join(format!("fp-bench-wrk-{}.lua", std::process::id()));
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"content-type\"] = \"application/json\"\nwrk.body = [==[{body}]==]\n"
    );
    std::fs::write(&script, lua).ok()?;
    let output = Command::new("wrk")
        .arg(format!("-t{}", connections.min(2)))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg("-s")
        .arg(&script)
        .arg(format!("http://{addr}/v1/messages"))
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&script);
    parse(&String::from_utf8_lossy(&output.stdout))
}

/// The figures of wrk's `--latency` report.
fn parse(report: &str) -> Option<Cell> {
    if report.contains("Non-2xx") || report.contains("Socket errors") {
        return None;
    }
    let field = |prefix: &str| {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    Some(Cell {
        rps: field("Requests/sec:")?.parse().ok()?,
        p50: micros(field("50%")?)?,
        p99: micros(field("99%")?)?,
    })
}

/// `554.00us`, `4.59ms`, `1.02s` in µs.
fn micros(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * scale)
}
