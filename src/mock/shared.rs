//! What the handle, the accept thread and the connection threads share: the fault in force
//! and the gate's permits (with the waits on them), the counters, the recording and the
//! open sockets.

use crate::mock::body::header_safe;
use crate::mock::conn::shutdown_socket;
use crate::mock::fault::Fault;
use crate::mock::request::{Recorded, Request};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MAX_RECORDED: usize = 1000;
/// The recording keeps at most this many body bytes (but always the newest request).
const MAX_RECORDED_BODY_BYTES: usize = 64 * 1024 * 1024;
/// New connections beyond this are closed at once: thread growth stays bounded.
const MAX_CONNECTIONS: usize = 4096;
/// How often a hung or gated request looks whether its client has gone away.
const WAIT_TICK: Duration = Duration::from_millis(200);

/// State shared by the handle, the accept thread and the connection threads. Each lock
/// guards one small thing and is never held across I/O or together with another.
pub(super) struct Shared {
    pub(super) control: Mutex<Control>,
    /// Notified on fault change, release and stop.
    pub(super) wake: Condvar,
    stopped: AtomicBool,
    pub(super) name: Mutex<String>,
    pub(super) count_tokens_404: AtomicBool,
    /// `MockUpstream::set_close_after_answer`.
    pub(super) close_after_answer: AtomicBool,
    /// Header fields every answer carries (`MockUpstream::set_headers`).
    pub(super) headers: Mutex<Vec<(String, String)>>,
    pub(super) counters: Counters,
    pub(super) recorded: Mutex<RecordLog>,
    /// Clones of open sockets, shut down at stop to end blocked reads and writes.
    pub(super) conns: Mutex<HashMap<u64, TcpStream>>,
    pub(super) next_conn: AtomicU64,
}

/// What waiting requests re-check when woken.
pub(super) struct Control {
    pub(super) fault: Fault,
    /// Bumped by every `set_fault`, so a waiter can tell a change from a wake-up.
    pub(super) generation: u64,
    pub(super) permits: usize,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) successes: AtomicU64,
    pub(super) client_errors: AtomicU64,
}

#[derive(Default)]
pub(super) struct RecordLog {
    pub(super) entries: VecDeque<Recorded>,
    body_bytes: usize,
}

impl RecordLog {
    fn push(&mut self, entry: Recorded) {
        self.body_bytes += entry.body.len();
        self.entries.push_back(entry);
        while self.entries.len() > MAX_RECORDED
            || (self.body_bytes > MAX_RECORDED_BODY_BYTES && self.entries.len() > 1)
        {
            if let Some(old) = self.entries.pop_front() {
                self.body_bytes -= old.body.len();
            }
        }
    }
}

/// Which counter an answer moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Success,
    Failure,
    ClientError,
    Uncounted,
}

/// Why a waiting request woke up.
pub(super) enum Wake {
    Stopped,
    /// `set_fault` chose a fault other than the one the wait is for.
    Changed,
    Permit,
    Tick,
}

impl Shared {
    pub(super) fn new(name: &str, fault: Fault) -> Shared {
        Shared {
            control: Mutex::new(Control {
                fault,
                generation: 0,
                permits: 0,
            }),
            wake: Condvar::new(),
            stopped: AtomicBool::new(false),
            name: Mutex::new(header_safe(name)),
            count_tokens_404: AtomicBool::new(false),
            close_after_answer: AtomicBool::new(false),
            headers: Mutex::new(Vec::new()),
            counters: Counters::default(),
            recorded: Mutex::new(RecordLog::default()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        }
    }

    pub(super) fn fault(&self) -> Fault {
        self.control.lock().fault.clone()
    }

    pub(super) fn generation(&self) -> u64 {
        self.control.lock().generation
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Sets the flag under the control lock so no waiter can miss the notification.
    pub(super) fn stop(&self) {
        {
            let _control = self.control.lock();
            self.stopped.store(true, Ordering::SeqCst);
        }
        self.wake.notify_all();
        let open: Vec<TcpStream> = self.conns.lock().drain().map(|(_, s)| s).collect();
        for stream in &open {
            shutdown_socket(stream);
        }
    }

    /// Keeps a clone of the socket for `stop`; `None` when stopping or full.
    pub(super) fn register(&self, stream: &TcpStream) -> Option<u64> {
        let clone = stream.try_clone().ok()?;
        let mut conns = self.conns.lock();
        // Checked under the lock: `stop` sets the flag before it drains the map.
        if self.is_stopped() || conns.len() >= MAX_CONNECTIONS {
            return None;
        }
        let id = self.next_conn.fetch_add(1, Ordering::SeqCst);
        conns.insert(id, clone);
        Some(id)
    }

    pub(super) fn record(&self, request: Request) {
        let entry = Recorded {
            method: request.method,
            path: request.path,
            headers: request.headers,
            body: request.body,
        };
        self.recorded.lock().push(entry);
    }

    pub(super) fn count(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Success => &self.counters.successes,
            Outcome::Failure => &self.counters.failures,
            Outcome::ClientError => &self.counters.client_errors,
            Outcome::Uncounted => return,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    /// Sleeps for `delay` unless stopped first; false when stopped.
    pub(super) fn pause(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        let mut control = self.control.lock();
        while !self.is_stopped() && Instant::now() < deadline {
            self.wake.wait_until(&mut control, deadline);
        }
        !self.is_stopped()
    }

    /// One wait of a hung request, at most `WAIT_TICK`.
    pub(super) fn hang_tick(&self, seen: &mut u64) -> Wake {
        let is_hang = |fault: &Fault| *fault == Fault::Hang;
        let mut control = self.control.lock();
        if let Some(wake) = self.ended(&control, seen, is_hang) {
            return wake;
        }
        self.wake.wait_for(&mut control, WAIT_TICK);
        self.ended(&control, seen, is_hang).unwrap_or(Wake::Tick)
    }

    /// One wait of a gated stream for a permit, at most `WAIT_TICK`.
    pub(super) fn gate_tick(&self, seen: &mut u64) -> Wake {
        let is_gated = |fault: &Fault| *fault == Fault::Gated;
        let mut control = self.control.lock();
        if control.permits == 0 && self.ended(&control, seen, is_gated).is_none() {
            self.wake.wait_for(&mut control, WAIT_TICK);
        }
        if let Some(wake) = self.ended(&control, seen, is_gated) {
            return wake;
        }
        if control.permits == 0 {
            return Wake::Tick;
        }
        control.permits -= 1;
        Wake::Permit
    }

    /// Whether a wait is over: stopped, or the fault changed to one that `keep` rejects.
    /// A change that `keep` accepts is remembered in `seen` and the wait goes on.
    fn ended(&self, control: &Control, seen: &mut u64, keep: fn(&Fault) -> bool) -> Option<Wake> {
        if self.is_stopped() {
            return Some(Wake::Stopped);
        }
        if control.generation == *seen {
            return None;
        }
        if keep(&control.fault) {
            *seen = control.generation;
            return None;
        }
        Some(Wake::Changed)
    }
}
