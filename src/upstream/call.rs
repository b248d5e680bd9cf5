//! Talking to upstreams: the request as the upstream sees it (rewritten headers, the
//! endpoint's key), one attempt, and the classification of what came back. The agents
//! that make the connections are `agent`'s.

use crate::body_budget::Share;
use crate::json_fields::{top_level, value};
use crate::quota::Report;
use crate::state::endpoint::Endpoint;
use std::time::{Duration, Instant, SystemTime};
use ureq::http::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that belong to one connection, never forwarded in either direction (RFC 9110
/// 7.6.1), plus `proxy-connection`, which old clients still send.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A client request after it was read whole; the body is held once and lent to every
/// attempt.
#[derive(Debug)]
pub struct ClientRequest {
    pub method: http::Method,
    /// Path and query exactly as the client sent them.
    pub target: String,
    /// Lower-case names, in the client's order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
    /// The body's part of `max_body_memory`, given back with the body.
    pub held: Option<Share>,
}

/// What the proxy reads in a JSON request body: scanning a 100 KB body is most of the
/// work of forwarding it, so the three fields are found in one pass that skips the rest
/// (`json_fields`), and only their values are parsed.
#[derive(Debug, Default, PartialEq)]
pub struct BodyFields {
    /// `"stream": true`: the answer will be an event stream.
    pub stream: bool,
    /// `conversation_id` and `metadata.user_id`, for session affinity.
    pub conversation_id: Option<String>,
    pub user_id: Option<String>,
}

#[derive(serde::Deserialize)]
struct Metadata {
    user_id: Option<String>,
}

impl ClientRequest {
    /// The body's fields (none when it is not a JSON object). A field of the wrong type
    /// (or given twice) spoils only its own reading.
    pub fn fields(&self) -> BodyFields {
        let [stream, conversation_id, metadata] =
            top_level(&self.body, ["stream", "conversation_id", "metadata"]);
        BodyFields {
            stream: value::<bool>(stream).unwrap_or(false),
            conversation_id: value(conversation_id),
            user_id: value::<Metadata>(metadata).and_then(|m| m.user_id),
        }
    }

    /// Frees the body and gives back its part of `max_body_memory`: once an answer is
    /// committed no attempt will send it again, and a stream may last minutes.
    pub fn release_body(&mut self) {
        self.body = Vec::new();
        self.held = None;
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .and_then(|(_, v)| v.to_str().ok())
    }
}

/// The headers the upstream gets: the client's, less hop-by-hop ones, `host` (the
/// upstream's own goes in), the framing (ureq sets it from the body), `expect` (answered
/// locally) and the client's credentials (always, whatever `auth` says); plus the
/// endpoint's key in the header(s) its `auth` names and a default `anthropic-version`.
pub fn upstream_headers(request: &ClientRequest, endpoint: &Endpoint) -> HeaderMap {
    let dropped_by_connection = connection_tokens(&request.headers);
    let mut headers = HeaderMap::with_capacity(request.headers.len() + 3);
    for (name, value) in &request.headers {
        let n = name.as_str();
        let skip = HOP_BY_HOP.contains(&n)
            || matches!(
                n,
                "host" | "content-length" | "expect" | "x-api-key" | "authorization"
            )
            || dropped_by_connection.iter().any(|t| t == n);
        if !skip {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in key_headers(endpoint) {
        headers.insert(name, value.clone());
    }
    if let Some(host) = host_header(endpoint) {
        headers.insert(http::header::HOST, host.clone());
    }
    if !headers.contains_key("anthropic-version") {
        headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    }
    headers
}

/// The header(s) that carry the endpoint's key, as its `auth` says: `x-api-key: <key>`,
/// `authorization: Bearer <key>`, or both. Marked sensitive, so no debug output shows them.
/// Forwarded requests and probes both take them from here; built once per endpoint.
pub fn key_headers(endpoint: &Endpoint) -> &[(HeaderName, HeaderValue)] {
    endpoint
        .key_headers
        .get_or_init(|| build_key_headers(endpoint))
}

fn build_key_headers(endpoint: &Endpoint) -> Vec<(HeaderName, HeaderValue)> {
    let auth = endpoint.config.auth;
    let key = endpoint.config.api_key.expose();
    let mut wanted = Vec::with_capacity(2);
    if auth.sends_x_api_key() {
        wanted.push((HeaderName::from_static("x-api-key"), key.to_string()));
    }
    if auth.sends_bearer() {
        wanted.push((http::header::AUTHORIZATION, format!("Bearer {key}")));
    }
    wanted
        .into_iter()
        .filter_map(|(name, text)| {
            let mut value = HeaderValue::from_str(&text).ok()?;
            value.set_sensitive(true);
            Some((name, value))
        })
        .collect()
}

/// The upstream's `host` header: its base URL's host, with the port when it is not the
/// scheme's default (RFC 9110 7.2), as ureq writes it when a request has none. Built once
/// per endpoint: ureq formatted it anew for every request.
fn host_header(endpoint: &Endpoint) -> Option<&HeaderValue> {
    endpoint
        .host_header
        .get_or_init(|| host_of(&endpoint.config.base_url))
        .as_ref()
}

fn host_of(base_url: &str) -> Option<HeaderValue> {
    let uri: http::Uri = base_url.parse().ok()?;
    let host = uri.host()?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match uri.port_u16().filter(|&port| port != default) {
        Some(port) => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        None => HeaderValue::from_str(host).ok(),
    }
}

/// Header names listed in `Connection`, which are hop-by-hop for this message.
pub fn connection_tokens(headers: &[(HeaderName, HeaderValue)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n == http::header::CONNECTION)
        .filter_map(|(_, v)| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Sends one attempt and waits for the response headers (bounded by the endpoint's
/// `timeout`; the body is read later by the caller, each read bounded by `idle_timeout`).
pub fn send(
    endpoint: &Endpoint,
    request: &ClientRequest,
) -> Result<http::Response<ureq::Body>, ureq::Error> {
    let base = &endpoint.config.base_url;
    let mut uri = String::with_capacity(base.len() + request.target.len());
    uri.push_str(base);
    uri.push_str(&request.target);
    let mut builder = http::Request::builder()
        .method(request.method.clone())
        .uri(uri);
    if let Some(h) = builder.headers_mut() {
        *h = upstream_headers(request, endpoint);
    }
    // No body at all (not even `content-length: 0`) where the method has none.
    if request.body.is_empty() && !matches!(request.method.as_str(), "POST" | "PUT" | "PATCH") {
        run(endpoint, builder, ())
    } else {
        run(endpoint, builder, request.body.as_slice())
    }
}

/// One call through the endpoint's agent, which carries its `timeout` (agent.rs): a
/// request of its own configuration would cost every new HTTPS connection a new TLS setup.
fn run<B: ureq::AsSendBody>(
    endpoint: &Endpoint,
    builder: http::request::Builder,
    body: B,
) -> Result<http::Response<ureq::Body>, ureq::Error> {
    let request = builder.body(body).map_err(ureq::Error::from)?;
    endpoint.agent.run(request)
}

/// How an upstream status counts (contract rule 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Success,
    /// Any 4xx other than 401, 403, 408, 429: the client's mistake, passed back untouched.
    ClientError,
    /// 401: the endpoint's key is bad.
    Auth,
    /// 403: this endpoint may not serve this request (a model or beta its key may not
    /// use); another endpoint may, and the key is fine for everything else.
    Forbidden,
    /// 429.
    RateLimited,
    /// 408 or 5xx.
    Failure,
    /// A status that is no final answer: 1xx (a 101 to a request that asked for no
    /// upgrade; the proxy never passes an upgrade on) or 600 and above. The upstream is
    /// broken, like one that closed before its headers.
    Invalid,
}

pub fn classify(status: u16) -> Class {
    match status {
        401 => Class::Auth,
        403 => Class::Forbidden,
        429 => Class::RateLimited,
        408 | 500..=599 => Class::Failure,
        400..=499 => Class::ClientError,
        200..=399 => Class::Success,
        _ => Class::Invalid,
    }
}

/// No cooldown is believed beyond a day: a bogus header must not retire an endpoint (the
/// same bound as a quota's skip).
pub const MAX_COOLDOWN: Duration = crate::quota::MAX_WAIT;

/// When a rate-limited endpoint may be used again: `retry-after` (seconds or HTTP date),
/// else the earliest `anthropic-ratelimit-*-reset`, else the configured default; and when
/// the unified status is `rejected`, not before the unified reset (a subscription's limit
/// outlasts any `retry-after`). Never more than `MAX_COOLDOWN` from `now`. A header that
/// is not a number or a real date is ignored. The arithmetic is checked: whatever an
/// upstream writes, this cannot panic.
pub fn cooldown_until(headers: &HeaderMap, default: Duration, now: Instant) -> Instant {
    let wall = SystemTime::now();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let from_retry_after = text("retry-after").and_then(|v| retry_after(v, wall));
    let from_reset = || {
        headers
            .iter()
            .filter(|(n, _)| {
                let n = n.as_str();
                n.starts_with("anthropic-ratelimit-") && n.ends_with("-reset")
            })
            .filter_map(|(_, v)| crate::time::parse_rfc3339(v.to_str().ok()?))
            .min()
            .map(|t| wait_until(t, wall))
    };
    let rejected = Report::from_headers(headers).and_then(|r| r.rejected_for(wall));
    let wait = from_retry_after
        .or_else(from_reset)
        .unwrap_or(default)
        .max(rejected.unwrap_or_default())
        .min(MAX_COOLDOWN);
    now.checked_add(wait).unwrap_or(now)
}

/// `retry-after` as a wait: delay-seconds, or an HTTP date (a date past is no wait).
fn retry_after(value: &str, wall: SystemTime) -> Option<Duration> {
    let value = value.trim();
    delay_seconds(value)
        .or_else(|| crate::time::parse_http_date(value).map(|t| wait_until(t, wall)))
}

/// RFC 9110's delay-seconds (ASCII digits), with a fraction allowed since some relays send
/// one. A number too large for a `Duration` is a very long wait: `MAX_COOLDOWN`. A sign,
/// an exponent, `inf` or `NaN` is not delay-seconds.
fn delay_seconds(value: &str) -> Option<Duration> {
    let seconds = crate::quota::decimal(value)?;
    Some(Duration::try_from_secs_f64(seconds).map_or(MAX_COOLDOWN, |d| d.min(MAX_COOLDOWN)))
}

/// The wait from `wall` until `t`: none if `t` is past.
fn wait_until(t: SystemTime, wall: SystemTime) -> Duration {
    t.duration_since(wall).unwrap_or(Duration::ZERO)
}

/// A plain-words reason for a failed call, for logs, `last_error` and `check --probe`
/// (never holds a key: ureq's errors name hosts and phases, not headers). It starts with
/// where the call failed: `connect:`, `TLS:`, `outbound proxy:`, or what broke after.
pub fn describe_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(phase) => describe_timeout(*phase),
        ureq::Error::HostNotFound => "connect: DNS found no such host".to_string(),
        ureq::Error::ConnectionFailed => "connect: connection failed".to_string(),
        ureq::Error::Io(io) => describe_io(io),
        ureq::Error::Rustls(tls) => describe_tls(&tls.to_string()),
        ureq::Error::Tls(text) => format!("TLS: {text}"),
        ureq::Error::ConnectProxyFailed(text) => format!("outbound proxy: CONNECT failed: {text}"),
        ureq::Error::Protocol(p) => format!("the upstream's answer is not valid HTTP/1.1: {p}"),
        other => other.to_string(),
    }
}

fn describe_timeout(phase: ureq::Timeout) -> String {
    match phase {
        ureq::Timeout::Resolve => "connect: DNS lookup timed out".to_string(),
        ureq::Timeout::Connect => {
            "connect: timed out (connect_timeout), TLS handshake and proxy included".to_string()
        }
        ureq::Timeout::RecvResponse => {
            "timed out waiting for the response headers (the endpoint's timeout)".to_string()
        }
        ureq::Timeout::RecvBody => "the body stalled for longer than idle_timeout".to_string(),
        other => format!("timed out ({other})"),
    }
}

fn describe_io(io: &std::io::Error) -> String {
    use std::io::ErrorKind as Kind;
    if let Some(tls) = rustls_error_in(io) {
        return describe_error(&tls);
    }
    // std's words for a failed getaddrinfo; its error kind is not nameable on stable.
    if io
        .to_string()
        .starts_with("failed to lookup address information")
    {
        return format!("connect: DNS lookup failed ({io})");
    }
    match io.kind() {
        Kind::ConnectionRefused => {
            "connect: connection refused (nothing listens there)".to_string()
        }
        // The request's own deadline (idle.rs) says which one it was.
        Kind::TimedOut if io.get_ref().is_some() => io.to_string(),
        Kind::TimedOut => "connect: timed out".to_string(),
        Kind::HostUnreachable | Kind::NetworkUnreachable => format!("connect: {io}"),
        Kind::ConnectionReset
        | Kind::ConnectionAborted
        | Kind::BrokenPipe
        | Kind::UnexpectedEof => {
            format!("the upstream closed the connection ({io})")
        }
        _ => format!("i/o error: {io}"),
    }
}

/// The TLS error inside an I/O error (ureq reports a failed handshake that way), found by
/// its type. `ureq::Error::Rustls` names that type, so no rustls dependency is needed.
fn rustls_error_in(io: &std::io::Error) -> Option<ureq::Error> {
    fn downcast<T: std::error::Error + Clone + 'static>(
        wrap: fn(T) -> ureq::Error,
        inner: &(dyn std::error::Error + Send + Sync + 'static),
    ) -> Option<ureq::Error> {
        inner.downcast_ref::<T>().cloned().map(wrap)
    }
    downcast(ureq::Error::Rustls, io.get_ref()?)
}

/// rustls's own words, prefixed by what they mean for a user. rustls is not a direct
/// dependency, so its error is read by its message (stable within rustls 0.23).
fn describe_tls(text: &str) -> String {
    const MEANINGS: [(&str, &str); 4] = [
        (
            "UnknownIssuer",
            "the upstream's certificate is signed by an unknown CA; \
             for a private CA, put its PEM in the endpoint's ca_file",
        ),
        (
            "invalid peer certificate",
            "the upstream's certificate was refused",
        ),
        (
            "corrupt message",
            "the upstream did not answer in TLS (is it http://?)",
        ),
        (
            "received fatal alert",
            "the upstream refused the TLS handshake",
        ),
    ];
    match MEANINGS.iter().find(|(needle, _)| text.contains(needle)) {
        Some((_, meaning)) => format!("TLS: {meaning} ({text})"),
        None => format!("TLS: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_has_the_port_only_when_it_is_not_the_schemes_default() {
        let cases = [
            ("https://api.anthropic.com", Some("api.anthropic.com")),
            ("https://relay.example:443/api", Some("relay.example")),
            ("https://relay.example:8443/api", Some("relay.example:8443")),
            ("http://127.0.0.1:80", Some("127.0.0.1")),
            ("http://127.0.0.1:443", Some("127.0.0.1:443")),
            ("http://[::1]:9000/v", Some("[::1]:9000")),
            ("not a url", None),
        ];
        for (base_url, expected) in cases {
            let host = host_of(base_url);
            assert_eq!(
                host.as_ref().map(|h| h.to_str().unwrap()),
                expected,
                "{base_url}"
            );
        }
    }

    #[test]
    fn errors_are_described_by_where_they_happened() {
        use std::io::{Error as Io, ErrorKind};
        let cases = [
            (
                ureq::Error::Io(ErrorKind::ConnectionRefused.into()),
                "connect: connection refused",
            ),
            (ureq::Error::HostNotFound, "connect: DNS"),
            (
                ureq::Error::Timeout(ureq::Timeout::Connect),
                "connect: timed out",
            ),
            (
                ureq::Error::Timeout(ureq::Timeout::RecvResponse),
                "timed out waiting",
            ),
            (
                ureq::Error::Timeout(ureq::Timeout::RecvBody),
                "idle_timeout",
            ),
            (
                ureq::Error::Io(ErrorKind::UnexpectedEof.into()),
                "closed the connection",
            ),
            (
                ureq::Error::ConnectProxyFailed("403".into()),
                "outbound proxy: ",
            ),
            (
                ureq::Error::Io(Io::other("failed to lookup address information: x")),
                "connect: DNS",
            ),
        ];
        for (error, words) in cases {
            let text = describe_error(&error);
            assert!(text.contains(words), "{error:?}: {text}");
        }
        assert!(describe_tls("invalid peer certificate: UnknownIssuer").contains("ca_file"));
        assert!(
            describe_tls("received corrupt message of type InvalidContentType").contains("http://")
        );
    }

    #[test]
    fn body_fields_come_from_one_pass_and_a_bad_field_spoils_only_its_own_reading() {
        let fields = |body: &str| {
            ClientRequest {
                method: http::Method::POST,
                target: "/v1/messages".into(),
                headers: Vec::new(),
                body: body.as_bytes().to_vec(),
                held: None,
            }
            .fields()
        };
        let all = r#"{"messages":[{"role":"user","content":"\"stream\": false"}],
            "stream":true,"conversation_id":"c","metadata":{"user_id":"u","x":[1]}}"#;
        let expected = |stream: bool, conversation: Option<&str>, user: Option<&str>| BodyFields {
            stream,
            conversation_id: conversation.map(str::to_string),
            user_id: user.map(str::to_string),
        };
        assert_eq!(fields(all), expected(true, Some("c"), Some("u")));
        let bad_stream = r#"{"stream":"yes","metadata":{"user_id":"u"}}"#;
        assert_eq!(fields(bad_stream), expected(false, None, Some("u")));
        let bad_session = r#"{"stream":true,"conversation_id":7}"#;
        assert_eq!(fields(bad_session), expected(true, None, None));
        let bad_conversation = r#"{"conversation_id":7,"metadata":{"user_id":"u"}}"#;
        assert_eq!(fields(bad_conversation), expected(false, None, Some("u")));
        let twice = r#"{"stream":true,"stream":true,"conversation_id":null}"#;
        assert_eq!(fields(twice), expected(false, None, None));
        assert_eq!(fields(r#"{"stream":false}"#), expected(false, None, None));
        assert_eq!(fields(r#"[true]"#), BodyFields::default());
        assert_eq!(fields("not json"), BodyFields::default());
    }

    #[test]
    fn status_classes_follow_rule_3() {
        assert_eq!(classify(200), Class::Success);
        assert_eq!(classify(304), Class::Success);
        assert_eq!(classify(400), Class::ClientError);
        assert_eq!(classify(404), Class::ClientError);
        assert_eq!(classify(413), Class::ClientError);
        assert_eq!(classify(401), Class::Auth);
        assert_eq!(classify(403), Class::Forbidden);
        assert_eq!(classify(408), Class::Failure);
        assert_eq!(classify(429), Class::RateLimited);
        assert_eq!(classify(500), Class::Failure);
        assert_eq!(classify(529), Class::Failure);
        assert_eq!(classify(101), Class::Invalid);
        assert_eq!(classify(199), Class::Invalid);
        assert_eq!(classify(600), Class::Invalid);
        assert_eq!(classify(999), Class::Invalid);
    }

    /// Whatever an upstream writes in `retry-after` or a reset header, the cooldown is the
    /// header's (clamped to `MAX_COOLDOWN`), or the default when the header is not a number
    /// or a real date; never a panic.
    #[test]
    fn hostile_cooldown_headers_give_a_bounded_cooldown_and_never_panic() {
        let now = Instant::now();
        let default = Duration::from_secs(30);
        let huge_digits = "9".repeat(10_000);
        let retry_afters = [
            ("Wed, 21 Oct 400000000000 07:28:00 GMT", default),
            ("Wed, 21 Oct 9999999 07:28:00 GMT", default),
            ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_COOLDOWN),
            ("Sat, 01 Jan 0000 00:00:00 GMT", Duration::ZERO),
            ("Sun, 30 Feb 2031 00:00:00 GMT", default),
            ("Wed, 21 Oct 2031 25:00:00 GMT", default),
            ("99999999999999999999", MAX_COOLDOWN),
            ("18446744073709551616", MAX_COOLDOWN),
            (huge_digits.as_str(), MAX_COOLDOWN),
            ("86401", MAX_COOLDOWN),
            ("0", Duration::ZERO),
            (" 7 ", Duration::from_secs(7)),
            ("1.5", Duration::from_millis(1500)),
            ("-5", default),
            ("+5", default),
            ("1e3", default),
            ("NaN", default),
            ("inf", default),
            ("infinity", default),
            ("0x10", default),
            ("5.", default),
            (".5", default),
            ("1.2.3", default),
            ("", default),
        ];
        for (value, expected) in retry_afters {
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from_str(value).unwrap());
            let wait = cooldown_until(&h, default, now) - now;
            assert_eq!(wait, expected, "retry-after: {value:?}");
        }
        let resets = [
            ("9999-12-31T23:59:59Z", MAX_COOLDOWN),
            ("0000-01-01T00:00:00Z", Duration::ZERO),
            ("4000000000-01-01T00:00:00Z", default),
            ("2031-02-30T00:00:00Z", default),
            ("2031-01-01T00:00:00+99:99", default),
        ];
        for (value, expected) in resets {
            let mut h = HeaderMap::new();
            h.insert(
                "anthropic-ratelimit-requests-reset",
                HeaderValue::from_str(value).unwrap(),
            );
            let wait = cooldown_until(&h, default, now) - now;
            assert_eq!(wait, expected, "reset: {value:?}");
        }
        // A configured default beyond a day is clamped too.
        let forever = Duration::from_secs(u64::MAX);
        assert_eq!(
            cooldown_until(&HeaderMap::new(), forever, now) - now,
            MAX_COOLDOWN
        );
    }

    #[test]
    fn cooldown_reads_retry_after_then_reset_headers() {
        let now = Instant::now();
        let default = Duration::from_secs(30);
        let mut h = HeaderMap::new();
        assert_eq!(cooldown_until(&h, default, now), now + default);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(
            cooldown_until(&h, default, now),
            now + Duration::from_secs(2)
        );
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(cooldown_until(&h, default, now), now);
        let mut h = HeaderMap::new();
        let soon = crate::time::iso8601(SystemTime::now() + Duration::from_secs(120));
        let later = crate::time::iso8601(SystemTime::now() + Duration::from_secs(600));
        h.insert(
            "anthropic-ratelimit-tokens-reset",
            HeaderValue::from_str(&later).unwrap(),
        );
        h.insert(
            "anthropic-ratelimit-requests-reset",
            HeaderValue::from_str(&soon).unwrap(),
        );
        let wait = cooldown_until(&h, default, now) - now;
        assert!(
            wait > Duration::from_secs(110) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
    }
}
