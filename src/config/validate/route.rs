//! Routes: each `[[route]]` (matching, `allow`, upstream, secret, timing, replay body) and the
//! list as a whole (at least one; names, prefixes and hosts unique).

use std::collections::HashMap;
use std::str::FromStr;

use http::header::HeaderValue;
use http::uri::{Authority, Scheme};
use http::Uri;

use super::{duration, injection, oauth2};
use crate::allow::Allow;
use crate::config::defaults::{self, DurationSetting};
use crate::config::file::{RawRoute, SizeValue};
use crate::config::names::Namer;
use crate::config::{Problems, RouteConfig, Upstream};

/// Every route that passes its own checks, in order; problems for a missing route list and for
/// a name, prefix or host used twice (checked for every route, whether or not its other settings
/// pass, so that they show in the same pass as the rest).
pub(super) fn routes(
    raw: Vec<RawRoute>,
    namer: Namer,
    problems: &mut Problems,
) -> Vec<RouteConfig> {
    if raw.is_empty() {
        problems.add(
            namer.global("route"),
            match namer {
                Namer::File => "no route: add at least one [[route]]",
                Namer::Env => {
                    "no route: set KEYPROXY_UPSTREAM and KEYPROXY_SECRET_ID (or give --config FILE)"
                }
            },
        );
    }
    let mut routes = Vec::new();
    let mut seen = Seen::default();
    for (i, r) in raw.into_iter().enumerate() {
        let k = |f: &str| namer.route(i, f);
        seen.check(i, &r, &k, problems);
        if let Some(route) = route(r, &k, problems) {
            routes.push(route);
        }
    }
    routes
}

/// What the routes so far claim: names, prefixes and hosts, each with the first route (its
/// index) that has it.
#[derive(Default)]
struct Seen {
    names: HashMap<String, usize>,
    prefixes: HashMap<String, usize>,
    hosts: HashMap<String, usize>,
}

impl Seen {
    /// Records route `i`; a problem for each thing an earlier route already claims.
    fn check(
        &mut self,
        i: usize,
        r: &RawRoute,
        k: &dyn Fn(&str) -> String,
        problems: &mut Problems,
    ) {
        let claims = [
            (&mut self.names, "name", r.name.clone()),
            (
                &mut self.prefixes,
                "path_prefix",
                r.path_prefix.as_deref().map(normalized_prefix),
            ),
            (
                &mut self.hosts,
                "host",
                r.host.as_deref().map(str::to_ascii_lowercase),
            ),
        ];
        for (seen, key, value) in claims {
            let Some(value) = value.filter(|v| !v.is_empty()) else {
                continue;
            };
            if let Some(first) = seen.get(&value) {
                problems.add(
                    k(key),
                    format!("{value:?} is already the {key} of route #{}", first + 1),
                );
            } else {
                seen.insert(value, i);
            }
        }
    }
}

/// One route; `None` if any of its settings has a problem. `k` names its keys.
fn route(
    mut r: RawRoute,
    k: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<RouteConfig> {
    let before = problems.len();
    let oauth2 = oauth2::oauth2(&mut r, k, problems);
    let name = name(r.name, k("name"), problems);
    let path_prefix = r
        .path_prefix
        .map(|p| path_prefix(p, k("path_prefix"), problems));
    let host = r.host.map(|h| host(h, k("host"), problems));
    if path_prefix.is_none() && host.is_none() {
        problems.add(
            k("path_prefix"),
            "set path_prefix, host, or both: a route must match something",
        );
    }
    let upstream = upstream(r.upstream.as_deref(), k("upstream"), problems);
    let secret_id = secret_id(r.secret_id, k("secret_id"), problems);
    let version_stage = version_stage(r.version_stage, k("version_stage"), problems);
    secret_field(r.secret_field.as_deref(), k("secret_field"), problems);
    let injection = injection::injection(
        injection::RawInjection {
            header: r.header,
            value: r.value,
            query_param: r.query_param,
            headers: r.headers,
            basic_auth: r.basic_auth,
        },
        k,
        problems,
    );
    if let (Some(f), Some(inj)) = (&r.secret_field, &injection) {
        if !inj.uses_secret() {
            problems.add(
                k("secret_field"),
                format!("{f:?} is set, but no template uses {{secret}} ({{secret.FIELD}} reads fields itself): remove it"),
            );
        }
    }
    let allow = r.allow.and_then(|a| allow(&a, k, problems));
    let mut timing = |key: &str, v: Option<String>, setting: DurationSetting| {
        duration(problems, k(key), v.as_deref(), setting)
    };
    let refresh_interval = timing(
        "refresh_interval",
        r.refresh_interval,
        defaults::REFRESH_INTERVAL,
    );
    let refresh_cooldown = timing(
        "refresh_cooldown",
        r.refresh_cooldown,
        defaults::REFRESH_COOLDOWN,
    );
    let timeout = timing("timeout", r.timeout, defaults::TIMEOUT);
    let idle_timeout = timing("idle_timeout", r.idle_timeout, defaults::IDLE_TIMEOUT);
    let max_replay_body = max_replay_body(r.max_replay_body, k("max_replay_body"), problems);
    let role = super::source::assume_role(r.role_arn, r.external_id, r.session_name, k, problems);
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
        allow,
        refresh_interval,
        refresh_cooldown,
        pending_fallback: r.pending_fallback.unwrap_or(defaults::PENDING_FALLBACK),
        retry_on_401: r.retry_on_401.unwrap_or(defaults::RETRY_ON_401),
        http2: r.http2.unwrap_or(defaults::HTTP2),
        max_replay_body,
        timeout,
        idle_timeout,
        oauth2,
        role,
    })
}

/// `name`: required; letters, digits, `-`, `_` and `.`.
fn name(v: Option<String>, key: String, problems: &mut Problems) -> String {
    match v {
        Some(n)
            if !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            n
        }
        Some(n) => {
            problems.add(key, format!("{n:?}: use letters, digits, '-', '_' or '.'"));
            n
        }
        None => {
            problems.add(key, "missing: every route needs a name");
            String::new()
        }
    }
}

/// A prefix as routes are matched by it: without its trailing slashes (`/` stays `/`).
fn normalized_prefix(p: &str) -> String {
    if p.len() > 1 {
        p.trim_end_matches('/').to_owned()
    } else {
        p.to_owned()
    }
}

/// `path_prefix`: a plain absolute path; kept without its trailing slashes (`/` stays `/`).
fn path_prefix(p: String, key: String, problems: &mut Problems) -> String {
    let norm = normalized_prefix(&p);
    if !p.starts_with('/') {
        problems.add(key, format!("{p:?} must start with '/'"));
    } else if p.contains(['?', '#', '%', '\\']) || p.split('/').any(|s| s == "." || s == "..") {
        problems.add(
            key,
            format!("{p:?}: a plain path, without '?', '#', '%' or dot segments"),
        );
    }
    norm
}

/// `host`: a host name with an optional port, no user info or path; kept in lower case.
fn host(h: String, key: String, problems: &mut Problems) -> String {
    let lower = h.to_ascii_lowercase();
    if Authority::from_str(&lower)
        .map(|a| a.as_str().contains('@'))
        .unwrap_or(true)
        || lower.contains('/')
    {
        problems.add(
            key,
            format!("{h:?} is not a host name (with an optional :port)"),
        );
    }
    lower
}

/// `upstream`: required; see [`parse_upstream`].
fn upstream(v: Option<&str>, key: String, problems: &mut Problems) -> Option<Upstream> {
    match v {
        None => {
            problems.add(
                key,
                "missing: the base URL requests go to, e.g. \"https://api.example.com/v1\"",
            );
            None
        }
        Some(u) => parse_upstream(u).map_err(|m| problems.add(key, m)).ok(),
    }
}

/// `secret_id`: required, not blank.
fn secret_id(v: Option<String>, key: String, problems: &mut Problems) -> String {
    match v {
        Some(s) if !s.trim().is_empty() => s,
        _ => {
            problems.add(key, "missing: the secret's name or ARN");
            String::new()
        }
    }
}

/// `version_stage`: a staging label, 1 to [`defaults::MAX_VERSION_STAGE_LEN`] characters.
fn version_stage(v: Option<String>, key: String, problems: &mut Problems) -> String {
    let stage = v.unwrap_or_else(|| defaults::VERSION_STAGE.into());
    if stage.is_empty() || stage.len() > defaults::MAX_VERSION_STAGE_LEN {
        problems.add(key, "must be a staging label such as AWSCURRENT");
    }
    stage
}

/// `secret_field`: absent or not empty.
fn secret_field(v: Option<&str>, key: String, problems: &mut Problems) {
    if v == Some("") {
        problems.add(
            key,
            "must not be empty (leave it out to use the whole secret)",
        );
    }
}

/// `allow`: `METHOD PATH` patterns, compiled; a problem for each bad one (`allow[i]`), and for
/// an empty list (which would refuse everything).
fn allow(
    patterns: &[String],
    k: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<Allow> {
    if patterns.is_empty() {
        problems.add(
            k("allow"),
            "an empty list allows nothing: list \"METHOD PATH\" patterns, or leave allow out to forward every request",
        );
        return None;
    }
    match Allow::parse(patterns) {
        Ok(a) => Some(a),
        Err(bad) => {
            for (i, why) in bad {
                problems.add(k(&format!("allow[{i}]")), why);
            }
            None
        }
    }
}

/// `max_replay_body`: a number of bytes or a size such as `"256KiB"`, at most
/// [`defaults::MAX_REPLAY_BODY_LIMIT`].
fn max_replay_body(v: Option<SizeValue>, key: String, problems: &mut Problems) -> u64 {
    let bytes = match v {
        None => defaults::MAX_REPLAY_BODY,
        Some(SizeValue::Bytes(n)) => n,
        Some(SizeValue::Text(t)) => match bytesize::ByteSize::from_str(t.trim()) {
            Ok(b) => b.as_u64(),
            Err(_) => {
                problems.add(
                    key.clone(),
                    format!("{t:?} is not a size such as \"256KiB\""),
                );
                0
            }
        },
    };
    if bytes > defaults::MAX_REPLAY_BODY_LIMIT {
        problems.add(
            key,
            "at most 64MiB (each replayable request holds its body in memory)",
        );
    }
    bytes
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
    use super::parse_upstream;
    use crate::config::test_support::{keys, toml, MINIMAL};

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
    fn allow_patterns_are_checked_each_by_its_key() {
        let c = toml(&format!(
            "{MINIMAL}\nallow = [\"GET /reports/*\", \"POST /reports/*/run\", \"* /status/**\", \"GET /\"]"
        ))
        .expect("valid");
        let a = c.routes[0].allow.as_ref().expect("allow");
        assert!(a.permits("GET", "/reports/1"));
        assert!(!a.permits("DELETE", "/reports/1"));
        let e = toml(&format!(
            "{MINIMAL}\nallow = [\"/reports\", \"G@T /x\", \"GET reports\", \"GET /a/***\", \"GET /a/**x\", \"get /x\", \"GET /a//b\", \"GET /ok\", \"GET /a b\", \"GET /a%2Fb\", \"GET /r*\"]"
        ))
        .expect_err("bad");
        let want: Vec<String> = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]
            .iter()
            .map(|i| format!("route[0].allow[{i}]"))
            .collect();
        assert_eq!(keys(&e), want, "{e}");
        let text = e.to_string();
        for part in [
            "expected METHOD PATH",
            "is not a method",
            "must start with '/'",
            "must be a whole segment",
            "case-sensitive: write \"GET\"",
            "empty segment",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        let e = toml(&format!("{MINIMAL}\nallow = []")).expect_err("empty");
        assert_eq!(keys(&e), vec!["route[0].allow"]);
    }

    #[test]
    fn secret_field_without_a_secret_placeholder_is_refused() {
        let e = toml(&format!(
            "{MINIMAL}\nsecret_field = \"a\"\nheaders = {{ \"X-A\" = \"{{secret.a}}\" }}"
        ))
        .expect_err("unused");
        assert_eq!(keys(&e), vec!["route[0].secret_field"]);
    }

    #[test]
    fn upstream_rules() {
        assert!(parse_upstream("https://api.example.com").is_ok());
        assert!(parse_upstream("http://127.0.0.1:8000/base").is_ok());
        assert!(parse_upstream("api.example.com").is_err());
        assert!(parse_upstream("https://user:pw@api.example.com").is_err());
        assert!(parse_upstream("https://api.example.com/?a=1").is_err());
    }
}
