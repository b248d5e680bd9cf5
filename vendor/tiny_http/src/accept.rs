//! The accept loop and the life of one connection. Rewritten for failover-proxy (see
//! vendor/README.md): an error never ends the loop, every connection is registered (and
//! bounded), and a handler may serve each request on its connection's own thread.

use std::io::Error as IoError;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::client::ClientConnection;
use crate::connection::{Connection, Listener};
use crate::limits::Limits;
use crate::registry::{Admission, Registered, Registry};
use crate::util::{MessagesQueue, RefinedTcpStream, TaskPool};
use crate::{Message, Request};

/// Where a connection's requests go.
#[derive(Clone)]
pub(crate) enum Deliver {
    /// Queued for `Server::recv`.
    Queue(Arc<MessagesQueue<Message>>),
    /// Served on the connection's thread, one after the other.
    Handler(Arc<dyn Fn(Request) + Send + Sync>),
}

pub(crate) struct Accept {
    pub(crate) listener: Listener,
    pub(crate) close: Arc<AtomicBool>,
    pub(crate) limits: Arc<Limits>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) deliver: Deliver,
}

/// The first wait after a failed `accept` (out of descriptors, of buffers, a connection
/// aborted before it was taken); it doubles up to `MAX_BACKOFF` while failures go on.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

impl Accept {
    /// Accepts until the server closes; a failure is logged, waited out and retried.
    pub(crate) fn run(self) {
        let pool = TaskPool::new(self.limits.ready_threads);
        let mut backoff = FIRST_BACKOFF;
        while !self.close.load(Relaxed) {
            let failure = match self.listener.accept() {
                Ok((sock, _)) => self.admit(sock, &pool).err(),
                Err(e) => Some(e),
            };
            match failure {
                None => backoff = FIRST_BACKOFF,
                Some(e) if self.close.load(Relaxed) => log::debug!("accept: {e}"),
                Some(e) => {
                    log::warn!("accepting a connection failed: {e}; retrying in {backoff:?}");
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        log::debug!("Terminating accept thread");
    }

    /// Registers a new connection and gives it a thread; a connection with no place gets
    /// 529 at once. Errors are the process's own (descriptors, threads), worth a back-off.
    fn admit(&self, sock: Connection, pool: &TaskPool) -> Result<(), IoError> {
        if self.close.load(Relaxed) {
            return Ok(());
        }
        let (read, write) = RefinedTcpStream::new(sock)?;
        let mut client = ClientConnection::new(write, read, self.limits.clone());
        let (admission, registered) = self.registry.admit(client.state());
        match admission {
            Admission::Refused => {
                let message = "every connection the proxy may hold is busy; retry shortly";
                client.refuse_now(529, message);
                return Ok(());
            }
            Admission::Overflow => client.state().overflow.store(true, Relaxed),
            Admission::Admitted => {}
        }
        let deliver = self.deliver.clone();
        let mut task = Some((client, registered));
        pool.spawn(Box::new(move || {
            if let Some((client, registered)) = task.take() {
                serve(client, registered, &deliver);
            }
        }))
    }
}

/// The life of one connection on its thread.
fn serve(client: ClientConnection, _registered: Option<Registered>, deliver: &Deliver) {
    match deliver {
        Deliver::Handler(handler) => client.for_each(|rq| handler(rq)),
        // Synchronization is needed for HTTPS requests to avoid a deadlock
        Deliver::Queue(messages) if client.secure() => {
            let (sender, receiver) = mpsc::channel();
            for rq in client {
                messages.push(rq.with_notify_sender(sender.clone()).into());
                receiver.recv().ok();
            }
        }
        Deliver::Queue(messages) => client.for_each(|rq| messages.push(rq.into())),
    }
}
