//! The rotation function: mints a new API key and moves `AWSCURRENT` to it, in the four steps
//! Secrets Manager drives.
//!
//! Secrets Manager rotates a secret by invoking a function four times with
//! `{SecretId, ClientRequestToken, Step}`:
//!
//! - `createSecret`: read `AWSCURRENT` (a JSON object naming its `master_secret_id`), read the
//!   master secret (client credentials, token endpoint), POST to the token endpoint, and
//!   `PutSecretValue` the current JSON with the new key as `AWSPENDING`, version id = token.
//!   Nothing happens if that version already holds a value (Secrets Manager retries steps).
//! - `setSecret`: nothing. An API key lives at the API, which minted it in createSecret; this
//!   step exists for database-style rotations that must set a password in the service.
//! - `testSecret`: GET the master secret's `test_url` with the pending key; anything but 2xx
//!   fails the step (and so the rotation, before `AWSCURRENT` moves). No `test_url`: skipped.
//! - `finishSecret`: `UpdateSecretVersionStage` moves `AWSCURRENT` to the new version (Secrets
//!   Manager labels the old one `AWSPREVIOUS`), then drops the new version's `AWSPENDING`
//!   label, so that no rotation looks half-done afterwards.
//!
//! Before each step, the checks of AWS's own rotation templates: rotation is enabled for the
//! secret, the token names a version of it, and that version is `AWSPENDING` (a version that is
//! already `AWSCURRENT` means the rotation is over: nothing to do). An on-demand rotation
//! ([`rotate_now`], `keyproxy rotate`) has no rotation schedule and no version stub made by
//! `RotateSecret`, so there createSecret creates the version and the rotation-enabled check
//! can be skipped. No step moves `AWSCURRENT` except a successful finishSecret.
//!
//! Errors ([`RotationError`]) name the secret, the step and the cause; neither they nor any log
//! line carry a key or the `client_secret`.
//!
//! - [`token`]: the master secret format, the token endpoint and `test_url` calls.
//! - [`lambda`]: the AWS Lambda handler (`keyproxy-rotation`, `bootstrap` on `provided.al2023`).

pub mod lambda;
mod steps;
pub mod token;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_secretsmanager::Client;
use serde::Deserialize;

use crate::forward::ClientError;
use crate::secrets::aws::AwsSettings;
use crate::secrets::SourceError;
use token::TokenClient;

/// The staging label of the live version.
pub const AWSCURRENT: &str = "AWSCURRENT";
/// The staging label of the version being rotated in.
pub const AWSPENDING: &str = "AWSPENDING";
/// The environment variable setting the time allowed per token endpoint or test_url call.
pub const TIMEOUT_VAR: &str = "KEYPROXY_ROTATION_TIMEOUT";
/// The default time allowed per token endpoint or test_url call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// One of the four rotation steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum Step {
    /// Mint the new key and store it as `AWSPENDING`.
    #[serde(rename = "createSecret")]
    CreateSecret,
    /// Set the new credential in the service (nothing for API keys).
    #[serde(rename = "setSecret")]
    SetSecret,
    /// Try the new key.
    #[serde(rename = "testSecret")]
    TestSecret,
    /// Move `AWSCURRENT` to the new version.
    #[serde(rename = "finishSecret")]
    FinishSecret,
}

impl Step {
    /// The steps, in the order Secrets Manager runs them.
    pub const ALL: [Step; 4] = [
        Step::CreateSecret,
        Step::SetSecret,
        Step::TestSecret,
        Step::FinishSecret,
    ];

    /// The step's name as Secrets Manager spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::CreateSecret => "createSecret",
            Step::SetSecret => "setSecret",
            Step::TestSecret => "testSecret",
            Step::FinishSecret => "finishSecret",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Step {
    type Err = String;
    fn from_str(s: &str) -> Result<Step, String> {
        Step::ALL
            .into_iter()
            .find(|step| step.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is not a rotation step (createSecret, setSecret, testSecret, finishSecret)")
            })
    }
}

/// What Secrets Manager sends the rotation function.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RotationEvent {
    /// The secret's name or ARN.
    #[serde(rename = "SecretId")]
    pub secret_id: String,
    /// The new version's id.
    #[serde(rename = "ClientRequestToken")]
    pub client_request_token: String,
    /// Which step to run.
    #[serde(rename = "Step")]
    pub step: Step,
    /// Passed back on `PutSecretValue` when Secrets Manager sends it (cross-account rotation).
    #[serde(rename = "RotationToken", default)]
    pub rotation_token: Option<String>,
}

impl RotationEvent {
    /// An event for `step` of rotating `secret_id` into version `token`.
    pub fn new(secret_id: &str, token: &str, step: Step) -> RotationEvent {
        RotationEvent {
            secret_id: secret_id.to_owned(),
            client_request_token: token.to_owned(),
            step,
            rotation_token: None,
        }
    }
}

/// Who runs the step, which decides the checks made before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invocation {
    /// Secrets Manager (the Lambda function): every check of AWS's templates. Secrets Manager
    /// creates the version (labelled `AWSPENDING`, without a value) before createSecret, and
    /// invokes the function only for a secret with rotation enabled.
    SecretsManager,
    /// On demand (`keyproxy rotate`, tests): createSecret may create the version named by the
    /// token; the rotation-enabled check is made only if asked.
    OnDemand {
        /// Refuse a secret whose rotation is not enabled (DescribeSecret `RotationEnabled`).
        require_rotation_enabled: bool,
    },
}

impl Invocation {
    fn requires_rotation_enabled(self) -> bool {
        match self {
            Invocation::SecretsManager => true,
            Invocation::OnDemand {
                require_rotation_enabled,
            } => require_rotation_enabled,
        }
    }
}

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The step did its work.
    Done,
    /// finishSecret moved `AWSCURRENT` from `previous` to the new version.
    Finished {
        /// The version that was `AWSCURRENT` (now `AWSPREVIOUS`).
        previous: Option<String>,
    },
    /// Nothing to do, and why (a retried step, an already finished rotation, no test_url, ...).
    NothingToDo(&'static str),
}

/// The result of an on-demand rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// The secret.
    pub secret_id: String,
    /// The version now `AWSCURRENT` (the ClientRequestToken).
    pub version_id: String,
    /// The version that was `AWSCURRENT` before (now `AWSPREVIOUS`); `None` if nothing moved.
    pub previous_version_id: Option<String>,
    /// What each step did, in order.
    pub outcomes: Vec<(Step, Outcome)>,
}

/// Why a step failed. Never carries a key or the client secret.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// DescribeSecret says rotation is not enabled for the secret.
    #[error("rotation is not enabled for the secret (DescribeSecret RotationEnabled is false); an on-demand `keyproxy rotate --skip-rotation-enabled-check` does not need it")]
    RotationNotEnabled,
    /// The ClientRequestToken is not one of the secret's version ids.
    #[error("ClientRequestToken {token:?} is not a version of the secret")]
    UnknownVersion {
        /// The token.
        token: String,
    },
    /// The token's version is neither `AWSPENDING` nor `AWSCURRENT`.
    #[error("version {token:?} is not labelled AWSPENDING (its labels: [{stages}])")]
    NotPending {
        /// The token.
        token: String,
        /// Its labels, comma-separated.
        stages: String,
    },
    /// A Secrets Manager call failed.
    #[error("{op}: {error}")]
    SecretsManager {
        /// The operation (`GetSecretValue`, ...).
        op: &'static str,
        /// What went wrong.
        error: SourceError,
    },
    /// A version of the rotated secret cannot be used.
    #[error("the {stage} value cannot be used: {detail}")]
    InvalidValue {
        /// `AWSCURRENT` or `AWSPENDING`.
        stage: &'static str,
        /// What is wrong (field names, never values).
        detail: String,
    },
    /// The master secret is unreadable or malformed.
    #[error("master secret {id:?}: {detail}")]
    Master {
        /// The master secret's id.
        id: String,
        /// What is wrong (field names, never values).
        detail: String,
    },
    /// A URL of the master secret is not https and not on a loopback host.
    #[error("{field} {url} refused: https is required unless the host is loopback")]
    InsecureUrl {
        /// `token_url` or `test_url`.
        field: &'static str,
        /// The URL without user info or query.
        url: String,
    },
    /// The token endpoint failed or answered something unusable.
    #[error("token endpoint {url}: {detail}")]
    TokenEndpoint {
        /// The URL without user info or query.
        url: String,
        /// What happened (status, error code, missing field).
        detail: String,
    },
    /// The new key did not work on `test_url`.
    #[error("test_url {url} answered {status} to the new key; AWSCURRENT was not moved")]
    TestFailed {
        /// The URL without user info or query.
        url: String,
        /// The status it answered.
        status: u16,
    },
    /// `test_url` could not be reached.
    #[error("test_url {url}: {detail}")]
    TestUnreachable {
        /// The URL without user info or query.
        url: String,
        /// What happened.
        detail: String,
    },
    /// The token endpoint or `test_url` did not answer in time.
    #[error("{what} {url}: no answer within {}", humantime::format_duration(*timeout))]
    Timeout {
        /// `token endpoint` or `test_url`.
        what: &'static str,
        /// The URL without user info or query.
        url: String,
        /// The time allowed.
        timeout: Duration,
    },
}

impl StepError {
    /// A short, stable name for the cause (the Lambda error type).
    pub fn kind(&self) -> &'static str {
        match self {
            StepError::RotationNotEnabled => "RotationNotEnabled",
            StepError::UnknownVersion { .. } => "UnknownVersion",
            StepError::NotPending { .. } => "VersionNotPending",
            StepError::SecretsManager { .. } => "SecretsManagerError",
            StepError::InvalidValue { .. } => "InvalidSecretValue",
            StepError::Master { .. } => "InvalidMasterSecret",
            StepError::InsecureUrl { .. } => "InsecureUrl",
            StepError::TokenEndpoint { .. } => "TokenEndpointError",
            StepError::TestFailed { .. } => "TestFailed",
            StepError::TestUnreachable { .. } => "TestUnreachable",
            StepError::Timeout { .. } => "Timeout",
        }
    }
}

/// Why rotation failed: the secret, the step and the cause, or a bad event or setting.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// A step failed. `AWSCURRENT` has not moved (unless this is a retried finishSecret).
    #[error("rotating secret {secret:?}, {step}: {cause}")]
    Step {
        /// The secret id.
        secret: String,
        /// The step.
        step: Step,
        /// What went wrong.
        cause: StepError,
    },
    /// The event is not a rotation event.
    #[error("invalid rotation event: {0}")]
    InvalidEvent(String),
    /// A setting (environment variable) is invalid.
    #[error("rotation settings: {0}")]
    Settings(String),
    /// The config file given for the `[aws]` settings is invalid.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// The HTTP client could not be built (CA bundle, TLS).
    #[error("rotation HTTP client: {0}")]
    Client(#[from] ClientError),
}

impl RotationError {
    /// The failed step's cause, if a step failed.
    pub fn cause(&self) -> Option<&StepError> {
        match self {
            RotationError::Step { cause, .. } => Some(cause),
            _ => None,
        }
    }

    /// The failed step, if a step failed.
    pub fn step(&self) -> Option<Step> {
        match self {
            RotationError::Step { step, .. } => Some(*step),
            _ => None,
        }
    }

    /// A short, stable name for the error (the Lambda error type).
    pub fn kind(&self) -> &'static str {
        match self {
            RotationError::Step { cause, .. } => cause.kind(),
            RotationError::InvalidEvent(_) => "InvalidEvent",
            RotationError::Settings(_) | RotationError::Config(_) => "InvalidSettings",
            RotationError::Client(_) => "ClientError",
        }
    }
}

/// Settings of the rotation function.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Time allowed for one call to the token endpoint or `test_url`, answer included
    /// (`KEYPROXY_ROTATION_TIMEOUT`, default 10s).
    pub timeout: Duration,
    /// Extra PEM CA certificates trusted for those calls (`KEYPROXY_CA_BUNDLE`).
    pub ca_bundle: Option<PathBuf>,
    /// The Secrets Manager client's settings (region and endpoint from the SDK's chain).
    pub aws: AwsSettings,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            timeout: DEFAULT_TIMEOUT,
            ca_bundle: None,
            aws: AwsSettings {
                region: None,
                endpoint_url: None,
                attempt_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(3),
                max_attempts: 3,
                startup_jitter: Duration::ZERO,
                role: None,
            },
        }
    }
}

impl Settings {
    /// Settings from environment variables (`KEYPROXY_ROTATION_TIMEOUT`, `KEYPROXY_CA_BUNDLE`);
    /// region and endpoint come from the AWS SDK's own variables.
    pub fn from_env(env: &HashMap<String, String>) -> Result<Settings, RotationError> {
        let mut s = Settings::default();
        if let Some(v) = env.get(TIMEOUT_VAR).filter(|v| !v.trim().is_empty()) {
            s.timeout = humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    RotationError::Settings(format!(
                        "{TIMEOUT_VAR}={v:?} is not a positive duration such as 10s or 500ms"
                    ))
                })?;
        }
        if let Some(v) = env.get("KEYPROXY_CA_BUNDLE").filter(|v| !v.is_empty()) {
            s.ca_bundle = Some(PathBuf::from(v));
        }
        Ok(s)
    }
}

impl Settings {
    /// Settings from the environment ([`Settings::from_env`]), with the `[aws]` section and
    /// `ca_bundle` of the config file at `config`, if given (`KEYPROXY_CA_BUNDLE` still wins, as
    /// for the proxy). The rest of the file is not checked: it may be the proxy's own.
    pub fn load(
        config: Option<&std::path::Path>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, RotationError> {
        let mut s = Settings::from_env(env)?;
        if let Some(path) = config {
            let (aws, ca_bundle) = crate::config::Config::aws_from_file(path, env)?;
            s.aws = aws;
            if s.ca_bundle.is_none() {
                s.ca_bundle = ca_bundle;
            }
        }
        Ok(s)
    }
}

/// What the steps need: a Secrets Manager client and the token/test HTTP client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Rotator {
    /// Secrets Manager.
    sm: Client,
    /// Token endpoint and test_url calls.
    http: TokenClient,
}

impl Rotator {
    /// A rotator over an existing Secrets Manager client.
    pub fn new(sm: Client, settings: &Settings) -> Result<Rotator, RotationError> {
        let client = crate::forward::client(settings.timeout, settings.ca_bundle.as_deref())?;
        Ok(Rotator {
            sm,
            http: TokenClient::new(client, settings.timeout),
        })
    }

    /// A rotator with a Secrets Manager client from `settings.aws` and the SDK's default chain
    /// (`AWS_REGION`, `AWS_ENDPOINT_URL_SECRETS_MANAGER`, role credentials, ...).
    pub async fn from_settings(settings: &Settings) -> Result<Rotator, RotationError> {
        let sm = crate::secrets::aws::client(&settings.aws).await;
        Rotator::new(sm, settings)
    }
}

/// Runs one step for `event`, after the checks `invocation` calls for.
pub async fn run_step(
    rotator: &Rotator,
    event: &RotationEvent,
    invocation: Invocation,
) -> Result<Outcome, RotationError> {
    let outcome = steps::run(rotator, event, invocation)
        .await
        .map_err(|cause| RotationError::Step {
            secret: event.secret_id.clone(),
            step: event.step,
            cause,
        })?;
    match &outcome {
        Outcome::NothingToDo(why) => tracing::info!(secret = %event.secret_id,
            step = %event.step, version = %event.client_request_token, reason = why,
            "rotation step: nothing to do"),
        Outcome::Done => tracing::info!(secret = %event.secret_id, step = %event.step,
            version = %event.client_request_token, "rotation step done"),
        Outcome::Finished { previous } => tracing::info!(secret = %event.secret_id,
            step = %event.step, version = %event.client_request_token,
            previous = previous.as_deref().unwrap_or("-"),
            refresh = %refresh_hint(&event.secret_id),
            "rotation finished: AWSCURRENT moved to the new version"),
    }
    Ok(outcome)
}

/// How to make a running keyproxy serve the new version now: without it, a sidecar picks it at
/// its next background refresh or at the first 401.
pub fn refresh_hint(secret_id: &str) -> String {
    let id = percent_encoding::utf8_percent_encode(secret_id, percent_encoding::NON_ALPHANUMERIC);
    format!(
        "sidecars serve the new version at their next refresh or first 401; to switch one now: curl -X POST 'http://{}/refresh?secret={id}' (or keyproxy refresh --secret {secret_id:?})",
        crate::config::defaults::ADMIN_LISTEN
    )
}

/// Options of an on-demand rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateOptions {
    /// The new version's id (ClientRequestToken); a fresh UUID v4 if `None`. Passing the token
    /// of a rotation that failed midway resumes it.
    pub token: Option<String>,
    /// Refuse a secret whose rotation is not enabled, as Secrets Manager would.
    pub require_rotation_enabled: bool,
}

impl Default for RotateOptions {
    fn default() -> RotateOptions {
        RotateOptions {
            token: None,
            require_rotation_enabled: true,
        }
    }
}

/// Rotates `secret_id` now: the four steps in order, as Secrets Manager would run them, stopping
/// at the first failure (so `AWSCURRENT` moves only if every step before finishSecret passed).
pub async fn rotate_now(
    rotator: &Rotator,
    secret_id: &str,
    options: &RotateOptions,
) -> Result<Rotated, RotationError> {
    let token = options
        .token
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let invocation = Invocation::OnDemand {
        require_rotation_enabled: options.require_rotation_enabled,
    };
    let mut outcomes = Vec::with_capacity(Step::ALL.len());
    let mut previous = None;
    for step in Step::ALL {
        let event = RotationEvent::new(secret_id, &token, step);
        let outcome = run_step(rotator, &event, invocation).await?;
        if let Outcome::Finished { previous: p } = &outcome {
            previous.clone_from(p);
        }
        outcomes.push((step, outcome));
    }
    Ok(Rotated {
        secret_id: secret_id.to_owned(),
        version_id: token,
        previous_version_id: previous,
        outcomes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refresh_hint_is_a_command_to_paste() {
        let hint = refresh_hint("prod/payments api");
        assert!(
            hint.contains(
                "curl -X POST 'http://127.0.0.1:9901/refresh?secret=prod%2Fpayments%20api'"
            ),
            "{hint}"
        );
        assert!(
            hint.contains("keyproxy refresh --secret \"prod/payments api\""),
            "{hint}"
        );
    }

    #[test]
    fn events_parse_as_secrets_manager_sends_them() {
        let e: RotationEvent = serde_json::from_value(serde_json::json!({
            "SecretId": "arn:aws:secretsmanager:us-east-1:1:secret:a-AbCdEf",
            "ClientRequestToken": "t-1",
            "Step": "testSecret",
            "RotationToken": "rt",
        }))
        .expect("event");
        assert_eq!(e.step, Step::TestSecret);
        assert_eq!(e.rotation_token.as_deref(), Some("rt"));
        assert!(serde_json::from_value::<RotationEvent>(
            serde_json::json!({"SecretId": "a", "ClientRequestToken": "t", "Step": "dropSecret"})
        )
        .is_err());
        assert_eq!("finishSecret".parse::<Step>(), Ok(Step::FinishSecret));
        assert!("finish".parse::<Step>().is_err());
    }

    #[test]
    fn settings_from_env() {
        let env = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
        assert_eq!(
            Settings::from_env(&HashMap::new())
                .expect("default")
                .timeout,
            DEFAULT_TIMEOUT
        );
        assert_eq!(
            Settings::from_env(&env(TIMEOUT_VAR, "750ms"))
                .expect("ms")
                .timeout,
            Duration::from_millis(750)
        );
        for bad in ["0s", "soon", "-1s"] {
            let e = Settings::from_env(&env(TIMEOUT_VAR, bad)).expect_err(bad);
            assert!(e.to_string().contains(TIMEOUT_VAR), "{e}");
        }
    }

    #[test]
    fn errors_name_secret_step_and_cause() {
        let e = RotationError::Step {
            secret: "prod/payments/api".into(),
            step: Step::TestSecret,
            cause: StepError::TestFailed {
                url: "https://api.example.com/ping".into(),
                status: 403,
            },
        };
        let text = e.to_string();
        assert!(text.contains("\"prod/payments/api\"") && text.contains("testSecret"));
        assert!(text.contains("answered 403"), "{text}");
        assert_eq!(e.kind(), "TestFailed");
    }
}
