//! The open client connections: how many there are, which are idle, and room for a new
//! one. Not in tiny_http 0.12: see vendor/README.md.
//!
//! A connection is idle while it waits for a request head that has not begun (a kept-alive
//! connection between requests, or a new one that has sent nothing yet), busy from the
//! first byte of a head until its answer is written. At `max` connections a new one takes
//! the place of the longest-idle one; when every one is busy, up to `overflow` more are let
//! in for the handler to answer at once (it may serve its own status requests there);
//! beyond that a new connection is refused.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::limits::ConnState;

pub(crate) struct Registry {
    max: usize,
    overflow: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next_key: u64,
    states: HashMap<u64, Arc<ConnState>>,
}

/// What a new connection gets.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// A place of its own.
    Admitted,
    /// A place beyond the bound: every other connection is busy.
    Overflow,
    /// No place at all.
    Refused,
}

/// A registered connection leaves the registry when this is dropped.
pub(crate) struct Registered {
    registry: Arc<Registry>,
    key: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().states.remove(&self.key);
    }
}

impl Registry {
    pub(crate) fn new(max: usize, overflow: usize) -> Arc<Registry> {
        Arc::new(Registry {
            max,
            overflow,
            open: Mutex::new(Open::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds a place for `state`, closing the longest-idle connection when that is what
    /// makes room. The evicted connection's socket is shut down under the lock; that is
    /// a system call on a socket nobody is writing to, not a wait.
    pub(crate) fn admit(
        self: &Arc<Registry>,
        state: &Arc<ConnState>,
    ) -> (Admission, Option<Registered>) {
        let mut open = self.lock();
        let admission = if open.states.len() < self.max || evict_longest_idle(&mut open.states) {
            Admission::Admitted
        } else if open.states.len() < self.max + self.overflow {
            Admission::Overflow
        } else {
            return (Admission::Refused, None);
        };
        open.next_key += 1;
        let key = open.next_key;
        open.states.insert(key, state.clone());
        let registered = Registered {
            registry: self.clone(),
            key,
        };
        (admission, Some(registered))
    }

    /// Closes every idle connection (a server that is stopping); returns how many.
    pub(crate) fn close_idle(&self) -> usize {
        let open = self.lock();
        open.states.values().filter(|state| state.evict()).count()
    }

    /// Open connections now.
    pub(crate) fn len(&self) -> usize {
        self.lock().states.len()
    }
}

/// Evicts the idle connection that has waited longest; false when none is idle.
fn evict_longest_idle(open: &mut HashMap<u64, Arc<ConnState>>) -> bool {
    let mut idle: Vec<(u64, u64)> = open
        .iter()
        .filter(|(_, state)| state.is_idle())
        .map(|(key, state)| (state.idle_since.load(Ordering::SeqCst), *key))
        .collect();
    idle.sort_unstable();
    // The oldest one may turn busy between the look and the eviction: try the next.
    for (_, key) in idle {
        if open.get(&key).is_some_and(|state| state.evict()) {
            open.remove(&key);
            return true;
        }
    }
    false
}
