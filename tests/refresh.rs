//! End to end: `POST /refresh` on the admin listener after a rotation in moto. The next request
//! carries the new key without meeting a 401; a second call within `refresh_cooldown` is rate
//! limited and costs no `GetSecretValue`; an unknown secret id is a 404 naming it; `keyproxy
//! refresh` does the same from the command line.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// The entry of `secret` in a `/refresh` answer.
fn entry<'a>(doc: &'a serde_json::Value, secret: &str) -> &'a serde_json::Value {
    doc["secrets"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["secret"] == secret))
        .unwrap_or_else(|| panic!("no {secret:?} in {doc}"))
}

async fn post(kp: &KeyProxy, path: &str) -> http::Resp {
    http::send("POST", &format!("http://{}{path}", kp.admin), &[], "")
        .await
        .expect("admin answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_refresh_serves_the_rotated_key_without_a_401_and_obeys_the_cooldown() {
    let moto = Moto::start();
    let sm = moto.client();
    let v1 = create_secret(&sm, "prod/api", "key-one").await;
    create_secret(&sm, "other", "other-key").await;
    let valid = Arc::new(Mutex::new(vec!["key-one".to_string()]));
    let up = Upstream::keyed(valid.clone()).await;
    // Background refresh far away: only /refresh can bring the new version.
    let slow = "refresh_interval = \"1h\"\nrefresh_cooldown = \"2s\"\n";
    let config = route("api", "/api", &up.url(), "prod/api", slow)
        + &route("other", "/other", &up.url(), "other", slow);
    let kp = KeyProxy::start(&config, &aws_env(&moto));
    kp.wait_ready(Duration::from_secs(20)).await;
    let r = http::get(&kp.url("/api/x")).await.expect("request");
    assert_eq!(r.status, 200, "{}", r.text());

    // A rotation: AWSCURRENT moves, and the API accepts only the new key from now on.
    let v2 = put_current(&sm, "prod/api", "key-two").await;
    *valid.lock().expect("valid") = vec!["key-two".to_string()];
    let before = kp.fetches().await;
    let r = post(&kp, "/refresh").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["ok"], true, "{doc}");
    let api = entry(&doc, "prod/api");
    assert_eq!(api["version_before"], v1.as_str(), "{doc}");
    assert_eq!(api["version_after"], v2.as_str(), "{doc}");
    assert_eq!(api["changed"], true, "{doc}");
    assert_eq!(api["rate_limited"], false, "{doc}");
    assert_eq!(api["stage"], "AWSCURRENT", "{doc}");
    assert!(api["error"].is_null(), "{doc}");
    assert_eq!(entry(&doc, "other")["changed"], false, "{doc}");
    assert_eq!(kp.fetches().await - before, 2.0, "one fetch per secret");

    // The next request carries the new key at once: one request upstream, no 401, no replay.
    let seen_before = up.seen().len();
    let r = http::get(&kp.url("/api/x")).await.expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.seen();
    assert_eq!(seen.len() - seen_before, 1, "no 401 and no replay");
    assert_eq!(
        seen.last().and_then(|s| s.header("authorization")),
        Some("Bearer key-two")
    );

    // Again within the cooldown: rate limited, the versions in force, no call to Secrets Manager.
    let before = kp.fetches().await;
    let r = post(&kp, "/refresh").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    for s in doc["secrets"].as_array().expect("secrets") {
        assert_eq!(s["rate_limited"], true, "{doc}");
        assert_eq!(s["changed"], false, "{doc}");
    }
    assert_eq!(entry(&doc, "prod/api")["version_after"], v2.as_str());
    assert_eq!(kp.fetches().await, before, "no fetch while rate limited");

    // An unknown secret id: 404 naming it; other methods: 405.
    let r = post(&kp, "/refresh?secret=nope%2Fmissing").await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["secret"], "nope/missing");
    assert!(r.text().contains("nope/missing"), "{}", r.text());
    let r = http::get(&format!("http://{}/refresh", kp.admin))
        .await
        .expect("admin");
    assert_eq!(r.status, 405);
    let r = post(&kp, "/readyz").await;
    assert_eq!(r.status, 405);

    // After the cooldown, one secret by id (percent-encoded): one fetch, that secret only.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = kp.fetches().await;
    let r = post(&kp, "/refresh?secret=prod%2Fapi").await;
    let doc = r.json();
    assert_eq!(doc["secrets"].as_array().map(Vec::len), Some(1), "{doc}");
    assert_eq!(entry(&doc, "prod/api")["rate_limited"], false, "{doc}");
    assert_eq!(entry(&doc, "prod/api")["changed"], false, "{doc}");
    assert_eq!(kp.fetches().await - before, 1.0);

    // `keyproxy refresh` over the admin listener: within the cooldown again, so rate limited.
    let out = std::process::Command::new(binary())
        .args(["refresh", "--secret", "prod/api", "--admin"])
        .arg(kp.admin.to_string())
        .output()
        .expect("keyproxy refresh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {:?}", out.stderr);
    assert!(stdout.starts_with("prod/api AWSCURRENT: "), "{stdout}");
    assert!(stdout.contains("rate limited"), "{stdout}");
    let out = std::process::Command::new(binary())
        .args(["refresh", "--secret", "nope", "--admin"])
        .arg(kp.admin.to_string())
        .output()
        .expect("keyproxy refresh");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    kp.assert_nowhere(&["key-one", "key-two", "other-key"])
        .await;
}
