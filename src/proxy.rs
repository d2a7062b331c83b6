//! The request path: route → inject → forward → (401: refresh, replay once) → respond.
//!
//! [`Proxy::handle`] reads top to bottom as the request flows. Every failure becomes a
//! [`ProxyError`], turned into a response in one place ([`ProxyError::to_response`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::body::{ReqBody, RespBody};
use crate::cache::{Loaded, Slot};
use crate::config::{AppAuth, RouteConfig};
use crate::error::ProxyError;
use crate::forward::{strip_hop_by_hop, UpstreamClient};
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
    client: UpstreamClient,
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
        client: UpstreamClient,
        metrics: Arc<Metrics>,
        app_auth: Option<AppAuth>,
        access_log: bool,
        connect_timeout: Duration,
        tls: Arc<rustls::ClientConfig>,
    ) -> Proxy {
        let router = Router::new(&routes.iter().map(|r| r.config.clone()).collect::<Vec<_>>());
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
        headers.insert(header::HOST, route.config.upstream.host_header.clone());

        let replayable = route.config.retry_on_401;
        let prepared = if replayable {
            retry::prepare(body, route.config.max_replay_body)
                .await
                .map_err(|e| ProxyError::BadRequest(format!("reading the request body: {e}")))?
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
        if let Some(authority) = uri.authority() {
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
        if let Some(host) = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            if let Some(i) = self.router.by_host(host) {
                return Ok((i, 0));
            }
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
        let result = tokio::time::timeout(timeout, self.client.request(req)).await;
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

/// The upstream's response, relayed: hop-by-hop headers dropped, body streamed.
fn respond(resp: Response<Incoming>, idle: std::time::Duration) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, RespBody::idle(body, idle))
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
