//! The `aws` source: `GetSecretValue` against Secrets Manager, always with `VersionStage`.
//!
//! Credentials and region come from the SDK's default chain (environment, ECS task role, IRSA /
//! EKS Pod Identity, instance profile, profile files); `[aws] region` and `[aws] endpoint_url`
//! override them, and `AWS_ENDPOINT_URL_SECRETS_MANAGER` / `AWS_ENDPOINT_URL` are honoured by the
//! SDK itself. TLS is rustls with the `ring` provider (no OpenSSL, no aws-lc build).
//!
//! The sidecar's client ([`AwsSource::connect`]) retries timeouts, resets and 5xx answers as the
//! SDK's standard mode does (`max_attempts`), but not a throttled call: the cache's backoff and
//! its process-wide throttle gate ([`crate::backoff`]) decide when the next call goes, so a
//! throttled fleet does not double its calls with immediate SDK retries.
//!
//! With a role (`role_arn`, [`AssumeRole`]), the client's credentials come from aws-config's
//! `AssumeRoleProvider` over the default chain: STS `AssumeRole`, the SDK's identity cache, and a
//! new call to STS before the credentials expire. STS is reached at `AWS_ENDPOINT_URL_STS` /
//! `AWS_ENDPOINT_URL` if set (not at `[aws] endpoint_url`, which is Secrets Manager's). A refusal
//! is its own error kind, naming the role ([`SourceError::AssumeRole`]).

use std::time::Duration;

use aws_config::sts::AssumeRoleProvider;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_secretsmanager::config::interceptors::InterceptorContext;
use aws_sdk_secretsmanager::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;
use aws_sdk_secretsmanager::Client;
use aws_smithy_http_client::tls;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use futures_util::future::BoxFuture;

use super::{Secret, SecretSource, SecretVersion, SourceError};

/// Settings for the Secrets Manager client (`[aws]` in the config file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AwsSettings {
    /// Region; else the SDK's default chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// Endpoint override; else `AWS_ENDPOINT_URL_SECRETS_MANAGER` / `AWS_ENDPOINT_URL` / AWS.
    pub endpoint_url: Option<String>,
    /// Time allowed for one attempt of one call.
    pub attempt_timeout: Duration,
    /// Time allowed to open a connection to Secrets Manager.
    pub connect_timeout: Duration,
    /// Attempts per call (the SDK's standard retry with backoff); 1 disables retries.
    pub max_attempts: u32,
    /// The longest random delay before the sidecar's first call (`startup_jitter`); zero: none.
    /// The rotation function does not use it.
    pub startup_jitter: Duration,
    /// The role to read secrets with (`[aws] role_arn`); a route's own `role_arn` overrides it.
    /// `None`: the default chain's credentials themselves.
    pub role: Option<AssumeRole>,
}

/// An IAM role to read secrets with, assumed through STS (`role_arn`, `external_id`,
/// `session_name`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AssumeRole {
    /// `arn:aws:iam::<account>:role/<name>`.
    pub role_arn: String,
    /// The `sts:ExternalId` the role's trust policy asks for, if any.
    pub external_id: Option<String>,
    /// The role session name (shows in the other account's CloudTrail).
    pub session_name: String,
}

/// Error codes that mean Secrets Manager throttled the call.
const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
];

/// Builds a Secrets Manager client from `settings` and the SDK's default chain.
pub async fn client(settings: &AwsSettings) -> Client {
    Client::new(&sdk_config(settings).await)
}

/// The SDK configuration `settings` describe, over the default chain.
async fn sdk_config(settings: &AwsSettings) -> SdkConfig {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(settings.connect_timeout)
                .operation_attempt_timeout(settings.attempt_timeout)
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)));
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url.clone());
    }
    loader.load().await
}

/// Tells the SDK not to retry a throttled `GetSecretValue` (see the module docs).
#[derive(Debug)]
struct ThrottlesLeftToTheCache;

impl ClassifyRetry for ThrottlesLeftToTheCache {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let throttled = ctx
            .output_or_error()
            .and_then(Result::err)
            .and_then(|e| e.as_operation_error())
            .and_then(|e| e.downcast_ref::<GetSecretValueError>())
            .and_then(ProvideErrorMetadata::code)
            .is_some_and(|code| THROTTLING_CODES.contains(&code));
        if throttled {
            RetryAction::RetryForbidden
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "keyproxy: throttled calls are left to the cache's backoff"
    }
}

/// Reads secrets from AWS Secrets Manager.
#[derive(Debug, Clone)]
pub struct AwsSource {
    /// The SDK client (cheap to clone; pooled connections inside).
    client: Client,
    /// The longest random delay before the cache's first fetch.
    startup_jitter: Duration,
    /// The ARN of the role the client's credentials come from, if any (for error messages).
    role_arn: Option<String>,
}

impl AwsSource {
    /// A source over an existing client, without start-up jitter.
    pub fn new(client: Client) -> Self {
        AwsSource {
            client,
            startup_jitter: Duration::ZERO,
            role_arn: None,
        }
    }

    /// The sidecar's source: a client from `settings` that leaves throttled calls to the cache
    /// instead of retrying them, and `settings.startup_jitter`. With `role`, its credentials are
    /// the role's, assumed over the default chain (and refreshed before they expire).
    pub async fn connect(settings: &AwsSettings, role: Option<&AssumeRole>) -> Self {
        let conf = sdk_config(settings).await;
        let mut builder = aws_sdk_secretsmanager::config::Builder::from(&conf)
            .retry_classifier(ThrottlesLeftToTheCache);
        if let Some(role) = role {
            // STS at its own endpoint: `[aws] endpoint_url` is Secrets Manager's.
            let sts_conf = if settings.endpoint_url.is_some() {
                let mut plain = settings.clone();
                plain.endpoint_url = None;
                sdk_config(&plain).await
            } else {
                conf.clone()
            };
            let mut provider = AssumeRoleProvider::builder(role.role_arn.clone())
                .session_name(role.session_name.clone())
                .configure(&sts_conf);
            if let Some(id) = &role.external_id {
                provider = provider.external_id(id.clone());
            }
            builder = builder.credentials_provider(provider.build().await);
        }
        AwsSource {
            client: Client::from_conf(builder.build()),
            startup_jitter: settings.startup_jitter,
            role_arn: role.map(|r| r.role_arn.clone()),
        }
    }
}

impl SecretSource for AwsSource {
    fn fetch<'a>(
        &'a self,
        id: &'a str,
        stage: &'a str,
    ) -> BoxFuture<'a, Result<SecretVersion, SourceError>> {
        Box::pin(async move {
            let out = self
                .client
                .get_secret_value()
                .secret_id(id)
                .version_stage(stage)
                .send()
                .await
                .map_err(|e| classify_with_role(id, self.role_arn.as_deref(), e))?;
            let value = if let Some(s) = out.secret_string {
                s
            } else if let Some(b) = out.secret_binary {
                String::from_utf8(b.into_inner()).map_err(|_| SourceError::Invalid {
                    id: id.to_owned(),
                    detail: "SecretBinary is not UTF-8 text".into(),
                })?
            } else {
                return Err(SourceError::Invalid {
                    id: id.to_owned(),
                    detail: "the version has neither SecretString nor SecretBinary".into(),
                });
            };
            Ok(SecretVersion {
                version_id: out.version_id,
                value: Secret::new(value),
            })
        })
    }

    fn startup_jitter(&self) -> Duration {
        self.startup_jitter
    }

    fn name(&self) -> &'static str {
        "aws"
    }
}

/// Maps an SDK error onto a [`SourceError`] kind. AWS error messages never carry secret values.
pub fn classify<E, R>(id: &str, err: SdkError<E, R>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    classify_with_role(id, None, err)
}

/// [`classify`] for a client whose credentials come from assuming `role`: a failure to get
/// them is [`SourceError::AssumeRole`], naming the role and STS's answer.
fn classify_with_role<E, R>(id: &str, role: Option<&str>, err: SdkError<E, R>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let id = id.to_owned();
    if let (Some(role), Some(e)) = (role, credentials_error(&err)) {
        tracing::debug!(secret = %id, role, error = %error_chain(&err), "cannot assume role");
        return assume_role_error(id, role, e);
    }
    if let Some(e) = credentials_error(&err) {
        // The SDK's error names every provider it tried (IMDS tokens, HTTP bodies): kept for
        // `debug`, replaced by what to set in the message.
        tracing::debug!(secret = %id, error = %error_chain(&err), "no AWS credentials");
        let detail = match e {
            CredentialsError::InvalidConfiguration(_) => format!(
                "the AWS credential configuration is invalid ({})",
                crate::error::with_causes(String::new(), std::error::Error::source(e))
                    .trim_start_matches(": ")
            ),
            _ => "no AWS credentials found".to_owned(),
        };
        return SourceError::NoCredentials { id, detail };
    }
    match &err {
        SdkError::TimeoutError(_) => SourceError::Timeout {
            id,
            detail: "no answer from Secrets Manager in time".into(),
        },
        SdkError::DispatchFailure(f) => {
            let detail = if f.is_timeout() {
                return SourceError::Timeout {
                    id,
                    detail: "connecting to Secrets Manager timed out".into(),
                };
            } else if f.is_io() {
                "cannot connect to Secrets Manager".to_string()
            } else {
                format!("cannot send the request: {}", error_chain(&err))
            };
            SourceError::Unreachable { id, detail }
        }
        SdkError::ServiceError(se) => {
            let e = se.err();
            let code = e.code().unwrap_or("Unknown").to_string();
            let detail = match e.message() {
                Some(m) => format!("{code}: {m}"),
                None => code.clone(),
            };
            match code.as_str() {
                "ResourceNotFoundException" => SourceError::NotFound { id, detail },
                "AccessDeniedException" | "UnrecognizedClientException" => {
                    SourceError::AccessDenied { id, detail }
                }
                c if THROTTLING_CODES.contains(&c) => SourceError::Throttled { id, detail },
                "DecryptionFailure" => SourceError::Decryption { id, detail },
                _ => SourceError::Other { id, detail },
            }
        }
        SdkError::ResponseError(_) => SourceError::Other {
            id,
            detail: format!(
                "unreadable answer from Secrets Manager: {}",
                error_chain(&err)
            ),
        },
        _ => SourceError::Other {
            id,
            detail: error_chain(&err),
        },
    }
}

/// Why the role's credentials could not be had: STS's refusal (its code and message), no base
/// credentials to call STS with, or STS out of reach.
fn assume_role_error(id: String, role: &str, err: &CredentialsError) -> SourceError {
    use aws_sdk_sts::operation::assume_role::AssumeRoleError;
    type StsError = aws_sdk_sts::error::SdkError<AssumeRoleError>;
    let role = role.to_owned();
    let mut cur = std::error::Error::source(err);
    while let Some(e) = cur {
        if let Some(sts) = e.downcast_ref::<StsError>() {
            let detail = match sts {
                SdkError::ServiceError(se) => refusal(se.err(), se.raw()),
                SdkError::TimeoutError(_) => "STS did not answer in time".to_owned(),
                SdkError::DispatchFailure(f) => {
                    if credentials_error(sts).is_some() {
                        return SourceError::NoCredentials {
                            id,
                            detail: format!("no AWS credentials found to assume role {role} with"),
                        };
                    } else if f.is_timeout() {
                        "connecting to STS timed out".to_owned()
                    } else if f.is_io() {
                        "cannot connect to STS".to_owned()
                    } else {
                        format!("cannot send the request to STS: {}", error_chain(sts))
                    }
                }
                _ => error_chain(sts),
            };
            return SourceError::AssumeRole { id, role, detail };
        }
        cur = e.source();
    }
    SourceError::AssumeRole {
        id,
        role,
        detail: error_chain(err),
    }
}

/// STS's answer to `AssumeRole` as `Code: message`. An error the SDK could not parse (an
/// STS-compatible endpoint's `<ErrorResponse><Errors><Error>`, as moto's IAM checks send) is
/// read from the body, else named by its HTTP status.
fn refusal(
    e: &aws_sdk_sts::operation::assume_role::AssumeRoleError,
    raw: &aws_sdk_sts::config::http::HttpResponse,
) -> String {
    let body = raw
        .body()
        .bytes()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let element = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let len = body[start..].find(&format!("</{name}>"))?;
        Some(body[start..start + len].to_owned())
    };
    let code = e.code().map(str::to_owned).or_else(|| element("Code"));
    let message = e
        .message()
        .map(str::to_owned)
        .or_else(|| element("Message"));
    match (code, message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        (None, _) => format!("HTTP {} from STS", raw.status().as_u16()),
    }
}

/// The credential provider's error, if `err` failed for want of credentials (the SDK reports
/// it as a dispatch failure, before anything is sent).
fn credentials_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a CredentialsError> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return Some(c);
        }
        cur = e.source();
    }
    None
}

/// The error and its sources, joined by `: `.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    crate::error::with_causes(err.to_string(), err.source())
}

#[cfg(test)]
mod tests {
    use aws_credential_types::provider::{future, ProvideCredentials};
    use aws_sdk_secretsmanager::config::{BehaviorVersion, Region};

    use super::*;

    /// A credential chain that finds nothing, or a broken configuration.
    #[derive(Debug)]
    struct NoCredentials(bool);

    impl ProvideCredentials for NoCredentials {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            future::ProvideCredentials::ready(Err(if self.0 {
                CredentialsError::invalid_configuration("profile `nope` was not defined")
            } else {
                CredentialsError::provider_error(
                    "failed to load IMDS session token: IMDS is disabled",
                )
            }))
        }
    }

    async fn fetch_without_credentials(broken: bool) -> SourceError {
        let conf = aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url("http://127.0.0.1:9")
            .credentials_provider(NoCredentials(broken))
            .build();
        AwsSource::new(Client::from_conf(conf))
            .fetch("prod/api", "AWSCURRENT")
            .await
            .expect_err("no credentials")
    }

    #[tokio::test]
    async fn missing_credentials_say_what_to_set() {
        let e = fetch_without_credentials(false).await;
        assert_eq!(e.kind(), "no_credentials");
        let text = e.to_string();
        assert!(
            text.starts_with(
                "secret \"prod/api\": no AWS credentials found: set AWS_ACCESS_KEY_ID"
            ),
            "{text}"
        );
        assert!(
            text.contains("AWS_PROFILE") && !text.contains("IMDS"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        let e = fetch_without_credentials(true).await;
        assert_eq!(e.kind(), "no_credentials");
        assert!(
            e.to_string()
                .contains("invalid (profile `nope` was not defined): set AWS_ACCESS_KEY_ID"),
            "{e}"
        );
    }
}
