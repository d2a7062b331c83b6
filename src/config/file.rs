//! The TOML file → raw settings: the serde structs both sources fill, unknown keys (collected
//! with `serde_ignored`, so each is named rather than the first one failing the parse) and
//! syntax errors (with their line).

use serde::Deserialize;

use super::{ConfigError, Problems};

/// A number or a string such as `"256KiB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// The whole file, as written: nothing checked yet. The environment fills the same struct.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawFile {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) listen_mode: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) max_connections: Option<u64>,
    pub(super) connect_timeout: Option<String>,
    pub(super) ca_bundle: Option<String>,
    pub(super) access_log: Option<bool>,
    pub(super) worker_threads: Option<u64>,
    pub(super) aws: Option<RawAws>,
    pub(super) source: Option<RawSource>,
    pub(super) app_auth: Option<RawAppAuth>,
    pub(super) dev: Option<RawDev>,
    #[serde(rename = "route")]
    pub(super) routes: Option<Vec<RawRoute>>,
}

/// `[aws]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawAws {
    pub(super) region: Option<String>,
    pub(super) endpoint_url: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) max_attempts: Option<u32>,
    pub(super) startup_jitter: Option<String>,
    pub(super) role_arn: Option<String>,
    pub(super) external_id: Option<String>,
    pub(super) session_name: Option<String>,
}

/// `[source]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawSource {
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
    pub(super) path: Option<String>,
}

/// `[app_auth]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawAppAuth {
    pub(super) header: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) token_file: Option<String>,
}

/// `[dev]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawDev {
    pub(super) echo: Option<String>,
}

/// One `[[route]]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawRoute {
    pub(super) name: Option<String>,
    pub(super) path_prefix: Option<String>,
    pub(super) host: Option<String>,
    pub(super) upstream: Option<String>,
    pub(super) secret_id: Option<String>,
    pub(super) secret_field: Option<String>,
    pub(super) version_stage: Option<String>,
    pub(super) refresh_interval: Option<String>,
    pub(super) refresh_cooldown: Option<String>,
    pub(super) pending_fallback: Option<bool>,
    pub(super) header: Option<String>,
    pub(super) value: Option<String>,
    pub(super) query_param: Option<String>,
    pub(super) headers: Option<std::collections::BTreeMap<String, String>>,
    pub(super) basic_auth: Option<RawBasicAuth>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) retry_on_401: Option<bool>,
    pub(super) http2: Option<bool>,
    pub(super) max_replay_body: Option<SizeValue>,
    pub(super) timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) role_arn: Option<String>,
    pub(super) external_id: Option<String>,
    pub(super) session_name: Option<String>,
    pub(super) oauth2: Option<RawOAuth2>,
}

/// `[route.oauth2]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawOAuth2 {
    pub(super) token_url: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) audience: Option<String>,
    pub(super) client_auth: Option<String>,
    pub(super) client_id_field: Option<String>,
    pub(super) client_secret_field: Option<String>,
    pub(super) refresh_ahead: Option<String>,
}

/// `basic_auth = { username = "...", password = "..." }`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawBasicAuth {
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
}

/// The most values of the wrong type reported from one file (each costs a parse).
const MAX_TYPE_ERRORS: usize = 64;

/// Parses TOML text into raw settings, with a problem for each unknown key and each value of the
/// wrong type (`retry_on_401 = "yes"`): such a value is reported under its key and blanked out
/// (line numbers kept), and the rest is parsed again, so that every problem shows in one pass.
/// A syntax error is the only problem reported: nothing else can be checked.
pub(super) fn parse(text: &str, origin: &str) -> Result<(RawFile, Problems), ConfigError> {
    let mut problems = Problems::default();
    let mut text = std::borrow::Cow::Borrowed(text);
    for _ in 0..MAX_TYPE_ERRORS {
        let mut unknown = Vec::new();
        let de = toml::Deserializer::new(&text);
        let e = match serde_ignored::deserialize(de, |p| unknown.push(p.to_string())) {
            Ok(raw) => {
                for key in unknown {
                    problems.add(
                        display_path(&key),
                        "unknown key (check its spelling in the configuration reference)",
                    );
                }
                return Ok((raw, problems));
            }
            Err(e) => e,
        };
        let Some((key, blank)) = e.span().and_then(|s| value_at(&text, s.start)) else {
            let message = e.message().trim().replace('\n', "; ");
            let mut error = ConfigError::single(origin, "(syntax)", message);
            error.problems[0].line = e.span().map(|s| line_at(&text, s.start));
            error.problems.splice(0..0, problems.0);
            return Err(error);
        };
        problems.add(key, e.message());
        let mut edited = text.into_owned();
        let spaces: String = edited[blank.clone()]
            .chars()
            .map(|c| if c == '\n' { c } else { ' ' })
            .collect();
        edited.replace_range(blank, &spaces);
        text = std::borrow::Cow::Owned(edited);
    }
    Err(ConfigError {
        origin: origin.to_owned(),
        problems: problems.0,
    })
}

/// The key whose value holds byte `offset` of `text`, and the bytes that blank out that setting
/// (from the start of its line to the end of its value).
fn value_at(text: &str, offset: usize) -> Option<(String, std::ops::Range<usize>)> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut path = String::new();
    let (key, value) = find_value(doc.as_table(), offset, &mut path)?;
    let line_start = text[..key.start].rfind('\n').map_or(0, |i| i + 1);
    Some((path, line_start..value.end))
}

/// Walks `table` for the key/value holding `offset`; `path` becomes its key (`route[0].x`).
/// Returns the spans of the key and of the value.
fn find_value(
    table: &dyn toml_edit::TableLike,
    offset: usize,
    path: &mut String,
) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    for (name, item) in table.iter() {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(name);
        let found = match item {
            toml_edit::Item::Value(v) => v
                .span()
                .filter(|s| s.contains(&offset))
                .zip(table.key(name).and_then(toml_edit::Key::span))
                .map(|(value, key)| (key, value)),
            toml_edit::Item::Table(t) => find_value(t, offset, path),
            toml_edit::Item::ArrayOfTables(a) => a.iter().enumerate().find_map(|(i, t)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = find_value(t, offset, path);
                if found.is_none() {
                    path.truncate(len);
                }
                found
            }),
            toml_edit::Item::None => None,
        };
        if found.is_some() {
            return found;
        }
        path.truncate(len);
    }
    None
}

/// Adds to each problem of `error` the line of its key in `text` (or of the table it is missing
/// from) and the name of its route. A key that a variable in `env` overrides gets no line: the
/// value came from the variable.
pub(super) fn locate(
    mut error: ConfigError,
    text: &str,
    env: &std::collections::HashMap<String, String>,
) -> ConfigError {
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return error;
    };
    let routes = doc
        .get("route")
        .and_then(toml_edit::Item::as_array_of_tables);
    for p in &mut error.problems {
        if let Some(i) = super::route_index(&p.key).map(|(i, _)| i) {
            p.route = routes
                .and_then(|r| r.get(i))
                .and_then(|t| t.get("name"))
                .and_then(toml_edit::Item::as_str)
                .map(str::to_owned);
        }
        let overridden = env.contains_key(&super::names::Namer::Env.global(&p.key));
        if p.line.is_none() && !overridden {
            p.line = key_offset(doc.as_table(), &p.key).map(|o| line_at(text, o));
        }
    }
    // In the file's order; problems without a line (the environment's) first.
    error.problems.sort_by_key(|p| p.line);
    error
}

/// Where `key` (`route[1].upstream`, `aws.region`) is in the document: the key itself, else the
/// innermost table on its path that the file has.
fn key_offset(root: &toml_edit::Table, key: &str) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = root;
    let mut at = None;
    for seg in key.split('.') {
        let (name, index) = match seg.split_once('[') {
            Some((name, i)) => (name, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        let Some(item) = table.get(name) else {
            return at;
        };
        at = table
            .key(name)
            .and_then(toml_edit::Key::span)
            .map(|s| s.start)
            .or(at);
        let next: Option<&dyn toml_edit::TableLike> = match (item, index) {
            (toml_edit::Item::ArrayOfTables(a), Some(i)) => a.get(i).map(|t| {
                at = t.span().map(|s| s.start).or(at);
                t as &dyn toml_edit::TableLike
            }),
            (item, None) => item.as_table_like(),
            _ => None,
        };
        match next {
            Some(t) => table = t,
            None => return at,
        }
    }
    at
}

/// The 1-based line of byte `offset` of `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// `route.0.hedaer` → `route[0].hedaer`.
fn display_path(p: &str) -> String {
    let mut out = String::new();
    for seg in p.split('.').filter(|s| *s != "?") {
        if seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{keys, toml, MINIMAL};
    use crate::config::SourceConfig;

    #[test]
    fn full_file_parses_every_key() {
        let c = toml(
            r#"
            listen = "127.0.0.1:18080"
            admin_listen = "127.0.0.1:19901"
            drain_timeout = "5s"
            max_connections = 10
            access_log = false
            [aws]
            region = "eu-west-1"
            endpoint_url = "http://127.0.0.1:5000"
            [[route]]
            name = "maps"
            host = "maps.example.com"
            upstream = "https://maps.example.com"
            secret_id = "arn:aws:secretsmanager:eu-west-1:1:secret:maps-AbCdEf"
            secret_field = "token"
            version_stage = "AWSPENDING"
            refresh_interval = "1m"
            refresh_cooldown = "0s"
            query_param = "key"
            retry_on_401 = false
            http2 = false
            max_replay_body = "1MiB"
            timeout = "2s"
        "#,
        )
        .expect("valid");
        assert_eq!(c.max_connections, 10);
        assert!(!c.access_log);
        let r = &c.routes[0];
        assert_eq!(r.host.as_deref(), Some("maps.example.com"));
        assert_eq!(r.max_replay_body, 1024 * 1024);
        assert!(!r.http2);
        assert_eq!(r.injection.query_template().map(|(p, _)| p), Some("key"));
        match &c.source {
            SourceConfig::Aws(a) => assert_eq!(a.region.as_deref(), Some("eu-west-1")),
            SourceConfig::File(_) => panic!("aws expected"),
        }
    }

    #[test]
    fn unknown_keys_are_all_named() {
        let e = toml(&format!("lisen = \"x\"\n{MINIMAL}\nhedaer = \"X\"")).expect_err("unknown");
        assert_eq!(keys(&e), vec!["lisen", "route[0].hedaer"]);
        assert!(e.to_string().contains("test.toml"));
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = toml("# keyproxy\nlisten = \n").expect_err("syntax");
        assert_eq!(keys(&e), vec!["(syntax)"]);
        assert_eq!(e.problems[0].line, Some(2));
        assert!(e.to_string().contains("\n  test.toml:2: (syntax): "), "{e}");
        assert!(!e.problems[0].message.contains('\n'), "{e}");
    }

    #[test]
    fn values_of_the_wrong_type_are_each_named_with_the_rest() {
        let e = toml(&format!(
            "max_connections = \"10\"\n[aws]\nregion = 1\n{MINIMAL}retry_on_401 = \"yes\"\ntimeout = \"x\"\n"
        ))
        .expect_err("types");
        assert_eq!(
            keys(&e),
            vec![
                "max_connections",
                "aws.region",
                "route[0].retry_on_401",
                "route[0].timeout"
            ]
        );
        let lines: Vec<_> = e.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![Some(1), Some(3), Some(10), Some(11)]);
        assert!(e.problems[2].message.contains("expected a boolean"), "{e}");
    }

    #[test]
    fn problems_name_the_route_and_the_line() {
        // The issue's five mistakes: every one in the first pass, in the file's order.
        let text = r#"listen = "127.0.0.1:8080"
[[route]]
name = "payments"
path_prefix = "/payments"
upstream = "https://api.example.com"
secret_id = "prod/payments"

[[route]]
name = "payments"
path_prefix = "/payments/"
upstream = "ftp://api.example.com"
secret_id = "prod/other"
refresh_interval = "soon"
hedaer = "X-Key"

[[route]]
name = "maps"
upstream = "https://maps.example.com"
"#;
        let e = toml(text).expect_err("invalid");
        let shown: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            shown,
            vec![
                r#"route "payments" (#2) name: "payments" is already the name of route #1"#,
                r#"route "payments" (#2) path_prefix: "/payments" is already the path_prefix of route #1"#,
                r#"route "payments" (#2) upstream: "ftp://api.example.com": scheme "ftp" is not http or https"#,
                r#"route "payments" (#2) refresh_interval: "soon" is not a duration such as "30s" or "5m" (expected number at 0)"#,
                r#"route "payments" (#2) hedaer: unknown key (check its spelling in the configuration reference)"#,
                r#"route "maps" (#3) path_prefix: set path_prefix, host, or both: a route must match something"#,
                r#"route "maps" (#3) secret_id: missing: the secret's name or ARN"#,
            ],
            "{e}"
        );
        let lines: Vec<_> = e.problems.iter().map(|p| p.line).collect();
        assert_eq!(
            lines,
            vec![
                Some(9),
                Some(10),
                Some(11),
                Some(13),
                Some(14),
                Some(16),
                Some(16)
            ]
        );
        assert!(e.to_string().contains(
            "\n  test.toml:11: route \"payments\" (#2) upstream: \"ftp://api.example.com\""
        ));
    }
}
