//! keyproxy: a sidecar reverse proxy that injects API keys from AWS Secrets Manager.
//!
//! An app sends its API requests, without any credential, to keyproxy on localhost; keyproxy
//! forwards them to the real API with the key added, and replays a request once when the API
//! answers 401 after a rotation. The modules, in the order a request meets them:
//!
//! - [`server`]: binds the app and admin listeners, accepts connections, drains on shutdown.
//! - [`proxy`]: the request path, top to bottom: route, inject, forward, 401 replay, respond.
//! - [`route`]: request → route by path prefix (reverse mode) or host (forward mode); path checks.
//! - [`cache`]: one `ArcSwap` entry per (secret, stage); background refresh with jitter and
//!   backoff; single-flight, rate-limited refresh for the 401 path.
//! - [`inject`]: value templates (`Bearer {secret}`), header and query-parameter credentials.
//! - [`retry`]: keeps request bodies up to `max_replay_body` so a 401 can be replayed.
//! - [`h1`]: the HTTP/1.1 fast path for plain-http upstreams; hands anything else to hyper.
//! - [`forward`]: the pooled rustls upstream client; hop-by-hop header handling.
//! - [`body`]: request/response body type (streamed, buffered, or both) without boxing.
//! - [`error`]: the proxy's own errors, and the one place they become responses.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`; [`admin_client`]: `keyproxy health`.
//! - [`metrics`]: Prometheus metrics with per-route handles created once.
//! - [`secrets`]: the `SecretSource` trait, the `aws` and `file` sources, the redacting `Secret`.
//! - [`config`]: TOML file or `KEYPROXY_*` variables → validated [`config::Config`].
//! - [`telemetry`]: log setup (text or JSON; third-party crates capped so no wire data is logged).
//! - [`rotation`]: the rotation function (createSecret, setSecret, testSecret, finishSecret) run
//!   by the `keyproxy-rotation` Lambda binary and by `keyproxy rotate`.

pub mod admin;
pub mod admin_client;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod forward;
pub mod h1;
pub mod inject;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod retry;
pub mod rotation;
pub mod route;
pub mod secrets;
pub mod server;
pub mod telemetry;

pub use config::Config;
pub use server::{run, shutdown_signal};
