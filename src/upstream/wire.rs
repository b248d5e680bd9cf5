//! Fewer writes and system calls per upstream request than ureq makes on its own.
//!
//! - One write for a request's head and its body. ureq sends the head, then the body: two
//!   TCP segments, and an upstream that reads the head first is woken twice. This layer
//!   holds the head back and sends it with the first piece of the body, or alone just
//!   before the answer is awaited when no body follows (or an `expect: 100-continue`
//!   awaits the go-ahead).
//! - One liveness probe per reuse. A kept connection is probed (a non-blocking read
//!   between two `ioctl`s) when ureq decides to keep it and again when `pool.rs` takes it
//!   out, often microseconds later. The probe on taking it out is the one that matters
//!   (the upstream may have closed it while it sat idle, and it sees stray bytes as well),
//!   so the one on return is answered from memory.

use std::fmt;
use ureq::Timeout;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};

/// The last link of the connector chain: wraps whatever transport came before.
#[derive(Debug, Clone, Copy)]
pub struct WireConnector;

impl<In: Transport> Connector<In> for WireConnector {
    type Out = WireTransport<In>;

    fn connect(
        &self,
        _: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        Ok(chained.map(|inner| WireTransport {
            inner,
            head: None,
            used: false,
        }))
    }
}

pub struct WireTransport<T> {
    inner: T,
    /// A request head not sent yet (allocated per request: a pooled connection keeps no
    /// buffer of its own).
    head: Option<Vec<u8>>,
    /// Written or read since the last liveness probe: the connection is coming back to
    /// the pool from a request.
    used: bool,
}

impl<T: Transport> WireTransport<T> {
    /// Sends `bytes` through the output buffer, as many writes as it takes.
    fn send(&mut self, bytes: &[u8], timeout: NextTimeout) -> Result<(), ureq::Error> {
        let room = self.inner.buffers().output().len();
        for piece in bytes.chunks(room) {
            self.inner.buffers().output()[..piece.len()].copy_from_slice(piece);
            self.inner.transmit_output(piece.len(), timeout)?;
        }
        Ok(())
    }

    /// Sends a head still held.
    fn flush(&mut self, timeout: NextTimeout) -> Result<(), ureq::Error> {
        match self.head.take() {
            Some(head) => self.send(&head, timeout),
            None => Ok(()),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for WireTransport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireTransport")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<T: Transport> Transport for WireTransport<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    /// The head (written in one piece or several) is held; the first piece of body goes
    /// out behind it in the same write when both fit the output buffer, after it otherwise.
    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.used = true;
        if timeout.reason == Timeout::SendRequest {
            let written = &self.inner.buffers().output()[..amount];
            self.head
                .get_or_insert_with(Vec::new)
                .extend_from_slice(written);
            return Ok(());
        }
        let Some(head) = self.head.take() else {
            return self.inner.transmit_output(amount, timeout);
        };
        let output = self.inner.buffers().output();
        if head.len() + amount > output.len() {
            let body = output[..amount].to_vec();
            self.send(&head, timeout)?;
            return self.send(&body, timeout);
        }
        output.copy_within(..amount, head.len());
        output[..head.len()].copy_from_slice(&head);
        self.inner.transmit_output(head.len() + amount, timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.used = true;
        self.flush(timeout)?;
        self.inner.await_input(timeout)
    }

    /// Asked when ureq would keep a connection (after a request: `used`) and when the pool
    /// takes it out; only the second looks at the socket.
    fn is_open(&mut self) -> bool {
        if std::mem::take(&mut self.used) {
            return true;
        }
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}
