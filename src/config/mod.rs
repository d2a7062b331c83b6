//! Configuration: a TOML file, or a single route from `KEYPROXY_*` environment variables,
//! parsed into typed values and validated before anything binds.
//!
//! Every problem is collected, not just the first: [`ConfigError`] lists them all, each naming
//! the key (`route[1].upstream`, or `KEYPROXY_UPSTREAM`) and the file. Unknown keys are problems
//! too. The environment is passed in as a map, so tests never touch the process environment.
//!
//! Both sources produce the same raw settings, which one validation (here) turns into a
//! [`Config`]:
//!
//! - `file`: the TOML file → raw settings (the serde structs; unknown keys; syntax errors).
//! - `env`: `KEYPROXY_*` variables → raw settings (a single route, and the globals that also
//!   override a file).
//! - [`defaults`]: every default value and bound, as named constants.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::Uri;

use crate::inject::{Injection, Template};
use crate::secrets::aws::AwsSettings;

pub mod defaults;
mod env;
mod file;
#[cfg(test)]
mod test_support;

use file::{RawFile, RawRoute, SizeValue};

use defaults::{DurationSetting, MAX_DURATION};

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
    pub listen: SocketAddr,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`; default [`defaults::ADMIN_LISTEN`]).
    pub admin_listen: SocketAddr,
    /// Where secrets are read.
    pub source: SourceConfig,
    /// The routes, in configuration order.
    pub routes: Vec<RouteConfig>,
    /// How long in-flight requests may run after SIGTERM before the process exits
    /// ([`defaults::DRAIN_TIMEOUT`]).
    pub drain_timeout: Duration,
    /// Concurrent app connections; one more is answered 503 and closed
    /// ([`defaults::MAX_CONNECTIONS`]).
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
    /// Where the key goes ([`defaults::HEADER`], [`defaults::HEADER_VALUE`]).
    pub injection: Injection,
    /// Background refresh period (± jitter; [`defaults::REFRESH_INTERVAL`]).
    pub refresh_interval: Duration,
    /// Minimum time between two forced (401-triggered) refreshes of the secret
    /// ([`defaults::REFRESH_COOLDOWN`]).
    pub refresh_cooldown: Duration,
    /// On a 401 that a fresh `AWSCURRENT` cannot fix, try the `AWSPENDING` version (a rotation
    /// between createSecret and finishSecret, with an API that revoked the old key on issue).
    pub pending_fallback: bool,
    /// Refresh and replay once when the upstream answers 401.
    pub retry_on_401: bool,
    /// Offer HTTP/2 to an `https://` upstream by ALPN (else HTTP/1.1 on the fast path).
    pub http2: bool,
    /// Request bodies up to this size are kept for a replay; larger ones stream, never replayed
    /// ([`defaults::MAX_REPLAY_BODY`], at most [`defaults::MAX_REPLAY_BODY_LIMIT`]).
    pub max_replay_body: u64,
    /// Time allowed for the upstream's response headers ([`defaults::TIMEOUT`]).
    pub timeout: Duration,
    /// Longest gap allowed between two chunks of the upstream's response body
    /// ([`defaults::IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
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
    /// `route[0].upstream`, `listen`, `KEYPROXY_UPSTREAM`, ...
    pub key: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
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
    fn single(origin: &str, key: &str, message: String) -> ConfigError {
        ConfigError {
            origin: origin.to_owned(),
            problems: vec![Problem {
                key: key.to_owned(),
                message,
            }],
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
            write!(f, "\n  {}: {p}", self.origin)?;
        }
        Ok(())
    }
}

/// Names keys the way the user wrote them: TOML paths, or environment variable names.
#[derive(Clone, Copy)]
enum Namer {
    File,
    Env,
}

impl Namer {
    fn global(self, key: &str) -> String {
        match self {
            Namer::File => key.to_owned(),
            Namer::Env => match key {
                "source.type" => "KEYPROXY_SOURCE".into(),
                "source.path" => "KEYPROXY_SECRETS_FILE".into(),
                "aws.region" => "AWS_REGION".into(),
                "app_auth" => "KEYPROXY_APP_TOKEN".into(),
                "route" => "KEYPROXY_UPSTREAM".into(),
                k => format!("KEYPROXY_{}", k.replace('.', "_").to_uppercase()),
            },
        }
    }

    fn route(self, i: usize, key: &str) -> String {
        match self {
            Namer::File => format!("route[{i}].{key}"),
            Namer::Env => match key {
                "name" => "KEYPROXY_ROUTE_NAME".into(),
                k => format!("KEYPROXY_{}", k.to_uppercase()),
            },
        }
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
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::single(&origin, "(file)", format!("cannot read the file: {e}"))
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::from_toml(&text, &origin, &base, env)
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
        validate(raw, origin, Namer::File, base, env, problems)
    }

    /// Builds a single-route configuration from `KEYPROXY_*` variables.
    pub fn from_env(env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let (raw, problems) = env::parse(env);
        let cwd = PathBuf::new();
        validate(raw, "environment", Namer::Env, &cwd, env, problems)
    }
}

/// Parses a duration setting: its default when absent; a problem (and the default) when it is
/// not a duration or lies outside `setting.min..=MAX_DURATION`.
fn duration(
    problems: &mut Problems,
    key: String,
    v: Option<&str>,
    setting: DurationSetting,
) -> Duration {
    let DurationSetting { default, min } = setting;
    let Some(v) = v else { return default };
    match humantime::parse_duration(v.trim()) {
        Ok(d) if d < min => {
            problems.add(
                key,
                format!(
                    "{v:?} is too short (at least {})",
                    humantime::format_duration(min)
                ),
            );
            default
        }
        Ok(d) if d > MAX_DURATION => {
            problems.add(
                key,
                format!(
                    "{v:?} is too long (at most {})",
                    humantime::format_duration(MAX_DURATION)
                ),
            );
            default
        }
        Ok(d) => d,
        Err(e) => {
            problems.add(
                key,
                format!("{v:?} is not a duration such as \"30s\" or \"5m\" ({e})"),
            );
            default
        }
    }
}

fn socket_addr(problems: &mut Problems, key: String, v: Option<&str>, default: &str) -> SocketAddr {
    let text = v.unwrap_or(default);
    match SocketAddr::from_str(text.trim()) {
        Ok(a) => a,
        Err(_) => {
            problems.add(
                key,
                format!("{text:?} is not an IP:port such as \"127.0.0.1:8080\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    }
}

fn validate(
    raw: RawFile,
    origin: &str,
    namer: Namer,
    base: &Path,
    env: &HashMap<String, String>,
    mut problems: Problems,
) -> Result<Config, ConfigError> {
    let g = |k: &str| namer.global(k);
    let listen = socket_addr(
        &mut problems,
        g("listen"),
        raw.listen.as_deref(),
        defaults::LISTEN,
    );
    let admin_listen = socket_addr(
        &mut problems,
        g("admin_listen"),
        raw.admin_listen.as_deref(),
        defaults::ADMIN_LISTEN,
    );
    if listen == admin_listen && listen.port() != 0 {
        problems.add(g("admin_listen"), "must differ from listen");
    }
    let drain_timeout = duration(
        &mut problems,
        g("drain_timeout"),
        raw.drain_timeout.as_deref(),
        defaults::DRAIN_TIMEOUT,
    );
    let connect_timeout = duration(
        &mut problems,
        g("connect_timeout"),
        raw.connect_timeout.as_deref(),
        defaults::CONNECT_TIMEOUT,
    );
    let max_connections = match raw.max_connections {
        Some(0) => {
            problems.add(g("max_connections"), "must be at least 1");
            1
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => defaults::MAX_CONNECTIONS,
    };
    let worker_threads = match raw.worker_threads {
        Some(0) => {
            problems.add(g("worker_threads"), "must be at least 1");
            None
        }
        Some(n) if n > defaults::MAX_WORKER_THREADS => {
            problems.add(
                g("worker_threads"),
                format!("at most {}", defaults::MAX_WORKER_THREADS),
            );
            None
        }
        Some(n) => usize::try_from(n).ok(),
        None => None,
    };
    let resolve = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base.join(p)
        }
    };
    let ca_bundle = raw.ca_bundle.as_deref().map(|p| {
        let path = resolve(p);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice()).collect();
                if certs.is_empty() || certs.iter().any(Result::is_err) {
                    problems.add(
                        g("ca_bundle"),
                        format!("{} holds no valid PEM certificate", path.display()),
                    );
                }
            }
            Err(e) => problems.add(
                g("ca_bundle"),
                format!("cannot read {}: {e}", path.display()),
            ),
        }
        path
    });

    let source = {
        let raw_src = raw.source.unwrap_or_default();
        match raw_src.kind.as_deref().unwrap_or(defaults::SOURCE) {
            "aws" => {
                if raw_src.path.is_some() {
                    problems.add(g("source.path"), "only the file source takes a path");
                }
                let aws = raw.aws.unwrap_or_default();
                if let Some(u) = &aws.endpoint_url {
                    if Uri::from_str(u)
                        .map(|u| u.scheme().is_none())
                        .unwrap_or(true)
                    {
                        problems.add(g("aws.endpoint_url"), format!("{u:?} is not a URL"));
                    }
                }
                SourceConfig::Aws(AwsSettings {
                    region: aws.region,
                    endpoint_url: aws.endpoint_url,
                    attempt_timeout: duration(
                        &mut problems,
                        g("aws.timeout"),
                        aws.timeout.as_deref(),
                        defaults::AWS_TIMEOUT,
                    ),
                    connect_timeout: duration(
                        &mut problems,
                        g("aws.connect_timeout"),
                        aws.connect_timeout.as_deref(),
                        defaults::AWS_CONNECT_TIMEOUT,
                    ),
                    max_attempts: aws.max_attempts.unwrap_or(defaults::AWS_MAX_ATTEMPTS),
                })
            }
            "file" => {
                if raw.aws.is_some() {
                    problems.add(g("aws"), "[aws] applies only to the aws source");
                }
                match raw_src.path {
                    Some(p) => SourceConfig::File(resolve(&p)),
                    None => {
                        problems.add(g("source.path"), "the file source needs a path");
                        SourceConfig::File(PathBuf::new())
                    }
                }
            }
            other => {
                problems.add(
                    g("source.type"),
                    format!("{other:?} is not a source: use \"aws\" or \"file\""),
                );
                SourceConfig::File(PathBuf::new())
            }
        }
    };

    let app_auth = raw.app_auth.and_then(|a| {
        let header = match a
            .header
            .as_deref()
            .unwrap_or(defaults::APP_TOKEN_HEADER)
            .parse::<HeaderName>()
        {
            Ok(h) => h,
            Err(_) => {
                problems.add(g("app_auth.header"), "not a valid header name");
                HeaderName::from_static(defaults::APP_TOKEN_HEADER)
            }
        };
        let token = match (&a.token_env, &a.token_file) {
            (Some(var), None) => match env.get(var) {
                Some(t) => Some(t.trim().to_owned()),
                None => {
                    problems.add(
                        g("app_auth.token_env"),
                        format!("the variable {var} is not set"),
                    );
                    None
                }
            },
            (None, Some(file)) => match std::fs::read_to_string(resolve(file)) {
                Ok(t) => Some(t.trim().to_owned()),
                Err(e) => {
                    problems.add(g("app_auth.token_file"), format!("cannot read {file}: {e}"));
                    None
                }
            },
            (Some(_), Some(_)) => {
                problems.add(g("app_auth"), "set token_env or token_file, not both");
                None
            }
            (None, None) => {
                problems.add(g("app_auth"), "needs token_env or token_file");
                None
            }
        }?;
        if token.len() < defaults::MIN_APP_TOKEN_LEN {
            problems.add(
                g("app_auth"),
                format!(
                    "the token must be at least {} characters",
                    defaults::MIN_APP_TOKEN_LEN
                ),
            );
            return None;
        }
        Some(AppAuth {
            header,
            token: crate::secrets::Secret::new(token),
        })
    });

    let raw_routes = raw.routes.unwrap_or_default();
    if raw_routes.is_empty() {
        problems.add(
            g("route"),
            match namer {
                Namer::File => "no route: add at least one [[route]]",
                Namer::Env => {
                    "no route: set KEYPROXY_UPSTREAM and KEYPROXY_SECRET_ID (or give --config FILE)"
                }
            },
        );
    }
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut prefixes = HashMap::new();
    let mut hosts = HashMap::new();
    for (i, r) in raw_routes.into_iter().enumerate() {
        let k = |f: &str| namer.route(i, f);
        if let Some(route) = validate_route(i, r, namer, &mut problems) {
            if !names.insert(route.name.clone()) {
                problems.add(
                    k("name"),
                    format!("{:?} is used by another route", route.name),
                );
            }
            if let Some(p) = &route.path_prefix {
                if let Some(other) = prefixes.insert(p.clone(), route.name.clone()) {
                    problems.add(
                        k("path_prefix"),
                        format!("{p:?} overlaps route {other:?}, which has the same prefix"),
                    );
                }
            }
            if let Some(h) = &route.host {
                if let Some(other) = hosts.insert(h.clone(), route.name.clone()) {
                    problems.add(
                        k("host"),
                        format!("{h:?} is already the host of route {other:?}"),
                    );
                }
            }
            routes.push(route);
        }
    }

    let config = Config {
        origin: origin.to_owned(),
        listen,
        admin_listen,
        source,
        routes,
        drain_timeout,
        max_connections,
        connect_timeout,
        ca_bundle,
        access_log: raw.access_log.unwrap_or(defaults::ACCESS_LOG),
        app_auth,
        worker_threads,
    };
    problems.into_result(origin, config)
}

/// Header names keyproxy must not be told to inject into.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

fn validate_route(
    i: usize,
    r: RawRoute,
    namer: Namer,
    problems: &mut Problems,
) -> Option<RouteConfig> {
    let k = |f: &str| namer.route(i, f);
    let before = problems.len();
    let name = match r.name {
        Some(n)
            if !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            n
        }
        Some(n) => {
            problems.add(
                k("name"),
                format!("{n:?}: use letters, digits, '-', '_' or '.'"),
            );
            n
        }
        None => {
            problems.add(k("name"), "missing: every route needs a name");
            String::new()
        }
    };
    let path_prefix = r.path_prefix.map(|p| {
        let norm = if p.len() > 1 {
            p.trim_end_matches('/').to_owned()
        } else {
            p.clone()
        };
        if !p.starts_with('/') {
            problems.add(k("path_prefix"), format!("{p:?} must start with '/'"));
        } else if p.contains(['?', '#', '%', '\\']) || p.split('/').any(|s| s == "." || s == "..") {
            problems.add(
                k("path_prefix"),
                format!("{p:?}: a plain path, without '?', '#', '%' or dot segments"),
            );
        }
        norm
    });
    let host = r.host.map(|h| {
        let lower = h.to_ascii_lowercase();
        if Authority::from_str(&lower)
            .map(|a| a.as_str().contains('@'))
            .unwrap_or(true)
            || lower.contains('/')
        {
            problems.add(
                k("host"),
                format!("{h:?} is not a host name (with an optional :port)"),
            );
        }
        lower
    });
    if path_prefix.is_none() && host.is_none() {
        problems.add(
            k("path_prefix"),
            "set path_prefix, host, or both: a route must match something",
        );
    }
    let upstream = match r.upstream.as_deref() {
        None => {
            problems.add(
                k("upstream"),
                "missing: the base URL requests go to, e.g. \"https://api.example.com/v1\"",
            );
            None
        }
        Some(u) => parse_upstream(u)
            .map_err(|m| problems.add(k("upstream"), m))
            .ok(),
    };
    let secret_id = match r.secret_id {
        Some(s) if !s.trim().is_empty() => s,
        _ => {
            problems.add(k("secret_id"), "missing: the secret's name or ARN");
            String::new()
        }
    };
    let version_stage = r
        .version_stage
        .unwrap_or_else(|| defaults::VERSION_STAGE.into());
    if version_stage.is_empty() || version_stage.len() > defaults::MAX_VERSION_STAGE_LEN {
        problems.add(
            k("version_stage"),
            "must be a staging label such as AWSCURRENT",
        );
    }
    if let Some(f) = &r.secret_field {
        if f.is_empty() {
            problems.add(
                k("secret_field"),
                "must not be empty (leave it out to use the whole secret)",
            );
        }
    }
    let injection = match (r.header, r.query_param) {
        (Some(_), Some(_)) => {
            problems.add(k("query_param"), "set header or query_param, not both");
            None
        }
        (h, None) => {
            let h = h.unwrap_or_else(|| defaults::HEADER.into());
            let name = match HeaderName::from_str(&h) {
                Ok(n) if RESERVED_HEADERS.contains(&n.as_str()) => {
                    problems.add(
                        k("header"),
                        format!("{h:?} is managed by the proxy and cannot carry a key"),
                    );
                    None
                }
                Ok(n) => Some(n),
                Err(_) => {
                    problems.add(k("header"), format!("{h:?} is not a valid header name"));
                    None
                }
            };
            let text = r.value.unwrap_or_else(|| defaults::HEADER_VALUE.into());
            let template = Template::parse(&text)
                .map_err(|e| problems.add(k("value"), format!("{text:?}: {e}")))
                .ok();
            name.zip(template)
                .map(|(name, template)| Injection::Header { name, template })
        }
        (None, Some(param)) => {
            if param.is_empty() || param.contains(['&', '=', '#', ' ']) {
                problems.add(
                    k("query_param"),
                    format!("{param:?} is not a plain parameter name"),
                );
            }
            let text = r.value.unwrap_or_else(|| defaults::QUERY_VALUE.into());
            Template::parse(&text)
                .map_err(|e| problems.add(k("value"), format!("{text:?}: {e}")))
                .ok()
                .map(|template| Injection::Query { param, template })
        }
    };
    let refresh_interval = duration(
        problems,
        k("refresh_interval"),
        r.refresh_interval.as_deref(),
        defaults::REFRESH_INTERVAL,
    );
    let refresh_cooldown = duration(
        problems,
        k("refresh_cooldown"),
        r.refresh_cooldown.as_deref(),
        defaults::REFRESH_COOLDOWN,
    );
    let timeout = duration(
        problems,
        k("timeout"),
        r.timeout.as_deref(),
        defaults::TIMEOUT,
    );
    let idle_timeout = duration(
        problems,
        k("idle_timeout"),
        r.idle_timeout.as_deref(),
        defaults::IDLE_TIMEOUT,
    );
    let max_replay_body = match r.max_replay_body {
        None => defaults::MAX_REPLAY_BODY,
        Some(SizeValue::Bytes(n)) => n,
        Some(SizeValue::Text(t)) => match bytesize::ByteSize::from_str(t.trim()) {
            Ok(b) => b.as_u64(),
            Err(_) => {
                problems.add(
                    k("max_replay_body"),
                    format!("{t:?} is not a size such as \"256KiB\""),
                );
                0
            }
        },
    };
    if max_replay_body > defaults::MAX_REPLAY_BODY_LIMIT {
        problems.add(
            k("max_replay_body"),
            "at most 64MiB (each replayable request holds its body in memory)",
        );
    }
    if problems.len() > before {
        return None;
    }
    Some(RouteConfig {
        name,
        path_prefix,
        host,
        upstream: upstream?,
        secret_id,
        version_stage,
        secret_field: r.secret_field,
        injection: injection?,
        refresh_interval,
        refresh_cooldown,
        pending_fallback: r.pending_fallback.unwrap_or(defaults::PENDING_FALLBACK),
        retry_on_401: r.retry_on_401.unwrap_or(defaults::RETRY_ON_401),
        http2: r.http2.unwrap_or(defaults::HTTP2),
        max_replay_body,
        timeout,
        idle_timeout,
    })
}

/// Parses an upstream base URL: http(s), a host, an optional port and base path, nothing else.
pub fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let uri = Uri::from_str(text.trim()).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        Some(s) => return Err(format!("{text:?}: scheme {s:?} is not http or https")),
        None => {
            return Err(format!(
                "{text:?} needs a scheme: https://host[:port][/base]"
            ))
        }
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "{text:?}: credentials in the URL are not allowed; use a secret"
        ));
    }
    if authority.host().is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!(
            "{text:?}: a query string is not allowed in upstream"
        ));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    let host_header = HeaderValue::from_str(authority.as_str())
        .map_err(|_| format!("{text:?}: the host cannot be a Host header"))?;
    Ok(Upstream {
        scheme,
        authority,
        base_path,
        host_header,
    })
}

#[cfg(test)]
mod tests {
    use super::test_support::{env, keys, toml, MINIMAL};
    use super::*;

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
        assert!(r.http2);
        assert!(matches!(&r.injection, Injection::Header { name, template }
            if name == "authorization" && template.as_text() == "Bearer {secret}"));
        assert!(matches!(c.source, SourceConfig::Aws(_)));
    }

    #[test]
    fn every_problem_is_reported() {
        let e = toml(
            r#"
            listen = "localhost:80"
            [[route]]
            name = "a"
            path_prefix = "payments"
            upstream = "ftp://x"
            secret_id = ""
            value = "Bearer"
            refresh_interval = "soon"
            max_replay_body = "lots"
        "#,
        )
        .expect_err("invalid");
        assert_eq!(
            keys(&e),
            vec![
                "listen",
                "route[0].path_prefix",
                "route[0].upstream",
                "route[0].secret_id",
                "route[0].value",
                "route[0].refresh_interval",
                "route[0].max_replay_body"
            ]
        );
    }

    #[test]
    fn overlapping_routes_are_refused() {
        let e = toml(&format!(
            "{MINIMAL}\n{}",
            MINIMAL.replace("/payments/", "/payments")
        ))
        .expect_err("overlap");
        assert_eq!(keys(&e), vec!["route[1].name", "route[1].path_prefix"]);
    }

    #[test]
    fn header_and_query_param_conflict() {
        let e = toml(&format!(
            "{MINIMAL}\nheader = \"X-Api-Key\"\nquery_param = \"k\""
        ))
        .expect_err("both");
        assert_eq!(keys(&e), vec!["route[0].query_param"]);
        let e = toml(&format!("{MINIMAL}\nheader = \"Host\"")).expect_err("reserved");
        assert_eq!(keys(&e), vec!["route[0].header"]);
    }

    #[test]
    fn upstream_rules() {
        assert!(parse_upstream("https://api.example.com").is_ok());
        assert!(parse_upstream("http://127.0.0.1:8000/base").is_ok());
        assert!(parse_upstream("api.example.com").is_err());
        assert!(parse_upstream("https://user:pw@api.example.com").is_err());
        assert!(parse_upstream("https://api.example.com/?a=1").is_err());
    }

    #[test]
    fn file_source_path_is_relative_to_the_config() {
        let c = Config::from_toml(
            &format!("[source]\ntype = \"file\"\npath = \"s.json\"\n{MINIMAL}"),
            "cfg/t.toml",
            Path::new("cfg"),
            &HashMap::new(),
        )
        .expect("valid");
        assert_eq!(c.source, SourceConfig::File(PathBuf::from("cfg/s.json")));
    }

    #[test]
    fn app_token_is_checked_and_hidden() {
        let c = Config::from_toml(
            &format!("[app_auth]\ntoken_env = \"TOK\"\n{MINIMAL}"),
            "t.toml",
            Path::new("."),
            &env(&[("TOK", "0123456789abcdef-long")]),
        )
        .expect("valid");
        let auth = c.app_auth.expect("auth");
        assert!(!format!("{auth:?}").contains("0123456789"));
        let e = Config::from_toml(
            &format!("[app_auth]\ntoken_env = \"TOK\"\n{MINIMAL}"),
            "t.toml",
            Path::new("."),
            &env(&[("TOK", "short")]),
        )
        .expect_err("short");
        assert_eq!(keys(&e), vec!["app_auth"]);
    }
}
