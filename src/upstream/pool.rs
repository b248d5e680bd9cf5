//! Idle upstream connections, kept here rather than in ureq's pool.
//!
//! ureq's pool walks all its idle connections twice per request, under one mutex (it
//! recounts every host's connections and compares every key): 5-8 % of the proxy's CPU at
//! 16 to 64 client connections, and a thread preempted inside that walk stalls all the
//! others. Here each host has a stack: a request done with a connection puts it on top, the
//! next request takes the top, both in constant time. The connections in use stay warm, and
//! a burst's surplus sinks to the bottom, where it ages out. The liveness probe of a
//! connection taken out (the upstream may have closed it meanwhile) runs outside the lock.
//!
//! How ureq hands connections over: its own pool is off (`max_idle_connections(0)`), so a
//! connection it would keep is dropped at once. Before that, and only then, it asks the
//! connection `is_open` (after a request that left it reusable: answer read to the end,
//! keep-alive); a `true` there is what brings the dropped connection back here. A
//! connection that ends any other way is closed.
//!
//! Only the connections ureq asks for are kept. An HTTP proxy's tunnel is opened over a
//! connection to the proxy that ureq makes from inside this connector (its CONNECT
//! connector runs the whole chain again): that one is part of the tunnel, never kept on
//! its own, or the next tunnel's CONNECT would go through the old tunnel.

use parking_lot::Mutex;
use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use ureq::http::Uri;
use ureq::http::uri::{Authority, Scheme};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, NextTimeout, ShutdownHandle, Transport,
};

/// Around the whole connector chain: a kept connection, or a new one from `inner`.
pub struct PoolConnector<C: Connector> {
    inner: C,
    idle: Arc<Idle<C::Out>>,
}

impl<C: Connector> PoolConnector<C> {
    /// At most `per_host` idle connections per host, none idle longer than `max_age`.
    pub fn new(inner: C, per_host: usize, max_age: Duration) -> Self {
        PoolConnector {
            inner,
            idle: Arc::new(Idle::new(per_host, max_age)),
        }
    }

    /// A new connection from `inner`; one that `inner` makes meanwhile, for this one,
    /// goes to no pool.
    ///
    /// Its socket is not registered with ureq for `Agent::shutdown` (which this crate
    /// never calls): ureq keeps every registered socket's handle in a list that it walks
    /// under its pool's mutex twice per request, O(open connections) each time, 1,000
    /// with as many streams open.
    fn fresh(&self, details: &ConnectionDetails) -> Result<Option<C::Out>, ureq::Error> {
        struct Making;
        impl Drop for Making {
            fn drop(&mut self) {
                MAKING.set(false);
            }
        }
        let unregistered = ConnectionDetails {
            uri: details.uri,
            addrs: details.addrs.clone(),
            config: details.config,
            request_level: details.request_level,
            resolver: details.resolver,
            now: details.now,
            timeout: details.timeout,
            current_time: details.current_time.clone(),
            run_connector: details.run_connector.clone(),
            register_shutdown: Arc::new(|_: Weak<dyn ShutdownHandle>| Ok(())),
        };
        MAKING.set(true);
        let _making = Making;
        self.inner.connect(&unregistered, None)
    }
}

thread_local! {
    /// Set while this thread makes a connection through `inner`.
    static MAKING: Cell<bool> = const { Cell::new(false) };
}

impl<C: Connector> fmt::Debug for PoolConnector<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConnector")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<C: Connector> Connector for PoolConnector<C> {
    type Out = Pooled<C::Out>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _: Option<()>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if MAKING.get() {
            // Part of the connection being made (a proxy tunnel's): never kept.
            let part = self.inner.connect(details, None)?;
            return Ok(part.map(|t| Pooled::new(t, usize::MAX, Weak::new())));
        }
        let host = self.idle.host(details.uri);
        let lend = |t| Pooled::new(t, host, Arc::downgrade(&self.idle));
        while let Some(mut transport) = self.idle.take(host, Instant::now()) {
            if transport.is_open() {
                return Ok(Some(lend(transport)));
            }
        }
        Ok(self.fresh(details)?.map(lend))
    }
}

/// A connection lent to ureq; back to the pool when dropped, if ureq found it reusable
/// and the pool is still there (its agent may have gone with a reloaded config while
/// this connection streamed: then it is closed, as are the pool's).
pub struct Pooled<T: Transport> {
    /// `Some` until dropped.
    inner: Option<T>,
    host: usize,
    idle: Weak<Idle<T>>,
    reusable: bool,
}

impl<T: Transport> Pooled<T> {
    /// Lent from `idle`'s `host`; `Weak::new()` for a connection never kept.
    fn new(transport: T, host: usize, idle: Weak<Idle<T>>) -> Self {
        Pooled {
            inner: Some(transport),
            host,
            idle,
            reusable: false,
        }
    }

    fn inner(&mut self) -> &mut T {
        self.inner
            .as_mut()
            .expect("a pooled transport is used only before it is dropped")
    }
}

impl<T: Transport> Drop for Pooled<T> {
    fn drop(&mut self) {
        if let (true, Some(idle)) = (self.reusable, self.idle.upgrade()) {
            let transport = self.inner.take().expect("dropped once");
            idle.put(self.host, transport, Instant::now());
        }
    }
}

impl<T: Transport> fmt::Debug for Pooled<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pooled")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<T: Transport> Transport for Pooled<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner().buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.inner().transmit_output(amount, timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.inner().await_input(timeout)
    }

    /// ureq asks only when it would keep the connection (see the module's doc).
    fn is_open(&mut self) -> bool {
        self.reusable = self.inner().is_open();
        self.reusable
    }

    fn is_tls(&self) -> bool {
        self.inner.as_ref().is_some_and(T::is_tls)
    }
}

/// The idle connections of every host one agent talks to. Hosts come from the endpoints'
/// `base_url`s (ureq follows no redirect), so they are few and never removed: a host is
/// an index that stays valid.
struct Idle<T> {
    hosts: Mutex<Vec<Host<T>>>,
    per_host: usize,
    max_age: Duration,
}

/// One scheme and authority (an agent has one outbound proxy, so that is the whole key):
/// its idle connections, oldest first, each with the time it came back.
struct Host<T> {
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    parked: VecDeque<(T, Instant)>,
}

impl<T> Idle<T> {
    fn new(per_host: usize, max_age: Duration) -> Self {
        Idle {
            hosts: Mutex::new(Vec::new()),
            per_host,
            max_age,
        }
    }

    /// The host of `uri`, added when it is new.
    fn host(&self, uri: &Uri) -> usize {
        let (scheme, authority) = (uri.scheme(), uri.authority());
        let mut hosts = self.hosts.lock();
        let known = hosts
            .iter()
            .position(|h| h.scheme.as_ref() == scheme && h.authority.as_ref() == authority);
        known.unwrap_or_else(|| {
            hosts.push(Host {
                scheme: scheme.cloned(),
                authority: authority.cloned(),
                parked: VecDeque::new(),
            });
            hosts.len() - 1
        })
    }

    /// The connection of `host` back most recently, unless it has waited `max_age`
    /// (then all of that host's have, and they are closed, outside the lock).
    fn take(&self, host: usize, now: Instant) -> Option<T> {
        let mut hosts = self.hosts.lock();
        let parked = &mut hosts[host].parked;
        let (transport, since) = parked.pop_back()?;
        if now.saturating_duration_since(since) < self.max_age {
            return Some(transport);
        }
        let stale = std::mem::take(parked);
        drop(hosts);
        drop((transport, stale));
        None
    }

    /// Parks `transport` on top of `host`'s stack. The oldest beyond `per_host`, and any
    /// host's that have waited `max_age`, are closed (outside the lock).
    fn put(&self, host: usize, transport: T, now: Instant) {
        let mut closing = Vec::new();
        let mut hosts = self.hosts.lock();
        hosts[host].parked.push_back((transport, now));
        if hosts[host].parked.len() > self.per_host {
            closing.extend(hosts[host].parked.pop_front());
        }
        for parked in hosts.iter_mut().map(|h| &mut h.parked) {
            while parked
                .front()
                .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= self.max_age)
            {
                closing.extend(parked.pop_front());
            }
        }
        drop(hosts);
        drop(closing);
    }

    #[cfg(test)]
    fn parked(&self, host: usize) -> usize {
        self.hosts.lock()[host].parked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use ureq::unversioned::transport::LazyBuffers;

    const AGE: Duration = Duration::from_secs(15);

    fn uri(text: &str) -> Uri {
        text.parse().unwrap()
    }

    /// A transport that only says whether it is open, and counts its closes.
    #[derive(Debug)]
    struct Fake {
        open: bool,
        closed: Arc<AtomicUsize>,
        buffers: LazyBuffers,
    }

    impl Transport for Fake {
        fn buffers(&mut self) -> &mut dyn Buffers {
            &mut self.buffers
        }
        fn transmit_output(&mut self, _: usize, _: NextTimeout) -> Result<(), ureq::Error> {
            Ok(())
        }
        fn await_input(&mut self, _: NextTimeout) -> Result<bool, ureq::Error> {
            Ok(false)
        }
        fn is_open(&mut self) -> bool {
            self.open
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A connection of host 0 lent to ureq.
    fn lent(idle: &Arc<Idle<Fake>>, open: bool, closed: &Arc<AtomicUsize>) -> Pooled<Fake> {
        let fake = Fake {
            open,
            closed: closed.clone(),
            buffers: LazyBuffers::new(1, 1),
        };
        Pooled::new(fake, 0, Arc::downgrade(idle))
    }

    #[test]
    fn a_lent_connection_comes_back_only_when_ureq_found_it_reusable() {
        let idle = Arc::new(Idle::new(4, AGE));
        let host = idle.host(&uri("http://a:1/"));
        let closed = Arc::new(AtomicUsize::new(0));
        let state = |idle: &Idle<Fake>| (idle.parked(host), closed.load(Ordering::SeqCst));
        // ureq asked, and it is open: kept.
        let mut kept = lent(&idle, true, &closed);
        assert!(kept.is_open());
        drop(kept);
        assert_eq!(state(&idle), (1, 0));
        // Dropped unasked (`connection: close`, a body left unread, an error): closed.
        drop(lent(&idle, true, &closed));
        assert_eq!(state(&idle), (1, 1));
        // Asked, and the upstream had closed it: closed.
        let mut dead = lent(&idle, false, &closed);
        assert!(!dead.is_open());
        drop(dead);
        assert_eq!(state(&idle), (1, 2));
        // Its pool went (a reload replaced the agent) while it was lent: closed, as the
        // pool's own were.
        let mut late = lent(&idle, true, &closed);
        assert!(late.is_open());
        drop(idle);
        assert_eq!(closed.load(Ordering::SeqCst), 3);
        drop(late);
        assert_eq!(closed.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_host_is_its_scheme_and_authority() {
        let idle: Idle<u32> = Idle::new(4, AGE);
        let a = idle.host(&uri("https://api.example.com/v1/messages"));
        assert_eq!(idle.host(&uri("https://API.example.com/other")), a);
        let http = idle.host(&uri("http://api.example.com/v1/messages"));
        let port = idle.host(&uri("https://api.example.com:8443/v1/messages"));
        let user = idle.host(&uri("https://user@api.example.com/v1/messages"));
        let all = [a, http, port, user];
        assert_eq!(all, [0, 1, 2, 3], "four different hosts");
    }

    #[test]
    fn the_connection_back_last_goes_out_first_and_only_to_its_host() {
        let idle = Idle::new(4, AGE);
        let (a, b) = (
            idle.host(&uri("http://a:1/")),
            idle.host(&uri("http://b:1/")),
        );
        let now = Instant::now();
        idle.put(a, 1, now);
        idle.put(a, 2, now);
        idle.put(b, 3, now);
        assert_eq!(idle.take(a, now), Some(2));
        assert_eq!(idle.take(a, now), Some(1));
        assert_eq!(idle.take(a, now), None);
        assert_eq!(idle.take(b, now), Some(3));
    }

    #[test]
    fn beyond_per_host_the_oldest_is_closed() {
        let idle = Idle::new(2, AGE);
        let a = idle.host(&uri("http://a:1/"));
        let now = Instant::now();
        for n in 1..=3 {
            idle.put(a, n, now);
        }
        assert_eq!(idle.parked(a), 2);
        assert_eq!(idle.take(a, now), Some(3));
        assert_eq!(idle.take(a, now), Some(2));
        assert_eq!(idle.take(a, now), None);
    }

    #[test]
    fn a_connection_idle_for_max_age_is_never_handed_out() {
        let idle = Idle::new(4, AGE);
        let (a, b) = (
            idle.host(&uri("http://a:1/")),
            idle.host(&uri("http://b:1/")),
        );
        let start = Instant::now();
        idle.put(a, 1, start);
        idle.put(a, 2, start + Duration::from_secs(1));
        idle.put(b, 3, start + Duration::from_secs(2));
        // Both of a's have waited too long: none is handed out, both are closed.
        assert_eq!(idle.take(a, start + AGE + Duration::from_secs(1)), None);
        assert_eq!(idle.parked(a), 0);
        // A return to one host closes the stale ones of every host.
        idle.put(a, 4, start + AGE + Duration::from_secs(2));
        assert_eq!(idle.parked(b), 0);
        assert_eq!(idle.take(a, start + AGE + Duration::from_secs(2)), Some(4));
    }
}
