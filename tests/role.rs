//! End to end: reading secrets from another account through an IAM role (`role_arn`), with
//! moto serving STS and Secrets Manager. moto keeps one set of secrets per account and puts a
//! call in the account of the role whose assumed credentials signed it, so a secret created with
//! the role's credentials exists only in the other account.

mod common;

use std::time::Duration;

use aws_config::sts::AssumeRoleProvider;
use aws_config::BehaviorVersion;
use aws_sdk_secretsmanager::config::{Credentials, Region};
use common::*;

/// The role in the other account.
const READER: &str = "arn:aws:iam::111122223333:role/keyproxy-reader";

/// keyproxy's environment for moto: Secrets Manager and STS both at moto.
fn env(moto: &Moto) -> Vec<(String, String)> {
    let mut env = aws_env(moto);
    env.push(("AWS_ENDPOINT_URL_STS".into(), moto.url()));
    env
}

/// A Secrets Manager client for moto whose credentials are `role`'s, assumed through moto's
/// STS with the SDK's own provider (as keyproxy does).
async fn client_as(moto: &Moto, role: &str) -> aws_sdk_secretsmanager::Client {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let base = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(moto.url())
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .http_client(http_client)
        .load()
        .await;
    let provider = AssumeRoleProvider::builder(role)
        .session_name("test-setup")
        .configure(&base)
        .build()
        .await;
    let conf = aws_sdk_secretsmanager::config::Builder::from(&base)
        .credentials_provider(provider)
        .build();
    aws_sdk_secretsmanager::Client::from_conf(conf)
}

/// The role sessions moto's STS handed out under `session_name` (its record of each
/// `AssumeRole` call, from `/moto-api/data.json`).
async fn assumed(moto: &Moto, session_name: &str) -> Vec<serde_json::Value> {
    let data = http::get(&format!("{}/moto-api/data.json", moto.url()))
        .await
        .expect("moto data")
        .json();
    data["sts"]["AssumedRole"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["session_name"] == session_name)
        .cloned()
        .collect()
}

/// `/readyz`'s entry for `secret` read with `role` (`None`: no role).
async fn readyz_entry(kp: &KeyProxy, secret: &str, role: Option<&str>) -> serde_json::Value {
    let doc = http::get(&format!("http://{}/readyz", kp.admin))
        .await
        .expect("readyz")
        .json();
    doc["secrets"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|s| s["secret"] == secret && s["role"].as_str() == role)
                .cloned()
        })
        .unwrap_or_else(|| panic!("no {secret:?} read as {role:?} in {doc}"))
}

/// Polls `/readyz` until the entry for `secret` (read with `role`) reports an error.
async fn wait_error(kp: &KeyProxy, secret: &str, role: Option<&str>) -> serde_json::Value {
    for _ in 0..200 {
        let e = readyz_entry(kp, secret, role).await;
        if !e["error"].is_null() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no error for {secret:?}; logs:\n{}", kp.logs().join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_reads_the_other_accounts_secret_and_without_it_the_secret_is_missing() {
    let moto = Moto::start();
    let other = client_as(&moto, READER).await;
    create_secret(&other, "cross/api", "cross-key").await;
    // The same id in both accounts, with different values.
    create_secret(&other, "shared", "other-account-key").await;
    create_secret(&moto.client(), "shared", "base-account-key").await;
    assert!(
        moto.client()
            .describe_secret()
            .secret_id("cross/api")
            .send()
            .await
            .is_err(),
        "cross/api exists only in the other account"
    );

    let up = Upstream::echo().await;
    // [aws] role_arn: every route reads with it (the base account's copy of "shared" is read
    // by the second keyproxy below).
    let config = format!(
        "[aws]\nrole_arn = \"{READER}\"\nexternal_id = \"ext-123\"\n{}{}",
        route("cross", "/cross", &up.url(), "cross/api", ""),
        route("shared", "/shared", &up.url(), "shared", ""),
    );
    let kp = KeyProxy::start(&config, &env(&moto));
    kp.wait_ready(Duration::from_secs(30)).await;
    for (path, key) in [
        ("/cross/x", "Bearer cross-key"),
        ("/shared/x", "Bearer other-account-key"),
    ] {
        let r = http::get(&kp.url(path)).await.expect("request");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["headers"]["authorization"],
            key,
            "{path}: {}",
            r.text()
        );
    }
    let e = readyz_entry(&kp, "cross/api", Some(READER)).await;
    assert_eq!(e["loaded"], true, "{e}");
    // A refresh on demand reads both again with the role's cached credentials: one
    // AssumeRole call for the process so far.
    let r = http::send("POST", &format!("http://{}/refresh", kp.admin), &[], "")
        .await
        .expect("refresh");
    let doc = r.json();
    for s in doc["secrets"].as_array().expect("secrets") {
        assert_eq!(s["role"], READER, "{doc}");
        assert!(s["error"].is_null(), "{doc}");
    }
    let sessions = assumed(&moto, "keyproxy").await;
    assert_eq!(sessions.len(), 1, "the SDK caches the role's credentials");
    assert_eq!(sessions[0]["external_id"], "ext-123");
    assert_eq!(sessions[0]["role_arn"], READER);
    // The role's credentials stay out of the logs and /metrics.
    let key = sessions[0]["secret_access_key"].as_str().expect("key");
    let token = sessions[0]["session_token"].as_str().expect("token");
    kp.assert_nowhere(&[key, token]).await;

    // A route's own role_arn beside a route without one: the same secret id from two accounts,
    // two entries, each named with its role in /readyz.
    let config = format!(
        "{}role_arn = \"{READER}\"\nsession_name = \"billing-sidecar\"\n{}",
        route("other", "/other", &up.url(), "shared", ""),
        route("base", "/base", &up.url(), "shared", ""),
    );
    let two = KeyProxy::start(&config, &env(&moto));
    two.wait_ready(Duration::from_secs(30)).await;
    for (path, key) in [
        ("/other/x", "Bearer other-account-key"),
        ("/base/x", "Bearer base-account-key"),
    ] {
        let r = http::get(&two.url(path)).await.expect("request");
        assert_eq!(r.json()["headers"]["authorization"], key, "{path}");
    }
    assert_eq!(
        readyz_entry(&two, "shared", Some(READER)).await["routes"],
        serde_json::json!(["other"])
    );
    assert_eq!(
        readyz_entry(&two, "shared", None).await["routes"],
        serde_json::json!(["base"])
    );
    let sessions = assumed(&moto, "billing-sidecar").await;
    assert_eq!(sessions.len(), 1);
    assert!(
        sessions[0]["external_id"].is_null(),
        "the route's own role only"
    );

    // Without the role: the secret is not in the base account, and the error says so.
    let none = KeyProxy::start(
        &route("cross", "/cross", &up.url(), "cross/api", ""),
        &env(&moto),
    );
    let e = wait_error(&none, "cross/api", None).await;
    assert_eq!(e["error_kind"], "not_found", "{e}");
    assert!(e["role"].is_null(), "{e}");
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("cross/api")),
        "{e}"
    );
    let r = http::get(&none.url("/cross/x")).await.expect("request");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("cross/api"), "{}", r.text());
    assert!(r.text().contains("not found"), "{}", r.text());
    for k in [&kp, &two, &none] {
        k.assert_nowhere(&["cross-key", "other-account-key", "base-account-key"])
            .await;
    }
}

/// With IAM enforced in moto, a user that may read secrets but not call `sts:AssumeRole`:
/// keyproxy reports `AccessDenied` on the role, naming it, as its own error kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_role_names_the_role_and_the_cause() {
    let moto = Moto::start();
    // Before enforcement: a user whose only permission is Secrets Manager, and its key.
    let python = std::env::var("HTTPBIN_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import json, sys, boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
iam.create_user(UserName="sidecar")
iam.put_user_policy(UserName="sidecar", PolicyName="read-secrets", PolicyDocument=json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="sidecar")["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script, &moto.url()])
        .output()
        .expect("python with boto3 (run scripts/test)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut words = stdout.split_whitespace();
    let (key_id, secret) = (
        words.next().expect("key id").to_owned(),
        words.next().expect("secret").to_owned(),
    );
    // From now on moto checks every call against IAM.
    let r = http::send(
        "POST",
        &format!("{}/moto-api/reset-auth", moto.url()),
        &[],
        "0",
    )
    .await
    .expect("reset-auth");
    assert_eq!(r.status, 200, "{}", r.text());

    let up = Upstream::echo().await;
    let mut env = env(&moto);
    env.retain(|(k, _)| k != "AWS_ACCESS_KEY_ID" && k != "AWS_SECRET_ACCESS_KEY");
    env.push(("AWS_ACCESS_KEY_ID".into(), key_id));
    env.push(("AWS_SECRET_ACCESS_KEY".into(), secret.clone()));
    let kp = KeyProxy::start(
        &format!(
            "[aws]\nrole_arn = \"{READER}\"\n{}",
            route("cross", "/cross", &up.url(), "cross/api", "")
        ),
        &env,
    );
    let e = wait_error(&kp, "cross/api", Some(READER)).await;
    assert_eq!(e["error_kind"], "assume_role", "{e}");
    let msg = e["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("cannot assume role {READER} : AccessDenied: ")),
        "{msg}"
    );
    assert!(msg.contains("sts:AssumeRole"), "{msg}");
    let r = http::get(&kp.url("/cross/x")).await.expect("request");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains(READER), "{}", r.text());
    assert!(r.text().contains("AccessDenied"), "{}", r.text());
    let line = kp
        .log_lines("secret fetch failed; routes using it answer 503 until it succeeds")
        .into_iter()
        .next()
        .expect("log line");
    assert_eq!(line["error_kind"], "assume_role", "{line}");
    kp.assert_nowhere(&[&secret]).await;
}
