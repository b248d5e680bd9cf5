//! `import-qcc` and the shipped examples, as a user runs them: the real binary on files
//! written to a temp dir, then `check` on what came out.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

const WORK_KEY_1: &str = "sk-ant-api03-import-test-key-one-0123456789";
const WORK_KEY_2: &str = "sk-relay-import-test-key-two-abcdefghijklmn";
const OLD_KEY: &str = "sk-old-style-import-test-key-zyxwvutsrqpo";
const ALL_KEYS: [&str; 3] = [WORK_KEY_1, WORK_KEY_2, OLD_KEY];

/// A directory of its own under the temp dir; removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("failover-proxy-import-{}-{n}", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create the temp dir");
        TempDir(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// qcc's id rule, computed here independently of the crate: the first 8 hex digits of
/// SHA-256 of `base_url|api_key`.
fn qcc_id(base_url: &str, api_key: &str) -> String {
    let digest = Sha256::digest(format!("{base_url}|{api_key}").as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A cache in qcc's format with both profile styles and the fields we must ignore.
fn qcc_cache() -> Value {
    json!({
        "user_id": "user-123",
        "settings": {"default_profile": "work", "storage_backend": "local"},
        "profiles": {
            "work": {
                "name": "work", "description": "day job", "priority": "primary",
                "enabled": true, "created_at": "2025-10-01T12:00:00.000000", "last_used": null,
                "endpoints": [
                    {"id": qcc_id("https://api.anthropic.com", WORK_KEY_1),
                     "base_url": "https://api.anthropic.com", "api_key": WORK_KEY_1,
                     "weight": 100, "priority": 1, "enabled": true, "max_failures": 3,
                     "timeout": 30, "source_profile": null, "metadata": {},
                     "created_at": "2025-10-01T12:00:00.000000"},
                    {"id": qcc_id("https://relay.example/api", WORK_KEY_2),
                     "base_url": "https://relay.example/api", "api_key": WORK_KEY_2,
                     "weight": 40, "priority": 2, "enabled": true, "max_failures": 5,
                     "timeout": 300, "source_profile": "backup", "metadata": {"note": "x"},
                     "created_at": "2025-10-02T12:00:00.000000"}
                ],
                "base_url": "https://api.anthropic.com", "api_key": WORK_KEY_1
            },
            "old-style": {
                "name": "old-style", "description": "", "priority": "fallback",
                "enabled": true, "created_at": "2025-01-01T00:00:00.000000", "last_used": null,
                "base_url": "https://relay.example", "api_key": OLD_KEY
            }
        }
    })
}

fn write_cache(dir: &TempDir) -> PathBuf {
    let path = dir.file("cache.json");
    std::fs::write(&path, serde_json::to_string_pretty(&qcc_cache()).unwrap()).unwrap();
    path
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_failover-proxy"))
}

fn run(command: &mut Command) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("run failover-proxy");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (status.code(), text(stdout), text(stderr))
}

fn import(cache: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    run(binary().arg("import-qcc").arg(cache).args(args))
}

fn check(config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = binary();
    command.args(["check", "--config"]).arg(config);
    for (name, value) in env {
        command.env(name, value);
    }
    run(&mut command)
}

fn assert_no_key(texts: &[&str]) {
    for text in texts {
        for key in ALL_KEYS {
            assert!(!text.contains(key), "a key was printed or written: {text}");
        }
    }
}

#[test]
fn import_qcc_profile_with_endpoints_passes_check_with_qcc_ids() {
    let dir = TempDir::new();
    let cache = write_cache(&dir);
    let out = dir.file("config.json");
    let out_arg = out.to_str().unwrap();
    let (code, stdout, stderr) = import(&cache, &["--profile", "work", "--output", out_arg]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_no_key(&[&stdout, &stderr]);
    assert!(stderr.contains("work-1: qcc's timeout 30 s"), "{stderr}");
    assert!(
        stderr.contains("work-2: timeout 300 s carried over"),
        "{stderr}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the config holds keys");
    }
    let (code, stdout, stderr) = check(&out, &[]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_no_key(&[&stdout, &stderr]);
    for (url, key) in [
        ("https://api.anthropic.com", WORK_KEY_1),
        ("https://relay.example/api", WORK_KEY_2),
    ] {
        assert!(
            stdout.contains(&qcc_id(url, key)),
            "no id for {url} in: {stdout}"
        );
    }
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let relay = &written["endpoints"][1];
    assert_eq!(relay["name"], "work-2");
    assert_eq!(
        (relay["weight"].as_u64(), relay["priority"].as_u64()),
        (Some(40), Some(2))
    );
    assert_eq!(
        (relay["max_failures"].as_u64(), relay["timeout"].as_u64()),
        (Some(5), Some(300))
    );
    assert_eq!(written["endpoints"][0]["timeout"].as_u64(), Some(600));
}

#[test]
fn import_qcc_profile_without_endpoints_is_one_endpoint_with_its_qcc_id() {
    let dir = TempDir::new();
    let cache = write_cache(&dir);
    let out = dir.file("old.json");
    let (code, _, stderr) = import(
        &cache,
        &["--profile", "old-style", "--output", out.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let (code, stdout, stderr) = check(&out, &[]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        stdout.contains(&qcc_id("https://relay.example", OLD_KEY)),
        "{stdout}"
    );
    assert!(stdout.contains("old-style-1"), "{stdout}");
}

#[test]
fn import_qcc_keys_to_env_writes_and_prints_no_key_and_keeps_the_ids() {
    let dir = TempDir::new();
    let cache = write_cache(&dir);
    let out = dir.file("env.json");
    let args = [
        "--profile",
        "work",
        "--keys-to-env",
        "--output",
        out.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = import(&cache, &args);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let written = std::fs::read_to_string(&out).unwrap();
    assert_no_key(&[&stdout, &stderr, &written]);
    for var in ["QCC_WORK_1_KEY", "QCC_WORK_2_KEY"] {
        assert!(
            written.contains(var) && stderr.contains(var),
            "{var}: {stderr}"
        );
    }
    let env = [
        ("QCC_WORK_1_KEY", WORK_KEY_1),
        ("QCC_WORK_2_KEY", WORK_KEY_2),
    ];
    let (code, stdout, stderr) = check(&out, &env);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        stdout.contains(&qcc_id("https://api.anthropic.com", WORK_KEY_1)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&qcc_id("https://relay.example/api", WORK_KEY_2)),
        "{stdout}"
    );
    // Without the variables the config is refused, naming the one that is missing.
    let (code, _, stderr) = check(&out, &[]);
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("QCC_WORK_1_KEY"), "{stderr}");
}

#[test]
fn import_qcc_to_stdout_prints_the_config() {
    let dir = TempDir::new();
    let cache = write_cache(&dir);
    let (code, stdout, stderr) = import(&cache, &["--profile", "old-style"]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let config: Value = serde_json::from_str(&stdout).expect("stdout is the config");
    assert_eq!(config["endpoints"][0]["api_key"], OLD_KEY);
    assert_no_key(&[&stderr]);
}

#[test]
fn import_qcc_refuses_with_exit_2_naming_the_file_and_the_problem() {
    let dir = TempDir::new();
    let cache = write_cache(&dir);
    let file = cache.display().to_string();
    let cases: [(&[&str], &str); 2] = [
        (
            &[],
            "2 profiles (old-style, work); choose one with --profile",
        ),
        (
            &["--profile", "home"],
            "no profile named \"home\"; its profiles are: old-style, work",
        ),
    ];
    for (args, expected) in cases {
        let (code, _, stderr) = import(&cache, args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&file) && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
        assert_no_key(&[&stderr]);
    }
    let broken = dir.file("broken.json");
    std::fs::write(&broken, "{\"profiles\": {\n  \"w\": }").unwrap();
    let (code, _, stderr) = import(&broken, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&broken.display().to_string()) && stderr.contains("line 2, column"),
        "{stderr}"
    );
    let empty = dir.file("empty.json");
    std::fs::write(&empty, r#"{"profiles": {"w": {"name": "w"}}}"#).unwrap();
    let (code, _, stderr) = import(&empty, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("profiles.w: no endpoints"), "{stderr}");
    let (code, _, stderr) = import(&cache, &["--profile", "work", "--output", &file]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("would destroy it"), "{stderr}");
    assert!(
        std::fs::read_to_string(&cache)
            .unwrap()
            .contains("old-style"),
        "cache kept"
    );
    let missing = dir.file("missing.json");
    let (code, _, stderr) = import(&missing, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Every `api_key_env` an example names, each with a distinct stand-in key (two endpoints
/// on one base_url with the same key would be refused as duplicates).
fn example_env(config: &Value) -> Vec<(String, String)> {
    let endpoints = config["endpoints"].as_array().expect("endpoints");
    endpoints
        .iter()
        .filter_map(|e| e["api_key_env"].as_str())
        .map(|var| (var.to_string(), format!("sk-example-stand-in-for-{var}")))
        .collect()
}

#[test]
fn every_example_config_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let env = example_env(&config);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, stdout, stderr) = check(&path, &env);
        assert_eq!(code, Some(0), "{}: {stderr}", path.display());
        assert!(stdout.contains("valid"), "{}: {stdout}", path.display());
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    for name in [
        "config.json",
        "official-plus-relay.json",
        "three-keys-weighted.json",
    ] {
        assert!(
            checked.iter().any(|c| c == name),
            "{name} missing from examples/"
        );
    }
}

#[test]
fn the_systemd_unit_runs_serve_and_restarts_on_failure() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/failover-proxy.service");
    let unit = std::fs::read_to_string(&path).expect("examples/failover-proxy.service");
    let line = |prefix: &str| {
        unit.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in the unit"))
    };
    assert!(line("ExecStart=").contains(" serve --config "));
    assert_eq!(line("Restart="), "Restart=on-failure");
    assert_eq!(line("ExecReload="), "ExecReload=/bin/kill -HUP $MAINPID");
    for prefix in [
        "RestartSec=",
        "User=",
        "EnvironmentFile=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=",
    ] {
        line(prefix);
    }
}
