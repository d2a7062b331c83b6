//! `[route.oauth2]`: the token endpoint, how the client authenticates, the secret's fields, and
//! when to mint ahead; and what an OAuth2 route may not combine it with (a query parameter,
//! `secret_field`, `headers`, `basic_auth`, a `{secret.FIELD}` template).

use super::duration;
use crate::config::defaults;
use crate::config::file::{RawOAuth2, RawRoute};
use crate::config::{ClientAuth, OAuth2Config, Problems};
use crate::uri::{secure_url, UrlProblem};

/// The route's `[route.oauth2]`, if it has one; `None` (with a problem) when it is wrong. `k`
/// names the route's keys.
pub(super) fn oauth2(
    r: &mut RawRoute,
    k: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<OAuth2Config> {
    let raw = r.oauth2.take()?;
    let before = problems.len();
    let key = |f: &str| k(&format!("oauth2.{f}"));
    if r.query_param.is_some() {
        problems.add(
            k("query_param"),
            "an OAuth2 access token goes in a header: remove query_param, or [route.oauth2]",
        );
    }
    if r.headers.is_some() {
        problems.add(
            k("headers"),
            "an OAuth2 route injects one access token through header/value: remove headers, or [route.oauth2]",
        );
    }
    if r.basic_auth.is_some() {
        problems.add(
            k("basic_auth"),
            "an OAuth2 route sends its access token, not a password: remove basic_auth, or [route.oauth2]",
        );
    }
    if r.value.as_deref().is_some_and(|v| v.contains("{secret.")) {
        problems.add(
            k("value"),
            "with [route.oauth2], {secret} is the access token; {secret.FIELD} would read the client credentials: use {secret}",
        );
    }
    if r.secret_field.is_some() {
        problems.add(
            k("secret_field"),
            "with [route.oauth2] the secret holds client credentials: name their fields with oauth2.client_id_field and oauth2.client_secret_field",
        );
    }
    let RawOAuth2 {
        token_url,
        scope,
        audience,
        client_auth,
        client_id_field,
        client_secret_field,
        refresh_ahead,
    } = raw;
    let token_url = match token_url.as_deref().map(secure_url) {
        None => {
            problems.add(key("token_url"), "missing: the token endpoint's URL");
            None
        }
        Some(Ok(u)) => Some(u),
        Some(Err(why)) => {
            let text = token_url.unwrap_or_default();
            problems.add(
                key("token_url"),
                match why {
                    UrlProblem::Invalid => format!("{text:?} is not a valid URL"),
                    UrlProblem::NotAbsolute => {
                        format!("{text:?} must be an absolute URL (https://host/path)")
                    }
                    UrlProblem::Insecure => format!(
                        "{text:?}: https is required (http only to a loopback host): the client secret is sent there"
                    ),
                },
            );
            None
        }
    };
    let client_auth = match client_auth
        .as_deref()
        .unwrap_or(defaults::OAUTH2_CLIENT_AUTH)
    {
        "basic" => ClientAuth::Basic,
        "post" => ClientAuth::Post,
        other => {
            problems.add(
                key("client_auth"),
                format!("{other:?} is not \"basic\" (client_secret_basic) or \"post\" (client_secret_post)"),
            );
            ClientAuth::Basic
        }
    };
    let mut field = |name: &str, v: Option<String>, default: &str| match v {
        Some(f) if f.is_empty() => {
            problems.add(key(name), "empty: name the secret's JSON field");
            f
        }
        Some(f) => f,
        None => default.to_owned(),
    };
    let client_id_field = field(
        "client_id_field",
        client_id_field,
        defaults::OAUTH2_CLIENT_ID_FIELD,
    );
    let client_secret_field = field(
        "client_secret_field",
        client_secret_field,
        defaults::OAUTH2_CLIENT_SECRET_FIELD,
    );
    let mut optional = |name: &str, v: Option<String>| match v {
        Some(s) if s.is_empty() => {
            problems.add(key(name), "empty: leave it out, or give a value");
            None
        }
        v => v,
    };
    let scope = optional("scope", scope);
    let audience = optional("audience", audience);
    let refresh_ahead = duration(
        problems,
        key("refresh_ahead"),
        refresh_ahead.as_deref(),
        defaults::OAUTH2_REFRESH_AHEAD,
    );
    if problems.len() > before {
        return None;
    }
    Some(OAuth2Config {
        token_url: token_url?,
        scope,
        audience,
        client_auth,
        client_id_field,
        client_secret_field,
        refresh_ahead,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{keys, toml, MINIMAL};
    use crate::config::ClientAuth;

    #[test]
    fn defaults_and_every_key() {
        let c = toml(&format!(
            "{MINIMAL}[route.oauth2]\ntoken_url = \"https://auth.example.com/oauth2/token\"\n"
        ))
        .expect("valid");
        let o = c.routes[0].oauth2.as_ref().expect("oauth2");
        assert_eq!(o.client_auth, ClientAuth::Basic);
        assert_eq!(o.client_id_field, "client_id");
        assert_eq!(o.client_secret_field, "client_secret");
        assert_eq!(o.refresh_ahead, std::time::Duration::from_secs(60));
        assert!(o.scope.is_none() && o.audience.is_none());
        let c = toml(&format!(
            r#"{MINIMAL}[route.oauth2]
token_url = "http://127.0.0.1:9/token"
scope = "contacts.read"
audience = "https://api.crm.example"
client_auth = "post"
client_id_field = "id"
client_secret_field = "secret"
refresh_ahead = "10s"
"#
        ))
        .expect("valid");
        let o = c.routes[0].oauth2.as_ref().expect("oauth2");
        assert_eq!(o.client_auth, ClientAuth::Post);
        assert_eq!(o.scope.as_deref(), Some("contacts.read"));
        assert_eq!(o.audience.as_deref(), Some("https://api.crm.example"));
        assert_eq!(
            (o.client_id_field.as_str(), o.client_secret_field.as_str()),
            ("id", "secret")
        );
        assert_eq!(o.refresh_ahead, std::time::Duration::from_secs(10));
    }

    #[test]
    fn every_problem_names_its_key() {
        let e = toml(&format!(
            r#"{MINIMAL}query_param = "key"
secret_field = "token"
[route.oauth2]
token_url = "http://auth.example.com/token"
client_auth = "jwt"
client_id_field = ""
refresh_ahead = "soon"
scopes = "x"
"#
        ))
        .expect_err("invalid");
        let mut got = keys(&e);
        got.sort();
        assert_eq!(
            got,
            vec![
                "route[0].oauth2.client_auth",
                "route[0].oauth2.client_id_field",
                "route[0].oauth2.refresh_ahead",
                "route[0].oauth2.scopes",
                "route[0].oauth2.token_url",
                "route[0].query_param",
                "route[0].secret_field",
            ],
            "{e}"
        );
        assert!(e.to_string().contains("https is required"), "{e}");
        let e = toml(&format!(
            r#"{MINIMAL}value = "Token {{secret.client_id}}"
headers = {{ "X-Id" = "{{secret.client_id}}" }}
basic_auth = {{ username = "{{secret.client_id}}", password = "{{secret.client_secret}}" }}
[route.oauth2]
token_url = "https://auth.example.com/token"
"#
        ))
        .expect_err("combined with other credentials");
        let mut got = keys(&e);
        got.sort();
        got.dedup();
        assert_eq!(
            got,
            vec!["route[0].basic_auth", "route[0].headers", "route[0].value"],
            "{e}"
        );
        let e = toml(&format!("{MINIMAL}[route.oauth2]\nscope = \"a\"\n")).expect_err("no url");
        assert_eq!(keys(&e), vec!["route[0].oauth2.token_url"]);
    }
}
