//! Secrets (API keys, access tokens) in a type that cannot leak by accident.
//!
//! `Secret` has no `Display`, and its `Debug` prints the redacted form, so a key can only
//! reach a log line, an error or a stats answer through an explicit `expose()` call. The
//! only callers of `expose()` are the upstream request builder and the token comparison.

use std::fmt;

/// An API key or token. `Debug` shows `sk-ant…wxyz` (first 6, last 4 characters).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The raw value, for the one place that must send it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The key cut to its first 6 and last 4 characters, as the contract allows to show.
    /// Keys of 12 characters or fewer show only `…`, since 10 shown characters would be
    /// most of the key.
    pub fn redacted(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() <= 12 {
            return "…".to_string();
        }
        let head: String = chars[..6].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}…{tail}")
    }

    /// Compares in time independent of where the first difference is, so a client probing
    /// access tokens learns nothing from response times.
    pub fn matches(&self, candidate: &str) -> bool {
        let a = self.0.as_bytes();
        let b = candidate.as_bytes();
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_to_first_six_and_last_four() {
        let s = Secret::new("sk-ant-api03-abcdefghijklmnop-wxyz".into());
        assert_eq!(s.redacted(), "sk-ant…wxyz");
        assert_eq!(format!("{s:?}"), "Secret(sk-ant…wxyz)");
        assert_eq!(Secret::new("short".into()).redacted(), "…");
    }

    #[test]
    fn matches_only_the_exact_value() {
        let s = Secret::new("token-1".into());
        assert!(s.matches("token-1"));
        assert!(!s.matches("token-2"));
        assert!(!s.matches("token-1 "));
    }
}
