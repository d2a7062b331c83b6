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
    pub(super) drain_timeout: Option<String>,
    pub(super) max_connections: Option<u64>,
    pub(super) connect_timeout: Option<String>,
    pub(super) ca_bundle: Option<String>,
    pub(super) access_log: Option<bool>,
    pub(super) worker_threads: Option<u64>,
    pub(super) aws: Option<RawAws>,
    pub(super) source: Option<RawSource>,
    pub(super) app_auth: Option<RawAppAuth>,
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
    pub(super) retry_on_401: Option<bool>,
    pub(super) http2: Option<bool>,
    pub(super) max_replay_body: Option<SizeValue>,
    pub(super) timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
}

/// Parses TOML text into raw settings, with a problem for each unknown key. A syntax error is
/// the only problem reported: nothing else can be checked.
pub(super) fn parse(text: &str, origin: &str) -> Result<(RawFile, Problems), ConfigError> {
    let mut problems = Problems::default();
    let mut unknown = Vec::new();
    let de = toml::Deserializer::new(text);
    let raw: RawFile =
        serde_ignored::deserialize(de, |p| unknown.push(p.to_string())).map_err(|e| {
            ConfigError::single(
                origin,
                "(syntax)",
                e.message().to_string() + &line_of(text, e.span()),
            )
        })?;
    for key in unknown {
        problems.add(
            display_path(&key),
            "unknown key (check its spelling in the configuration reference)",
        );
    }
    Ok((raw, problems))
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

/// ` (line N)` for a byte span of `text`.
fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{keys, toml, MINIMAL};
    use crate::config::SourceConfig;
    use crate::inject::Injection;

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
        assert!(matches!(&r.injection, Injection::Query { param, .. } if param == "key"));
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
        let e = toml("listen = \n").expect_err("syntax");
        assert_eq!(keys(&e), vec!["(syntax)"]);
        assert!(e.problems[0].message.contains("line 1"), "{e}");
    }
}
