//! The AWS Lambda handler: Secrets Manager's event in, one step run, a short summary out.
//!
//! `src/bin/keyproxy-rotation.rs` hands [`handle`] to `lambda_runtime`; tests call it directly
//! with a [`LambdaEvent`]. A failed step is returned as an error whose type is the cause's kind
//! (`TestFailed`, `RotationNotEnabled`, ...) and whose message names the secret, step and
//! cause; Secrets Manager then records the rotation as failed and leaves `AWSCURRENT` alone.

use lambda_runtime::{Diagnostic, LambdaEvent};
use serde_json::{json, Value};

use super::{run_step, Invocation, Outcome, RotationError, RotationEvent, Rotator};

/// Handles one invocation by Secrets Manager.
pub async fn handle(rotator: &Rotator, event: LambdaEvent<Value>) -> Result<Value, RotationError> {
    let request_id = event.context.request_id.clone();
    let parsed: RotationEvent = serde_json::from_value(event.payload).map_err(|e| {
        let err = RotationError::InvalidEvent(format!(
            "{e}; expected {{\"SecretId\", \"ClientRequestToken\", \"Step\"}}"
        ));
        tracing::error!(request_id, error = %err, "rotation event refused");
        err
    })?;
    match run_step(rotator, &parsed, Invocation::SecretsManager).await {
        Ok(outcome) => {
            let (result, detail) = match &outcome {
                Outcome::Done => ("done", None),
                Outcome::Finished { previous } => ("finished", previous.clone()),
                Outcome::NothingToDo(why) => ("nothing to do", Some((*why).to_owned())),
            };
            Ok(json!({
                "SecretId": parsed.secret_id,
                "ClientRequestToken": parsed.client_request_token,
                "Step": parsed.step.as_str(),
                "result": result,
                "detail": detail,
            }))
        }
        Err(e) => {
            tracing::error!(request_id, secret = %parsed.secret_id, step = %parsed.step,
                version = %parsed.client_request_token, kind = e.kind(), error = %e,
                "rotation step failed");
            Err(e)
        }
    }
}

impl From<RotationError> for Diagnostic {
    fn from(e: RotationError) -> Diagnostic {
        Diagnostic {
            error_type: e.kind().to_owned(),
            error_message: e.to_string(),
        }
    }
}
