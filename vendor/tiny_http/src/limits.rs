//! Bounds on what one client connection may send, and the state a connection's requests
//! share with the thread that reads it. Not in tiny_http 0.12: see vendor/README.md.

use std::io;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::util::RefinedTcpStream;

/// What a client may send, and how slowly. Every answer the connection thread writes
/// itself (400, 408, 413, 414, 417, 431, 501, 505) closes the connection.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The request line and header lines together, line ends included (431 beyond).
    pub max_head_bytes: usize,
    /// Header fields per request (431 beyond).
    pub max_header_fields: usize,
    /// One line, line end excluded: a longer request line gets 414, a longer header
    /// line 431.
    pub max_line_bytes: usize,
    /// The longest wait for a whole request head, from its first byte (from the
    /// connection's start for the first request); 408 then close.
    pub header_timeout: Option<Duration>,
    /// The longest wait between two reads of a request body; the body read then fails
    /// with `TimedOut` or `WouldBlock`.
    pub body_timeout: Option<Duration>,
    /// How long a kept-alive connection may stay idle before its next request; closed
    /// silently after that.
    pub keepalive_timeout: Option<Duration>,
    /// The longest one write to the client may wait for the client to read (set once per
    /// connection); the write then fails with `TimedOut` or `WouldBlock` (nginx's
    /// `send_timeout`). A client that stops reading holds its thread no longer.
    pub send_timeout: Option<Duration>,
    /// The body of the answers written by the connection thread: (content type, body).
    pub error_body: fn(status: u16, message: &str) -> (&'static str, Vec<u8>),
    /// Open client connections at most (see `registry.rs`); None: no bound.
    pub max_connections: Option<usize>,
    /// Connections let in beyond `max_connections` while every other one is busy, for the
    /// handler to answer at once (status requests, or 529).
    pub overflow_connections: usize,
    /// Threads kept ready for new connections.
    pub ready_threads: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_head_bytes: 64 * 1024,
            max_header_fields: 100,
            max_line_bytes: 8 * 1024,
            header_timeout: None,
            body_timeout: None,
            keepalive_timeout: None,
            send_timeout: None,
            error_body: |_, message| ("text/plain", message.as_bytes().to_vec()),
            max_connections: None,
            overflow_connections: 0,
            ready_threads: 4,
        }
    }
}

pub(crate) type SharedWriter = Arc<Mutex<BufWriter<RefinedTcpStream>>>;

/// What a connection's requests tell the thread that reads the connection.
pub(crate) struct ConnState {
    /// A request's body was dropped before its end: what follows on the socket is not a
    /// request head, so the connection must close.
    pub(crate) body_left: AtomicBool,
    /// The handler ended the connection (`ConnectionHandle::close`).
    pub(crate) closed: AtomicBool,
    /// Answers still being written: the keep-alive wait runs only while there are none.
    pub(crate) answering: AtomicUsize,
    /// `IDLE`, `BUSY` or `EVICTED` (see `registry.rs`).
    phase: AtomicU8,
    /// When the connection last became idle, in milliseconds since `epoch()`.
    pub(crate) idle_since: AtomicU64,
    /// Let in beyond `max_connections` while every other connection was busy.
    pub(crate) overflow: AtomicBool,
    writer: Option<SharedWriter>,
}

const IDLE: u8 = 0;
const BUSY: u8 = 1;
const EVICTED: u8 = 2;

/// The instant `idle_since` counts from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl ConnState {
    pub(crate) fn new(writer: Option<SharedWriter>) -> Arc<ConnState> {
        Arc::new(ConnState {
            body_left: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            answering: AtomicUsize::new(0),
            phase: AtomicU8::new(IDLE),
            idle_since: AtomicU64::new(epoch().elapsed().as_millis() as u64),
            overflow: AtomicBool::new(false),
            writer,
        })
    }

    /// The connection waits for a request that has not begun (unless it was evicted).
    pub(crate) fn set_idle(&self) {
        let now = epoch().elapsed().as_millis() as u64;
        self.idle_since.store(now, Ordering::SeqCst);
        let _evicted_stays_evicted =
            self.phase
                .compare_exchange(BUSY, IDLE, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// A request has begun; false when the connection was evicted first.
    pub(crate) fn try_busy(&self) -> bool {
        self.phase
            .compare_exchange(IDLE, BUSY, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            || self.phase.load(Ordering::SeqCst) == BUSY
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == IDLE
    }

    /// Closes an idle connection to make room: its thread's read ends at once. False when
    /// it is not idle (a request began meanwhile).
    pub(crate) fn evict(&self) -> bool {
        let evicted = self
            .phase
            .compare_exchange(IDLE, EVICTED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if evicted {
            if let Some(writer) = &self.writer {
                let mut writer = writer.lock().unwrap_or_else(|e| e.into_inner());
                writer.get_mut().shutdown_both().ok();
            }
        }
        evicted
    }

    /// True when the client has closed the connection. Asked by the request's own thread
    /// while it waits on something else (no one reads the socket meanwhile).
    pub(crate) fn peer_closed(&self) -> bool {
        self.writer.as_ref().is_some_and(|writer| {
            let writer = writer.lock().unwrap_or_else(|e| e.into_inner());
            writer.get_ref().peer_closed()
        })
    }

    /// Flushes what was written and sends end-of-stream.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(writer) = &self.writer {
            let mut writer = writer.lock().unwrap_or_else(|e| e.into_inner());
            writer.flush().ok();
            writer.get_mut().shutdown_write().ok();
        }
    }
}

/// A request's answer writer, counted in `ConnState::answering` while it lives.
pub(crate) struct Answering<W> {
    inner: W,
    state: Arc<ConnState>,
}

impl<W> Answering<W> {
    pub(crate) fn new(inner: W, state: &Arc<ConnState>) -> Answering<W> {
        state.answering.fetch_add(1, Ordering::SeqCst);
        Answering {
            inner,
            state: state.clone(),
        }
    }
}

impl<W: Write> Write for Answering<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W> Drop for Answering<W> {
    fn drop(&mut self) {
        self.state.answering.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Lets the handler of a request end its connection: after an answer whose end only the
/// end of the connection marks, or one that could not be completed.
#[derive(Clone)]
pub struct ConnectionHandle(pub(crate) Arc<ConnState>);

impl ConnectionHandle {
    /// Flushes what was written, then ends the stream: the client sees the answer end,
    /// and no further request is read from this connection.
    pub fn close(&self) {
        self.0.close();
    }

    /// True when the client has closed the connection (a non-blocking peek finds its end).
    /// For a handler waiting on something else: a client that went away need not be
    /// waited for.
    pub fn peer_closed(&self) -> bool {
        self.0.peer_closed()
    }

    /// True for a connection let in beyond `max_connections` while every other one was
    /// busy: the handler should answer it at once.
    pub fn is_overflow(&self) -> bool {
        self.0.overflow.load(Ordering::SeqCst)
    }
}
