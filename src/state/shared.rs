//! The proxy's shared state: the endpoints of the current config, the failure queue, the
//! selector and the request counters, and the few operations that touch more than one of
//! them (recording an attempt, checking eligibility).
//!
//! Locks here are taken one at a time and never across I/O: an endpoint's health lock, then
//! (after it is released) the queue lock. The current generation (config + endpoints) sits
//! behind an `RwLock<Arc<_>>` that a request reads once, so a reload never blocks traffic.

use crate::config::validated::{Config, Overrides};
use crate::state::affinity::Affinity;
use crate::state::endpoint::{Endpoint, EndpointId};
use crate::state::failure_queue::FailureQueue;
use crate::state::health::{Outcome, Verdict};
use crate::state::histogram::Histogram;
use crate::state::history::History;
use crate::state::schedule::Schedule;
use crate::state::select::{Candidate, Selector};
use crate::upstream::agent;
use log::{debug, info, warn};
use parking_lot::RwLock;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// One config and the endpoints built from it.
pub struct Generation {
    pub config: Config,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub selector: Selector,
}

impl Generation {
    pub fn endpoint(&self, id: EndpointId) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.id() == id)
    }
}

/// Client-request counters, as qcc's stats name them.
#[derive(Default)]
pub struct Counters {
    pub total_requests: AtomicU64,
    pub successful_requests: AtomicU64,
    pub failed_requests: AtomicU64,
    /// Client requests answered by an endpoint other than the first one tried.
    pub failovers: AtomicU64,
    /// Client request durations (arrival to end of answer).
    pub latency: Histogram,
}

/// Where the running config came from, for reloads and the log API (`serve` sets it).
#[derive(Clone, Debug)]
pub struct Source {
    pub config_path: PathBuf,
    pub overrides: Overrides,
    pub log_file: Option<PathBuf>,
}

pub struct State {
    generation: RwLock<Arc<Generation>>,
    pub queue: FailureQueue,
    pub affinity: Affinity,
    pub schedule: Schedule,
    /// Probes run here, never on rayon's global pool: they block on the network.
    pub probe_pool: rayon::ThreadPool,
    pub counters: Counters,
    /// Each endpoint's attempts per minute over the last hour (the status page's charts).
    pub history: History,
    pub source: OnceLock<Source>,
    pub start_time: SystemTime,
    pub started: Instant,
    /// The id of the endpoint that last answered a client, `u64::MAX` before any.
    last_used: AtomicU64,
}

impl State {
    pub fn new(config: Config) -> Result<State, String> {
        let generation = build_generation(config, None)?;
        let probe_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(generation.endpoints.len().clamp(1, 4))
            .thread_name(|i| format!("probe-{i}"))
            .build()
            .map_err(|e| format!("cannot start the probe threads: {e}"))?;
        Ok(State {
            generation: RwLock::new(Arc::new(generation)),
            queue: FailureQueue::default(),
            affinity: Affinity::default(),
            schedule: Schedule::default(),
            probe_pool,
            counters: Counters::default(),
            history: History::default(),
            source: OnceLock::new(),
            start_time: SystemTime::now(),
            started: Instant::now(),
            last_used: AtomicU64::new(u64::MAX),
        })
    }

    pub fn current(&self) -> Arc<Generation> {
        self.generation.read().clone()
    }

    /// Swaps in a new config. Endpoints whose id and settings are unchanged keep their
    /// health and counters; queued endpoints that are gone leave the queue. The listen
    /// address and worker count stay as they were started.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        let old = self.current();
        if config.listen != old.config.listen || config.workers != old.config.workers {
            warn!("listen and workers changes take effect only after a restart");
        }
        let next = build_generation(config, Some(&old))?;
        for e in &old.endpoints {
            if next.endpoint(e.id()).is_none() {
                self.queue.remove(e.id());
            }
        }
        *self.generation.write() = Arc::new(next);
        Ok(())
    }

    /// Re-reads the config file the proxy was started with (SIGHUP, `POST /__qcc__/reload`).
    pub fn reload_from_source(&self) -> Result<(), String> {
        let source = self
            .source
            .get()
            .ok_or("this proxy was not started from a config file")?;
        let config =
            Config::load(&source.config_path, &source.overrides).map_err(|e| e.to_string())?;
        self.reload(config)
    }

    /// Records one attempt's outcome on an endpoint and quarantines it if the outcome
    /// says so (`record_attempt`), then counts it in the endpoint's per-minute history
    /// (its own lock, taken after the others are released).
    pub fn record(&self, endpoint: &Endpoint, outcome: &Outcome, elapsed: Duration) {
        record_attempt(&self.queue, endpoint, outcome, elapsed);
        let failed = !matches!(outcome, Outcome::Success);
        self.history
            .record(endpoint.id(), failed, elapsed, SystemTime::now());
    }

    /// Eligible for normal traffic: enabled, not queued, not cooling down, quota not spent
    /// (`is_eligible`).
    pub fn is_eligible(&self, endpoint: &Endpoint, now: Instant) -> bool {
        is_eligible(&self.queue, endpoint, now)
    }

    /// The eligible endpoints of a generation, as selection candidates.
    pub fn candidates(&self, generation: &Generation, now: Instant) -> Vec<Candidate> {
        generation
            .endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| self.is_eligible(e, now))
            .map(|(index, e)| Candidate {
                index,
                priority: e.config.priority,
                weight: e.config.weight,
                in_flight: e.in_flight(),
            })
            .collect()
    }

    pub fn note_used(&self, id: EndpointId) {
        self.last_used.store(id.0 as u64, Ordering::Relaxed);
    }

    pub fn last_used(&self) -> Option<EndpointId> {
        let v = self.last_used.load(Ordering::Relaxed);
        u32::try_from(v).ok().map(EndpointId)
    }
}

/// Records one attempt: the endpoint's health in one scope of its lock, then, that lock
/// released, the failure queue when the health says so. Two lock scopes, one after the
/// other, never nested. True when this call put the endpoint in the queue: only that call
/// logs "entered the failure queue", so the line appears once per entry however many
/// threads report the endpoint at once.
///
/// A function of the two parts it touches rather than a method of `State`, so that the
/// loom models (`src/state/models.rs`) run this very code without building a `State` (its
/// probe pool and agents) in each of their thousands of executions.
pub fn record_attempt(
    queue: &FailureQueue,
    endpoint: &Endpoint,
    outcome: &Outcome,
    elapsed: Duration,
) -> bool {
    let verdict = endpoint.record(outcome, elapsed);
    match outcome {
        Outcome::Success => false,
        Outcome::RateLimited { until, reason } => {
            let secs = until
                .saturating_duration_since(Instant::now())
                .as_secs_f64();
            info!(
                "endpoint {} ({}) cools down for {secs:.1}s: {reason}",
                endpoint.name(),
                endpoint.id()
            );
            false
        }
        Outcome::AuthFailure(reason) | Outcome::Failure(reason) => {
            warn!(
                "endpoint {} ({}) failed: {reason}",
                endpoint.name(),
                endpoint.id()
            );
            verdict == Verdict::Quarantine && quarantine(queue, endpoint, reason)
        }
    }
}

/// Puts the endpoint in the failure queue; only the call that adds it logs at info, and
/// returns true.
fn quarantine(queue: &FailureQueue, endpoint: &Endpoint, reason: &str) -> bool {
    let added = queue.add(endpoint.id());
    if added {
        info!(
            "endpoint {} ({}) entered the failure queue: {reason}",
            endpoint.name(),
            endpoint.id()
        );
    } else {
        debug!(
            "endpoint {} ({}) is already in the failure queue",
            endpoint.name(),
            endpoint.id()
        );
    }
    added
}

/// Eligible for normal traffic: enabled, not queued, not cooling down, quota not spent.
/// The queue's lock, then the health's, then the quota's, one after the other. (A
/// function of its parts for the same reason as `record_attempt`.)
pub fn is_eligible(queue: &FailureQueue, endpoint: &Endpoint, now: Instant) -> bool {
    endpoint.is_enabled()
        && !endpoint.is_full()
        && !queue.contains(endpoint.id())
        && !endpoint.is_cooling(now)
        && !endpoint.is_spent(now)
}

/// Builds a generation; an endpoint whose id was in the `previous` one keeps its health
/// and counters (a reload must not forget what it knows of an endpoint it still has).
pub fn build_generation(
    config: Config,
    previous: Option<&Generation>,
) -> Result<Generation, String> {
    let mut shared = agent::SharedAgents::default();
    // Agents carry the connect and idle timeouts and the pool size: when those change,
    // every endpoint gets a new agent (and keeps its health all the same).
    let same_agents = previous.is_some_and(|p| {
        let (a, b) = (&p.config, &config);
        (a.connect_timeout, a.idle_timeout, a.workers)
            == (b.connect_timeout, b.idle_timeout, b.workers)
    });
    let mut endpoints = Vec::with_capacity(config.endpoints.len());
    for ec in &config.endpoints {
        let old = previous.and_then(|p| p.endpoint(ec.id));
        let endpoint = match old {
            Some(e) if e.config == *ec && same_agents => e.clone(),
            Some(e) => {
                Arc::new(e.successor(ec.clone(), agent::agent_for(&config, ec, &mut shared)?))
            }
            None => Arc::new(Endpoint::new(
                ec.clone(),
                agent::agent_for(&config, ec, &mut shared)?,
            )),
        };
        endpoints.push(endpoint);
    }
    let selector = Selector::new(config.strategy, endpoints.len());
    Ok(Generation {
        config,
        endpoints,
        selector,
    })
}
