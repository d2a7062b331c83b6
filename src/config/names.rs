//! How a problem names its key: the way the user wrote it, as a TOML path (`route[1].upstream`)
//! or as an environment variable (`KEYPROXY_UPSTREAM`). Used by parsing and validation alike.

/// Names keys the way the user wrote them: TOML paths, or environment variable names.
#[derive(Clone, Copy)]
pub(in crate::config) enum Namer {
    File,
    Env,
}

impl Namer {
    pub(in crate::config) fn global(self, key: &str) -> String {
        match self {
            Namer::File => key.to_owned(),
            Namer::Env => match key {
                "source.type" => "KEYPROXY_SOURCE".into(),
                "source.path" => "KEYPROXY_SECRETS_FILE".into(),
                "aws.region" => "AWS_REGION".into(),
                "app_auth" => "KEYPROXY_APP_TOKEN".into(),
                "route" => "KEYPROXY_UPSTREAM".into(),
                k => format!("KEYPROXY_{}", k.replace('.', "_").to_uppercase()),
            },
        }
    }

    pub(in crate::config) fn route(self, i: usize, key: &str) -> String {
        match self {
            Namer::File => format!("route[{i}].{key}"),
            Namer::Env => match key {
                "name" => "KEYPROXY_ROUTE_NAME".into(),
                // `allow[2]` is the variable's third pattern: the variable is named.
                k => format!(
                    "KEYPROXY_{}",
                    k.split(['[', '.']).next().unwrap_or(k).to_uppercase()
                ),
            },
        }
    }
}
