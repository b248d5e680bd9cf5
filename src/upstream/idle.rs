//! Every wait on an upstream: an idle timeout for response bodies, the request's own
//! deadline, and its client.
//!
//! ureq's `timeout_per_read` caps every read, including the wait for response headers, so
//! it cannot express both of our limits (the endpoint's `timeout` for headers, often many
//! minutes for a slow non-streaming generation, and `idle_timeout` between body pieces).
//! This connector wraps the transport of every upstream connection and applies the idle
//! limit only to reads made while receiving a body.
//!
//! Two more limits come from the request being served on this thread (`watching`): a
//! deadline (`stream_timeout` until a stream's first content, `timeout` for a whole
//! non-streaming answer), and its client: a wait is cut into slices of `CLIENT_CHECK`, and
//! between two slices a client that has gone away ends the upstream request (its
//! connection is dropped, so generation and its cost stop). A healthy ten-minute stream is
//! never cut.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};
use ureq::Timeout;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};

/// How often a wait on an upstream looks at its client.
pub const CLIENT_CHECK: Duration = Duration::from_millis(500);

/// What the upstream waits of the request served on this thread watch.
#[derive(Default)]
struct Watch {
    /// When this request's waits end, and what to say then.
    deadline: Option<(Instant, &'static str)>,
    client_gone: Option<Rc<dyn Fn() -> bool>>,
    /// Set once a wait found the client gone.
    gone: bool,
}

thread_local! {
    static WATCH: RefCell<Watch> = RefCell::new(Watch::default());
}

/// Runs `serve` with every upstream wait on this thread watching `client_gone` (at most
/// every `CLIENT_CHECK`); the watch ends with `serve`, even if it panics.
pub fn watching<T>(client_gone: impl Fn() -> bool + 'static, serve: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            WATCH.with(|w| *w.borrow_mut() = Watch::default());
        }
    }
    WATCH.with(|w| {
        *w.borrow_mut() = Watch {
            client_gone: Some(Rc::new(client_gone)),
            ..Watch::default()
        }
    });
    let _reset = Reset;
    serve()
}

/// From now on, this thread's upstream waits end at `deadline` with an error saying
/// `what`; `None` lifts it.
pub fn set_deadline(deadline: Option<(Instant, &'static str)>) {
    WATCH.with(|w| w.borrow_mut().deadline = deadline);
}

/// True once an upstream wait of this request found its client gone.
pub fn client_went_away() -> bool {
    WATCH.with(|w| w.borrow().gone)
}

/// How the next slice of a wait of `left` ends.
enum Cut {
    /// The wait ureq asked for is over.
    Limit,
    /// The request's deadline.
    Deadline(&'static str),
    /// Time to look at the client.
    Check,
}

/// The next slice of a wait with `left` to go (None: no limit of ureq's own); None when
/// nothing limits it at all.
fn next_slice(left: Option<Duration>) -> Option<(Duration, Cut)> {
    WATCH.with(|w| {
        let w = w.borrow();
        let mut slice = left.map(|left| (left, Cut::Limit));
        let mut cap = |length: Duration, cut: Cut| {
            if slice.as_ref().is_none_or(|(current, _)| length < *current) {
                slice = Some((length, cut));
            }
        };
        if let Some((at, what)) = w.deadline {
            cap(
                at.saturating_duration_since(Instant::now()),
                Cut::Deadline(what),
            );
        }
        if w.client_gone.is_some() {
            cap(CLIENT_CHECK, Cut::Check);
        }
        slice
    })
}

/// Looks at the client (a system call, outside the borrow).
fn client_is_gone() -> bool {
    let check = WATCH.with(|w| w.borrow().client_gone.clone());
    let gone = check.is_some_and(|gone| gone());
    if gone {
        WATCH.with(|w| w.borrow_mut().gone = true);
    }
    gone
}

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

    /// ureq passes the time left of the call, which shrinks by microseconds from one write
    /// to the next, and sets the socket's send timeout whenever it changes: a system call
    /// per write. Rounded up to whole seconds it stays the same from request to request.
    fn transmit_output(
        &mut self,
        amount: usize,
        mut timeout: NextTimeout,
    ) -> Result<(), ureq::Error> {
        if !timeout.after.is_not_happening() {
            timeout.after = Duration::from_secs(timeout.after.as_secs_f64().ceil() as u64).into();
        }
        self.inner.transmit_output(amount, timeout)
    }

    /// Body reads get the idle limit as their per-read timeout. ureq reports the body phase
    /// as `RecvBody` only when a body budget is configured, so agents set a very long one.
    /// The wait is then made in slices, so that the request's deadline and its client are
    /// looked at while it lasts.
    fn await_input(&mut self, mut timeout: NextTimeout) -> Result<bool, ureq::Error> {
        if timeout.reason == Timeout::RecvBody {
            timeout.per_read = Some(self.idle.into());
        }
        let limit = timeout.for_read();
        let started = Instant::now();
        loop {
            let left = (!limit.after.is_not_happening())
                .then(|| limit.after.saturating_sub(started.elapsed()));
            let Some((slice, cut)) = next_slice(left) else {
                return self.inner.await_input(limit);
            };
            let slice_timeout = NextTimeout {
                after: slice.into(),
                ..limit
            };
            match self.inner.await_input(slice_timeout) {
                Err(ureq::Error::Timeout(_)) => match cut {
                    Cut::Limit => return Err(ureq::Error::Timeout(limit.reason)),
                    Cut::Deadline(what) => {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, what).into());
                    }
                    Cut::Check if client_is_gone() => {
                        let gone = "the client went away";
                        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, gone).into());
                    }
                    Cut::Check => {}
                },
                other => return other,
            }
        }
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}
