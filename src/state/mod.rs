//! The state every thread shares: the endpoints and their health, the failure queue, the
//! selector, session affinity, the probe schedule and the recovery round, the request
//! counters and the per-minute history. Each part has its own lock or atomics;
//! `shared::State` holds them all and runs the operations that touch more than one.

pub mod affinity;
pub mod endpoint;
pub mod failure_queue;
pub mod health;
pub mod histogram;
pub mod history;
#[cfg(all(test, loom))]
mod models;
pub mod recovery;
pub mod schedule;
pub mod select;
pub mod shared;
pub mod sync;
