//! The general engine: the request path as a `tower` stack of small layers, built in [`stack`].
//!
//! Every request the HTTP/1.1 engine does not take (HTTP/2, `Transfer-Encoding`, `https`
//! upstreams with `http2 = true`, anything odd) flows through these layers, outer to inner:
//!
//! - [`observe`]: timing, per-route metrics, the access log line, and the one place a
//!   [`ProxyError`] becomes a response (as linkerd2-proxy's `ServerRescue`).
//! - [`refuse_connect`]: `CONNECT` is refused (no key can go inside a tunnel).
//! - [`app_token`]: the app token check, constant-time; the token is not forwarded.
//! - [`overload`]: at most `max_connections` requests in flight; over it, 503 at once.
//! - [`routing`]: `Host` count, route match, path checks; the request becomes a [`Routed`].
//! - [`replay`]: the key, the body kept for a 401 replay, and the replay itself.
//! - [`timeout`]: the route's `timeout` for each upstream exchange.
//! - [`upstream`]: inject, rewrite, send with the route's client, relay the answer.
//!
//! Each layer answers with `Result<Response<RespBody>, ProxyError>` until [`observe`] turns
//! errors into responses; its own error type is `Infallible`.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::ops::Deref;
use std::sync::Arc;

use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};

use crate::body::{ReqBody, RespBody};
use crate::cache::Loaded;
use crate::error::ProxyError;
use crate::routes::{Route, RouteTable, Routes};

pub mod app_token;
pub mod observe;
pub mod overload;
pub mod refuse_connect;
pub mod replay;
pub mod routing;
pub mod timeout;
pub mod upstream;

#[cfg(test)]
mod test_support;

/// The general engine over the routes in force in `table` (read once per request, so a reload
/// reaches every connection's next request), outer layer first. Build it once and clone it per
/// connection: the in-flight limit (`max_in_flight`, the config's `max_connections`) is shared
/// by every clone.
pub fn stack(
    table: Arc<RouteTable>,
    max_in_flight: usize,
) -> impl Service<
    Request<Incoming>,
    Response = Response<RespBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<RespBody>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .layer(observe::layer(table.clone()))
        .layer(refuse_connect::layer())
        .layer(app_token::layer(table.clone()))
        .layer(overload::layer(max_in_flight))
        .layer(routing::layer(table))
        .layer(replay::layer())
        .layer(timeout::layer())
        .service(upstream::Upstream)
}

/// The route a request matched: the table it was matched in and an index in it, so inner layers
/// reach the route without a lookup that could fail, and a reload meanwhile changes nothing
/// for this request.
#[derive(Clone, Debug)]
pub struct RouteRef {
    /// Every route.
    routes: Arc<Routes>,
    /// This one's index in [`Routes::list`].
    index: usize,
}

impl RouteRef {
    /// The route at `index` (an index the router returned).
    fn new(routes: Arc<Routes>, index: usize) -> RouteRef {
        RouteRef { routes, index }
    }
}

impl Deref for RouteRef {
    type Target = Route;

    fn deref(&self) -> &Route {
        &self.routes.list[self.index]
    }
}

/// A request that matched a route: what [`routing`] hands to the inner layers.
#[derive(Debug)]
pub struct Routed<B> {
    /// The app's request.
    pub req: Request<B>,
    /// Its route.
    pub route: RouteRef,
    /// How many leading bytes of the path the route's prefix takes (not sent upstream).
    pub strip: usize,
}

/// A routed request ready to go upstream: its body is what will be sent, and `key` holds the
/// credentials to inject (from [`replay`]).
#[derive(Debug)]
pub struct Outbound {
    /// The request, its route and prefix length.
    pub routed: Routed<ReqBody>,
    /// The route's credentials for this attempt.
    pub key: Arc<Loaded>,
}

/// The future of a layer that either refuses a request at once or passes it on.
pub type Checked<F> = Either<Ready<Result<Response<RespBody>, ProxyError>>, F>;

/// Refuses a request with `e`, without calling the inner service.
pub fn refuse<F>(e: ProxyError) -> Checked<F> {
    Either::Left(ready(Err(e)))
}

/// Passes a request on to the inner service's future.
pub fn pass<F>(f: F) -> Checked<F> {
    Either::Right(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::{fixture, over_h1, APP_TOKEN};
    use tower::ServiceExt;

    /// The status and error kind of `method uri` (with the app token if `token`) through the whole
    /// stack over the fixture's routes; the `api` route's upstream refuses connections.
    async fn through_stack(method: &str, uri: &str, token: bool) -> (u16, String) {
        let f = fixture("").await;
        let svc = stack(f.table.clone(), 8);
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "localhost");
        if token {
            req = req.header("x-app-token", APP_TOKEN);
        }
        let req = req.body(String::new()).expect("request");
        let resp = over_h1(req, move |req| {
            let svc = svc.clone();
            async move {
                let Ok(resp) = svc.oneshot(req).await;
                resp
            }
        })
        .await;
        let kind = resp.headers().get(crate::error::ERROR_HEADER);
        let kind = kind.map_or("-", |v| v.to_str().unwrap_or("?")).to_owned();
        (resp.status().as_u16(), kind)
    }

    #[tokio::test]
    async fn the_checks_come_in_order() {
        let cases = [
            (
                "CONNECT",
                "api.example.test:443",
                false,
                405,
                "connect_not_supported",
            ),
            ("GET", "/nowhere", false, 403, "app_token"),
            ("GET", "/nowhere", true, 404, "no_route"),
            ("GET", "/api/..;/admin", true, 400, "bad_request"),
            ("GET", "/api/x", true, 502, "upstream_unreachable"),
        ];
        for (method, uri, token, status, kind) in cases {
            let got = through_stack(method, uri, token).await;
            assert_eq!(
                got,
                (status, kind.to_owned()),
                "{method} {uri} token: {token}"
            );
        }
    }
}
