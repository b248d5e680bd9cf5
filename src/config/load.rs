//! The config file: parsed raw, then validated into `Config` (`validated.rs`).
//!
//! `RawConfig` mirrors the JSON exactly (serde, unknown fields rejected by name, so a typo
//! is an error and not a silently ignored setting). Validation applies the defaults and
//! checks every value. Errors name the file and the field (or the line and column, for JSON
//! syntax) and say what is wrong. Nothing else parses config.

use crate::config::prices::validate_prices;
use crate::config::secret::Secret;
use crate::config::validated::{
    Auth, Config, EndpointConfig, Overrides, Probe, ProbeKind, Strategy,
};
use crate::endpoint_id::EndpointId;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config that could not be loaded: which file, and what is wrong where.
#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    workers: Option<usize>,
    strategy: Option<Strategy>,
    max_attempts: Option<u32>,
    max_attempts_per_endpoint: Option<u32>,
    max_body_bytes: Option<usize>,
    max_body_memory: Option<usize>,
    connect_timeout: Option<f64>,
    idle_timeout: Option<f64>,
    recovery_interval: Option<f64>,
    recovery_max_interval: Option<f64>,
    probe: Option<RawProbe>,
    rate_limit_cooldown: Option<f64>,
    affinity_ttl: Option<f64>,
    model_override: Option<String>,
    access_tokens: Option<Vec<String>>,
    admin_token: Option<String>,
    client_header_timeout: Option<f64>,
    client_body_timeout: Option<f64>,
    client_send_timeout: Option<f64>,
    keepalive_timeout: Option<f64>,
    max_connections: Option<usize>,
    quota_reserve: Option<u64>,
    prices: Option<BTreeMap<String, serde_json::Value>>,
    /// A comment (`"//": "..."`): JSON has none of its own.
    #[serde(rename = "//")]
    _comment: Option<serde_json::Value>,
    endpoints: Vec<RawEndpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    kind: Option<ProbeKind>,
    model: Option<String>,
    max_tokens: Option<u32>,
    path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: Option<String>,
    base_url: String,
    api_key: Option<String>,
    api_key_env: Option<String>,
    weight: Option<u32>,
    priority: Option<u32>,
    enabled: Option<bool>,
    max_failures: Option<u32>,
    timeout: Option<f64>,
    stream_timeout: Option<f64>,
    max_in_flight: Option<usize>,
    auth: Option<String>,
    ca_file: Option<PathBuf>,
    proxy: Option<String>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7860";

impl EndpointConfig {
    /// The endpoint a config naming only `name`, `base_url` and `api_key` gets: every
    /// other field at its default, through the same validation (for tests and benches).
    pub fn with_defaults(
        name: &str,
        base_url: &str,
        api_key: &str,
    ) -> Result<EndpointConfig, String> {
        let raw = RawEndpoint {
            name: Some(name.to_string()),
            base_url: base_url.to_string(),
            api_key: Some(api_key.to_string()),
            api_key_env: None,
            weight: None,
            priority: None,
            enabled: None,
            max_failures: None,
            timeout: None,
            stream_timeout: None,
            max_in_flight: None,
            auth: None,
            ca_file: None,
            proxy: None,
        };
        validate_endpoint(0, raw, &|_| None)
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            message: format!("cannot read the file: {e}"),
        })?;
        Config::from_json(&text, overrides, &|name| std::env::var(name).ok())
            .map_err(|message| ConfigError { file, message })
    }

    /// Parses and validates config text; `env` resolves `api_key_env` names. The error is
    /// the message without the file name.
    pub fn from_json(
        text: &str,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(describe_json_error)?;
        validate(raw, overrides, env)
    }
}

/// serde_json says "at line L column C" at the end; we put the place first, where a
/// reader looks for it.
fn describe_json_error(e: serde_json::Error) -> String {
    let text = e.to_string();
    let message = match text.rfind(" at line ") {
        Some(cut) => &text[..cut],
        None => &text,
    };
    // serde quotes what the file says (an unknown field's name): a control character in
    // it must not break the message into lines of its own.
    let message: String = message
        .chars()
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect();
    format!("line {}, column {}: {message}", e.line(), e.column())
}

fn validate(
    raw: RawConfig,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, String> {
    let listen_text = overrides
        .listen
        .clone()
        .or(raw.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = parse_listen(&listen_text)?;
    let workers = overrides.workers.or(raw.workers).unwrap_or(64);
    if !(1..=4096).contains(&workers) {
        return Err(format!("workers: {workers} is out of range 1..=4096"));
    }
    let max_connections = raw.max_connections.unwrap_or(4096);
    if !(1..=1_000_000).contains(&max_connections) {
        return Err(format!(
            "max_connections: {max_connections} is out of range 1..=1000000"
        ));
    }
    let access_tokens: Vec<Secret> = raw
        .access_tokens
        .unwrap_or_default()
        .into_iter()
        .map(Secret::new)
        .collect();
    if access_tokens.iter().any(|t| t.expose().is_empty()) {
        return Err("access_tokens: a token must not be empty".into());
    }
    if !listen.ip().is_loopback() && access_tokens.is_empty() {
        return Err(format!(
            "listen: {listen} is reachable from other machines but access_tokens is empty; \
             that would lend the upstream keys to the whole network (set access_tokens, \
             or listen on 127.0.0.1)"
        ));
    }
    let recovery_interval = seconds("recovery_interval", raw.recovery_interval, 60.0)?;
    let recovery_max_interval = seconds("recovery_max_interval", raw.recovery_max_interval, 600.0)?;
    if recovery_interval.is_zero() {
        return Err("recovery_interval: must be greater than 0".into());
    }
    if recovery_max_interval < recovery_interval {
        return Err("recovery_max_interval: must not be less than recovery_interval".into());
    }
    let max_body_bytes = raw.max_body_bytes.unwrap_or(32 * 1024 * 1024);
    // Unset, it is never below max_body_bytes: a config that raised only that still loads.
    let max_body_memory = raw.max_body_memory.unwrap_or(max_body_bytes.max(1 << 30));
    if max_body_memory < max_body_bytes {
        return Err(format!(
            "max_body_memory: {max_body_memory} is less than max_body_bytes \
             ({max_body_bytes}); a body of the largest size allowed could never be held"
        ));
    }
    let endpoints = validate_endpoints(raw.endpoints, env)?;
    Ok(Config {
        listen,
        workers,
        strategy: raw.strategy.unwrap_or(Strategy::PriorityFailover),
        max_attempts: at_least_one("max_attempts", raw.max_attempts, 5)?,
        max_attempts_per_endpoint: at_least_one(
            "max_attempts_per_endpoint",
            raw.max_attempts_per_endpoint,
            2,
        )?,
        max_body_bytes,
        max_body_memory,
        connect_timeout: positive_seconds("connect_timeout", raw.connect_timeout, 10.0)?,
        idle_timeout: positive_seconds("idle_timeout", raw.idle_timeout, 300.0)?,
        recovery_interval,
        recovery_max_interval,
        probe: validate_probe(raw.probe)?,
        rate_limit_cooldown: seconds("rate_limit_cooldown", raw.rate_limit_cooldown, 30.0)?,
        affinity_ttl: seconds("affinity_ttl", raw.affinity_ttl, 18000.0)?,
        model_override: raw.model_override,
        access_tokens,
        admin_token: raw.admin_token.map(Secret::new),
        client_header_timeout: positive_seconds(
            "client_header_timeout",
            raw.client_header_timeout,
            30.0,
        )?,
        client_body_timeout: positive_seconds(
            "client_body_timeout",
            raw.client_body_timeout,
            60.0,
        )?,
        client_send_timeout: positive_seconds(
            "client_send_timeout",
            raw.client_send_timeout,
            60.0,
        )?,
        keepalive_timeout: positive_seconds("keepalive_timeout", raw.keepalive_timeout, 75.0)?,
        max_connections,
        quota_reserve: raw.quota_reserve.unwrap_or(0),
        prices: validate_prices(raw.prices)?,
        endpoints,
    })
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| format!("listen: {text:?} is not a host:port address ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| format!("listen: {text:?} resolves to no address"))
}

fn validate_probe(raw: Option<RawProbe>) -> Result<Probe, String> {
    let raw = raw.unwrap_or(RawProbe {
        kind: None,
        model: None,
        max_tokens: None,
        path: None,
    });
    let path = raw.path.unwrap_or_else(|| "/v1/models".into());
    if !path.starts_with('/') {
        return Err(format!("probe.path: {path:?} must start with '/'"));
    }
    Ok(Probe {
        kind: raw.kind.unwrap_or(ProbeKind::Conversation),
        model: raw
            .model
            .unwrap_or_else(|| "claude-3-5-haiku-20241022".into()),
        max_tokens: at_least_one("probe.max_tokens", raw.max_tokens, 20)?,
        path,
    })
}

fn validate_endpoints(
    raw: Vec<RawEndpoint>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<EndpointConfig>, String> {
    if raw.is_empty() {
        return Err("endpoints: at least one endpoint is required".into());
    }
    let mut endpoints: Vec<EndpointConfig> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let e = validate_endpoint(i, r, env)?;
        if let Some(j) = endpoints.iter().position(|o| o.id == e.id) {
            return Err(format!(
                "endpoints[{i}]: same base_url and api_key as endpoints[{j}] (id {})",
                e.id
            ));
        }
        endpoints.push(e);
    }
    Ok(endpoints)
}

fn validate_endpoint(
    i: usize,
    r: RawEndpoint,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<EndpointConfig, String> {
    let field = |name: &str| format!("endpoints[{i}].{name}");
    let base_url = r.base_url.trim_end_matches('/').to_string();
    let host = base_url
        .strip_prefix("https://")
        .or_else(|| base_url.strip_prefix("http://"));
    if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
        return Err(format!(
            "{}: {:?} must be an http:// or https:// URL",
            field("base_url"),
            r.base_url
        ));
    }
    let api_key = match (r.api_key, r.api_key_env) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "endpoints[{i}]: set either api_key or api_key_env, not both"
            ));
        }
        (None, None) => {
            return Err(format!(
                "endpoints[{i}]: missing api_key (or api_key_env naming an environment variable)"
            ));
        }
        (Some(key), None) => key,
        (None, Some(var)) => env(&var).ok_or_else(|| {
            format!(
                "{}: environment variable {var} is not set",
                field("api_key_env")
            )
        })?,
    };
    if api_key.trim().is_empty() {
        return Err(format!("{}: the key is empty", field("api_key")));
    }
    if let Some(proxy) = &r.proxy {
        let known = [
            "http://",
            "https://",
            "socks5://",
            "socks5h://",
            "socks4://",
        ];
        if !known.iter().any(|s| proxy.starts_with(s)) {
            return Err(format!(
                "{}: {proxy:?} must be http://host:port or socks5://host:port",
                field("proxy")
            ));
        }
    }
    let id = EndpointId::derive(&base_url, &api_key);
    Ok(EndpointConfig {
        id,
        name: r.name.unwrap_or_else(|| default_name(&base_url)),
        weight: at_least_one(&field("weight"), r.weight, 100)?,
        priority: at_least_one(&field("priority"), r.priority, 1)?,
        enabled: r.enabled.unwrap_or(true),
        max_failures: at_least_one(&field("max_failures"), r.max_failures, 3)?,
        timeout: positive_seconds(&field("timeout"), r.timeout, 600.0)?,
        stream_timeout: positive_seconds(&field("stream_timeout"), r.stream_timeout, 60.0)?,
        max_in_flight: match r.max_in_flight {
            Some(0) => return Err(format!("{}: must be at least 1", field("max_in_flight"))),
            other => other,
        },
        auth: parse_auth(&field("auth"), r.auth.as_deref())?,
        ca_file: r.ca_file,
        proxy: r.proxy,
        base_url,
        api_key: Secret::new(api_key),
    })
}

fn parse_auth(field: &str, value: Option<&str>) -> Result<Auth, String> {
    let Some(text) = value else {
        return Ok(Auth::Both);
    };
    Auth::ALL
        .into_iter()
        .find(|a| a.name() == text)
        .ok_or_else(|| format!("{field}: {text:?} must be \"x-api-key\", \"bearer\" or \"both\""))
}

/// An endpoint without a name is called by its host, which is what a user recognises.
fn default_name(base_url: &str) -> String {
    let rest = base_url.split("://").nth(1).unwrap_or(base_url);
    rest.split('/').next().unwrap_or(rest).to_string()
}

fn at_least_one(field: &str, value: Option<u32>, default: u32) -> Result<u32, String> {
    match value {
        Some(0) => Err(format!("{field}: must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

fn seconds(field: &str, value: Option<f64>, default: f64) -> Result<Duration, String> {
    let v = value.unwrap_or(default);
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("{field}: {v} is not a valid number of seconds"))
}

fn positive_seconds(field: &str, value: Option<f64>, default: f64) -> Result<Duration, String> {
    let d = seconds(field, value, default)?;
    if d.is_zero() {
        return Err(format!("{field}: must be greater than 0"));
    }
    Ok(d)
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
