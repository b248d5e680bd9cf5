//! The failure queue: the set of quarantined endpoints and its counters, in one mutex.
//!
//! Membership and statistics change together in one lock scope, so an endpoint that many
//! threads report at once enters once and is counted once (qcc counted `total_failed` = 20
//! for 2 endpoints). The queue knows ids only; logging and health resets are the caller's,
//! done after the lock is released.

use crate::state::endpoint::EndpointId;
use crate::state::sync::Mutex;
use std::collections::HashSet;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Entries into the queue; an endpoint already queued does not count again.
    pub total_failed: u64,
    /// Probes completed on queued endpoints.
    pub total_verified: u64,
    /// Probes that brought an endpoint back.
    pub total_recovered: u64,
    /// Probes that left an endpoint queued.
    pub total_still_failed: u64,
}

#[derive(Default)]
pub struct FailureQueue {
    inner: Mutex<(HashSet<EndpointId>, QueueStats)>,
}

impl FailureQueue {
    /// Adds the endpoint; true only for the call that actually put it in.
    pub fn add(&self, id: EndpointId) -> bool {
        let mut guard = self.inner.lock();
        let (set, stats) = &mut *guard;
        let added = set.insert(id);
        if added {
            stats.total_failed += 1;
        }
        added
    }

    /// Takes the endpoint out without a probe (operator's clear, reload); true if it was in.
    pub fn remove(&self, id: EndpointId) -> bool {
        self.inner.lock().0.remove(&id)
    }

    pub fn contains(&self, id: EndpointId) -> bool {
        self.inner.lock().0.contains(&id)
    }

    /// Counts one probe result; a recovered endpoint leaves the queue in the same scope.
    /// Returns true if this call removed it. A probe of an endpoint that is no longer
    /// queued (an operator's clear came first) is not counted at all.
    pub fn record_probe(&self, id: EndpointId, recovered: bool) -> bool {
        let mut guard = self.inner.lock();
        let (set, stats) = &mut *guard;
        if !set.contains(&id) {
            return false;
        }
        stats.total_verified += 1;
        if recovered {
            stats.total_recovered += 1;
            set.remove(&id)
        } else {
            stats.total_still_failed += 1;
            false
        }
    }

    /// Queued ids in ascending order, and the counters, as one consistent snapshot.
    pub fn snapshot(&self) -> (Vec<EndpointId>, QueueStats) {
        let (mut ids, stats) = {
            let guard = self.inner.lock();
            (guard.0.iter().copied().collect::<Vec<_>>(), guard.1)
        };
        ids.sort();
        (ids, stats)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn an_endpoint_enters_once_and_counts_once() {
        let q = FailureQueue::default();
        assert!(q.add(EndpointId(1)));
        assert!(!q.add(EndpointId(1)));
        assert!(q.add(EndpointId(2)));
        let (ids, stats) = q.snapshot();
        assert_eq!(ids, vec![EndpointId(1), EndpointId(2)]);
        assert_eq!(stats.total_failed, 2);
        assert!(!q.record_probe(EndpointId(1), false));
        assert!(q.record_probe(EndpointId(1), true));
        let (ids, stats) = q.snapshot();
        assert_eq!(ids, vec![EndpointId(2)]);
        assert_eq!(
            (
                stats.total_verified,
                stats.total_recovered,
                stats.total_still_failed
            ),
            (2, 1, 1)
        );
    }

    /// 64 threads add and remove the same 4 ids 10,000 times each: every successful add is
    /// one `total_failed`, and adds minus removes equals what is left in the queue.
    #[test]
    fn concurrent_adds_and_removes_count_exactly() {
        let q = Arc::new(FailureQueue::default());
        let threads: Vec<_> = (0..64u32)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let (mut added, mut removed) = (0u64, 0u64);
                    for i in 0..10_000u32 {
                        let id = EndpointId((t + i) % 4);
                        if i % 2 == 0 {
                            added += q.add(id) as u64;
                        } else {
                            removed += q.remove(id) as u64;
                        }
                    }
                    (added, removed)
                })
            })
            .collect();
        let (added, removed) = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let (ids, stats) = q.snapshot();
        assert_eq!(stats.total_failed, added);
        assert_eq!(added - removed, ids.len() as u64);
    }
}
