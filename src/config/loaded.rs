//! A configuration as loaded: where it comes from ([`ConfigFile`]: a file, or the environment
//! alone), and a validated [`Config`] with the checksum of the bytes it came from and when it
//! was loaded ([`LoadedConfig`]), which `/readyz` shows and a reload compares.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::json;

use super::{Config, ConfigError};

/// Where the configuration comes from: a TOML file, or `KEYPROXY_*` variables only.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// The file; `None`: environment variables only (nothing to reload).
    path: Option<PathBuf>,
    /// The process environment, read once at start (variables override the file's globals).
    env: HashMap<String, String>,
}

/// A validated configuration, and which bytes it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The configuration.
    pub config: Config,
    /// Lowercase hex SHA-256 of the file's bytes; `None` for a configuration from the
    /// environment.
    pub sha256: Option<String>,
    /// When it was loaded (at start, or by the reload that applied it).
    pub loaded_at: SystemTime,
}

impl LoadedConfig {
    /// What `/readyz` shows of it.
    pub fn summary(&self) -> serde_json::Value {
        json!({
            "origin": self.config.origin,
            "sha256": self.sha256,
            "loaded_at": humantime::format_rfc3339_millis(self.loaded_at).to_string(),
        })
    }
}

impl ConfigFile {
    /// The configuration from `path` (else from `env` alone), with `env` the process environment.
    pub fn new(path: Option<PathBuf>, env: HashMap<String, String>) -> ConfigFile {
        ConfigFile { path, env }
    }

    /// The file, if the configuration comes from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads and validates the configuration now.
    pub fn load(&self) -> Result<LoadedConfig, ConfigError> {
        match &self.path {
            Some(path) => {
                let bytes = std::fs::read(path);
                self.validate(path, bytes)
            }
            None => Ok(LoadedConfig {
                config: Config::from_env(&self.env)?,
                sha256: None,
                loaded_at: SystemTime::now(),
            }),
        }
    }

    /// Validates bytes read from `path` (or the error reading them): what a reload applies.
    pub fn validate(
        &self,
        path: &Path,
        bytes: std::io::Result<Vec<u8>>,
    ) -> Result<LoadedConfig, ConfigError> {
        let bytes = bytes.map_err(|e| {
            let origin = path.display().to_string();
            ConfigError::single(&origin, "(file)", format!("cannot read the file: {e}"))
        })?;
        Ok(LoadedConfig {
            config: Config::from_file_bytes(path, &bytes, &self.env)?,
            sha256: Some(sha256(&bytes)),
            loaded_at: SystemTime::now(),
        })
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
