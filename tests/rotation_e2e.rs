//! End to end: the rotation function against moto's Secrets Manager and a token API of the
//! tests' own, in-process (`run_step`, `rotate_now`, the Lambda handler) and through the
//! `keyproxy rotate` command.

mod common;
mod token_api;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::types::RotationRulesType;
use aws_sdk_secretsmanager::Client;
use common::*;
use keyproxy::rotation::{
    self, Invocation, Outcome, RotateOptions, RotationError, RotationEvent, Rotator, Settings,
    Step, StepError,
};
use serde_json::{json, Value};
use token_api::{Revocation, TokenApi, TokenFault};

const SECRET: &str = "prod/payments/api";
const MASTER: &str = "prod/payments/master";
const CLIENT_ID: &str = "payments-rotation";
const CLIENT_SECRET: &str = "cs_live_never_in_a_log";

/// A moto, a token API, the master secret and the rotated secret.
struct Fx {
    moto: Moto,
    sm: Client,
    api: TokenApi,
    rotator: Rotator,
}

/// The master secret for `api`, with `extra` merged in (a `null` removes a field).
fn master_json(api: &TokenApi, extra: Value) -> String {
    let mut m = json!({
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_url": api.token_url(),
        "test_url": api.ping_url(),
    });
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            if v.is_null() {
                m.as_object_mut().expect("object").remove(&k);
            } else {
                m[k] = v;
            }
        }
    }
    m.to_string()
}

fn rotator(moto: &Moto, timeout: Duration) -> Rotator {
    Rotator::new(
        moto.client(),
        &Settings {
            timeout,
            ..Settings::default()
        },
    )
    .expect("rotator")
}

/// Sets a rotation schedule without rotating: moto then copies the value to a new version that
/// becomes AWSCURRENT (the first one becomes AWSPREVIOUS), and `RotationEnabled` is true.
async fn enable_rotation(sm: &Client, id: &str) {
    sm.rotate_secret()
        .secret_id(id)
        .rotation_rules(
            RotationRulesType::builder()
                .automatically_after_days(30)
                .build(),
        )
        .rotate_immediately(false)
        .send()
        .await
        .expect("enable rotation");
    let d = sm
        .describe_secret()
        .secret_id(id)
        .send()
        .await
        .expect("describe");
    assert_eq!(d.rotation_enabled, Some(true));
}

async fn setup_with(revocation: Revocation, master_extra: Value, enable: bool) -> Fx {
    let moto = Moto::start();
    let sm = moto.client();
    let api = TokenApi::start(CLIENT_ID, CLIENT_SECRET, revocation).await;
    create_secret(&sm, MASTER, &master_json(&api, master_extra)).await;
    create_secret(
        &sm,
        SECRET,
        &json!({"token": "bootstrap-key", "master_secret_id": MASTER, "account": "acme-42", "region": "eu-west-1"})
            .to_string(),
    )
    .await;
    if enable {
        enable_rotation(&sm, SECRET).await;
    }
    let rotator = rotator(&moto, Duration::from_secs(3));
    Fx {
        moto,
        sm,
        api,
        rotator,
    }
}

async fn setup() -> Fx {
    setup_with(Revocation::Never, json!({}), true).await
}

/// Version id → sorted labels.
async fn stages(sm: &Client, id: &str) -> HashMap<String, Vec<String>> {
    let d = sm
        .describe_secret()
        .secret_id(id)
        .send()
        .await
        .expect("describe");
    let mut v = d.version_ids_to_stages.unwrap_or_default();
    for s in v.values_mut() {
        s.sort();
    }
    v
}

fn holder(stages: &HashMap<String, Vec<String>>, label: &str) -> Option<String> {
    stages
        .iter()
        .find(|(_, s)| s.iter().any(|x| x == label))
        .map(|(v, _)| v.clone())
}

/// (version id, JSON value) of the version labelled `stage`.
async fn read(sm: &Client, id: &str, stage: &str) -> (String, Value) {
    let out = sm
        .get_secret_value()
        .secret_id(id)
        .version_stage(stage)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get {stage}: {e:?}"));
    (
        out.version_id.expect("version"),
        serde_json::from_str(out.secret_string.as_deref().expect("string")).expect("json"),
    )
}

/// The value of version `token` (labelled AWSPENDING), if it has one.
async fn pending_value(sm: &Client, id: &str, token: &str) -> Option<Value> {
    let out = sm
        .get_secret_value()
        .secret_id(id)
        .version_id(token)
        .version_stage("AWSPENDING")
        .send()
        .await
        .ok()?;
    serde_json::from_str(out.secret_string.as_deref()?).ok()
}

fn on_demand() -> Invocation {
    Invocation::OnDemand {
        require_rotation_enabled: true,
    }
}

async fn step(fx: &Fx, token: &str, step: Step) -> Result<Outcome, RotationError> {
    rotation::run_step(
        &fx.rotator,
        &RotationEvent::new(SECRET, token, step),
        on_demand(),
    )
    .await
}

fn cause(e: &RotationError) -> &StepError {
    e.cause().unwrap_or_else(|| panic!("not a step error: {e}"))
}

/// No key and no client secret in an error message.
fn assert_clean(fx: &Fx, text: &str) {
    assert!(
        !text.contains(CLIENT_SECRET),
        "client_secret leaked: {text}"
    );
    for k in fx.api.issued() {
        assert!(!text.contains(&k), "key leaked: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_steps_move_awscurrent_and_keep_the_other_fields() {
    let fx = setup().await;
    let before = stages(&fx.sm, SECRET).await;
    let old_current = holder(&before, "AWSCURRENT").expect("current");

    let rotated = rotation::rotate_now(&fx.rotator, SECRET, &RotateOptions::default())
        .await
        .expect("rotate");
    assert_eq!(
        rotated.previous_version_id.as_deref(),
        Some(old_current.as_str())
    );
    assert_eq!(
        rotated
            .outcomes
            .iter()
            .map(|(s, o)| (*s, matches!(o, Outcome::NothingToDo(_))))
            .collect::<Vec<_>>(),
        vec![
            (Step::CreateSecret, false),
            (Step::SetSecret, true),
            (Step::TestSecret, false),
            (Step::FinishSecret, false)
        ]
    );

    let keys = fx.api.issued();
    assert_eq!(keys.len(), 1, "one key minted");
    let (version, value) = read(&fx.sm, SECRET, "AWSCURRENT").await;
    assert_eq!(version, rotated.version_id);
    assert_eq!(
        value,
        json!({"token": keys[0], "master_secret_id": MASTER, "account": "acme-42", "region": "eu-west-1"})
    );
    let after = stages(&fx.sm, SECRET).await;
    assert_eq!(
        after[&rotated.version_id],
        vec!["AWSCURRENT"],
        "AWSPENDING dropped"
    );
    assert_eq!(after[&old_current], vec!["AWSPREVIOUS"]);
    assert_eq!(
        read(&fx.sm, SECRET, "AWSPREVIOUS").await.1["token"],
        "bootstrap-key"
    );
    assert_eq!(
        fx.api.uses(&keys[0]),
        (1, 0),
        "testSecret tried the new key on /ping once"
    );
    assert_eq!(fx.api.token_requests(), (1, 0), "form-encoded by default");

    // A second rotation: the first key becomes AWSPREVIOUS.
    let again = rotation::rotate_now(&fx.rotator, SECRET, &RotateOptions::default())
        .await
        .expect("rotate again");
    let after = stages(&fx.sm, SECRET).await;
    assert_eq!(
        holder(&after, "AWSCURRENT").as_deref(),
        Some(again.version_id.as_str())
    );
    assert_eq!(
        holder(&after, "AWSPREVIOUS").as_deref(),
        Some(rotated.version_id.as_str())
    );
    assert_eq!(holder(&after, "AWSPENDING"), None);
    assert_eq!(
        read(&fx.sm, SECRET, "AWSCURRENT").await.1["token"],
        fx.api.issued()[1]
    );
    drop(fx.moto);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_run_twice_gives_the_same_result() {
    let fx = setup().await;
    let token = uuid::Uuid::new_v4().to_string();
    let old_current = holder(&stages(&fx.sm, SECRET).await, "AWSCURRENT").expect("current");

    assert_eq!(
        step(&fx, &token, Step::CreateSecret).await.expect("create"),
        Outcome::Done
    );
    let snapshot = stages(&fx.sm, SECRET).await;
    let pending = pending_value(&fx.sm, SECRET, &token)
        .await
        .expect("pending value");
    assert!(matches!(
        step(&fx, &token, Step::CreateSecret)
            .await
            .expect("create again"),
        Outcome::NothingToDo(_)
    ));
    assert_eq!(
        fx.api.issued_count(),
        1,
        "createSecret twice issues one key"
    );
    assert_eq!(stages(&fx.sm, SECRET).await, snapshot);
    assert_eq!(pending_value(&fx.sm, SECRET, &token).await, Some(pending));

    for _ in 0..2 {
        assert!(matches!(
            step(&fx, &token, Step::SetSecret).await.expect("set"),
            Outcome::NothingToDo(_)
        ));
        assert_eq!(
            step(&fx, &token, Step::TestSecret).await.expect("test"),
            Outcome::Done
        );
        assert_eq!(
            stages(&fx.sm, SECRET).await,
            snapshot,
            "set/test change nothing"
        );
    }

    assert_eq!(
        step(&fx, &token, Step::FinishSecret).await.expect("finish"),
        Outcome::Finished {
            previous: Some(old_current.clone())
        }
    );
    let finished = stages(&fx.sm, SECRET).await;
    assert!(matches!(
        step(&fx, &token, Step::FinishSecret)
            .await
            .expect("finish again"),
        Outcome::NothingToDo(_)
    ));
    assert_eq!(
        stages(&fx.sm, SECRET).await,
        finished,
        "finishSecret when already current does nothing"
    );
    // Every step after the rotation finished is a no-op.
    for s in Step::ALL {
        assert!(
            matches!(
                step(&fx, &token, s).await.expect("late retry"),
                Outcome::NothingToDo(_)
            ),
            "{s}"
        );
    }
    assert_eq!(stages(&fx.sm, SECRET).await, finished);
    assert_eq!(fx.api.issued_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_secret_recovers_from_a_crash_midway() {
    let fx = setup().await;

    // 1. A pending version is already there (the put happened, the answer was lost): skip.
    let token = uuid::Uuid::new_v4().to_string();
    fx.sm
        .put_secret_value()
        .secret_id(SECRET)
        .client_request_token(&token)
        .secret_string(
            json!({"token": "put-before-the-crash", "master_secret_id": MASTER}).to_string(),
        )
        .version_stages("AWSPENDING")
        .send()
        .await
        .expect("put pending");
    assert!(matches!(
        step(&fx, &token, Step::CreateSecret).await.expect("create"),
        Outcome::NothingToDo(_)
    ));
    assert_eq!(fx.api.issued_count(), 0, "no key minted");
    assert_eq!(
        pending_value(&fx.sm, SECRET, &token).await.expect("kept")["token"],
        "put-before-the-crash"
    );

    // 2. The token endpoint issued a key but the process died before PutSecretValue: the
    //    retry mints another key and puts it.
    let token = uuid::Uuid::new_v4().to_string();
    fx.api
        .set_fault(TokenFault::AnswerLate(Duration::from_secs(5)));
    let (r, event) = (
        fx.rotator.clone(),
        RotationEvent::new(SECRET, &token, Step::CreateSecret),
    );
    let crashed = tokio::spawn(async move { rotation::run_step(&r, &event, on_demand()).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.api.issued_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the token endpoint was never called"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    crashed.abort();
    assert!(crashed.await.expect_err("aborted").is_cancelled());
    assert!(
        !stages(&fx.sm, SECRET).await.contains_key(&token),
        "nothing was put"
    );
    fx.api.set_fault(TokenFault::None);

    assert_eq!(
        step(&fx, &token, Step::CreateSecret).await.expect("retry"),
        Outcome::Done
    );
    let keys = fx.api.issued();
    assert_eq!(keys.len(), 2, "the retry minted a new key");
    assert_eq!(
        pending_value(&fx.sm, SECRET, &token).await.expect("put")["token"],
        keys[1]
    );
    // The rotation completes from there.
    for s in [Step::SetSecret, Step::TestSecret, Step::FinishSecret] {
        step(&fx, &token, s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    assert_eq!(
        read(&fx.sm, SECRET, "AWSCURRENT").await,
        (
            token,
            json!({
                "token": keys[1], "master_secret_id": MASTER, "account": "acme-42", "region": "eu-west-1"
            })
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_test_leaves_awscurrent_untouched() {
    let fx = setup().await;
    let before = read(&fx.sm, SECRET, "AWSCURRENT").await;
    fx.api.set_ping_status(403);
    let token = uuid::Uuid::new_v4().to_string();
    let err = rotation::rotate_now(
        &fx.rotator,
        SECRET,
        &RotateOptions {
            token: Some(token.clone()),
            ..RotateOptions::default()
        },
    )
    .await
    .expect_err("test fails");
    assert_eq!(err.step(), Some(Step::TestSecret));
    assert!(
        matches!(cause(&err), StepError::TestFailed { status: 403, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("403") && text.contains(SECRET) && text.contains("testSecret"),
        "{text}"
    );
    assert_clean(&fx, &text);
    assert_eq!(
        read(&fx.sm, SECRET, "AWSCURRENT").await,
        before,
        "AWSCURRENT did not move"
    );
    assert_eq!(stages(&fx.sm, SECRET).await[&token], vec!["AWSPENDING"]);

    // Once the API accepts the key, resuming the same rotation (same token) finishes it.
    fx.api.set_ping_status(200);
    let rotated = rotation::rotate_now(
        &fx.rotator,
        SECRET,
        &RotateOptions {
            token: Some(token.clone()),
            ..RotateOptions::default()
        },
    )
    .await
    .expect("resume");
    assert_eq!(fx.api.issued_count(), 1, "resuming reuses the pending key");
    assert_eq!(
        read(&fx.sm, SECRET, "AWSCURRENT").await.0,
        rotated.version_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hanging_token_endpoint_fails_create_cleanly() {
    let mut fx = setup().await;
    let before = stages(&fx.sm, SECRET).await;
    let current = read(&fx.sm, SECRET, "AWSCURRENT").await;

    fx.api.set_fault(TokenFault::Fail);
    let err = rotation::rotate_now(&fx.rotator, SECRET, &RotateOptions::default())
        .await
        .expect_err("500");
    assert_eq!(err.step(), Some(Step::CreateSecret));
    assert!(
        matches!(cause(&err), StepError::TokenEndpoint { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("answered 500"), "{err}");
    assert!(
        err.to_string().contains("server_error"),
        "the OAuth error code is kept: {err}"
    );
    assert_clean(&fx, &err.to_string());
    assert_eq!(stages(&fx.sm, SECRET).await, before, "no version put");

    fx.api.set_fault(TokenFault::Hang);
    fx.rotator = rotator(&fx.moto, Duration::from_secs(1));
    let started = Instant::now();
    let err = rotation::rotate_now(&fx.rotator, SECRET, &RotateOptions::default())
        .await
        .expect_err("hang");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(matches!(cause(&err), StepError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("no answer within 1s"), "{err}");
    assert_eq!(stages(&fx.sm, SECRET).await, before, "no version put");
    assert_eq!(read(&fx.sm, SECRET, "AWSCURRENT").await, current);
    assert_eq!(fx.api.issued_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_disabled_rotation_are_refused() {
    let fx = setup().await;
    let sm_event = |token: &str, s: Step| RotationEvent::new(SECRET, token, s);

    // Not a version of the secret (Secrets Manager always creates the version first).
    let err = rotation::run_step(
        &fx.rotator,
        &sm_event("no-such-version-0000000000000000", Step::CreateSecret),
        Invocation::SecretsManager,
    )
    .await
    .expect_err("unknown");
    assert!(
        matches!(cause(&err), StepError::UnknownVersion { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("is not a version of the secret"),
        "{err}"
    );
    // On demand, only createSecret may create the version.
    let err = step(&fx, "no-such-version-0000000000000000", Step::TestSecret)
        .await
        .expect_err("unknown");
    assert!(
        matches!(cause(&err), StepError::UnknownVersion { .. }),
        "{err}"
    );

    // A version that is not AWSPENDING (AWSPREVIOUS here).
    let previous = holder(&stages(&fx.sm, SECRET).await, "AWSPREVIOUS").expect("previous");
    for s in [Step::CreateSecret, Step::TestSecret, Step::FinishSecret] {
        let err = rotation::run_step(
            &fx.rotator,
            &sm_event(&previous, s),
            Invocation::SecretsManager,
        )
        .await
        .expect_err("not pending");
        assert!(matches!(cause(&err), StepError::NotPending { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("not labelled AWSPENDING (its labels: [AWSPREVIOUS])"),
            "{err}"
        );
    }

    // Rotation not enabled: refused unless the check is skipped (on demand only).
    let moto2 = Moto::start();
    let sm2 = moto2.client();
    create_secret(&sm2, MASTER, &master_json(&fx.api, json!({}))).await;
    create_secret(
        &sm2,
        SECRET,
        &json!({"token": "k0", "master_secret_id": MASTER}).to_string(),
    )
    .await;
    let r2 = rotator(&moto2, Duration::from_secs(3));
    let err = rotation::rotate_now(&r2, SECRET, &RotateOptions::default())
        .await
        .expect_err("disabled");
    assert!(
        matches!(cause(&err), StepError::RotationNotEnabled),
        "{err}"
    );
    assert!(err.to_string().contains("rotation is not enabled"), "{err}");
    assert_eq!(fx.api.issued_count(), 0);
    let rotated = rotation::rotate_now(
        &r2,
        SECRET,
        &RotateOptions {
            token: None,
            require_rotation_enabled: false,
        },
    )
    .await
    .expect("on demand without a schedule");
    assert_eq!(read(&sm2, SECRET, "AWSCURRENT").await.0, rotated.version_id);
    let err = rotation::run_step(
        &r2,
        &RotationEvent::new(SECRET, &rotated.version_id, Step::FinishSecret),
        Invocation::SecretsManager,
    )
    .await
    .expect_err("the Lambda path always checks");
    assert!(
        matches!(cause(&err), StepError::RotationNotEnabled),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_secret_options_json_request_custom_fields_and_no_test_url() {
    let fx = setup_with(
        Revocation::Never,
        json!({"token_request": "json", "token_field": "token", "secret_field": "api_key", "test_url": null}),
        true,
    )
    .await;
    fx.api.set_answer_field("token");
    let rotated = rotation::rotate_now(&fx.rotator, SECRET, &RotateOptions::default())
        .await
        .expect("rotate");
    assert!(
        matches!(&rotated.outcomes[2], (Step::TestSecret, Outcome::NothingToDo(why)) if why.contains("no test_url")),
        "{:?}",
        rotated.outcomes
    );
    assert_eq!(fx.api.token_requests(), (0, 1), "JSON-encoded");
    let value = read(&fx.sm, SECRET, "AWSCURRENT").await.1;
    assert_eq!(value["api_key"], fx.api.issued()[0]);
    assert_eq!(
        value["token"], "bootstrap-key",
        "other fields kept as they were"
    );

    // Wrong credentials: the token endpoint's 401 and its error code, no secret.
    create_secret(
        &fx.sm,
        "other/master",
        &json!({"client_id": CLIENT_ID, "client_secret": "wrong", "token_url": fx.api.token_url()})
            .to_string(),
    )
    .await;
    create_secret(
        &fx.sm,
        "other/api",
        &json!({"master_secret_id": "other/master"}).to_string(),
    )
    .await;
    let err = rotation::rotate_now(
        &fx.rotator,
        "other/api",
        &RotateOptions {
            token: None,
            require_rotation_enabled: false,
        },
    )
    .await
    .expect_err("401");
    assert!(
        err.to_string()
            .contains("answered 401 (error \"invalid_client\")"),
        "{err}"
    );
    assert!(!err.to_string().contains("wrong"), "{err}");

    // An insecure token_url is refused before any call.
    fx.sm.put_secret_value().secret_id("other/master")
        .secret_string(json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token_url": "http://auth.example.com/token"}).to_string())
        .send().await.expect("put");
    let err = rotation::rotate_now(
        &fx.rotator,
        "other/api",
        &RotateOptions {
            token: None,
            require_rotation_enabled: false,
        },
    )
    .await
    .expect_err("insecure");
    assert!(
        matches!(
            cause(&err),
            StepError::InsecureUrl {
                field: "token_url",
                ..
            }
        ),
        "{err}"
    );
}

/// Puts the secret in the state Secrets Manager leaves before it invokes createSecret: rotation
/// enabled and a version `token` labelled AWSPENDING without a value. moto's RotateSecret does
/// exactly that, then fails to find the Lambda function (it cannot run one without Docker).
async fn start_rotation_like_secrets_manager(sm: &Client, id: &str, token: &str) {
    let r = sm
        .rotate_secret()
        .secret_id(id)
        .client_request_token(token)
        .rotation_lambda_arn("arn:aws:lambda:us-east-1:123456789012:function:keyproxy-rotation")
        .rotation_rules(
            RotationRulesType::builder()
                .automatically_after_days(30)
                .build(),
        )
        .send()
        .await;
    assert!(r.is_err(), "moto has no such function");
    let s = stages(sm, id).await;
    assert_eq!(
        s.get(token).map(Vec::as_slice),
        Some(&["AWSPENDING".to_owned()][..]),
        "{s:?}"
    );
    assert!(
        sm.get_secret_value()
            .secret_id(id)
            .version_id(token)
            .version_stage("AWSPENDING")
            .send()
            .await
            .is_err(),
        "no value yet"
    );
}

fn lambda_event(payload: Value) -> lambda_runtime::LambdaEvent<Value> {
    lambda_runtime::LambdaEvent::new(payload, lambda_runtime::Context::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_handler_runs_the_four_steps_secrets_manager_sends() {
    let fx = setup_with(Revocation::OnFirstUseOfNewer, json!({}), false).await;
    let token = uuid::Uuid::new_v4().to_string();
    start_rotation_like_secrets_manager(&fx.sm, SECRET, &token).await;
    let old = holder(&stages(&fx.sm, SECRET).await, "AWSCURRENT").expect("current");

    for s in [
        "createSecret",
        "createSecret",
        "setSecret",
        "testSecret",
        "finishSecret",
    ] {
        let out = rotation::lambda::handle(
            &fx.rotator,
            lambda_event(json!({"SecretId": SECRET, "ClientRequestToken": token, "Step": s})),
        )
        .await
        .unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(out["Step"], s);
    }
    assert_eq!(
        fx.api.issued_count(),
        1,
        "the retried createSecret minted nothing"
    );
    let (version, value) = read(&fx.sm, SECRET, "AWSCURRENT").await;
    assert_eq!(version, token);
    assert_eq!(value["token"], fx.api.issued()[0]);
    assert_eq!(value["master_secret_id"], MASTER);
    let after = stages(&fx.sm, SECRET).await;
    assert_eq!(after[&token], vec!["AWSCURRENT"]);
    assert_eq!(after[&old], vec!["AWSPREVIOUS"]);
    // A retried finishSecret after the rotation: nothing to do.
    let out = rotation::lambda::handle(
        &fx.rotator,
        lambda_event(json!({"SecretId": SECRET, "ClientRequestToken": token, "Step": "finishSecret", "RotationToken": "rt"})),
    )
    .await
    .expect("late finish");
    assert_eq!(out["result"], "nothing to do");

    // Errors become Lambda errors whose type names the cause.
    let err = rotation::lambda::handle(
        &fx.rotator,
        lambda_event(json!({"SecretId": SECRET, "Step": "createSecret"})),
    )
    .await
    .expect_err("no token");
    assert_eq!(err.kind(), "InvalidEvent");
    assert!(err.to_string().contains("ClientRequestToken"), "{err}");
    let err = rotation::lambda::handle(
        &fx.rotator,
        lambda_event(json!({"SecretId": SECRET, "ClientRequestToken": "not-a-version-00000000000000000", "Step": "createSecret"})),
    )
    .await
    .expect_err("unknown version");
    let d = lambda_runtime::Diagnostic::from(err);
    assert_eq!(d.error_type, "UnknownVersion");
    assert!(
        d.error_message.contains(SECRET) && d.error_message.contains("createSecret"),
        "{}",
        d.error_message
    );
}

/// `keyproxy rotate ARGS` against `moto`, configured by the environment.
async fn run_cli(moto: &Moto, args: &[&str]) -> std::process::Output {
    let mut env = aws_env(moto);
    env.push(("KEYPROXY_ROTATION_TIMEOUT".into(), "5s".into()));
    run_isolated(args, &env).await
}

/// `keyproxy rotate ARGS` with nothing of the test's environment but `PATH` and `env`.
async fn run_isolated(args: &[&str], env: &[(String, String)]) -> std::process::Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyproxy"))
        .arg("rotate")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("keyproxy rotate finished in time")
        .expect("spawn keyproxy rotate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyproxy_rotate_rotates_and_prints_the_new_version_id() {
    let fx = setup_with(Revocation::Never, json!({}), false).await;

    // No rotation schedule: refused unless told to skip the check.
    let out = run_cli(&fx.moto, &["--secret-id", SECRET]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rotation is not enabled"), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(fx.api.issued_count(), 0);

    let out = run_cli(
        &fx.moto,
        &["--secret-id", SECRET, "--skip-rotation-enabled-check"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let version = stdout.trim();
    assert!(uuid::Uuid::parse_str(version).is_ok(), "a UUID: {stdout:?}");
    let (current, value) = read(&fx.sm, SECRET, "AWSCURRENT").await;
    assert_eq!(current, version);
    assert_eq!(value["token"], fx.api.issued()[0]);
    assert!(stderr.contains("rotation finished"), "{stderr}");
    assert_clean(&fx, &stdout);
    assert_clean(&fx, &stderr);

    // A given token becomes the version id.
    let token = "3b0e7c1c-6f4e-4a3e-9d2a-7d9f0c1e2a3b";
    let out = run_cli(
        &fx.moto,
        &[
            "--secret-id",
            SECRET,
            "--token",
            token,
            "--skip-rotation-enabled-check",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), token);
    assert_eq!(read(&fx.sm, SECRET, "AWSCURRENT").await.0, token);
    assert_eq!(read(&fx.sm, SECRET, "AWSPREVIOUS").await.0, version);

    // A failing step: exit 1, the cause on stderr, nothing on stdout.
    fx.api.set_ping_status(403);
    let out = run_cli(
        &fx.moto,
        &["--secret-id", SECRET, "--skip-rotation-enabled-check"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("testSecret") && stderr.contains("answered 403"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(read(&fx.sm, SECRET, "AWSCURRENT").await.0, token);
    assert_clean(&fx, &stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyproxy_rotate_takes_aws_settings_from_the_config_file() {
    let fx = setup_with(Revocation::Never, json!({}), false).await;
    let dir = scratch("rotate-config");
    // The proxy's own config file: rotate reads its [aws] section and nothing else.
    let config = dir.join("moto.toml");
    std::fs::write(
        &config,
        format!(
            "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n\n[app_auth]\ntoken_env = \"NOT_SET_HERE\"\n\n{}",
            fx.moto.url(),
            route("api", "/api", "http://127.0.0.1:9", SECRET, "secret_field = \"token\"")
        ),
    )
    .expect("write config");
    let config = config.display().to_string();
    let args = [
        "--config",
        &config,
        "--secret-id",
        SECRET,
        "--skip-rotation-enabled-check",
    ];
    // Only credentials in the environment: no region, no endpoint.
    let mut env = no_credentials_env(&dir);
    env.push(("AWS_ACCESS_KEY_ID".into(), "testing".into()));
    env.push(("AWS_SECRET_ACCESS_KEY".into(), "testing".into()));
    let out = run_isolated(&args, &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(read(&fx.sm, SECRET, "AWSCURRENT").await.0, version);
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour when stderr is not a terminal: {stderr}"
    );

    // Without credentials: exit 1, one line saying what to set.
    let out = run_isolated(&args, &no_credentials_env(&dir)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("keyproxy rotate: rotating secret \"prod/payments/api\", createSecret: ")
            && last.contains(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ),
        "{stderr}"
    );
    assert!(!stderr.contains("IMDS"), "{stderr}");
    assert_eq!(read(&fx.sm, SECRET, "AWSCURRENT").await.0, version);

    // An invalid [aws] section: exit 64 naming the key and its line.
    std::fs::write(
        dir.join("bad.toml"),
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"::\"\n",
    )
    .expect("write");
    let bad = dir.join("bad.toml").display().to_string();
    let out = run_isolated(&["--config", &bad, "--secret-id", SECRET], &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("bad.toml:3: aws.endpoint_url: \"::\" is not a URL"),
        "{stderr}"
    );
}

#[test]
fn the_rotation_demo_runs_with_no_failed_request() {
    // scripts/rotation-demo installs moto and builds keyproxy, then runs this script.
    let python = std::env::var("HTTPBIN_PYTHON").unwrap_or_else(|_| "python3".into());
    let moto = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/rotation_demo.py"
        ))
        .args([
            "--keyproxy",
            env!("CARGO_BIN_EXE_keyproxy"),
            "--moto",
            &moto,
        ])
        .env_remove("KEYPROXY_CONFIG")
        .env_remove("KEYPROXY_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (run scripts/test): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for step in [
        "createSecret: key #2",
        "labelled AWSPENDING",
        "testSecret:   the AWSPENDING key answered 200",
        "finishSecret: AWSCURRENT moved",
        "a moto quirk",
        "reason: 401) and replayed",
        " requests through keyproxy, 0 failed",
    ] {
        assert!(stdout.contains(step), "{step:?} missing:\n{stdout}");
    }
}
