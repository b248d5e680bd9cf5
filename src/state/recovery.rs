//! Bringing quarantined endpoints back: the probe schedule, one probe round, and the
//! recovery thread that runs a round on every tick.
//!
//! A round snapshots the queued endpoints that are due, releases every lock, probes them in
//! parallel on a small rayon pool of its own (blocking network calls would stall rayon's
//! global pool), then applies the results one endpoint at a time. A failed probe doubles
//! that endpoint's wait before its next probe, up to `recovery_max_interval`, so a dead
//! endpoint costs few probe tokens; a recovery resets it.

use crate::state::endpoint::{Endpoint, EndpointId};
use crate::state::failure_queue::FailureQueue;
use crate::state::schedule::Schedule;
use crate::state::shared::State;
use crate::upstream::probe::{self, ProbeResult};
use crossbeam_channel::{Receiver, Sender, select, tick};
use log::{info, warn};
use rayon::prelude::*;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One probe's report, for logs, the admin API and `check --probe`.
#[derive(Clone, Debug)]
pub struct Report {
    pub id: EndpointId,
    pub name: String,
    pub result: ProbeResult,
}

/// Probes every queued endpoint that is due (all of them when `force`), in parallel, and
/// applies the results. Blocks until the round is over.
///
/// Three steps, and only the middle one touches the network: `claim` (locks, no I/O),
/// the probes (no lock), `apply` per result (locks, no I/O). The loom models
/// (`src/state/models.rs`) call `claim` and `apply` themselves, with a made-up result in place
/// of the probe, so what they check is this code.
pub fn round(state: &State, force: bool) -> Vec<Report> {
    let generation = state.current();
    let config = &generation.config;
    let due = claim(
        &state.queue,
        &state.schedule,
        &generation.endpoints,
        config.recovery_interval,
        force,
    );
    if due.is_empty() {
        return Vec::new();
    }
    let probe = &config.probe;
    let results: Vec<ProbeResult> = state
        .probe_pool
        .install(|| due.par_iter().map(|e| probe::run(e, probe)).collect());
    due.iter()
        .zip(results)
        .map(|(e, result)| {
            apply(
                &state.queue,
                &state.schedule,
                e,
                &result,
                config.recovery_max_interval,
            );
            Report {
                id: e.id(),
                name: e.name().to_string(),
                result,
            }
        })
        .collect()
}

/// The first step of a round: the queued endpoints of `endpoints` that are enabled, due
/// (all of them with `force`) and not being probed by another round, claimed in the
/// schedule for this round. Each lock is taken and released in turn, so the caller may
/// send the probes at once; each claimed endpoint must then go through `apply`, which
/// ends its claim. `interval` is `recovery_interval`: an endpoint's first wait, and a
/// tenth of it absorbs a tick that comes a little early.
pub fn claim(
    queue: &FailureQueue,
    schedule: &Schedule,
    endpoints: &[Arc<Endpoint>],
    interval: Duration,
    force: bool,
) -> Vec<Arc<Endpoint>> {
    let find = |id: EndpointId| endpoints.iter().find(|e| e.id() == id);
    let (queued, _) = queue.snapshot();
    // A disabled endpoint stays queued but costs no probes until it is enabled again.
    let probed: Vec<EndpointId> = queued
        .into_iter()
        .filter(|id| find(*id).is_some_and(|e| e.is_enabled()))
        .collect();
    let claimed = schedule.claim_due(&probed, Instant::now(), interval, interval / 10, force);
    // Claimed after the snapshot: another round may have brought one back in between.
    claimed
        .into_iter()
        .filter_map(|id| {
            let still_queued = queue.contains(id);
            if !still_queued {
                schedule.forget(id);
            }
            find(id).filter(|_| still_queued).cloned()
        })
        .collect()
}

/// The last step of a round, for one claimed endpoint and its probe's result: a
/// recovered endpoint gets its health reset, then leaves the queue (in that order, so it
/// is never in service with stale failures, where one more failure would queue it
/// again); a failing one waits twice as long, up to `max_interval`. Either way the claim
/// ends. A probe of an endpoint an operator cleared meanwhile counts for nothing. True
/// when this call took the endpoint out of the queue.
pub fn apply(
    queue: &FailureQueue,
    schedule: &Schedule,
    endpoint: &Endpoint,
    result: &ProbeResult,
    max_interval: Duration,
) -> bool {
    let id = endpoint.id();
    endpoint.count_probe();
    if result.recovered {
        endpoint.reset_to_healthy();
        let back = queue.record_probe(id, true);
        if back {
            info!(
                "endpoint {} ({id}) recovered and is back in service: {}",
                endpoint.name(),
                result.detail
            );
        }
        schedule.release(id, true, max_interval);
        back
    } else {
        queue.record_probe(id, false);
        let wait = schedule.release(id, false, max_interval);
        warn!(
            "endpoint {} ({id}) is still failing: {}; next probe in {:.1}s",
            endpoint.name(),
            result.detail,
            wait.as_secs_f64()
        );
        false
    }
}

/// Operator's clear: every queued endpoint back to service without a probe.
pub fn clear(state: &State) -> Vec<EndpointId> {
    let generation = state.current();
    let (queued, _) = state.queue.snapshot();
    for id in &queued {
        if let Some(e) = generation.endpoint(*id) {
            e.reset_to_healthy();
        }
        state.queue.remove(*id);
        state.schedule.forget(*id);
    }
    if !queued.is_empty() {
        info!(
            "failure queue cleared by the operator: {} endpoint(s) back",
            queued.len()
        );
    }
    queued
}

/// The recovery thread; dropping the handle's sender (in `stop`) ends it.
pub struct RecoveryThread {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RecoveryThread {
    pub fn start(state: Arc<State>) -> Result<RecoveryThread, String> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let interval = state.current().config.recovery_interval;
        let thread = std::thread::Builder::new()
            .name("recovery".into())
            .spawn(move || recovery_loop(&state, interval, &stopped))
            .map_err(|e| format!("cannot start the recovery thread: {e}"))?;
        Ok(RecoveryThread {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Ends the loop and joins the thread, waiting until `deadline` at most for a round in
    /// progress (a probe may be blocked on a hung endpoint). False if it had to leave it.
    pub fn stop(mut self, deadline: Instant) -> bool {
        drop(self.stop.take());
        let Some(thread) = self.thread.take() else {
            return true;
        };
        // Waking from `select!` takes a moment even when the deadline has passed.
        let deadline = deadline.max(Instant::now() + Duration::from_millis(500));
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
            true
        } else {
            warn!("a recovery probe is still running at shutdown; not waiting for it");
            false
        }
    }
}

fn recovery_loop(state: &State, interval: Duration, stopped: &Receiver<()>) {
    let ticker = tick(interval);
    loop {
        select! {
            recv(ticker) -> _ => { round(state, false); }
            recv(stopped) -> _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_millis(800);

    fn claim_one(
        schedule: &Schedule,
        id: EndpointId,
        now: Instant,
        force: bool,
    ) -> Vec<EndpointId> {
        schedule.claim_due(&[id], now, FIRST, Duration::ZERO, force)
    }

    /// The back-off, with the clock handed in: after each failed probe the endpoint is not
    /// due a moment before its wait ends and is due when it ends, the wait doubles up to
    /// the maximum, a claimed endpoint is claimed once, forced or not, and a forced round
    /// does not wait. (`tests/recovery.rs` sees the same waits logged by a running proxy.)
    #[test]
    fn a_failed_probe_waits_twice_as_long_and_the_claim_honours_it() {
        let schedule = Schedule::default();
        let id = EndpointId(7);
        assert_eq!(claim_one(&schedule, id, Instant::now(), false), vec![id]);
        for expected_ms in [200, 400, 800, 800] {
            assert!(
                claim_one(&schedule, id, Instant::now(), true).is_empty(),
                "claimed"
            );
            let before = Instant::now();
            let wait = schedule.release(id, false, MAX);
            let after = Instant::now();
            assert_eq!(wait, Duration::from_millis(expected_ms));
            // The next probe is due at the release's clock reading plus the wait.
            let too_early = before + wait - Duration::from_nanos(1);
            assert!(claim_one(&schedule, id, too_early, false).is_empty());
            assert_eq!(claim_one(&schedule, id, after + wait, false), vec![id]);
        }
        schedule.release(id, false, MAX);
        assert_eq!(claim_one(&schedule, id, Instant::now(), true), vec![id]);
        // A recovery forgets the back-off: next time the endpoint is due at once.
        schedule.release(id, true, MAX);
        assert_eq!(claim_one(&schedule, id, Instant::now(), false), vec![id]);
    }
}
