//! Helpers the config unit tests share.

use std::collections::HashMap;
use std::path::Path;

use super::{Config, ConfigError};

/// The smallest valid file: one route, everything else default.
pub(super) const MINIMAL: &str = r#"
        [[route]]
        name = "payments"
        path_prefix = "/payments/"
        upstream = "https://api.example.com/v1/"
        secret_id = "prod/payments/api"
    "#;

/// Parses `text` as the file `test.toml`, with an empty environment.
pub(super) fn toml(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, "test.toml", Path::new("."), &HashMap::new())
}

/// An environment map from pairs.
pub(super) fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The keys the problems name, in order.
pub(super) fn keys(e: &ConfigError) -> Vec<String> {
    e.problems.iter().map(|p| p.key.clone()).collect()
}
