//! Refuses `CONNECT` (405): keyproxy cannot add a key inside an end-to-end TLS tunnel. Checked
//! before anything else, so an app set up with `HTTPS_PROXY` learns that first.

use std::task::{Context, Poll};

use http::{Method, Request, Response};
use tower::{Layer, Service};

use super::{pass, refuse, Checked};
use crate::body::RespBody;
use crate::error::ProxyError;

/// Builds [`RefuseConnect`] services.
#[derive(Clone, Copy, Debug, Default)]
pub struct RefuseConnectLayer;

/// Refuses `CONNECT`.
pub fn layer() -> RefuseConnectLayer {
    RefuseConnectLayer
}

impl<S> Layer<S> for RefuseConnectLayer {
    type Service = RefuseConnect<S>;

    fn layer(&self, inner: S) -> RefuseConnect<S> {
        RefuseConnect { inner }
    }
}

/// Answers `CONNECT` with [`ProxyError::Connect`]; passes every other method on.
#[derive(Clone, Debug)]
pub struct RefuseConnect<S> {
    /// The rest of the stack.
    inner: S,
}

impl<S, B> Service<Request<B>> for RefuseConnect<S>
where
    S: Service<Request<B>, Response = Response<RespBody>, Error = ProxyError>,
{
    type Response = Response<RespBody>;
    type Error = ProxyError;
    type Future = Checked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.method() == Method::CONNECT {
            return refuse(ProxyError::Connect);
        }
        pass(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::{ok, request};
    use tower::ServiceExt;

    #[tokio::test]
    async fn connect_is_refused_and_other_methods_pass() {
        let svc = layer().layer(tower::service_fn(ok));
        let connect = request("CONNECT", "api.example.test:443", &[]);
        let e = svc.clone().oneshot(connect).await.expect_err("refused");
        assert_eq!(e.kind(), "connect_not_supported");
        let get = request("GET", "/x", &[]);
        assert_eq!(svc.oneshot(get).await.expect("passed").status(), 200);
    }
}
