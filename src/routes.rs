//! What a route is at run time, and the table of them that both engines read.
//!
//! Owned by neither engine: the server builds a [`Routes`] from the validated config and puts it
//! in a [`RouteTable`], which the HTTP/1.1 engine ([`crate::h1`]) and the general engine
//! ([`crate::proxy`]) read once per request; a configuration reload ([`crate::reload`]) swaps
//! it, so a keep-alive connection's next request finds the new routes. A
//! [`Route`] holds everything a request on it needs: its settings, its credential slot, its
//! metric handles, and its upstream connections for both engines (the HTTP/1.1 engine's pool,
//! the general engine's client).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Cache, Guard};

use crate::cache::Loaded;
use crate::config::{AppAuth, Config, RouteConfig};
use crate::credentials::Slot;
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
    /// `http://`, or `https://` with `http2 = false` (shared with the route's next version when
    /// a reload keeps its upstream).
    pub pool: Option<Arc<Pool>>,
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
    /// The run-time routes of `config` (its routes and their credential slots, in the same
    /// order; its app token, access log and connect timeout settings).
    pub fn from_config(
        config: &Config,
        slots: Vec<Slot>,
        metrics: Arc<Metrics>,
        tls: &rustls::ClientConfig,
    ) -> Routes {
        Routes::new(
            &config.routes,
            slots,
            metrics,
            config.app_auth.clone(),
            config.access_log,
            config.connect_timeout,
            tls,
        )
    }

    /// The routes of a reloaded `config`, as [`Routes::from_config`], keeping the upstream
    /// connections of this table: a route of the same name whose upstream (scheme, host, port)
    /// and `http2` did not change keeps its pool and client, so a reload opens no new upstream
    /// connection for it. Nothing is kept when `keep_connections` is false (the TLS settings or
    /// the connect timeout changed).
    pub fn renew(
        &self,
        config: &Config,
        slots: Vec<Slot>,
        metrics: Arc<Metrics>,
        tls: &rustls::ClientConfig,
        keep_connections: bool,
    ) -> Routes {
        let mut routes = Routes::from_config(config, slots, metrics, tls);
        if !keep_connections {
            return routes;
        }
        for r in &mut routes.list {
            let (new, up) = (&r.config, &r.config.upstream);
            let old = self.list.iter().find(|o| {
                o.config.name == new.name
                    && o.config.upstream.scheme == up.scheme
                    && o.config.upstream.authority == up.authority
                    && o.config.http2 == new.http2
            });
            if let Some(old) = old {
                r.pool.clone_from(&old.pool);
                r.client = old.client.clone();
            }
        }
        routes
    }

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
                pool: Pool::for_route(config, &h1_tls).map(Arc::new),
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

/// A connection's cached view of a [`RouteTable`] ([`RouteTable::cache`]).
pub type TableCache<'a> = Cache<&'a ArcSwap<Routes>, Arc<Routes>>;

/// The routes in force: one atomic load per request, swapped whole by a reload. A request keeps
/// the [`Routes`] it loaded until it ends, so requests in flight finish on the table they
/// started with, and the old table (its pools, its secret entries) goes when the last of them
/// does.
#[derive(Debug)]
pub struct RouteTable(ArcSwap<Routes>);

impl RouteTable {
    /// A table holding `routes`.
    pub fn new(routes: Arc<Routes>) -> RouteTable {
        RouteTable(ArcSwap::new(routes))
    }

    /// The routes now, to keep for a request.
    #[inline]
    pub fn current(&self) -> Arc<Routes> {
        self.0.load_full()
    }

    /// The routes now, for a short look (no reference count taken).
    #[inline]
    pub fn peek(&self) -> Guard<Arc<Routes>> {
        self.0.load()
    }

    /// A per-connection view of the table for the HTTP/1.1 engine: checking it for a reload
    /// costs one relaxed load and a compare; only after a reload does it take a new reference.
    pub fn cache(&self) -> TableCache<'_> {
        Cache::new(&self.0)
    }

    /// Puts `routes` in force for the requests that start from now on; returns the old ones.
    pub fn replace(&self, routes: Arc<Routes>) -> Arc<Routes> {
        self.0.swap(routes)
    }
}
