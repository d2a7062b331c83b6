//! Where secrets come from: `[source]` and `[aws]`, and the role a secret is read with
//! (`role_arn`, `external_id`, `session_name` in `[aws]` or on a route).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::Uri;

use super::{duration, resolve};
use crate::config::file::{RawAws, RawRoute, RawSource};
use crate::config::names::Namer;
use crate::config::{defaults, Problems, RouteConfig, SourceConfig};
use crate::secrets::aws::{AssumeRole, AwsSettings};

/// `source.type` picks the source; `[aws]` only goes with `aws`, `source.path` only with `file`.
pub(super) fn source(
    src: RawSource,
    aws: Option<RawAws>,
    base: &Path,
    g: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> SourceConfig {
    match src.kind.as_deref().unwrap_or(defaults::SOURCE) {
        "aws" => {
            if src.path.is_some() {
                problems.add(g("source.path"), "only the file source takes a path");
            }
            SourceConfig::Aws(aws_settings(aws.unwrap_or_default(), g, problems))
        }
        "file" => {
            if aws.is_some() {
                problems.add(g("aws"), "[aws] applies only to the aws source");
            }
            match src.path {
                Some(p) => SourceConfig::File(secrets_file(resolve(base, &p), g, problems)),
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
}

/// `source.path`: a file that exists (its content is read, and re-read, by the source itself:
/// a value that cannot be used is refused then, naming the secret).
fn secrets_file(path: PathBuf, g: &dyn Fn(&str) -> String, problems: &mut Problems) -> PathBuf {
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => problems.add(
            g("source.path"),
            format!("{} is not a file", path.display()),
        ),
        Err(e) => problems.add(
            g("source.path"),
            format!("cannot read {}: {e}", path.display()),
        ),
    }
    path
}

/// `[aws]`: an endpoint URL with a scheme, the SDK's timeouts and attempts, and the start-up
/// jitter.
pub(super) fn aws_settings(
    aws: RawAws,
    g: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> AwsSettings {
    if let Some(u) = &aws.endpoint_url {
        if Uri::from_str(u)
            .map(|u| u.scheme().is_none())
            .unwrap_or(true)
        {
            problems.add(g("aws.endpoint_url"), format!("{u:?} is not a URL"));
        }
    }
    AwsSettings {
        region: aws.region,
        endpoint_url: aws.endpoint_url,
        attempt_timeout: duration(
            problems,
            g("aws.timeout"),
            aws.timeout.as_deref(),
            defaults::AWS_TIMEOUT,
        ),
        connect_timeout: duration(
            problems,
            g("aws.connect_timeout"),
            aws.connect_timeout.as_deref(),
            defaults::AWS_CONNECT_TIMEOUT,
        ),
        max_attempts: aws.max_attempts.unwrap_or(defaults::AWS_MAX_ATTEMPTS),
        startup_jitter: startup_jitter(aws.startup_jitter.as_deref(), g, problems),
        role: assume_role(
            aws.role_arn,
            aws.external_id,
            aws.session_name,
            &|f| g(&format!("aws.{f}")),
            problems,
        ),
    }
}

/// `role_arn`, `external_id` and `session_name` (of `[aws]` or of a route; `k` names the keys):
/// the role to assume, if `role_arn` is set; the other two only go with it.
pub(super) fn assume_role(
    role_arn: Option<String>,
    external_id: Option<String>,
    session_name: Option<String>,
    k: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<AssumeRole> {
    let Some(role_arn) = role_arn else {
        for (key, v) in [
            ("external_id", &external_id),
            ("session_name", &session_name),
        ] {
            if v.is_some() {
                problems.add(k(key), "only goes with role_arn beside it");
            }
        }
        return None;
    };
    if !is_role_arn(&role_arn) {
        problems.add(
            k("role_arn"),
            format!(
                "{role_arn:?} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)"
            ),
        );
    }
    let allowed = |s: &str, extra: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) || extra.contains(c))
    };
    if let Some(id) = &external_id {
        if !(2..=1224).contains(&id.len()) || !allowed(id, ":/") {
            problems.add(
                k("external_id"),
                "2 to 1224 characters: letters, digits and _+=,.@:/-",
            );
        }
    }
    let session_name = session_name.unwrap_or_else(|| defaults::SESSION_NAME.to_owned());
    if !(2..=64).contains(&session_name.len()) || !allowed(&session_name, "") {
        problems.add(
            k("session_name"),
            format!("{session_name:?}: 2 to 64 characters, letters, digits and _+=,.@-"),
        );
    }
    Some(AssumeRole {
        role_arn,
        external_id,
        session_name,
    })
}

/// `arn:aws[-partition]:iam::<12 digits>:role/[path/]name`.
fn is_role_arn(arn: &str) -> bool {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let partition_ok = partition
        .strip_prefix("aws")
        .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_lowercase() || c == '-'));
    let name = resource
        .strip_prefix("role/")
        .and_then(|r| r.rsplit('/').next());
    partition_ok
        && account.len() == 12
        && account.chars().all(|c| c.is_ascii_digit())
        && name.is_some_and(|n| {
            (1..=64).contains(&n.len())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
        })
}

/// A role on a route needs the aws source.
pub(super) fn route_roles_need_aws(
    source: &SourceConfig,
    routes: &[RawRoute],
    namer: Namer,
    problems: &mut Problems,
) {
    if matches!(source, SourceConfig::Aws(_)) {
        return;
    }
    for (i, r) in routes.iter().enumerate() {
        if r.role_arn.is_some() {
            problems.add(namer.route(i, "role_arn"), "applies only to the aws source");
        }
    }
}

/// Routes without a `role_arn` of their own read with `[aws] role_arn`, if set.
pub(super) fn inherit_role(source: &SourceConfig, routes: &mut [RouteConfig]) {
    if let SourceConfig::Aws(AwsSettings {
        role: Some(role), ..
    }) = source
    {
        for r in routes.iter_mut().filter(|r| r.role.is_none()) {
            r.role = Some(role.clone());
        }
    }
}

/// `aws.startup_jitter`: a duration from 0 (off, the default) to
/// [`defaults::MAX_AWS_STARTUP_JITTER`].
fn startup_jitter(
    v: Option<&str>,
    g: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Duration {
    let key = g("aws.startup_jitter");
    let d = duration(problems, key.clone(), v, defaults::AWS_STARTUP_JITTER);
    if d > defaults::MAX_AWS_STARTUP_JITTER {
        problems.add(
            key,
            format!(
                "{:?} is too long (at most {}: a sidecar that is not ready by then is usually restarted)",
                v.unwrap_or_default(),
                humantime::format_duration(defaults::MAX_AWS_STARTUP_JITTER)
            ),
        );
        return defaults::AWS_STARTUP_JITTER.default;
    }
    d
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::test_support::{keys, toml, MINIMAL};
    use crate::config::{Config, SourceConfig};
    use std::collections::HashMap;

    #[test]
    fn file_source_path_is_relative_to_the_config_and_must_exist() {
        let dir = std::env::temp_dir().join(format!("keyproxy-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("s.json"), "{}").expect("write");
        let text = format!("[source]\ntype = \"file\"\npath = \"s.json\"\n{MINIMAL}");
        let c = Config::from_toml(&text, "t.toml", &dir, &HashMap::new()).expect("valid");
        assert_eq!(c.source, SourceConfig::File(dir.join("s.json")));
        std::fs::remove_dir_all(&dir).expect("rm");
        let e = Config::from_toml(&text, "t.toml", &dir, &HashMap::new()).expect_err("missing");
        assert_eq!(keys(&e), vec!["source.path"]);
        assert_eq!(e.problems[0].line, Some(3));
        assert!(
            e.problems[0]
                .message
                .starts_with(&format!("cannot read {}", dir.join("s.json").display())),
            "{e}"
        );
    }

    fn startup_jitter(c: &Config) -> Duration {
        match &c.source {
            SourceConfig::Aws(a) => a.startup_jitter,
            SourceConfig::File(_) => Duration::MAX,
        }
    }

    #[test]
    fn startup_jitter_is_off_by_default_and_bounded() {
        assert_eq!(
            startup_jitter(&toml(MINIMAL).expect("valid")),
            Duration::ZERO
        );
        let c = toml(&format!("[aws]\nstartup_jitter = \"20s\"\n{MINIMAL}")).expect("valid");
        assert_eq!(startup_jitter(&c), Duration::from_secs(20));
        for bad in ["\"6m\"", "\"soon\"", "\"-1s\""] {
            let e =
                toml(&format!("[aws]\nstartup_jitter = {bad}\n{MINIMAL}")).expect_err("refused");
            assert_eq!(keys(&e), vec!["aws.startup_jitter"], "{bad}");
        }
    }

    const READER: &str = "arn:aws:iam::111122223333:role/keyproxy-reader";

    fn second_route(extra: &str) -> String {
        format!(
            "[[route]]\nname = \"other\"\npath_prefix = \"/other\"\nupstream = \"https://b.example.com\"\nsecret_id = \"s\"\n{extra}\n"
        )
    }

    #[test]
    fn aws_role_applies_to_routes_without_their_own() {
        let own = "arn:aws-us-gov:iam::444455556666:role/team/other-reader";
        let text = format!(
            "[aws]\nrole_arn = \"{READER}\"\nexternal_id = \"ext-1\"\n{MINIMAL}\n{}",
            second_route(&format!("role_arn = \"{own}\"\nsession_name = \"billing\""))
        );
        let c = toml(&text).expect("valid");
        let a = c.routes[0].role.as_ref().expect("inherited");
        assert_eq!(a.role_arn, READER);
        assert_eq!(a.external_id.as_deref(), Some("ext-1"));
        assert_eq!(a.session_name, "keyproxy");
        let b = c.routes[1].role.as_ref().expect("own");
        assert_eq!(
            (
                b.role_arn.as_str(),
                b.external_id.as_deref(),
                b.session_name.as_str()
            ),
            (own, None, "billing")
        );
        assert!(toml(MINIMAL).expect("valid").routes[0].role.is_none());
    }

    #[test]
    fn role_settings_are_checked_and_named() {
        for bad in [
            "arn:aws:iam::1111:role/x",
            "arn:aws:iam::111122223333:user/x",
            "arn:aws:sts::111122223333:role/x",
            "keyproxy-reader",
            "arn:aws:iam::111122223333:role/",
            "arn:gcp:iam::111122223333:role/x",
        ] {
            let e = toml(&format!("[aws]\nrole_arn = \"{bad}\"\n{MINIMAL}")).expect_err(bad);
            assert_eq!(keys(&e), vec!["aws.role_arn"], "{bad}");
            assert!(e.problems[0].message.contains(bad), "{e}");
            let e = toml(&format!("{MINIMAL}\nrole_arn = \"{bad}\"\n")).expect_err(bad);
            assert_eq!(keys(&e), vec!["route[0].role_arn"], "{bad}");
        }
        let e = toml(&format!(
            "[aws]\nexternal_id = \"x1\"\n{MINIMAL}\nsession_name = \"a b\"\nrole_arn = \"{READER}\"\n{}",
            second_route("external_id = \"e1\"")
        ))
        .expect_err("refused");
        assert_eq!(
            keys(&e),
            vec![
                "aws.external_id",
                "route[0].session_name",
                "route[1].external_id"
            ]
        );
        let dir = std::env::temp_dir();
        let file = dir.join(format!("keyproxy-role-{}.json", std::process::id()));
        std::fs::write(&file, "{}").expect("write");
        let text = format!(
            "[source]\ntype = \"file\"\npath = \"{}\"\n{MINIMAL}\nrole_arn = \"{READER}\"\n",
            file.display()
        );
        let e = Config::from_toml(&text, "t.toml", &dir, &HashMap::new()).expect_err("file");
        std::fs::remove_file(&file).expect("rm");
        assert_eq!(keys(&e), vec!["route[0].role_arn"]);
    }

    #[test]
    fn role_from_the_environment() {
        let env = crate::config::test_support::env(&[
            ("KEYPROXY_UPSTREAM", "https://api.example.com"),
            ("KEYPROXY_SECRET_ID", "s"),
            ("KEYPROXY_AWS_ROLE_ARN", READER),
            ("KEYPROXY_AWS_EXTERNAL_ID", "ext-1"),
        ]);
        let c = Config::from_env(&env).expect("valid");
        let r = c.routes[0].role.as_ref().expect("role");
        assert_eq!(r.role_arn, READER);
        assert_eq!(r.external_id.as_deref(), Some("ext-1"));
        let env = crate::config::test_support::env(&[
            ("KEYPROXY_UPSTREAM", "https://api.example.com"),
            ("KEYPROXY_SECRET_ID", "s"),
            ("KEYPROXY_AWS_ROLE_ARN", "nope"),
        ]);
        let e = Config::from_env(&env).expect_err("invalid");
        assert_eq!(keys(&e), vec!["KEYPROXY_AWS_ROLE_ARN"]);
    }
}
