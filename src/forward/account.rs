//! What an answer says beyond its content, kept on the endpoint that gave it: its
//! account's rate-limit report (which may take the endpoint out of rotation before it
//! answers 429) and the tokens it used.

use crate::config::validated::Config;
use crate::forward::answer::Prepared;
use crate::quota::Report;
use crate::server::http_out::Framing;
use crate::state::endpoint::Endpoint;
use crate::time::iso8601;
use crate::usage::Meter;
use std::time::SystemTime;
use ureq::http::HeaderMap;

/// Keeps the rate-limit report an answer's head carries (any status; none, and the last
/// report stands). A spent quota skips the endpoint until its reset: logged once, when the
/// skip begins.
pub(crate) fn note_quota(config: &Config, endpoint: &Endpoint, headers: &HeaderMap) {
    let Some(report) = Report::from_headers(headers) else {
        return;
    };
    let wall = SystemTime::now();
    let skip = report.skip_for(config.quota_reserve, config.rate_limit_cooldown, wall);
    let why = spent_what(&report, config.quota_reserve);
    if endpoint.note_quota(report, skip)
        && let Some(wait) = skip
    {
        log::info!(
            "endpoint {} ({}) has {why}: skipped until {} ({:.1}s), not a failure",
            endpoint.name(),
            endpoint.id(),
            iso8601(wall + wait),
            wait.as_secs_f64()
        );
    }
}

/// The log line's words for a spent report.
fn spent_what(report: &Report, reserve: u64) -> String {
    if report.is_rejected() {
        return "a rejected subscription (unified status)".into();
    }
    let requests = report.requests.remaining.filter(|&r| r <= reserve);
    match (
        requests,
        report.tokens_remaining().filter(|&r| r <= reserve),
    ) {
        (Some(r), _) => format!("{r} requests left (quota_reserve {reserve})"),
        (None, Some(t)) => format!("{t} tokens left (quota_reserve {reserve})"),
        (None, None) => "no quota left".into(),
    }
}

/// The meter for a successful answer: an event stream, or a JSON body.
pub(crate) fn meter_for(prepared: &Prepared) -> Meter {
    let json = prepared.headers.iter().any(|(name, value)| {
        name == ureq::http::header::CONTENT_TYPE
            && value
                .as_bytes()
                .trim_ascii_start()
                .starts_with(b"application/json")
    });
    let length = match prepared.framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    Meter::for_answer(prepared.sse, json, length)
}

/// Adds what the meter counted to the endpoint's book.
pub(crate) fn count_usage(endpoint: &Endpoint, meter: Meter) {
    if let Some(counted) = meter.finish() {
        let model = counted.model.as_deref().unwrap_or("unknown");
        endpoint.count_usage(model, &counted.usage);
    }
}
