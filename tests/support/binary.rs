//! The real `failover-proxy serve` as a child process on 127.0.0.1, for tests that must
//! see what a user's process does (a crash is a dead process, not a failed thread).

use parking_lot::Mutex;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

pub struct Binary {
    child: Child,
    pub url: String,
    config: PathBuf,
    pub log_file: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    /// `serve` in front of `base_urls` (endpoints "ep0", "ep1", … with the test keys),
    /// `extra` merged into the config's top level, logging at debug level to a file.
    pub fn serve(base_urls: &[String], extra: Value) -> Binary {
        Binary::serve_with_nofile(base_urls, extra, None)
    }

    /// `serve` started with the descriptor limit `nofile` (as `prlimit --nofile` takes it:
    /// `1024:` for the soft limit only, `64:64` for both).
    pub fn serve_with_nofile(base_urls: &[String], extra: Value, nofile: Option<&str>) -> Binary {
        let endpoints: Vec<Value> = base_urls
            .iter()
            .enumerate()
            .map(|(i, url)| json!({"name": format!("ep{i}"), "base_url": url, "api_key": super::key(i)}))
            .collect();
        let mut config = json!({"endpoints": endpoints});
        for (k, v) in extra.as_object().expect("extra must be an object") {
            config[k] = v.clone();
        }
        let stem = format!("fp-binary-{}-{}", std::process::id(), super::unique());
        let dir = std::env::temp_dir();
        let (config_path, log_file) = (
            dir.join(format!("{stem}.json")),
            dir.join(format!("{stem}.log")),
        );
        std::fs::write(&config_path, config.to_string()).expect("write the config");
        let mut command = match nofile {
            Some(limit) => {
                let mut command = Command::new("prlimit");
                command.arg(format!("--nofile={limit}")).arg("--");
                command.arg(env!("CARGO_BIN_EXE_failover-proxy"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_failover-proxy")),
        };
        let mut child = command
            .args(["serve", "--config"])
            .arg(&config_path)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "debug",
                "--log-file",
            ])
            .arg(&log_file)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start failover-proxy serve");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let url = loop {
            let line = lines.next().expect("serve exited early").expect("stderr");
            if let Some(at) = line.find("listening on http://") {
                let rest = &line[at + "listening on ".len()..];
                break rest
                    .split_whitespace()
                    .next()
                    .expect("an address")
                    .to_string();
            }
        };
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .for_each(|l| sink.lock().push(l))
        });
        Binary {
            child,
            url,
            config: config_path,
            log_file,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The threads the process has now.
    pub fn threads(&self) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the process status");
        let line = status
            .lines()
            .find(|l| l.starts_with("Threads:"))
            .expect("Threads:");
        line["Threads:".len()..]
            .trim()
            .parse()
            .expect("a thread count")
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        if self.alive() {
            // SAFETY: sends a signal to our own child process, which has not been reaped
            // (so its pid is still its own); no memory is involved.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        self.child.wait().expect("wait on the child").code()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("wait on the child").is_none()
    }

    pub fn stats(&self) -> Value {
        let (status, body) = super::get(&format!("{}/__qcc__/stats", self.url));
        assert_eq!(status, 200);
        serde_json::from_slice(&body).expect("stats JSON")
    }

    /// What the process wrote to stderr so far (its log, and a panic message if any).
    pub fn stderr(&self) -> String {
        self.stderr.lock().join("\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _exit = self.terminate();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log_file);
    }
}
