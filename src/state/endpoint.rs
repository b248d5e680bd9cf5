//! One upstream endpoint at run time: its validated config, its health behind a
//! `parking_lot::Mutex`, its last quota report and its token usage (a lock each), its
//! run-time switches, and the ureq agent that reaches it.
//!
//! Every read returns an owned snapshot and every write is one short call under one lock:
//! no guard ever leaves this module, so no lock can be held across network I/O by
//! accident, and no two of these locks are ever held together.

use crate::config::validated::EndpointConfig;
use crate::quota::Report;
use crate::state::health::{HealthStatus, Outcome, Verdict};
use crate::state::sync::Mutex;
use crate::usage::{Book, Usage, utc_day};
use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};
use ureq::http::{HeaderName, HeaderValue};

pub use crate::endpoint_id::EndpointId;

pub struct Endpoint {
    pub config: EndpointConfig,
    pub agent: ureq::Agent,
    enabled: AtomicBool,
    in_flight: AtomicUsize,
    /// Recovery probes sent to this endpoint (qcc's `endpoint_verify_counts`).
    probes: AtomicU64,
    health: Mutex<HealthStatus>,
    quota: Mutex<Quota>,
    usage: Mutex<Book>,
    /// The header(s) carrying the key, built once (`upstream::call::key_headers`): every
    /// attempt sends them, and building them cost allocations on each.
    pub key_headers: OnceLock<Vec<(HeaderName, HeaderValue)>>,
    /// The `host` header of its requests, built once (`upstream::call::host_header`).
    pub host_header: OnceLock<Option<HeaderValue>>,
}

/// The last rate-limit report an answer carried, and until when it keeps the endpoint
/// out of rotation (not a failure: its health is untouched).
#[derive(Clone, Debug, Default)]
pub struct Quota {
    pub report: Option<Report>,
    pub skip_until: Option<Instant>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.config.name, self.config.id)
    }
}

impl Endpoint {
    pub fn new(config: EndpointConfig, agent: ureq::Agent) -> Endpoint {
        Endpoint {
            enabled: AtomicBool::new(config.enabled),
            in_flight: AtomicUsize::new(0),
            probes: AtomicU64::new(0),
            health: Mutex::new(HealthStatus::default()),
            quota: Mutex::new(Quota::default()),
            usage: Mutex::new(Book::default()),
            key_headers: OnceLock::new(),
            host_header: OnceLock::new(),
            config,
            agent,
        }
    }

    /// The same endpoint (same id) under a reloaded config: it keeps its health and
    /// counters, as the contract requires, and takes the new settings and agent.
    pub fn successor(&self, config: EndpointConfig, agent: ureq::Agent) -> Endpoint {
        let next = Endpoint::new(config, agent);
        *next.health.lock() = self.health();
        *next.quota.lock() = self.quota();
        *next.usage.lock() = self.usage();
        next.probes.store(self.probes(), Ordering::Relaxed);
        next
    }

    pub fn id(&self) -> EndpointId {
        self.config.id
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Records one attempt in a single lock scope.
    pub fn record(&self, outcome: &Outcome, elapsed: Duration) -> Verdict {
        let max_failures = self.config.max_failures;
        // Clocks are read before the lock: they were most of its hold time.
        let (now, wall) = (Instant::now(), SystemTime::now());
        self.health
            .lock()
            .record(outcome, elapsed, max_failures, now, wall)
    }

    pub fn reset_to_healthy(&self) {
        self.health.lock().reset_to_healthy();
    }

    pub fn health(&self) -> HealthStatus {
        self.health.lock().clone()
    }

    /// Cooling down after a 429.
    pub fn is_cooling(&self, now: Instant) -> bool {
        self.health.lock().is_cooling(now)
    }

    /// Keeps an answer's rate-limit report. With `skip_for` (the wait the report asks
    /// for), the endpoint is out of rotation until then; true when that starts a skip
    /// (for the log line). While a skip lasts, a report that does not ask for one is
    /// stale: it comes from a request sent before the endpoint was skipped (a skipped
    /// endpoint gets no new ones), answered after the one that spent the quota, and must
    /// not bring the endpoint back before its reset. A later skip extends the current one.
    pub fn note_quota(&self, report: Report, skip_for: Option<Duration>) -> bool {
        let now = Instant::now();
        let skip_until = skip_for.and_then(|d| now.checked_add(d));
        let mut quota = self.quota.lock();
        let current = quota.skip_until.filter(|&t| t > now);
        if current.is_some() && skip_until.is_none() {
            return false;
        }
        *quota = Quota {
            report: Some(report),
            skip_until: skip_until.max(current),
        };
        current.is_none() && skip_until.is_some()
    }

    /// Out of rotation because its last answer said its quota is spent.
    pub fn is_spent(&self, now: Instant) -> bool {
        self.quota
            .lock()
            .skip_until
            .is_some_and(|until| until > now)
    }

    pub fn quota(&self) -> Quota {
        self.quota.lock().clone()
    }

    /// Adds one answer's token usage to the endpoint's book.
    pub fn count_usage(&self, model: &str, usage: &Usage) {
        let day = utc_day(SystemTime::now());
        self.usage.lock().add(model, usage, day);
    }

    pub fn usage(&self) -> Book {
        self.usage.lock().clone()
    }

    /// When the current trouble began (panic mode picks the oldest).
    pub fn out_since(&self) -> Option<Instant> {
        self.health.lock().out_since
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn count_probe(&self) {
        self.probes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    /// Counts this request in flight until the guard drops (least_connections reads it).
    pub fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// An attempt, unless `max_in_flight` attempts are in progress already: the check and
    /// the count are one atomic step, so concurrent requests never exceed the cap.
    pub fn try_begin(&self) -> Option<InFlight<'_>> {
        let Some(cap) = self.config.max_in_flight else {
            return Some(self.begin());
        };
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(self))
    }

    /// True while `max_in_flight` attempts are in progress: skipped for new ones.
    pub fn is_full(&self) -> bool {
        self.config
            .max_in_flight
            .is_some_and(|cap| self.in_flight.load(Ordering::Acquire) >= cap)
    }
}

pub struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Limit;

    fn report(remaining: u64) -> Report {
        Report {
            requests: Limit {
                remaining: Some(remaining),
                ..Limit::default()
            },
            ..Report::default()
        }
    }

    #[test]
    fn a_stale_report_does_not_end_a_skip_and_a_later_one_extends_it() {
        let config =
            EndpointConfig::with_defaults("ep", "http://127.0.0.1:9", "sk-unit-1").unwrap();
        let e = Endpoint::new(config, ureq::Agent::new_with_defaults());
        let now = Instant::now();
        assert!(!e.note_quota(report(5), None));
        assert!(!e.is_spent(now));
        // The answer that spends the quota starts the skip (and says so once).
        assert!(e.note_quota(report(0), Some(Duration::from_secs(60))));
        let until = e.quota().skip_until.unwrap();
        // An answer to a request sent before it, with a request still left: stale.
        assert!(!e.note_quota(report(1), None));
        assert_eq!(e.quota().skip_until, Some(until));
        assert_eq!(e.quota().report, Some(report(0)));
        // A shorter skip does not shorten it; a longer one extends it, without a new start.
        assert!(!e.note_quota(report(0), Some(Duration::from_secs(1))));
        assert_eq!(e.quota().skip_until, Some(until));
        assert!(!e.note_quota(report(0), Some(Duration::from_secs(120))));
        assert!(e.quota().skip_until.unwrap() > until);
        assert!(e.is_spent(Instant::now()));
    }
}
