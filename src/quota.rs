//! What an upstream's rate-limit headers say is left, and how long an endpoint should get
//! no traffic because of it.
//!
//! Every Anthropic answer carries its account's remaining quota in its head
//! (`anthropic-ratelimit-*`), so reading it costs nothing and lets traffic move before the
//! 429 rather than after. A relay may send anything there: numbers that are not plain
//! non-negative integers and dates that do not parse are ignored, and no wait is believed
//! beyond `MAX_WAIT`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use ureq::http::HeaderMap;

/// No quota or cooldown wait is believed beyond a day: a bogus header must not retire an
/// endpoint. (A weekly limit that really is days away costs one request a day.)
pub const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// Every rate-limit header starts with this.
const PREFIX: &str = "anthropic-ratelimit-";

/// One limit's last report: `anthropic-ratelimit-{family}-limit`, `-remaining`, `-reset`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limit {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub reset: Option<SystemTime>,
}

/// Everything one answer's head said about its account's limits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub requests: Limit,
    pub tokens: Limit,
    pub input_tokens: Limit,
    pub output_tokens: Limit,
    /// `allowed`, `allowed_warning` or `rejected` (subscription accounts); printable ASCII
    /// only, at most 32 characters, since it is shown as it came.
    pub unified_status: Option<String>,
    pub unified_reset: Option<SystemTime>,
    /// The 5-hour and 7-day windows' utilization, as the upstream gives it (a fraction).
    pub utilization_5h: Option<f64>,
    pub utilization_7d: Option<f64>,
}

impl Report {
    /// The report in `headers`, or None when the answer carries no rate-limit header at
    /// all (then the previous report stands).
    pub fn from_headers(headers: &HeaderMap) -> Option<Report> {
        let mut any = false;
        let mut report = Report::default();
        for (name, value) in headers {
            let Some(key) = name.as_str().strip_prefix(PREFIX) else {
                continue;
            };
            any = true;
            if let Ok(text) = value.to_str() {
                report.set(key, text.trim());
            }
        }
        any.then_some(report)
    }

    fn set(&mut self, key: &str, value: &str) {
        match key {
            "unified-status" => self.unified_status = Some(printable(value)),
            "unified-reset" => self.unified_reset = unix_time(value),
            "unified-5h-utilization" => self.utilization_5h = fraction(value),
            "unified-7d-utilization" => self.utilization_7d = fraction(value),
            _ => {
                let Some((family, field)) = key.rsplit_once('-') else {
                    return;
                };
                let limit = match family {
                    "requests" => &mut self.requests,
                    "tokens" => &mut self.tokens,
                    "input-tokens" => &mut self.input_tokens,
                    "output-tokens" => &mut self.output_tokens,
                    _ => return,
                };
                match field {
                    "limit" => limit.limit = count(value),
                    "remaining" => limit.remaining = count(value),
                    "reset" => limit.reset = crate::time::parse_rfc3339(value),
                    _ => {}
                }
            }
        }
    }

    /// The fewest tokens left under any token limit reported.
    pub fn tokens_remaining(&self) -> Option<u64> {
        self.token_limits().filter_map(|l| l.remaining).min()
    }

    fn token_limits(&self) -> impl Iterator<Item = &Limit> {
        [&self.tokens, &self.input_tokens, &self.output_tokens].into_iter()
    }

    pub fn is_rejected(&self) -> bool {
        self.unified_status.as_deref() == Some("rejected")
    }

    /// The reset to show beside the remaining counts: that of a limit at or below
    /// `reserve` (the latest, if several are), else the earliest one reported.
    pub fn reset(&self, reserve: u64) -> Option<SystemTime> {
        let limits = || std::iter::once(&self.requests).chain(self.token_limits());
        let exhausted = limits()
            .filter(|l| l.remaining.is_some_and(|r| r <= reserve))
            .filter_map(|l| l.reset)
            .max();
        exhausted.or_else(|| limits().filter_map(|l| l.reset).min())
    }

    /// How long from `wall` the endpoint should be skipped, if this report says it is
    /// spent: a request or token limit at or below `reserve` until its reset, or a
    /// `rejected` unified status until the unified reset; the latest of those that apply.
    /// A spent limit without a usable reset waits `default` (the 429 default); one whose
    /// reset has passed is spent no longer. Never more than `MAX_WAIT`.
    pub fn skip_for(&self, reserve: u64, default: Duration, wall: SystemTime) -> Option<Duration> {
        let wait_until = |reset: Option<SystemTime>| match reset {
            None => Some(default),
            Some(t) => t.duration_since(wall).ok().filter(|d| !d.is_zero()),
        };
        let spent = std::iter::once(&self.requests)
            .chain(self.token_limits())
            .filter(|l| l.remaining.is_some_and(|r| r <= reserve))
            .filter_map(|l| wait_until(l.reset));
        let rejected = self
            .is_rejected()
            .then(|| wait_until(self.unified_reset))
            .flatten();
        spent.chain(rejected).max().map(|d| d.min(MAX_WAIT))
    }

    /// After a 429 of a subscription account: the wait until the unified reset when the
    /// status is `rejected` (a `retry-after` of seconds would only earn another 429).
    pub fn rejected_for(&self, wall: SystemTime) -> Option<Duration> {
        let reset = self.unified_reset.filter(|_| self.is_rejected())?;
        reset.duration_since(wall).ok().map(|d| d.min(MAX_WAIT))
    }
}

/// A plain non-negative integer; anything else (a sign, a fraction, junk) is not believed.
fn count(value: &str) -> Option<u64> {
    value
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.parse().ok())
        .flatten()
}

/// Unix seconds, whole or with a fraction.
fn unix_time(value: &str) -> Option<SystemTime> {
    let seconds = decimal(value)?;
    UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(seconds).ok()?)
}

fn fraction(value: &str) -> Option<f64> {
    decimal(value).filter(|f| f.is_finite())
}

/// A non-negative decimal number as upstreams write waits and times: ASCII digits, at most
/// one dot; no sign, exponent, `inf` or `NaN`. So many digits may parse to infinity (never
/// to NaN): the caller bounds it.
pub fn decimal(value: &str) -> Option<f64> {
    let (whole, part) = value.split_once('.').unwrap_or((value, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(part) {
        return None;
    }
    value.parse().ok()
}

fn printable(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ureq::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_bytes(value.as_bytes()).unwrap());
        }
        map
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn reads_every_family_and_the_unified_fields() {
        let report = Report::from_headers(&headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2026-12-02T20:00:00Z"),
            ("anthropic-ratelimit-tokens-remaining", "9000"),
            ("anthropic-ratelimit-input-tokens-remaining", "7000"),
            ("anthropic-ratelimit-output-tokens-remaining", "8000"),
            ("anthropic-ratelimit-unified-status", "allowed_warning"),
            ("anthropic-ratelimit-unified-reset", "1796241600"),
            ("anthropic-ratelimit-unified-5h-utilization", "0.42"),
            ("anthropic-ratelimit-unified-7d-utilization", "0.9"),
            ("content-type", "application/json"),
        ]))
        .unwrap();
        assert_eq!(report.requests.limit, Some(50));
        assert_eq!(report.requests.remaining, Some(49));
        let reset = crate::time::parse_rfc3339("2026-12-02T20:00:00Z");
        assert_eq!(report.requests.reset, reset);
        assert_eq!(report.tokens_remaining(), Some(7000));
        assert_eq!(report.unified_status.as_deref(), Some("allowed_warning"));
        assert_eq!(report.unified_reset, Some(at(1_796_241_600)));
        assert_eq!(
            (report.utilization_5h, report.utilization_7d),
            (Some(0.42), Some(0.9))
        );
        assert!(!report.is_rejected());
        assert_eq!(
            Report::from_headers(&headers(&[("retry-after", "2")])),
            None
        );
    }

    #[test]
    fn values_a_relay_garbles_are_ignored() {
        let report = Report::from_headers(&headers(&[
            ("anthropic-ratelimit-requests-remaining", "-1"),
            ("anthropic-ratelimit-tokens-remaining", "1e9"),
            ("anthropic-ratelimit-requests-reset", "tomorrow"),
            ("anthropic-ratelimit-unified-reset", "NaN"),
            ("anthropic-ratelimit-unified-5h-utilization", "inf"),
            (
                "anthropic-ratelimit-unified-status",
                "rej\tected and more text than fits",
            ),
            ("anthropic-ratelimit-bogus-remaining", "0"),
            ("anthropic-ratelimit-requests-remaining-extra", "0"),
        ]))
        .unwrap();
        assert_eq!(report.requests, Limit::default());
        assert_eq!(report.tokens_remaining(), None);
        assert_eq!((report.unified_reset, report.utilization_5h), (None, None));
        assert_eq!(
            report.unified_status.as_deref(),
            Some("rejectedandmoretextthanfits")
        );
        assert_eq!(report.skip_for(0, Duration::from_secs(30), at(0)), None);
        let huge = headers(&[(
            "anthropic-ratelimit-unified-reset",
            "99999999999999999999999",
        )]);
        assert_eq!(Report::from_headers(&huge).unwrap().unified_reset, None);
        let mut latin1 = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"\xff0").unwrap();
        latin1.append("anthropic-ratelimit-requests-remaining", value);
        assert_eq!(
            Report::from_headers(&latin1).unwrap().requests.remaining,
            None
        );
    }

    #[test]
    fn a_spent_limit_skips_until_its_reset_and_the_latest_reset_wins() {
        let now = at(1_000_000);
        let default = Duration::from_secs(30);
        let spent = |remaining: u64, reset: u64| Limit {
            limit: None,
            remaining: Some(remaining),
            reset: Some(at(reset)),
        };
        let mut report = Report {
            requests: spent(0, 1_000_010),
            ..Report::default()
        };
        assert_eq!(
            report.skip_for(0, default, now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(report.reset(0), Some(at(1_000_010)));
        report.tokens = spent(500, 1_000_040);
        assert_eq!(
            report.skip_for(0, default, now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            report.skip_for(500, default, now),
            Some(Duration::from_secs(40))
        );
        assert_eq!(report.reset(500), Some(at(1_000_040)));
        // Not spent: the earliest reset is shown.
        report.requests.remaining = Some(5);
        assert_eq!(report.skip_for(0, default, now), None);
        assert_eq!(report.reset(0), Some(at(1_000_010)));
        // A reset already past: spent no longer. No reset at all: the default wait.
        report.requests = spent(0, 999_999);
        assert_eq!(report.skip_for(0, default, now), None);
        report.requests.reset = None;
        assert_eq!(report.skip_for(0, default, now), Some(default));
        // A reset years away is believed for a day at most.
        report.requests = spent(0, 1_000_000 + 10 * 365 * 86_400);
        assert_eq!(report.skip_for(0, default, now), Some(MAX_WAIT));
    }

    #[test]
    fn a_rejected_unified_status_skips_until_the_unified_reset() {
        let now = at(1_000_000);
        let mut report = Report {
            unified_status: Some("rejected".into()),
            unified_reset: Some(at(1_003_600)),
            ..Report::default()
        };
        let hour = Duration::from_secs(3600);
        assert_eq!(report.skip_for(0, Duration::from_secs(30), now), Some(hour));
        assert_eq!(report.rejected_for(now), Some(hour));
        report.unified_status = Some("allowed_warning".into());
        assert_eq!(report.skip_for(0, Duration::from_secs(30), now), None);
        assert_eq!(report.rejected_for(now), None);
    }
}
