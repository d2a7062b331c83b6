//! keyproxy: a sidecar reverse proxy that injects API keys from AWS Secrets Manager.
//!
//! An app sends its API requests, without any credential, to keyproxy on localhost; keyproxy
//! forwards them to the real API with the key added, and replays a request once when the API
//! answers 401 after a rotation. The modules, in the order a request meets them:
//!
//! - [`server`]: binds the app and admin listeners, accepts connections, hands each to an
//!   engine, drains on shutdown ([`drain`]: the shutdown signal every connection watches);
//!   [`listener`]: TCP or Unix socket listeners (socket file mode, stale file, removal) and the
//!   connection type both engines serve.
//! - Two engines, which import neither the server nor each other:
//!   - [`h1`]: the HTTP/1.1 engine (the fast path) for routes whose upstream speaks HTTP/1.1:
//!     head parsing and rewriting, framing keyproxy writes, early answers; hands anything else
//!     to the general engine mid-connection;
//!   - [`proxy`]: the general engine (hyper; HTTP/2 on either side, chunked request bodies,
//!     forward mode, the proxy's own answers), a `tower` stack built in [`proxy::stack`], outer
//!     to inner: observe (metrics, access log, errors → responses), refuse CONNECT, app token,
//!     in-flight limit, routing, 401 replay, timeout, upstream (inject, rewrite, send, relay).
//! - [`routes`]: what a route is at run time (settings, credential slot, metric handles, the
//!   HTTP/1.1 [`pool`] and the hyper client), owned by neither engine; the 401 decision; the
//!   route table both engines read once per request, which a reload swaps.
//! - [`route`]: the request rules both engines call: route match by path prefix (reverse mode)
//!   or host (forward mode), path checks, the `allow` list, the `Host` count, the app token.
//! - [`inject`]: value templates (`Bearer {secret}`, `{secret.FIELD}`), a route's credential
//!   (several headers, Basic auth, a query parameter) rendered from one secret version, the
//!   upstream target.
//! - [`limits`]: limits and timeouts both engines apply.
//! - [`cache`]: one `ArcSwap` entry per (role, secret, stage); background refresh with jitter and
//!   backoff; single-flight, rate-limited refresh for the 401 path and `POST /refresh`.
//! - [`oauth2`]: `[route.oauth2]` routes: an access token minted from client credentials held
//!   in the cache, kept fresh in the background, re-minted on a 401 ([`oauth2::Tokens`]: a
//!   configuration's tokens and their tasks); [`oauth2::endpoint`]: the token endpoint's HTTP
//!   side, shared with [`rotation`].
//! - [`credentials`]: the cache and the tokens together, built at start and replaced together
//!   by a reload; a route's credential slot (a key in a cache entry, or an OAuth2 token), which
//!   both engines read the same way.
//! - [`backoff`]: full-jitter retry windows, and the process-wide pause after a throttle.
//! - [`retry`]: keeps request bodies up to `max_replay_body` so a 401 can be replayed.
//! - [`forward`]: the pooled rustls upstream client (hyper); hop-by-hop header handling.
//! - [`body`]: request/response body type (streamed, buffered, or both) without boxing.
//! - [`error`]: the proxy's own errors, and the one place they become responses.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `POST /refresh`; [`admin_client`]:
//!   `keyproxy health` and `keyproxy refresh`.
//! - [`metrics`]: Prometheus metrics with per-route handles created once.
//! - [`secrets`]: the `SecretSource` trait, the `aws` and `file` sources, the redacting `Secret`;
//!   `Sources`, one source per IAM role the routes read with (`role_arn`, assumed through STS).
//! - [`config`]: TOML file or `KEYPROXY_*` variables → validated [`config::Config`].
//! - [`reload`]: configuration reload on SIGHUP and on a change to the file: validate, renew the
//!   cache (no new fetch for the secrets kept), swap the route table both engines read.
//! - [`telemetry`]: log setup (text or JSON; third-party crates capped so no wire data is logged).
//! - [`rotation`]: the rotation function (createSecret, setSecret, testSecret, finishSecret) run
//!   by the `keyproxy-rotation` Lambda binary and by `keyproxy rotate`.
//! - [`dev`]: the development echo API (`keyproxy echo`, `[dev] echo`): a local upstream that
//!   shows what arrived, keys fingerprinted; optionally issues its own keys, for trying rotation.

pub mod admin;
pub mod admin_client;
pub mod allow;
pub mod assemble;
pub mod backoff;
pub mod body;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod dev;
pub mod drain;
pub mod error;
pub mod forward;
pub mod h1;
pub mod inject;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod oauth2;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod retry;
pub mod rotation;
pub mod route;
pub mod routes;
pub mod secrets;
pub mod server;
pub mod telemetry;
pub mod uri;

pub use config::Config;
pub use server::{run, shutdown_signal};
