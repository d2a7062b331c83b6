//! Configuration: a TOML file, or a single route from `KEYPROXY_*` environment variables,
//! parsed into typed values and validated before anything binds.
//!
//! Every problem is collected, not just the first: [`ConfigError`] lists them all, each naming
//! the key (`route[1].upstream`, or `KEYPROXY_UPSTREAM`) and the file. Unknown keys are problems
//! too. The environment is passed in as a map, so tests never touch the process environment.
//!
//! Both sources produce the same raw settings, which one validation turns into a [`Config`]:
//!
//! - this file: the public types and the entry points ([`Config::load`], [`Config::from_file`],
//!   [`Config::from_toml`], [`Config::from_env`]).
//! - `file`: the TOML file → raw settings (the serde structs; unknown keys; syntax errors).
//! - `env`: `KEYPROXY_*` variables → raw settings (a single route, and the globals that also
//!   override a file).
//! - `validate`: raw settings → [`Config`], one small check per setting, by section: `global`
//!   (listeners, timeouts, limits, CA bundle), `source` (`[source]`, `[aws]`), `app_auth`,
//!   `route` (each `[[route]]`, the route list, `allow`, [`parse_upstream`]), `injection`
//!   (`header`/`value`, `query_param`, `headers`, `basic_auth`, their templates), `oauth2`
//!   (`[route.oauth2]`).
//! - `listen`: a listener's address, [`Listen`]: `IP:port` or `unix:/path`.
//! - [`defaults`]: every default value and bound, as named constants.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};

use crate::allow::Allow;
use crate::inject::Injection;
use crate::secrets::aws::AwsSettings;

pub mod defaults;
mod env;
mod file;
mod listen;
mod loaded;
mod names;
#[cfg(test)]
mod test_support;
mod validate;

pub use listen::{Listen, ListenError, MAX_SOCKET_PATH};
pub use loaded::{sha256, ConfigFile, LoadedConfig};
pub use validate::parse_upstream;

/// Default app-facing listener.
pub const DEFAULT_LISTEN: &str = defaults::LISTEN;
/// Default admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = defaults::ADMIN_LISTEN;
/// Default header for the app-side token (see [`AppAuth`]).
pub const DEFAULT_APP_TOKEN_HEADER: &str = defaults::APP_TOKEN_HEADER;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the settings came from: the file's path, or `environment`.
    pub origin: String,
    /// App-facing listener (default [`defaults::LISTEN`]).
    pub listen: Listen,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`; default [`defaults::ADMIN_LISTEN`]).
    pub admin_listen: Listen,
    /// `listen_mode`: the permission bits of the socket files of Unix listeners (both of them;
    /// [`defaults::LISTEN_MODE`]).
    pub listen_mode: u32,
    /// Where secrets are read.
    pub source: SourceConfig,
    /// The routes, in configuration order.
    pub routes: Vec<RouteConfig>,
    /// How long in-flight requests may run after SIGTERM before the process exits
    /// ([`defaults::DRAIN_TIMEOUT`]).
    pub drain_timeout: Duration,
    /// Concurrent app connections; one more is answered 503 and closed
    /// ([`defaults::MAX_CONNECTIONS`]). Also the most requests in flight on the general engine
    /// (HTTP/2 multiplexes many on one connection); one more is answered 503 at once
    /// ([`crate::proxy::overload`]).
    pub max_connections: usize,
    /// Time allowed to connect (TCP + TLS) to an upstream ([`defaults::CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// Extra PEM CA certificates trusted for upstreams, beside the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// Whether to log one line per request ([`defaults::ACCESS_LOG`]).
    pub access_log: bool,
    /// Require a shared token from the app on every request.
    pub app_auth: Option<AppAuth>,
    /// Runtime worker threads; `None`: one per CPU.
    pub worker_threads: Option<usize>,
    /// `[dev] echo`: where the proxy process also runs the development echo API
    /// ([`crate::dev`]), for trying keyproxy without a network.
    pub dev_echo: Option<SocketAddr>,
}

/// The app-side token: when set, every app request must carry it in `header`.
#[derive(Clone, PartialEq, Eq)]
pub struct AppAuth {
    /// The header the app sends it in (removed before forwarding).
    pub header: HeaderName,
    /// The expected token.
    pub token: crate::secrets::Secret,
}

impl fmt::Debug for AppAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppAuth")
            .field("header", &self.header)
            .field("token", &"***")
            .finish()
    }
}

/// Where secrets come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// AWS Secrets Manager.
    Aws(AwsSettings),
    /// A local JSON file (development).
    File(PathBuf),
}

/// One route: which requests, which upstream, which secret, and how to inject it.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Name used in logs, metrics and error bodies.
    pub name: String,
    /// Requests whose path starts with this (on a segment boundary) use the route; stripped.
    pub path_prefix: Option<String>,
    /// Forward mode: requests for this host (absolute-form or `Host`) use the route.
    pub host: Option<String>,
    /// Where requests go.
    pub upstream: Upstream,
    /// Secrets Manager id (name or ARN).
    pub secret_id: String,
    /// Staging label read (default `AWSCURRENT`, [`defaults::VERSION_STAGE`]).
    pub version_stage: String,
    /// JSON field of the secret's text holding the key; `None`: the whole text.
    pub secret_field: Option<String>,
    /// What is injected where: `header`/`value` or `query_param`, `headers`, `basic_auth`
    /// ([`defaults::HEADER`], [`defaults::HEADER_VALUE`] when none is set).
    pub injection: Injection,
    /// `allow`: the `METHOD PATH` patterns a request must match; `None`: every request.
    pub allow: Option<Allow>,
    /// Background refresh period (± jitter; [`defaults::REFRESH_INTERVAL`]).
    pub refresh_interval: Duration,
    /// After a forced (401-triggered) refresh that found nothing newer, the time before another
    /// ([`defaults::REFRESH_COOLDOWN`]); a refresh that found a newer key starts none.
    pub refresh_cooldown: Duration,
    /// On a 401 that a fresh `AWSCURRENT` cannot fix, try the `AWSPENDING` version (a rotation
    /// between createSecret and finishSecret, with an API that revoked the old key on issue).
    pub pending_fallback: bool,
    /// Refresh and replay once when the upstream answers 401.
    pub retry_on_401: bool,
    /// Offer HTTP/2 to an `https://` upstream by ALPN (default false: HTTP/1.1 on the fast path).
    pub http2: bool,
    /// Request bodies up to this size are kept for a replay; larger ones stream, never replayed
    /// ([`defaults::MAX_REPLAY_BODY`], at most [`defaults::MAX_REPLAY_BODY_LIMIT`]).
    pub max_replay_body: u64,
    /// Time allowed for the upstream's response headers ([`defaults::TIMEOUT`]).
    pub timeout: Duration,
    /// Longest gap allowed between two chunks of the upstream's response body
    /// ([`defaults::IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// The IAM role the secret is read with: the route's own `role_arn` (with its
    /// `external_id` and `session_name`), else `[aws] role_arn`; `None`: the base credentials.
    pub role: Option<crate::secrets::aws::AssumeRole>,
    /// `[route.oauth2]`: the secret holds OAuth2 client credentials, and the key injected is an
    /// access token minted from them ([`crate::oauth2`]).
    pub oauth2: Option<OAuth2Config>,
}

/// `[route.oauth2]`: how to mint the route's access token (OAuth 2.0 client credentials grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2Config {
    /// `token_url`: https, or http to a loopback host.
    pub token_url: http::Uri,
    /// `scope`, sent when set.
    pub scope: Option<String>,
    /// `audience`, sent when set.
    pub audience: Option<String>,
    /// `client_auth`: how the client authenticates ([`defaults::OAUTH2_CLIENT_AUTH`]).
    pub client_auth: ClientAuth,
    /// `client_id_field`: the secret's JSON field holding the client id
    /// ([`defaults::OAUTH2_CLIENT_ID_FIELD`]).
    pub client_id_field: String,
    /// `client_secret_field`: the secret's JSON field holding the client secret
    /// ([`defaults::OAUTH2_CLIENT_SECRET_FIELD`]).
    pub client_secret_field: String,
    /// `refresh_ahead`: the next token is minted this long before the current one expires, at
    /// most half its lifetime ([`defaults::OAUTH2_REFRESH_AHEAD`]).
    pub refresh_ahead: Duration,
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `basic`: `client_secret_basic`, HTTP Basic with the form-encoded id and secret.
    Basic,
    /// `post`: `client_secret_post`, the id and secret as form fields of the body.
    Post,
}

/// A parsed upstream base URL.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and optional port.
    pub authority: Authority,
    /// Base path without a trailing slash (`""` for the root).
    pub base_path: String,
    /// The `Host` header sent upstream.
    pub host_header: HeaderValue,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// One problem: the key it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key as a path: `route[1].upstream`, `listen`, `KEYPROXY_UPSTREAM`, ...
    pub key: String,
    /// What is wrong, and what would be right.
    pub message: String,
    /// The line of the file where the key is (or the table it is missing from), when the file
    /// has it.
    pub line: Option<usize>,
    /// The name of the route the key belongs to, when it has one.
    pub route: Option<String>,
}

impl Problem {
    /// The key as shown: `route "payments" (#2) upstream` for `route[1].upstream` (the
    /// route's name and its position, counted from 1), else the key itself.
    pub fn shown_key(&self) -> String {
        let Some((i, rest)) = route_index(&self.key) else {
            return self.key.clone();
        };
        let route = match &self.route {
            Some(name) => format!("route {name:?} (#{})", i + 1),
            None => format!("route #{}", i + 1),
        };
        match rest.strip_prefix('.') {
            Some(field) => format!("{route} {field}"),
            None => route + rest,
        }
    }
}

/// `route[3].x` → `(3, ".x")`.
fn route_index(key: &str) -> Option<(usize, &str)> {
    let rest = key.strip_prefix("route[")?;
    let close = rest.find(']')?;
    Some((rest[..close].parse().ok()?, &rest[close + 1..]))
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.shown_key(), self.message)
    }
}

/// An invalid configuration: every problem found, with where the settings came from.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The config file, or `environment`.
    pub origin: String,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

impl ConfigError {
    /// A problem that stops everything else from being checked (the file cannot be read or
    /// parsed).
    pub(crate) fn single(origin: &str, key: &str, message: String) -> ConfigError {
        let mut problems = Problems::default();
        problems.add(key.to_owned(), message);
        ConfigError {
            origin: origin.to_owned(),
            problems: problems.0,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid configuration ({}): {n} problem{}",
            self.origin,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            match p.line {
                Some(line) => write!(f, "\n  {}:{line}: {p}", self.origin)?,
                None => write!(f, "\n  {}: {p}", self.origin)?,
            }
        }
        Ok(())
    }
}

/// Collects problems while the settings are parsed and validated.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: String, message: impl Into<String>) {
        self.0.push(Problem {
            key,
            message: message.into(),
            line: None,
            route: None,
        });
    }

    /// How many problems so far (a check compares before and after to see if it added any).
    fn len(&self) -> usize {
        self.0.len()
    }

    /// `value` if no problem was found, else every problem, with the settings' origin.
    fn into_result<T>(self, origin: &str, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                origin: origin.to_owned(),
                problems: self.0,
            })
        }
    }
}

impl Config {
    /// Loads the configuration: from `path` if given, else from `env` (`KEYPROXY_*` variables).
    /// `env` is the process environment (a map, so tests pass their own).
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::from_file(p, env),
            None => Config::from_env(env),
        }
    }

    /// Reads and validates a TOML file; `KEYPROXY_LISTEN`/`KEYPROXY_ADMIN_LISTEN` and the other
    /// global variables in `env` override the file.
    pub fn from_file(path: &Path, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| {
            let origin = path.display().to_string();
            ConfigError::single(&origin, "(file)", format!("cannot read the file: {e}"))
        })?;
        Config::from_file_bytes(path, &bytes, env)
    }

    /// Validates `bytes`, read from the TOML file at `path` (which names it in errors and
    /// resolves its relative paths): what a reload checks, from the very bytes it checksums.
    pub fn from_file_bytes(
        path: &Path,
        bytes: &[u8],
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::str::from_utf8(bytes).map_err(|e| {
            ConfigError::single(&origin, "(file)", format!("cannot read the file: {e}"))
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::from_toml(text, &origin, &base, env)
    }

    /// Parses TOML text (`origin` names it in errors; relative paths resolve against `base`).
    pub fn from_toml(
        text: &str,
        origin: &str,
        base: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let (mut raw, mut problems) = file::parse(text, origin)?;
        env::refuse_route_variables(env, &mut problems);
        env::apply_globals(&mut raw, env, &mut problems);
        validate::validate(raw, origin, names::Namer::File, base, env, problems)
            .map_err(|e| file::locate(e, text, env))
    }

    /// Only the `[aws]` section and `ca_bundle` of the TOML file at `path`, checked as for the
    /// proxy (and the file's syntax and unknown keys): what `keyproxy rotate --config` takes from
    /// the proxy's config file.
    pub fn aws_from_file(
        path: &Path,
        env: &HashMap<String, String>,
    ) -> Result<(AwsSettings, Option<PathBuf>), ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::single(&origin, "(file)", format!("cannot read the file: {e}"))
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let (raw, mut problems) = file::parse(&text, &origin)?;
        let aws = validate::aws_only(raw, &base, &mut problems);
        problems
            .into_result(&origin, aws)
            .map_err(|e| file::locate(e, &text, env))
    }

    /// Builds a single-route configuration from `KEYPROXY_*` variables.
    pub fn from_env(env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let (raw, problems) = env::parse(env);
        let cwd = PathBuf::new();
        validate::validate(raw, "environment", names::Namer::Env, &cwd, env, problems)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::test_support::{toml, MINIMAL};
    use super::{SourceConfig, DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN};
    use crate::inject::Injection;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = toml(MINIMAL).expect("valid");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        let r = &c.routes[0];
        assert_eq!(r.path_prefix.as_deref(), Some("/payments"));
        assert_eq!(r.upstream.base_path, "/v1");
        assert_eq!(r.upstream.to_string(), "https://api.example.com/v1");
        assert_eq!(r.version_stage, "AWSCURRENT");
        assert_eq!(r.refresh_interval, Duration::from_secs(300));
        assert_eq!(r.max_replay_body, 256 * 1024);
        assert!(r.retry_on_401);
        assert!(!r.http2, "HTTP/1.1 to the upstream by default");
        assert_eq!(
            r.injection,
            Injection::header(
                http::header::AUTHORIZATION,
                crate::inject::Template::parse("Bearer {secret}").expect("t")
            )
        );
        assert!(r.allow.is_none());
        assert!(matches!(c.source, SourceConfig::Aws(_)));
    }
}
