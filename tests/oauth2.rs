//! OAuth2 routes end to end: moto holds the client credentials, a token endpoint of the test's
//! own (on 127.0.0.1) issues short-lived tokens and counts its mints, and an API of the test's
//! own accepts only the unexpired tokens that endpoint issued.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;

/// How the endpoint expects the client to authenticate.
#[derive(Clone, Copy, PartialEq)]
enum Auth {
    Basic,
    Post,
}

/// The token endpoint's state.
struct Issuer {
    auth: Auth,
    client_id: String,
    /// The client secret it accepts now.
    client_secret: String,
    lifetime_s: u64,
    /// `Some(status)`: the endpoint is failing (its error body echoes the client secret).
    failing: Option<u16>,
    /// Every token issued, with when it expires.
    issued: HashMap<String, Instant>,
    /// Tokens the endpoint revoked.
    revoked: Vec<String>,
    /// Successful mints.
    mints: usize,
    /// Every call.
    calls: usize,
    /// Requests with the wrong client authentication method.
    wrong_method: usize,
    seq: usize,
}

type Shared = Arc<Mutex<Issuer>>;

/// The decoded fields of a form body.
fn form(body: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    percent_decode(&s.replace('+', " "))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts the token endpoint (POST /token).
async fn token_endpoint(issuer: Shared) -> Upstream {
    Upstream::start(move |s| {
        let mut st = issuer.lock().expect("issuer");
        st.calls += 1;
        if let Some(status) = st.failing {
            let echo = format!("cannot check client secret {}", st.client_secret);
            return Reply::json(
                status,
                serde_json::json!({"error": "server_error", "error_description": echo, "debug": st.client_secret}),
            );
        }
        let fields = form(&s.body);
        if s.method != "POST"
            || s.header("content-type") != Some("application/x-www-form-urlencoded")
            || fields.get("grant_type").map(String::as_str) != Some("client_credentials")
        {
            return Reply::json(400, serde_json::json!({"error": "invalid_request"}));
        }
        let basic = s
            .header("authorization")
            .and_then(|h| h.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|raw| {
                let text = String::from_utf8(raw).ok()?;
                let (id, secret) = text.split_once(':')?;
                Some((decode(id), decode(secret)))
            });
        let posted = fields
            .get("client_id")
            .zip(fields.get("client_secret"))
            .map(|(a, b)| (a.clone(), b.clone()));
        let presented = match st.auth {
            Auth::Basic if posted.is_none() => basic,
            Auth::Post if s.header("authorization").is_none() => posted,
            _ => None,
        };
        let Some((id, secret)) = presented else {
            st.wrong_method += 1;
            return Reply::json(401, serde_json::json!({"error": "invalid_client"}));
        };
        if id != st.client_id || secret != st.client_secret {
            return Reply::json(
                401,
                serde_json::json!({"error": "invalid_client", "error_description": format!("bad secret {secret}")}),
            );
        }
        st.seq += 1;
        st.mints += 1;
        let token = format!("at_{}_{:08}", st.seq, st.seq * 7919);
        let expires = Instant::now() + Duration::from_secs(st.lifetime_s);
        st.issued.insert(token.clone(), expires);
        Reply::json(
            200,
            serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                // As a string for a change: RFC 6749 says a number; some servers send a string.
                "expires_in": if st.seq % 2 == 0 { serde_json::json!(st.lifetime_s) } else { serde_json::json!(st.lifetime_s.to_string()) },
                "scope": fields.get("scope"),
            }),
        )
    })
    .await
}

/// An API that accepts only unexpired, unrevoked tokens the issuer issued (a 200 ms allowance
/// for the request in flight at the expiry instant).
async fn api(issuer: Shared) -> Upstream {
    Upstream::start(move |s| {
        let st = issuer.lock().expect("issuer");
        let ok = s
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|t| {
                !st.revoked.iter().any(|r| r == t)
                    && st
                        .issued
                        .get(t)
                        .is_some_and(|e| Instant::now() < *e + Duration::from_millis(200))
            });
        if ok {
            Reply::json(200, serde_json::json!({"ok": true}))
        } else {
            Reply::json(401, serde_json::json!({"error": "invalid_token"}))
        }
    })
    .await
}

struct Setup {
    moto: Moto,
    issuer: Shared,
    endpoint: Upstream,
    _api: Upstream,
    kp: KeyProxy,
}

const CLIENT_ID: &str = "crm-client-7";
const FIRST_SECRET: &str = "cs_first_Zq81x";

/// moto with the client credentials, the endpoint, the API, and keyproxy with one OAuth2 route.
async fn setup(auth: Auth, lifetime_s: u64, oauth2_extra: &str, route_extra: &str) -> Setup {
    let moto = Moto::start();
    let sm = moto.client();
    create_secret(
        &sm,
        "prod/crm/client",
        &serde_json::json!({"client_id": CLIENT_ID, "client_secret": FIRST_SECRET}).to_string(),
    )
    .await;
    let issuer = Arc::new(Mutex::new(Issuer {
        auth,
        client_id: CLIENT_ID.into(),
        client_secret: FIRST_SECRET.into(),
        lifetime_s,
        failing: None,
        issued: HashMap::new(),
        revoked: Vec::new(),
        mints: 0,
        calls: 0,
        wrong_method: 0,
        seq: 0,
    }));
    let endpoint = token_endpoint(issuer.clone()).await;
    let api = api(issuer.clone()).await;
    let client_auth = match auth {
        Auth::Basic => "basic",
        Auth::Post => "post",
    };
    let config = format!(
        "{}[route.oauth2]\ntoken_url = \"{}/token\"\nscope = \"contacts.read\"\nclient_auth = \"{client_auth}\"\n{oauth2_extra}\n",
        route("crm", "/crm", &api.url(), "prod/crm/client", route_extra),
        endpoint.url()
    );
    let kp = KeyProxy::start(&config, &aws_env(&moto));
    kp.wait_ready(Duration::from_secs(15)).await;
    Setup {
        moto,
        issuer,
        endpoint,
        _api: api,
        kp,
    }
}

impl Setup {
    fn mints(&self) -> usize {
        self.issuer.lock().expect("issuer").mints
    }
    fn calls(&self) -> usize {
        self.issuer.lock().expect("issuer").calls
    }
    fn tokens(&self) -> Vec<String> {
        self.issuer
            .lock()
            .expect("issuer")
            .issued
            .keys()
            .cloned()
            .collect()
    }
    /// Panics if a token or a client secret is in the logs or `/metrics`.
    async fn assert_nothing_leaked(&self, secrets: &[&str]) {
        let tokens = self.tokens();
        assert!(!tokens.is_empty());
        let mut all: Vec<&str> = tokens.iter().map(String::as_str).collect();
        all.extend_from_slice(secrets);
        self.kp.assert_nowhere(&all).await;
        let readyz = http::get(&format!("http://{}/readyz", self.kp.admin))
            .await
            .expect("readyz")
            .text();
        for s in &all {
            assert!(!readyz.contains(s), "{s:?} in /readyz: {readyz}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mint_per_lifetime_under_load_and_one_for_a_burst() {
    // Tokens live 3 s and are renewed 1 s ahead: one mint every 2 s.
    let s = setup(Auth::Basic, 3, "refresh_ahead = \"1s\"", "").await;
    assert_eq!(s.mints(), 1, "readiness waited for the first token");
    // 100 concurrent requests right away: all served with the one token.
    let c = http::client();
    let url = s.kp.url("/crm/contacts");
    let burst: Vec<_> = (0..100)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { http::send_with(&c, "GET", &url, &[], "").await })
        })
        .collect();
    for t in burst {
        let r = t.await.expect("join").expect("request");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(s.mints(), 1, "100 concurrent requests, one mint");

    // Four clients for 3 lifetimes (9 s).
    let start = Instant::now();
    let run_for = Duration::from_secs(9);
    let mints_before = s.mints();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while start.elapsed() < run_for {
                    match http::send_with(&c, "GET", &url, &[], "").await {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                        Err(e) => failed.push(e),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed)
            })
        })
        .collect();
    let mut total = 0;
    for t in clients {
        let (ok, failed) = t.await.expect("join");
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
    }
    let mints = s.mints() - mints_before;
    // 9 s at one mint per 2 s: 4 or 5 (timer slack), never one per request.
    assert!(
        (4..=6).contains(&mints),
        "{mints} mints for {total} requests in 9 s"
    );
    assert!(total > 200, "{total} requests");
    assert_eq!(s.issuer.lock().expect("issuer").wrong_method, 0);
    let ok =
        s.kp.counter(
            "keyproxy_oauth2_mints_total",
            &["route=\"crm\"", "result=\"ok\""],
        )
        .await;
    assert_eq!(ok as usize, s.mints());
    // /readyz shows the token's state, never the token.
    let readyz = http::get(&format!("http://{}/readyz", s.kp.admin))
        .await
        .expect("readyz")
        .json();
    let t = &readyz["tokens"][0];
    assert_eq!(t["route"], "crm");
    assert_eq!(t["ready"], true);
    assert!(
        t["expires_in_seconds"].as_u64().is_some_and(|e| e <= 3),
        "{t}"
    );
    assert!(t["error"].is_null(), "{t}");
    s.assert_nothing_leaked(&[FIRST_SECRET]).await;
    println!(
        "oauth2 load: {total} requests by 4 clients in 9 s, {mints} mints, 0 failed (elapsed {:?})",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_reminted_once_and_the_request_replayed() {
    // client_secret_post, long-lived tokens: only the 401 causes a mint.
    let s = setup(Auth::Post, 3600, "", "refresh_cooldown = \"0s\"").await;
    let url = s.kp.url("/crm/contacts");
    assert_eq!(http::get(&url).await.expect("get").status, 200);
    assert_eq!(s.mints(), 1);
    {
        let mut st = s.issuer.lock().expect("issuer");
        let all: Vec<String> = st.issued.keys().cloned().collect();
        st.revoked.extend(all);
    }
    let r = http::send(
        "POST",
        &url,
        &[("content-type", "application/json")],
        "{\"a\":1}",
    )
    .await
    .expect("post");
    assert_eq!(r.status, 200, "replayed with a new token: {}", r.text());
    assert_eq!(s.mints(), 2, "one mint for the 401");
    let replays = s.kp.counter("keyproxy_replays_succeeded_total", &[]).await;
    assert_eq!(replays, 1.0);
    assert_eq!(http::get(&url).await.expect("get").status, 200);
    assert_eq!(s.mints(), 2);
    // Again on the general engine (a chunked request body is handed to it).
    {
        let mut st = s.issuer.lock().expect("issuer");
        let all: Vec<String> = st.issued.keys().cloned().collect();
        st.revoked.extend(all);
    }
    let resp = raw(
        s.kp.addr,
        "POST /crm/contacts HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert_eq!(s.mints(), 3);
    assert_eq!(
        s.kp.counter("keyproxy_replays_succeeded_total", &[]).await,
        2.0
    );
    assert_eq!(s.issuer.lock().expect("issuer").wrong_method, 0);
    s.assert_nothing_leaked(&[FIRST_SECRET]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_secret_is_used_by_the_next_mint() {
    let s = setup(Auth::Basic, 2, "refresh_ahead = \"1s\"", "").await;
    let url = s.kp.url("/crm/contacts");
    assert_eq!(http::get(&url).await.expect("get").status, 200);
    // The rotation function's work: a new client secret, current in Secrets Manager and at
    // the endpoint, which no longer accepts the old one.
    let new_secret = "cs_second_Kp02m";
    put_current(
        &s.moto.client(),
        "prod/crm/client",
        &serde_json::json!({"client_id": CLIENT_ID, "client_secret": new_secret}).to_string(),
    )
    .await;
    s.issuer.lock().expect("issuer").client_secret = new_secret.into();
    let before = s.mints();
    // Requests for 3 s (the token in force is renewed after 1 s): none fails.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let r = http::get(&url).await.expect("get");
        assert_eq!(r.status, 200, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.mints() > before, "a mint with the new secret");
    let refused =
        s.kp.counter(
            "keyproxy_oauth2_mints_total",
            &["result=\"invalid_client\""],
        )
        .await;
    assert_eq!(
        refused, 0.0,
        "the retry after re-reading the secret succeeded"
    );
    assert_eq!(
        s.kp.log_lines(
            "the token endpoint refused the client credentials; reading the secret again"
        )
        .len(),
        1
    );
    s.assert_nothing_leaked(&[FIRST_SECRET, new_secret]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_serves_until_expiry_then_503_with_backoff() {
    // 3 s tokens renewed 1 s ahead; the endpoint fails from the first renewal on.
    let s = setup(Auth::Basic, 3, "refresh_ahead = \"1s\"", "").await;
    let url = s.kp.url("/crm/contacts");
    let minted = Instant::now();
    assert_eq!(http::get(&url).await.expect("get").status, 200);
    s.issuer.lock().expect("issuer").failing = Some(500);
    // Served until the token expires (3 s after its mint), 503 after.
    let mut statuses = Vec::new();
    let mut answer_503 = None;
    while minted.elapsed() < Duration::from_millis(4500) {
        let r = http::get(&url).await.expect("get");
        if r.status == 503 && answer_503.is_none() {
            answer_503 = Some(r);
        } else {
            statuses.push((minted.elapsed().as_millis(), r.status));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_503 = statuses.iter().position(|(_, st)| *st == 503);
    for (at, st) in &statuses[..first_503.unwrap_or(statuses.len())] {
        assert_eq!(*st, 200, "at {at} ms: {statuses:?}");
        assert!(*at < 3200, "a 200 after expiry at {at} ms");
    }
    let r = answer_503.expect("a 503 after expiry");
    assert_eq!(
        r.headers.get("x-keyproxy-error").map(|v| v.as_bytes()),
        Some(&b"no_key"[..])
    );
    let body = r.text();
    let cause = format!("token endpoint {}/token answered 500", s.endpoint.url());
    assert!(body.contains(&cause), "{body}");
    assert!(!body.contains(FIRST_SECRET), "{body}");
    // Backoff: calls over the next 5 s, in windows of 1, 2, 4, 8 s (full jitter).
    let before = s.calls();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls = s.calls() - before;
    assert!(calls <= 8, "{calls} token endpoint calls in 5 s");
    let readyz = http::get(&format!("http://{}/readyz", s.kp.admin))
        .await
        .expect("readyz");
    assert_eq!(readyz.status, 503);
    let t = &readyz.json()["tokens"][0];
    assert_eq!(t["ready"], false);
    assert_eq!(t["error_kind"], "error_status");
    let errors =
        s.kp.counter("keyproxy_oauth2_mints_total", &["result=\"error_status\""])
            .await;
    assert!(errors >= 1.0);
    // The endpoint echoed the client secret in its error body: it is in no log line.
    s.assert_nothing_leaked(&[FIRST_SECRET]).await;
    // Back up: the next retry mints, and the route serves again.
    s.issuer.lock().expect("issuer").failing = None;
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let r = http::get(&url).await.expect("get");
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not recovered: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_named_in_the_503() {
    let moto = Moto::start();
    create_secret(
        &moto.client(),
        "prod/crm/client",
        &serde_json::json!({"client_id": CLIENT_ID, "client_secret": FIRST_SECRET}).to_string(),
    )
    .await;
    let api = Upstream::echo().await;
    let port = free_port();
    let config = format!(
        "{}[route.oauth2]\ntoken_url = \"http://127.0.0.1:{port}/token\"\n",
        route("crm", "/crm", &api.url(), "prod/crm/client", ""),
    );
    let kp = KeyProxy::start(&config, &aws_env(&moto));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http::get(&kp.url("/crm/x")).await.expect("get");
        assert_eq!(r.status, 503);
        if r.text().contains("unreachable") {
            assert!(
                r.text().contains(&format!(
                    "token endpoint http://127.0.0.1:{port}/token unreachable"
                )),
                "{}",
                r.text()
            );
            break;
        }
        assert!(Instant::now() < deadline, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(api.seen().is_empty(), "nothing forwarded without a token");
    kp.assert_nowhere(&[FIRST_SECRET]).await;
}

/// Rewrites keyproxy's config file with `edit` applied and waits for the reload to be applied.
async fn reload_with(s: &Setup, edit: impl Fn(String) -> String) {
    let path = s.kp.dir.join("keyproxy.toml");
    let text = edit(std::fs::read_to_string(&path).expect("config"));
    let before = s.kp.log_lines("configuration reloaded").len();
    std::fs::write(&path, text).expect("rewrite config");
    let start = Instant::now();
    while s.kp.log_lines("configuration reloaded").len() == before {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no reload: {:?}",
            s.kp.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_token_unless_how_it_is_minted_changed() {
    let s = setup(Auth::Basic, 3600, "", "").await;
    let url = s.kp.url("/crm/contacts");
    assert_eq!(http::get(&url).await.expect("get").status, 200);
    assert_eq!(s.mints(), 1);
    let fetches = || {
        s.kp.counter(
            "keyproxy_secret_fetches_total",
            &["secret=\"prod/crm/client\""],
        )
    };
    let fetched = fetches().await;
    // Another route is added: the OAuth2 route keeps its token, its secret is not fetched again.
    create_secret(&s.moto.client(), "prod/other/key", "k-other").await;
    let other = route("other", "/other", &s.endpoint.url(), "prod/other/key", "");
    reload_with(&s, |text| format!("{text}\n{other}")).await;
    assert_eq!(http::get(&url).await.expect("get").status, 200);
    assert_eq!(
        s.mints(),
        1,
        "a reload that changed nothing of the route mints nothing"
    );
    assert_eq!(
        fetches().await,
        fetched,
        "the client credentials were not fetched again"
    );
    let readyz = http::get(&format!("http://{}/readyz", s.kp.admin))
        .await
        .expect("readyz")
        .json();
    assert_eq!(readyz["status"], "ready", "{readyz}");
    // The scope changes: the token is minted anew, with the new scope.
    reload_with(&s, |text| text.replace("contacts.read", "contacts.write")).await;
    let start = Instant::now();
    while s.mints() < 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "no new mint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http::get(&url).await.expect("get").status, 200);
    assert_eq!(s.mints(), 2);
    s.assert_nothing_leaked(&[FIRST_SECRET]).await;
}

/// `keyproxy check --config FILE` for `text`: the exit code, stdout and stderr.
fn check(text: &str) -> (Option<i32>, String, String) {
    let dir = scratch("oauth2-check");
    let path = dir.join("k.toml");
    std::fs::write(&path, text).expect("write");
    let out = std::process::Command::new(binary())
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env_clear()
        .output()
        .expect("run");
    let _ = std::fs::remove_dir_all(dir);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CRM: &str = r#"[[route]]
name = "crm"
path_prefix = "/crm"
upstream = "https://api.crm.example/v2"
secret_id = "prod/crm/client"
"#;

#[test]
fn check_names_each_oauth2_problem() {
    let (code, _, err) = check(&format!(
        r#"{CRM}query_param = "key"
[route.oauth2]
token_url = "http://auth.crm.example/oauth2/token"
client_auth = "jwt"
refresh_ahead = "soon"
audiense = "x"
"#
    ));
    assert_eq!(code, Some(64), "{err}");
    for key in [
        "query_param",
        "oauth2.token_url",
        "oauth2.client_auth",
        "oauth2.refresh_ahead",
        "oauth2.audiense",
    ] {
        assert!(
            err.contains(&format!("route \"crm\" (#1) {key}:")),
            "{key} not named: {err}"
        );
    }
    // The issue's example is valid.
    let (code, out, err) = check(&format!(
        r#"{CRM}[route.oauth2]
token_url = "https://auth.crm.example/oauth2/token"
scope = "contacts.read"
audience = "https://api.crm.example"
client_auth = "basic"
client_id_field = "client_id"
client_secret_field = "client_secret"
refresh_ahead = "60s"
"#
    ));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("OAuth2 access token minted at https://auth.crm.example/oauth2/token"),
        "{out}"
    );
}
