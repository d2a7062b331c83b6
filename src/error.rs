//! The proxy's own errors, and the one place they become HTTP responses.
//!
//! Every response keyproxy makes itself (rather than relaying the API's) has a distinct status,
//! a short JSON body `{"error": kind, "message": ..., "route": ...}` and the header
//! `x-keyproxy-error: <kind>`, so an app can tell it from the API's own answers. Messages name
//! the cause and never carry a secret.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::body::RespBody;

/// The header marking a response as the proxy's own.
pub const ERROR_HEADER: &str = "x-keyproxy-error";

/// A failure the proxy answers itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// No route matches the request; nothing was forwarded.
    #[error("no route matches {what}")]
    NoRoute {
        /// What was looked up (method and path, or the host).
        what: String,
    },
    /// The request cannot be forwarded as sent.
    #[error("{0}")]
    BadRequest(String),
    /// `CONNECT`: keyproxy cannot inject a key into an end-to-end tunnel. The message says how
    /// to set up the app's proxy variables instead (a client sends `CONNECT` for `https://` URLs
    /// when `HTTPS_PROXY` points at keyproxy).
    #[error("CONNECT is not supported: keyproxy cannot add a key inside a TLS tunnel. Call the API as http://HOST/... with HTTP_PROXY (not HTTPS_PROXY) pointing at keyproxy, which connects to the API over HTTPS, and list every host that is not an API behind keyproxy in NO_PROXY")]
    Connect,
    /// The route's `allow` list has no pattern for this method and path; nothing was
    /// forwarded.
    #[error("the route's allow list does not permit {method} {path}")]
    NotAllowed {
        /// The request's method.
        method: String,
        /// The path below the route's prefix, shortened if long (no query string).
        path: String,
    },
    /// The app-side token is missing or wrong.
    #[error("missing or wrong app token in header {0}")]
    AppToken(String),
    /// The route's secret has no usable value yet.
    #[error("no key available yet for this route: {0}")]
    NoKey(String),
    /// The upstream could not be reached or failed before answering.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The upstream did not answer in time.
    #[error("upstream did not answer within {0}")]
    Timeout(String),
    /// Too many concurrent app connections.
    #[error("too many connections to keyproxy (max_connections)")]
    Overloaded,
}

impl ProxyError {
    /// [`ProxyError::NotAllowed`] for `method` and `path` (cut to 200 bytes: the answer names
    /// what was refused without echoing a long request back; the prefix itself shows as `/`,
    /// as the allow list reads it).
    pub fn not_allowed(method: &str, path: &str) -> ProxyError {
        const MAX: usize = 200;
        let mut path = if path.is_empty() { "/" } else { path }.to_owned();
        if path.len() > MAX {
            let mut end = MAX;
            while !path.is_char_boundary(end) {
                end -= 1;
            }
            path.truncate(end);
            path.push_str("...");
        }
        ProxyError::NotAllowed {
            method: method.chars().take(32).collect(),
            path,
        }
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::AppToken(_) | ProxyError::NotAllowed { .. } => StatusCode::FORBIDDEN,
            ProxyError::NoKey(_) | ProxyError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short, stable name (the `x-keyproxy-error` value and the metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Connect => "connect_not_supported",
            ProxyError::AppToken(_) => "app_token",
            ProxyError::NotAllowed { .. } => "not_allowed",
            ProxyError::NoKey(_) => "no_key",
            ProxyError::Unreachable(_) => "upstream_unreachable",
            ProxyError::Timeout(_) => "upstream_timeout",
            ProxyError::Overloaded => "overloaded",
        }
    }

    /// The response for this error, from `route` (if one matched).
    pub fn to_response(&self, route: Option<&str>) -> Response<RespBody> {
        let mut resp = Response::new(RespBody::full(Bytes::from(self.body(route))));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.kind()));
        if matches!(self, ProxyError::Connect) {
            h.insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        resp
    }

    /// The JSON body: `{"error": kind, "message": ..., "route": ...}` and a newline.
    fn body(&self, route: Option<&str>) -> String {
        let body = json!({
            "error": self.kind(),
            "message": self.to_string(),
            "route": route,
        });
        body.to_string() + "\n"
    }

    /// The raw HTTP/1.1 bytes of this error with `Connection: close`, for answering a connection
    /// before any HTTP parsing (over `max_connections`).
    pub fn raw_http1(&self) -> Vec<u8> {
        self.http1(None, true)
    }

    /// The raw HTTP/1.1 response for this error from `route`, the same as [`Self::to_response`];
    /// with `Connection: close` when `close`.
    pub fn http1(&self, route: Option<&str>, close: bool) -> Vec<u8> {
        let body = self.body(route);
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\n{ERROR_HEADER}: {}\r\ncontent-length: {}\r\n{}\r\n{body}",
            self.status().as_u16(),
            self.status().canonical_reason().unwrap_or(""),
            self.kind(),
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        )
        .into_bytes()
    }
}

/// `head`, then each error in the chain from `first` on, joined by `: ` (repeats skipped).
pub fn with_causes(head: String, first: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut out = head;
    let mut cur = first;
    while let Some(e) = cur {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn response_carries_kind_status_and_json() {
        let resp = ProxyError::NoRoute {
            what: "GET /x".into(),
        }
        .to_response(None);
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()[ERROR_HEADER], "no_route");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"], "no_route");
        assert_eq!(v["message"], "no route matches GET /x");
    }

    #[test]
    fn statuses_are_distinct_per_cause() {
        assert_eq!(ProxyError::Unreachable("x".into()).status(), 502);
        assert_eq!(ProxyError::Timeout("30s".into()).status(), 504);
        assert_eq!(ProxyError::NoKey("x".into()).status(), 503);
        assert_eq!(ProxyError::Connect.status(), 405);
        let e = ProxyError::not_allowed("DELETE", &format!("/x{}", "a".repeat(500)));
        assert_eq!((e.status().as_u16(), e.kind()), (403, "not_allowed"));
        assert!(e.to_string().len() < 300, "{e}");
        let m = ProxyError::Connect.to_string();
        assert!(
            m.contains("http://HOST/")
                && m.contains("HTTP_PROXY (not HTTPS_PROXY)")
                && m.contains("NO_PROXY"),
            "{m}"
        );
        let raw = String::from_utf8(ProxyError::Overloaded.raw_http1()).expect("utf8");
        assert!(raw.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    }
}
