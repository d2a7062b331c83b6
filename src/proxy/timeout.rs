//! Bounds each upstream exchange by the route's `timeout`, up to the response head: past it,
//! [`ProxyError::Timeout`] (504). The body that follows is bounded by `idle_timeout` instead
//! ([`crate::body`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::Outbound;
use crate::error::ProxyError;

/// Builds [`Timeout`] services.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeoutLayer;

/// Bounds each exchange by its route's `timeout`.
pub fn layer() -> TimeoutLayer {
    TimeoutLayer
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner }
    }
}

/// Fails an exchange that has no response head within its route's `timeout`.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    /// What makes the exchange.
    inner: S,
}

impl<S> Service<Outbound> for Timeout<S>
where
    S: Service<Outbound, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, out: Outbound) -> Self::Future {
        let limit = out.routed.route.config.timeout;
        TimeoutFuture {
            inner: tokio::time::timeout(limit, self.inner.call(out)),
            limit,
        }
    }
}

pin_project! {
    /// An exchange racing its route's `timeout`.
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        limit: Duration,
    }
}

impl<F, T> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match ready!(this.inner.poll(cx)) {
            Ok(result) => result,
            Err(_) => Err(ProxyError::Timeout(
                humantime::format_duration(*this.limit).to_string(),
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::{fixture, outbound};
    use http::Response;
    use tower::ServiceExt;

    /// An upstream that answers after `delay`.
    fn after(
        delay: Duration,
    ) -> impl Service<Outbound, Response = Response<()>, Error = ProxyError> {
        tower::service_fn(move |_: Outbound| async move {
            tokio::time::sleep(delay).await;
            Ok(Response::new(()))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_later_than_the_route_timeout_is_504() {
        let f = fixture("timeout = \"2s\"").await;
        let svc = layer().layer(after(Duration::from_secs(3)));
        let e = svc.oneshot(outbound(&f, "/api/x")).await.expect_err("late");
        assert_eq!(e.kind(), "upstream_timeout");
        assert_eq!(e.status(), 504);
        assert_eq!(e.to_string(), "upstream did not answer within 2s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_within_the_route_timeout_passes() {
        let f = fixture("timeout = \"2s\"").await;
        let svc = layer().layer(after(Duration::from_millis(1900)));
        svc.oneshot(outbound(&f, "/api/x")).await.expect("in time");
    }
}
