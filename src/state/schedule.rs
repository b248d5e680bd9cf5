//! The probe schedule of the queued endpoints: when each may next be probed, its back-off,
//! and the claim that keeps two rounds from probing one endpoint at once. Plain state
//! under one lock; the recovery round (recovery.rs) drives it.

use crate::endpoint_id::EndpointId;
use crate::state::sync::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

/// When each queued endpoint may next be probed, how long it waits after a failure, and
/// whether a round is probing it right now.
#[derive(Default)]
pub struct Schedule {
    entries: Mutex<HashMap<EndpointId, Entry>>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    next_at: Instant,
    /// `next_at` on the wall clock, fixed when it is set: the stats show the same time on
    /// every read (converting `next_at` at each read moved it by a millisecond now and
    /// then).
    next_wall: SystemTime,
    wait: Duration,
    /// Claimed by a round: two rounds (the recovery thread's and an operator's retry)
    /// never probe one endpoint at once, so a recovery is counted once.
    probing: bool,
}

impl Schedule {
    /// Claims the endpoints of `queued` that are due (all with `force`) and that no other
    /// round is probing; forgets endpoints no longer queued. `slack` absorbs a tick that
    /// comes a little early.
    pub fn claim_due(
        &self,
        queued: &[EndpointId],
        now: Instant,
        first_wait: Duration,
        slack: Duration,
        force: bool,
    ) -> Vec<EndpointId> {
        let mut entries = self.entries.lock();
        entries.retain(|id, e| e.probing || queued.contains(id));
        let mut claimed = Vec::new();
        for &id in queued {
            // The clock is read only for an endpoint not seen before, not for each one on
            // every round.
            let entry = entries.entry(id).or_insert_with(|| Entry {
                next_at: now,
                next_wall: SystemTime::now(),
                wait: first_wait,
                probing: false,
            });
            if !entry.probing && (force || entry.next_at <= now + slack) {
                entry.probing = true;
                claimed.push(id);
            }
        }
        claimed
    }

    /// Ends a claim: a recovered endpoint is forgotten; a failing one waits twice as long
    /// as last time, up to `max`. Returns that wait.
    pub fn release(&self, id: EndpointId, recovered: bool, max: Duration) -> Duration {
        let mut entries = self.entries.lock();
        if recovered {
            entries.remove(&id);
            return Duration::ZERO;
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        let entry = entries.entry(id).or_insert(Entry {
            next_at: now,
            next_wall: wall,
            wait: max,
            probing: false,
        });
        entry.wait = (entry.wait * 2).min(max);
        entry.next_at = now + entry.wait;
        entry.next_wall = wall + entry.wait;
        entry.probing = false;
        entry.wait
    }

    /// When `id` may next be probed, for the stats (read only). `None` until a round first
    /// claims it: a newly queued endpoint is probed by the next round.
    pub fn next_probe_at(&self, id: EndpointId) -> Option<SystemTime> {
        self.entries.lock().get(&id).map(|e| e.next_wall)
    }

    pub fn forget(&self, id: EndpointId) {
        self.entries.lock().remove(&id);
    }
}
