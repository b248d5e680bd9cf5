//! The bytes of bodies held in memory at once, all connections together
//! (`max_body_memory`). A request body is held whole while its request may still be sent
//! again (until its answer is committed, or the request ends); an answer read whole before
//! the commit point (up to 8 MiB) is held until it is written. Without a bound across
//! connections, `max_body_bytes` times `max_connections` (128 GiB by default) and 8 MiB
//! times `max_connections` (32 GiB) were the only limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct BodyBudget(AtomicUsize);

/// One request's part of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    /// An empty share, for a request whose body is about to be read.
    pub fn share(self: &Arc<Self>) -> Share {
        Share {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// The bytes held now.
    pub fn held(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Share {
    /// Takes `more` bytes, unless all bodies together would then hold more than `limit`.
    pub fn grow(&mut self, more: usize, limit: usize) -> bool {
        let taken = self
            .budget
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(more).filter(|&after| after <= limit)
            });
        if taken.is_ok() {
            self.bytes += more;
        }
        taken.is_ok()
    }

    /// An empty share of the same budget: an answer's, beside its request's.
    pub fn sibling(&self) -> Share {
        self.budget.share()
    }

    /// Gives back `bytes` of what this share took.
    pub fn give_back(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        self.budget.0.fetch_sub(bytes, Ordering::SeqCst);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.0.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_take_within_the_limit_and_give_everything_back() {
        let budget = Arc::new(BodyBudget::default());
        let mut a = budget.share();
        let mut b = budget.share();
        assert!(a.grow(600, 1000));
        assert!(!b.grow(500, 1000), "1100 bytes held under a limit of 1000");
        assert!(b.grow(400, 1000));
        assert_eq!(budget.held(), 1000);
        let mut answer = a.sibling();
        assert!(!answer.grow(1, 1000), "a sibling draws on the same budget");
        a.give_back(100);
        assert_eq!(budget.held(), 900);
        drop(a);
        assert_eq!(budget.held(), 400);
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}
