//! URI rules kept once: RFC 3986 byte classes, shared by the request rules ([`crate::route`])
//! and the allowlist ([`crate::allow`]); what makes a host loopback; which URLs a client secret
//! may be sent to ([`secure_url`], for OAuth2 routes and the rotation function); and how a URL
//! is shown in logs ([`shown`]).

use http::Uri;

/// RFC 3986's `unreserved` and `sub-delims`, and the `%` of an escape: the bytes any URI
/// component may carry as they are. The request target and `Host` rules add their own.
pub fn uri_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

/// A URL as it may appear in logs and errors: scheme, host, port and path; no user info, no
/// query (either could carry a credential).
pub fn shown(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("?");
    let host = uri.host().unwrap_or("?");
    match uri.port_u16() {
        Some(p) => format!("{scheme}://{host}:{p}{}", uri.path()),
        None => format!("{scheme}://{host}{}", uri.path()),
    }
}

/// Whether `host` is a loopback name or address (`localhost`, `127.0.0.0/8`, `::1`).
pub fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a URL may not be used for a token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlProblem {
    /// Not a URL at all.
    Invalid,
    /// No scheme or no host.
    NotAbsolute,
    /// Neither https nor http to a loopback host.
    Insecure,
}

/// Parses a token endpoint URL: absolute, https, or http to a loopback host only.
pub fn secure_url(text: &str) -> Result<Uri, UrlProblem> {
    let uri: Uri = text.parse().map_err(|_| UrlProblem::Invalid)?;
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(UrlProblem::NotAbsolute);
    };
    match scheme {
        "https" => Ok(uri),
        "http" if is_loopback(host) => Ok(uri),
        _ => Err(UrlProblem::Insecure),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        let u: Uri = "https://user:pw@auth.example.com:8443/oauth/token?client_secret=s"
            .parse()
            .expect("uri");
        assert_eq!(shown(&u), "https://auth.example.com:8443/oauth/token");
    }

    #[test]
    fn loopback_http_is_allowed() {
        for u in [
            "http://127.0.0.1:8/t",
            "http://localhost/t",
            "http://[::1]:9/t",
            "https://x/t",
        ] {
            secure_url(u).unwrap_or_else(|e| panic!("{u}: {e:?}"));
        }
        for (u, why) in [
            ("http://example.com/t", UrlProblem::Insecure),
            ("ftp://127.0.0.1/t", UrlProblem::Insecure),
            ("http://127.0.0.1.example.com/t", UrlProblem::Insecure),
            ("/relative", UrlProblem::NotAbsolute),
            ("a b", UrlProblem::Invalid),
        ] {
            assert_eq!(secure_url(u).expect_err(u), why, "{u}");
        }
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1", "[::2]", "localhost.example.com"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
