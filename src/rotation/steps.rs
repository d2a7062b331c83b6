//! The four steps against Secrets Manager, each preceded by the checks of AWS's templates.

use std::collections::HashMap;

use aws_sdk_secretsmanager::Client;
use serde_json::{Map, Value};

use super::token::Master;
use super::{Invocation, Outcome, RotationEvent, Rotator, Step, StepError, AWSCURRENT, AWSPENDING};
use crate::secrets::aws::classify;
use crate::secrets::{Secret, SourceError};

/// The field of the rotated secret that names the master secret.
const MASTER_FIELD: &str = "master_secret_id";

/// What DescribeSecret says about the secret.
struct Described {
    /// `RotationEnabled`.
    rotation_enabled: bool,
    /// `VersionIdsToStages`.
    versions: HashMap<String, Vec<String>>,
}

impl Described {
    /// The version holding `label`.
    fn holder(&self, label: &str) -> Option<&str> {
        self.versions
            .iter()
            .find(|(_, stages)| stages.iter().any(|s| s == label))
            .map(|(v, _)| v.as_str())
    }

    fn has(&self, version: &str, label: &str) -> bool {
        self.versions
            .get(version)
            .is_some_and(|stages| stages.iter().any(|s| s == label))
    }
}

/// Where the token's version stands, once the checks passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// No such version yet (on-demand createSecret only).
    New,
    /// Labelled `AWSPENDING` (with or without a value).
    Pending,
    /// Already `AWSCURRENT`: this rotation is over.
    Current,
}

fn sm_error(op: &'static str) -> impl Fn(SourceError) -> StepError {
    move |error| StepError::SecretsManager { op, error }
}

async fn describe(sm: &Client, secret: &str) -> Result<Described, StepError> {
    let out = sm
        .describe_secret()
        .secret_id(secret)
        .send()
        .await
        .map_err(|e| sm_error("DescribeSecret")(classify(secret, e)))?;
    Ok(Described {
        rotation_enabled: out.rotation_enabled.unwrap_or(false),
        versions: out.version_ids_to_stages.unwrap_or_default(),
    })
}

/// The checks of AWS's rotation templates.
fn check(
    d: &Described,
    token: &str,
    step: Step,
    invocation: Invocation,
) -> Result<Standing, StepError> {
    if invocation.requires_rotation_enabled() && !d.rotation_enabled {
        return Err(StepError::RotationNotEnabled);
    }
    let Some(stages) = d.versions.get(token) else {
        return match (step, invocation) {
            (Step::CreateSecret, Invocation::OnDemand { .. }) => Ok(Standing::New),
            _ => Err(StepError::UnknownVersion {
                token: token.to_owned(),
            }),
        };
    };
    if stages.iter().any(|s| s == AWSCURRENT) {
        Ok(Standing::Current)
    } else if stages.iter().any(|s| s == AWSPENDING) {
        Ok(Standing::Pending)
    } else {
        Err(StepError::NotPending {
            token: token.to_owned(),
            stages: stages.join(", "),
        })
    }
}

/// Reads one version's text: by stage, or by version id and stage. Always passes
/// `VersionStage`: without it, moto answers with a stale version after a label move.
async fn get_value(
    sm: &Client,
    secret: &str,
    version_id: Option<&str>,
    stage: &str,
) -> Result<Secret, SourceError> {
    let out = sm
        .get_secret_value()
        .secret_id(secret)
        .set_version_id(version_id.map(str::to_owned))
        .version_stage(stage)
        .send()
        .await
        .map_err(|e| classify(secret, e))?;
    if let Some(s) = out.secret_string {
        Ok(Secret::new(s))
    } else if let Some(b) = out.secret_binary {
        String::from_utf8(b.into_inner())
            .map(Secret::new)
            .map_err(|_| SourceError::Invalid {
                id: secret.to_owned(),
                detail: "SecretBinary is not UTF-8 text".into(),
            })
    } else {
        Err(SourceError::NotFound {
            id: secret.to_owned(),
            detail: "the version has no value".into(),
        })
    }
}

/// Parses a rotated secret's value: a JSON object naming its master secret.
fn parse_doc(
    stage: &'static str,
    value: &Secret,
) -> Result<(Map<String, Value>, String), StepError> {
    let bad = |detail: String| StepError::InvalidValue { stage, detail };
    let doc: Value = serde_json::from_str(value.expose()).map_err(|e| {
        bad(format!(
            "not JSON (line {}, column {}); it must be a JSON object with {MASTER_FIELD:?}",
            e.line(),
            e.column()
        ))
    })?;
    let Value::Object(obj) = doc else {
        return Err(bad(format!(
            "not a JSON object; it must be a JSON object with {MASTER_FIELD:?}"
        )));
    };
    let master = match obj.get(MASTER_FIELD) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(bad(format!(
                "field {MASTER_FIELD:?} is not a non-empty string"
            )))
        }
        None => return Err(bad(format!("field {MASTER_FIELD:?} is missing"))),
    };
    Ok((obj, master))
}

async fn read_master(sm: &Client, id: &str) -> Result<Master, StepError> {
    let text = get_value(sm, id, None, AWSCURRENT)
        .await
        .map_err(|e| StepError::Master {
            id: id.to_owned(),
            detail: format!("GetSecretValue: {e}"),
        })?;
    Master::parse(id, &text)
}

/// Runs `event`'s step.
pub(super) async fn run(
    rotator: &Rotator,
    event: &RotationEvent,
    invocation: Invocation,
) -> Result<Outcome, StepError> {
    let sm = &rotator.sm;
    let secret = event.secret_id.as_str();
    let token = event.client_request_token.as_str();
    let described = describe(sm, secret).await?;
    let standing = check(&described, token, event.step, invocation)?;
    if standing == Standing::Current {
        if event.step == Step::FinishSecret && described.has(token, AWSPENDING) {
            // A finishSecret that moved AWSCURRENT but stopped before dropping AWSPENDING.
            drop_pending(sm, secret, token).await?;
            return Ok(Outcome::Done);
        }
        return Ok(Outcome::NothingToDo("the version is already AWSCURRENT"));
    }
    match event.step {
        Step::CreateSecret => create(rotator, event, standing).await,
        Step::SetSecret => Ok(Outcome::NothingToDo(
            "setSecret has nothing to do for an API key (the token endpoint issued it)",
        )),
        Step::TestSecret => test(rotator, secret, token).await,
        Step::FinishSecret => finish(sm, secret, token, &described).await,
    }
}

async fn create(
    rotator: &Rotator,
    event: &RotationEvent,
    standing: Standing,
) -> Result<Outcome, StepError> {
    let sm = &rotator.sm;
    let secret = event.secret_id.as_str();
    let token = event.client_request_token.as_str();
    if standing == Standing::Pending {
        // Secrets Manager makes the version (without a value) before createSecret; a value
        // means an earlier attempt of this step got as far as PutSecretValue.
        match get_value(sm, secret, Some(token), AWSPENDING).await {
            Ok(_) => {
                return Ok(Outcome::NothingToDo(
                    "the AWSPENDING version already holds a value",
                ))
            }
            Err(SourceError::NotFound { .. }) => {}
            Err(e) => return Err(sm_error("GetSecretValue")(e)),
        }
    }
    let current = get_value(sm, secret, None, AWSCURRENT)
        .await
        .map_err(sm_error("GetSecretValue"))?;
    let (mut doc, master_id) = parse_doc(AWSCURRENT, &current)?;
    let master = read_master(sm, &master_id).await?;
    let key = rotator.http.mint(&master).await?;
    doc.insert(
        master.secret_field.clone(),
        Value::String(key.expose().to_owned()),
    );
    let value = Value::Object(doc).to_string();
    sm.put_secret_value()
        .secret_id(secret)
        .client_request_token(token)
        .secret_string(value)
        .version_stages(AWSPENDING)
        .set_rotation_token(event.rotation_token.clone())
        .send()
        .await
        .map_err(|e| sm_error("PutSecretValue")(classify(secret, e)))?;
    Ok(Outcome::Done)
}

async fn test(rotator: &Rotator, secret: &str, token: &str) -> Result<Outcome, StepError> {
    let sm = &rotator.sm;
    let pending = get_value(sm, secret, Some(token), AWSPENDING)
        .await
        .map_err(|e| match e {
            SourceError::NotFound { .. } => StepError::InvalidValue {
                stage: AWSPENDING,
                detail: "the version has no value yet (createSecret has not run)".into(),
            },
            e => sm_error("GetSecretValue")(e),
        })?;
    let (doc, master_id) = parse_doc(AWSPENDING, &pending)?;
    let master = read_master(sm, &master_id).await?;
    let key = match doc.get(&master.secret_field) {
        Some(Value::String(s)) if !s.is_empty() => Secret::new(s.clone()),
        _ => {
            return Err(StepError::InvalidValue {
                stage: AWSPENDING,
                detail: format!("field {:?} is missing or not a string", master.secret_field),
            })
        }
    };
    match rotator.http.probe(&master, &key).await? {
        None => {
            tracing::info!(secret, version = token, master = %master.id,
                "testSecret skipped: the master secret has no test_url");
            Ok(Outcome::NothingToDo(
                "the master secret has no test_url: test skipped",
            ))
        }
        Some(status) if (200..300).contains(&status) => Ok(Outcome::Done),
        Some(status) => Err(StepError::TestFailed {
            url: master
                .test_url
                .as_ref()
                .map(super::token::shown)
                .unwrap_or_default(),
            status,
        }),
    }
}

async fn finish(
    sm: &Client,
    secret: &str,
    token: &str,
    described: &Described,
) -> Result<Outcome, StepError> {
    let previous = described.holder(AWSCURRENT).map(str::to_owned);
    sm.update_secret_version_stage()
        .secret_id(secret)
        .version_stage(AWSCURRENT)
        .move_to_version_id(token)
        .set_remove_from_version_id(previous.clone())
        .send()
        .await
        .map_err(|e| sm_error("UpdateSecretVersionStage")(classify(secret, e)))?;
    // Secrets Manager (and moto) leave AWSPENDING on the new version; a later RotateSecret
    // would see a rotation in progress if it stayed anywhere else, and keyproxy's AWSPENDING
    // fallback has nothing to find once the rotation is over.
    if describe(sm, secret).await?.has(token, AWSPENDING) {
        drop_pending(sm, secret, token).await?;
    }
    Ok(Outcome::Finished { previous })
}

async fn drop_pending(sm: &Client, secret: &str, token: &str) -> Result<(), StepError> {
    sm.update_secret_version_stage()
        .secret_id(secret)
        .version_stage(AWSPENDING)
        .remove_from_version_id(token)
        .send()
        .await
        .map_err(|e| sm_error("UpdateSecretVersionStage")(classify(secret, e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(enabled: bool, versions: &[(&str, &[&str])]) -> Described {
        Described {
            rotation_enabled: enabled,
            versions: versions
                .iter()
                .map(|(v, s)| ((*v).to_owned(), s.iter().map(|x| (*x).to_owned()).collect()))
                .collect(),
        }
    }

    const SM: Invocation = Invocation::SecretsManager;
    const ON_DEMAND: Invocation = Invocation::OnDemand {
        require_rotation_enabled: false,
    };

    #[test]
    fn checks_follow_aws_templates() {
        let d = described(
            true,
            &[
                ("old", &["AWSCURRENT"]),
                ("t", &["AWSPENDING"]),
                ("p", &["AWSPREVIOUS"]),
            ],
        );
        assert_eq!(
            check(&d, "t", Step::CreateSecret, SM).ok(),
            Some(Standing::Pending)
        );
        assert_eq!(
            check(&d, "old", Step::FinishSecret, SM).ok(),
            Some(Standing::Current)
        );
        assert!(matches!(
            check(&d, "p", Step::TestSecret, SM),
            Err(StepError::NotPending { .. })
        ));
        assert!(matches!(
            check(&d, "x", Step::CreateSecret, SM),
            Err(StepError::UnknownVersion { .. })
        ));
        assert_eq!(
            check(&d, "x", Step::CreateSecret, ON_DEMAND).ok(),
            Some(Standing::New)
        );
        assert!(matches!(
            check(&d, "x", Step::TestSecret, ON_DEMAND),
            Err(StepError::UnknownVersion { .. })
        ));
        let off = described(false, &[("t", &["AWSPENDING"])]);
        assert!(matches!(
            check(&off, "t", Step::SetSecret, SM),
            Err(StepError::RotationNotEnabled)
        ));
        assert!(check(&off, "t", Step::SetSecret, ON_DEMAND).is_ok());
        let strict = Invocation::OnDemand {
            require_rotation_enabled: true,
        };
        assert!(matches!(
            check(&off, "t", Step::SetSecret, strict),
            Err(StepError::RotationNotEnabled)
        ));
    }

    #[test]
    fn rotated_values_need_a_master_secret_id() {
        let ok = Secret::new(r#"{"token":"sk_1","master_secret_id":"m","other":1}"#);
        let (doc, m) = parse_doc(AWSCURRENT, &ok).expect("doc");
        assert_eq!(m, "m");
        assert_eq!(doc.len(), 3);
        for (v, want) in [
            ("sk_plain_key", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"token":"sk_1"}"#, "\"master_secret_id\" is missing"),
            (
                r#"{"token":"sk_1","master_secret_id":3}"#,
                "not a non-empty string",
            ),
        ] {
            let e = parse_doc(AWSCURRENT, &Secret::new(v))
                .expect_err(v)
                .to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("sk_"), "{e}");
        }
    }
}
