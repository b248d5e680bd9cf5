//! nginx as the benches' baseline, when it is installed (`apt-get install nginx-light`):
//! a reverse proxy in front of the same mock, tuned as PERF-NOTES.md measured it
//! (keep-alive to the upstream, buffering off, bodies kept in memory).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
    dir: PathBuf,
}

impl Nginx {
    /// nginx in front of `upstream` on a free loopback port; None when nginx is not
    /// installed or does not start.
    pub fn start(upstream: SocketAddr) -> Option<Nginx> {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let addr = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?;
        let dir = std::env::temp_dir().join(format!("fp-bench-nginx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let conf = conf(
            upstream,
            addr,
            &dir,
            "worker_processes auto; daemon off; master_process on;",
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).ok()?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&dir)
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let pid = child.id();
        let nginx = Nginx {
            child,
            addr,
            pid,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(nginx)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resident memory of the master and its workers, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let mut total = super::rss_kib(self.pid);
        for task in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let parent = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|v| v.trim().parse::<u32>().ok());
            if parent == Some(self.pid) {
                total += super::status_kib(&status, "VmRSS:");
            }
        }
        total
    }
}

/// nginx's configuration: a reverse proxy on `addr` in front of `upstream`, its files in
/// `dir`; `processes` says how nginx runs (`master_process off` for one process).
pub fn conf(
    upstream: SocketAddr,
    addr: SocketAddr,
    dir: &std::path::Path,
    processes: &str,
) -> String {
    let d = dir.display();
    format!(
        "user root; {processes}
error_log {d}/error.log error; pid {d}/nginx.pid; worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 75s;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream mock {{ server {upstream}; keepalive 256; keepalive_requests 10000000; }}
  server {{
    listen {addr} backlog=4096;
    client_body_buffer_size 1m; client_max_body_size 64m;
    location / {{
      proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_buffering off; proxy_request_buffering on; tcp_nodelay on;
    }}
  }}
}}
"
    )
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let errors = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        for line in errors.lines().rev().take(3) {
            println!("nginx error.log: {line}");
        }
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
