//! Where secret values come from, and the types that carry them.
//!
//! A [`SecretSource`] reads one version of one secret (`aws`: Secrets Manager; `file`: a local
//! JSON file for development). [`Secret`] wraps every secret value so that it can never be printed:
//! its `Debug` and `Display` show `***`, and the raw text is reachable only through
//! [`Secret::expose`], which the credential renderer calls. [`Sources`] holds one source per
//! IAM role the routes read with (`role_arn`), beside the one for the base credentials.

pub mod aws;
pub mod file;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

/// A secret value. `Debug` and `Display` print `***`; the value is reachable only via `expose`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value. Call it only where the value is injected or parsed, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One version of a secret, as a source returned it.
#[derive(Debug, Clone)]
pub struct SecretVersion {
    /// The version's id (Secrets Manager `VersionId`); `None` where the source has none.
    pub version_id: Option<String>,
    /// The secret's text: `SecretString`, or `SecretBinary` decoded as UTF-8.
    pub value: Secret,
}

/// Why a source could not return a secret. Messages name the secret and the cause, never a value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The secret (or that version stage) does not exist.
    #[error("secret {id:?}: not found ({detail})")]
    NotFound { id: String, detail: String },
    /// The credentials in use may not read the secret.
    #[error("secret {id:?}: access denied ({detail})")]
    AccessDenied { id: String, detail: String },
    /// The role the secret is read with could not be assumed (`sts:AssumeRole` refused, e.g.
    /// `AccessDenied`, or STS unreachable). `detail` is STS's code and message.
    #[error("secret {id:?}: cannot assume role {role} : {detail}")]
    AssumeRole {
        id: String,
        role: String,
        detail: String,
    },
    /// Secrets Manager throttled the call.
    #[error("secret {id:?}: throttled by Secrets Manager ({detail})")]
    Throttled { id: String, detail: String },
    /// KMS could not decrypt the secret.
    #[error("secret {id:?}: decryption failed ({detail})")]
    Decryption { id: String, detail: String },
    /// No AWS credentials could be loaded: none are configured, or their configuration is
    /// broken. `detail` says which; the message says what to set.
    #[error("secret {id:?}: {detail}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with a role (ECS task role, IRSA or EKS Pod Identity, instance profile); a local emulator such as moto takes any values")]
    NoCredentials { id: String, detail: String },
    /// The call did not finish in time.
    #[error("secret {id:?}: timed out ({detail})")]
    Timeout { id: String, detail: String },
    /// The source could not be reached at all (connection refused, DNS, file missing).
    #[error("secret {id:?}: source unreachable ({detail})")]
    Unreachable { id: String, detail: String },
    /// The value exists but cannot be used (binary that is not UTF-8, bad JSON, missing field, ...).
    #[error("secret {id:?}: unusable value: {detail}")]
    Invalid { id: String, detail: String },
    /// Anything else the source reported.
    #[error("secret {id:?}: {detail}")]
    Other { id: String, detail: String },
}

impl SourceError {
    /// A short, stable name for metrics labels and JSON bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::NotFound { .. } => "not_found",
            SourceError::AccessDenied { .. } => "access_denied",
            SourceError::AssumeRole { .. } => "assume_role",
            SourceError::Throttled { .. } => "throttled",
            SourceError::Decryption { .. } => "decryption_failure",
            SourceError::NoCredentials { .. } => "no_credentials",
            SourceError::Timeout { .. } => "timeout",
            SourceError::Unreachable { .. } => "unreachable",
            SourceError::Invalid { .. } => "invalid_value",
            SourceError::Other { .. } => "error",
        }
    }
}

/// A place secrets are read from.
pub trait SecretSource: Send + Sync + 'static {
    /// Reads the version of `id` that carries the staging label `stage` (e.g. `AWSCURRENT`).
    fn fetch<'a>(
        &'a self,
        id: &'a str,
        stage: &'a str,
    ) -> BoxFuture<'a, Result<SecretVersion, SourceError>>;

    /// How often the cache should poll this source regardless of a route's `refresh_interval`
    /// (the `file` source is polled often so that edits show up at once). `None`: no override.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }

    /// The longest random delay before the cache's first fetch, so that a fleet started at once
    /// does not call at once (`[aws] startup_jitter`). Zero: no delay.
    fn startup_jitter(&self) -> Duration {
        Duration::ZERO
    }

    /// A short name for logs (`aws`, `file`).
    fn name(&self) -> &'static str;
}

/// The sources secrets are read from: one over the base credentials, and one per role that
/// routes name (`role_arn`), each with its own client and credential cache.
#[derive(Clone)]
pub struct Sources {
    /// Over the base credentials (no role).
    base: Arc<dyn SecretSource>,
    /// One per role.
    roles: HashMap<aws::AssumeRole, Arc<dyn SecretSource>>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("base", &self.base.name())
            .field("roles", &self.roles.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Sources {
    /// Every secret from `base` (the `file` source; tests).
    pub fn single(base: Arc<dyn SecretSource>) -> Self {
        Sources {
            base,
            roles: HashMap::new(),
        }
    }

    /// Adds the source that reads with `role`.
    pub fn insert(&mut self, role: aws::AssumeRole, source: Arc<dyn SecretSource>) {
        self.roles.insert(role, source);
    }

    /// Whether `role` has its own source.
    pub fn has(&self, role: &aws::AssumeRole) -> bool {
        self.roles.contains_key(role)
    }

    /// The source for `role`: its own if one was added, else the base one.
    pub fn get(&self, role: Option<&aws::AssumeRole>) -> &Arc<dyn SecretSource> {
        role.and_then(|r| self.roles.get(r)).unwrap_or(&self.base)
    }

    /// The source over the base credentials.
    pub fn base(&self) -> &Arc<dyn SecretSource> {
        &self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("sk_live_abc");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        let v = SecretVersion {
            version_id: None,
            value: s.clone(),
        };
        assert!(!format!("{v:?}").contains("sk_live"));
        assert_eq!(s.expose(), "sk_live_abc");
    }
}
