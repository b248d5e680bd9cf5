//! A mock Anthropic API upstream with fault injection, for the integration tests, the
//! benches and the `demo` command. `control::MockUpstream` is the handle; its doc has the
//! routes, the `x-mock-*` headers and the counters.

mod body;
mod conn;
pub mod control;
pub mod fault;
mod options;
mod plan;
pub mod request;
mod server;
mod shared;
mod write;
