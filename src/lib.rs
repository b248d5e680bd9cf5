//! failover-proxy: a blocking, multithreaded failover proxy for Anthropic-API clients.
//!
//! A fixed pool of worker threads takes requests from tiny_http, forwards each one to the
//! best eligible upstream endpoint with a blocking ureq call, and fails over to the next
//! endpoint when an attempt fails. Endpoint health is kept exact under concurrency: one
//! `parking_lot::Mutex<HealthStatus>` per endpoint, updated once per attempt, and one
//! failure-queue mutex that admits each endpoint once. See ARCHITECTURE.md for the map.

pub mod cli;
pub mod config;
pub mod endpoint_id;
pub mod forward;
pub mod mock;
pub mod server;
pub mod state;
pub mod time;
pub mod upstream;
