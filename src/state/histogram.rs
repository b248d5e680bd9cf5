//! The request-duration histogram (atomics) and its bucket bounds: shared by the state
//! that fills it, the metrics that print it and the per-minute history.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the duration buckets, in seconds: LLM requests run from milliseconds
/// (errors, count_tokens) to many minutes (long streams).
pub const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A cumulative-on-read histogram: each observation increments one bucket.
#[derive(Default)]
pub struct Histogram {
    pub(crate) counts: [AtomicU64; BUCKETS.len() + 1],
    pub(crate) sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}
