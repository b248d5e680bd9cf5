//! Which requests the proxy answers itself instead of forwarding: the admin API under
//! `/__qcc__/`, and the two paths a browser or a crawler asks any web server for.

pub const PREFIX: &str = "/__qcc__";

/// What a browser or a crawler asks a web server for by itself. Forwarded, each would
/// reach an upstream with the endpoint's key and count as a failed request there; the
/// proxy answers them itself, to anyone, since they say nothing about it.
const BROWSER_PATHS: [&str; 2] = ["/favicon.ico", "/robots.txt"];

/// The paths the proxy answers itself instead of forwarding: the admin API under
/// `/__qcc__/` and `BROWSER_PATHS`. None of them counts as a request or touches an
/// endpoint.
pub fn is_admin_path(target: &str) -> bool {
    let path = path_of(target);
    path == PREFIX || path.starts_with("/__qcc__/") || is_browser_path(target)
}

pub(super) fn is_browser_path(target: &str) -> bool {
    BROWSER_PATHS.contains(&path_of(target))
}

pub(super) fn path_of(target: &str) -> &str {
    target.split('?').next().unwrap_or(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_paths() {
        assert!(is_admin_path("/__qcc__/stats?x=1"));
        assert!(is_admin_path("/__qcc__"));
        assert!(!is_admin_path("/__qcc__x"));
        assert!(!is_admin_path("/v1/messages"));
        assert!(is_admin_path("/favicon.ico"));
        assert!(is_admin_path("/robots.txt?x"));
        assert!(!is_admin_path("/favicon.ico/x"));
        assert!(!is_admin_path("/v1/robots.txt"));
    }
}
