//! The upstream client and the request/response rewriting around it.
//!
//! One pooled keep-alive client (hyper-util) serves every route: HTTPS through rustls with the
//! system's roots (or the bundled Mozilla roots where the system has none, as in a scratch
//! image) plus an optional CA bundle, HTTP/2 when the upstream offers it by ALPN, TCP_NODELAY.
//! Hop-by-hop headers are dropped both ways; bodies stream both ways.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ReqBody;
use crate::limits::MAX_HEADER_BYTES;

/// The upstream client type.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ReqBody>;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA bundle could not be read or parsed.
    #[error("ca_bundle {path}: {reason}")]
    CaBundle {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Builds the root store: system roots (or Mozilla's if the system has none) plus `ca_bundle`.
fn roots(ca_bundle: Option<&std::path::Path>) -> Result<rustls::RootCertStore, ClientError> {
    let mut store = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = store.add_parsable_certificates(native.certs);
    if added == 0 {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = ca_bundle {
        let err = |reason: String| ClientError::CaBundle {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let certs = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate in the file".into()));
        }
        for c in certs {
            store.add(c).map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(store)
}

/// The TLS settings for upstreams: ring, TLS 1.2 and 1.3, the roots of [`roots`], no ALPN.
pub fn tls_config(
    ca_bundle: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca_bundle)?)
        .with_no_client_auth())
}

/// Builds the pooled upstream client (HTTP/2 and HTTP/1.1 offered by ALPN).
pub fn client(
    connect_timeout: Duration,
    ca_bundle: Option<&std::path::Path>,
) -> Result<UpstreamClient, ClientError> {
    Ok(client_with(connect_timeout, tls_config(ca_bundle)?, true))
}

/// Builds a pooled upstream client with `tls`. With `http2`, HTTP/2 and HTTP/1.1 are offered by
/// ALPN and the server chooses; without, only HTTP/1.1 is spoken (no ALPN offer), whatever the
/// server supports: a route's `http2 = false` holds for every request on it.
pub fn client_with(
    connect_timeout: Duration,
    tls: rustls::ClientConfig,
    http2: bool,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let https = if http2 {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_adaptive_window(true)
        // The same limit for a response head as over HTTP/1.1 (hyper's default is 16 KiB).
        .http2_max_header_list_size(MAX_HEADER_BYTES as u32)
        .build(https)
}

/// Whether a header is hop-by-hop in itself (whatever the `Connection` header lists): it
/// describes one connection, not the message (RFC 9110 §7.6.1), or is proxy-only. Never
/// forwarded as such in either direction, by either path. Any case; the length rules out most
/// names without a comparison.
pub fn is_hop_by_hop(name: &str) -> bool {
    match name.len() {
        2 => name.eq_ignore_ascii_case("te"),
        7 => name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("trailer"),
        10 => name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive"),
        16 => name.eq_ignore_ascii_case("proxy-connection"),
        17 => name.eq_ignore_ascii_case("transfer-encoding"),
        18 => name.eq_ignore_ascii_case("proxy-authenticate"),
        19 => name.eq_ignore_ascii_case("proxy-authorization"),
        _ => false,
    }
}

/// Removes hop-by-hop headers, and any header the `Connection` header names.
///
/// One pass over the names, then a removal only for those present: most messages carry none of
/// them, or only `Connection: keep-alive` (ten hashed removals per message cost more than the rest
/// of the header handling).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        if !is_hop_by_hop(name.as_str()) {
            continue;
        }
        if name == header::CONNECTION {
            for token in value.to_str().unwrap_or("").split(',') {
                let token = token.trim();
                // `keep-alive` is removed anyway, and `close` names no header.
                if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                    found.push(n);
                }
            }
        }
        found.push(name.clone());
    }
    for n in found {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn messages_without_hop_by_hop_headers_are_untouched() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn builds_with_and_without_a_ca_bundle() {
        assert!(client(Duration::from_secs(1), None).is_ok());
        let e = client(
            Duration::from_secs(1),
            Some(std::path::Path::new("/nonexistent.pem")),
        )
        .expect_err("missing bundle");
        assert!(e.to_string().contains("/nonexistent.pem"));
    }
}
