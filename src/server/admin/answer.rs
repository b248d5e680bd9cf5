//! What an admin route answers and how it is written: JSON, the status page with its
//! headers, the Prometheus text, the fixed answers for `/favicon.ico` and `/robots.txt`,
//! and errors in Anthropic's shape.

use crate::forward::failover::send_error;
use crate::server::http_out::{ClientOut, Framing};
use serde_json::Value;

/// What an admin route answers; `send` writes it and returns the status.
pub(super) enum Answer {
    Json(u16, Value),
    Page(&'static str),
    Metrics(String),
    NoIcon,
    Robots,
    Error(u16, &'static str, String),
}

/// The status page's headers. It runs its own inline script and style and talks to its
/// own origin only; `frame-ancestors 'none'` (and `x-frame-options` for older browsers)
/// keeps another site from framing it to steer an operator's click onto its buttons,
/// which the same-origin rule of `access` could not tell from a real one.
const PAGE_HEADERS: [(&str, &[u8]); 5] = [
    ("content-type", b"text/html; charset=utf-8"),
    (
        "content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
          img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
          frame-ancestors 'none'",
    ),
    ("x-frame-options", b"DENY"),
    ("cache-control", b"no-store"),
    ("referrer-policy", b"no-referrer"),
];

const ROBOTS_TXT: &str = "User-agent: *\nDisallow: /\n";

impl Answer {
    pub(super) fn send(self, out: &mut ClientOut) -> u16 {
        let (status, content_type, body) = match self {
            Answer::Json(status, v) => (status, "application/json", v.to_string().into_bytes()),
            Answer::Page(html) => return send_with(out, 200, &PAGE_HEADERS, html.as_bytes()),
            Answer::Metrics(text) => (200, "text/plain; version=0.0.4", text.into_bytes()),
            Answer::NoIcon => {
                let headers = [("cache-control", &b"max-age=86400"[..])];
                if let Ok(sink) = out.start(204, &headers, Framing::NoBody) {
                    let _client_may_be_gone = sink.finish();
                }
                return 204;
            }
            Answer::Robots => {
                let headers = [
                    ("content-type", &b"text/plain; charset=utf-8"[..]),
                    ("cache-control", b"max-age=86400"),
                ];
                return send_with(out, 200, &headers, ROBOTS_TXT.as_bytes());
            }
            Answer::Error(status, kind, message) => {
                send_error(out, status, kind, &message);
                return status;
            }
        };
        let _client_may_be_gone = out.send(status, content_type, &body);
        status
    }
}

/// A complete answer with these headers (the framing is added); returns the status.
fn send_with(out: &mut ClientOut, status: u16, headers: &[(&str, &[u8])], body: &[u8]) -> u16 {
    let length = Framing::Length(body.len() as u64);
    if let Ok(mut sink) = out.start(status, headers, length)
        && sink.write_piece(body).is_ok()
    {
        let _client_may_be_gone = sink.finish();
    }
    status
}

/// The status page: self-contained HTML that polls `/__qcc__/stats`.
pub(super) const STATUS_PAGE: &str = include_str!("status_page.html");
