//! An endpoint's health record and the one function that changes it per attempt.
//!
//! `HealthStatus` is plain data; `Endpoint` keeps it behind a `parking_lot::Mutex` and calls
//! `record` once per attempt, inside one lock scope, so concurrent attempts can never lose
//! an update (qcc's `consecutive_failures += 1` from many tasks did). `record` returns a
//! `Verdict` instead of acting on it: quarantining takes another lock, and two locks are
//! never held at once.

use std::time::{Duration, Instant, SystemTime};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Unknown,
    Healthy,
    Degraded,
    Unhealthy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// What one attempt on an endpoint came to, as far as the endpoint's health is concerned.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The upstream answered (below 400, or a client disconnect that was not its fault).
    Success,
    /// 401: the key is bad; quarantine at once. (A 403 is not recorded at all: it is
    /// about the request, not the endpoint.)
    AuthFailure(String),
    /// 429: skip the endpoint until `until`; not a step towards quarantine.
    RateLimited { until: Instant, reason: String },
    /// 408, 5xx, soft error, connect error, timeout, broken stream.
    Failure(String),
}

/// What the caller must do after `record`, outside the health lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// The endpoint must enter the failure queue (the queue ignores repeats).
    Quarantine,
}

#[derive(Clone, Debug)]
pub struct HealthStatus {
    pub status: Status,
    pub consecutive_failures: u32,
    pub total_requests: u64,
    pub failed_requests: u64,
    /// Mean time to response headers over all recorded attempts, in milliseconds.
    pub avg_response_time: f64,
    pub last_error: Option<String>,
    pub last_check: Option<SystemTime>,
    /// A 429 keeps the endpoint out of rotation until then.
    pub cooldown_until: Option<Instant>,
    /// When the current quarantine or cooldown began: panic mode tries the oldest first.
    pub out_since: Option<Instant>,
}

impl Default for HealthStatus {
    fn default() -> Self {
        HealthStatus {
            status: Status::Unknown,
            consecutive_failures: 0,
            total_requests: 0,
            failed_requests: 0,
            avg_response_time: 0.0,
            last_error: None,
            last_check: None,
            cooldown_until: None,
            out_since: None,
        }
    }
}

impl HealthStatus {
    /// Applies one attempt. The whole update is this function, so callers hold the lock
    /// for exactly its duration.
    pub fn record(
        &mut self,
        outcome: &Outcome,
        elapsed: Duration,
        max_failures: u32,
        now: Instant,
        wall: SystemTime,
    ) -> Verdict {
        let n = self.total_requests as f64;
        self.avg_response_time =
            (self.avg_response_time * n + elapsed.as_secs_f64() * 1e3) / (n + 1.0);
        self.total_requests += 1;
        self.last_check = Some(wall);
        match outcome {
            Outcome::Success => {
                self.status = Status::Healthy;
                self.consecutive_failures = 0;
                self.out_since = None;
                Verdict::Keep
            }
            Outcome::RateLimited { until, reason } => {
                self.failed_requests += 1;
                self.last_error = Some(reason.clone());
                self.cooldown_until = Some(*until);
                self.out_since.get_or_insert(now);
                Verdict::Keep
            }
            Outcome::AuthFailure(reason) => {
                self.fail(reason, now);
                self.status = Status::Unhealthy;
                Verdict::Quarantine
            }
            Outcome::Failure(reason) => {
                self.fail(reason, now);
                if self.consecutive_failures >= max_failures {
                    self.status = Status::Unhealthy;
                    Verdict::Quarantine
                } else {
                    self.status = Status::Degraded;
                    Verdict::Keep
                }
            }
        }
    }

    fn fail(&mut self, reason: &str, now: Instant) {
        self.failed_requests += 1;
        self.consecutive_failures += 1;
        self.last_error = Some(reason.to_string());
        if self.consecutive_failures == 1 {
            self.out_since = Some(now);
        }
    }

    /// Back to service after a successful probe or an operator's queue clear.
    pub fn reset_to_healthy(&mut self) {
        self.status = Status::Healthy;
        self.consecutive_failures = 0;
        self.cooldown_until = None;
        self.out_since = None;
    }

    /// Percent of recorded attempts that succeeded; 100 before any attempt, as in qcc.
    pub fn success_rate(&self) -> f64 {
        if self.total_requests == 0 {
            return 100.0;
        }
        let ok = self.total_requests - self.failed_requests;
        ok as f64 * 100.0 / self.total_requests as f64
    }

    pub fn is_cooling(&self, now: Instant) -> bool {
        self.cooldown_until.is_some_and(|until| until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> Outcome {
        Outcome::Failure("500".into())
    }

    #[test]
    fn quarantines_after_max_consecutive_failures() {
        let mut h = HealthStatus::default();
        let now = Instant::now();
        let ms = Duration::from_millis(10);
        assert_eq!(
            h.record(&failure(), ms, 3, now, SystemTime::now()),
            Verdict::Keep
        );
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(
            h.record(&Outcome::Success, ms, 3, now, SystemTime::now()),
            Verdict::Keep
        );
        assert_eq!(h.consecutive_failures, 0);
        assert_eq!(
            h.record(&failure(), ms, 3, now, SystemTime::now()),
            Verdict::Keep
        );
        assert_eq!(
            h.record(&failure(), ms, 3, now, SystemTime::now()),
            Verdict::Keep
        );
        assert_eq!(
            h.record(&failure(), ms, 3, now, SystemTime::now()),
            Verdict::Quarantine
        );
        assert_eq!(h.status, Status::Unhealthy);
        assert_eq!((h.total_requests, h.failed_requests), (5, 4));
        assert_eq!(h.success_rate(), 20.0);
        assert_eq!(h.avg_response_time, 10.0);
    }

    #[test]
    fn auth_failure_quarantines_at_once_and_rate_limit_never_does() {
        let now = Instant::now();
        let mut h = HealthStatus::default();
        let until = now + Duration::from_secs(2);
        let limited = Outcome::RateLimited {
            until,
            reason: "429".into(),
        };
        for _ in 0..10 {
            assert_eq!(
                h.record(&limited, Duration::ZERO, 3, now, SystemTime::now()),
                Verdict::Keep
            );
        }
        assert_eq!(h.consecutive_failures, 0);
        assert!(h.is_cooling(now));
        assert!(!h.is_cooling(until));
        let auth = Outcome::AuthFailure("401".into());
        assert_eq!(
            h.record(&auth, Duration::ZERO, 3, now, SystemTime::now()),
            Verdict::Quarantine
        );
        h.reset_to_healthy();
        assert_eq!(
            (h.status, h.cooldown_until, h.out_since),
            (Status::Healthy, None, None)
        );
    }
}
