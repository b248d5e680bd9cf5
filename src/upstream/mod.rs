//! The ureq side: the request an upstream gets and what its answer means (`call`), the
//! agents that make the connections (`agent`), the transport wrappers that bound every
//! upstream wait (`idle`) and save writes and system calls (`wire`), the idle connections
//! kept between requests (`pool`), the host names looked up once a minute rather than
//! once a request (`resolve`), and the recovery probes (`probe`). Every call blocks the
//! thread that makes it.

pub mod agent;
pub mod call;
pub mod idle;
pub mod pool;
pub mod probe;
pub mod resolve;
pub mod wire;
