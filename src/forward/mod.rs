//! One client request forwarded: the failover loop (`failover`: choose, call, classify,
//! record, then deliver or try the next endpoint), the answer held back before the commit
//! point (`answer`), the pump after it (`stream`), what answers say of quota and usage
//! (`account`), and the request rewrites (`rewrite`).

pub mod account;
pub mod answer;
pub mod failover;
pub mod rewrite;
pub mod stream;
