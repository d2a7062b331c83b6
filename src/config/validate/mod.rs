//! Raw settings → a typed [`Config`]: each section's checks in its own file, each check a small
//! function that reports to the shared [`Problems`] and returns the typed value (or a stand-in,
//! so that checking goes on and every problem is reported at once).
//!
//! - `global`: listeners (and their socket files' mode), drain and connect timeouts, connection and thread limits, CA bundle,
//!   the development echo API.
//! - `source`: `[source]` and `[aws]`.
//! - `app_auth`: the app-side token.
//! - `route`: each `[[route]]` and the list as a whole (names, prefixes and hosts unique).
//! - `injection`: where a route's key goes (header or query parameter) and its template.
//! - `oauth2`: `[route.oauth2]`, a route whose key is an access token minted from client
//!   credentials.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use super::defaults::{self, DurationSetting, MAX_DURATION};
use super::file::RawFile;
use super::names::Namer;
use super::{Config, ConfigError, Problems};
use crate::secrets::aws::AwsSettings;

mod app_auth;
mod global;
mod injection;
mod oauth2;
mod route;
mod source;

pub use route::parse_upstream;

/// Validates every section of `raw`, after the `problems` parsing found; `Ok` only if there is
/// none at all. Relative paths resolve against `base`; `env` holds the variables a token may
/// be read from.
pub(super) fn validate(
    raw: RawFile,
    origin: &str,
    namer: Namer,
    base: &Path,
    env: &HashMap<String, String>,
    mut problems: Problems,
) -> Result<Config, ConfigError> {
    let g = |k: &str| namer.global(k);
    let p = &mut problems;
    let (listen, admin_listen) =
        global::listeners(raw.listen.as_deref(), raw.admin_listen.as_deref(), &g, p);
    let listen_mode = global::listen_mode(raw.listen_mode.as_deref(), g("listen_mode"), p);
    let drain_timeout = duration(
        p,
        g("drain_timeout"),
        raw.drain_timeout.as_deref(),
        defaults::DRAIN_TIMEOUT,
    );
    let connect_timeout = duration(
        p,
        g("connect_timeout"),
        raw.connect_timeout.as_deref(),
        defaults::CONNECT_TIMEOUT,
    );
    let max_connections = global::max_connections(raw.max_connections, g("max_connections"), p);
    let worker_threads = global::worker_threads(raw.worker_threads, g("worker_threads"), p);
    let ca_bundle = global::ca_bundle(raw.ca_bundle.as_deref(), base, g("ca_bundle"), p);
    let source = source::source(raw.source.unwrap_or_default(), raw.aws, base, &g, p);
    let app_auth = raw
        .app_auth
        .and_then(|a| app_auth::app_auth(a, base, env, &g, p));
    let dev_echo = raw.dev.and_then(|d| {
        global::dev_echo(
            d.echo.as_deref(),
            (&listen, &admin_listen),
            g("dev.echo"),
            p,
        )
    });
    let raw_routes = raw.routes.unwrap_or_default();
    source::route_roles_need_aws(&source, &raw_routes, namer, p);
    let mut routes = route::routes(raw_routes, namer, p);
    source::inherit_role(&source, &mut routes);
    let config = Config {
        origin: origin.to_owned(),
        listen,
        admin_listen,
        listen_mode,
        source,
        routes,
        drain_timeout,
        max_connections,
        connect_timeout,
        ca_bundle,
        access_log: raw.access_log.unwrap_or(defaults::ACCESS_LOG),
        app_auth,
        worker_threads,
        dev_echo,
    };
    problems.into_result(origin, config)
}

/// `[aws]` and `ca_bundle` alone (for rotation, which needs nothing else of the file).
pub(super) fn aws_only(
    raw: RawFile,
    base: &Path,
    problems: &mut Problems,
) -> (AwsSettings, Option<PathBuf>) {
    let g = |k: &str| Namer::File.global(k);
    let aws = source::aws_settings(raw.aws.unwrap_or_default(), &g, problems);
    let ca_bundle = global::ca_bundle(raw.ca_bundle.as_deref(), base, g("ca_bundle"), problems);
    (aws, ca_bundle)
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

/// Parses an `IP:port` (`default` when absent); a problem, and port 0, when it is not one.
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

/// A path from the settings: as is if absolute, else relative to `base` (the config file's
/// folder).
fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{keys, toml};

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
}
