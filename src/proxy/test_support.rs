//! Helpers the layer tests share: requests, stand-in inner services, and routes with keys
//! loaded from an in-memory secret source.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{Outbound, RouteRef, Routed};
use crate::body::{ReqBody, RespBody};
use crate::cache::SecretCache;
use crate::config::{AppAuth, Config};
use crate::credentials::Slot;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::routes::{RouteTable, Routes};
use crate::secrets::{Secret, SecretSource, SecretVersion, SourceError};

/// A request with no body.
pub(crate) fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request")
}

/// An inner service's answer: 200, empty.
pub(crate) async fn ok<B>(_: Request<B>) -> Result<Response<RespBody>, ProxyError> {
    Ok(Response::new(RespBody::empty()))
}

/// An inner service's answer: 200 with the request's headers.
pub(crate) async fn echo_headers(req: Request<()>) -> Result<Response<RespBody>, ProxyError> {
    let mut resp = Response::new(RespBody::empty());
    *resp.headers_mut() = req.headers().clone();
    Ok(resp)
}

/// A body as text.
pub(crate) async fn body_text<B>(body: B) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = body.collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A secret source holding one value the test sets; the version id is the value.
#[derive(Debug)]
pub(crate) struct TestSource(Mutex<String>);

impl TestSource {
    /// The value the next fetch returns.
    pub(crate) fn set(&self, value: &str) {
        *self.0.lock().expect("lock") = value.to_owned();
    }
}

impl SecretSource for TestSource {
    fn fetch<'a>(
        &'a self,
        _id: &'a str,
        _stage: &'a str,
    ) -> BoxFuture<'a, Result<SecretVersion, SourceError>> {
        let value = self.0.lock().expect("lock").clone();
        Box::pin(async move {
            Ok(SecretVersion {
                version_id: Some(value.clone()),
                value: Secret::new(value),
            })
        })
    }

    fn name(&self) -> &'static str {
        "test"
    }
}

/// Routes with their keys loaded: `api` (index 0, prefix `/api`, plus `api_settings`) and
/// `maps` (index 1, host `maps.example.com`), both on the key `k1` of one secret; the app token
/// [`APP_TOKEN`] in `x-app-token`.
pub(crate) struct Fixture {
    /// The routes.
    pub(crate) routes: Arc<Routes>,
    /// A table holding them.
    pub(crate) table: Arc<RouteTable>,
    /// Their secret's source.
    pub(crate) source: Arc<TestSource>,
    /// Keeps the cache alive.
    _cache: SecretCache,
}

impl Fixture {
    /// The route at `index`.
    pub(crate) fn route(&self, index: usize) -> RouteRef {
        RouteRef::new(self.routes.clone(), index)
    }
}

/// The fixture's app token.
pub(crate) const APP_TOKEN: &str = "s3cret";

/// The fixture's app token setting: [`APP_TOKEN`] in `x-app-token`.
pub(crate) fn app_auth() -> AppAuth {
    AppAuth {
        header: http::header::HeaderName::from_static("x-app-token"),
        token: Secret::new(APP_TOKEN),
    }
}

/// A route table with no routes and the app token setting `auth`.
pub(crate) fn table_with(auth: Option<AppAuth>) -> Arc<RouteTable> {
    Arc::new(RouteTable::new(Arc::new(Routes {
        list: Vec::new(),
        router: crate::route::Router::new(&[]),
        app_auth: auth,
        access_log: false,
        connect_timeout: std::time::Duration::from_secs(1),
        metrics: Arc::new(Metrics::new()),
    })))
}

/// Builds the [`Fixture`] routes and loads their key.
pub(crate) async fn fixture(api_settings: &str) -> Fixture {
    let text = format!(
        r#"
        [[route]]
        name = "api"
        path_prefix = "/api"
        upstream = "http://127.0.0.1:1"
        secret_id = "s"
        {api_settings}
        [[route]]
        name = "maps"
        host = "maps.example.com"
        upstream = "https://maps.example.com"
        secret_id = "s"
        "#
    );
    let config =
        Config::from_toml(&text, "test.toml", Path::new("."), &HashMap::new()).expect("config");
    let source = Arc::new(TestSource(Mutex::new("k1".into())));
    let metrics = Arc::new(Metrics::new());
    let (cache, bindings) = SecretCache::new(
        &config.routes,
        &crate::secrets::Sources::single(source.clone()),
        metrics.clone(),
    );
    for b in &bindings {
        b.entry.refresh().await.expect("key loaded");
    }
    // No OAuth2 route: every slot is a key.
    let slots = bindings.into_iter().map(Slot::Key).collect();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let routes = Routes::new(
        &config.routes,
        slots,
        metrics,
        Some(app_auth()),
        true,
        config.connect_timeout,
        &tls,
    );
    let routes = Arc::new(routes);
    Fixture {
        table: Arc::new(RouteTable::new(routes.clone())),
        routes,
        source,
        _cache: cache,
    }
}

/// An outbound request for `path` on the fixture's `api` route, with its current key.
pub(crate) fn outbound(f: &Fixture, path: &str) -> Outbound {
    let route = f.route(0);
    let key = route.current().expect("key");
    let req = Request::builder()
        .uri(path)
        .header("host", "localhost")
        .body(ReqBody::empty())
        .expect("request");
    Outbound {
        routed: Routed {
            req,
            route,
            strip: "/api".len(),
        },
        key,
    }
}

/// Sends `req` over an in-memory HTTP/1.1 connection, so that `serve` receives a real
/// [`Incoming`] body, and returns the answer with its body read.
pub(crate) async fn over_h1<F, Fut>(req: Request<String>, serve: F) -> Response<Bytes>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<RespBody>> + Send + 'static,
{
    let (app, proxy) = tokio::io::duplex(64 * 1024);
    let svc = hyper::service::service_fn(move |req| {
        let serve = serve.clone();
        async move { Ok::<_, Infallible>(serve(req).await) }
    });
    tokio::spawn(
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(proxy), svc),
    );
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(app))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = send.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Response::from_parts(parts, body)
}
