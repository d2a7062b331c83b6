//! The app-side token (`[app_auth]`, `KEYPROXY_APP_TOKEN`, `KEYPROXY_APP_TOKEN_FILE`).

use std::collections::HashMap;
use std::path::Path;

use http::header::HeaderName;

use super::resolve;
use crate::config::file::RawAppAuth;
use crate::config::{defaults, AppAuth, Problems};
use crate::secrets::Secret;

/// The header and the token; `None` (with a problem) when there is no usable token.
pub(super) fn app_auth(
    a: RawAppAuth,
    base: &Path,
    env: &HashMap<String, String>,
    g: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<AppAuth> {
    let header = header(a.header.as_deref(), g, problems);
    let token = token(&a, base, env, g, problems)?;
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
        token: Secret::new(token),
    })
}

/// `app_auth.header`: a valid header name.
fn header(v: Option<&str>, g: &dyn Fn(&str) -> String, problems: &mut Problems) -> HeaderName {
    match v
        .unwrap_or(defaults::APP_TOKEN_HEADER)
        .parse::<HeaderName>()
    {
        Ok(h) => h,
        Err(_) => {
            problems.add(g("app_auth.header"), "not a valid header name");
            HeaderName::from_static(defaults::APP_TOKEN_HEADER)
        }
    }
}

/// The token, trimmed, from exactly one of `token_env` (a variable) and `token_file`.
fn token(
    a: &RawAppAuth,
    base: &Path,
    env: &HashMap<String, String>,
    g: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<String> {
    match (&a.token_env, &a.token_file) {
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
        (None, Some(file)) => match std::fs::read_to_string(resolve(base, file)) {
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
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::test_support::{env, keys, MINIMAL};
    use crate::config::Config;

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
