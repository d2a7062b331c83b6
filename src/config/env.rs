//! `KEYPROXY_*` environment variables → raw settings: a single route (no config file), and the
//! global variables that also override a file. The environment is a map passed in, never read
//! here, so tests pass their own.

use std::collections::HashMap;

use super::defaults;
use super::file::{RawAppAuth, RawAws, RawFile, RawRoute, RawSource, SizeValue};
use super::Problems;

/// Environment variables that configure a route or the listeners.
const ROUTE_ENV: &[&str] = &[
    "KEYPROXY_ROUTE_NAME",
    "KEYPROXY_UPSTREAM",
    "KEYPROXY_HOST",
    "KEYPROXY_SECRET_ID",
    "KEYPROXY_SECRET_FIELD",
    "KEYPROXY_VERSION_STAGE",
    "KEYPROXY_HEADER",
    "KEYPROXY_VALUE",
    "KEYPROXY_QUERY_PARAM",
    "KEYPROXY_ALLOW",
    "KEYPROXY_PATH_PREFIX",
    "KEYPROXY_REFRESH_INTERVAL",
    "KEYPROXY_REFRESH_COOLDOWN",
    "KEYPROXY_PENDING_FALLBACK",
    "KEYPROXY_HTTP2",
    "KEYPROXY_RETRY_ON_401",
    "KEYPROXY_MAX_REPLAY_BODY",
    "KEYPROXY_TIMEOUT",
    "KEYPROXY_IDLE_TIMEOUT",
    "KEYPROXY_SOURCE",
    "KEYPROXY_SECRETS_FILE",
];
/// Environment variables that apply with or without a config file.
const GLOBAL_ENV: &[&str] = &[
    "KEYPROXY_LISTEN",
    "KEYPROXY_ADMIN_LISTEN",
    "KEYPROXY_LISTEN_MODE",
    "KEYPROXY_CONFIG",
    "KEYPROXY_LOG",
    "KEYPROXY_LOG_FORMAT",
    "KEYPROXY_ACCESS_LOG",
    "KEYPROXY_APP_TOKEN",
    "KEYPROXY_APP_TOKEN_FILE",
    "KEYPROXY_DRAIN_TIMEOUT",
    "KEYPROXY_MAX_CONNECTIONS",
    "KEYPROXY_CA_BUNDLE",
    "KEYPROXY_WORKER_THREADS",
    "KEYPROXY_AWS_ROLE_ARN",
    "KEYPROXY_AWS_EXTERNAL_ID",
    "KEYPROXY_AWS_SESSION_NAME",
];

/// Raw settings for a configuration without a file: the route (if `KEYPROXY_UPSTREAM` or
/// `KEYPROXY_SECRET_ID` is set), the source and the globals, with a problem for each unknown
/// `KEYPROXY_*` variable and each value that is not of its type.
pub(super) fn parse(env: &HashMap<String, String>) -> (RawFile, Problems) {
    let mut problems = Problems::default();
    refuse_unknown(env, &mut problems);
    let get = |k: &str| env.get(k).cloned();
    let mut raw = RawFile::default();
    if get("KEYPROXY_UPSTREAM").is_some() || get("KEYPROXY_SECRET_ID").is_some() {
        raw.routes = Some(vec![route(env, &mut problems)]);
    }
    if get("KEYPROXY_SOURCE").is_some() || get("KEYPROXY_SECRETS_FILE").is_some() {
        raw.source = Some(RawSource {
            kind: get("KEYPROXY_SOURCE"),
            path: get("KEYPROXY_SECRETS_FILE"),
        });
    }
    apply_globals(&mut raw, env, &mut problems);
    (raw, problems)
}

/// A problem for each `KEYPROXY_*` variable keyproxy does not know.
fn refuse_unknown(env: &HashMap<String, String>, problems: &mut Problems) {
    for k in env.keys().filter(|k| k.starts_with("KEYPROXY_")) {
        if !ROUTE_ENV.contains(&k.as_str()) && !GLOBAL_ENV.contains(&k.as_str()) {
            problems.add(k.clone(), "unknown variable (check its spelling)");
        }
    }
}

/// The single route the variables describe.
fn route(env: &HashMap<String, String>, problems: &mut Problems) -> RawRoute {
    let get = |k: &str| env.get(k).cloned();
    let retry_on_401 = flag(env, "KEYPROXY_RETRY_ON_401", problems);
    let pending_fallback = flag(env, "KEYPROXY_PENDING_FALLBACK", problems);
    let http2 = flag(env, "KEYPROXY_HTTP2", problems);
    RawRoute {
        name: Some(get("KEYPROXY_ROUTE_NAME").unwrap_or_else(|| defaults::ENV_ROUTE_NAME.into())),
        path_prefix: get("KEYPROXY_PATH_PREFIX").or_else(|| {
            if get("KEYPROXY_HOST").is_some() {
                None
            } else {
                Some(defaults::ENV_PATH_PREFIX.into())
            }
        }),
        host: get("KEYPROXY_HOST"),
        upstream: get("KEYPROXY_UPSTREAM"),
        secret_id: get("KEYPROXY_SECRET_ID"),
        secret_field: get("KEYPROXY_SECRET_FIELD"),
        version_stage: get("KEYPROXY_VERSION_STAGE"),
        refresh_interval: get("KEYPROXY_REFRESH_INTERVAL"),
        refresh_cooldown: get("KEYPROXY_REFRESH_COOLDOWN"),
        pending_fallback,
        header: get("KEYPROXY_HEADER"),
        value: get("KEYPROXY_VALUE"),
        query_param: get("KEYPROXY_QUERY_PARAM"),
        headers: None,
        basic_auth: None,
        // Comma-separated `METHOD PATH` patterns (a pattern has no comma).
        allow: get("KEYPROXY_ALLOW").map(|v| {
            v.split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect()
        }),
        retry_on_401,
        http2,
        max_replay_body: get("KEYPROXY_MAX_REPLAY_BODY").map(SizeValue::Text),
        timeout: get("KEYPROXY_TIMEOUT"),
        idle_timeout: get("KEYPROXY_IDLE_TIMEOUT"),
        oauth2: None,
        // The route reads with KEYPROXY_AWS_ROLE_ARN, the `[aws]` one.
        role_arn: None,
        external_id: None,
        session_name: None,
    }
}

/// With a config file, routes come from the file only: a problem for each route variable set.
pub(super) fn refuse_route_variables(env: &HashMap<String, String>, problems: &mut Problems) {
    for name in ROUTE_ENV {
        if env.contains_key(*name) {
            problems.add(
                (*name).to_owned(),
                "route variables cannot be combined with a config file; put the route in the file",
            );
        }
    }
}

/// Applies variables that override the file's globals (and configure them in env mode).
pub(super) fn apply_globals(
    raw: &mut RawFile,
    env: &HashMap<String, String>,
    problems: &mut Problems,
) {
    if let Some(v) = env.get("KEYPROXY_LISTEN") {
        raw.listen = Some(v.clone());
    }
    if let Some(v) = env.get("KEYPROXY_ADMIN_LISTEN") {
        raw.admin_listen = Some(v.clone());
    }
    if let Some(v) = env.get("KEYPROXY_LISTEN_MODE") {
        raw.listen_mode = Some(v.clone());
    }
    if let Some(v) = env.get("KEYPROXY_DRAIN_TIMEOUT") {
        raw.drain_timeout = Some(v.clone());
    }
    if let Some(v) = env.get("KEYPROXY_CA_BUNDLE") {
        raw.ca_bundle = Some(v.clone());
    }
    if let Some(n) = whole_number(env, "KEYPROXY_WORKER_THREADS", problems) {
        raw.worker_threads = Some(n);
    }
    if let Some(n) = whole_number(env, "KEYPROXY_MAX_CONNECTIONS", problems) {
        raw.max_connections = Some(n);
    }
    if let Some(b) = flag(env, "KEYPROXY_ACCESS_LOG", problems) {
        raw.access_log = Some(b);
    }
    let role = [
        "KEYPROXY_AWS_ROLE_ARN",
        "KEYPROXY_AWS_EXTERNAL_ID",
        "KEYPROXY_AWS_SESSION_NAME",
    ]
    .map(|k| env.get(k).cloned());
    if role.iter().any(Option::is_some) {
        let aws = raw.aws.get_or_insert_with(RawAws::default);
        let [role_arn, external_id, session_name] = role;
        aws.role_arn = role_arn.or(aws.role_arn.take());
        aws.external_id = external_id.or(aws.external_id.take());
        aws.session_name = session_name.or(aws.session_name.take());
    }
    if env.contains_key("KEYPROXY_APP_TOKEN") || env.contains_key("KEYPROXY_APP_TOKEN_FILE") {
        let auth = raw.app_auth.get_or_insert_with(RawAppAuth::default);
        if env.contains_key("KEYPROXY_APP_TOKEN") {
            auth.token_env = Some("KEYPROXY_APP_TOKEN".into());
        }
        if let Some(f) = env.get("KEYPROXY_APP_TOKEN_FILE") {
            auth.token_file = Some(f.clone());
        }
    }
}

/// The variable `name` as true or false; a problem if it is set to anything else.
fn flag(env: &HashMap<String, String>, name: &str, problems: &mut Problems) -> Option<bool> {
    typed(env, name, "true or false", parse_bool, problems)
}

/// The variable `name` as a whole number; a problem if it is set to anything else.
fn whole_number(env: &HashMap<String, String>, name: &str, problems: &mut Problems) -> Option<u64> {
    typed(env, name, "a whole number", |v| v.parse().ok(), problems)
}

/// The variable `name` read by `parse`; a problem saying what was `expected` if it does not read.
fn typed<T>(
    env: &HashMap<String, String>,
    name: &str,
    expected: &str,
    parse: impl Fn(&str) -> Option<T>,
    problems: &mut Problems,
) -> Option<T> {
    let v = env.get(name)?;
    let parsed = parse(v);
    if parsed.is_none() {
        problems.add(name.to_owned(), format!("expected {expected}, got {v:?}"));
    }
    parsed
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;
    use std::time::Duration;

    use crate::config::test_support::{env, keys, MINIMAL};
    use crate::config::Config;

    #[test]
    fn env_single_route() {
        let c = Config::from_env(&env(&[
            ("KEYPROXY_UPSTREAM", "https://api.example.com"),
            ("KEYPROXY_SECRET_ID", "prod/x"),
            ("KEYPROXY_HEADER", "X-Api-Key"),
            ("KEYPROXY_VALUE", "{secret}"),
            ("KEYPROXY_LISTEN", "127.0.0.1:18081"),
            ("KEYPROXY_REFRESH_INTERVAL", "30s"),
        ]))
        .expect("valid");
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].name, "default");
        assert_eq!(c.routes[0].path_prefix.as_deref(), Some("/"));
        assert_eq!(c.routes[0].refresh_interval, Duration::from_secs(30));
        assert_eq!(c.listen.tcp().map(|a| a.port()), Some(18081));
        assert_eq!(c.origin, "environment");
    }

    #[test]
    fn env_allow_is_comma_separated() {
        let base = [
            ("KEYPROXY_UPSTREAM", "https://api.example.com"),
            ("KEYPROXY_SECRET_ID", "prod/x"),
        ];
        let with = |allow: &str| {
            let mut pairs = base.to_vec();
            pairs.push(("KEYPROXY_ALLOW", allow));
            Config::from_env(&env(&pairs))
        };
        let c = with("GET /reports/*, POST /reports/*/run").expect("valid");
        let a = c.routes[0].allow.as_ref().expect("allow");
        assert!(a.permits("POST", "/reports/1/run"));
        assert!(!a.permits("GET", "/admin"));
        let e = with("GET /ok, reports").expect_err("bad");
        assert_eq!(keys(&e), vec!["KEYPROXY_ALLOW"]);
        assert!(e.to_string().contains("\"reports\""), "{e}");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = Config::from_env(&env(&[
            ("KEYPROXY_UPSTREAM", "nope"),
            ("KEYPROXY_SECRET_ID", "x"),
            ("KEYPROXY_REFRESH_INTERVAL", "0s"),
            ("KEYPROXY_RETRY_ON_401", "maybe"),
            ("KEYPROXY_UPSTRAEM", "typo"),
        ]))
        .expect_err("invalid");
        let mut k = keys(&e);
        k.sort();
        assert_eq!(
            k,
            vec![
                "KEYPROXY_REFRESH_INTERVAL",
                "KEYPROXY_RETRY_ON_401",
                "KEYPROXY_UPSTRAEM",
                "KEYPROXY_UPSTREAM"
            ]
        );
        let e = Config::from_env(&HashMap::new()).expect_err("empty");
        assert_eq!(keys(&e), vec!["KEYPROXY_UPSTREAM"]);
    }

    #[test]
    fn file_plus_route_env_is_refused() {
        let e = Config::from_toml(
            MINIMAL,
            "t.toml",
            Path::new("."),
            &env(&[("KEYPROXY_UPSTREAM", "x")]),
        )
        .expect_err("mixed");
        assert_eq!(keys(&e), vec!["KEYPROXY_UPSTREAM"]);
        let c = Config::from_toml(
            MINIMAL,
            "t.toml",
            Path::new("."),
            &env(&[("KEYPROXY_LISTEN", "127.0.0.1:1")]),
        )
        .expect("override");
        assert_eq!(c.listen.tcp().map(|a| a.port()), Some(1));
    }
}
