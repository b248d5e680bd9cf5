//! How the mock misbehaves: `Fault`, and the `x-mock-fault` vocabulary that names one (also
//! `failover-proxy mock --fault`).

const DEFAULT_SLOW_DELAY_MS: u64 = 20;
const DEFAULT_CUT_AFTER: usize = 3;

/// How the upstream misbehaves; the default applies to every request without an
/// `x-mock-fault` header, on every route except `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Healthy.
    None,
    /// Answers this status with an Anthropic error body whose type fits the status.
    Status(u16),
    /// Answers 429, with `retry-after: <value>` when given.
    RateLimited { retry_after: Option<String> },
    /// Reads the request, then closes the connection without answering.
    Reset,
    /// Reads the request and never answers; ends (closing the connection) at shutdown, when
    /// the client goes away, or when `set_fault` sets a fault other than `Hang`.
    Hang,
    /// Sends the head at once, then a fixed body in 4 pieces or each SSE event, after
    /// `delay_ms` each. Counted as a success: the answer is well-formed, only slow.
    SlowBody { delay_ms: u64 },
    /// 200 `application/json` whose body is an error object.
    SoftError200,
    /// Streams: 200 SSE whose only event is an `overloaded_error`; otherwise `Status(529)`.
    SseErrorFirst,
    /// Streams: that many events (of all kinds), then the connection closes without the
    /// final chunk. Fixed bodies: the full Content-Length, half the body, then a close.
    SseCutAfter { events: usize },
    /// Streams: that many events (2: `message_start` and `content_block_start`), then a
    /// `ping` every 100 ms and nothing else, until the client goes away (a stalled relay).
    /// Fixed bodies: as `Hang`.
    PingStall { events: usize },
    /// Streams: the head and the opening at once (every event up to and including the
    /// first content event, the point where a proxy may commit), then one more event per
    /// permit given by [`MockUpstream::release`]. A fault change away from `Gated` opens the
    /// gate (the rest is sent at once); shutdown closes the connection. Fixed bodies are
    /// not gated.
    ///
    /// [`MockUpstream::release`]: crate::mock::control::MockUpstream::release
    Gated,
}

impl Fault {
    /// A fault by its `x-mock-fault` name (`none`, `500`, `429`, `reset`, `hang`, …), as
    /// `failover-proxy mock --fault` takes it.
    pub fn parse(value: &str) -> Option<Fault> {
        parse_fault(value, None)
    }
}

/// The `x-mock-fault` vocabulary; `None` for an unknown value.
pub(super) fn parse_fault(value: &str, delay_ms: Option<usize>) -> Option<Fault> {
    let value = value.trim().to_ascii_lowercase();
    let fault = match value.as_str() {
        "none" => Fault::None,
        "429" => Fault::RateLimited {
            retry_after: Some("1".to_string()),
        },
        "reset" => Fault::Reset,
        "hang" => Fault::Hang,
        "slow" => Fault::SlowBody {
            delay_ms: delay_ms.map_or(DEFAULT_SLOW_DELAY_MS, |ms| ms as u64),
        },
        "soft" => Fault::SoftError200,
        "sse-error" => Fault::SseErrorFirst,
        "cut" => Fault::SseCutAfter {
            events: DEFAULT_CUT_AFTER,
        },
        "gated" => Fault::Gated,
        "pings" => Fault::PingStall { events: 2 },
        other => {
            return parse_cut(other)
                .or_else(|| parse_pings(other))
                .or_else(|| parse_status(other));
        }
    };
    Some(fault)
}

fn parse_cut(value: &str) -> Option<Fault> {
    let events = value.strip_prefix("cut:")?.parse().ok()?;
    Some(Fault::SseCutAfter { events })
}

fn parse_pings(value: &str) -> Option<Fault> {
    let events = value.strip_prefix("pings:")?.parse().ok()?;
    Some(Fault::PingStall { events })
}

fn parse_status(value: &str) -> Option<Fault> {
    let status: u16 = value.parse().ok()?;
    (400..=599)
        .contains(&status)
        .then_some(Fault::Status(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_fault_knows_the_header_vocabulary() {
        assert_eq!(parse_fault("500", None), Some(Fault::Status(500)));
        assert_eq!(
            parse_fault("cut:7", None),
            Some(Fault::SseCutAfter { events: 7 })
        );
        assert_eq!(
            parse_fault("slow", Some(5)),
            Some(Fault::SlowBody { delay_ms: 5 })
        );
        assert_eq!(parse_fault("Hang", None), Some(Fault::Hang));
        assert_eq!(parse_fault("200", None), None);
        assert_eq!(parse_fault("explode", None), None);
    }
}
