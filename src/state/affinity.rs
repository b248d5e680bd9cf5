//! Session affinity: a conversation stays on the endpoint it last succeeded on, so that
//! upstream's prompt cache stays warm.
//!
//! The session key comes from the request (rule 9 of the contract); the table maps keys to
//! endpoint ids with a TTL, is bounded in size (the oldest bindings go first) and is swept
//! as it grows, so a flood of session ids cannot grow memory without limit. The table holds
//! a fixed-size hash of each key, never the client's text, so a client's 60 KB session id
//! costs it 16 bytes.

use crate::state::endpoint::EndpointId;
use crate::upstream::call::{BodyFields, ClientRequest};
use parking_lot::Mutex;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

/// At most this many sessions are remembered.
pub const MAX_SESSIONS: usize = 10_000;

/// A session key as the table holds it: the first 16 bytes of SHA-256 of the key's text.
/// Fixed-size whatever the client sends; 128 bits make a collision between two sessions
/// practically impossible. It shows (in `Debug` / `Display`) as its first 8 hex digits, so
/// a log line never carries the client's id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey([u8; 16]);

impl SessionKey {
    pub fn of(text: &str) -> SessionKey {
        let digest = Sha256::digest(text.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        SessionKey(key)
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0[..4].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({self})")
    }
}

/// The session key of a request (rule 9), hashed; `fields` are its body's.
pub fn session_key(request: &ClientRequest, fields: &BodyFields) -> Option<SessionKey> {
    session_text(request, fields).map(|text| SessionKey::of(&text))
}

/// The session key's text: header `x-conversation-id`, header
/// `x-claude-code-session-id`, body `conversation_id`, then the session inside body
/// `metadata.user_id` (either form Claude Code sends), else that `user_id` whole.
fn session_text(request: &ClientRequest, fields: &BodyFields) -> Option<String> {
    for header in ["x-conversation-id", "x-claude-code-session-id"] {
        if let Some(v) = request
            .header(header)
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            return Some(v.to_string());
        }
    }
    if let Some(id) = fields.conversation_id.as_ref().filter(|s| !s.is_empty()) {
        return Some(id.clone());
    }
    fields.user_id.as_deref().map(session_of_user_id)
}

/// `{"device_id":…,"account_uuid":…,"session_id":"<uuid>"}` serialised into the string
/// (Claude Code today), or `user_<hash>_account_<uuid>_session_<uuid>` (older versions).
fn session_of_user_id(user_id: &str) -> String {
    if user_id.trim_start().starts_with('{') {
        #[derive(Deserialize)]
        struct Inner {
            session_id: Option<String>,
        }
        if let Ok(Inner {
            session_id: Some(s),
        }) = serde_json::from_str(user_id)
            && !s.is_empty()
        {
            return s;
        }
    }
    if let Some((_, session)) = user_id.rsplit_once("_session_")
        && !session.is_empty()
    {
        return session.to_string();
    }
    user_id.to_string()
}

struct Binding {
    endpoint: EndpointId,
    last_used: Instant,
}

#[derive(Default)]
pub struct Affinity {
    table: Mutex<HashMap<SessionKey, Binding>>,
}

impl Affinity {
    /// The endpoint the session is bound to, if the binding is younger than `ttl`.
    pub fn lookup(&self, key: SessionKey, ttl: Duration, now: Instant) -> Option<EndpointId> {
        let table = self.table.lock();
        let b = table.get(&key)?;
        (now.duration_since(b.last_used) < ttl).then_some(b.endpoint)
    }

    /// Binds (or re-binds) the session after a success; keeps the table bounded.
    pub fn bind(&self, key: SessionKey, endpoint: EndpointId, ttl: Duration, now: Instant) {
        let mut table = self.table.lock();
        if table.len() >= MAX_SESSIONS && !table.contains_key(&key) {
            table.retain(|_, b| now.duration_since(b.last_used) < ttl);
            if table.len() >= MAX_SESSIONS {
                evict_oldest(&mut table, MAX_SESSIONS / 10);
            }
        }
        let binding = Binding {
            endpoint,
            last_used: now,
        };
        table.insert(key, binding);
    }

    pub fn forget(&self, key: SessionKey) {
        self.table.lock().remove(&key);
    }

    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops the `n` least recently used bindings (a sort, only when the table is full).
fn evict_oldest(table: &mut HashMap<SessionKey, Binding>, n: usize) {
    let mut ages: Vec<(Instant, SessionKey)> =
        table.iter().map(|(k, b)| (b.last_used, *k)).collect();
    ages.sort_unstable();
    for (_, key) in ages.into_iter().take(n) {
        table.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ureq::http::{HeaderName, HeaderValue, Method};

    fn request(headers: &[(&str, &str)], body: &str) -> ClientRequest {
        ClientRequest {
            method: Method::POST,
            target: "/v1/messages".into(),
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        HeaderName::from_bytes(n.as_bytes()).unwrap(),
                        HeaderValue::from_str(v).unwrap(),
                    )
                })
                .collect(),
            body: body.as_bytes().to_vec(),
            held: None,
        }
    }

    #[test]
    fn session_key_sources_in_order() {
        let json_user = r#"{"metadata":{"user_id":"{\"device_id\":\"ab12\",\"account_uuid\":\"\",\"session_id\":\"5f0c-uuid\"}"}}"#;
        let old_user = r#"{"metadata":{"user_id":"user_abc123_account_9d1e_session_77aa-bb"}}"#;
        let cases = [
            (
                request(
                    &[
                        ("x-conversation-id", "c1"),
                        ("x-claude-code-session-id", "s1"),
                    ],
                    json_user,
                ),
                Some("c1"),
            ),
            (
                request(&[("x-claude-code-session-id", "s1")], json_user),
                Some("s1"),
            ),
            (
                request(
                    &[],
                    r#"{"conversation_id":"conv-9","metadata":{"user_id":"u"}}"#,
                ),
                Some("conv-9"),
            ),
            (request(&[], json_user), Some("5f0c-uuid")),
            (request(&[], old_user), Some("77aa-bb")),
            (
                request(&[], r#"{"metadata":{"user_id":"plain-user"}}"#),
                Some("plain-user"),
            ),
            (request(&[], r#"{"model":"m"}"#), None),
            (request(&[], "not json"), None),
        ];
        for (req, expected) in cases {
            assert_eq!(
                session_text(&req, &req.fields()).as_deref(),
                expected,
                "{:?}",
                String::from_utf8_lossy(&req.body)
            );
        }
    }

    #[test]
    fn bindings_expire_and_the_table_stays_bounded() {
        let a = Affinity::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let s = SessionKey::of("s");
        a.bind(s, EndpointId(1), ttl, now);
        assert_eq!(
            a.lookup(s, ttl, now + Duration::from_secs(59)),
            Some(EndpointId(1))
        );
        assert_eq!(a.lookup(s, ttl, now + Duration::from_secs(60)), None);
        for i in 0..MAX_SESSIONS + 500 {
            a.bind(
                SessionKey::of(&format!("k{i}")),
                EndpointId(2),
                ttl,
                now + Duration::from_millis(i as u64),
            );
        }
        assert!(a.len() <= MAX_SESSIONS);
        // The newest binding survived; the oldest went.
        let late = now + Duration::from_secs(1);
        assert_eq!(
            a.lookup(
                SessionKey::of(&format!("k{}", MAX_SESSIONS + 499)),
                ttl,
                late
            ),
            Some(EndpointId(2))
        );
        assert_eq!(a.lookup(SessionKey::of("k0"), ttl, late), None);
    }

    /// Issue 12: session keys are capped. Two 60 KB keys that differ only in their last
    /// byte are two sessions; the same key finds its binding again; the key shows as 8 hex
    /// digits only.
    #[test]
    fn long_session_keys_are_hashed_to_distinct_fixed_size_keys() {
        let long = "s".repeat(60 * 1024);
        let (first, second) = (format!("{long}a"), format!("{long}b"));
        let header = |v: &str| request(&[("x-claude-code-session-id", v)], "{}");
        let key = |v: &str| session_key(&header(v), &BodyFields::default());
        let key_a = key(&first).unwrap();
        let key_b = key(&second).unwrap();
        assert_ne!(key_a, key_b);
        assert_eq!(key(&first), Some(key_a));
        assert_eq!(size_of::<SessionKey>(), 16);
        assert_eq!(key_a.to_string().len(), 8);
        assert_eq!(format!("{key_a:?}"), format!("SessionKey({key_a})"));
        let (a, now, ttl) = (Affinity::default(), Instant::now(), Duration::from_secs(60));
        a.bind(key_a, EndpointId(1), ttl, now);
        a.bind(key_b, EndpointId(2), ttl, now);
        assert_eq!(a.lookup(key_a, ttl, now), Some(EndpointId(1)));
        assert_eq!(a.lookup(key_b, ttl, now), Some(EndpointId(2)));
        assert_eq!(a.len(), 2);
    }
}
