//! All integration tests in one binary (one link step, shared helpers in `support`).

mod support;

mod forwarding;
mod mock_upstream;
