//! The mutex behind endpoint health and the failure queue: `parking_lot`'s in every real
//! build, loom's under `RUSTFLAGS="--cfg loom"`, so the model checker can explore every
//! interleaving of the locks that keep health counts and queue entries exact.
//!
//! Why a shim: loom can only schedule what it can see, and it sees only its own
//! primitives. `src/endpoint.rs` and `src/failure_queue.rs` take `crate::sync::Mutex`; the
//! rest of the crate keeps `parking_lot` (nothing else is modelled). loom's `lock` returns a
//! `LockResult` like std's; the wrapper returns the guard directly, as `parking_lot` does,
//! so the call sites are the same in both builds.
//!
//! The models are unit tests of this module, compiled only with `--cfg loom` (the rest of
//! the crate compiles unchanged; its own tests are not meant to run under loom). They are
//! small enough to explore exhaustively in under a second, as `.ci/run` does; should one
//! grow, `LOOM_MAX_PREEMPTIONS=3` bounds it:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib sync::models
//! ```

#[cfg(not(loom))]
pub use parking_lot::Mutex;

#[cfg(loom)]
pub use loom_mutex::Mutex;

#[cfg(loom)]
mod loom_mutex {
    /// loom's mutex with `parking_lot`'s signature: `lock` returns the guard. loom never
    /// poisons (a panic fails the model), so there is no error to return.
    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Mutex<T> {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }
}

/// The loom models of issue 7. Each one drives the real `Endpoint` (its health mutex) and
/// the real `FailureQueue` from several loom threads, through the same steps, in the same
/// order and with the same lock scopes as the proxy's own callers; `World` names the caller
/// each step mirrors. They mirror rather than call `State::record` and `recovery::apply`
/// because a `State` builds a rayon probe pool and ureq agents, which loom would have to
/// rebuild on every one of thousands of executions; the queue `add` whose `true` is counted
/// here is exactly what gates `State::quarantine`'s "entered the failure queue" line.
#[cfg(all(test, loom))]
mod models {
    use crate::config::EndpointConfig;
    use crate::endpoint::{Endpoint, EndpointId};
    use crate::failure_queue::{FailureQueue, QueueStats};
    use crate::health::{Outcome, Status, Verdict};
    use crate::recovery::Schedule;
    use loom::sync::Arc;
    use loom::thread;
    use std::time::{Duration, Instant};

    const ELAPSED: Duration = Duration::from_millis(1);
    const WAIT: Duration = Duration::from_secs(60);

    /// An endpoint config with `max_failures`, and an agent that is never used: built once,
    /// outside the model, and cloned into each execution.
    pub(super) fn fixture(max_failures: u32) -> (EndpointConfig, ureq::Agent) {
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
    pub(super) struct World {
        endpoint: Endpoint,
        queue: FailureQueue,
        schedule: Schedule,
    }

    impl World {
        fn new(config: &EndpointConfig, agent: &ureq::Agent) -> Arc<World> {
            Arc::new(World {
                endpoint: Endpoint::new(config.clone(), agent.clone()),
                queue: FailureQueue::default(),
                schedule: Schedule::default(),
            })
        }

        /// A world whose endpoint has failed `max_failures` times and is in the queue,
        /// set up before any model thread starts.
        pub(super) fn quarantined(config: &EndpointConfig, agent: &ureq::Agent) -> Arc<World> {
            let world = World::new(config, agent);
            for _ in 0..config.max_failures {
                world.attempt(&failure());
            }
            assert!(world.queue.contains(world.id()));
            world
        }

        fn id(&self) -> EndpointId {
            self.endpoint.id()
        }

        /// `State::record`, step for step: the health update in one scope of the
        /// endpoint's lock; then, that lock released, the queue add (`State::quarantine`).
        /// True when this call put the endpoint in the queue, which is when the proxy logs
        /// "entered the failure queue".
        fn attempt(&self, outcome: &Outcome) -> bool {
            let verdict = self.endpoint.record(outcome, ELAPSED);
            if verdict != Verdict::Quarantine {
                return false;
            }
            self.queue.add(self.id())
        }

        /// A request that chose the endpoint because it was eligible (`State::is_eligible`:
        /// not queued, not cooling down), then failed. None when it was not eligible.
        fn attempt_if_eligible(&self, outcome: &Outcome) -> Option<bool> {
            let eligible = self.endpoint.is_enabled()
                && !self.queue.contains(self.id())
                && !self.endpoint.is_cooling(Instant::now());
            eligible.then(|| self.attempt(outcome))
        }

        /// `recovery::round` up to the probe, step for step: snapshot the queue, claim the
        /// endpoint in the schedule (a round probing it already keeps it), check it is
        /// still queued (another round may have brought it back since the snapshot).
        fn claim(&self) -> bool {
            let (queued, _) = self.queue.snapshot();
            let now = Instant::now();
            let claimed = self
                .schedule
                .claim_due(&queued, now, WAIT, Duration::ZERO, true);
            if !claimed.contains(&self.id()) {
                return false;
            }
            if !self.queue.contains(self.id()) {
                self.schedule.forget(self.id());
                return false;
            }
            true
        }

        /// A round whose probe passes, then `recovery::apply`: count it, reset the health,
        /// take the endpoint out of the queue, release the claim. True when this call
        /// removed it.
        pub(super) fn probe_passed(&self) -> bool {
            if !self.claim() {
                return false;
            }
            self.endpoint.count_probe();
            self.endpoint.reset_to_healthy();
            let removed = self.queue.record_probe(self.id(), true);
            self.schedule.release(self.id(), true, WAIT);
            removed
        }

        /// A round whose probe fails, then `recovery::apply`.
        fn probe_failed(&self) {
            if !self.claim() {
                return;
            }
            self.endpoint.count_probe();
            self.queue.record_probe(self.id(), false);
            self.schedule.release(self.id(), false, WAIT);
        }

        /// The queue's ledger: every entry is either still queued or was taken out by
        /// exactly one removal that returned true. An endpoint neither queued nor in
        /// service, or counted in and out twice, breaks it.
        pub(super) fn assert_ledger(&self, removals: u64) -> QueueStats {
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
    /// second and third both see the threshold reached and both try to queue it. Exactly
    /// one entry, one `total_failed`, one "entered" event, every failure counted.
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
            let h = world.endpoint.health();
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
    /// returned to service while a request that was already on it fails (an attempt
    /// started before the quarantine, or rule 5's last-resort attempt), and a new request
    /// that found it eligible fails too. It ends queued or in service, never lost: the
    /// ledger holds, an endpoint left in service is below the threshold, and a failure on
    /// an endpoint already back in service counts from zero (one failure never re-queues it).
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
                thread::spawn(move || world.probe_passed())
            };
            let fresh = world.attempt_if_eligible(&failure());
            let stale_entered = stale.join().unwrap();
            let removed = recovery.join().unwrap();
            assert!(removed, "nothing else takes it out");
            assert_ne!(fresh, Some(true), "one failure after recovery re-queued it");
            let stats = world.assert_ledger(1);
            assert_eq!(stats.total_failed, 1 + u64::from(stale_entered));
            assert_eq!((stats.total_verified, stats.total_recovered), (1, 1));
            let h = world.endpoint.health();
            let attempts = 3 + 1 + u64::from(fresh.is_some());
            assert_eq!((h.total_requests, h.failed_requests), (attempts, attempts));
            if !world.queue.contains(world.id()) {
                assert!(
                    h.consecutive_failures < 3,
                    "in service past the threshold: {h:?}"
                );
            }
            assert_eq!(world.endpoint.probes(), 1);
        });
    }

    /// (c) A probe result applied to a queued endpoint while two requests on it (one
    /// succeeding, one failing) are recorded: probes count in the queue stats and the
    /// endpoint's probe count, never in its health; traffic counts in its health, and a
    /// failure on an endpoint already queued is no new entry. Once with a probe that
    /// passed, once with one that failed.
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
                let removed = if passed {
                    world.probe_passed()
                } else {
                    world.probe_failed();
                    false
                };
                let entered: u64 = traffic
                    .into_iter()
                    .map(|t| u64::from(t.join().unwrap()))
                    .sum();
                let stats = world.assert_ledger(u64::from(removed));
                assert_eq!(stats.total_failed, 1 + entered);
                assert_eq!(stats.total_verified, 1);
                assert_eq!(stats.total_recovered, u64::from(passed));
                assert_eq!(world.endpoint.probes(), 1);
                let h = world.endpoint.health();
                assert_eq!((h.total_requests, h.failed_requests), (5, 4));
                if !passed {
                    assert!(world.queue.contains(world.id()), "a failed probe freed it");
                    assert_eq!(entered, 0, "a queued endpoint entered again");
                }
            });
        }
    }

    /// (d) Two probe rounds overlap on one queued endpoint (the recovery thread's tick and
    /// an operator's `POST /__qcc__/queue/retry`). The schedule's claim keeps them apart:
    /// one probe, one recovery counted, one removal. (Before claims, both probed and
    /// `total_recovered` counted 2 in every interleaving.)
    #[test]
    fn model_overlapping_probe_rounds_count_one_recovery() {
        let (config, agent) = fixture(3);
        loom::model(move || {
            let world = World::quarantined(&config, &agent);
            let other_round = {
                let world = world.clone();
                thread::spawn(move || world.probe_passed())
            };
            let removals = u64::from(world.probe_passed()) + u64::from(other_round.join().unwrap());
            let stats = world.assert_ledger(removals);
            assert_eq!(removals, 1);
            assert_eq!(
                stats.total_recovered, removals,
                "total_recovered counts probes that brought the endpoint back: {stats:?}"
            );
            assert_eq!((stats.total_verified, world.endpoint.probes()), (1, 1));
        });
    }
}
