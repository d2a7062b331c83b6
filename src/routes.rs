//! What a route is at run time, and the table of them that both engines read.
//!
//! Owned by neither engine: the server builds a [`Routes`] from the validated config, and the
//! HTTP/1.1 engine ([`crate::h1`]) and the general engine ([`crate::proxy`]) share it. A
//! [`Route`] holds everything a request on it needs: its settings, its credential slot, its
//! metric handles, and its upstream connections for both engines (the HTTP/1.1 engine's pool,
//! the general engine's client).

use std::sync::Arc;
use std::time::Duration;

use crate::cache::{Loaded, Slot};
use crate::config::{AppAuth, RouteConfig};
use crate::error::ProxyError;
use crate::forward::{self, UpstreamClient};
use crate::metrics::{Metrics, RouteMetrics};
use crate::pool::Pool;
use crate::route::Router;

/// A route at run time.
#[derive(Debug)]
pub struct Route {
    /// The route's settings.
    pub config: RouteConfig,
    /// Where its credential is.
    pub slot: Slot,
    /// Its metric handles.
    pub metrics: RouteMetrics,
    /// The HTTP/1.1 engine's keep-alive pool, when the route's upstream speaks HTTP/1.1:
    /// `http://`, or `https://` with `http2 = false`.
    pub pool: Option<Pool>,
    /// The general engine's client: HTTP/2 and HTTP/1.1 offered by ALPN with `http2 = true`,
    /// HTTP/1.1 only otherwise, so the route's protocol choice holds on both engines.
    pub client: UpstreamClient,
}

impl Route {
    /// The route's credentials now: one atomic load, no lock, no I/O. No key yet (or an OAuth2
    /// token that expired): the error says why (still being fetched or minted, or the last
    /// error).
    pub fn current(&self) -> Result<Arc<Loaded>, ProxyError> {
        self.slot
            .current()
            .ok_or_else(|| ProxyError::NoKey(self.slot.missing()))
    }

    /// The 401 decision, the same on both engines: the credentials to replay with, if a refresh
    /// (single-flight, rate-limited by the cache; for an OAuth2 route, a new mint) finds ones
    /// newer than `seen` that render to a different credential for this route. `None`: pass
    /// the 401 through.
    pub async fn fresher(&self, seen: &Arc<Loaded>) -> Option<Arc<Loaded>> {
        let fresh = self.slot.refresh_now(seen).await?;
        let old = self.slot.credential(seen);
        let new = self.slot.credential(&fresh);
        if new.is_some() && new != old {
            Some(fresh)
        } else {
            tracing::debug!(route = %self.config.name, "401 with no newer key; passing it through");
            None
        }
    }
}

/// Every route, how requests find them, and the settings both engines apply to every request.
#[derive(Debug)]
pub struct Routes {
    /// The routes, in configuration order (a route's index is its id).
    pub list: Vec<Route>,
    /// Request → route.
    pub router: Router,
    /// The app token every request must carry, if configured.
    pub app_auth: Option<AppAuth>,
    /// Whether each request is logged.
    pub access_log: bool,
    /// Time allowed for a new upstream connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// The process's metrics (per-route handles are in each [`Route`]).
    pub metrics: Arc<Metrics>,
}

impl Routes {
    /// Builds the run-time routes from their settings and credential slots (in the same order).
    pub fn new(
        configs: &[RouteConfig],
        slots: Vec<Slot>,
        metrics: Arc<Metrics>,
        app_auth: Option<AppAuth>,
        access_log: bool,
        connect_timeout: Duration,
        tls: &rustls::ClientConfig,
    ) -> Routes {
        let client_h2 = forward::client_with(connect_timeout, tls.clone(), true);
        let client_h1 = forward::client_with(connect_timeout, tls.clone(), false);
        // The HTTP/1.1 engine's TLS connections offer only HTTP/1.1 by ALPN.
        let mut h1_tls = tls.clone();
        h1_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let h1_tls = Arc::new(h1_tls);
        let list = configs
            .iter()
            .zip(slots)
            .map(|(config, slot)| Route {
                metrics: metrics.route(&config.name),
                pool: Pool::for_route(config, &h1_tls),
                client: if config.http2 {
                    client_h2.clone()
                } else {
                    client_h1.clone()
                },
                config: config.clone(),
                slot,
            })
            .collect();
        Routes {
            list,
            router: Router::new(configs),
            app_auth,
            access_log,
            connect_timeout,
            metrics,
        }
    }
}
