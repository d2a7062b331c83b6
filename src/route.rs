//! The request rules both engines call, so each lives once: request → route, path checks, the
//! route's allowlist, the `Host` count, the app token.
//!
//! Routing fails closed: a request matches a configured path prefix or host, or nothing is
//! forwarded.
//!
//! - Reverse mode (origin-form, `GET /payments/charges`): the longest `path_prefix` that matches
//!   on a segment boundary wins, and is stripped.
//! - Forward mode (absolute-form, `GET http://api.example.com/x`, as `HTTP_PROXY` clients send):
//!   the URL's host must be a route's `host`; the path is kept. An origin-form request whose
//!   `Host` names a route's `host` (and matches no prefix) is treated the same way.
//!
//! A route with `allow` forwards only requests whose method and path (below the prefix; the
//! whole path for a forward-mode route) match one of its `METHOD PATH` patterns ([`Allow`]),
//! checked after [`check_path`]. The query string is not part of the match.

use std::collections::HashMap;

use percent_encoding::percent_decode_str;

pub use crate::allow::Allow;
use crate::config::{AppAuth, RouteConfig};
pub use crate::uri::uri_byte;
use subtle::ConstantTimeEq;

/// Which route, and the path to send upstream (below the upstream's base path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched<'a> {
    /// Index of the route in configuration order.
    pub route: usize,
    /// The remaining path (starts with `/`, or is empty).
    pub rest: &'a str,
}

/// The routing table.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// (prefix, route), longest prefix first.
    prefixes: Vec<(String, usize)>,
    /// host (lower case, with port if configured) → route.
    hosts: HashMap<String, usize>,
}

impl Router {
    /// Builds the table from validated routes.
    pub fn new(routes: &[RouteConfig]) -> Router {
        let mut prefixes: Vec<(String, usize)> = routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.path_prefix.clone().map(|p| (p, i)))
            .collect();
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        let hosts = routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.host.clone().map(|h| (h, i)))
            .collect();
        Router { prefixes, hosts }
    }

    /// Matches an origin-form path by prefix.
    pub fn by_path<'a>(&self, path: &'a str) -> Option<Matched<'a>> {
        for (prefix, i) in &self.prefixes {
            if prefix == "/" {
                return Some(Matched {
                    route: *i,
                    rest: path,
                });
            }
            if let Some(rest) = path.strip_prefix(prefix.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    return Some(Matched { route: *i, rest });
                }
            }
        }
        None
    }

    /// Matches a host (`api.example.com` or `api.example.com:8443`): a route host with a port
    /// must match exactly; one without a port matches the host on any port.
    pub fn by_host(&self, authority: &str) -> Option<usize> {
        if self.hosts.is_empty() {
            return None;
        }
        let lower = authority.to_ascii_lowercase();
        if let Some(i) = self.hosts.get(&lower) {
            return Some(*i);
        }
        let host = match lower.rsplit_once(':') {
            Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => lower.as_str(),
        };
        self.hosts.get(host).copied()
    }
}

/// Checks that a path cannot climb out of the route's prefix or the upstream's base path: no
/// `.` or `..` segment, raw or percent-encoded, with `/` or `\` as separators, also with path
/// parameters (`..;x`: Tomcat, Jetty and Spring drop what follows `;` in a segment and then
/// resolve the dots); no NUL.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("the path must start with '/'".into());
    }
    // Fast path: nothing encoded, no backslash, no segment made of dots.
    if !path.bytes().any(|b| b == b'%' || b == b'\\')
        && !path.split('/').any(|seg| dot_segment(seg.as_bytes()))
    {
        return Ok(());
    }
    let decoded = percent_decode_str(path).collect::<Vec<u8>>();
    // Decode twice: some servers decode again.
    let twice = percent_decode_str(&String::from_utf8_lossy(&decoded)).collect::<Vec<u8>>();
    for bytes in [&decoded, &twice] {
        if bytes.contains(&0) {
            return Err("the path contains a NUL byte".into());
        }
        if bytes.split(|b| *b == b'/' || *b == b'\\').any(dot_segment) {
            return Err("the path contains a '.' or '..' segment".into());
        }
    }
    Ok(())
}

/// The allowlist check both engines call, after [`check_path`]: whether `route` forwards
/// `method` on `rest` (the path below its prefix, or the whole path in forward mode). A route
/// without `allow` forwards everything.
#[inline]
pub fn allowed(route: &RouteConfig, method: &str, rest: &str) -> bool {
    route.allow.as_ref().is_none_or(|a| a.permits(method, rest))
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`, any other at most one.
/// `Err`: why the request is refused (400).
pub fn host_rule(http11: bool, hosts: usize) -> Result<(), &'static str> {
    match hosts {
        0 if http11 => Err("an HTTP/1.1 request needs a Host header"),
        0 | 1 => Ok(()),
        _ => Err("the request has more than one Host header"),
    }
}

/// Whether a `Host` value is a valid `uri-host [":" port]` (RFC 9112 §3.2, RFC 3986 §3.2.2):
/// registered-name characters, `%`-escapes, an IP literal in brackets; empty is allowed. A list
/// (`a.example, b.example`), white space, `/`, `\\`, `@` and the like are refused (400).
pub fn host_value_ok(v: &[u8]) -> bool {
    v.iter()
        .all(|&b| (uri_byte(b) && b != b',') || matches!(b, b':' | b'[' | b']'))
}

/// Whether the app sent the configured token (compared in constant time). `sent`: the first
/// value of the token header, if any.
pub fn app_token_ok(auth: &AppAuth, sent: Option<&[u8]>) -> bool {
    sent.is_some_and(|v| bool::from(v.ct_eq(auth.token.expose().as_bytes())))
}

/// Whether a path segment is `.` or `..`, with or without path parameters after `;`.
fn dot_segment(seg: &[u8]) -> bool {
    let name = seg.split(|b| *b == b';').next().unwrap_or(seg);
    name == b"." || name == b".."
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn router() -> Router {
        let c = Config::from_toml(
            r#"
            [[route]]
            name = "root"
            path_prefix = "/"
            upstream = "http://127.0.0.1:1"
            secret_id = "a"
            [[route]]
            name = "pay"
            path_prefix = "/payments"
            upstream = "http://127.0.0.1:1"
            secret_id = "a"
            [[route]]
            name = "payv2"
            path_prefix = "/payments/v2"
            upstream = "http://127.0.0.1:1"
            secret_id = "a"
            [[route]]
            name = "maps"
            host = "maps.example.com"
            upstream = "https://maps.example.com"
            secret_id = "b"
            [[route]]
            name = "mail"
            host = "mail.example.com:8443"
            upstream = "https://mail.example.com:8443"
            secret_id = "c"
        "#,
            "t.toml",
            Path::new("."),
            &Default::default(),
        )
        .expect("config");
        Router::new(&c.routes)
    }

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let r = router();
        assert_eq!(
            r.by_path("/payments/charges"),
            Some(Matched {
                route: 1,
                rest: "/charges"
            })
        );
        assert_eq!(r.by_path("/payments"), Some(Matched { route: 1, rest: "" }));
        assert_eq!(
            r.by_path("/payments/v2/x"),
            Some(Matched {
                route: 2,
                rest: "/x"
            })
        );
        assert_eq!(
            r.by_path("/paymentsX"),
            Some(Matched {
                route: 0,
                rest: "/paymentsX"
            })
        );
    }

    #[test]
    fn no_match_without_catch_all() {
        let mut r = router();
        r.prefixes.retain(|(p, _)| p != "/");
        assert_eq!(r.by_path("/other"), None);
        assert_eq!(r.by_path("/paymentsX"), None);
    }

    #[test]
    fn hosts_match_with_and_without_ports() {
        let r = router();
        assert_eq!(r.by_host("maps.example.com"), Some(3));
        assert_eq!(r.by_host("MAPS.example.com:80"), Some(3));
        assert_eq!(r.by_host("mail.example.com:8443"), Some(4));
        assert_eq!(r.by_host("mail.example.com"), None);
        assert_eq!(r.by_host("evil.example.com"), None);
    }

    #[test]
    fn host_values_and_counts() {
        for good in [
            "api.example.com",
            "127.0.0.1:8080",
            "[::1]:443",
            "",
            "xn--bcher-kva.example",
        ] {
            assert!(host_value_ok(good.as_bytes()), "{good}");
        }
        for bad in [
            "a.test, b.test",
            "a.test,b.test",
            "a b",
            "a/b",
            "a\\b",
            "user@a",
            "a\tb",
            "\"a\"",
        ] {
            assert!(!host_value_ok(bad.as_bytes()), "{bad}");
        }
        assert!(host_rule(true, 1).is_ok());
        assert!(host_rule(false, 0).is_ok());
        assert!(host_rule(true, 0).is_err());
        assert!(host_rule(false, 2).is_err());
    }

    #[test]
    fn path_escapes_are_refused() {
        assert!(check_path("/payments/charges").is_ok());
        assert!(check_path("/a/b.c/..d").is_ok());
        assert!(check_path("/a;v=1/b;jsessionid=x").is_ok());
        assert!(check_path("/a/..x;y/b").is_ok());
        for bad in [
            "/api/..;/admin",
            "/api/..;x=1/admin",
            "/api/.;/admin",
            "/api/%2e%2e;x/admin",
            "/api/%2e;/admin",
            "/payments/../admin",
            "/payments/%2e%2e/admin",
            "/payments/%2E%2e%2Fadmin",
            "/payments/..%2fadmin",
            "/payments/%252e%252e/admin",
            "/payments/..\\admin",
            "/payments/./x",
            "/a%00b",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }
}
