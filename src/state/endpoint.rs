//! One upstream endpoint at run time: its validated config, its health behind a
//! `parking_lot::Mutex`, its run-time switches, and the ureq agent that reaches it.
//!
//! Every read of the health returns an owned snapshot and every write is one call to
//! `HealthStatus::record` under the lock: no guard ever leaves this module, so no lock can
//! be held across network I/O by accident.

use crate::config::validated::EndpointConfig;
use crate::state::health::{HealthStatus, Outcome, Verdict};
use crate::state::sync::Mutex;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

pub use crate::endpoint_id::EndpointId;

pub struct Endpoint {
    pub config: EndpointConfig,
    pub agent: ureq::Agent,
    enabled: AtomicBool,
    in_flight: AtomicUsize,
    /// Recovery probes sent to this endpoint (qcc's `endpoint_verify_counts`).
    probes: AtomicU64,
    health: Mutex<HealthStatus>,
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
            config,
            agent,
        }
    }

    /// The same endpoint (same id) under a reloaded config: it keeps its health and
    /// counters, as the contract requires, and takes the new settings and agent.
    pub fn successor(&self, config: EndpointConfig, agent: ureq::Agent) -> Endpoint {
        let next = Endpoint::new(config, agent);
        *next.health.lock() = self.health();
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
