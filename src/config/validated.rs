//! The validated config: what the rest of the program sees. Every default applied, every
//! time a `Duration`, every key resolved from the environment, every endpoint with its id.
//! Built only by `load.rs`, which reads the file.

use crate::config::secret::Secret;
use crate::endpoint_id::EndpointId;
use crate::usage::Price;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How a request picks among the eligible endpoints of the best priority tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    PriorityFailover,
    Weighted,
    RoundRobin,
    Random,
    LeastConnections,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::PriorityFailover => "priority_failover",
            Strategy::Weighted => "weighted",
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::LeastConnections => "least_connections",
        }
    }
}

/// What the recovery thread sends to a quarantined endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// qcc's check: a tiny conversation whose answer must echo a fresh random code.
    Conversation,
    /// `GET base_url + path`, recovered on 2xx.
    Http,
}

/// Which header(s) carry an endpoint's key to the upstream and in its probes. Relays
/// differ in which one they read, and an OAuth access token wants the Bearer form only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// `x-api-key: <key>` only.
    XApiKey,
    /// `authorization: Bearer <key>` only.
    Bearer,
    /// Both headers (the default, as qcc does).
    Both,
}

impl Auth {
    pub(super) const ALL: [Auth; 3] = [Auth::XApiKey, Auth::Bearer, Auth::Both];

    /// The name the config file uses.
    pub fn name(self) -> &'static str {
        match self {
            Auth::XApiKey => "x-api-key",
            Auth::Bearer => "bearer",
            Auth::Both => "both",
        }
    }

    pub fn sends_x_api_key(self) -> bool {
        matches!(self, Auth::XApiKey | Auth::Both)
    }

    pub fn sends_bearer(self) -> bool {
        matches!(self, Auth::Bearer | Auth::Both)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub model: String,
    pub max_tokens: u32,
    pub path: String,
}

/// The validated config. Built only by `Config::load` / `Config::from_json` (`load.rs`).
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Threads kept ready for new client connections (more are made on demand, up to one
    /// per open connection; `max_connections` is the bound).
    pub workers: usize,
    pub strategy: Strategy,
    pub max_attempts: u32,
    pub max_attempts_per_endpoint: u32,
    pub max_body_bytes: usize,
    /// Bytes of request bodies held in memory at once, all connections together (each is
    /// held whole so that it can be sent again); a body that would pass it gets 529.
    pub max_body_memory: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub recovery_interval: Duration,
    pub recovery_max_interval: Duration,
    pub probe: Probe,
    pub rate_limit_cooldown: Duration,
    pub affinity_ttl: Duration,
    pub model_override: Option<String>,
    pub access_tokens: Vec<Secret>,
    pub admin_token: Option<Secret>,
    /// The longest wait for a whole request head (408, then close).
    pub client_header_timeout: Duration,
    /// The longest wait between two reads of a request body (408, then close).
    pub client_body_timeout: Duration,
    /// The longest a write to a client may wait for the client to read (its connection is
    /// then closed, and the upstream request with it).
    pub client_send_timeout: Duration,
    /// How long an idle kept-alive client connection stays open.
    pub keepalive_timeout: Duration,
    /// Open client connections at most; idle ones make room for new ones.
    pub max_connections: usize,
    /// An endpoint whose last answer left this many requests or tokens or fewer is skipped
    /// until the reset the answer named.
    pub quota_reserve: u64,
    /// USD per million tokens by model, for estimated costs (empty: no costs shown).
    pub prices: BTreeMap<String, Price>,
    pub endpoints: Vec<EndpointConfig>,
}

/// One validated endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointConfig {
    pub id: EndpointId,
    pub name: String,
    /// Without a trailing slash, so `base_url + path` is the upstream URL.
    pub base_url: String,
    pub api_key: Secret,
    pub weight: u32,
    pub priority: u32,
    pub enabled: bool,
    pub max_failures: u32,
    /// The per-attempt wait for the upstream's response headers, and for the whole body
    /// of a non-streaming answer.
    pub timeout: Duration,
    /// For `"stream": true`: the longest wait from sending the request to its first
    /// content event.
    pub stream_timeout: Duration,
    /// Attempts in progress at most; at the cap the endpoint is skipped (not a failure).
    pub max_in_flight: Option<usize>,
    /// Which header(s) carry `api_key` upstream.
    pub auth: Auth,
    pub ca_file: Option<PathBuf>,
    pub proxy: Option<String>,
}

/// Settings from the command line that take precedence over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub workers: Option<usize>,
}

impl Config {
    /// True when the proxy listens only to this machine.
    pub fn listens_on_loopback(&self) -> bool {
        self.listen.ip().is_loopback()
    }
}
