//! The app token check: with `[app_auth]` set, a request must carry the token in the configured
//! header (compared in constant time by [`app_token_ok`], the rule both engines apply), and the
//! header goes no further.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use super::{pass, refuse, Checked};
use crate::body::RespBody;
use crate::config::AppAuth;
use crate::error::ProxyError;
use crate::route::app_token_ok;

/// Builds [`AppToken`] services.
#[derive(Clone, Debug)]
pub struct AppTokenLayer {
    /// The header and token required; `None`: no check.
    auth: Option<Arc<AppAuth>>,
}

/// Requires `auth`'s token on every request, if set.
pub fn layer(auth: Option<AppAuth>) -> AppTokenLayer {
    AppTokenLayer {
        auth: auth.map(Arc::new),
    }
}

impl<S> Layer<S> for AppTokenLayer {
    type Service = AppToken<S>;

    fn layer(&self, inner: S) -> AppToken<S> {
        AppToken {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// Answers a request without the right token with [`ProxyError::AppToken`] (403); removes the
/// token header from the others.
#[derive(Clone, Debug)]
pub struct AppToken<S> {
    /// The rest of the stack.
    inner: S,
    /// The header and token required; `None`: no check.
    auth: Option<Arc<AppAuth>>,
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
        if let Some(auth) = &self.auth {
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
    use crate::proxy::test_support::{app_auth, echo_headers, request, APP_TOKEN};
    use tower::ServiceExt;

    #[tokio::test]
    async fn wrong_or_missing_token_is_refused() {
        let svc = layer(Some(app_auth())).layer(tower::service_fn(echo_headers));
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
        let svc = layer(Some(app_auth())).layer(tower::service_fn(echo_headers));
        let req = request("GET", "/x", &[("x-app-token", APP_TOKEN), ("x-other", "1")]);
        let resp = svc.oneshot(req).await.expect("passed");
        assert!(!resp.headers().contains_key("x-app-token"));
        assert_eq!(resp.headers()["x-other"], "1");
    }

    #[tokio::test]
    async fn no_app_auth_no_check() {
        let svc = layer(None).layer(tower::service_fn(echo_headers));
        let req = request("GET", "/x", &[("x-app-token", "anything")]);
        let resp = svc.oneshot(req).await.expect("passed");
        assert_eq!(resp.headers()["x-app-token"], "anything");
    }
}
