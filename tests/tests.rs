//! All integration tests in one binary (one link step, shared helpers in `support`).

mod support;

mod admin_access;
mod balancing;
mod capacity;
mod check_probe;
mod concurrency;
mod config_check;
mod config_fuzz;
mod demo;
mod failover;
mod forwarding;
mod hangs;
mod haproxy;
mod head_fuzz;
mod hostile;
mod import;
mod mock_upstream;
mod observability;
mod outbound_proxy;
mod passthrough;
mod quota_usage;
mod recovery;
mod soak;
mod status_page;
mod status_page_browser;
mod streaming;
mod stress;
mod tls;
