//! An idle timeout for upstream response bodies: the longest wait for the next piece.
//!
//! ureq's `timeout_per_read` caps every read, including the wait for response headers, so
//! it cannot express both of our limits (the endpoint's `timeout` for headers, often many
//! minutes for a slow non-streaming generation, and `idle_timeout` between body pieces).
//! This connector wraps the transport of every upstream connection and applies the idle
//! limit only to reads made while receiving a body. There is no total body deadline: a
//! healthy ten-minute stream is never cut.

use std::fmt;
use std::time::Duration;
use ureq::Timeout;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};

/// The last link of the connector chain: wraps whatever transport came before.
#[derive(Debug, Clone, Copy)]
pub struct IdleConnector {
    pub idle: Duration,
}

impl<In: Transport> Connector<In> for IdleConnector {
    type Out = IdleTransport<In>;

    fn connect(
        &self,
        _: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        Ok(chained.map(|inner| IdleTransport {
            inner,
            idle: self.idle,
        }))
    }
}

pub struct IdleTransport<T> {
    inner: T,
    idle: Duration,
}

impl<T: fmt::Debug> fmt::Debug for IdleTransport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleTransport")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<T: Transport> Transport for IdleTransport<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.inner.transmit_output(amount, timeout)
    }

    /// Body reads get the idle limit as their per-read timeout. ureq reports the body phase
    /// as `RecvBody` only when a body budget is configured, so agents set a very long one.
    fn await_input(&mut self, mut timeout: NextTimeout) -> Result<bool, ureq::Error> {
        if timeout.reason == Timeout::RecvBody {
            timeout.per_read = Some(self.idle.into());
        }
        self.inner.await_input(timeout)
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}
