//! The network pieces of the real-upstream tests (issue 9), all on loopback: a test
//! certificate authority with a server certificate for 127.0.0.1 and localhost, a TLS
//! front that terminates TLS and relays the plain bytes to a `MockUpstream` (so every mock
//! fault works over TLS too), an HTTP CONNECT proxy and a SOCKS5 proxy that count their
//! tunnels, the small loopback server they are built on, and a runner for the real
//! binary's `check --probe`.

use parking_lot::Mutex;
use rustls::ServerConnection;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};

const PIECE: usize = 16 * 1024;

/// A certificate authority made for one test, and a server certificate it signed for
/// `127.0.0.1` and `localhost`.
pub struct TestCa {
    /// The CA certificate, PEM: what an endpoint's `ca_file` holds.
    pub pem: String,
    server_cert: CertificateDer<'static>,
    server_key: PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        TestCa::for_names(&["127.0.0.1", "localhost"])
    }

    /// A CA whose server certificate names only `names` (DNS names or IP addresses).
    pub fn for_names(names: &[&str]) -> TestCa {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "failover-proxy test CA");
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let server_params = rcgen::CertificateParams::new(names).expect("server params");
        let server_key = rcgen::KeyPair::generate().expect("server key");
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server certificate");
        TestCa {
            pem: ca_cert.pem(),
            server_cert: server_cert.der().clone(),
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
        }
    }

    /// The CA's PEM in a temp file of its own, removed when the returned guard drops.
    pub fn write_pem(&self) -> TempFile {
        TempFile::with_text("ca.pem", &self.pem)
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![self.server_cert.clone()],
                PrivateKeyDer::Pkcs8(self.server_key.clone_key()),
            )
            .expect("server certificate and key");
        Arc::new(config)
    }
}

/// A file under the temp dir with a name no other test uses; removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn with_text(suffix: &str, text: &str) -> TempFile {
        let name = format!(
            "failover-proxy-test-{}-{}-{suffix}",
            std::process::id(),
            super::unique()
        );
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).expect("write a temp file");
        TempFile { path }
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A listener on 127.0.0.1:0 that hands each accepted connection to `handler` on a
/// thread of its own. Dropping it stops accepting, shuts every accepted socket down
/// (which ends handlers blocked on them) and joins every thread.
pub struct LoopbackServer {
    addr: SocketAddr,
    shared: Arc<ServerShared>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct ServerShared {
    stop: AtomicBool,
    accepted: AtomicU64,
    sockets: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl LoopbackServer {
    pub fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> LoopbackServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(ServerShared::default());
        let accept_shared = shared.clone();
        let handler = Arc::new(handler);
        let accept = thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                accept_shared.accepted.fetch_add(1, Ordering::SeqCst);
                let own = stream.try_clone().expect("clone an accepted socket");
                accept_shared.sockets.lock().push(own);
                let handler = handler.clone();
                let thread = thread::spawn(move || handler(stream));
                accept_shared.threads.lock().push(thread);
            }
        });
        LoopbackServer {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _wakes_the_accept_loop = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            accept.join().expect("accept thread");
        }
        for socket in self.shared.sockets.lock().iter() {
            let _already_closed_is_fine = socket.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock());
        for thread in threads {
            let _a_panicked_handler_shows_in_its_test = thread.join();
        }
    }
}

/// Closes both sockets, so the relay thread of the other direction ends too.
fn close_both(a: &TcpStream, b: &TcpStream) {
    let _already_closed_is_fine = a.shutdown(Shutdown::Both);
    let _already_closed_is_fine = b.shutdown(Shutdown::Both);
}

/// Copies `from` to `to` until either side ends, then closes both.
fn copy_until_closed(mut from: TcpStream, mut to: TcpStream) {
    let _either_side_may_end_it = io::copy(&mut from, &mut to);
    close_both(&from, &to);
}

/// Relays two plain sockets both ways until either side closes.
pub fn relay_plain(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (
        a.try_clone().expect("clone socket"),
        b.try_clone().expect("clone socket"),
    );
    let upward = thread::spawn(move || copy_until_closed(a2, b2));
    copy_until_closed(b, a);
    upward.join().expect("relay thread");
}

/// An HTTPS upstream: TLS terminated here with the `TestCa` server certificate, the plain
/// bytes relayed to `backend` over a new connection per TLS connection.
pub struct TlsFront {
    server: LoopbackServer,
    handshakes: Arc<Handshakes>,
}

/// TLS handshakes completed, and how many of them resumed an earlier session.
#[derive(Default)]
struct Handshakes {
    completed: AtomicU64,
    resumed: AtomicU64,
}

impl TlsFront {
    pub fn start(ca: &TestCa, backend: SocketAddr) -> TlsFront {
        let config = ca.server_config();
        let handshakes = Arc::new(Handshakes::default());
        let counter = handshakes.clone();
        let server = LoopbackServer::start(move |client| {
            let Ok(upstream) = TcpStream::connect(backend) else {
                return;
            };
            let tls = ServerConnection::new(config.clone()).expect("a TLS server connection");
            relay_tls(tls, client, upstream, &counter);
        });
        TlsFront { server, handshakes }
    }

    /// `https://127.0.0.1:PORT`: the certificate names that address.
    pub fn url(&self) -> String {
        format!("https://{}", self.server.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// TCP connections accepted, failed handshakes included.
    pub fn connections(&self) -> u64 {
        self.server.accepted()
    }

    /// TLS handshakes completed.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.completed.load(Ordering::SeqCst)
    }

    /// TLS handshakes completed that resumed a session the client had from an earlier one.
    pub fn resumed(&self) -> u64 {
        self.handshakes.resumed.load(Ordering::SeqCst)
    }
}

/// One TLS connection: client-to-backend on a thread of its own, backend-to-client here.
/// The rustls state is shared under a lock; socket reads happen outside it, and each
/// direction writes its TLS records under it, so records leave in sequence order.
fn relay_tls(
    tls: ServerConnection,
    client: TcpStream,
    backend: TcpStream,
    handshakes: &Handshakes,
) {
    client.set_nodelay(true).expect("nodelay");
    backend.set_nodelay(true).expect("nodelay");
    let tls = Mutex::new(tls);
    let clone = |s: &TcpStream| s.try_clone().expect("clone socket");
    thread::scope(|scope| {
        scope.spawn(|| {
            let _ends_when_either_side_closes =
                client_to_backend(&tls, clone(&client), clone(&backend), handshakes);
            close_both(&client, &backend);
        });
        let _ends_when_either_side_closes =
            backend_to_client(&tls, clone(&backend), clone(&client));
        close_both(&client, &backend);
    });
}

fn client_to_backend(
    tls: &Mutex<ServerConnection>,
    mut client: TcpStream,
    mut backend: TcpStream,
    handshakes: &Handshakes,
) -> io::Result<()> {
    let mut counted = false;
    let mut piece = vec![0u8; PIECE];
    loop {
        let n = client.read(&mut piece)?;
        if n == 0 {
            return Ok(());
        }
        let plain = {
            let mut conn = tls.lock();
            let plain = decrypt(&mut conn, &piece[..n], &mut client)?;
            if !counted && !conn.is_handshaking() {
                counted = true;
                handshakes.completed.fetch_add(1, Ordering::SeqCst);
                if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    handshakes.resumed.fetch_add(1, Ordering::SeqCst);
                }
            }
            plain
        };
        backend.write_all(&plain)?;
    }
}

/// Feeds received TLS bytes to rustls; returns the plain bytes they carried, after writing
/// whatever rustls has to answer (handshake messages, alerts).
fn decrypt(
    conn: &mut ServerConnection,
    mut input: &[u8],
    client: &mut TcpStream,
) -> io::Result<Vec<u8>> {
    let mut plain = Vec::new();
    while !input.is_empty() {
        conn.read_tls(&mut input)?;
        let processed = conn.process_new_packets();
        send_pending(conn, client)?;
        processed.map_err(io::Error::other)?;
        match conn.reader().read_to_end(&mut plain) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
    }
    Ok(plain)
}

fn send_pending(conn: &mut ServerConnection, client: &mut TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(client)?;
    }
    Ok(())
}

fn backend_to_client(
    tls: &Mutex<ServerConnection>,
    mut backend: TcpStream,
    mut client: TcpStream,
) -> io::Result<()> {
    let mut piece = vec![0u8; PIECE];
    loop {
        let n = backend.read(&mut piece)?;
        let mut conn = tls.lock();
        if n == 0 {
            conn.send_close_notify();
            return send_pending(&mut conn, &mut client);
        }
        let mut rest = &piece[..n];
        while !rest.is_empty() {
            let taken = conn.writer().write(rest)?;
            rest = &rest[taken..];
            send_pending(&mut conn, &mut client)?;
        }
    }
}

/// An outbound HTTP proxy that answers `CONNECT host:port` with 200 and relays the tunnel.
pub struct ConnectProxy {
    server: LoopbackServer,
    targets: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    pub fn start() -> ConnectProxy {
        let targets = Arc::new(Mutex::new(Vec::new()));
        let log = targets.clone();
        let server = LoopbackServer::start(move |client| tunnel(client, &log));
        ConnectProxy { server, targets }
    }

    /// `http://127.0.0.1:PORT`, as an endpoint's `proxy` or `HTTPS_PROXY` takes it.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// Tunnels opened (one per accepted connection that asked for one).
    pub fn tunnels(&self) -> usize {
        self.targets.lock().len()
    }

    /// The `host:port` of each tunnel, in order.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().clone()
    }
}

fn tunnel(mut client: TcpStream, targets: &Mutex<Vec<String>>) {
    let Ok(head) = read_head(&mut client) else {
        return;
    };
    let first = head.lines().next().unwrap_or_default().to_string();
    let mut words = first.split(' ');
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _client_may_be_gone = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n");
        return;
    };
    targets.lock().push(target.to_string());
    let Ok(upstream) = TcpStream::connect(target) else {
        let _client_may_be_gone = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_ok()
    {
        relay_plain(client, upstream);
    }
}

/// A request head, read byte by byte up to its blank line (nothing of the tunnel after it
/// is consumed).
pub fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// A request head and its `content-length` body (read and dropped); `None` at the end.
pub fn read_request(socket: &mut TcpStream) -> Option<String> {
    let head = read_head(socket).ok()?;
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let mut body = socket.take(length);
    std::io::copy(&mut body, &mut std::io::sink()).ok()?;
    Some(head)
}

/// A SOCKS5 proxy (no authentication, CONNECT only) that counts its tunnels.
pub struct Socks5Proxy {
    server: LoopbackServer,
    tunnels: Arc<AtomicU64>,
}

impl Socks5Proxy {
    pub fn start() -> Socks5Proxy {
        let tunnels = Arc::new(AtomicU64::new(0));
        let counter = tunnels.clone();
        let server = LoopbackServer::start(move |client| {
            if let Ok((client, upstream)) = socks5_connect(client) {
                counter.fetch_add(1, Ordering::SeqCst);
                relay_plain(client, upstream);
            }
        });
        Socks5Proxy { server, tunnels }
    }

    pub fn url(&self) -> String {
        format!("socks5://{}", self.server.addr())
    }

    pub fn tunnels(&self) -> u64 {
        self.tunnels.load(Ordering::SeqCst)
    }
}

/// RFC 1928: greeting (no auth), then a CONNECT to an IPv4 address or a domain name.
fn socks5_connect(mut client: TcpStream) -> io::Result<(TcpStream, TcpStream)> {
    let read_n = |client: &mut TcpStream, n: usize| -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        client.read_exact(&mut buf)?;
        Ok(buf)
    };
    let greeting = read_n(&mut client, 2)?;
    read_n(&mut client, greeting[1] as usize)?;
    client.write_all(&[5, 0])?;
    let request = read_n(&mut client, 4)?;
    let host = match request[3] {
        1 => {
            let ip = read_n(&mut client, 4)?;
            format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
        }
        3 => {
            let len = read_n(&mut client, 1)?[0] as usize;
            String::from_utf8_lossy(&read_n(&mut client, len)?).into_owned()
        }
        _ => return Err(io::Error::other("unsupported SOCKS5 address type")),
    };
    let port = read_n(&mut client, 2)?;
    let port = u16::from_be_bytes([port[0], port[1]]);
    let upstream = TcpStream::connect((host.as_str(), port))?;
    client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])?;
    Ok((client, upstream))
}

/// What `failover-proxy check --config FILE --probe` printed, run as a user runs it,
/// with the proxy variables of the test's environment removed and `env` set.
pub fn check_probe(config: &serde_json::Value, env: &[(&str, &str)]) -> String {
    let file = TempFile::with_text("config.json", &config.to_string());
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_failover-proxy"));
    command.args(["check", "--probe", "--config", file.path_str()]);
    for name in PROXY_VARIABLES {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let output = command.output().expect("run failover-proxy check --probe");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

const PROXY_VARIABLES: [&str; 8] = [
    "ALL_PROXY",
    "all_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// The line `check --probe` printed for endpoint `name`.
pub fn probe_line<'a>(output: &'a str, name: &str) -> &'a str {
    output
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no probe line for {name} in:\n{output}"))
}
