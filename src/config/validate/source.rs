//! Where secrets come from: `[source]` and `[aws]`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::Uri;

use super::{duration, resolve};
use crate::config::file::{RawAws, RawSource};
use crate::config::{defaults, Problems, SourceConfig};
use crate::secrets::aws::AwsSettings;

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
}
