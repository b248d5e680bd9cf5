//! The last hour of each endpoint's attempts, minute by minute, for the status page's
//! charts (`history` in `/__qcc__/stats`).
//!
//! Each endpoint has a fixed ring of 60 per-minute slots: attempts, failed attempts and a
//! small fixed histogram of times to the response headers, from which p50 and p95 are
//! estimated when read. Nothing grows with traffic: a slot is a few dozen counters, and a
//! slot whose minute has passed an hour ago is reset when that minute comes round again.
//!
//! It records what an endpoint's `health_status` counts, from the same call
//! (`State::record`): one attempt, failed unless the outcome was a success (a 429 is a
//! failure here too, as in `failed_requests`), timed as `avg_response_time` is.
//!
//! Locks: the map from endpoint id to ring is read-locked only to clone the ring's `Arc`
//! (write-locked only the first time an id is seen), and released before the ring's own
//! mutex is taken, so two locks are never held at once. Each ring lock is held for a few
//! counter increments, or for copying 60 slots out.

use crate::state::endpoint::EndpointId;
use crate::state::histogram::BUCKETS;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Minutes kept per endpoint: the status page draws the last hour.
pub const MINUTES: usize = 60;

/// One minute of one endpoint, as the stats show it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The minute's start, in Unix seconds (a multiple of 60).
    pub start: u64,
    pub requests: u32,
    pub errors: u32,
    /// Estimated median and 95th percentile of the time to response headers, in
    /// milliseconds; `None` for a minute without attempts.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
}

/// Every endpoint's ring, by id. Ids outlive reloads (an endpoint whose id is unchanged
/// keeps its history); `retain` drops the rings of endpoints that are gone.
#[derive(Default)]
pub struct History {
    rings: RwLock<HashMap<EndpointId, Arc<Mutex<Ring>>>>,
}

impl History {
    /// Counts one attempt of endpoint `id` in the minute of `at`.
    pub fn record(&self, id: EndpointId, failed: bool, elapsed: Duration, at: SystemTime) {
        let ring = self.ring(id);
        ring.lock().record(unix_minute(at), failed, elapsed);
    }

    /// The 60 minutes that end with the minute of `now`, oldest first. An endpoint without
    /// attempts in a minute (or ever) gets zeros there.
    pub fn samples(&self, id: EndpointId, now: SystemTime) -> Vec<Sample> {
        let ring = self.rings.read().get(&id).cloned();
        let minute = unix_minute(now);
        match ring {
            Some(ring) => {
                let copy = *ring.lock();
                copy.samples(minute)
            }
            None => Ring::default().samples(minute),
        }
    }

    /// Forgets the rings of every endpoint not in `ids` (after a reload removed some).
    pub fn retain(&self, ids: &[EndpointId]) {
        let stale = self.rings.read().keys().any(|id| !ids.contains(id));
        if stale {
            self.rings.write().retain(|id, _| ids.contains(id));
        }
    }

    /// The ring of `id`, made on first use. The map lock is released on return.
    fn ring(&self, id: EndpointId) -> Arc<Mutex<Ring>> {
        if let Some(ring) = self.rings.read().get(&id) {
            return ring.clone();
        }
        self.rings.write().entry(id).or_default().clone()
    }
}

/// Minutes since the Unix epoch. Wall-clock minutes, so that the page's time axis matches
/// the operator's clock; a clock set back only resets the slots it lands on again.
fn unix_minute(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

/// One endpoint's last hour: slot `m % 60` holds minute `m` when its stamp says so.
#[derive(Clone, Copy)]
struct Ring {
    slots: [Slot; MINUTES],
}

impl Default for Ring {
    fn default() -> Ring {
        Ring {
            slots: [Slot::default(); MINUTES],
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The Unix minute these counts belong to.
    minute: u64,
    requests: u32,
    errors: u32,
    /// Attempts by time to headers: `buckets[i]` counts those up to `BUCKETS[i]` seconds
    /// (and above the one before); the last counts those above every bound.
    buckets: [u32; BUCKETS.len() + 1],
}

impl Ring {
    fn record(&mut self, minute: u64, failed: bool, elapsed: Duration) {
        let slot = &mut self.slots[(minute % MINUTES as u64) as usize];
        if slot.minute != minute {
            *slot = Slot {
                minute,
                ..Slot::default()
            };
        }
        slot.requests = slot.requests.saturating_add(1);
        if failed {
            slot.errors = slot.errors.saturating_add(1);
        }
        let secs = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(BUCKETS.len());
        slot.buckets[bucket] = slot.buckets[bucket].saturating_add(1);
    }

    /// Always `MINUTES` samples; the last is `now_minute` (on any clock past 1970's first
    /// hour).
    fn samples(&self, now_minute: u64) -> Vec<Sample> {
        let first = now_minute.max(MINUTES as u64 - 1) - (MINUTES as u64 - 1);
        (first..first + MINUTES as u64)
            .map(|minute| {
                let slot = self.slots[(minute % MINUTES as u64) as usize];
                let counted = slot.minute == minute && slot.requests > 0;
                Sample {
                    start: minute * 60,
                    requests: if counted { slot.requests } else { 0 },
                    errors: if counted { slot.errors } else { 0 },
                    p50_ms: counted.then(|| quantile_ms(&slot.buckets, 0.5)),
                    p95_ms: counted.then(|| quantile_ms(&slot.buckets, 0.95)),
                }
            })
            .collect()
    }
}

/// The `q` quantile of a non-empty histogram, in milliseconds, interpolated linearly
/// inside the bucket where it falls (as Prometheus's `histogram_quantile` does): the
/// buckets are all that is kept of a minute. Above the last bound it is that bound.
fn quantile_ms(buckets: &[u32; BUCKETS.len() + 1], q: f64) -> f64 {
    let total: u64 = buckets.iter().map(|&n| u64::from(n)).sum();
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &count) in buckets.iter().enumerate() {
        let count = u64::from(count);
        if count > 0 && (below + count) as f64 >= rank {
            let Some(&upper) = BUCKETS.get(i) else {
                return BUCKETS[BUCKETS.len() - 1] * 1000.0;
            };
            let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            let within = (rank - below as f64) / count as f64;
            return (lower + (upper - lower) * within) * 1000.0;
        }
        below += count;
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn at(minute: u64, second: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(minute * 60 + second)
    }

    fn id(n: u32) -> EndpointId {
        EndpointId(n)
    }

    #[test]
    fn sixty_minutes_oldest_first_ending_now() {
        let history = History::default();
        let ms = Duration::from_millis;
        history.record(id(1), false, ms(3), at(1000, 5));
        history.record(id(1), true, ms(3), at(1000, 59));
        history.record(id(1), false, ms(70), at(1059, 0));
        let samples = history.samples(id(1), at(1059, 30));
        assert_eq!(samples.len(), MINUTES);
        assert_eq!(samples[0].start, 1000 * 60);
        assert_eq!(samples[59].start, 1059 * 60);
        assert_eq!((samples[0].requests, samples[0].errors), (2, 1));
        assert_eq!((samples[59].requests, samples[59].errors), (1, 0));
        let quiet = &samples[1..59];
        assert!(quiet.iter().all(|s| s.requests == 0 && s.p50_ms.is_none()));
        // An hour later the first minute has left the window; its slot is reused.
        let later = history.samples(id(1), at(1060, 0));
        assert_eq!(later[0].start, 1001 * 60);
        assert_eq!(later[59].requests, 0);
        history.record(id(1), false, ms(3), at(1060, 1));
        let reused = history.samples(id(1), at(1060, 2));
        assert_eq!((reused[59].requests, reused[59].errors), (1, 0));
        assert_eq!(reused[58].requests, 1);
    }

    #[test]
    fn an_unknown_endpoint_has_an_empty_hour() {
        let samples = History::default().samples(id(7), at(5000, 0));
        assert_eq!(samples.len(), MINUTES);
        assert!(
            samples
                .iter()
                .all(|s| s.requests == 0 && s.p95_ms.is_none())
        );
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let ring = &mut Ring::default();
        // 10 attempts of 1-5 ms (first bucket: 0-5 ms), 10 of 60-100 ms (50-100 ms).
        for _ in 0..10 {
            ring.record(1000, false, Duration::from_millis(2));
            ring.record(1000, false, Duration::from_millis(80));
        }
        let sample = &ring.samples(1000)[59];
        assert_eq!(sample.p50_ms, Some(5.0));
        // rank 19 of 20: 9 of the 10 in 50-100 ms.
        assert_eq!(
            sample.p95_ms.map(|p| (p * 1000.0).round() / 1000.0),
            Some(95.0)
        );
    }

    #[test]
    fn beyond_the_last_bound_reports_the_last_bound() {
        let mut ring = Ring::default();
        ring.record(1000, true, 10 * MINUTE);
        let sample = &ring.samples(1000)[59];
        assert_eq!(sample.p50_ms, Some(300_000.0));
        assert_eq!(sample.errors, 1);
    }

    #[test]
    fn retain_forgets_removed_endpoints() {
        let history = History::default();
        history.record(id(1), false, MINUTE, at(1000, 0));
        history.record(id(2), false, MINUTE, at(1000, 0));
        history.retain(&[id(2)]);
        assert_eq!(history.samples(id(1), at(1000, 0))[59].requests, 0);
        assert_eq!(history.samples(id(2), at(1000, 0))[59].requests, 1);
    }
}
