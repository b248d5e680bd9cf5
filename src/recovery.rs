//! Bringing quarantined endpoints back: the probe schedule, one probe round, and the
//! recovery thread that runs a round on every tick.
//!
//! A round snapshots the queued endpoints that are due, releases every lock, probes them in
//! parallel on a small rayon pool of its own (blocking network calls would stall rayon's
//! global pool), then applies the results one endpoint at a time. A failed probe doubles
//! that endpoint's wait before its next probe, up to `recovery_max_interval`, so a dead
//! endpoint costs few probe tokens; a recovery resets it.

use crate::endpoint::{Endpoint, EndpointId};
use crate::probe::{self, ProbeResult};
use crate::state::State;
use crossbeam_channel::{Receiver, Sender, select, tick};
use log::{info, warn};
use parking_lot::Mutex;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// When each queued endpoint may next be probed, and how long it waits after a failure.
#[derive(Default)]
pub struct Schedule {
    due: Mutex<HashMap<EndpointId, (Instant, Duration)>>,
}

/// One probe's report, for logs, the admin API and `check --probe`.
#[derive(Clone, Debug)]
pub struct Report {
    pub id: EndpointId,
    pub name: String,
    pub result: ProbeResult,
}

/// Probes every queued endpoint that is due (all of them when `force`), in parallel, and
/// applies the results. Blocks until the round is over.
pub fn round(state: &State, force: bool) -> Vec<Report> {
    let generation = state.current();
    let config = &generation.config;
    let now = Instant::now();
    let (queued, _) = state.queue.snapshot();
    // A tick may come a little early; a probe due within a tenth of the interval is due.
    let slack = config.recovery_interval / 10;
    let due: Vec<Arc<Endpoint>> = {
        let mut schedule = state.schedule.due.lock();
        schedule.retain(|id, _| queued.contains(id));
        // A disabled endpoint stays queued but costs no probes until it is enabled again.
        queued
            .iter()
            .filter_map(|id| generation.endpoint(*id))
            .filter(|e| e.is_enabled())
            .filter(|e| {
                let (at, _) = *schedule
                    .entry(e.id())
                    .or_insert((now, config.recovery_interval));
                force || at <= now + slack
            })
            .cloned()
            .collect()
    };
    if due.is_empty() {
        return Vec::new();
    }
    let probe = &config.probe;
    let results: Vec<ProbeResult> = state
        .probe_pool
        .install(|| due.par_iter().map(|e| probe::run(e, probe)).collect());
    due.iter()
        .zip(results)
        .map(|(e, result)| apply(state, e, result))
        .collect()
}

fn apply(state: &State, endpoint: &Endpoint, result: ProbeResult) -> Report {
    let id = endpoint.id();
    endpoint.count_probe();
    if result.recovered {
        endpoint.reset_to_healthy();
        if state.queue.record_probe(id, true) {
            info!(
                "endpoint {} ({id}) recovered and is back in service: {}",
                endpoint.name(),
                result.detail
            );
        }
        state.schedule.due.lock().remove(&id);
    } else {
        state.queue.record_probe(id, false);
        let max = state.current().config.recovery_max_interval;
        let wait = {
            let mut schedule = state.schedule.due.lock();
            let entry = schedule.entry(id).or_insert((Instant::now(), max));
            entry.1 = (entry.1 * 2).min(max);
            entry.0 = Instant::now() + entry.1;
            entry.1
        };
        warn!(
            "endpoint {} ({id}) is still failing: {}; next probe in {:.1}s",
            endpoint.name(),
            result.detail,
            wait.as_secs_f64()
        );
    }
    Report {
        id,
        name: endpoint.name().to_string(),
        result,
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
        state.schedule.due.lock().remove(id);
    }
    if !queued.is_empty() {
        info!("failure queue cleared by the operator: {} endpoint(s) back", queued.len());
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
