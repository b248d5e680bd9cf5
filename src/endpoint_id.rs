//! An endpoint's id, qcc's rule: a plain type at the bottom of the crate, named by the
//! config, the queue, the affinity table and the stats alike.

use sha2::{Digest, Sha256};
use std::fmt;

/// The first 8 hex digits of SHA-256 of `base_url|api_key`, as in qcc: the id survives a
/// restart, a reload and a migration from qcc, yet reveals nothing of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

impl EndpointId {
    pub fn derive(base_url: &str, api_key: &str) -> EndpointId {
        let digest = Sha256::digest(format!("{base_url}|{api_key}").as_bytes());
        EndpointId(u32::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3],
        ]))
    }

    pub fn parse(text: &str) -> Option<EndpointId> {
        if text.len() != 8 {
            return None;
        }
        u32::from_str_radix(text, 16).ok().map(EndpointId)
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}
