//! What a route injects and where: `header`/`value` or `query_param` (with its `value`),
//! `headers` (several headers, each a template), `basic_auth` (`Authorization: Basic`), and the
//! templates' syntax (`{secret}`, `{secret.FIELD}`).
//!
//! How they combine: `header`/`value` or `query_param` place one credential as before;
//! `headers` and `basic_auth` add headers beside it. The default `Authorization: Bearer
//! {secret}` applies only when none of the five is set. A header name may be set once (across
//! `header` and `headers`, in any case); `basic_auth` owns `Authorization`, so it cannot be
//! combined with a `header`/`value` that places the key there, nor with an `Authorization` in
//! `headers`.

use std::collections::{BTreeMap, HashMap};

use http::header::{HeaderName, AUTHORIZATION};

use crate::config::file::RawBasicAuth;
use crate::config::{defaults, Problems};
use crate::inject::{literal_colon, HeaderTemplate, Injection, Template};

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

/// A route's injection settings, as written.
pub(super) struct RawInjection {
    pub(super) header: Option<String>,
    pub(super) value: Option<String>,
    pub(super) query_param: Option<String>,
    pub(super) headers: Option<BTreeMap<String, String>>,
    pub(super) basic_auth: Option<RawBasicAuth>,
}

/// The route's [`Injection`]; `None` (with a problem for each mistake) when any part is wrong.
/// `k` names the route's keys.
pub(super) fn injection(
    raw: RawInjection,
    k: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<Injection> {
    let before = problems.len();
    let extra = raw.headers.is_some() || raw.basic_auth.is_some();
    let mut headers: Vec<(HeaderName, HeaderTemplate)> = Vec::new();
    // Which key set each header name, for the message when one is set twice.
    let mut owners: HashMap<HeaderName, String> = HashMap::new();
    let mut query = None;
    match (raw.header, raw.query_param) {
        (Some(_), Some(_)) => {
            problems.add(k("query_param"), "set header or query_param, not both");
        }
        (None, Some(param)) => {
            if param.is_empty() || param.contains(['&', '=', '#', ' ']) {
                problems.add(
                    k("query_param"),
                    format!("{param:?} is not a plain parameter name"),
                );
            }
            query = template(raw.value, defaults::QUERY_VALUE, k("value"), problems)
                .map(|template| (param, template));
        }
        (h, None) if h.is_some() || raw.value.is_some() || !extra => {
            let name = header_name(
                h.as_deref().unwrap_or(defaults::HEADER),
                k("header"),
                problems,
            );
            let template = template(raw.value, defaults::HEADER_VALUE, k("value"), problems);
            if let (Some(name), Some(template)) = (name, template) {
                owners.insert(name.clone(), k("header"));
                headers.push((name, HeaderTemplate::Value(template)));
            }
        }
        (_, None) => {}
    }
    if raw.headers.as_ref().is_some_and(BTreeMap::is_empty) {
        problems.add(
            k("headers"),
            "an empty table sets no header: add \"Name\" = \"{secret.FIELD}\" entries or remove it",
        );
    }
    for (text, value) in raw.headers.unwrap_or_default() {
        let key = k(&format!("headers.{text}"));
        let Some(name) = header_name(&text, key.clone(), problems) else {
            continue;
        };
        if let Some(first) = owners.get(&name) {
            problems.add(
                key,
                format!("header {name} is already set by {first} (header names ignore case)"),
            );
            continue;
        }
        let Ok(t) = Template::parse(&value)
            .map_err(|e| problems.add(key.clone(), format!("{value:?}: {e}")))
        else {
            continue;
        };
        owners.insert(name.clone(), key);
        headers.push((name, HeaderTemplate::Value(t)));
    }
    if let Some(b) = raw.basic_auth {
        if let Some(basic) = basic_auth(b, k, problems) {
            if let Some(first) = owners.get(&AUTHORIZATION) {
                problems.add(
                    k("basic_auth"),
                    format!("sets the Authorization header, which {first} already sets: keep one"),
                );
            } else {
                headers.push((AUTHORIZATION, basic));
            }
        }
    }
    if problems.len() > before {
        return None;
    }
    Some(Injection::new(headers, query))
}

/// `basic_auth`: `username` and `password`, both present (either may be fixed text, the
/// password even empty), at least one of them reading the secret; no `:` in the username's own
/// text.
fn basic_auth(
    b: RawBasicAuth,
    k: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<HeaderTemplate> {
    let mut part = |v: Option<String>, name: &str| {
        let key = k(&format!("basic_auth.{name}"));
        let Some(text) = v else {
            problems.add(
                key,
                format!(
                    "missing: basic_auth needs username and password (e.g. \"{{secret.{name}}}\")"
                ),
            );
            return None;
        };
        Template::parse_any(&text)
            .map_err(|e| problems.add(key, format!("{text:?}: {e}")))
            .ok()
    };
    let username = part(b.username, "username");
    let password = part(b.password, "password");
    let (username, password) = (username?, password?);
    if literal_colon(&username) {
        problems.add(
            k("basic_auth.username"),
            "contains ':', which cannot be in a Basic user-id (RFC 7617)",
        );
        return None;
    }
    if !username.has_placeholder() && !password.has_placeholder() {
        problems.add(
            k("basic_auth"),
            "neither username nor password reads the secret ({secret} or {secret.FIELD})",
        );
        return None;
    }
    Some(HeaderTemplate::Basic { username, password })
}

/// A header name: valid, and not one in [`RESERVED_HEADERS`].
fn header_name(h: &str, key: String, problems: &mut Problems) -> Option<HeaderName> {
    match h.parse::<HeaderName>() {
        Ok(n) if RESERVED_HEADERS.contains(&n.as_str()) => {
            problems.add(
                key,
                format!("{h:?} is managed by the proxy and cannot carry a key"),
            );
            None
        }
        Ok(n) => Some(n),
        Err(_) => {
            problems.add(key, format!("{h:?} is not a valid header name"));
            None
        }
    }
}

/// `value` (or `default`): a template with `{secret}` or `{secret.FIELD}` in it.
fn template(
    value: Option<String>,
    default: &str,
    key: String,
    problems: &mut Problems,
) -> Option<Template> {
    let text = value.unwrap_or_else(|| default.into());
    Template::parse(&text)
        .map_err(|e| problems.add(key, format!("{text:?}: {e}")))
        .ok()
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{keys, toml, MINIMAL};
    use crate::inject::{HeaderTemplate, Values};

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

    /// The rendered header lines of the first route for the secret text `doc`.
    fn lines(extra: &str, doc: &str) -> String {
        let c = toml(&format!("{MINIMAL}\n{extra}")).expect("valid");
        let cred = c.routes[0]
            .injection
            .render_values(&Values::new(doc, c.routes[0].secret_field.as_deref()))
            .expect("render");
        let q = cred
            .query()
            .map(|(_, p)| format!("?{p}"))
            .unwrap_or_default();
        String::from_utf8_lossy(cred.header_lines()).into_owned() + &q
    }

    #[test]
    fn headers_and_basic_auth_replace_the_default_and_combine_with_the_rest() {
        let doc = r#"{"key_id":"i","key_secret":"s","user":"u","pass":"p","token":"t"}"#;
        assert_eq!(
            lines(
                r#"headers = { "X-Api-Key" = "{secret.key_id}", "X-Api-Secret" = "{secret.key_secret}" }"#,
                doc
            ),
            "x-api-key: i\r\nx-api-secret: s\r\n"
        );
        assert_eq!(
            lines(
                r#"basic_auth = { username = "{secret.user}", password = "{secret.pass}" }"#,
                doc
            ),
            "authorization: Basic dTpw\r\n"
        );
        // `header` keeps its place beside `headers`; `query_param` beside `basic_auth`.
        assert_eq!(
            lines(
                "header = \"X-Token\"\nvalue = \"{secret.token}\"\nheaders = { \"X-Id\" = \"id={secret.key_id}\" }",
                doc
            ),
            "x-token: t\r\nx-id: id=i\r\n"
        );
        assert_eq!(
            lines(
                "query_param = \"sig\"\nvalue = \"{secret.token}\"\nbasic_auth = { username = \"{secret.user}\", password = \"\" }",
                doc
            ),
            "authorization: Basic dTo=\r\n?sig=t"
        );
        // `value` alone keeps meaning Authorization, beside `headers`.
        assert_eq!(
            lines(
                "secret_field = \"token\"\nvalue = \"Token {secret}\"\nheaders = { \"X-Id\" = \"{secret.key_id}\" }",
                doc
            ),
            "authorization: Token t\r\nx-id: i\r\n"
        );
        let c = toml(&format!(
            "{MINIMAL}\nbasic_auth = {{ username = \"{{secret.user}}\", password = \"{{secret.pass}}\" }}"
        ))
        .expect("valid");
        assert!(matches!(
            c.routes[0].injection.header_templates(),
            [(_, HeaderTemplate::Basic { .. })]
        ));
    }

    #[test]
    fn every_injection_mistake_names_its_key() {
        let cases: &[(&str, &[&str])] = &[
            ("value = \"{secret.}\"", &["route[0].value"]),
            ("headers = {}", &["route[0].headers"]),
            ("value = \"Bearer {secret.x\"", &["route[0].value"]),
            ("value = \"{secret.a b}\"", &["route[0].value"]),
            (
                "headers = { \"X A\" = \"{secret}\", \"X-B\" = \"{secret.\", \"Host\" = \"{secret}\", \"X-C\" = \"fixed\" }",
                &[
                    "route[0].headers.Host",
                    "route[0].headers.X A",
                    "route[0].headers.X-B",
                    "route[0].headers.X-C",
                ],
            ),
            (
                "header = \"X-Key\"\nheaders = { \"x-key\" = \"{secret}\" }",
                &["route[0].headers.x-key"],
            ),
            (
                "headers = { \"X-Key\" = \"{secret}\", \"x-key\" = \"{secret}\" }",
                &["route[0].headers.x-key"],
            ),
            (
                "basic_auth = { username = \"{secret.user}\" }",
                &["route[0].basic_auth.password"],
            ),
            ("basic_auth = { password = \"x\" }", &["route[0].basic_auth.username"]),
            (
                "basic_auth = { username = \"a:{secret}\", password = \"\" }",
                &["route[0].basic_auth.username"],
            ),
            (
                "basic_auth = { username = \"a\", password = \"b\" }",
                &["route[0].basic_auth"],
            ),
            (
                "header = \"authorization\"\nbasic_auth = { username = \"{secret.u}\", password = \"{secret.p}\" }",
                &["route[0].basic_auth"],
            ),
            (
                "value = \"Token {secret}\"\nbasic_auth = { username = \"{secret.u}\", password = \"{secret.p}\" }",
                &["route[0].basic_auth"],
            ),
            (
                "headers = { \"Authorization\" = \"{secret}\" }\nbasic_auth = { username = \"{secret.u}\", password = \"{secret.p}\" }",
                &["route[0].basic_auth"],
            ),
            ("basic_auth = { username = \"{secret.u}\", password = \"{secret.p}\", realm = \"x\" }", &["route[0].basic_auth.realm"]),
        ];
        for (extra, want) in cases {
            let e = toml(&format!("{MINIMAL}\n{extra}")).expect_err(extra);
            assert_eq!(&keys(&e), want, "{extra}: {e}");
        }
        // Unknown fields are fine until run time.
        toml(&format!("{MINIMAL}\nvalue = \"{{secret.not_yet_there}}\"")).expect("valid");
    }
}
