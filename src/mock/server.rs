//! The accept loop and each connection's thread: requests read, planned, recorded,
//! counted and answered until the connection ends.

use crate::mock::body::error_reply;
use crate::mock::conn::{Conn, Next, open_conn, shutdown_socket};
use crate::mock::plan::plan;
use crate::mock::request::{ReadError, read_request};
use crate::mock::shared::{Outcome, Shared};
use crate::mock::write::{Exchange, execute, write_reply};
use log::debug;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

/// Unregisters a connection however its thread ends.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.conns.lock().remove(&self.id);
    }
}

/// Accepts until stopped; an accept error is logged and retried, never fatal.
pub(super) fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for incoming in listener.incoming() {
        if shared.is_stopped() {
            break;
        }
        match incoming {
            Ok(stream) => spawn_connection(shared, stream),
            Err(err) => {
                debug!("mock upstream: accept failed: {err}");
                // Out of file descriptors and the like: do not spin.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Connects once to the listener so a blocked `accept` returns and sees the stop flag.
pub(super) fn wake_accept(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(_) => true,
        Err(err) => {
            debug!("mock upstream: cannot wake the accept thread: {err}");
            false
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream) {
    let Some(id) = shared.register(&stream) else {
        debug!("mock upstream: connection refused (stopping or too many)");
        return;
    };
    let guard = ConnGuard {
        shared: Arc::clone(shared),
        id,
    };
    let spawned = thread::Builder::new()
        .name("mock-conn".to_string())
        .spawn(move || serve_connection(&guard.shared, stream));
    if let Err(err) = spawned {
        debug!("mock upstream: cannot spawn a connection thread: {err}");
    }
}

/// Serves requests until the client closes, asks to close, or a fault ends the connection.
fn serve_connection(shared: &Shared, stream: TcpStream) {
    let mut conn = match open_conn(stream) {
        Ok(conn) => conn,
        Err(err) => {
            debug!("mock upstream: cannot set the connection up: {err}");
            return;
        }
    };
    loop {
        match serve_one(shared, &mut conn) {
            Ok(Next::KeepAlive) if !shared.close_after_answer.load(Ordering::SeqCst) => {}
            Ok(_) => break,
            Err(err) => {
                debug!("mock upstream: connection ended: {err}");
                break;
            }
        }
    }
    shutdown_socket(&conn.writer);
}

fn serve_one(shared: &Shared, conn: &mut Conn) -> io::Result<Next> {
    let request = match read_request(conn) {
        Ok(Some(request)) => request,
        Ok(None) => return Ok(Next::Close),
        Err(ReadError::Io(err)) => return Err(err),
        Err(ReadError::Bad(status, message)) => {
            shared.count(Outcome::ClientError);
            let exchange = Exchange {
                name: shared.name.lock().clone(),
                close: true,
                head_only: false,
                headers: Vec::new(),
                seen: 0,
            };
            return write_reply(conn, &error_reply(status, message), &exchange);
        }
    };
    let exchange = Exchange {
        name: shared.name.lock().clone(),
        close: request.wants_close(),
        head_only: request.method == "HEAD",
        headers: shared.headers.lock().clone(),
        // Taken before the fault is: a change between the two is seen as a change.
        seen: shared.generation(),
    };
    let (outcome, action) = plan(shared, &request);
    shared.record(request);
    shared.counters.requests.fetch_add(1, Ordering::SeqCst);
    shared.count(outcome);
    execute(shared, conn, action, &exchange)
}
