//! The outermost layer: times each request, counts it in the metrics, writes the access log
//! line, and is the one place a [`ProxyError`] becomes a response ([`ProxyError::to_response`]).
//!
//! Inner layers report what they learned through an [`Outcome`] this layer puts in the
//! request's extensions: the route the request matched ([`super::routing`]), from the route
//! table the request was routed with, and whether it was replayed ([`super::replay`]). Whether
//! to write the access log line is read from the route table in force when the request ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response, Uri};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{pass, refuse, Checked, RouteRef};
use crate::body::RespBody;
use crate::error::ProxyError;
use crate::routes::{Route, RouteTable};

/// What the inner layers learned about one request, for its log line and metrics.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The matched route, once routed.
    route: OnceLock<RouteRef>,
    /// Set when the request was sent again after a 401.
    replayed: AtomicBool,
}

impl Outcome {
    /// Records the route the request matched.
    pub fn routed(&self, route: RouteRef) {
        let _ = self.route.set(route);
    }

    /// Records a 401 replay.
    pub fn replayed(&self) {
        self.replayed.store(true, Ordering::Relaxed);
    }

    /// The route the request matched, if it was routed.
    pub fn route(&self) -> Option<&Route> {
        self.route.get().map(|r| &**r)
    }

    /// Whether the request was replayed.
    pub fn was_replayed(&self) -> bool {
        self.replayed.load(Ordering::Relaxed)
    }
}

/// Builds [`Observe`] services.
#[derive(Clone, Debug)]
pub struct ObserveLayer {
    /// Where the metrics and the access log setting are.
    table: Arc<RouteTable>,
}

/// Observes the requests routed by `table`.
pub fn layer(table: Arc<RouteTable>) -> ObserveLayer {
    ObserveLayer { table }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            table: self.table.clone(),
            unready: None,
        }
    }
}

/// Times, counts and logs each request, and answers errors.
#[derive(Clone, Debug)]
pub struct Observe<S> {
    /// The rest of the stack.
    inner: S,
    /// Where the metrics and the access log setting are.
    table: Arc<RouteTable>,
    /// An error the inner service reported when polled for readiness, answered to the next
    /// request (the layers below are always ready; this keeps the error type `Infallible`).
    unready: Option<ProxyError>,
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<RespBody>, Error = ProxyError>,
{
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.unready.is_none() {
            if let Err(e) = ready!(self.inner.poll_ready(cx)) {
                self.unready = Some(e);
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let outcome = Arc::new(Outcome::default());
        // Kept for the log lines: cloning a `Method` or a `Uri` shares its bytes, no allocation.
        let method = req.method().clone();
        let uri = req.uri().clone();
        req.extensions_mut().insert(outcome.clone());
        let inner = match self.unready.take() {
            Some(e) => refuse(e),
            None => pass(self.inner.call(req)),
        };
        ObserveFuture {
            inner,
            start: Instant::now(),
            method,
            uri,
            outcome,
            table: self.table.clone(),
        }
    }
}

pin_project! {
    /// A request's answer, observed.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: Checked<F>,
        start: Instant,
        method: Method,
        uri: Uri,
        outcome: Arc<Outcome>,
        table: Arc<RouteTable>,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<RespBody>, ProxyError>>,
{
    type Output = Result<Response<RespBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let route = this.outcome.route();
        let routes = this.table.peek();
        let path = this.uri.path();
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                match route {
                    Some(r) => r.metrics.error(e.kind()),
                    None => routes.metrics.unrouted(e.status().as_u16(), e.kind()),
                }
                if !matches!(e, ProxyError::NoRoute { .. }) {
                    tracing::warn!(route = name(route), method = %this.method, path = %path,
                        kind = e.kind(), error = %e, "request failed");
                }
                e.to_response(route.map(|r| r.config.name.as_str()))
            }
        };
        let status = resp.status().as_u16();
        if let Some(r) = route {
            r.metrics.answered(status);
        }
        if routes.access_log {
            tracing::info!(target: "keyproxy::access", route = name(route), method = %this.method,
                path = %path, status, latency_ms = this.start.elapsed().as_secs_f64() * 1000.0,
                replayed = this.outcome.was_replayed());
        }
        Poll::Ready(Ok(resp))
    }
}

/// The route's name for a log line, `-` when none matched.
fn name(route: Option<&Route>) -> &str {
    route.map_or("-", |r| r.config.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::{body_text, fixture, request};
    use tower::ServiceExt;

    /// The answer of observe over an inner service that routes every request to `api` (when
    /// `routed`) and then fails with `e` or answers 200; and the metrics after it.
    async fn observed(routed: bool, e: Option<ProxyError>) -> (Response<RespBody>, String) {
        let f = fixture("").await;
        let api = f.route(0);
        let inner = tower::service_fn(move |req: Request<()>| {
            let e = e.clone();
            let api = api.clone();
            async move {
                match req.extensions().get::<Arc<Outcome>>() {
                    Some(o) if routed => o.routed(api.clone()),
                    _ => {}
                }
                match e {
                    Some(e) => Err(e),
                    None => Ok(Response::new(RespBody::empty())),
                }
            }
        });
        let svc = layer(f.table.clone()).layer(inner);
        let Ok(resp) = svc.oneshot(request("GET", "/api/x", &[])).await;
        (resp, f.routes.metrics.encode())
    }

    async fn json(resp: Response<RespBody>) -> serde_json::Value {
        serde_json::from_str(&body_text(resp.into_body()).await).expect("json")
    }

    #[tokio::test]
    async fn an_error_becomes_its_response_and_is_counted_on_its_route() {
        let (resp, metrics) = observed(true, Some(ProxyError::NoKey("x".into()))).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[crate::error::ERROR_HEADER], "no_key");
        assert_eq!(json(resp).await["route"], "api");
        assert!(metrics.contains(r#"keyproxy_proxy_errors_total{route="api",kind="no_key"} 1"#));
        assert!(metrics.contains(r#"keyproxy_requests_total{route="api",status="5xx"} 1"#));
    }

    #[tokio::test]
    async fn an_unrouted_error_is_counted_as_none() {
        let e = ProxyError::NoRoute {
            what: "GET /x".into(),
        };
        let (resp, metrics) = observed(false, Some(e)).await;
        assert_eq!(resp.status(), 404);
        assert_eq!(json(resp).await["route"], serde_json::Value::Null);
        assert!(metrics.contains(r#"keyproxy_proxy_errors_total{route="none",kind="no_route"} 1"#));
        assert!(metrics.contains(r#"keyproxy_requests_total{route="none",status="4xx"} 1"#));
    }

    #[tokio::test]
    async fn an_answer_passes_and_is_counted() {
        let (resp, metrics) = observed(true, None).await;
        assert_eq!(resp.status(), 200);
        assert!(metrics.contains(r#"keyproxy_requests_total{route="api",status="2xx"} 1"#));
    }
}
