//! What the bench binaries share: a proxy started in-process in front of a mock.

use failover_proxy::config::validated::{Config, Overrides};
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::server::listen::Server;
use failover_proxy::state::shared::State;
use std::sync::Arc;

/// A proxy with `workers` threads kept ready in front of `mock`, logging nothing; and its
/// URL.
#[allow(dead_code)]
pub fn start_proxy(mock: &MockUpstream, workers: usize) -> (Server, String) {
    let config = serde_json::json!({
        "listen": "127.0.0.1:0",
        "workers": workers,
        "endpoints": [{"name": "mock", "base_url": mock.url(), "api_key": "sk-bench-0123456789"}],
    });
    let config =
        Config::from_json(&config.to_string(), &Overrides::default(), &|_| None).expect("config");
    let server = Server::start(Arc::new(State::new(config).expect("state"))).expect("server");
    let url = format!("http://{}", server.addr());
    (server, url)
}

#[allow(dead_code)]
pub mod nginx;

#[allow(dead_code)]
pub mod wrk;

/// A `Vm…:` figure of a `/proc/PID/status` text, in KiB.
#[allow(dead_code)]
pub fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resident memory of process `pid` now, in KiB.
#[allow(dead_code)]
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_kib(&status, "VmRSS:")
}
