//! End to end: keyproxy (the real binary) between a test client and real upstream servers on
//! 127.0.0.1, reading secrets from moto's Secrets Manager through the real AWS SDK.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;

/// moto with secret `api` = `first`, an API accepting only the keys in `valid` (initially the
/// key inside `first`), and keyproxy with one route `/api` (plus `extra` route keys).
async fn keyed_setup(
    first: &str,
    key: &str,
    extra: &str,
) -> (
    Moto,
    aws_sdk_secretsmanager::Client,
    Arc<Mutex<Vec<String>>>,
    Upstream,
    KeyProxy,
) {
    let moto = Moto::start();
    let sm = moto.client();
    create_secret(&sm, "api", first).await;
    let valid = Arc::new(Mutex::new(vec![key.to_string()]));
    let up = Upstream::keyed(valid.clone()).await;
    let kp = KeyProxy::start(
        &route("api", "/api", &up.url(), "api", extra),
        &aws_env(&moto),
    );
    kp.wait_ready(Duration::from_secs(20)).await;
    (moto, sm, valid, up, kp)
}

/// Rotates `api` in moto to `value`, and makes the API accept only `key`.
async fn rotate(
    sm: &aws_sdk_secretsmanager::Client,
    valid: &Mutex<Vec<String>>,
    value: &str,
    key: &str,
) {
    put_current(sm, "api", value).await;
    *valid.lock().expect("valid") = vec![key.to_string()];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injects_header_from_json_field_replacing_the_apps_own() {
    let moto = Moto::start();
    let sm = moto.client();
    create_secret(
        &sm,
        "prod/payments/api",
        r#"{"token":"sk_live_first","master_secret_id":"m"}"#,
    )
    .await;
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &route(
            "payments",
            "/payments",
            &format!("{}/v1", up.url()),
            "prod/payments/api",
            "secret_field = \"token\"",
        ),
        &aws_env(&moto),
    );
    kp.wait_ready(Duration::from_secs(20)).await;

    let r = http::send(
        "GET",
        &kp.url("/payments/charges?limit=3"),
        &[
            ("authorization", "Bearer app-own-key"),
            ("x-app", "1"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "h"),
        ],
        "",
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &up.seen()[0];
    assert_eq!(seen.path, "/v1/charges");
    assert_eq!(seen.query.as_deref(), Some("limit=3"));
    assert_eq!(seen.header("authorization"), Some("Bearer sk_live_first"));
    assert_eq!(seen.header("host"), Some(up.addr.to_string().as_str()));
    assert_eq!(seen.header("x-app"), Some("1"));
    assert_eq!(
        seen.header("x-hop"),
        None,
        "headers named by Connection are hop-by-hop"
    );
    assert!(
        kp.counter("keyproxy_keys_injected_total", &["payments"])
            .await
            >= 1.0
    );
    kp.assert_no_leak(&["sk_live_first"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injects_query_param_and_custom_header_template() {
    let moto = Moto::start();
    let sm = moto.client();
    create_secret(&sm, "maps", "mapkey+/=1").await;
    create_secret(&sm, "mail", "mailkey").await;
    let up = Upstream::echo().await;
    let config = route("maps", "/maps", &up.url(), "maps", "query_param = \"key\"")
        + &route(
            "mail",
            "/mail",
            &up.url(),
            "mail",
            "header = \"X-Api-Key\"\nvalue = \"Token {secret}\"",
        );
    let kp = KeyProxy::start(&config, &aws_env(&moto));
    kp.wait_ready(Duration::from_secs(20)).await;

    let r = http::get(&kp.url("/maps/geocode?q=paris&key=app-own"))
        .await
        .expect("maps");
    assert_eq!(r.status, 200);
    let r = http::get(&kp.url("/mail/send")).await.expect("mail");
    assert_eq!(r.status, 200);
    let seen = up.seen();
    assert_eq!(seen[0].path, "/geocode");
    assert_eq!(
        seen[0].query.as_deref(),
        Some("q=paris&key=mapkey%2B%2F%3D1")
    );
    assert_eq!(seen[1].header("x-api-key"), Some("Token mailkey"));
    assert_eq!(seen[1].header("authorization"), None);
    // The access log carries the path only, never the query with the key.
    assert!(!kp.log_lines("").is_empty() || !kp.logs().is_empty());
    kp.assert_no_leak(&["mapkey", "mailkey"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_revoked_old_key_is_absorbed_by_one_replay() {
    let (_moto, sm, valid, up, kp) = keyed_setup(
        r#"{"token":"key-1"}"#,
        "key-1",
        "secret_field = \"token\"\nrefresh_interval = \"1h\"",
    )
    .await;
    assert_eq!(http::get(&kp.url("/api/a")).await.expect("a").status, 200);
    let fetches_before = kp.fetches().await;

    // Rotate: a new AWSCURRENT in Secrets Manager, and the API revokes the old key.
    rotate(&sm, &valid, r#"{"token":"key-2"}"#, "key-2").await;

    let body = r#"{"amount": 42, "currency": "eur"}"#;
    let r = http::send(
        "POST",
        &kp.url("/api/charges"),
        &[("content-type", "application/json")],
        body,
    )
    .await
    .expect("post");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], body, "the replayed body arrived intact");
    let seen = up.seen();
    let tail: Vec<_> = seen[1..]
        .iter()
        .map(|s| (s.header("authorization").map(str::to_owned), s.body.clone()))
        .collect();
    assert_eq!(tail.len(), 2, "one 401 and one replay");
    assert_eq!(tail[0].0.as_deref(), Some("Bearer key-1"));
    assert_eq!(tail[1].0.as_deref(), Some("Bearer key-2"));
    assert_eq!(tail[1].1, body.as_bytes());
    assert_eq!(
        kp.fetches().await - fetches_before,
        1.0,
        "one GetSecretValue for the 401"
    );
    assert_eq!(
        kp.counter("keyproxy_replays_succeeded_total", &["api"])
            .await,
        1.0
    );
    // Later requests use the new key at once.
    assert_eq!(http::get(&kp.url("/api/b")).await.expect("b").status, 200);
    assert_eq!(up.seen().len(), 4);
    kp.assert_no_leak(&["key-1", "key-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_above_the_cap_is_streamed_and_not_replayed() {
    let (_moto, sm, valid, up, kp) = keyed_setup(
        "key-1",
        "key-1",
        "max_replay_body = \"1KiB\"\nrefresh_interval = \"1h\"",
    )
    .await;
    rotate(&sm, &valid, "key-2", "key-2").await;

    let big = "x".repeat(4096);
    let r = http::send("POST", &kp.url("/api/upload"), &[], big.clone())
        .await
        .expect("post");
    assert_eq!(r.status, 401, "not replayed: the API's 401 passes through");
    assert!(
        r.headers.get("x-keyproxy-error").is_none(),
        "the API's own 401"
    );
    assert_eq!(up.seen().len(), 1);
    assert_eq!(
        up.seen()[0].body.len(),
        4096,
        "the large body was streamed whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_401_is_passed_through_after_at_most_two_hits() {
    let moto = Moto::start();
    let sm = moto.client();
    create_secret(&sm, "api", "key-1").await;
    let up = Upstream::start(|_| Reply::json(401, serde_json::json!({"error": "revoked"}))).await;
    let kp = KeyProxy::start(&route("api", "/api", &up.url(), "api", ""), &aws_env(&moto));
    kp.wait_ready(Duration::from_secs(20)).await;
    let r = http::get(&kp.url("/api/x")).await.expect("get");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "revoked", "the API's own body");
    assert!(up.seen().len() <= 2, "{} upstream hits", up.seen().len());
    // Same key in Secrets Manager: no replay at all.
    assert_eq!(up.seen().len(), 1);
    // A second 401 inside the cooldown: no fetch.
    let f = kp.fetches().await;
    let r = http::get(&kp.url("/api/y")).await.expect("get");
    assert_eq!(r.status, 401);
    assert_eq!(kp.fetches().await, f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_401s_cause_one_fetch() {
    let (_moto, sm, valid, _up, kp) =
        keyed_setup("key-1", "key-1", "refresh_interval = \"1h\"").await;
    rotate(&sm, &valid, "key-2", "key-2").await;
    let before = kp.fetches().await;

    let client = http::client();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (c, url) = (client.clone(), kp.url(&format!("/api/{i}")));
        tasks.push(tokio::spawn(async move {
            http::send_with(&c, "GET", &url, &[], "").await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.expect("join").expect("response").status == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 100);
    assert_eq!(
        kp.fetches().await - before,
        1.0,
        "one GetSecretValue for 100 concurrent 401s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_incrementally() {
    let moto = Moto::start();
    create_secret(&moto.client(), "api", "key-1").await;
    let up = Upstream::start(|_| Reply {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks: (0..4)
            .map(|i| {
                (
                    Duration::from_millis(if i == 0 { 0 } else { 400 }),
                    format!("data: event {i}\n\n").into(),
                )
            })
            .collect(),
    })
    .await;
    let kp = KeyProxy::start(&route("api", "/api", &up.url(), "api", ""), &aws_env(&moto));
    kp.wait_ready(Duration::from_secs(20)).await;

    let req = hyper::Request::get(kp.url("/api/stream"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("req");
    let start = Instant::now();
    let resp = http::client().request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            arrivals.push((start.elapsed(), String::from_utf8_lossy(&data).into_owned()));
        }
    }
    let text: String = arrivals.iter().map(|a| a.1.as_str()).collect();
    assert_eq!(
        text,
        "data: event 0\n\ndata: event 1\n\ndata: event 2\n\ndata: event 3\n\n"
    );
    assert!(arrivals.len() >= 4, "chunks were merged: {arrivals:?}");
    assert!(
        arrivals[0].0 < Duration::from_millis(350),
        "first event held back: {arrivals:?}"
    );
    assert!(arrivals[arrivals.len() - 1].0 >= Duration::from_millis(1100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_get_404_and_nothing_is_forwarded() {
    let moto = Moto::start();
    create_secret(&moto.client(), "api", "key-1").await;
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &(route("api", "/api", &up.url(), "api", "")
            + "[[route]]\nname = \"fwd\"\nhost = \"api.example.test\"\nupstream = \""
            + &up.url()
            + "\"\nsecret_id = \"api\"\n"),
        &aws_env(&moto),
    );
    kp.wait_ready(Duration::from_secs(20)).await;
    for path in ["/other", "/apix", "/"] {
        let r = http::get(&kp.url(path)).await.expect("get");
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.headers["x-keyproxy-error"], "no_route");
        assert_eq!(r.json()["error"], "no_route");
    }
    // Forward mode: absolute-form to a host with no route.
    let r = raw(
        kp.addr,
        "GET http://evil.example.test/steal HTTP/1.1\r\nHost: evil.example.test\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    // CONNECT is refused.
    let r = raw(
        kp.addr,
        "CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    assert!(r.contains("connect_not_supported"));
    // Path escapes.
    let r = raw(kp.addr, "GET /api/../admin HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = raw(kp.addr, "GET /api/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(up.seen().is_empty(), "nothing forwarded: {:?}", up.seen());

    // Forward mode to the configured host works, path kept, key injected.
    let r = raw(
        kp.addr,
        "GET http://api.example.test/v2/ping?a=1 HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let seen = &up.seen()[0];
    assert_eq!(seen.path, "/v2/ping");
    assert_eq!(seen.header("authorization"), Some("Bearer key-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_manager_down_at_start_then_ready_when_it_returns() {
    let port = free_port();
    let up = Upstream::echo().await;
    let fake = Moto::not_running(port);
    let kp = KeyProxy::start(&route("api", "/api", &up.url(), "api", ""), &aws_env(&fake));
    let r = first_failure(&kp).await;
    assert_eq!(
        r.json()["secrets"][0]["error_kind"],
        "unreachable",
        "{}",
        r.text()
    );
    assert_eq!(r.json()["waiting"][0], "api");
    let r = http::get(&kp.url("/api/x")).await.expect("get");
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["x-keyproxy-error"], "no_key");
    assert!(
        r.json()["message"]
            .as_str()
            .expect("message")
            .contains("unreachable"),
        "{}",
        r.text()
    );
    assert!(up.seen().is_empty());

    let moto = Moto::start_on(port);
    create_secret(&moto.client(), "api", "key-1").await;
    kp.wait_ready(Duration::from_secs(20)).await;
    let r = http::get(&kp.url("/api/x")).await.expect("get");
    assert_eq!(r.status, 200);
    assert_eq!(up.seen()[0].header("authorization"), Some("Bearer key-1"));
}

/// `/readyz` (503) once it reports the first failed fetch, or after 10 s.
async fn first_failure(kp: &KeyProxy) -> http::Resp {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http::get(&format!("http://{}/readyz", kp.admin))
            .await
            .expect("readyz");
        assert_eq!(r.status, 503);
        if !r.json()["secrets"][0]["error"].is_null() || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `[aws]` pointing at `moto`, and one route `/api` to `up` with secret `api`.
fn moto_config(moto: &Moto, up: &Upstream) -> String {
    format!(
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n{}",
        moto.url(),
        route("api", "/api", &up.url(), "api", "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_aws_credentials_are_their_own_kind_saying_what_to_set() {
    let moto = Moto::start();
    create_secret(&moto.client(), "api", "never-fetched-key").await;
    let up = Upstream::echo().await;
    let home = scratch("no-credentials");
    let kp = KeyProxy::start_isolated(&moto_config(&moto, &up), &no_credentials_env(&home));
    let r = first_failure(&kp).await;
    let s = &r.json()["secrets"][0];
    assert_eq!(s["error_kind"], "no_credentials", "{s}");
    let error = s["error"].as_str().expect("error");
    assert!(
        error.starts_with("secret \"api\": no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with a role"),
        "{error}"
    );
    assert!(
        !error.contains("IMDS") && !error.contains("dispatch"),
        "{error}"
    );

    let r = http::get(&kp.url("/api/x")).await.expect("get");
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["x-keyproxy-error"], "no_key");
    assert!(
        r.text().contains("no AWS credentials found"),
        "{}",
        r.text()
    );
    assert!(up.seen().is_empty());
    assert!(
        kp.counter(
            "keyproxy_secret_fetches_total",
            &["result=\"no_credentials\""]
        )
        .await
            >= 1.0
    );
    // One warning naming the cause and what to set; no SDK dump at warn level.
    let warned = kp.log_lines("secret fetch failed; routes using it answer 503 until it succeeds");
    assert!(
        warned[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no AWS credentials found: set AWS_ACCESS_KEY_ID")),
        "{warned:?}"
    );
    for line in kp.logs() {
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        if v["level"] == "WARN" || v["level"] == "ERROR" {
            assert!(!line.contains("IMDS"), "{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_binary_and_env_only_configuration() {
    let moto = Moto::start();
    moto.client()
        .create_secret()
        .name("bin")
        .secret_binary(aws_smithy_types::Blob::new(b"binkey-9".to_vec()))
        .send()
        .await
        .expect("create");
    let up = Upstream::echo().await;
    let mut env = aws_env(&moto);
    for (k, v) in [
        ("KEYPROXY_UPSTREAM", up.url()),
        ("KEYPROXY_SECRET_ID", "bin".into()),
        ("KEYPROXY_HEADER", "x-api-key".into()),
        ("KEYPROXY_VALUE", "{secret}".into()),
        ("KEYPROXY_LISTEN", "127.0.0.1:0".into()),
        ("KEYPROXY_ADMIN_LISTEN", "127.0.0.1:0".into()),
    ] {
        env.push((k.into(), v));
    }
    let kp = KeyProxy::start_env(&env);
    kp.wait_ready(Duration::from_secs(20)).await;
    let r = http::get(&kp.url("/anything")).await.expect("get");
    assert_eq!(r.status, 200);
    assert_eq!(up.seen()[0].header("x-api-key"), Some("binkey-9"));
    assert_eq!(up.seen()[0].path, "/anything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_picks_up_edits() {
    let dir = scratch("file-src");
    let secrets = dir.join("secrets.json");
    std::fs::write(&secrets, r#"{"dev/api": {"token": "file-key-1"}}"#).expect("write");
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &format!(
            "[source]\ntype = \"file\"\npath = \"{}\"\n{}",
            secrets.display(),
            route(
                "api",
                "/api",
                &up.url(),
                "dev/api",
                "secret_field = \"token\""
            )
        ),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(http::get(&kp.url("/api/a")).await.expect("a").status, 200);
    std::fs::write(&secrets, r#"{"dev/api": {"token": "file-key-2"}}"#).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        http::get(&kp.url("/api/b")).await.expect("b");
        if up
            .seen()
            .last()
            .and_then(|s| s.header("authorization").map(str::to_owned))
            .as_deref()
            == Some("Bearer file-key-2")
        {
            break;
        }
        assert!(Instant::now() < deadline, "edit not picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An unusable edit is refused; the last good key stays.
    std::fs::write(&secrets, "{\"dev/api\": {\"token\": \"bad\\r\\nkey\"}}").expect("write");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    http::get(&kp.url("/api/c")).await.expect("c");
    assert_eq!(
        up.seen().last().and_then(|s| s.header("authorization")),
        Some("Bearer file-key-2")
    );
    let r = http::get(&format!("http://{}/readyz", kp.admin))
        .await
        .expect("readyz");
    assert_eq!(r.status, 200, "a stale key is still a key");
    assert_eq!(r.json()["secrets"][0]["stale"], true);
    assert!(r.json()["secrets"][0]["error"]
        .as_str()
        .expect("error")
        .contains("CR or LF"));
    kp.assert_no_leak(&["file-key-1", "file-key-2", "bad\\r\\nkey"]);
}
