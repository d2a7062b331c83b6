//! The 401 replay. Takes the route's key (one atomic load), keeps the request body in memory
//! when it fits `max_replay_body` ([`crate::retry`]), and sends the request on. When the
//! upstream answers 401, asks the route for fresher credentials ([`Route::fresher`]) and, if
//! there are, sends the request once more with them. Never more than once.
//!
//! [`Route::fresher`]: crate::routes::Route::fresher

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;
use tower::{Layer, Service, ServiceExt};

use super::observe::Outcome;
use super::{Outbound, Routed};
use crate::body::{ReqBody, RespBody};
use crate::error::ProxyError;
use crate::retry::{self, Prepared};
use crate::routes::Route;

/// Builds [`Replay`] services.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplayLayer;

/// Replays a request once after a 401 when a fresher key is had.
pub fn layer() -> ReplayLayer {
    ReplayLayer
}

impl<S> Layer<S> for ReplayLayer {
    type Service = Replay<S>;

    fn layer(&self, inner: S) -> Replay<S> {
        Replay { inner }
    }
}

/// Sends a routed request upstream with the route's key, and once more after a 401 if the key
/// changed.
#[derive(Clone, Debug)]
pub struct Replay<S> {
    /// What sends one attempt upstream.
    inner: S,
}

impl<S> Service<Routed<Incoming>> for Replay<S>
where
    S: Service<Outbound, Response = Response<RespBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<RespBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<RespBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed<Incoming>) -> Self::Future {
        // The clone that was polled ready serves the first attempt.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(attempts(inner, routed))
    }
}

/// The first attempt, and the replay when a 401 calls for one.
async fn attempts<S>(
    mut inner: S,
    routed: Routed<Incoming>,
) -> Result<Response<RespBody>, ProxyError>
where
    S: Service<Outbound, Response = Response<RespBody>, Error = ProxyError>,
{
    let Routed { req, route, strip } = routed;
    let key = route.current()?;
    let (parts, body) = req.into_parts();
    let prepared = keep(&route, body).await?;
    // What a replay sends: the same head (rewritten again by the upstream layer).
    let again = prepared.replay.map(|body| {
        let mut copy = Request::new(ReqBody::full(body));
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        copy
    });
    let outcome = parts.extensions.get::<Arc<Outcome>>().cloned();
    let first = Outbound {
        routed: Routed {
            req: Request::from_parts(parts, prepared.body),
            route: route.clone(),
            strip,
        },
        key: key.clone(),
    };
    let resp = inner.call(first).await?;
    if resp.status() != StatusCode::UNAUTHORIZED {
        return Ok(resp);
    }
    let Some(again) = again else {
        return Ok(resp);
    };
    let Some(fresh) = route.fresher(&key).await else {
        return Ok(resp);
    };
    drop(resp);
    if let Some(outcome) = outcome {
        outcome.replayed();
    }
    route.metrics.replays_attempted.inc();
    let replay = Outbound {
        routed: Routed {
            req: again,
            route: route.clone(),
            strip,
        },
        key: fresh,
    };
    let resp = inner.ready().await?.call(replay).await?;
    if resp.status() != StatusCode::UNAUTHORIZED {
        route.metrics.replays_succeeded.inc();
    }
    Ok(resp)
}

/// The body to send first, and a copy for a replay when the route replays and it fits the cap.
async fn keep(route: &Route, body: Incoming) -> Result<Prepared, ProxyError> {
    if route.config.retry_on_401 {
        retry::prepare(body, route.config.max_replay_body)
            .await
            .map_err(|e| ProxyError::BadRequest(format!("reading the request body: {e}")))
    } else if body.is_end_stream() {
        // No body: nothing to keep, and the request can be sent again as it is.
        Ok(Prepared {
            body: ReqBody::empty(),
            replay: None,
        })
    } else {
        Ok(Prepared {
            body: ReqBody::Stream(body),
            replay: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::{body_text, fixture, over_h1};
    use bytes::Bytes;
    use std::sync::Mutex;

    /// What the stand-in upstream received: (credential, body) per attempt.
    type Seen = Arc<Mutex<Vec<(String, String)>>>;

    /// A stand-in upstream that answers 200 to the credential `good`, 401 to any other.
    fn upstream(
        good: &'static str,
        seen: Seen,
    ) -> impl Service<Outbound, Response = Response<RespBody>, Error = ProxyError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        tower::service_fn(move |out: Outbound| {
            let seen = seen.clone();
            async move {
                let cred = match out
                    .routed
                    .route
                    .slot
                    .credential(&out.key)
                    .and_then(|c| c.headers().first())
                {
                    Some((_, v)) => v.to_str().unwrap_or("?").to_owned(),
                    None => "?".to_owned(),
                };
                let body = body_text(out.routed.req.into_body()).await;
                let ok = cred == good;
                seen.lock().expect("lock").push((cred, body));
                let mut resp = Response::new(RespBody::empty());
                if !ok {
                    *resp.status_mut() = StatusCode::UNAUTHORIZED;
                }
                Ok(resp)
            }
        })
    }

    /// What one request through the replay layer came to.
    struct Run {
        /// The status the app got.
        status: u16,
        /// What the upstream received: (credential, body) per attempt.
        attempts: Vec<(String, String)>,
        /// (replays attempted, replays succeeded).
        counts: (u64, u64),
    }

    /// POSTs `body` to the `api` route (with `settings`) through the replay layer, over an
    /// upstream that accepts only the credential `good`; the secret holds `k1` at first, and
    /// `rotated` (if any) by the time of the 401.
    async fn run(settings: &str, rotated: Option<&str>, good: &'static str, body: &str) -> Run {
        let f = fixture(settings).await;
        if let Some(key) = rotated {
            f.source.set(key);
        }
        let seen = Seen::default();
        let svc = layer().layer(upstream(good, seen.clone()));
        let route = f.route(0);
        let req = Request::post("/api/x")
            .header("host", "localhost")
            .body(body.to_owned())
            .expect("request");
        let resp: Response<Bytes> = over_h1(req, move |req| {
            let (svc, route) = (svc.clone(), route.clone());
            async move {
                let routed = Routed {
                    req,
                    route,
                    strip: 4,
                };
                svc.oneshot(routed)
                    .await
                    .unwrap_or_else(|e| e.to_response(None))
            }
        })
        .await;
        let m = &f.route(0).metrics;
        let attempts = seen.lock().expect("lock").clone();
        Run {
            status: resp.status().as_u16(),
            attempts,
            counts: (m.replays_attempted.get(), m.replays_succeeded.get()),
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(c, b)| (c.to_string(), b.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn a_401_is_replayed_once_with_the_fresher_key_and_the_same_body() {
        let r = run("", Some("k2"), "Bearer k2", "hello").await;
        assert_eq!(r.status, 200);
        let sent = [("Bearer k1", "hello"), ("Bearer k2", "hello")];
        assert_eq!(r.attempts, pairs(&sent));
        assert_eq!(r.counts, (1, 1));
    }

    #[tokio::test]
    async fn a_second_401_is_passed_through_without_a_third_try() {
        let r = run("", Some("k2"), "Bearer k3", "hello").await;
        assert_eq!((r.status, r.attempts.len(), r.counts), (401, 2, (1, 0)));
    }

    #[tokio::test]
    async fn no_fresher_key_no_replay() {
        let r = run("", None, "Bearer k2", "hello").await;
        assert_eq!((r.status, r.attempts.len(), r.counts), (401, 1, (0, 0)));
    }

    #[tokio::test]
    async fn a_body_over_the_cap_streams_whole_and_is_not_replayed() {
        let r = run(
            "max_replay_body = 4",
            Some("k2"),
            "Bearer k2",
            "hello world",
        )
        .await;
        assert_eq!(r.status, 401);
        assert_eq!(r.attempts, pairs(&[("Bearer k1", "hello world")]));
        assert_eq!(r.counts, (0, 0));
    }

    #[tokio::test]
    async fn retry_on_401_false_no_replay() {
        let r = run("retry_on_401 = false", Some("k2"), "Bearer k2", "hello").await;
        assert_eq!((r.status, r.attempts.len(), r.counts), (401, 1, (0, 0)));
    }
}
