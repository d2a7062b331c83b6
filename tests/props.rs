//! Property tests (proptest, stable Rust) for the code that untrusted or operator input reaches:
//! configuration parsing, credential rendering, secret field extraction and path checks.
//!
//! The default run is short (a few seconds); set `PROPTEST_CASES` for a longer one, e.g.
//! `PROPTEST_CASES=20000 cargo test --release --test props`. Failures found are saved by
//! proptest in `tests/props.proptest-regressions` and replayed first on every run.

use std::collections::HashMap;
use std::path::Path;

use http::header::{HeaderName, HeaderValue};
use keyproxy::cache::extract;
use keyproxy::config::Config;
use keyproxy::inject::{check_value, set_query, Injection, Template};
use keyproxy::route::{check_path, Allow};
use keyproxy::secrets::Secret;
use percent_encoding::percent_decode_str;
use proptest::prelude::*;
use serde_json::Value;

/// `default` cases, or `PROPTEST_CASES` when set.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// A base directory that does not exist, so relative paths in generated configs never read a
/// real file.
const NO_BASE: &str = "/nonexistent-keyproxy-props";

fn parse(text: &str) -> Result<Config, keyproxy::config::ConfigError> {
    Config::from_toml(text, "props.toml", Path::new(NO_BASE), &HashMap::new())
}

// ---------------------------------------------------------------------------------------------
// Config::from_toml

/// Strings that poke at parsers: durations, sizes, addresses, URLs, templates, odd bytes.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,25}(ns|us|ms|s|m|h|d|w|M|y|years|)",
        "-?[0-9]{1,3}(\\.[0-9]{1,3})?(s|ms|h)",
        "[0-9]{1,22}(B|KiB|MiB|GiB|TiB|EiB|kb|KB|k|)",
        "[0-9]{1,25}\\.[0-9]{1,25}(e[0-9]{1,4})? ?(KiB|MiB|EiB)",
        "(127\\.0\\.0\\.1|0\\.0\\.0\\.0|\\[::1\\]|localhost|[0-9.]{1,20}):[0-9]{0,7}",
        "(http|https|ftp|)(://)?[a-zA-Z0-9.:@\\[\\]%/?#_-]{0,30}",
        "/[a-zA-Z0-9./%?#\\\\_-]{0,20}",
        "[a-zA-Z0-9 {}]{0,10}\\{secret\\}[a-zA-Z0-9 {}\\t]{0,10}",
        "(AWSCURRENT|AWSPENDING|aws|file|json|text|true|false|)",
        "[a-zA-Z0-9_-]{0,12}",
        any::<String>(),
        "[\\x00-\\x1f\\x7f\\r\\n\\t ]{0,5}",
    ]
}

fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        4 => tricky_string().prop_map(toml::Value::String),
        2 => any::<i64>().prop_map(toml::Value::Integer),
        1 => prop_oneof![Just(0i64), Just(1), Just(-1), Just(u32::MAX as i64 + 1), Just(i64::MAX)]
            .prop_map(toml::Value::Integer),
        1 => any::<bool>().prop_map(toml::Value::Boolean),
        1 => any::<f64>().prop_map(toml::Value::Float),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

const GLOBAL_KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "drain_timeout",
    "max_connections",
    "connect_timeout",
    "access_log",
    "unknown_key",
];
const AWS_KEYS: &[&str] = &[
    "region",
    "endpoint_url",
    "timeout",
    "connect_timeout",
    "max_attempts",
    "bogus",
];
const SOURCE_KEYS: &[&str] = &["type", "path"];
const APP_AUTH_KEYS: &[&str] = &["header", "token_env", "tokn"];
const ROUTE_KEYS: &[&str] = &[
    "name",
    "path_prefix",
    "host",
    "upstream",
    "secret_id",
    "secret_field",
    "version_stage",
    "refresh_interval",
    "refresh_cooldown",
    "pending_fallback",
    "header",
    "value",
    "query_param",
    "retry_on_401",
    "max_replay_body",
    "timeout",
    "idle_timeout",
    "hedaer",
];

/// A value for `key`: of the type the key takes most of the time (so that validation, not just
/// deserialization, runs), anything at all sometimes.
fn value_for(key: &'static str) -> BoxedStrategy<toml::Value> {
    let typed: BoxedStrategy<toml::Value> = match key {
        "max_connections" | "max_attempts" => prop_oneof![
            (0i64..10_000).prop_map(toml::Value::Integer),
            any::<i64>().prop_map(toml::Value::Integer),
            Just(toml::Value::Integer(u32::MAX as i64 + 1)),
        ]
        .boxed(),
        "access_log" | "pending_fallback" | "retry_on_401" => {
            any::<bool>().prop_map(toml::Value::Boolean).boxed()
        }
        "max_replay_body" => prop_oneof![
            any::<i64>().prop_map(toml::Value::Integer),
            tricky_string().prop_map(toml::Value::String),
        ]
        .boxed(),
        _ => tricky_string().prop_map(toml::Value::String).boxed(),
    };
    prop_oneof![9 => typed, 1 => toml_value()].boxed()
}

/// A table with some of `keys`, each with a random value.
fn table_of(keys: &'static [&'static str]) -> impl Strategy<Value = toml::Table> {
    prop::collection::vec(
        prop::sample::select(keys).prop_flat_map(|k| (Just(k), value_for(k))),
        0..keys.len().min(4),
    )
    .prop_map(|kvs| kvs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// A route that is mostly valid, with a few keys replaced by random values.
fn route_table() -> impl Strategy<Value = toml::Table> {
    (table_of(ROUTE_KEYS), any::<u8>()).prop_map(|(random, n)| {
        let mut t = toml::Table::new();
        t.insert("name".into(), toml::Value::String(format!("r{n}")));
        t.insert("path_prefix".into(), toml::Value::String(format!("/p{n}")));
        t.insert(
            "upstream".into(),
            toml::Value::String("http://127.0.0.1:1".into()),
        );
        t.insert("secret_id".into(), toml::Value::String("s".into()));
        t.extend(random);
        t
    })
}

fn config_doc() -> impl Strategy<Value = String> {
    (
        table_of(GLOBAL_KEYS),
        prop::option::of(table_of(AWS_KEYS)),
        prop::option::of(table_of(SOURCE_KEYS)),
        prop::option::of(table_of(APP_AUTH_KEYS)),
        prop::collection::vec(route_table(), 0..4),
    )
        .prop_map(|(mut doc, aws, source, app_auth, routes)| {
            for (k, t) in [("aws", aws), ("source", source), ("app_auth", app_auth)] {
                if let Some(t) = t {
                    doc.insert(k.into(), toml::Value::Table(t));
                }
            }
            if !routes.is_empty() {
                doc.insert(
                    "route".into(),
                    toml::Value::Array(routes.into_iter().map(toml::Value::Table).collect()),
                );
            }
            toml::to_string(&doc).unwrap_or_default()
        })
}

fn check_config_result(text: &str) -> Result<(), TestCaseError> {
    match parse(text) {
        Ok(c) => {
            prop_assert!(!c.routes.is_empty(), "a valid config has a route");
            for r in &c.routes {
                prop_assert!(r.path_prefix.is_some() || r.host.is_some());
                prop_assert!(!r.name.is_empty() && !r.secret_id.trim().is_empty());
                prop_assert!(r.refresh_interval >= std::time::Duration::from_secs(1));
            }
        }
        Err(e) => {
            prop_assert!(
                !e.problems.is_empty(),
                "an error names at least one problem"
            );
            for p in &e.problems {
                prop_assert!(!p.key.is_empty(), "every problem names a key: {p:?}");
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn config_from_arbitrary_text_never_panics(text in any::<String>()) {
        check_config_result(&text)?;
    }

    #[test]
    fn config_from_toml_like_text_never_panics(
        text in "(\\[\\[?[a-z_]{0,8}\\]\\]?|[a-z_]{1,10} ?= ?(\"[^\"\\n]{0,12}\"|[0-9a-z.:-]{0,10}|\\[|\\{)|#.{0,5}|\"\"\"|'''|\\n){0,12}"
    ) {
        check_config_result(&text)?;
    }

    #[test]
    fn config_from_structured_random_toml_never_panics(text in config_doc()) {
        check_config_result(&text)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Template::parse + Injection::render

fn template_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => Just("{secret}".to_owned()),
            4 => "[ -~\\t]{0,8}",
            1 => any::<char>().prop_map(String::from),
            1 => Just("{secret".to_owned()),
            1 => Just("\r\n".to_owned()),
        ],
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

fn secret_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[!-~]{1,40}",
        2 => "[ -~]{0,40}",
        1 => any::<String>(),
        1 => "[a-z]{1,8}(\r|\n|\r\n|\0|\x7f|é)[a-z]{0,8}",
        1 => "[ \t]{1,2}[a-z]{1,8}[ \t]{0,2}",
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn header_credentials_are_valid_header_values(text in template_text(), secret in secret_text()) {
        let Ok(template) = Template::parse(&text) else { return Ok(()); };
        prop_assert_eq!(template.as_text(), text.clone());
        // `{secret.FIELD}` reads JSON: not what this property is about.
        if template.fields().next().is_some() { return Ok(()); }
        let inj = Injection::header(HeaderName::from_static("authorization"), template);
        match inj.render(&Secret::new(secret.clone())) {
            Ok(c) => {
                prop_assert!(c.query().is_none(), "a header injection gave a query");
                prop_assert_eq!(c.headers().len(), 1);
                let v = &c.headers()[0].1;
                prop_assert!(!v.as_bytes().contains(&b'\r') && !v.as_bytes().contains(&b'\n'));
                prop_assert!(HeaderValue::from_bytes(v.as_bytes()).is_ok());
                prop_assert!(v.is_sensitive());
                let expected = text.replace("{secret}", &secret);
                prop_assert_eq!(v.as_bytes(), expected.as_bytes());
            }
            Err(e) => {
                prop_assert!(
                    check_value(&secret).is_err(),
                    "a usable secret in a valid template was refused: {e}"
                );
            }
        }
    }

    #[test]
    fn query_credentials_are_percent_encoded_and_decode_back(
        text in template_text(),
        secret in secret_text(),
        param in prop_oneof!["[a-z_]{1,8}", any::<String>().prop_filter("non-empty", |s| !s.is_empty())],
    ) {
        let Ok(template) = Template::parse(&text) else { return Ok(()); };
        if template.fields().next().is_some() { return Ok(()); }
        let inj = Injection::query(param.clone(), template);
        match inj.render(&Secret::new(secret.clone())) {
            Ok(c) => {
                prop_assert!(c.headers().is_empty(), "a query injection gave a header");
                let (_, pair) = c.query().unwrap_or_default();
                prop_assert!(
                    pair.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~%=".contains(&b)),
                    "only unreserved characters and escapes: {pair:?}"
                );
                prop_assert_eq!(pair.matches('=').count(), 1, "one '=' in {:?}", pair);
                let (name, value) = pair.split_once('=').unwrap_or_default();
                let name = percent_decode_str(name).decode_utf8().map(|c| c.into_owned());
                let value = percent_decode_str(value).decode_utf8().map(|c| c.into_owned());
                prop_assert_eq!(name.ok(), Some(param.clone()));
                prop_assert_eq!(value.ok(), Some(text.replace("{secret}", &secret)));
                let uri = format!("/x?{pair}");
                prop_assert!(http::uri::PathAndQuery::try_from(uri.as_str()).is_ok(), "{uri:?}");
            }
            Err(_) => prop_assert!(check_value(&secret).is_err()),
        }
    }

    #[test]
    fn set_query_removes_every_copy_of_the_apps_own_param(
        pairs in prop::collection::vec(
            (
                prop_oneof![
                    Just("api_key".to_owned()),
                    Just("api%5Fkey".to_owned()),
                    Just("api%5fkey".to_owned()),
                    Just("API_KEY".to_owned()),
                    "[a-z_%0-9+]{0,8}",
                ],
                prop::option::of("[a-zA-Z0-9%+=]{0,8}"),
            ),
            0..6,
        ),
    ) {
        let q: Vec<String> = pairs
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect();
        let q = q.join("&");
        let out = set_query(Some(&q), "api_key", "api_key=K");
        let kvs: Vec<&str> = out.split('&').collect();
        prop_assert_eq!(kvs.last().copied(), Some("api_key=K"));
        for kv in &kvs[..kvs.len() - 1] {
            let name = kv.split('=').next().unwrap_or_default().replace('+', " ");
            let decoded = percent_decode_str(&name).decode_utf8_lossy().into_owned();
            prop_assert_ne!(decoded.as_str(), "api_key", "the app's own key survived in {}", out);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// cache::extract

/// Secret tokens: at least 8 characters from a set that shares nothing with JSON punctuation,
/// serde_json's (lower-case) messages, or the field names below.
fn token() -> impl Strategy<Value = String> {
    "[A-Z0-9]{8,40}"
}

fn json_with(tokens: Vec<String>, field: String) -> impl Strategy<Value = Value> {
    let well_formed =
        serde_json::json!({ field.clone(): tokens[0].clone(), "other": tokens[0].clone() });
    let keys = {
        let mut k: Vec<String> = tokens.clone();
        k.push(field);
        k.push("other".into());
        k
    };
    let leaf = prop_oneof![
        3 => prop::sample::select(tokens).prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
        1 => "[a-z]{0,5}".prop_map(Value::String),
    ];
    let object_keys = keys.clone();
    let any_value = leaf.prop_recursive(3, 16, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(keys.clone()), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    });
    // Mostly an object at the root, as secrets are, often holding the field.
    prop_oneof![
        4 => prop::collection::vec((prop::sample::select(object_keys), any_value.clone()), 0..5)
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        1 => any_value,
        1 => Just(well_formed),
    ]
}

/// (secret text, field, the tokens inside the text)
fn extract_input() -> impl Strategy<Value = (String, Option<String>, Vec<String>)> {
    (
        prop::collection::vec(token(), 1..4),
        "[a-z_]{1,6}",
        any::<bool>(),
    )
        .prop_flat_map(|(tokens, field, use_field)| {
            let f = if use_field { Some(field.clone()) } else { None };
            let t = tokens.clone();
            (
                json_with(tokens.clone(), field),
                0usize..200,
                prop_oneof![4 => Just(0usize), 1 => 1usize..6],
                any::<char>(),
            )
                .prop_map(move |(doc, cut, how, junk)| {
                    let full = doc.to_string();
                    let cut = full
                        .char_indices()
                        .map(|(i, _)| i)
                        .nth(cut % full.chars().count().max(1))
                        .unwrap_or(0);
                    let text = match how {
                        0 => full,
                        1 => full[..cut].to_owned(),
                        2 => format!("{}{junk}{}", &full[..cut], &full[cut..]),
                        3 => t.join(" "),
                        4 => format!("\"{}", t.join("\\q")),
                        _ => format!("{full}{full}"),
                    };
                    (text, f.clone(), t.clone())
                })
        })
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn extract_never_panics_and_its_errors_never_carry_the_secret(
        (text, field, tokens) in extract_input()
    ) {
        match extract(&Secret::new(text.clone()), field.as_deref()) {
            Ok(v) => match &field {
                None => prop_assert_eq!(v.expose(), text.as_str()),
                Some(f) => {
                    let doc: Value = serde_json::from_str(&text).map_err(|e| {
                        TestCaseError::fail(format!("extracted from non-JSON: {e}"))
                    })?;
                    prop_assert_eq!(doc.get(f).and_then(Value::as_str), Some(v.expose()));
                }
            },
            Err(e) => {
                for t in &tokens {
                    prop_assert!(!e.contains(t.as_str()), "the error {e:?} carries {t:?}");
                }
                prop_assert!(!e.contains(&text) || text.len() < 8);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// route::check_path

fn path_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9_~-]{1,6}",
        2 => prop::sample::select(vec![
            "..", ".", "%2e%2e", "%2E%2E", "%2e.", ".%2e", "%2e", "%252e%252e", "%252E.", "%25",
            "%", "%zz", "%2", "%00", "%252e", "%25252e", ";", "..;", "%c0%ae",
        ]).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            path_piece(),
            prop::sample::select(vec![
                "/", "\\", "%2f", "%2F", "%5c", "%5C", "%252f", "%255c", "",
            ]),
        ),
        0..6,
    )
    .prop_map(|parts| {
        let mut p = String::from("/");
        for (piece, sep) in parts {
            p.push_str(&piece);
            p.push_str(sep);
        }
        p
    })
}

/// The path's segments (split on `/` and `\`) after `rounds` percent-decodings.
fn has_dot_segment(path: &str, rounds: usize) -> bool {
    let mut bytes = path.as_bytes().to_vec();
    for _ in 0..rounds {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        bytes = percent_decode_str(&text).collect();
    }
    bytes
        .split(|b| *b == b'/' || *b == b'\\')
        .any(|seg| seg == b".." || seg == b".")
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn check_path_accepts_no_dot_segment_raw_or_decoded(p in path()) {
        if check_path(&p).is_ok() {
            for rounds in 0..=2 {
                prop_assert!(
                    !has_dot_segment(&p, rounds),
                    "accepted {p:?}, which has a dot segment after {rounds} decoding(s)"
                );
            }
        }
    }

    #[test]
    fn check_path_never_panics_on_any_text(p in any::<String>()) {
        let _ = check_path(&p);
        let _ = check_path(&format!("/{p}"));
    }
}

// ---------------------------------------------------------------------------------------------
// route::Allow (the per-route allowlist)

fn allow_path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => "[a-z0-9]{1,4}",
            1 => Just(String::new()),
            1 => prop_oneof![
                Just("%2F"), Just("%2f"), Just("%5C"), Just("%5c"), Just("%252F"), Just("%25252f"),
                Just("%25"), Just("%20"), Just("%"), Just("\\"), Just(";x"), Just("*"),
                Just("%%32%46"), Just("%2%46"), Just("%25%32%66"), Just("%25%"),
            ]
            .prop_map(str::to_owned),
        ],
        0..8,
    )
    .prop_map(|segs| format!("/{}", segs.join("/")))
}

/// Whether a segment of `path` would read as more than one segment to an upstream that decodes
/// it (any depth of `%25`), or is empty inside the path.
fn ambiguous(path: &str) -> bool {
    let body = path.strip_prefix('/').unwrap_or(path);
    let segs: Vec<&str> = body.split('/').collect();
    segs.iter().enumerate().any(|(i, s)| {
        let mut text = s.to_string();
        let mut bad = (s.is_empty() && i + 1 < segs.len()) || text.contains('\\');
        for _ in 0..4 {
            text = percent_decode_str(&text).decode_utf8_lossy().into_owned();
            bad |= text.contains('/') || text.contains('\\');
        }
        bad
    })
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn allow_never_lets_an_ambiguous_path_through(p in allow_path(), m in "(GET|POST|\\*)") {
        let patterns = vec![format!("{m} /**"), format!("{m} /*/*"), "* /*".to_owned()];
        let allow = Allow::parse(&patterns).expect("patterns");
        if ambiguous(&p) {
            prop_assert!(!allow.permits("GET", &p), "permitted {p:?}");
        }
        // `**` alone permits every unambiguous path (any method with `*`).
        if m == "*" && !ambiguous(&p) {
            prop_assert!(allow.permits("DELETE", &p), "refused {p:?}");
        }
    }

    #[test]
    fn allow_parse_and_match_never_panic(pattern in any::<String>(), p in any::<String>()) {
        if let Ok(a) = Allow::parse(&[pattern]) {
            let _ = a.permits("GET", &p);
            let _ = a.permits("GET", &format!("/{p}"));
        }
    }
}
