//! The request path: route → inject → forward → (401: refresh, replay once) → respond.
//!
//! [`Proxy::handle`] reads top to bottom as the request flows. Every failure becomes a
//! [`ProxyError`], turned into a response in one place ([`ProxyError::to_response`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::body::{ReqBody, RespBody};
use crate::cache::{Loaded, Slot};
use crate::config::{AppAuth, RouteConfig};
use crate::error::ProxyError;
use crate::forward::{self, strip_hop_by_hop, UpstreamClient};
use crate::h1::Pool;
use crate::inject::{set_query, Credential, Injection};
use crate::metrics::{Metrics, RouteMetrics};
use crate::retry;
use crate::route::{check_path, Router};

/// A route at run time: its settings, its credential slot, its metric handles.
#[derive(Debug)]
pub struct Route {
    /// The route's settings.
    pub config: RouteConfig,
    /// Where its credential is.
    pub slot: Slot,
    /// Its metric handles.
    pub metrics: RouteMetrics,
}

/// The app-facing service.
#[derive(Debug)]
pub struct Proxy {
    pub(crate) routes: Vec<Route>,
    pub(crate) router: Router,
    /// For routes with `http2 = true`: offers HTTP/2 and HTTP/1.1 by ALPN.
    client: UpstreamClient,
    /// For routes with `http2 = false`: HTTP/1.1 only.
    client_h1: UpstreamClient,
    metrics: Arc<Metrics>,
    pub(crate) app_auth: Option<AppAuth>,
    pub(crate) access_log: bool,
    /// Per route: the fast path's connection pool (plain-http upstreams only).
    pub(crate) pools: Vec<Option<Pool>>,
    pub(crate) connect_timeout: Duration,
}

/// What one request did, for the access log.
struct Outcome {
    route: Option<usize>,
    replayed: bool,
}

impl Proxy {
    /// Builds the service.
    pub fn new(
        routes: Vec<Route>,
        metrics: Arc<Metrics>,
        app_auth: Option<AppAuth>,
        access_log: bool,
        connect_timeout: Duration,
        tls: Arc<rustls::ClientConfig>,
    ) -> Proxy {
        let router = Router::new(&routes.iter().map(|r| r.config.clone()).collect::<Vec<_>>());
        let client = forward::client_with(connect_timeout, (*tls).clone(), true);
        let client_h1 = forward::client_with(connect_timeout, (*tls).clone(), false);
        // The fast path's HTTP/1.1 connections offer only HTTP/1.1 by ALPN.
        let mut fast_tls = (*tls).clone();
        fast_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let fast_tls = Arc::new(fast_tls);
        let pools = routes
            .iter()
            .map(|r| Pool::for_route(&r.config, &fast_tls))
            .collect();
        Proxy {
            routes,
            router,
            client,
            client_h1,
            metrics,
            app_auth,
            access_log,
            pools,
            connect_timeout,
        }
    }

    /// Answers one app request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<RespBody> {
        let start = Instant::now();
        // Kept for the log lines: cloning a `Method` or a `Uri` shares its bytes, no allocation.
        let method = req.method().clone();
        let uri = req.uri().clone();
        let path = uri.path();
        let mut outcome = Outcome {
            route: None,
            replayed: false,
        };
        let resp = match self.forward(req, &mut outcome).await {
            Ok(resp) => resp,
            Err(e) => {
                let route = outcome.route.map(|i| &self.routes[i]);
                match route {
                    Some(r) => r.metrics.error(e.kind()),
                    None => self.metrics.unrouted(e.status().as_u16(), e.kind()),
                }
                if !matches!(e, ProxyError::NoRoute { .. }) {
                    tracing::warn!(route = route.map(|r| r.config.name.as_str()).unwrap_or("-"),
                        method = %method, path = %path, kind = e.kind(), error = %e, "request failed");
                }
                e.to_response(route.map(|r| r.config.name.as_str()))
            }
        };
        let status = resp.status().as_u16();
        if let Some(i) = outcome.route {
            self.routes[i].metrics.answered(status);
        }
        if self.access_log {
            let route = outcome
                .route
                .map(|i| self.routes[i].config.name.as_str())
                .unwrap_or("-");
            tracing::info!(target: "keyproxy::access", route, method = %method, path = %path, status,
                latency_ms = start.elapsed().as_secs_f64() * 1000.0, replayed = outcome.replayed);
        }
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        outcome: &mut Outcome,
    ) -> Result<Response<RespBody>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        if let Some(auth) = &self.app_auth {
            let ok = req
                .headers()
                .get(&auth.header)
                .is_some_and(|v| bool::from(v.as_bytes().ct_eq(auth.token.expose().as_bytes())));
            if !ok {
                return Err(ProxyError::AppToken(auth.header.to_string()));
            }
        }

        check_host_count(&req)?;

        // 1. Route.
        let (route_index, strip) = self.route(&req)?;
        outcome.route = Some(route_index);
        let route = &self.routes[route_index];
        check_path(req.uri().path()).map_err(ProxyError::BadRequest)?;

        // 2. The key: one atomic load.
        let loaded = route.slot.entry.current().ok_or_else(|| {
            let status = route.slot.entry.status();
            ProxyError::NoKey(match status.error {
                Some(e) => e.to_string(),
                None => format!("secret {:?} is still being fetched", status.secret_id),
            })
        })?;

        // 3. The upstream request.
        // A request with both Content-Length and Transfer-Encoding never reaches this point as
        // such: hyper drops the Content-Length, reads the chunked framing, and closes the
        // connection after the answer (RFC 9112 §6.3). The upstream request is framed anew.
        let (mut parts, body) = req.into_parts();
        let query = parts.uri.query();
        let rest = &parts.uri.path()[strip..];
        let path_and_query = |cred: &Credential| -> Result<PathAndQuery, ProxyError> {
            let base = &route.config.upstream.base_path;
            let mut pq = String::with_capacity(base.len() + rest.len() + 64);
            pq.push_str(base);
            pq.push_str(rest);
            if pq.is_empty() {
                pq.push('/');
            }
            match (cred, &route.config.injection) {
                (Credential::Query(pair), Injection::Query { param, .. }) => {
                    pq.push('?');
                    pq.push_str(&set_query(query, param, pair));
                }
                _ => {
                    if let Some(q) = &query {
                        pq.push('?');
                        pq.push_str(q);
                    }
                }
            }
            PathAndQuery::try_from(pq)
                .map_err(|_| ProxyError::BadRequest("the request path cannot be forwarded".into()))
        };
        let mut headers = std::mem::take(&mut parts.headers);
        strip_hop_by_hop(&mut headers);
        if let Some(auth) = &self.app_auth {
            headers.remove(&auth.header);
        }
        route.config.injection.strip_header(&mut headers);
        // The upstream's authority goes in the URI only: over HTTP/1.1 the client writes it as
        // `Host`, over HTTP/2 as `:authority`, and never both (RFC 9113 §8.3.1; nginx answers a
        // request carrying both with 400).
        headers.remove(header::HOST);

        let replayable = route.config.retry_on_401;
        let prepared = if replayable {
            retry::prepare(body, route.config.max_replay_body)
                .await
                .map_err(|e| ProxyError::BadRequest(format!("reading the request body: {e}")))?
        } else if body.is_end_stream() {
            // No body: nothing to keep, and the request can be sent again as it is.
            retry::Prepared {
                body: ReqBody::empty(),
                replay: None,
            }
        } else {
            retry::Prepared {
                body: ReqBody::Stream(body),
                replay: None,
            }
        };
        if matches!(prepared.body, ReqBody::Full(_)) {
            // The body is in memory: its exact length is sent, whatever the app declared.
            headers.remove(header::CONTENT_LENGTH);
        }
        let replay_headers = prepared.replay.as_ref().map(|_| headers.clone());

        let cred = route
            .slot
            .credential(&loaded)
            .ok_or_else(|| ProxyError::NoKey("no credential rendered for this route".into()))?;
        let first = self.build(
            route,
            &parts.method,
            path_and_query(cred)?,
            headers,
            cred,
            prepared.body,
        )?;
        let resp = self.send(route, first).await?;

        // 4. 401: refresh once, replay once if the key changed.
        if resp.status() == StatusCode::UNAUTHORIZED {
            if let (Some(body), Some(headers)) = (prepared.replay, replay_headers) {
                if let Some(fresh) = self.fresher(route, &loaded).await {
                    if let Some(new_cred) = route.slot.credential(&fresh) {
                        drop(resp);
                        outcome.replayed = true;
                        route.metrics.replays_attempted.inc();
                        let again = self.build(
                            route,
                            &parts.method,
                            path_and_query(new_cred)?,
                            headers,
                            new_cred,
                            ReqBody::full(body),
                        )?;
                        let resp = self.send(route, again).await?;
                        if resp.status() != StatusCode::UNAUTHORIZED {
                            route.metrics.replays_succeeded.inc();
                        }
                        return Ok(respond(resp, route.config.idle_timeout));
                    }
                }
            }
        }
        Ok(respond(resp, route.config.idle_timeout))
    }

    /// The route for a request, and how many leading bytes of the path its prefix takes.
    fn route(&self, req: &Request<Incoming>) -> Result<(usize, usize), ProxyError> {
        let uri = req.uri();
        // Every HTTP/2 request has an `:authority`, which is its `Host` (RFC 9113 §8.3.1), not
        // a sign of forward mode: HTTP/2 apps are routed by path first, as HTTP/1.1 ones are.
        let h2 = req.version() == Version::HTTP_2;
        if let (Some(authority), false) = (uri.authority(), h2) {
            // Absolute-form (forward proxy mode): only a configured host.
            return match self.router.by_host(authority.as_str()) {
                Some(i) => Ok((i, 0)),
                None => Err(ProxyError::NoRoute {
                    what: format!("host {:?} (forward mode)", authority.host()),
                }),
            };
        }
        if let Some(m) = self.router.by_path(uri.path()) {
            return Ok((m.route, uri.path().len() - m.rest.len()));
        }
        let host = match uri.authority() {
            Some(a) if h2 => Some(a.as_str()),
            _ => req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok()),
        };
        if let Some(i) = host.and_then(|h| self.router.by_host(h)) {
            return Ok((i, 0));
        }
        Err(ProxyError::NoRoute {
            what: format!("{} {}", req.method(), uri.path()),
        })
    }

    /// The credentials to replay with, if newer than `seen` and different for this route.
    pub(crate) async fn fresher(&self, route: &Route, seen: &Arc<Loaded>) -> Option<Arc<Loaded>> {
        let fresh = route.slot.entry.refresh_now(seen).await?;
        let old = route.slot.credential(seen);
        let new = route.slot.credential(&fresh);
        if new.is_some() && new != old {
            Some(fresh)
        } else {
            tracing::debug!(route = %route.config.name, "401 with no newer key; passing it through");
            None
        }
    }

    fn build(
        &self,
        route: &Route,
        method: &Method,
        pq: PathAndQuery,
        mut headers: HeaderMap,
        cred: &Credential,
        body: ReqBody,
    ) -> Result<Request<ReqBody>, ProxyError> {
        let up = &route.config.upstream;
        let uri = Uri::builder()
            .scheme(up.scheme.clone())
            .authority(up.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| ProxyError::BadRequest(format!("cannot build the upstream URL: {e}")))?;
        if let (Credential::Header(v), Injection::Header { name, .. }) =
            (cred, &route.config.injection)
        {
            headers.insert(name.clone(), v.clone());
        }
        let mut req = Request::new(body);
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        route.metrics.injected.inc();
        Ok(req)
    }

    async fn send(
        &self,
        route: &Route,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let start = Instant::now();
        let timeout = route.config.timeout;
        let client = if route.config.http2 {
            &self.client
        } else {
            &self.client_h1
        };
        // A request the upstream is known not to have processed (refused, or above an HTTP/2
        // GOAWAY's last stream id) goes out once more, on a new connection, if its body can be
        // sent again.
        let again = copy_if_resendable(&req);
        let send = async {
            match (client.request(req).await, again) {
                (Err(e), Some(again)) if unprocessed(&e) => {
                    tracing::debug!(route = %route.config.name, error = %e,
                        "the upstream did not process the request; sending it again");
                    client.request(again).await
                }
                (result, _) => result,
            }
        };
        let result = tokio::time::timeout(timeout, send).await;
        route
            .metrics
            .upstream_seconds
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(ProxyError::Unreachable(describe_client_error(&e))),
            Err(_) => Err(ProxyError::Timeout(
                humantime::format_duration(timeout).to_string(),
            )),
        }
    }
}

/// The upstream's response, relayed: hop-by-hop headers dropped, body streamed, framing
/// written anew by the app-facing side (one `Content-Length` at most).
fn respond(resp: Response<Incoming>, idle: std::time::Duration) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The client accepted repeated `Content-Length` lines only if they agree: keep one.
    if let header::Entry::Occupied(mut e) = parts.headers.entry(header::CONTENT_LENGTH) {
        let first = e.get().clone();
        e.insert(first);
    }
    Response::from_parts(parts, RespBody::idle(body, idle))
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`; any request at most one.
fn check_host_count<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let hosts = req.headers().get_all(header::HOST).iter().count();
    match hosts {
        0 if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header".into(),
        )),
        0 | 1 => Ok(()),
        _ => Err(ProxyError::BadRequest(
            "the request has more than one Host header".into(),
        )),
    }
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
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        cur = err.source();
    }
    false
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
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        let payload = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if let Some(inner) = payload {
            if is_tls_error(inner) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
