//! The translation of one profile of qcc's config cache into a failover-proxy config: text
//! in, config text and notes out, pure, so it is tested without files.
//!
//! Only the fields we use are read; everything else in the cache is ignored, as qcc's own
//! readers do. Endpoint ids are kept: both programs hash `base_url|api_key` the same way.
//! Keys go only into the config itself, never into a note or an error: with
//! `--keys-to-env` the notes name the environment variables, not what goes in them.

use crate::config::validated::{Config, Overrides};
use crate::state::endpoint::EndpointId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// qcc's `timeout` bounded the whole request; ours bounds the wait for response headers.
/// A qcc timeout below this is too short for that wait, so the import keeps our default.
const SHORTEST_CARRIED_TIMEOUT: f64 = 60.0;
/// failover-proxy's default `timeout`, which the import writes when it does not carry qcc's.
const DEFAULT_TIMEOUT: f64 = 600.0;
/// qcc's default endpoint `timeout`, for endpoints that do not set one.
const QCC_DEFAULT_TIMEOUT: f64 = 30.0;

/// A translated profile: the config text, the notes for stderr, and the endpoint ids.
#[derive(Debug)]
pub struct Imported {
    pub profile: String,
    /// Pretty JSON, ending in a newline.
    pub config: String,
    /// One line each; never a key.
    pub notes: Vec<String>,
    pub ids: Vec<EndpointId>,
}

/// qcc's cache: only `profiles` matters.
#[derive(Deserialize)]
struct QccCache {
    profiles: Option<BTreeMap<String, QccProfile>>,
}

#[derive(Deserialize)]
struct QccProfile {
    endpoints: Option<Vec<QccEndpoint>>,
    base_url: Option<String>,
    api_key: Option<String>,
}

#[derive(Deserialize)]
struct QccEndpoint {
    id: Option<String>,
    base_url: Option<String>,
    api_key: Option<String>,
    weight: Option<u32>,
    priority: Option<u32>,
    enabled: Option<bool>,
    max_failures: Option<u32>,
    timeout: Option<f64>,
}

/// An endpoint as the new config writes it; field order is the order in the file.
#[derive(Serialize)]
struct OutEndpoint {
    name: String,
    base_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key_env: Option<String>,
    weight: u32,
    priority: u32,
    enabled: bool,
    max_failures: u32,
    timeout: serde_json::Number,
}

#[derive(Serialize)]
struct OutConfig {
    listen: &'static str,
    strategy: &'static str,
    endpoints: Vec<OutEndpoint>,
}

/// Translates one profile of qcc's cache text. `profile` may be None when the cache has
/// exactly one. The error is a message without the file name (the caller adds it).
pub fn translate(text: &str, profile: Option<&str>, keys_to_env: bool) -> Result<Imported, String> {
    let cache: QccCache = serde_json::from_str(text).map_err(describe_json_error)?;
    let profiles = cache
        .profiles
        .ok_or("no `profiles` in it: is this qcc's cache.json?")?;
    let (name, chosen) = choose_profile(profiles, profile)?;
    let endpoints = profile_endpoints(&name, chosen)?;
    let mut notes = Vec::new();
    let mut out = Vec::with_capacity(endpoints.len());
    let mut ids = Vec::with_capacity(endpoints.len());
    for (i, e) in endpoints.into_iter().enumerate() {
        let (endpoint, id) = translate_endpoint(&name, i, e, keys_to_env, &mut notes)?;
        out.push(endpoint);
        ids.push(id);
    }
    if keys_to_env {
        notes.push(env_instructions(&out));
    }
    let config = OutConfig {
        listen: crate::config::load::DEFAULT_LISTEN,
        strategy: "priority_failover",
        endpoints: out,
    };
    let config = serde_json::to_string_pretty(&config)
        .map_err(|e| format!("cannot write the config: {e}"))?
        + "\n";
    validate_output(&config)?;
    Ok(Imported {
        profile: name,
        config,
        notes,
        ids,
    })
}

/// serde_json puts "at line L column C" last; the place goes first, where a reader looks.
fn describe_json_error(e: serde_json::Error) -> String {
    let text = e.to_string();
    let message = text
        .rfind(" at line ")
        .map_or(text.as_str(), |cut| &text[..cut]);
    format!("line {}, column {}: {message}", e.line(), e.column())
}

/// The named profile, or the only one when none is named.
fn choose_profile(
    mut profiles: BTreeMap<String, QccProfile>,
    wanted: Option<&str>,
) -> Result<(String, QccProfile), String> {
    let names = profiles.keys().cloned().collect::<Vec<_>>().join(", ");
    match wanted {
        Some(name) => match profiles.remove(name) {
            Some(p) => Ok((name.to_string(), p)),
            None if profiles.is_empty() => {
                Err(format!("no profile named {name:?}: it has no profiles"))
            }
            None => Err(format!(
                "no profile named {name:?}; its profiles are: {names}"
            )),
        },
        None if profiles.len() > 1 => Err(format!(
            "it has {} profiles ({names}); choose one with --profile NAME",
            profiles.len()
        )),
        None => profiles
            .pop_first()
            .ok_or_else(|| "it has no profiles".to_string()),
    }
}

/// A profile's endpoints; a profile without an `endpoints` list (older qcc) is one endpoint
/// made of its top-level `base_url` and `api_key`, every other field at qcc's default.
fn profile_endpoints(name: &str, profile: QccProfile) -> Result<Vec<QccEndpoint>, String> {
    if let Some(list) = profile.endpoints.filter(|l| !l.is_empty()) {
        return Ok(list);
    }
    if profile.base_url.is_none() && profile.api_key.is_none() {
        return Err(format!(
            "profiles.{name}: no endpoints (neither an `endpoints` list nor a top-level base_url and api_key)"
        ));
    }
    Ok(vec![QccEndpoint {
        id: None,
        base_url: profile.base_url,
        api_key: profile.api_key,
        weight: None,
        priority: None,
        enabled: None,
        max_failures: None,
        timeout: None,
    }])
}

/// Where endpoint `i` of profile `name` sits in qcc's file, for messages.
fn place(name: &str, i: usize, field: &str) -> String {
    format!("profiles.{name}.endpoints[{i}].{field}")
}

fn translate_endpoint(
    profile: &str,
    i: usize,
    e: QccEndpoint,
    keys_to_env: bool,
    notes: &mut Vec<String>,
) -> Result<(OutEndpoint, EndpointId), String> {
    let missing = |field: &str| format!("{}: missing", place(profile, i, field));
    let base_url = e
        .base_url
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| missing("base_url"))?;
    let api_key = e
        .api_key
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| missing("api_key"))?;
    if !(base_url.starts_with("https://") || base_url.starts_with("http://")) {
        return Err(format!(
            "{}: {base_url:?} is not an http:// or https:// URL",
            place(profile, i, "base_url")
        ));
    }
    let name = format!("{profile}-{}", i + 1);
    let id = EndpointId::derive(base_url.trim_end_matches('/'), &api_key);
    if let Some(qcc_id) = e.id.filter(|q| *q != id.to_string()) {
        let why = if base_url.ends_with('/') {
            "failover-proxy drops the trailing '/' of base_url before hashing"
        } else {
            "the stored id does not match this base_url and api_key"
        };
        notes.push(format!(
            "{name}: qcc stored id {qcc_id}, failover-proxy computes {id} from base_url|api_key ({why})"
        ));
    }
    let timeout = carried_timeout(&name, e.timeout.unwrap_or(QCC_DEFAULT_TIMEOUT), notes);
    let (api_key, api_key_env) = if keys_to_env {
        (None, Some(env_var_name(profile, i + 1)))
    } else {
        (Some(api_key), None)
    };
    let endpoint = OutEndpoint {
        name,
        base_url,
        api_key,
        api_key_env,
        weight: at_least_one(profile, i, "weight", e.weight, 100)?,
        priority: at_least_one(profile, i, "priority", e.priority, 1)?,
        enabled: e.enabled.unwrap_or(true),
        max_failures: at_least_one(profile, i, "max_failures", e.max_failures, 3)?,
        timeout,
    };
    Ok((endpoint, id))
}

/// qcc's value, or its default; failover-proxy refuses 0 for these fields.
fn at_least_one(
    profile: &str,
    i: usize,
    field: &str,
    value: Option<u32>,
    default: u32,
) -> Result<u32, String> {
    match value {
        Some(0) => Err(format!(
            "{}: 0 is not allowed in failover-proxy (at least 1)",
            place(profile, i, field)
        )),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// qcc's timeout when it is long enough to be a wait for response headers, else our
/// default; either way a note says what happened, since the meaning differs.
fn carried_timeout(name: &str, qcc: f64, notes: &mut Vec<String>) -> serde_json::Number {
    if qcc.is_finite() && qcc >= SHORTEST_CARRIED_TIMEOUT {
        notes.push(format!(
            "{name}: timeout {qcc} s carried over; it now bounds only the wait for response headers \
             (in qcc it bounded the whole request)"
        ));
        return whole_or_fraction(qcc);
    }
    notes.push(format!(
        "{name}: qcc's timeout {qcc} s bounded the whole request; failover-proxy's timeout is the \
         wait for response headers, so it is left at the default {DEFAULT_TIMEOUT} s"
    ));
    whole_or_fraction(DEFAULT_TIMEOUT)
}

/// `600` rather than `600.0` in the file when the number is whole.
fn whole_or_fraction(v: f64) -> serde_json::Number {
    if v.fract() == 0.0 && v < u64::MAX as f64 {
        serde_json::Number::from(v as u64)
    } else {
        serde_json::Number::from_f64(v).unwrap_or_else(|| serde_json::Number::from(600u64))
    }
}

/// `QCC_<PROFILE>_<N>_KEY`, the profile name upper-cased, anything but A-Z0-9 as `_`.
pub fn env_var_name(profile: &str, n: usize) -> String {
    let profile: String = profile
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("QCC_{profile}_{n}_KEY")
}

/// What the user must do for `--keys-to-env`: the variable names, never the keys.
fn env_instructions(endpoints: &[OutEndpoint]) -> String {
    let mut text = String::from(
        "the config reads each key from an environment variable; export these with the \
         endpoint's key (from qcc) before `check` or `serve` (the keys are not printed):",
    );
    for e in endpoints {
        if let Some(var) = &e.api_key_env {
            text += &format!("\n  {var}  for {} ({})", e.name, e.base_url);
        }
    }
    text
}

/// The written config must pass `check`: validated here with the same code, the
/// environment variables standing in with placeholders.
fn validate_output(config: &str) -> Result<(), String> {
    let placeholder = |_: &str| Some("placeholder-key-for-validation".to_string());
    Config::from_json(config, &Overrides::default(), &placeholder)
        .map(|_| ())
        .map_err(|e| format!("the imported config would not be valid: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "sk-ant-api03-work-key-one-0123456789";
    const KEY_B: &str = "sk-relay-work-key-two-abcdefghijkl";
    const KEY_OLD: &str = "sk-old-style-key-zyxwvutsrq";

    fn cache() -> String {
        serde_json::json!({
            "user_id": "u-1",
            "settings": {"theme": "dark"},
            "profiles": {
                "work": {
                    "name": "work", "description": "", "priority": "primary", "enabled": true,
                    "created_at": "2025-10-01T12:00:00.000000", "last_used": null,
                    "endpoints": [
                        {"id": "00000000", "base_url": "https://api.anthropic.com", "api_key": KEY_A,
                         "weight": 100, "priority": 1, "enabled": true, "max_failures": 3,
                         "timeout": 30, "source_profile": null, "metadata": {}, "created_at": "x"},
                        {"base_url": "https://relay.example/api", "api_key": KEY_B,
                         "weight": 50, "priority": 2, "enabled": false, "max_failures": 5,
                         "timeout": 120}
                    ],
                    "base_url": "https://api.anthropic.com", "api_key": KEY_A
                },
                "old-style": {
                    "name": "old-style", "description": "", "priority": "secondary",
                    "enabled": true, "created_at": "x", "last_used": null,
                    "base_url": "https://relay.example", "api_key": KEY_OLD
                }
            }
        })
        .to_string()
    }

    fn endpoints(imported: &Imported) -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&imported.config).unwrap();
        v["endpoints"].as_array().unwrap().clone()
    }

    #[test]
    fn a_profile_with_endpoints_keeps_fields_and_ids() {
        let imported = translate(&cache(), Some("work"), false).unwrap();
        let e = endpoints(&imported);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0]["name"], "work-1");
        assert_eq!(e[0]["api_key"], KEY_A);
        assert_eq!(e[0]["timeout"], 600, "30 s is not carried over");
        assert_eq!(e[1]["name"], "work-2");
        assert_eq!(
            (e[1]["weight"].clone(), e[1]["priority"].clone()),
            (50.into(), 2.into())
        );
        assert_eq!(
            (e[1]["enabled"].clone(), e[1]["max_failures"].clone()),
            (false.into(), 5.into())
        );
        assert_eq!(e[1]["timeout"], 120);
        let config = Config::from_json(&imported.config, &Overrides::default(), &|_| None).unwrap();
        let ids: Vec<EndpointId> = config.endpoints.iter().map(|e| e.id).collect();
        assert_eq!(ids, imported.ids);
        assert_eq!(
            ids[0],
            EndpointId::derive("https://api.anthropic.com", KEY_A)
        );
    }

    #[test]
    fn every_endpoint_gets_one_timeout_note_and_a_wrong_qcc_id_is_noted() {
        let imported = translate(&cache(), Some("work"), false).unwrap();
        let notes = imported.notes.join("\n");
        assert!(notes.contains("work-1: qcc's timeout 30 s"), "{notes}");
        assert!(
            notes.contains("work-2: timeout 120 s carried over"),
            "{notes}"
        );
        assert!(notes.contains("work-1: qcc stored id 00000000"), "{notes}");
        assert_eq!(imported.notes.len(), 3, "{notes}");
    }

    #[test]
    fn a_profile_without_endpoints_is_one_endpoint_with_defaults() {
        let imported = translate(&cache(), Some("old-style"), false).unwrap();
        let e = endpoints(&imported);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0]["name"], "old-style-1");
        assert_eq!(e[0]["base_url"], "https://relay.example");
        assert_eq!(
            (e[0]["weight"].clone(), e[0]["max_failures"].clone()),
            (100.into(), 3.into())
        );
        assert_eq!(
            imported.ids,
            vec![EndpointId::derive("https://relay.example", KEY_OLD)]
        );
    }

    #[test]
    fn keys_to_env_writes_variable_names_and_no_key_anywhere() {
        let imported = translate(&cache(), Some("old-style"), true).unwrap();
        let e = endpoints(&imported);
        assert_eq!(e[0]["api_key_env"], "QCC_OLD_STYLE_1_KEY");
        assert!(e[0].get("api_key").is_none());
        let all = format!("{}\n{}", imported.config, imported.notes.join("\n"));
        assert!(all.contains("QCC_OLD_STYLE_1_KEY"));
        for key in [KEY_A, KEY_B, KEY_OLD] {
            assert!(!all.contains(key), "{all}");
        }
    }

    #[test]
    fn choosing_a_profile() {
        let err = translate(&cache(), None, false).unwrap_err();
        assert!(err.contains("2 profiles (old-style, work)"), "{err}");
        assert!(err.contains("--profile"), "{err}");
        let err = translate(&cache(), Some("home"), false).unwrap_err();
        assert!(
            err.contains("no profile named \"home\"; its profiles are: old-style, work"),
            "{err}"
        );
        let one = r#"{"profiles":{"solo":{"base_url":"http://127.0.0.1:9","api_key":"k"}}}"#;
        assert_eq!(translate(one, None, false).unwrap().profile, "solo");
    }

    #[test]
    fn errors_name_the_place_and_never_the_key() {
        let cases = [
            ("{\"profiles\": {\n  ,}}", "line 2, column 3"),
            (r#"{"user_id":"u"}"#, "no `profiles`"),
            (r#"{"profiles":{}}"#, "no profiles"),
            (
                r#"{"profiles":{"w":{"name":"w"}}}"#,
                "profiles.w: no endpoints",
            ),
            (
                r#"{"profiles":{"w":{"endpoints":[{"api_key":"sk-secret-key-42"}]}}}"#,
                "profiles.w.endpoints[0].base_url: missing",
            ),
            (
                r#"{"profiles":{"w":{"endpoints":[{"base_url":"http://a","api_key":"sk-secret-key-42","weight":0}]}}}"#,
                "profiles.w.endpoints[0].weight",
            ),
            (
                r#"{"profiles":{"w":{"endpoints":[{"base_url":"ftp://a","api_key":"sk-secret-key-42"}]}}}"#,
                "endpoints[0].base_url",
            ),
        ];
        for (text, expected) in cases {
            let err = translate(text, None, false).unwrap_err();
            assert!(err.contains(expected), "{text} → {err}");
            assert!(!err.contains("sk-secret-key-42"), "{err}");
        }
    }

    #[test]
    fn variable_names_are_shell_safe() {
        assert_eq!(env_var_name("work", 1), "QCC_WORK_1_KEY");
        assert_eq!(env_var_name("my team.ü", 12), "QCC_MY_TEAM___12_KEY");
    }
}
