//! failover-proxy: a blocking, multithreaded failover proxy for Anthropic-API clients.
//!
//! Each client connection is served on a thread of its own (tiny_http, vendored), one
//! request after another: the thread forwards each request to the best eligible upstream
//! endpoint with a blocking ureq call, and fails over to the next endpoint when an attempt
//! fails. Endpoint health is kept exact under concurrency: one
//! `parking_lot::Mutex<HealthStatus>` per endpoint, updated once per attempt, and one
//! failure-queue mutex that admits each endpoint once. See ARCHITECTURE.md for the map.
//!
//! The modules are the layers, from the client inwards:
//! - `cli`: the command line and its commands (`serve`, `check`, `demo`, `import-qcc`, …);
//! - `server`: the client side, the only layer that knows tiny_http: start and shutdown,
//!   each request on its connection's thread, the admin API;
//! - `forward`: one request forwarded: the failover loop, the commit point, the pump;
//! - `upstream`: the ureq side: one call and what its answer means, the agents, the bounds
//!   on every upstream wait, the probes;
//! - `state`: what every thread shares: endpoints and their health, the failure queue,
//!   selection, affinity, the recovery round, the history;
//! - `config`: the config file, validated;
//! - `quota`, `usage`: what upstream answers say of their limits and token counts;
//! - `endpoint_id`, `time`, `body_budget`, `json_fields`: plain pieces at the bottom;
//! - `mock`: the fault-injecting upstream of the tests, the benches and the demo.

pub mod body_budget;
pub mod cli;
pub mod config;
pub mod endpoint_id;
pub mod forward;
pub mod json_fields;
pub mod mock;
pub mod quota;
pub mod server;
pub mod state;
pub mod thread_stack;
pub mod time;
pub mod upstream;
pub mod usage;
