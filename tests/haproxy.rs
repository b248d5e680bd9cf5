//! The scale-out recipe, `examples/haproxy-front.cfg` (issue 17), run by HAProxy from
//! Debian's package in front of two real `failover-proxy serve` processes on loopback:
//! one Claude Code session stays on one instance, and when that instance is stopped
//! (SIGTERM) the session moves to the other without an error once HAProxy has marked it
//! down. HAProxy is not installed by the test: without it the tests print why and pass
//! (`.ci/run` installs it).

use crate::support::binary::Binary;
use crate::support::*;
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use serde_json::json;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HAPROXY: &str = "/usr/sbin/haproxy";
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/haproxy-front.cfg");
const SESSION: &str = "0f4c2b1e-17aa-4d2e-9c3b-5e8f6a7b8c9d";

fn haproxy_is_installed() -> bool {
    if Path::new(HAPROXY).exists() {
        return true;
    }
    eprintln!(
        "SKIPPED: the HAProxy tests need {HAPROXY} (Debian: apt-get install -y haproxy; \
         .ci/run installs it)"
    );
    false
}

#[test]
fn the_example_haproxy_config_is_valid() {
    if !haproxy_is_installed() {
        return;
    }
    let checked = Command::new(HAPROXY)
        .args(["-c", "-f", EXAMPLE])
        .output()
        .expect("run haproxy -c");
    let said = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "{said}");
    assert!(!said.contains("WARNING"), "{said}");
}

/// A loopback port that was free a moment ago (bound to learn it, then released).
fn free_port() -> String {
    refused_url().trim_start_matches("http://").to_string()
}

/// The example config with its addresses replaced by the test's. Every address must
/// occur in the example, so a change there that this test does not follow fails here.
fn adapted_config(replacements: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(EXAMPLE).expect("the example config");
    for (from, to) in replacements {
        assert!(text.contains(from), "{from} is not in {EXAMPLE}");
        text = text.replace(from, to);
    }
    text
}

/// HAProxy in the foreground; killed and reaped when dropped.
struct Haproxy {
    child: Child,
    config: PathBuf,
    log: PathBuf,
    stats_url: String,
}

impl Haproxy {
    fn start(config_text: &str, stats_addr: &str) -> Haproxy {
        let stem =
            std::env::temp_dir().join(format!("fp-haproxy-{}-{}", std::process::id(), unique()));
        let config = stem.with_extension("cfg");
        let log = stem.with_extension("log");
        std::fs::write(&config, config_text).expect("write the HAProxy config");
        let output = File::create(&log).expect("the HAProxy log");
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("the log"))
            .stderr(output)
            .spawn()
            .expect("start haproxy");
        Haproxy {
            child,
            config,
            log,
            stats_url: format!("http://{stats_addr}/;csv"),
        }
    }

    /// The state of server `name` of the backend (`UP`, `DOWN`, `UP 1/2` while going
    /// down), from HAProxy's CSV stats; `None` while HAProxy does not answer yet.
    fn server_status(&mut self, name: &str) -> Option<String> {
        if let Some(exit) = self.child.try_wait().expect("wait on haproxy") {
            panic!("haproxy exited ({exit}): {}", self.log_text());
        }
        let mut answer = agent().get(&self.stats_url).call().ok()?;
        let csv = answer.body_mut().read_to_string().ok()?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let column = header.iter().position(|&c| c == "status")?;
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|row| row[0] == "failover_proxies" && row[1] == name)
            .map(|row| row[column].to_string())
    }

    /// Polls HAProxy's view of `server` until it is exactly `status` (a generous safety
    /// net: checks run every 2 s and two in a row decide).
    fn wait_for_status(&mut self, server: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self.server_status(server);
            if seen.as_deref() == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy never saw {server} {status} (last: {seen:?}): {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Sends `n` requests of the session through HAProxy; each must succeed. Returns the
/// upstream that answered each (each instance has an upstream of its own).
fn session_requests(front: &str, n: usize) -> Vec<String> {
    let client = agent();
    (0..n)
        .map(|i| {
            let answer = send_message(&client, front, &[("x-claude-code-session-id", SESSION)]);
            assert_eq!(answer.status, 200, "request {i}: {}", answer.text());
            answer
                .header("x-mock-upstream")
                .expect("upstream")
                .to_string()
        })
        .collect()
}

fn total_requests(instance: &Binary) -> u64 {
    instance.stats()["total_requests"]
        .as_u64()
        .expect("total_requests")
}

#[test]
fn a_session_stays_on_one_instance_and_moves_when_that_instance_stops() {
    if !haproxy_is_installed() {
        return;
    }
    let upstreams = [
        MockUpstream::start_named("upstream-of-fp1", Fault::None).expect("mock"),
        MockUpstream::start_named("upstream-of-fp2", Fault::None).expect("mock"),
    ];
    let mut instances = [
        Binary::serve(&[upstreams[0].url()], json!({})),
        Binary::serve(&[upstreams[1].url()], json!({})),
    ];
    let (front, stats) = (free_port(), free_port());
    let fp1 = instances[0].url.trim_start_matches("http://").to_string();
    let fp2 = instances[1].url.trim_start_matches("http://").to_string();
    let config = adapted_config(&[
        ("127.0.0.1:7860", &front),
        ("127.0.0.1:7861", &fp1),
        ("127.0.0.1:7862", &fp2),
        ("127.0.0.1:8404", &stats),
    ]);
    let mut haproxy = Haproxy::start(&config, &stats);
    haproxy.wait_for_status("fp1", "UP");
    haproxy.wait_for_status("fp2", "UP");
    let front = format!("http://{front}");

    let answered_by = session_requests(&front, 20);
    let first = answered_by[0].clone();
    assert!(answered_by.iter().all(|u| *u == first), "{answered_by:?}");
    let (serving, other) = if first == "upstream-of-fp1" {
        (0, 1)
    } else {
        (1, 0)
    };
    assert_eq!(total_requests(&instances[serving]), 20);
    assert_eq!(total_requests(&instances[other]), 0);
    // HAProxy's health checks are admin requests: they count as nothing.
    assert_eq!(upstreams[other].requests(), 0);

    assert_eq!(instances[serving].terminate(), Some(0));
    let server = ["fp1", "fp2"][serving];
    haproxy.wait_for_status(server, "DOWN");

    let answered_by = session_requests(&front, 20);
    let expected = ["upstream-of-fp1", "upstream-of-fp2"][other];
    assert!(answered_by.iter().all(|u| u == expected), "{answered_by:?}");
    assert_eq!(total_requests(&instances[other]), 20);
}
