//! `failover-proxy demo`, run as a new user runs it: the real binary, no config, no network.

use std::time::{Duration, Instant};

/// The number after `label` in the demo's summary.
fn summary_figure(stdout: &str, label: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"));
    let figure = line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .unwrap();
    figure.parse().unwrap()
}

#[test]
fn demo_shows_the_whole_lifecycle_with_no_client_errors_in_under_30_seconds() {
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_failover-proxy"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(summary_figure(&stdout, "requests answered") > 0);
    assert!(summary_figure(&stdout, "failovers") >= 1, "{stdout}");
    assert!(summary_figure(&stdout, "quarantines") >= 1, "{stdout}");
    assert!(summary_figure(&stdout, "recoveries") >= 1, "{stdout}");
    assert_eq!(
        summary_figure(&stdout, "client-visible errors"),
        0,
        "{stdout}"
    );
    // Not a terminal: plain lines, no cursor movement.
    assert!(!stdout.contains('\x1b'), "{stdout}");
    assert!(stdout.contains("entered the failure queue"), "{stdout}");
    assert!(
        stdout.contains("recovered and is back in service"),
        "{stdout}"
    );
}
