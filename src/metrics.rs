//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! Per-route handles are created once, when the proxy starts ([`RouteMetrics`]), so the request
//! path only bumps atomics: no label lookup, no allocation. Secret metrics carry the secret's id,
//! stage and version id as labels, never its value.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Route label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Route name.
    pub route: String,
}

/// Route and response status class (`2xx`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    /// Route name (`none` for requests that matched no route).
    pub route: String,
    /// `1xx` .. `5xx`.
    pub status: String,
}

/// Proxy error label: route and error kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteError {
    /// Route name (`none` if no route matched).
    pub route: String,
    /// Error kind, as in the `x-keyproxy-error` header.
    pub kind: String,
}

/// Secret label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    /// Secret id (name or ARN).
    pub secret: String,
    /// Staging label.
    pub stage: String,
}

/// Secret and fetch result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretResult {
    /// Secret id.
    pub secret: String,
    /// Staging label.
    pub stage: String,
    /// `ok`, `unchanged`... or an error kind such as `throttled`.
    pub result: String,
}

/// Secret and the version currently served.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretVersionLabel {
    /// Secret id.
    pub secret: String,
    /// Staging label.
    pub stage: String,
    /// Version id served now.
    pub version_id: String,
}

/// Route and the result of an OAuth2 token mint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResult {
    /// Route name.
    pub route: String,
    /// `ok`, or an error kind such as `unreachable` or `invalid_client`.
    pub result: String,
}

/// Configuration reload result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadResult {
    /// `ok` (applied) or `error` (refused; the running configuration stays).
    pub result: String,
}

/// All metrics of one proxy.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    upstream_seconds: Family<RouteLabel, Histogram, fn() -> Histogram>,
    injected: Family<RouteLabel, Counter>,
    replays_attempted: Family<RouteLabel, Counter>,
    replays_succeeded: Family<RouteLabel, Counter>,
    proxy_errors: Family<RouteError, Counter>,
    /// Secret fetches by result.
    pub fetches: Family<SecretResult, Counter>,
    /// Seconds since the last successful fetch (set at scrape time).
    pub secret_age: Family<SecretLabel, Gauge<f64, AtomicU64>>,
    /// 1 while the last fetch failed and the last good value is served.
    pub secret_stale: Family<SecretLabel, Gauge>,
    /// 1 for the version id served now.
    pub secret_version: Family<SecretVersionLabel, Gauge>,
    /// OAuth2 access tokens minted, by route and result (`[route.oauth2]`).
    pub oauth2_mints: Family<RouteResult, Counter>,
    /// Open app connections.
    pub connections: Gauge,
    /// App connections refused over `max_connections`.
    pub connections_refused: Counter,
    /// Configuration reloads, by result.
    config_reloads: Family<ReloadResult, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keyproxy");
        let m = Metrics {
            requests: Family::default(),
            upstream_seconds: Family::new_with_constructor(latency_histogram),
            injected: Family::default(),
            replays_attempted: Family::default(),
            replays_succeeded: Family::default(),
            proxy_errors: Family::default(),
            fetches: Family::default(),
            secret_age: Family::default(),
            secret_stale: Family::default(),
            secret_version: Family::default(),
            oauth2_mints: Family::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            config_reloads: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by route and status class",
            m.requests.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time from sending a request upstream to its response headers",
            m.upstream_seconds.clone(),
        );
        registry.register(
            "keys_injected",
            "Requests sent upstream with a key injected",
            m.injected.clone(),
        );
        registry.register(
            "replays_attempted",
            "Requests replayed after a 401 with a refreshed key",
            m.replays_attempted.clone(),
        );
        registry.register(
            "replays_succeeded",
            "Replays whose answer was not 401",
            m.replays_succeeded.clone(),
        );
        registry.register(
            "proxy_errors",
            "Errors produced by the proxy itself, by kind",
            m.proxy_errors.clone(),
        );
        registry.register(
            "secret_fetches",
            "Secret fetches, by result",
            m.fetches.clone(),
        );
        registry.register(
            "secret_age_seconds",
            "Seconds since the secret was last fetched successfully",
            m.secret_age.clone(),
        );
        registry.register(
            "secret_stale",
            "1 while the last fetch failed and the last good value is served",
            m.secret_stale.clone(),
        );
        registry.register(
            "secret_version",
            "1 for the version id currently served",
            m.secret_version.clone(),
        );
        registry.register(
            "oauth2_mints",
            "OAuth2 access token mints at the token endpoint, by route and result",
            m.oauth2_mints.clone(),
        );
        registry.register("connections", "Open app connections", m.connections.clone());
        registry.register(
            "connections_refused",
            "App connections refused over max_connections",
            m.connections_refused.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads, by result (ok: applied; error: refused, the running one stays)",
            m.config_reloads.clone(),
        );
        for result in ["ok", "error"] {
            let _ = m.config_reloads.get_or_create(&ReloadResult {
                result: result.into(),
            });
        }
        Metrics { registry, ..m }
    }

    /// Counts a configuration reload: applied (`ok`) or refused.
    pub fn reloaded(&self, ok: bool) {
        self.config_reloads
            .get_or_create(&ReloadResult {
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }

    /// Handles for one route, created once.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let label = RouteLabel {
            route: route.to_owned(),
        };
        let class = |c: &str| {
            self.requests
                .get_or_create(&RouteStatus {
                    route: route.to_owned(),
                    status: c.to_owned(),
                })
                .clone()
        };
        RouteMetrics {
            status: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            upstream_seconds: self.upstream_seconds.get_or_create(&label).clone(),
            injected: self.injected.get_or_create(&label).clone(),
            replays_attempted: self.replays_attempted.get_or_create(&label).clone(),
            replays_succeeded: self.replays_succeeded.get_or_create(&label).clone(),
            name: route.to_owned(),
            errors: self.proxy_errors.clone(),
        }
    }

    /// Counts a response to a request that matched no route.
    pub fn unrouted(&self, status: u16, kind: &str) {
        self.requests
            .get_or_create(&RouteStatus {
                route: "none".into(),
                status: status_class(status).into(),
            })
            .inc();
        self.proxy_errors
            .get_or_create(&RouteError {
                route: "none".into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `2xx` for 204, ...
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Pre-created metric handles of one route.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    status: [Counter; 5],
    /// Upstream latency.
    pub upstream_seconds: Histogram,
    /// Keys injected.
    pub injected: Counter,
    /// 401 replays attempted.
    pub replays_attempted: Counter,
    /// 401 replays that did not get 401 again.
    pub replays_succeeded: Counter,
    name: String,
    errors: Family<RouteError, Counter>,
}

impl RouteMetrics {
    /// Counts one answered request.
    pub fn answered(&self, status: u16) {
        let i = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.status[i].inc();
    }

    /// Counts one error of the proxy's own.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&RouteError {
                route: self.name.clone(),
                kind: kind.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_route_counters() {
        let m = Metrics::new();
        let r = m.route("payments");
        r.answered(200);
        r.answered(401);
        r.injected.inc();
        r.upstream_seconds.observe(0.003);
        m.unrouted(404, "no_route");
        let text = m.encode();
        assert!(
            text.contains(r#"keyproxy_requests_total{route="payments",status="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"keyproxy_requests_total{route="payments",status="4xx"} 1"#));
        assert!(text.contains(r#"keyproxy_proxy_errors_total{route="none",kind="no_route"} 1"#));
        assert!(text.contains("keyproxy_upstream_duration_seconds_bucket"));
        assert!(text.contains(r#"keyproxy_keys_injected_total{route="payments"} 1"#));
    }
}
