//! The ureq side: the request an upstream gets and what its answer means (`call`), the
//! agents that make the connections (`agent`), the transport wrapper that bounds every
//! upstream wait (`idle`), and the recovery probes (`probe`). Every call blocks the thread
//! that makes it.

pub mod agent;
pub mod call;
pub mod idle;
pub mod probe;
