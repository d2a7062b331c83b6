//! The rotation function as an AWS Lambda function (`bootstrap` on `provided.al2023`): Secrets
//! Manager invokes it four times per rotation; each invocation runs one step
//! ([`keyproxy::rotation::lambda::handle`]).
//!
//! Environment: `KEYPROXY_ROTATION_TIMEOUT` (per token endpoint / test_url call, default 10s),
//! `KEYPROXY_CA_BUNDLE`, `KEYPROXY_LOG` or `RUST_LOG` (default `info`); the AWS SDK's own
//! variables (`AWS_REGION`, set by Lambda; `AWS_ENDPOINT_URL_SECRETS_MANAGER`). Logs are JSON
//! lines on stderr, which Lambda sends to CloudWatch.

use std::collections::HashMap;
use std::sync::Arc;

use keyproxy::rotation::{lambda, Rotator, Settings};
use keyproxy::telemetry::{self, LogFormat};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::Value;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    let spec = std::env::var("KEYPROXY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    telemetry::init(&spec, LogFormat::Json)?;
    let env: HashMap<String, String> = std::env::vars().collect();
    let settings = Settings::from_env(&env)?;
    let rotator = Arc::new(Rotator::from_settings(&settings).await?);
    tracing::info!(timeout = ?settings.timeout, "rotation function ready");
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let rotator = rotator.clone();
        async move { lambda::handle(&rotator, event).await }
    }))
    .await
}
