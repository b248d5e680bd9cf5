//! `failover-proxy import-qcc`: turns one profile of qcc's config cache
//! (`~/.fastcc/cache.json`) into a failover-proxy config. The command and its files are
//! `command`'s; the translation itself is `translate`'s.

pub mod command;
pub mod translate;
