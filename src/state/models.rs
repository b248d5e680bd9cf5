//! The loom models: every interleaving of the proxy's own functions on one endpoint, its
//! health lock, the failure queue and the probe schedule (the three locks `sync.rs` swaps
//! for loom's).
//!
//! The steps the models interleave are the production functions themselves, called as the
//! proxy calls them:
//!
//! - an attempt is `shared::record_attempt`, what `State::record` runs: the health update
//!   in one scope of the endpoint's lock, then the queue add;
//! - a request's check before it uses the endpoint is `shared::is_eligible`, what
//!   `State::is_eligible` runs;
//! - a probe round is `recovery::claim`, then `recovery::apply` for each endpoint it
//!   claimed, which is `recovery::round` without its middle step: the probe's network
//!   request is replaced by a `ProbeResult` handed in.
//!
//! A `World` holds the parts of a `State` those functions take (the generation's endpoints,
//! the queue, the schedule) and nothing of its own: a `State` builds a rayon probe pool and
//! ureq agents, which loom would rebuild in each of thousands of executions. So a change
//! to the order or the lock scopes of those functions is a change to what is checked here.
//!
//! Compiled only under `--cfg loom` (the rest of the crate compiles unchanged; its own
//! tests are not meant to run under loom). The models are small enough to explore
//! exhaustively in about a second, as `.ci/run` does; should one grow,
//! `LOOM_MAX_PREEMPTIONS=3` bounds it:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib models::
//! ```

use crate::config::validated::EndpointConfig;
use crate::state::endpoint::{Endpoint, EndpointId};
use crate::state::failure_queue::{FailureQueue, QueueStats};
use crate::state::health::{Outcome, Status};
use crate::state::recovery;
use crate::state::schedule::Schedule;
use crate::state::shared;
use crate::upstream::probe::ProbeResult;
use loom::thread;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long each modelled attempt took; it only feeds the average.
const ELAPSED: Duration = Duration::from_millis(1);
/// `recovery_interval` and `recovery_max_interval`: long enough that no back-off ends
/// during a model, so only the claims decide which round probes.
const INTERVAL: Duration = Duration::from_secs(60);
const MAX_INTERVAL: Duration = Duration::from_secs(600);

/// An endpoint config with `max_failures`, and an agent that is never used: built once,
/// outside the model, and cloned into each execution.
fn fixture(max_failures: u32) -> (EndpointConfig, ureq::Agent) {
    let mut config = EndpointConfig::with_defaults(
        "loom",
        "http://127.0.0.1:9/loom",
        "sk-loom-0123456789abcdef",
    )
    .expect("a valid endpoint");
    config.max_failures = max_failures;
    (config, ureq::Agent::new_with_defaults())
}

fn failure() -> Outcome {
    Outcome::Failure("HTTP 500".into())
}

/// One endpoint, the failure queue and the probe schedule, as a `State` holds them.
struct World {
    /// A generation's endpoints (one here), as `recovery::claim` looks them up.
    endpoints: Vec<Arc<Endpoint>>,
    queue: FailureQueue,
    schedule: Schedule,
}

/// A world shared by the model's threads.
type Shared = loom::sync::Arc<World>;

impl World {
    fn new(config: &EndpointConfig, agent: &ureq::Agent) -> Shared {
        let endpoint = Endpoint::new(config.clone(), agent.clone());
        loom::sync::Arc::new(World {
            endpoints: vec![Arc::new(endpoint)],
            queue: FailureQueue::default(),
            schedule: Schedule::default(),
        })
    }

    /// A world whose endpoint has failed `max_failures` times and is in the queue, set up
    /// before any model thread starts.
    fn quarantined(config: &EndpointConfig, agent: &ureq::Agent) -> Shared {
        let world = World::new(config, agent);
        for _ in 0..config.max_failures {
            world.attempt(&failure());
        }
        assert!(world.queue.contains(world.id()));
        world
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoints[0]
    }

    fn id(&self) -> EndpointId {
        self.endpoint().id()
    }

    /// One attempt, as `State::record` records it. True when this call put the endpoint in
    /// the queue, which is when the proxy logs "entered the failure queue".
    fn attempt(&self, outcome: &Outcome) -> bool {
        shared::record_attempt(&self.queue, self.endpoint(), outcome, ELAPSED)
    }

    /// A request that found the endpoint eligible, as selection asks, then failed on it.
    /// None when it was not eligible.
    fn attempt_if_eligible(&self, outcome: &Outcome) -> Option<bool> {
        let eligible = shared::is_eligible(&self.queue, self.endpoint(), Instant::now());
        eligible.then(|| self.attempt(outcome))
    }

    /// A probe round (the recovery thread's tick, or with `force` an operator's retry):
    /// `recovery::claim`, then `recovery::apply` with a probe that `passed` or not for
    /// each endpoint claimed. How many endpoints it took out of the queue (0 or 1).
    fn probe_round(&self, force: bool, passed: bool) -> u64 {
        let due = recovery::claim(
            &self.queue,
            &self.schedule,
            &self.endpoints,
            INTERVAL,
            force,
        );
        let result = ProbeResult {
            recovered: passed,
            detail: "a made-up probe result".into(),
        };
        due.iter()
            .map(|e| recovery::apply(&self.queue, &self.schedule, e, &result, MAX_INTERVAL))
            .map(u64::from)
            .sum()
    }

    /// The queue's ledger: every entry is either still queued or was taken out by
    /// exactly one removal that returned true. An endpoint neither queued nor in service,
    /// or counted in and out twice, breaks it.
    fn assert_ledger(&self, removals: u64) -> QueueStats {
        let (ids, stats) = self.queue.snapshot();
        let queued = ids.len() as u64;
        assert!(ids.iter().all(|&id| id == self.id()));
        assert_eq!(stats.total_failed, removals + queued, "{stats:?} {ids:?}");
        assert_eq!(
            stats.total_verified,
            stats.total_recovered + stats.total_still_failed
        );
        stats
    }
}

/// (a) Three threads each record one failure on an endpoint with `max_failures` 2: the
/// second and third both see the threshold reached and both try to queue it. Exactly one
/// entry, one `total_failed`, one "entered" event, every failure counted.
#[test]
fn model_failures_from_three_threads_queue_the_endpoint_exactly_once() {
    let (config, agent) = fixture(2);
    loom::model(move || {
        let world = World::new(&config, &agent);
        let others: Vec<_> = (0..2)
            .map(|_| {
                let world = world.clone();
                thread::spawn(move || world.attempt(&failure()))
            })
            .collect();
        let mut entered = u64::from(world.attempt(&failure()));
        for t in others {
            entered += u64::from(t.join().unwrap());
        }
        let h = world.endpoint().health();
        assert_eq!(
            (h.total_requests, h.failed_requests, h.consecutive_failures),
            (3, 3, 3)
        );
        assert_eq!(h.status, Status::Unhealthy);
        assert_eq!(
            entered, 1,
            "exactly one \"entered the failure queue\" event"
        );
        let stats = world.assert_ledger(0);
        assert_eq!(stats.total_failed, 1);
        assert_eq!(world.queue.snapshot().0, vec![world.id()]);
    });
}

/// (b) A queued endpoint (3 failures, `max_failures` 3) whose probe passed is being
/// returned to service while a request that was already on it fails (an attempt started
/// before the quarantine, or rule 5's last-resort attempt), and a new request that found
/// it eligible fails too. It ends queued or in service, never lost: the ledger holds, an
/// endpoint left in service is below the threshold, and a failure on an endpoint already
/// back in service counts from zero (one failure never re-queues it).
#[test]
fn model_queue_add_racing_recovery_ends_queued_or_in_service() {
    let (config, agent) = fixture(3);
    loom::model(move || {
        let world = World::quarantined(&config, &agent);
        let stale = {
            let world = world.clone();
            thread::spawn(move || world.attempt(&failure()))
        };
        let recovery = {
            let world = world.clone();
            thread::spawn(move || world.probe_round(false, true))
        };
        let fresh = world.attempt_if_eligible(&failure());
        let stale_entered = stale.join().unwrap();
        let removed = recovery.join().unwrap();
        assert_eq!(removed, 1, "nothing else takes it out");
        assert_ne!(fresh, Some(true), "one failure after recovery re-queued it");
        let stats = world.assert_ledger(removed);
        assert_eq!(stats.total_failed, 1 + u64::from(stale_entered));
        assert_eq!((stats.total_verified, stats.total_recovered), (1, 1));
        let h = world.endpoint().health();
        let attempts = 3 + 1 + u64::from(fresh.is_some());
        assert_eq!((h.total_requests, h.failed_requests), (attempts, attempts));
        if !world.queue.contains(world.id()) {
            assert!(
                h.consecutive_failures < 3,
                "in service past the threshold: {h:?}"
            );
        }
        assert_eq!(world.endpoint().probes(), 1);
    });
}

/// (c) A probe result applied to a queued endpoint while two requests on it (one
/// succeeding, one failing) are recorded: probes count in the queue stats and the
/// endpoint's probe count, never in its health; traffic counts in its health, and a
/// failure on an endpoint already queued is no new entry. Once with a probe that passed,
/// once with one that failed.
#[test]
fn model_probe_results_and_traffic_on_one_endpoint_count_exactly() {
    let (config, agent) = fixture(3);
    for passed in [true, false] {
        let (config, agent) = (config.clone(), agent.clone());
        loom::model(move || {
            let world = World::quarantined(&config, &agent);
            let traffic: Vec<_> = [Outcome::Success, failure()]
                .into_iter()
                .map(|outcome| {
                    let world = world.clone();
                    thread::spawn(move || world.attempt(&outcome))
                })
                .collect();
            let removed = world.probe_round(false, passed);
            let entered: u64 = traffic
                .into_iter()
                .map(|t| u64::from(t.join().unwrap()))
                .sum();
            assert_eq!(removed, u64::from(passed));
            let stats = world.assert_ledger(removed);
            assert_eq!(stats.total_failed, 1 + entered);
            assert_eq!(stats.total_verified, 1);
            assert_eq!(stats.total_recovered, u64::from(passed));
            assert_eq!(world.endpoint().probes(), 1);
            let h = world.endpoint().health();
            assert_eq!((h.total_requests, h.failed_requests), (5, 4));
            if !passed {
                assert!(world.queue.contains(world.id()), "a failed probe freed it");
                assert_eq!(entered, 0, "a queued endpoint entered again");
            }
        });
    }
}

/// (d) Two probe rounds overlap on one queued endpoint: the recovery thread's tick and an
/// operator's `POST /__qcc__/queue/retry`. The schedule's claim keeps them apart: one
/// probe, one recovery counted, one removal. (Before claims, both probed and
/// `total_recovered` counted 2 in every interleaving.)
#[test]
fn model_overlapping_probe_rounds_count_one_recovery() {
    let (config, agent) = fixture(3);
    loom::model(move || {
        let world = World::quarantined(&config, &agent);
        let operator = {
            let world = world.clone();
            thread::spawn(move || world.probe_round(true, true))
        };
        let removals = world.probe_round(false, true) + operator.join().unwrap();
        let stats = world.assert_ledger(removals);
        assert_eq!(removals, 1);
        assert_eq!(
            stats.total_recovered, removals,
            "total_recovered counts probes that brought the endpoint back: {stats:?}"
        );
        assert_eq!(
            (stats.total_verified, world.endpoint().probes()),
            (1, 1),
            "one probe"
        );
    });
}
