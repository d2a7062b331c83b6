//! Bounds the requests in flight on the general engine. `max_connections` bounds app
//! connections, but an HTTP/2 app multiplexes many requests on one: this layer bounds those too,
//! with the same number. A request over the limit is answered [`ProxyError::Overloaded`] (503)
//! at once rather than queued, so a burst cannot pile up memory or latency behind it.
//!
//! A request counts from when it reaches this layer until its response head is ready (as
//! tower's `ConcurrencyLimit`): a response body streaming afterwards no longer counts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use super::{pass, refuse, Checked};
use crate::body::RespBody;
use crate::error::ProxyError;

/// Builds [`Overload`] services that share one limit.
#[derive(Clone, Debug)]
pub struct OverloadLayer {
    /// One permit per request in flight, shared by every service this layer builds.
    permits: Arc<Semaphore>,
}

/// At most `max` requests in flight across every service the layer builds.
pub fn layer(max: usize) -> OverloadLayer {
    OverloadLayer {
        permits: Arc::new(Semaphore::new(max)),
    }
}

impl<S> Layer<S> for OverloadLayer {
    type Service = Overload<S>;

    fn layer(&self, inner: S) -> Overload<S> {
        Overload {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// Passes a request on while a permit is free; answers [`ProxyError::Overloaded`] otherwise.
#[derive(Clone, Debug)]
pub struct Overload<S> {
    /// The rest of the stack.
    inner: S,
    /// One permit per request in flight.
    permits: Arc<Semaphore>,
}

impl<S, B> Service<Request<B>> for Overload<S>
where
    S: Service<Request<B>, Response = Response<RespBody>, Error = ProxyError>,
{
    type Response = Response<RespBody>;
    type Error = ProxyError;
    type Future = Checked<Permitted<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => pass(Permitted {
                inner: self.inner.call(req),
                _permit: permit,
            }),
            Err(_) => refuse(ProxyError::Overloaded),
        }
    }
}

pin_project! {
    /// The inner future, holding its request's permit until it completes.
    pub struct Permitted<F> {
        #[pin]
        inner: F,
        _permit: OwnedSemaphorePermit,
    }
}

impl<F: Future> Future for Permitted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::{ok, request};
    use tokio::sync::oneshot;
    use tower::ServiceExt;

    #[tokio::test]
    async fn over_the_limit_is_refused_at_once_and_freed_when_answered() {
        // The first request to reach the inner service waits until released.
        let (started, has_started) = oneshot::channel::<()>();
        let (release, released) = oneshot::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(Some((started, released))));
        let inner = tower::service_fn(move |req: Request<()>| {
            let gate = gate.lock().expect("lock").take();
            async move {
                if let Some((started, released)) = gate {
                    let _ = started.send(());
                    let _ = released.await;
                }
                ok(req).await
            }
        });
        let layer = layer(1);
        // Two services from one layer, as for two connections: they share the limit.
        let (a, b) = (layer.layer(inner.clone()), layer.layer(inner));
        let first = tokio::spawn(a.oneshot(request("GET", "/slow", &[])));
        has_started.await.expect("first request in flight");
        let e = b
            .clone()
            .oneshot(request("GET", "/x", &[]))
            .await
            .expect_err("over the limit");
        assert_eq!(e.kind(), "overloaded");
        assert_eq!(e.status(), 503);
        let _ = release.send(());
        assert_eq!(first.await.expect("join").expect("first").status(), 200);
        let again = b.oneshot(request("GET", "/x", &[])).await;
        assert_eq!(again.expect("the permit is back").status(), 200);
    }
}
