//! Who may use the admin API, decided from the request head alone: the admin token, or a
//! loopback client whose `Host` names this machine, whose `Origin` is that same host, and
//! whose state-changing call is not cross-site.

use crate::config::validated::Config;
use crate::forward::failover::send_error;
use crate::server::admin::paths::is_browser_path;
use crate::server::http_out::ClientOut;
use crate::upstream::call::ClientRequest;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use ureq::http::Method;

/// Why an admin request was refused. Every refusal is 403 `permission_error`, whatever
/// failed: the contract names 403, a wrong token is just a request without the admin
/// token, and one answer tells a prober nothing about whether `admin_token` is set. The
/// message says what to do instead; it never repeats what the client sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied(pub &'static str);

impl Denied {
    pub const STATUS: u16 = 403;

    /// Writes the 403 in Anthropic's error shape; returns the status sent.
    pub fn send(self, out: &mut ClientOut) -> u16 {
        send_error(out, Self::STATUS, "permission_error", self.0);
        Self::STATUS
    }
}

const NOT_LOOPBACK: Denied =
    Denied("the admin API answers other machines only with admin_token as Authorization: Bearer");
const FORWARDED: Denied = Denied(
    "this admin request came through another proxy: send admin_token as Authorization: Bearer",
);
const BAD_HOST: Denied = Denied(
    "the admin API needs a loopback Host (localhost, 127.0.0.1 or [::1]) or the listen \
     address, or admin_token as Authorization: Bearer",
);
const FOREIGN_ORIGIN: Denied = Denied(
    "the admin API does not answer other web pages: use the status page at /__qcc__/, a \
     client that sends no Origin (curl), or admin_token as Authorization: Bearer",
);
const CROSS_SITE: Denied = Denied(
    "a state-changing admin call must be same-origin (Sec-Fetch-Site same-origin or none): \
     use curl, or admin_token as Authorization: Bearer",
);

/// Decides from the request head alone whether the admin API may answer, so the server
/// can refuse before it reads a body byte. `listen` is the address the server bound.
///
/// The admin token as a Bearer token admits from anywhere: a web page has no way to learn
/// it. Without it, loopback is not enough, since a page in the user's browser connects
/// from loopback too: by DNS rebinding (its own name resolving to 127.0.0.1, so the
/// browser treats the proxy as that page's origin, but sends that name as `Host`), or by
/// a cross-origin request (which carries the page's `Origin`). So the `Host` must name
/// this machine's loopback or the listen address, an `Origin` must be the proxy's own,
/// and a call that changes state must not be cross-site. `/favicon.ico` and `/robots.txt`
/// are for anyone: their answers are fixed and say nothing about the proxy.
pub fn access(
    config: &Config,
    listen: SocketAddr,
    remote: Option<SocketAddr>,
    request: &ClientRequest,
) -> Result<(), Denied> {
    if is_browser_path(&request.target) || presents_admin_token(config, request) {
        return Ok(());
    }
    if !remote.is_some_and(|r| r.ip().to_canonical().is_loopback()) {
        return Err(NOT_LOOPBACK);
    }
    let relayed = |name: &str| request.headers.iter().any(|(n, _)| n.as_str() == name);
    if relayed("forwarded") || relayed("x-forwarded-for") {
        return Err(FORWARDED);
    }
    let host = single(request, "host")
        .ok()
        .flatten()
        .and_then(Authority::parse)
        .filter(|host| host.is_ours(listen))
        .ok_or(BAD_HOST)?;
    match single(request, "origin") {
        Ok(None) => {}
        Ok(Some(origin)) if is_origin_of(origin, &host) => {}
        _ => return Err(FOREIGN_ORIGIN),
    }
    if request.method != Method::GET && request.method != Method::HEAD {
        match single(request, "sec-fetch-site") {
            Ok(None | Some("same-origin" | "none")) => {}
            _ => return Err(CROSS_SITE),
        }
    }
    Ok(())
}

/// `Authorization: Bearer <admin_token>`, the scheme in any case (RFC 9110 makes it
/// case-insensitive). A wrong or absent token is not an error here: the request is then
/// judged as one without the token.
fn presents_admin_token(config: &Config, request: &ClientRequest) -> bool {
    let Some(token) = &config.admin_token else {
        return false;
    };
    let bearer = request.header("authorization").and_then(|value| {
        let (scheme, credentials) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(credentials.trim())
    });
    bearer.is_some_and(|presented| token.matches(presented))
}

/// The value of a header that may appear at most once. `Err` for two copies or a value
/// that is not visible ASCII: the check cannot tell which one a browser meant, so the
/// caller refuses rather than guess (a value `header()` cannot read must not count as
/// absent).
fn single<'a>(request: &'a ClientRequest, name: &str) -> Result<Option<&'a str>, ()> {
    let mut values = request
        .headers
        .iter()
        .filter(|(n, _)| n.as_str() == name)
        .map(|(_, v)| v.to_str());
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(Ok(value)), None) => Ok(Some(value.trim())),
        _ => Err(()),
    }
}

/// `Origin: http://` + the request's own `Host` (same name, same port once the default
/// 80 is filled in): the page that sent it was served by this proxy under the very name
/// and port the browser used for this request, which is what same-origin means. Any
/// other origin, `null`, or `https://` (the proxy speaks plain HTTP) is foreign.
fn is_origin_of(origin: &str, host: &Authority) -> bool {
    origin
        .strip_prefix("http://")
        .and_then(Authority::parse)
        .is_some_and(|origin| origin == *host)
}

/// A `Host` header (or the authority of an `Origin`) that names an address this check
/// can judge: the name `localhost` or an IP literal, with its port (80 when absent).
/// Anything else, `*.localhost` included, does not parse: RFC 6761 asks resolvers to
/// keep those names on loopback, but glibc's sends them to the DNS server, where a
/// hostile one could rebind them.
#[derive(Debug, PartialEq, Eq)]
struct Authority {
    /// `None` for `localhost`.
    ip: Option<IpAddr>,
    port: u16,
}

impl Authority {
    fn parse(text: &str) -> Option<Authority> {
        let (ip, port) = match text.strip_prefix('[') {
            Some(bracketed) => {
                let (ip, rest) = bracketed.split_once(']')?;
                let ip: Ipv6Addr = ip.parse().ok()?;
                let port = if rest.is_empty() {
                    None
                } else {
                    Some(rest.strip_prefix(':')?)
                };
                (Some(IpAddr::V6(ip).to_canonical()), port)
            }
            None => {
                let (name, port) = match text.rsplit_once(':') {
                    Some((name, port)) => (name, Some(port)),
                    None => (text, None),
                };
                let ip = if name.eq_ignore_ascii_case("localhost") {
                    None
                } else {
                    Some(IpAddr::V4(name.parse::<Ipv4Addr>().ok()?))
                };
                (ip, port)
            }
        };
        let port = match port {
            None => 80,
            Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                digits.parse().ok()?
            }
            Some(_) => return None,
        };
        Some(Authority { ip, port })
    }

    /// `localhost` or a loopback address with any port (an SSH tunnel may change it), or
    /// exactly the address the server listens on.
    fn is_ours(&self, listen: SocketAddr) -> bool {
        match self.ip {
            None => true,
            Some(ip) => {
                ip.is_loopback() || (ip == listen.ip().to_canonical() && self.port == listen.port())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOKEN: &str = "admin-secret-token-123";

    fn config(admin_token: Option<&str>) -> Config {
        let text = json!({
            "admin_token": admin_token,
            "endpoints": [{"base_url": "http://127.0.0.1:9", "api_key": "sk-test-0123456789"}],
        });
        let overrides = crate::config::validated::Overrides::default();
        Config::from_json(&text.to_string(), &overrides, &|_| None).expect("config")
    }

    fn request(method: Method, headers: &[(&str, &[u8])]) -> ClientRequest {
        let headers = headers
            .iter()
            .map(|(n, v)| {
                (
                    n.parse().unwrap(),
                    ureq::http::HeaderValue::from_bytes(v).unwrap(),
                )
            })
            .collect();
        ClientRequest {
            method,
            target: "/__qcc__/stats".into(),
            headers,
            body: Vec::new(),
            held: None,
        }
    }

    /// `access` for a request from 127.0.0.1 to a proxy bound to 127.0.0.1:7860.
    fn judge(method: Method, headers: &[(&str, &[u8])]) -> Result<(), Denied> {
        let listen = "127.0.0.1:7860".parse().unwrap();
        let remote = Some("127.0.0.1:50000".parse().unwrap());
        access(
            &config(Some(TOKEN)),
            listen,
            remote,
            &request(method, headers),
        )
    }

    #[test]
    fn hosts_that_name_this_machine() {
        let listen: SocketAddr = "192.0.2.1:7860".parse().unwrap();
        let ours = |host: &str| Authority::parse(host).is_some_and(|a| a.is_ours(listen));
        for host in [
            "localhost",
            "LocalHost:1",
            "127.0.0.1",
            "127.1.2.3:7860",
            "[::1]",
            "[::1]:9999",
            "[::ffff:127.0.0.1]:80",
            "192.0.2.1:7860",
        ] {
            assert!(ours(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:7860",
            "a.localhost",
            "localhost.",
            "localhost:",
            "localhost:+80",
            "localhost:65536",
            "127.0.0.1.evil.example",
            "2130706433",
            "::1",
            "[::1",
            "[127.0.0.1]",
            "[::1]x",
            "user@localhost",
            "192.0.2.1",
            "192.0.2.1:7861",
            "192.0.2.2:7860",
        ] {
            assert!(!ours(host), "{host:?}");
        }
    }

    #[test]
    fn loopback_without_token_needs_a_loopback_host() {
        assert_eq!(judge(Method::GET, &[("host", b"localhost:7860")]), Ok(()));
        assert_eq!(judge(Method::GET, &[]), Err(BAD_HOST));
        assert_eq!(
            judge(Method::GET, &[("host", b"evil.example")]),
            Err(BAD_HOST)
        );
        let two_hosts: &[(&str, &[u8])] = &[("host", b"localhost"), ("host", b"evil.example")];
        assert_eq!(judge(Method::GET, two_hosts), Err(BAD_HOST));
        // A wrong token changes nothing: the request is judged as one without a token.
        let wrong = &[
            ("host", &b"localhost"[..]),
            ("authorization", b"Bearer nope"),
        ];
        assert_eq!(judge(Method::GET, wrong), Ok(()));
    }

    #[test]
    fn the_remote_must_be_loopback() {
        let listen = "127.0.0.1:7860".parse().unwrap();
        let plain = request(Method::GET, &[("host", b"127.0.0.1:7860")]);
        let from = |remote: Option<&str>| {
            let remote = remote.map(|r| r.parse().unwrap());
            access(&config(None), listen, remote, &plain)
        };
        assert_eq!(from(Some("[::1]:5000")), Ok(()));
        assert_eq!(from(Some("[::ffff:127.0.0.1]:5000")), Ok(()));
        assert_eq!(from(Some("192.0.2.7:5000")), Err(NOT_LOOPBACK));
        assert_eq!(from(None), Err(NOT_LOOPBACK));
    }

    #[test]
    fn the_admin_token_admits_from_anywhere() {
        let listen = "127.0.0.1:7860".parse().unwrap();
        let remote = Some("192.0.2.7:5000".parse().unwrap());
        let hostile: &[(&str, &[u8])] = &[
            ("host", b"evil.example"),
            ("origin", b"http://evil.example"),
            ("sec-fetch-site", b"cross-site"),
            ("x-forwarded-for", b"192.0.2.8"),
        ];
        for authorization in [format!("Bearer {TOKEN}"), format!("bearer  {TOKEN} ")] {
            let mut headers = hostile.to_vec();
            headers.push(("authorization", authorization.as_bytes()));
            let post = request(Method::POST, &headers);
            assert_eq!(access(&config(Some(TOKEN)), listen, remote, &post), Ok(()));
            // Without admin_token configured, no token admits.
            assert_eq!(
                access(&config(None), listen, remote, &post),
                Err(NOT_LOOPBACK)
            );
        }
        let basic = request(Method::GET, &[("authorization", b"Basic xyz")]);
        assert_eq!(
            access(&config(Some(TOKEN)), listen, remote, &basic),
            Err(NOT_LOOPBACK)
        );
    }

    #[test]
    fn an_origin_must_be_the_host_the_request_names() {
        let with = |host: &'static str, origin: &'static [u8]| {
            judge(
                Method::GET,
                &[("host", host.as_bytes()), ("origin", origin)],
            )
        };
        assert_eq!(with("localhost:7860", b"http://localhost:7860"), Ok(()));
        assert_eq!(with("LOCALHOST:7860", b"http://localhost:7860"), Ok(()));
        assert_eq!(with("localhost", b"http://localhost:80"), Ok(()));
        assert_eq!(with("[::1]:7860", b"http://[::1]:7860"), Ok(()));
        for foreign in [
            &b"http://evil.example"[..],
            b"http://localhost:3000",
            b"http://127.0.0.1:7860",
            b"https://localhost:7860",
            b"http://localhost:7860/",
            b"null",
            b"",
            "http://localh\u{f6}st:7860".as_bytes(),
        ] {
            assert_eq!(
                with("localhost:7860", foreign),
                Err(FOREIGN_ORIGIN),
                "{}",
                String::from_utf8_lossy(foreign)
            );
        }
        let two: &[(&str, &[u8])] = &[
            ("host", b"localhost:7860"),
            ("origin", b"http://localhost:7860"),
            ("origin", b"http://evil.example"),
        ];
        assert_eq!(judge(Method::GET, two), Err(FOREIGN_ORIGIN));
    }

    #[test]
    fn state_changing_calls_must_not_be_cross_site() {
        let with = |method: Method, site: &'static [u8]| {
            judge(
                method,
                &[("host", b"localhost:7860"), ("sec-fetch-site", site)],
            )
        };
        assert_eq!(with(Method::POST, b"same-origin"), Ok(()));
        assert_eq!(with(Method::POST, b"none"), Ok(()));
        assert_eq!(with(Method::POST, b"same-site"), Err(CROSS_SITE));
        assert_eq!(with(Method::POST, b"cross-site"), Err(CROSS_SITE));
        assert_eq!(with(Method::DELETE, b"cross-site"), Err(CROSS_SITE));
        // A link followed from another site may open the status page.
        assert_eq!(with(Method::GET, b"cross-site"), Ok(()));
        assert_eq!(with(Method::HEAD, b"cross-site"), Ok(()));
    }

    #[test]
    fn a_request_relayed_by_another_proxy_needs_the_token() {
        for header in ["forwarded", "x-forwarded-for"] {
            for value in [&b"for=x"[..], "for=\u{f6}".as_bytes()] {
                let headers: &[(&str, &[u8])] = &[("host", b"127.0.0.1:7860"), (header, value)];
                assert_eq!(judge(Method::GET, headers), Err(FORWARDED), "{header}");
            }
        }
    }

    #[test]
    fn browser_paths_are_for_anyone() {
        let listen = "127.0.0.1:7860".parse().unwrap();
        let remote = Some("192.0.2.7:5000".parse().unwrap());
        for target in ["/favicon.ico", "/robots.txt"] {
            let mut hostile = request(Method::GET, &[("host", b"evil.example")]);
            hostile.target = target.into();
            assert_eq!(access(&config(None), listen, remote, &hostile), Ok(()));
        }
    }
}
