use std::io::Result as IoResult;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::cell::Cell;
use std::time::Duration;

use crate::connection::Connection;
#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use crate::ssl::SslStream;

pub(crate) enum Stream {
    Http(Connection),
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    Https(SslStream),
}

impl Stream {
    /// A second handle on the same socket (a new descriptor for plain TCP): fails when the
    /// process is out of descriptors.
    fn try_clone(&self) -> IoResult<Self> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.try_clone().map(Stream::Http),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => Ok(Stream::Https(ssl_stream.clone())),
        }
    }
}

impl From<Connection> for Stream {
    fn from(tcp_stream: Connection) -> Self {
        Stream::Http(tcp_stream)
    }
}

impl Stream {
    fn secure(&self) -> bool {
        match self {
            Stream::Http(_) => false,
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => true,
        }
    }

    fn peer_addr(&mut self) -> IoResult<Option<SocketAddr>> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.peer_addr(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.peer_addr(),
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> IoResult<()> {
        match self {
            Stream::Http(connection) => connection.set_read_timeout(timeout),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => Ok(()),
        }
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> IoResult<()> {
        match self {
            Stream::Http(connection) => connection.set_write_timeout(timeout),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => Ok(()),
        }
    }

    fn shutdown(&mut self, how: Shutdown) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.shutdown(how),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.read(buf),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.write(buf),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.write(buf),
        }
    }

    fn flush(&mut self) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.flush(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.flush(),
        }
    }
}

pub struct RefinedTcpStream {
    stream: Stream,
    close_read: bool,
    close_write: bool,
    /// The read timeout this handle last set on the socket, once it has set one.
    read_timeout: Cell<Option<Option<Duration>>>,
}

impl RefinedTcpStream {
    pub(crate) fn new<S>(stream: S) -> IoResult<(RefinedTcpStream, RefinedTcpStream)>
    where
        S: Into<Stream>,
    {
        let stream: Stream = stream.into();

        let (read, write) = (stream.try_clone()?, stream);

        let read = RefinedTcpStream {
            stream: read,
            close_read: true,
            close_write: false,
            read_timeout: Cell::new(None),
        };

        let write = RefinedTcpStream {
            stream: write,
            close_read: false,
            close_write: true,
            read_timeout: Cell::new(None),
        };

        Ok((read, write))
    }

    /// Returns true if this struct wraps around a secure connection.
    #[inline]
    pub(crate) fn secure(&self) -> bool {
        self.stream.secure()
    }

    pub(crate) fn peer_addr(&mut self) -> IoResult<Option<SocketAddr>> {
        self.stream.peer_addr()
    }

    /// Bounds every later read on this socket (both halves share it; only the read half
    /// sets it); a zero wait is taken as the shortest one the socket allows. Waits are
    /// rounded up to whole milliseconds and the socket is left alone when it has that
    /// timeout already: the keep-alive wait is the same for every request, and a system
    /// call per request saved is worth more than a millisecond of a deadline.
    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> IoResult<()> {
        let timeout = timeout.map(|t| ceil_millis(t).max(Duration::from_millis(1)));
        if self.read_timeout.get() == Some(timeout) {
            return Ok(());
        }
        self.stream.set_read_timeout(timeout)?;
        self.read_timeout.set(Some(timeout));
        Ok(())
    }

    /// Bounds every later write on this socket (both halves share it): a write that waits
    /// longer for the peer to read fails with `WouldBlock` or `TimedOut`.
    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> IoResult<()> {
        self.stream.set_write_timeout(timeout)
    }

    /// Sends what was written, then end-of-stream: the client sees the answer end.
    pub(crate) fn shutdown_write(&mut self) -> IoResult<()> {
        self.stream.shutdown(Shutdown::Write)
    }

    /// True when the client has closed its side (or reset the connection).
    pub(crate) fn peer_closed(&self) -> bool {
        match &self.stream {
            Stream::Http(connection) => connection.peer_closed(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => false,
        }
    }

    /// Ends both directions: a read blocked on this socket returns at once.
    pub(crate) fn shutdown_both(&mut self) -> IoResult<()> {
        self.stream.shutdown(Shutdown::Both)
    }
}

impl Drop for RefinedTcpStream {
    fn drop(&mut self) {
        if self.close_read {
            self.stream.shutdown(Shutdown::Read).ok();
        }

        if self.close_write {
            self.stream.shutdown(Shutdown::Write).ok();
        }
    }
}

impl Read for RefinedTcpStream {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        self.stream.read(buf)
    }
}

impl Write for RefinedTcpStream {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        self.stream.flush()
    }
}

/// `wait` rounded up to a whole number of milliseconds.
fn ceil_millis(wait: Duration) -> Duration {
    let whole = Duration::from_millis(std::convert::TryFrom::try_from(wait.as_millis()).unwrap_or(u64::MAX));
    if whole < wait {
        whole + Duration::from_millis(1)
    } else {
        whole
    }
}
