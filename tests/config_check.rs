//! `failover-proxy check --config FILE` as a user runs it: the real binary, a config file
//! on disk, the exit code and what is printed.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

const KEY: &str = "sk-check-key-0123456789abcdef";

/// What one run of the binary left behind.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    path: String,
}

/// A config file under the temp dir with a name of its own; removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> TempConfig {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("failover-proxy-check-{}-{n}.json", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).expect("write the config");
        TempConfig(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check_path(path: &std::path::Path) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_failover-proxy"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run failover-proxy");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        path: path.display().to_string(),
    }
}

fn check(text: &str) -> Run {
    let file = TempConfig::new(text);
    check_path(&file.0)
}

/// Exit 2, and a message on stderr that names the file and contains every one of `names`;
/// never a panic, never the key.
fn assert_refused_naming(run: &Run, names: &[&str]) {
    assert_eq!(run.code, Some(2), "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains(&run.path),
        "no file name in: {}",
        run.stderr
    );
    for name in names {
        assert!(run.stderr.contains(name), "no {name:?} in: {}", run.stderr);
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(!run.stderr.contains(KEY), "{}", run.stderr);
}

#[test]
fn check_refuses_an_unknown_field_with_exit_2_naming_the_field_its_line_and_the_file() {
    let text = format!(
        "{{\n  \"endpoints\": [\n    {{\n      \"base_url\": \"http://127.0.0.1:9\",\n      \"api_key\": \"{KEY}\",\n      \"wieght\": 3\n    }}\n  ]\n}}\n"
    );
    let run = check(&text);
    assert_refused_naming(&run, &["unknown field `wieght`", "line 6, column "]);
}

#[test]
fn check_refuses_a_missing_base_url_with_exit_2_naming_the_field_and_the_file() {
    let run = check(&format!(r#"{{"endpoints": [{{"api_key": "{KEY}"}}]}}"#));
    assert_refused_naming(&run, &["missing field `base_url`", "line 1, column "]);
}

#[test]
fn check_refuses_invalid_json_with_exit_2_naming_line_and_column_and_the_file() {
    let run = check("{\"endpoints\": [\n  {,}]}");
    assert_refused_naming(&run, &["line 2, column 4"]);
}

#[test]
fn check_refuses_a_missing_file_with_exit_2_naming_the_file() {
    let missing =
        std::env::temp_dir().join(format!("failover-proxy-none-{}.json", std::process::id()));
    let run = check_path(&missing);
    assert_refused_naming(&run, &[]);
}

#[test]
fn check_accepts_a_valid_config_with_exit_0_printing_endpoint_ids_and_never_the_key() {
    let text = format!(
        r#"{{"endpoints": [{{"name": "main", "base_url": "http://127.0.0.1:9", "api_key": "{KEY}"}},
                           {{"name": "relay", "base_url": "http://127.0.0.1:10/relay",
                             "api_key": "sk-check-key-fedcba9876543210"}}]}}"#
    );
    let run = check(&text);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    // python3 -c 'import hashlib;print(hashlib.sha256(b"http://127.0.0.1:9|sk-check-key-0123456789abcdef").hexdigest()[:8])'
    assert!(run.stdout.contains("25438e90"), "{}", run.stdout);
    assert!(run.stdout.contains("9e64fc80"), "{}", run.stdout);
    assert!(
        run.stdout.contains("main") && run.stdout.contains("relay"),
        "{}",
        run.stdout
    );
    for key in [KEY, "sk-check-key-fedcba9876543210"] {
        assert!(
            !run.stdout.contains(key) && !run.stderr.contains(key),
            "{key} printed"
        );
    }
}

#[test]
fn check_prints_each_endpoints_auth_and_refuses_an_unknown_one_naming_the_field() {
    let text = format!(
        r#"{{"endpoints": [{{"name": "main", "base_url": "http://127.0.0.1:9", "api_key": "{KEY}"}},
                           {{"name": "oauth", "base_url": "http://127.0.0.1:10", "api_key": "{KEY}",
                             "auth": "bearer"}}]}}"#
    );
    let run = check(&text);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let line = |name: &str| {
        let found = run.stdout.lines().find(|l| l.starts_with(name));
        found.unwrap_or_else(|| panic!("no {name} line in {}", run.stdout))
    };
    assert!(
        run.stdout.lines().any(|l| l.contains(" auth ")),
        "{}",
        run.stdout
    );
    assert!(line("main ").contains(" both "), "{}", run.stdout);
    assert!(line("oauth ").contains(" bearer "), "{}", run.stdout);
    let text = format!(
        r#"{{"endpoints": [{{"base_url": "http://127.0.0.1:9", "api_key": "{KEY}"}},
                           {{"base_url": "http://127.0.0.1:10", "api_key": "{KEY}", "auth": "basic"}}]}}"#
    );
    let run = check(&text);
    assert_refused_naming(&run, &[r#"endpoints[1].auth: "basic" must be"#]);
}

/// `failover-proxy mock`: prints its URL, answers with its fault, stops on SIGINT with a
/// count; an unknown fault is a usage error.
#[test]
fn the_mock_command_serves_its_fault_until_interrupted() {
    use std::io::{BufRead, BufReader};
    let bin = env!("CARGO_BIN_EXE_failover-proxy");
    let bad = std::process::Command::new(bin)
        .args(["mock", "--fault", "bogus"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let mut child = std::process::Command::new(bin)
        .args(["mock", "--name", "by-hand", "--fault", "503"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    let (status, _) = crate::support::post_message(&url, &[]);
    assert_eq!(status, 503);
    // SAFETY: sends a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let summary = lines.next().unwrap().unwrap();
    assert_eq!(summary, "1 requests, 1 answered with a fault");
}
