//! Strategies: which eligible endpoint serves the next attempt.
//!
//! Selection knows nothing of health, sockets or locks elsewhere: the caller passes the
//! endpoints that are eligible right now, and `pick` returns one of them. Every strategy
//! first narrows to the best (lowest number) priority tier present, then chooses within it.

use crate::config::validated::Strategy;
use crate::time::random_u64;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An eligible endpoint as selection sees it; `index` is its place in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    pub priority: u32,
    pub weight: u32,
    pub in_flight: usize,
}

pub struct Selector {
    strategy: Strategy,
    /// Smooth weighted round-robin's current weight per endpoint index (nginx's algorithm).
    current: Mutex<Vec<i64>>,
    next: AtomicUsize,
}

impl Selector {
    pub fn new(strategy: Strategy, endpoints: usize) -> Selector {
        Selector {
            strategy,
            current: Mutex::new(vec![0; endpoints]),
            next: AtomicUsize::new(0),
        }
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The endpoint index to try, or None when there is no candidate.
    pub fn pick(&self, candidates: &[Candidate]) -> Option<usize> {
        let best = candidates.iter().map(|c| c.priority).min()?;
        let tier: Vec<Candidate> = candidates
            .iter()
            .filter(|c| c.priority == best)
            .copied()
            .collect();
        let chosen = match self.strategy {
            Strategy::PriorityFailover => tier[0],
            Strategy::Weighted => self.smooth_weighted(&tier),
            Strategy::RoundRobin => tier[self.next.fetch_add(1, Ordering::Relaxed) % tier.len()],
            Strategy::Random => tier[(random_u64() % tier.len() as u64) as usize],
            Strategy::LeastConnections => *tier.iter().min_by_key(|c| c.in_flight)?,
        };
        Some(chosen.index)
    }

    /// Each pick raises every candidate by its weight and lowers the chosen one by the
    /// total: deterministic, exact over a cycle, and interleaved (weights 3:1 give a a b a).
    fn smooth_weighted(&self, tier: &[Candidate]) -> Candidate {
        let total: i64 = tier.iter().map(|c| c.weight as i64).sum();
        let mut current = self.current.lock();
        let mut best = tier[0];
        let mut best_value = i64::MIN;
        for c in tier {
            if current.len() <= c.index {
                current.resize(c.index + 1, 0);
            }
            current[c.index] += c.weight as i64;
            if current[c.index] > best_value {
                best_value = current[c.index];
                best = *c;
            }
        }
        current[best.index] -= total;
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(index: usize, priority: u32, weight: u32) -> Candidate {
        Candidate {
            index,
            priority,
            weight,
            in_flight: 0,
        }
    }

    #[test]
    fn priority_failover_takes_the_first_of_the_best_tier() {
        let s = Selector::new(Strategy::PriorityFailover, 3);
        assert_eq!(
            s.pick(&[cand(0, 2, 1), cand(1, 1, 1), cand(2, 1, 1)]),
            Some(1)
        );
        assert_eq!(s.pick(&[]), None);
    }

    #[test]
    fn weighted_is_exact_and_interleaved() {
        let s = Selector::new(Strategy::Weighted, 2);
        let c = [cand(0, 1, 3), cand(1, 1, 1)];
        let picks: Vec<usize> = (0..400).map(|_| s.pick(&c).unwrap()).collect();
        assert_eq!(picks[..4], [0, 0, 1, 0]);
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 300);
        let longest_run = picks.split(|&i| i == 1).map(|run| run.len()).max().unwrap();
        assert!(longest_run <= 3);
    }

    #[test]
    fn round_robin_alternates_and_least_connections_prefers_idle() {
        let s = Selector::new(Strategy::RoundRobin, 2);
        let c = [cand(0, 1, 1), cand(1, 1, 1)];
        let picks: Vec<usize> = (0..4).map(|_| s.pick(&c).unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        let s = Selector::new(Strategy::LeastConnections, 2);
        let busy = Candidate {
            in_flight: 3,
            ..cand(0, 1, 1)
        };
        let idle = Candidate {
            in_flight: 1,
            ..cand(1, 1, 1)
        };
        assert_eq!(s.pick(&[busy, idle]), Some(1));
    }
}
