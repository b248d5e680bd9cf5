//! Upstream host names looked up once a minute, not once a request.
//!
//! ureq asks its resolver on every request, before it looks in its connection pool, and
//! its own resolver calls `getaddrinfo` each time: for a name in `/etc/hosts` that is the
//! file read again (8 system calls, measured with `strace -c`), for any other name a DNS
//! query, a network round trip, on every request, even one that goes out on a pooled
//! connection. A DNS outage then fails every request, to endpoints whose connections are
//! open and well. Here each answer is kept for `FRESH`; past that, one request looks the
//! name up again while the others go on with the answer they have, and a lookup that fails
//! keeps the last answer (for at most `STALE`, logged; the next try after `RETRY`), as
//! nginx and HAProxy keep theirs.

use parking_lot::Mutex;
use std::time::{Duration, Instant};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long an answer is used before the name is looked up again.
const FRESH: Duration = Duration::from_secs(60);

/// How long the last answer stands in for lookups that fail.
const STALE: Duration = Duration::from_secs(3600);

/// After a failed lookup, the next one waits this long (at most `fresh`): a DNS outage
/// costs one lookup every few seconds, not one per request.
const RETRY: Duration = Duration::from_secs(5);

/// A refresh not over after this long is taken as abandoned (its request panicked, say), so
/// that the next request refreshes instead of the old answer standing for ever.
const ABANDONED: Duration = Duration::from_secs(60);

/// At most this many names are kept (a config names a handful); past it the oldest goes.
const MAX_NAMES: usize = 256;

/// A resolver that keeps `inner`'s answers (ureq's `DefaultResolver` in every agent).
#[derive(Debug)]
pub struct CachingResolver<R = DefaultResolver> {
    inner: R,
    answers: Mutex<Vec<Answer>>,
    fresh: Duration,
    stale: Duration,
}

#[derive(Debug)]
struct Answer {
    /// As the request's URI gives them (the scheme decides a port left out).
    scheme: String,
    authority: String,
    addrs: ResolvedSocketAddrs,
    /// When `addrs` were found.
    at: Instant,
    /// Until when `addrs` are used without a new lookup.
    until: Instant,
    /// Since when a request is looking the name up again; the others use `addrs`
    /// meanwhile.
    refreshing: Option<Instant>,
}

impl Answer {
    fn is(&self, scheme: &str, authority: &str) -> bool {
        self.authority == authority && self.scheme == scheme
    }
}

impl CachingResolver {
    pub fn new() -> CachingResolver {
        CachingResolver::with(DefaultResolver::default(), FRESH, STALE)
    }
}

impl Default for CachingResolver {
    fn default() -> CachingResolver {
        CachingResolver::new()
    }
}

impl<R: Resolver> CachingResolver<R> {
    fn with(inner: R, fresh: Duration, stale: Duration) -> CachingResolver<R> {
        CachingResolver {
            inner,
            answers: Mutex::new(Vec::new()),
            fresh,
            stale,
        }
    }

    /// The answer to use without a lookup, if there is one; None means this caller looks
    /// the name up (an old answer's refresh is claimed, so the others go on using it).
    /// One short lock; the lookup itself happens outside it.
    fn cached(&self, scheme: &str, authority: &str, now: Instant) -> Option<ResolvedSocketAddrs> {
        let mut answers = self.answers.lock();
        let answer = answers.iter_mut().find(|a| a.is(scheme, authority))?;
        let refreshing = answer
            .refreshing
            .is_some_and(|since| now.saturating_duration_since(since) < ABANDONED);
        if now < answer.until || refreshing {
            return Some(answer.addrs.clone());
        }
        answer.refreshing = Some(now);
        None
    }

    /// Keeps a new answer for the name.
    fn keep(&self, scheme: &str, authority: &str, addrs: &ResolvedSocketAddrs) {
        let now = Instant::now();
        let mut answers = self.answers.lock();
        match answers.iter_mut().find(|a| a.is(scheme, authority)) {
            Some(answer) => {
                answer.addrs = addrs.clone();
                answer.at = now;
                answer.until = now + self.fresh;
                answer.refreshing = None;
            }
            None => {
                if answers.len() >= MAX_NAMES {
                    answers.remove(0);
                }
                answers.push(Answer {
                    scheme: scheme.to_string(),
                    authority: authority.to_string(),
                    addrs: addrs.clone(),
                    at: now,
                    until: now + self.fresh,
                    refreshing: None,
                });
            }
        }
    }

    /// After a failed lookup: the last answer and its age while it is not stale (tried
    /// again after `RETRY`); a stale one is dropped.
    fn failed(&self, scheme: &str, authority: &str) -> Option<(ResolvedSocketAddrs, Duration)> {
        let now = Instant::now();
        let mut answers = self.answers.lock();
        let index = answers.iter().position(|a| a.is(scheme, authority))?;
        let answer = &mut answers[index];
        let age = now.saturating_duration_since(answer.at);
        if age >= self.stale {
            answers.remove(index);
            return None;
        }
        answer.until = now + RETRY.min(self.fresh);
        answer.refreshing = None;
        Some((answer.addrs.clone(), age))
    }
}

impl<R: Resolver> Resolver for CachingResolver<R> {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return self.inner.resolve(uri, config, timeout);
        };
        let name = authority.as_str();
        if let Some(addrs) = self.cached(scheme, name, Instant::now()) {
            return Ok(addrs);
        }
        match self.inner.resolve(uri, config, timeout) {
            Ok(addrs) => {
                self.keep(scheme, name, &addrs);
                Ok(addrs)
            }
            Err(e) => {
                let Some((addrs, age)) = self.failed(scheme, name) else {
                    return Err(e);
                };
                // The host only: an authority may carry credentials.
                log::warn!(
                    "looking up {} failed ({e}); using the addresses found {} s ago",
                    authority.host(),
                    age.as_secs()
                );
                Ok(addrs)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Answers `10.0.0.<n>` for its n-th lookup, or fails when told to.
    #[derive(Debug, Default)]
    struct Counting {
        lookups: AtomicUsize,
        failing: AtomicBool,
    }

    impl Resolver for Counting {
        fn resolve(
            &self,
            _: &Uri,
            _: &Config,
            _: NextTimeout,
        ) -> Result<ResolvedSocketAddrs, ureq::Error> {
            let n = self.lookups.fetch_add(1, Ordering::SeqCst) + 1;
            if self.failing.load(Ordering::SeqCst) {
                return Err(ureq::Error::HostNotFound);
            }
            let mut addrs = self.empty();
            addrs.push(SocketAddr::from(([10, 0, 0, n as u8], 443)));
            Ok(addrs)
        }
    }

    fn lookup<R: Resolver>(resolver: &CachingResolver<R>, uri: &str) -> Option<SocketAddr> {
        let uri: Uri = uri.parse().unwrap();
        let config = ureq::Agent::config_builder().build();
        let addrs = resolver
            .resolve(&uri, &config, NextTimeout::default())
            .ok()?;
        addrs.iter().next().copied()
    }

    fn addr(last: u8) -> Option<SocketAddr> {
        Some(SocketAddr::from(([10, 0, 0, last], 443)))
    }

    #[test]
    fn an_answer_is_reused_until_it_is_old_then_looked_up_again() {
        let fresh = Duration::from_millis(300);
        let resolver = CachingResolver::with(Counting::default(), fresh, STALE);
        for _ in 0..5 {
            assert_eq!(
                lookup(&resolver, "https://relay.example/v1/messages"),
                addr(1)
            );
        }
        assert_eq!(lookup(&resolver, "https://other.example/"), addr(2));
        assert_eq!(resolver.inner.lookups.load(Ordering::SeqCst), 2);
        std::thread::sleep(fresh);
        assert_eq!(lookup(&resolver, "https://relay.example/"), addr(3));
        assert_eq!(lookup(&resolver, "https://relay.example/"), addr(3));
        assert_eq!(resolver.inner.lookups.load(Ordering::SeqCst), 3);
    }

    /// Past `fresh`, the first request claims the refresh; the others meanwhile get the
    /// answer there is, until the refresh ends or is abandoned.
    #[test]
    fn one_request_refreshes_an_old_answer_while_the_others_use_it() {
        let resolver = CachingResolver::with(Counting::default(), Duration::ZERO, STALE);
        assert_eq!(lookup(&resolver, "https://relay.example/"), addr(1));
        let now = Instant::now();
        let refreshed_by = |at: Instant| match resolver.cached("https", "relay.example", at) {
            None => "this request",
            Some(_) => "another",
        };
        assert_eq!(refreshed_by(now), "this request");
        assert_eq!(refreshed_by(now), "another");
        assert_eq!(refreshed_by(now + ABANDONED), "this request");
        assert_eq!(refreshed_by(now + ABANDONED), "another");
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_answer_until_it_is_stale() {
        let (fresh, stale) = (Duration::from_millis(100), Duration::from_millis(600));
        let resolver = CachingResolver::with(Counting::default(), fresh, stale);
        assert_eq!(lookup(&resolver, "https://relay.example/"), addr(1));
        resolver.inner.failing.store(true, Ordering::SeqCst);
        std::thread::sleep(fresh);
        assert_eq!(lookup(&resolver, "https://relay.example/"), addr(1));
        assert_eq!(resolver.inner.lookups.load(Ordering::SeqCst), 2);
        // A name never found is an error, not an old answer for some other name.
        assert_eq!(lookup(&resolver, "https://unknown.example/"), None);
        std::thread::sleep(stale);
        assert_eq!(lookup(&resolver, "https://relay.example/"), None);
        // Too old to stand in: the name is looked up on every request again.
        assert_eq!(lookup(&resolver, "https://relay.example/"), None);
        resolver.inner.failing.store(false, Ordering::SeqCst);
        assert_eq!(lookup(&resolver, "https://relay.example/"), addr(6));
        assert_eq!(lookup(&resolver, "https://relay.example/"), addr(6));
    }

    #[test]
    fn names_differ_by_port_and_the_real_resolver_answers_through_the_cache() {
        let resolver = CachingResolver::new();
        let a = lookup(&resolver, "http://127.0.0.1:8080/").unwrap();
        let b = lookup(&resolver, "http://127.0.0.1:9090/").unwrap();
        assert_eq!((a.port(), b.port()), (8080, 9090));
        assert_eq!(
            lookup(&resolver, "http://localhost:8080/").map(|a| a.port()),
            Some(8080)
        );
        assert_eq!(resolver.answers.lock().len(), 3);
    }
}
