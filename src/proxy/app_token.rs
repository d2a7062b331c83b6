//! The app token check: with `[app_auth]` set, a request must carry the token in the configured
//! header (compared in constant time by [`app_token_ok`], the rule both engines apply), and the
//! header goes no further. The setting is read from the route table in force for each request, so
//! a reload that sets, changes or removes the token applies to the next request.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use super::{pass, refuse, Checked};
use crate::body::RespBody;
use crate::error::ProxyError;
use crate::route::app_token_ok;
use crate::routes::RouteTable;

/// Builds [`AppToken`] services.
#[derive(Clone, Debug)]
pub struct AppTokenLayer {
    /// Where the header and token required are (`app_auth`; `None`: no check).
    table: Arc<RouteTable>,
}

/// Requires the app token of the routes in force in `table` on every request, if they set one.
pub fn layer(table: Arc<RouteTable>) -> AppTokenLayer {
    AppTokenLayer { table }
}

impl<S> Layer<S> for AppTokenLayer {
    type Service = AppToken<S>;

    fn layer(&self, inner: S) -> AppToken<S> {
        AppToken {
            inner,
            table: self.table.clone(),
        }
    }
}

/// Answers a request without the right token with [`ProxyError::AppToken`] (403); removes the
/// token header from the others.
#[derive(Clone, Debug)]
pub struct AppToken<S> {
    /// The rest of the stack.
    inner: S,
    /// Where the header and token required are (`app_auth`; `None`: no check).
    table: Arc<RouteTable>,
}

impl<S, B> Service<Request<B>> for AppToken<S>
where
    S: Service<Request<B>, Response = Response<RespBody>, Error = ProxyError>,
{
    type Response = Response<RespBody>;
    type Error = ProxyError;
    type Future = Checked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let routes = self.table.peek();
        if let Some(auth) = &routes.app_auth {
            let sent = req.headers().get(&auth.header).map(|v| v.as_bytes());
            if !app_token_ok(auth, sent) {
                return refuse(ProxyError::AppToken(auth.header.to_string()));
            }
            req.headers_mut().remove(&auth.header);
        }
        pass(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::{app_auth, echo_headers, request, table_with, APP_TOKEN};
    use tower::ServiceExt;

    #[tokio::test]
    async fn wrong_or_missing_token_is_refused() {
        let svc = layer(table_with(Some(app_auth()))).layer(tower::service_fn(echo_headers));
        for headers in [
            &[][..],
            &[("x-app-token", "nope")],
            &[("x-app-token", "s3cre")],
        ] {
            let e = svc
                .clone()
                .oneshot(request("GET", "/x", headers))
                .await
                .expect_err("refused");
            assert_eq!(e.kind(), "app_token");
            assert_eq!(
                e.to_string(),
                "missing or wrong app token in header x-app-token"
            );
        }
    }

    #[tokio::test]
    async fn right_token_passes_and_is_not_forwarded() {
        let svc = layer(table_with(Some(app_auth()))).layer(tower::service_fn(echo_headers));
        let req = request("GET", "/x", &[("x-app-token", APP_TOKEN), ("x-other", "1")]);
        let resp = svc.oneshot(req).await.expect("passed");
        assert!(!resp.headers().contains_key("x-app-token"));
        assert_eq!(resp.headers()["x-other"], "1");
    }

    #[tokio::test]
    async fn no_app_auth_no_check() {
        let svc = layer(table_with(None)).layer(tower::service_fn(echo_headers));
        let req = request("GET", "/x", &[("x-app-token", "anything")]);
        let resp = svc.oneshot(req).await.expect("passed");
        assert_eq!(resp.headers()["x-app-token"], "anything");
    }
}
