//! Request → route, fail closed: checks `Host` (one, and a host), matches a route (reverse mode by path
//! prefix, forward mode by host) in the route table in force when the request arrives, checks the
//! path and the route's `allow` list, and hands the inner layers a [`Routed`] request, which
//! keeps that table until it ends. No match: [`ProxyError::NoRoute`] (404); not in the allow
//! list: [`ProxyError::NotAllowed`] (403); nothing forwarded either way.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::header;
use http::{Request, Response, Version};
use tower::{Layer, Service};

use super::observe::Outcome;
use super::{pass, refuse, Checked, RouteRef, Routed};
use crate::body::RespBody;
use crate::error::ProxyError;
use crate::route::{allowed, check_path, host_rule, host_value_ok};
use crate::routes::{RouteTable, Routes};

/// Builds [`Routing`] services.
#[derive(Clone, Debug)]
pub struct RoutingLayer {
    /// The routes in force.
    table: Arc<RouteTable>,
}

/// Routes requests to the routes in force in `table`.
pub fn layer(table: Arc<RouteTable>) -> RoutingLayer {
    RoutingLayer { table }
}

impl<S> Layer<S> for RoutingLayer {
    type Service = Routing<S>;

    fn layer(&self, inner: S) -> Routing<S> {
        Routing {
            inner,
            table: self.table.clone(),
        }
    }
}

/// Finds each request's route and passes it on as a [`Routed`] request.
#[derive(Clone, Debug)]
pub struct Routing<S> {
    /// The layers that serve a routed request.
    inner: S,
    /// The routes in force.
    table: Arc<RouteTable>,
}

impl<S, B> Service<Request<B>> for Routing<S>
where
    S: Service<Routed<B>, Response = Response<RespBody>, Error = ProxyError>,
{
    type Response = Response<RespBody>;
    type Error = ProxyError;
    type Future = Checked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Err(e) = check_host(&req) {
            return refuse(e);
        }
        let routes = self.table.current();
        let (index, strip) = match find(&routes, &req) {
            Ok(found) => found,
            Err(e) => return refuse(e),
        };
        let route = RouteRef::new(routes, index);
        if let Some(outcome) = req.extensions().get::<Arc<Outcome>>() {
            outcome.routed(route.clone());
        }
        let path = req.uri().path();
        if let Err(e) = check_path(path) {
            return refuse(ProxyError::BadRequest(e));
        }
        let rest = path.get(strip..).unwrap_or_default();
        if !allowed(&route.config, req.method().as_str(), rest) {
            return refuse(ProxyError::not_allowed(req.method().as_str(), rest));
        }
        pass(self.inner.call(Routed { req, route, strip }))
    }
}

/// The `Host` rules both engines apply ([`host_rule`], [`host_value_ok`]): exactly one `Host`
/// on an HTTP/1.1 request, at most one on any other, and its value a host.
fn check_host<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let hosts = req.headers().get_all(header::HOST);
    host_rule(req.version() == Version::HTTP_11, hosts.iter().count())
        .map_err(|e| ProxyError::BadRequest(e.into()))?;
    if hosts.iter().any(|v| !host_value_ok(v.as_bytes())) {
        return Err(ProxyError::BadRequest(
            "the Host header is not a host (one host name or address, and a port)".into(),
        ));
    }
    Ok(())
}

/// The route for a request, and how many leading bytes of the path its prefix takes.
fn find<B>(routes: &Routes, req: &Request<B>) -> Result<(usize, usize), ProxyError> {
    let uri = req.uri();
    // Every HTTP/2 request has an `:authority`, which is its `Host` (RFC 9113 §8.3.1), not
    // a sign of forward mode: HTTP/2 apps are routed by path first, as HTTP/1.1 ones are.
    let h2 = req.version() == Version::HTTP_2;
    if let (Some(authority), false) = (uri.authority(), h2) {
        // Absolute-form (forward proxy mode): only a configured host.
        return match routes.router.by_host(authority.as_str()) {
            Some(i) => Ok((i, 0)),
            None => Err(ProxyError::NoRoute {
                what: format!("host {:?} (forward mode)", authority.host()),
            }),
        };
    }
    if let Some(m) = routes.router.by_path(uri.path()) {
        return Ok((m.route, uri.path().len() - m.rest.len()));
    }
    let host = match uri.authority() {
        Some(a) if h2 => Some(a.as_str()),
        _ => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok()),
    };
    if let Some(i) = host.and_then(|h| routes.router.by_host(h)) {
        return Ok((i, 0));
    }
    Err(ProxyError::NoRoute {
        what: format!("{} {}", req.method(), uri.path()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::{fixture, request};
    use tower::ServiceExt;

    /// An inner service that answers with the route's name and the stripped path.
    async fn answer(routed: Routed<()>) -> Result<Response<RespBody>, ProxyError> {
        let rest = &routed.req.uri().path()[routed.strip..];
        let text = format!("{} {rest}", routed.route.config.name);
        Ok(Response::new(RespBody::full(text.into())))
    }

    async fn route_of(req: Request<()>) -> Result<String, ProxyError> {
        let f = fixture("").await;
        let resp = layer(f.table.clone())
            .layer(tower::service_fn(answer))
            .oneshot(req)
            .await?;
        Ok(crate::proxy::test_support::body_text(resp).await)
    }

    #[tokio::test]
    async fn reverse_mode_by_prefix_and_forward_mode_by_host() {
        let by_path = request("GET", "/api/v1/x?q=1", &[("host", "localhost")]);
        assert_eq!(route_of(by_path).await.expect("routed"), "api /v1/x");
        let absolute = request("GET", "http://maps.example.com/y", &[("host", "x")]);
        assert_eq!(route_of(absolute).await.expect("routed"), "maps /y");
        let by_host = request("GET", "/y", &[("host", "maps.example.com")]);
        assert_eq!(route_of(by_host).await.expect("routed"), "maps /y");
    }

    #[tokio::test]
    async fn http2_authority_is_the_host_not_forward_mode() {
        let mut req = request("GET", "http://localhost:8080/api/z", &[]);
        *req.version_mut() = Version::HTTP_2;
        assert_eq!(route_of(req).await.expect("routed"), "api /z");
        let mut req = request("GET", "http://maps.example.com/z", &[]);
        *req.version_mut() = Version::HTTP_2;
        assert_eq!(route_of(req).await.expect("routed"), "maps /z");
    }

    #[tokio::test]
    async fn refusals() {
        let cases = [
            (request("GET", "/nowhere", &[("host", "x")]), "no_route"),
            (
                request("GET", "http://evil.example.com/", &[("host", "x")]),
                "no_route",
            ),
            (request("GET", "/api/x", &[]), "bad_request"),
            (
                request("GET", "/api/x", &[("host", "a"), ("host", "b")]),
                "bad_request",
            ),
            (request("GET", "/api/x", &[("host", "a, b")]), "bad_request"),
            (
                request("GET", "/api/x", &[("host", "user@a")]),
                "bad_request",
            ),
            (
                request("GET", "/api/../admin", &[("host", "x")]),
                "bad_request",
            ),
        ];
        for (req, kind) in cases {
            let what = format!("{} {:?}", req.uri(), req.headers());
            let e = route_of(req).await.expect_err(&what);
            assert_eq!(e.kind(), kind, "{what}");
        }
    }

    #[tokio::test]
    async fn the_allow_list_is_checked_on_the_path_below_the_prefix_or_the_whole_path() {
        let f = fixture("allow = [\"GET /v1/*\"]").await;
        let svc = layer(f.table.clone()).layer(tower::service_fn(answer));
        let ok = request("GET", "/api/v1/x?q=/admin", &[("host", "x")]);
        let resp = svc.clone().oneshot(ok).await.expect("allowed");
        assert_eq!(
            crate::proxy::test_support::body_text(resp).await,
            "api /v1/x"
        );
        for (m, uri) in [
            ("POST", "/api/v1/x"),
            ("GET", "/api/v1/x/y"),
            ("GET", "/api/v1/a%2Fb"),
            ("GET", "/api/v2/x"),
        ] {
            let e = svc
                .clone()
                .oneshot(request(m, uri, &[("host", "x")]))
                .await
                .expect_err(uri);
            assert_eq!(e.kind(), "not_allowed", "{m} {uri}");
            assert_eq!(e.status(), 403);
            let path = uri.trim_start_matches("/api");
            assert_eq!(
                e.to_string(),
                format!("the route's allow list does not permit {m} {path}")
            );
        }
    }

    #[tokio::test]
    async fn the_route_is_recorded_for_observe_even_when_the_path_is_refused() {
        let f = fixture("").await;
        let outcome = Arc::new(Outcome::default());
        let mut req = request("GET", "/api/%2e%2e/admin", &[("host", "x")]);
        req.extensions_mut().insert(outcome.clone());
        let svc = layer(f.table.clone()).layer(tower::service_fn(answer));
        let e = svc.oneshot(req).await.expect_err("refused");
        assert_eq!(e.kind(), "bad_request");
        assert_eq!(outcome.route().map(|r| r.config.name.as_str()), Some("api"));
    }
}
