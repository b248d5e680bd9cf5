//! One client connection's socket: its two halves, what follows an answer, whether the
//! peer has gone, and its shutdown.

use log::debug;
use std::io::{self, BufReader};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// A client that stops reading cannot hold a connection thread for longer than this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The two halves of one client connection. Answers go straight to the socket, unbuffered,
/// so every SSE chunk leaves at once.
pub(super) struct Conn {
    pub(super) reader: BufReader<TcpStream>,
    pub(super) writer: TcpStream,
}

/// What the connection does after an answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    KeepAlive,
    Close,
}

/// No Nagle delay: SSE events and slow pieces must leave as they are written.
pub(super) fn open_conn(stream: TcpStream) -> io::Result<Conn> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    Ok(Conn {
        reader,
        writer: stream,
    })
}

/// Whether the peer closed, seen with a non-blocking peek (any pending bytes mean alive).
pub(super) fn client_gone(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0; 1];
    let gone = match stream.peek(&mut byte) {
        Ok(read) => read == 0,
        Err(err) => err.kind() != io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).is_err() || gone
}

pub(super) fn shutdown_socket(stream: &TcpStream) {
    if let Err(err) = stream.shutdown(Shutdown::Both) {
        debug!("mock upstream: socket shutdown: {err}");
    }
}
