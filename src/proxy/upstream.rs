//! The innermost service: one exchange with the upstream. Injects the credential (header or
//! query parameter, the app's own removed), rewrites the URI and authority, drops hop-by-hop
//! headers, sends with the route's pooled client (once more if the upstream certainly did not
//! process it), and relays the answer with framing written anew.

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use prometheus_client::metrics::histogram::Histogram;
use tower::Service;

use super::{Outbound, Routed};
use crate::body::{ReqBody, RespBody};
use crate::error::ProxyError;
use crate::forward::strip_hop_by_hop;
use crate::inject::{write_target, Credential};
use crate::routes::Route;

/// Sends a request to its route's upstream and relays the answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Upstream;

impl Service<Outbound> for Upstream {
    type Response = Response<RespBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<RespBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // The client queues on its own pool; there is nothing to wait for here.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, out: Outbound) -> Self::Future {
        Box::pin(exchange(out))
    }
}

/// Rewrites, sends, relays.
async fn exchange(out: Outbound) -> Result<Response<RespBody>, ProxyError> {
    let Outbound {
        routed: Routed { req, route, strip },
        key,
    } = out;
    let cred = route
        .slot
        .credential(&key)
        .ok_or_else(|| ProxyError::NoKey("no credential rendered for this route".into()))?;
    let app_http1 = matches!(req.version(), Version::HTTP_10 | Version::HTTP_11);
    let mut req = rewrite(&route, req, strip, cred)?;
    // A streamed body says when it has all gone out: an answer before then is an early one.
    let sent = match std::mem::replace(req.body_mut(), ReqBody::empty()) {
        body @ ReqBody::Full(_) => {
            *req.body_mut() = body;
            None
        }
        body => {
            let (body, done) = ReqBody::watched(body);
            *req.body_mut() = body;
            if !route.config.http2 || route.config.upstream.scheme == http::uri::Scheme::HTTP {
                // An HTTP/1.1 connection that carried a streamed body is not used again: after an
                // early answer it may still be blocked sending the rest, and a request queued on
                // it behind that would wait for the route's timeout.
                req.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Some(done)
        }
    };
    let resp = send(&route, req).await?;
    let mut resp = respond(resp, route.config.idle_timeout)?;
    if let Some(watch) = sent.filter(|w| !w.ended()) {
        // An early answer: the rest of the app's body is not forwarded. Dropping it stops hyper
        // reading it, and an HTTP/1 app connection closes after the answer, as on the HTTP/1.1
        // engine.
        watch.abandon();
        if app_http1 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    Ok(resp)
}

/// The upstream request: the route's scheme and authority, its base path, the path below the
/// prefix, the credential in place of the app's own, end-to-end headers only.
fn rewrite(
    route: &Route,
    req: Request<ReqBody>,
    strip: usize,
    cred: &Credential,
) -> Result<Request<ReqBody>, ProxyError> {
    // A request with both Content-Length and Transfer-Encoding never reaches this point as
    // such: hyper drops the Content-Length, reads the chunked framing, and closes the
    // connection after the answer (RFC 9112 §6.3). The upstream request is framed anew.
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    route.config.injection.strip_headers(&mut headers);
    // The upstream's authority goes in the URI only: over HTTP/1.1 the client writes it as
    // `Host`, over HTTP/2 as `:authority`, and never both (RFC 9113 §8.3.1; nginx answers a
    // request carrying both with 400).
    headers.remove(header::HOST);
    if matches!(body, ReqBody::Full(_)) {
        // The body is in memory: its exact length is sent, whatever the app declared.
        headers.remove(header::CONTENT_LENGTH);
    }
    let up = &route.config.upstream;
    let mut target = Vec::with_capacity(up.base_path.len() + parts.uri.path().len() + 64);
    write_target(
        &mut target,
        &up.base_path,
        parts.uri.path().get(strip..).unwrap_or_default().as_bytes(),
        parts.uri.query(),
        cred,
    );
    let path_and_query = PathAndQuery::try_from(target)
        .map_err(|_| ProxyError::BadRequest("the request path cannot be forwarded".into()))?;
    let uri = Uri::builder()
        .scheme(up.scheme.clone())
        .authority(up.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ProxyError::BadRequest(format!("cannot build the upstream URL: {e}")))?;
    for (name, value) in cred.headers() {
        headers.insert(name.clone(), value.clone());
    }
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    Ok(out)
}

/// Observes `upstream_duration_seconds` when dropped: answered, failed, or cut off by the
/// timeout layer.
struct Timing<'a> {
    /// When the request went out.
    start: Instant,
    /// The route's histogram.
    histogram: &'a Histogram,
    /// Cleared when no connection to the upstream could be made: nothing was sent, nothing is
    /// observed.
    sent: bool,
}

impl Drop for Timing<'_> {
    fn drop(&mut self) {
        if self.sent {
            self.histogram.observe(self.start.elapsed().as_secs_f64());
        }
    }
}

/// Sends `req` with the route's client; once more when the upstream is known not to have
/// processed it (refused, or above an HTTP/2 GOAWAY's last stream id), on a new connection, if
/// its body can be sent again.
async fn send(route: &Route, req: Request<ReqBody>) -> Result<Response<Incoming>, ProxyError> {
    let mut timing = Timing {
        start: Instant::now(),
        histogram: &route.metrics.upstream_seconds,
        sent: true,
    };
    let client = &route.client;
    // Only an HTTP/2 connection refuses or cuts unprocessed streams: an HTTP/1.1-only route
    // keeps no copy of each request for it.
    let again = if route.config.http2 {
        copy_if_resendable(&req)
    } else {
        None
    };
    let result = match (client.request(req).await, again) {
        (Err(e), Some(again)) if unprocessed(&e) => {
            tracing::debug!(route = %route.config.name, error = %e,
                "the upstream did not process the request; sending it again");
            client.request(again).await
        }
        (result, _) => result,
    };
    // The key counts as injected once the request went out: not when no connection could be
    // made (a name that does not resolve, a refused connection, a failed TLS handshake).
    match &result {
        Err(e) if e.is_connect() => timing.sent = false,
        _ => {
            route.metrics.injected.inc();
        }
    }
    result.map_err(|e| ProxyError::Unreachable(describe_client_error(&e)))
}

/// The upstream's response, relayed: hop-by-hop headers dropped, body streamed, framing
/// written anew by the app-facing side: one `Content-Length` at most, none beside a
/// `Transfer-Encoding`, and the app's own HTTP version. A status outside 100–599, or a `101`
/// nobody asked for (keyproxy never forwards `Upgrade`), is a 502.
fn respond(resp: Response<Incoming>, idle: Duration) -> Result<Response<RespBody>, ProxyError> {
    let status = resp.status().as_u16();
    if !(100..=599).contains(&status) || status == 101 {
        return Err(ProxyError::Unreachable(format!(
            "the upstream sent {}",
            if status == 101 {
                "101 Switching Protocols without being asked".to_owned()
            } else {
                format!("an invalid status code {status}")
            }
        )));
    }
    let (mut parts, body) = resp.into_parts();
    let transfer = parts.headers.contains_key(header::TRANSFER_ENCODING);
    strip_hop_by_hop(&mut parts.headers);
    if let header::Entry::Occupied(mut e) = parts.headers.entry(header::CONTENT_LENGTH) {
        // The client took repeated lengths (lines or a list) only if they agree: keep one value.
        // Beside `Transfer-Encoding` the length is meaningless (RFC 9112 §6.3) and goes.
        let digits = |v: &[u8]| !v.is_empty() && v.iter().all(u8::is_ascii_digit);
        let mut values = e.iter();
        let single = values.next().is_some_and(|v| digits(v.as_bytes())) && values.next().is_none();
        // The common case, one plain length, is left as it is: nothing to allocate.
        if transfer || !single {
            let first = e
                .get()
                .to_str()
                .ok()
                .and_then(|v| v.split(',').next())
                .map(str::trim)
                .filter(|v| digits(v.as_bytes()))
                .and_then(|v| HeaderValue::from_str(v).ok());
            match first {
                Some(v) if !transfer => {
                    e.insert(v);
                }
                _ => {
                    e.remove_entry_mult().1.for_each(drop);
                }
            }
        }
    }
    // hyper writes the app's own version; a response marked HTTP/2 would keep an HTTP/1.0 app's
    // keep-alive connection open without saying so.
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(parts, RespBody::idle(body, idle)))
}

/// A copy of `req` to send again, when its body is in memory.
fn copy_if_resendable(req: &Request<ReqBody>) -> Option<Request<ReqBody>> {
    let ReqBody::Full(body) = req.body() else {
        return None;
    };
    let mut copy = Request::new(ReqBody::Full(body.clone()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether the upstream certainly did not process the request: HTTP/2 `REFUSED_STREAM`, or a
/// stream cut by a graceful GOAWAY (`NO_ERROR`), which only reaches streams above the GOAWAY's
/// last stream id (RFC 9113 §6.8, §8.7).
fn unprocessed(e: &hyper_util::client::legacy::Error) -> bool {
    causes(e)
        .find_map(|err| err.downcast_ref::<h2::Error>())
        .is_some_and(|h2| {
            h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
        })
}

/// A client error with its causes (connection refused, TLS failure, ...); carries no headers.
fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    let head = match (e.is_connect(), is_tls_error(e)) {
        (true, true) => "TLS handshake with the upstream failed",
        (true, false) => "cannot connect",
        (false, _) => "the connection failed",
    };
    crate::error::with_causes(head.to_owned(), std::error::Error::source(e))
}

/// Whether a rustls error is in `e`'s chain. hyper-rustls wraps it in an `io::Error` inside
/// another `io::Error`, and `io::Error::source()` skips its payload, so payloads are searched too.
fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|err| {
        err.is::<rustls::Error>()
            || err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| is_tls_error(inner))
    })
}

/// `e` and its chain of sources.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |err| err.source())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::{fixture, Fixture};
    use bytes::Bytes;

    /// The fixture's `api` route (with `settings`) and the upstream request it makes of an app
    /// request to `uri` with `headers` and `body`.
    async fn rewritten(
        settings: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> (Fixture, Request<ReqBody>) {
        let f = fixture(settings).await;
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let route = f.route(0);
        let key = route.current().expect("key");
        let cred = route.slot.credential(&key).expect("credential");
        let out = rewrite(&route, b.body(body).expect("request"), 4, cred).expect("rewritten");
        (f, out)
    }

    #[tokio::test]
    async fn the_upstream_head_carries_the_key_and_only_end_to_end_headers() {
        let headers = [
            ("host", "localhost:8080"),
            ("authorization", "Bearer the-apps-own"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("content-length", "99"),
            ("x-end", "2"),
        ];
        let body = ReqBody::full(Bytes::from_static(b"hello"));
        let (f, out) = rewritten("", "/api/v1/x?q=1", &headers, body).await;
        assert_eq!(out.uri(), "http://127.0.0.1:1/v1/x?q=1");
        assert_eq!(out.version(), Version::HTTP_11);
        let h = out.headers();
        assert_eq!(h["authorization"], "Bearer k1");
        assert_eq!(h.get_all("authorization").iter().count(), 1);
        for gone in ["host", "connection", "x-hop", "content-length"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(h["x-end"], "2");
        // Counted when sent, not when written.
        assert_eq!(f.route(0).metrics.injected.get(), 0);
    }

    #[tokio::test]
    async fn a_query_credential_replaces_the_apps_own() {
        let settings = "query_param = \"key\"";
        let (_f, out) = rewritten(settings, "/api?key=mine&a=1", &[], ReqBody::empty()).await;
        let query = out.uri().query().expect("query");
        assert!(query.contains("key=k1") && query.contains("a=1"), "{query}");
        assert!(!query.contains("mine"), "{query}");
        assert_eq!(out.uri().path(), "/");
    }
}
