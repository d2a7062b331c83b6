//! Faults, end to end: Secrets Manager failing (at start and while running), upstreams failing
//! in every way a TCP or TLS peer can, apps hanging up or reading slowly, secret values turning
//! unusable, and requests that try to reach somewhere else. Each test asserts what the app sees,
//! that nothing hangs past its timeout, that the next request works, and that no secret value
//! reaches a log line, an error body or `/metrics`.

mod common;
mod fault_aws;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fault_aws::{Fault, FaultAws};
use futures_util::future::join_all;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `[aws]` with an attempt timeout short enough for the slow-Secrets-Manager cases.
const AWS_FAST: &str = "[aws]\ntimeout = \"300ms\"\n";

/// `/readyz`: status and body.
async fn readyz(kp: &KeyProxy) -> (u16, Value) {
    let r = http::get(&format!("http://{}/readyz", kp.admin))
        .await
        .expect("readyz");
    (r.status, r.json())
}

/// Polls `/readyz` until the first secret's report satisfies `pred`; returns (status, report).
async fn wait_secret(
    kp: &KeyProxy,
    within: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (u16, Value) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = readyz(kp).await;
        if pred(&body["secrets"][0]) {
            return (status, body["secrets"][0].clone());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {within:?}; last /readyz: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One Secrets Manager fault: how it is injected, and how keyproxy must report it.
struct SmCase {
    fault: Fault,
    /// `error_kind` in `/readyz`, and the `result` label of `keyproxy_secret_fetches_total`.
    kind: &'static str,
    /// Text the error message must contain (the cause, in words).
    cause: &'static str,
}

fn sm_cases() -> Vec<SmCase> {
    vec![
        SmCase {
            fault: Fault::throttling(),
            kind: "throttled",
            cause: "ThrottlingException",
        },
        SmCase {
            fault: Fault::access_denied(),
            kind: "access_denied",
            cause: "AccessDeniedException",
        },
        SmCase {
            fault: Fault::not_found(),
            kind: "not_found",
            cause: "ResourceNotFoundException",
        },
        SmCase {
            fault: Fault::decryption_failure(),
            kind: "decryption_failure",
            cause: "DecryptionFailure",
        },
        SmCase {
            // Beyond the 300 ms attempt timeout.
            fault: Fault::Delay(Duration::from_secs(3)),
            kind: "timeout",
            cause: "timed out",
        },
        SmCase {
            fault: Fault::Reset,
            kind: "unreachable",
            cause: "unreachable",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_manager_faults_at_start_answer_503_naming_the_cause_then_ready_when_resolved() {
    let moto = Moto::start();
    let sm = moto.client();
    for c in sm_cases() {
        create_secret(
            &sm,
            &format!("start-{}", c.kind),
            &format!("start-key-{}", c.kind),
        )
        .await;
    }
    let runs = sm_cases().into_iter().map(|c| {
        let moto_url = moto.url();
        async move {
            let secret = format!("start-{}", c.kind);
            let key = format!("start-key-{}", c.kind);
            let fake = FaultAws::start(&moto_url).await;
            fake.set(c.fault.clone());
            let up = Upstream::echo().await;
            let kp = KeyProxy::start(
                &format!("{AWS_FAST}{}", route("api", "/api", &up.url(), &secret, "")),
                &fake.env(),
            );
            let (status, s) = wait_secret(&kp, Duration::from_secs(15), c.kind, |s| {
                !s["error_kind"].is_null()
            })
            .await;
            assert_eq!(status, 503, "{}: not ready without a key", c.kind);
            assert_eq!(s["error_kind"], c.kind, "{s}");
            assert_eq!(s["loaded"], false);
            let error = s["error"].as_str().expect("error").to_owned();
            assert!(error.contains(c.cause), "{}: {error}", c.kind);
            assert!(
                error.contains(&secret),
                "the error names the secret: {error}"
            );

            let r = http::get(&kp.url("/api/x")).await.expect("request");
            assert_eq!(r.status, 503, "{}: {}", c.kind, r.text());
            assert_eq!(r.headers["x-keyproxy-error"], "no_key");
            let msg = r.json()["message"].as_str().expect("message").to_owned();
            assert!(
                msg.contains(c.cause),
                "{}: the 503 names the cause: {msg}",
                c.kind
            );
            assert!(up.seen().is_empty(), "nothing forwarded without a key");
            let logged =
                kp.log_lines("secret fetch failed; routes using it answer 503 until it succeeds");
            assert!(
                logged.iter().any(|l| l["level"] == "WARN"
                    && l["secret"] == secret.as_str()
                    && l["error"].as_str().is_some_and(|e| e.contains(c.cause))),
                "{}: a warn line names the secret and the cause: {logged:?}",
                c.kind
            );

            // Resolved: ready at the next retry. Without a key the backoff is short: a window of
            // 1 s, then 2 s, 4 s... and after a throttle 6 s, then 9 s (a throttle means the
            // account's quota is spent: a retry within the second would spend more of it).
            fake.set(Fault::Pass);
            let resolved = Instant::now();
            kp.wait_ready(Duration::from_secs(20)).await;
            let took = resolved.elapsed();
            let bound = if c.kind == "throttled" { 17 } else { 6 };
            assert!(
                took < Duration::from_secs(bound),
                "{}: ready {took:?} after the fault ended",
                c.kind
            );
            let r = http::get(&kp.url("/api/x")).await.expect("request");
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(
                up.seen()[0].header("authorization"),
                Some(format!("Bearer {key}").as_str())
            );
            kp.assert_nowhere(&[&key]).await;
            (c.kind, took)
        }
    });
    let took = join_all(runs).await;
    eprintln!("ready after the fault ended: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_manager_faults_while_running_serve_the_last_good_key_and_back_off() {
    let moto = Moto::start();
    let sm = moto.client();
    for c in sm_cases() {
        create_secret(
            &sm,
            &format!("run-{}", c.kind),
            &format!("run-key-1-{}", c.kind),
        )
        .await;
    }
    let runs = sm_cases().into_iter().map(|c| {
        let moto_url = moto.url();
        let sm = sm.clone();
        async move {
            let secret = format!("run-{}", c.kind);
            let (key1, key2) = (
                format!("run-key-1-{}", c.kind),
                format!("run-key-2-{}", c.kind),
            );
            let fake = FaultAws::start(&moto_url).await;
            let up = Upstream::echo().await;
            let kp = KeyProxy::start(
                &format!(
                    "{AWS_FAST}{}",
                    route(
                        "api",
                        "/api",
                        &up.url(),
                        &secret,
                        "refresh_interval = \"2s\""
                    )
                ),
                &fake.env(),
            );
            kp.wait_ready(Duration::from_secs(20)).await;
            assert_eq!(http::get(&kp.url("/api/a")).await.expect("a").status, 200);

            let calls_before_fault = fake.get_calls();
            fake.set(c.fault.clone());
            let (status, s) =
                wait_secret(&kp, Duration::from_secs(15), c.kind, |s| s["stale"] == true).await;
            assert_eq!(status, 200, "{}: a stale key is still a key", c.kind);
            assert_eq!(s["error_kind"], c.kind, "{s}");
            assert_eq!(s["loaded"], true);
            let error = s["error"].as_str().expect("error").to_owned();
            assert!(
                error.contains(c.cause) && error.contains(&secret),
                "{}: {error}",
                c.kind
            );

            // Back off: over a 5 s window, a bounded number of GetSecretValue attempts (full
            // jitter over a window of 1 s doubling, 6 s after a throttle, capped at twice
            // refresh_interval; the SDK tries twice, except after a throttle).
            let window = Duration::from_secs(5);
            let before = fake.get_calls();
            let start = Instant::now();
            let mut served = 0;
            while start.elapsed() < window {
                let r = http::get(&kp.url("/api/b")).await.expect("request");
                assert_eq!(
                    r.status,
                    200,
                    "{}: the last good key is served: {}",
                    c.kind,
                    r.text()
                );
                served += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let attempts = fake.get_calls() - before;
            assert!(
                (1..=14).contains(&attempts),
                "{}: {attempts} GetSecretValue attempts in {window:?}: not a bounded backoff",
                c.kind
            );
            assert!(
                up.seen()
                    .iter()
                    .all(|s| s.header("authorization") == Some(format!("Bearer {key1}").as_str())),
                "{}: every request carried the last good key",
                c.kind
            );
            let metrics = kp.metrics().await;
            let label = format!("secret=\"{secret}\"");
            assert_eq!(
                sum_metric(&metrics, "keyproxy_secret_stale", &[&label]),
                1.0,
                "{}: {metrics}",
                c.kind
            );
            let result = format!("result=\"{}\"", c.kind);
            let failed = sum_metric(
                &metrics,
                "keyproxy_secret_fetches_total",
                &[&label, &result],
            );
            assert!(failed >= 1.0, "{}: {metrics}", c.kind);
            if c.kind == "throttled" {
                // The SDK does not retry a throttled call: each one is one fetch of keyproxy's
                // (one more may be in flight).
                let calls = (fake.get_calls() - calls_before_fault) as f64;
                assert!(
                    calls <= failed + 1.0,
                    "{calls} calls for {failed} throttled fetches: the SDK retried"
                );
            }
            let logged = kp.log_lines("secret refresh failed; serving the last good value");
            assert!(
                logged.iter().any(|l| l["level"] == "WARN"
                    && l["secret"] == secret.as_str()
                    && l["error"].as_str().is_some_and(|e| e.contains(c.cause))),
                "{}: a warn line names the secret and the cause: {logged:?}",
                c.kind
            );

            // A rotation happened during the outage; once it ends, the new key is picked up.
            put_current(&sm, &secret, &key2).await;
            fake.set(Fault::Pass);
            let (_, s) = wait_secret(&kp, Duration::from_secs(10), "recovered", |s| {
                s["stale"] == false && s["error"].is_null()
            })
            .await;
            assert_eq!(s["loaded"], true);
            let r = http::get(&kp.url("/api/c")).await.expect("request");
            assert_eq!(r.status, 200);
            assert_eq!(
                up.seen().last().and_then(|s| s.header("authorization")),
                Some(format!("Bearer {key2}").as_str())
            );
            assert_eq!(
                sum_metric(&kp.metrics().await, "keyproxy_secret_stale", &[&label]),
                0.0
            );
            kp.assert_nowhere(&[&key1, &key2]).await;
            (c.kind, attempts, served)
        }
    });
    let attempts = join_all(runs).await;
    eprintln!(
        "GetSecretValue attempts in 5 s of outage (kind, attempts, requests served): {attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_manager_unreachable_while_running_serves_stale_then_recovers() {
    let mut moto = Moto::start();
    let port = moto.port;
    create_secret(&moto.client(), "api", "down-key-1").await;
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &format!(
            "{AWS_FAST}{}",
            route("api", "/api", &up.url(), "api", "refresh_interval = \"2s\"")
        ),
        &aws_env(&moto),
    );
    kp.wait_ready(Duration::from_secs(20)).await;

    moto.stop();
    let (status, s) = wait_secret(&kp, Duration::from_secs(15), "stale", |s| {
        s["stale"] == true
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(s["error_kind"], "unreachable", "{s}");
    let before = kp
        .counter("keyproxy_secret_fetches_total", &["result=\"unreachable\""])
        .await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let r = http::get(&kp.url("/api/x")).await.expect("request");
        assert_eq!(r.status, 200, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let failed = kp
        .counter("keyproxy_secret_fetches_total", &["result=\"unreachable\""])
        .await
        - before;
    assert!(
        (1.0..=7.0).contains(&failed),
        "{failed} failed fetches in 5 s: not a bounded backoff"
    );
    assert!(up
        .seen()
        .iter()
        .all(|s| s.header("authorization") == Some("Bearer down-key-1")));
    assert!(kp
        .log_lines("secret refresh failed; serving the last good value")
        .iter()
        .any(|l| l["level"] == "WARN"
            && l["secret"] == "api"
            && l["error"]
                .as_str()
                .is_some_and(|e| e.contains("unreachable"))));
    assert_eq!(
        kp.counter("keyproxy_secret_stale", &["secret=\"api\""])
            .await,
        1.0
    );

    // Secrets Manager is back (with a new key).
    let moto = Moto::start_on(port);
    create_secret(&moto.client(), "api", "down-key-2").await;
    wait_secret(&kp, Duration::from_secs(15), "recovered", |s| {
        s["stale"] == false && s["error"].is_null()
    })
    .await;
    http::get(&kp.url("/api/y")).await.expect("request");
    assert_eq!(
        up.seen().last().and_then(|s| s.header("authorization")),
        Some("Bearer down-key-2")
    );
    assert_eq!(
        kp.counter("keyproxy_secret_stale", &["secret=\"api\""])
            .await,
        0.0
    );
    kp.assert_nowhere(&["down-key-1", "down-key-2"]).await;
}

/// Reads a request head (up to the blank line) from a raw connection; `None` on EOF/timeout.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return None,
        }
        if head.len() > 65536 {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A raw TCP upstream: each connection's request head is read, then `script(n, stream)` runs,
/// `n` counting connections from 0.
struct RawUpstream {
    addr: std::net::SocketAddr,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    async fn start<F, Fut>(script: F) -> RawUpstream
    where
        F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        RawUpstream::serve(listener, script)
    }

    fn serve<F, Fut>(listener: TcpListener, script: F) -> RawUpstream
    where
        F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().expect("addr");
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        let script = Arc::new(script);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    if read_head(&mut s).await.is_some() {
                        script(n, s).await;
                    }
                });
            }
        });
        RawUpstream { addr, conns, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A complete small answer.
async fn answer_ok(mut s: TcpStream) {
    let _ = s
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        .await;
    let _ = s.flush().await;
    // Keep the connection for keyproxy's pool a while, as a real server would.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0u8; 1])).await;
}

/// Sends a GET through `kp` and returns (status, x-keyproxy-error, body result, time to headers,
/// time to the end of the body).
async fn get_timed(
    kp: &KeyProxy,
    path: &str,
) -> (
    u16,
    Option<String>,
    Result<Bytes, String>,
    Duration,
    Duration,
) {
    use http_body_util::BodyExt;
    let req = hyper::Request::get(kp.url(path))
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(20), http::client().request(req))
        .await
        .expect("response headers within 20 s")
        .expect("response");
    let head = start.elapsed();
    let status = resp.status().as_u16();
    let marker = resp
        .headers()
        .get("x-keyproxy-error")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the body ends (or fails) within 20 s")
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (status, marker, body, head, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connection_refused_is_502_then_works_once_it_listens() {
    let port = free_port();
    let kp = KeyProxy::start(
        &(file_source(&[("api", "refused-key")])
            + &route(
                "api",
                "/api",
                &format!("http://127.0.0.1:{port}"),
                "api",
                "",
            )),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    for _ in 0..2 {
        let (status, marker, body, _, took) = get_timed(&kp, "/api/x").await;
        assert_eq!(status, 502);
        assert_eq!(marker.as_deref(), Some("upstream_unreachable"));
        let body = String::from_utf8_lossy(&body.expect("body")).into_owned();
        let v: Value = serde_json::from_str(&body).expect("json");
        let msg = v["message"].as_str().expect("message").to_lowercase();
        assert!(msg.contains("connect") && msg.contains("refused"), "{msg}");
        assert_eq!(v["route"], "api");
        assert!(
            took < Duration::from_secs(2),
            "refused answers at once: {took:?}"
        );
        assert!(!body.contains("refused-key"));
    }
    // The general engine too (a chunked request body): refused, 502.
    let resp = raw(
        kp.addr,
        "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 502, "{resp}");
    // Nothing was sent: no key counted as injected, no upstream duration observed.
    let m = kp.metrics().await;
    assert_eq!(
        sum_metric(&m, "keyproxy_keys_injected_total", &["api"]),
        0.0,
        "{m}"
    );
    assert_eq!(
        sum_metric(&m, "keyproxy_upstream_duration_seconds_count", &["api"]),
        0.0,
        "{m}"
    );
    // The upstream comes up on that port: the next request works.
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("rebind");
    let up = RawUpstream::serve(listener, |_, s| answer_ok(s));
    let (status, marker, body, _, _) = get_timed(&kp, "/api/x").await;
    assert_eq!((status, marker), (200, None));
    assert_eq!(body.expect("body"), "hello");
    assert_eq!(up.conns.load(Ordering::SeqCst), 1);
    let m = kp.metrics().await;
    assert_eq!(
        sum_metric(&m, "keyproxy_keys_injected_total", &["api"]),
        1.0,
        "{m}"
    );
    kp.assert_nowhere(&["refused-key"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_response_cuts_the_response_and_the_next_request_works() {
    let up = RawUpstream::start(|n, mut s| async move {
        if n == 0 {
            let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n".to_vec();
            out.extend(std::iter::repeat_n(b'a', 10_000));
            let _ = s.write_all(&out).await;
            let _ = s.flush().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = s.set_zero_linger();
            drop(s); // RST
        } else {
            answer_ok(s).await;
        }
    })
    .await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "reset-key")]) + &route("api", "/api", &up.url(), "api", "")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let (status, marker, body, _, took) = get_timed(&kp, "/api/big").await;
    assert_eq!(status, 200, "the headers had already arrived");
    assert_eq!(marker, None);
    assert!(
        body.as_ref().map_or(true, |b| b.len() < 100_000),
        "the app sees the response cut off, not a complete one: {:?}",
        body.as_ref().map(Bytes::len)
    );
    assert!(
        body.is_err(),
        "the cut is an error for the app, not a clean end"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    let (status, marker, body, _, _) = get_timed(&kp, "/api/next").await;
    assert_eq!((status, marker), (200, None));
    assert_eq!(body.expect("body"), "hello");
    kp.wait_no_connections(Duration::from_secs(5)).await;
    kp.assert_nowhere(&["reset-key"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_slow_headers_get_504_within_the_route_timeout() {
    let up = RawUpstream::start(|n, s| async move {
        if n == 0 {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        answer_ok(s).await;
    })
    .await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "slow-key")])
            + &route("api", "/api", &up.url(), "api", "timeout = \"500ms\"")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let (status, marker, body, took, _) = get_timed(&kp, "/api/slow").await;
    assert_eq!(status, 504);
    assert_eq!(marker.as_deref(), Some("upstream_timeout"));
    let v: Value = serde_json::from_slice(&body.expect("body")).expect("json");
    assert_eq!(v["error"], "upstream_timeout");
    assert!(v["message"].as_str().expect("msg").contains("500ms"), "{v}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "504 after {took:?}, for a 500ms timeout"
    );
    let (status, _, body, _, _) = get_timed(&kp, "/api/next").await;
    assert_eq!(status, 200);
    assert_eq!(body.expect("body"), "hello");
    kp.assert_nowhere(&["slow-key"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_body_stalling_past_idle_timeout_is_cut_off_not_hung() {
    let up = RawUpstream::start(|n, mut s| async move {
        if n == 0 {
            let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n".to_vec();
            out.extend(std::iter::repeat_n(b'a', 1000));
            let _ = s.write_all(&out).await;
            let _ = s.flush().await;
            // Silent, connection open.
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut [0u8; 1])).await;
        } else {
            answer_ok(s).await;
        }
    })
    .await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "stall-key")])
            + &route("api", "/api", &up.url(), "api", "idle_timeout = \"500ms\"")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let (status, _, body, head, end) = get_timed(&kp, "/api/stall").await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "cut off: {:?}", body.map(|b| b.len()));
    let stalled = end - head;
    assert!(
        stalled >= Duration::from_millis(400) && stalled < Duration::from_millis(2000),
        "the body was cut {stalled:?} after the headers, for a 500ms idle_timeout"
    );
    let (status, _, body, _, _) = get_timed(&kp, "/api/next").await;
    assert_eq!(status, 200);
    assert_eq!(body.expect("body"), "hello");
    kp.wait_no_connections(Duration::from_secs(5)).await;
    kp.assert_nowhere(&["stall-key"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_failure_is_502_naming_tls() {
    // An https:// upstream that is really a plain-HTTP port.
    let plain = Upstream::echo().await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "tls-key")])
            + &route("tls", "/tls", &format!("https://{}", plain.addr), "api", "")
            + &route("plain", "/plain", &plain.url(), "api", "")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let (status, marker, body, _, took) = get_timed(&kp, "/tls/x").await;
    assert_eq!(status, 502);
    assert_eq!(marker.as_deref(), Some("upstream_unreachable"));
    let v: Value = serde_json::from_slice(&body.expect("body")).expect("json");
    let msg = v["message"].as_str().expect("message").to_owned();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        plain.seen().is_empty(),
        "no request was sent in the clear: {:?}",
        plain.seen()
    );
    assert!(
        ["tls", "handshake"]
            .iter()
            .any(|w| msg.to_lowercase().contains(w)),
        "the 502 names TLS / the handshake as the cause: {msg:?}"
    );
    // The next request (another route) works.
    let r = http::get(&kp.url("/plain/x")).await.expect("plain");
    assert_eq!(r.status, 200);
    kp.assert_nowhere(&["tls-key"]).await;
}

/// How a [`StreamUpstream`] response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Complete,
    /// The receiver went away: keyproxy released the upstream stream.
    SendFailed,
}

/// An upstream streaming `?chunks=N` chunks of 64 KiB (as fast as the reader takes them),
/// recording how each response ended.
struct StreamUpstream {
    addr: std::net::SocketAddr,
    outcomes: Arc<Mutex<Vec<Sent>>>,
    task: tokio::task::JoinHandle<()>,
}

const CHUNK: usize = 64 * 1024;

impl StreamUpstream {
    async fn start() -> StreamUpstream {
        use hyper::body::Frame;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let log = outcomes.clone();
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (log, chunk) = (log.clone(), chunk.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let (log, chunk) = (log.clone(), chunk.clone());
                        let n: usize = req
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("chunks="))
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(1)
                            .min(4096);
                        async move {
                            let (tx, rx) = tokio::sync::mpsc::channel::<
                                Result<Frame<Bytes>, std::convert::Infallible>,
                            >(2);
                            tokio::spawn(async move {
                                for _ in 0..n {
                                    if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                                        log.lock().expect("log").push(Sent::SendFailed);
                                        return;
                                    }
                                }
                                log.lock().expect("log").push(Sent::Complete);
                            });
                            let mut rx = rx;
                            let body = http_body_util::StreamBody::new(
                                futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)),
                            );
                            let mut resp = hyper::Response::new(body);
                            resp.headers_mut().insert(
                                "content-length",
                                hyper::header::HeaderValue::from(n * CHUNK),
                            );
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        StreamUpstream {
            addr,
            outcomes,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn outcomes(&self) -> Vec<Sent> {
        self.outcomes.lock().expect("outcomes").clone()
    }
}

impl Drop for StreamUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_disconnecting_mid_request_leaks_no_connection() {
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "hangup-key")])
            + &route("buffered", "/buffered", &up.url(), "api", "")
            + &route(
                "streamed",
                "/streamed",
                &up.url(),
                "api",
                "max_replay_body = \"1KiB\"",
            )),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    for path in ["/buffered/upload", "/streamed/upload"] {
        let mut s = TcpStream::connect(kp.addr).await.expect("connect");
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n").as_bytes(),
        )
        .await
        .expect("head");
        s.write_all(&[b'b'; 10_000])
            .await
            .expect("part of the body");
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(s);
        kp.wait_no_connections(Duration::from_secs(5)).await;
    }
    // A body kept for a replay is never forwarded half-read; a streamed one is cut upstream.
    let seen = up.seen();
    assert!(
        seen.iter()
            .all(|s| s.path == "/upload" && s.body.len() < 100_000),
        "no upstream request got a whole body: {:?}",
        seen.iter()
            .map(|s| (&s.path, s.body.len()))
            .collect::<Vec<_>>()
    );
    assert!(
        seen.len() <= 1,
        "only the streamed request reached the upstream"
    );
    // The next requests work.
    for path in ["/buffered/after", "/streamed/after"] {
        let r = http::send("POST", &kp.url(path), &[], "whole")
            .await
            .expect("post");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["body"], "whole");
    }
    kp.assert_nowhere(&["hangup-key"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_disconnecting_mid_response_releases_the_upstream_stream() {
    let up = StreamUpstream::start().await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "midresp-key")]) + &route("api", "/api", &up.url(), "api", "")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");
    // 4096 chunks: 256 MiB, far more than will be read.
    s.write_all(b"GET /api/big?chunks=4096 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    while got < 512 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("data flows")
            .expect("read");
        assert!(n > 0, "early EOF");
        got += n;
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.outcomes().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the upstream stream was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        up.outcomes(),
        vec![Sent::SendFailed],
        "the upstream saw its stream's send fail"
    );
    kp.wait_no_connections(Duration::from_secs(5)).await;
    let (status, _, body, _, _) = get_timed(&kp, "/api/small?chunks=2").await;
    assert_eq!(status, 200);
    assert_eq!(body.expect("body").len(), 2 * CHUNK);
    assert_eq!(up.outcomes()[1], Sent::Complete);
    kp.assert_nowhere(&["midresp-key"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_app_reader_gets_bounded_buffering_not_64_mib() {
    let up = StreamUpstream::start().await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "slowread-key")]) + &route("api", "/api", &up.url(), "api", "")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    // Warm up: one streamed response, so pools and buffers exist before measuring.
    let (status, _, body, _, _) = get_timed(&kp, "/api/warm?chunks=16").await;
    assert_eq!(status, 200);
    assert_eq!(body.expect("body").len(), 16 * CHUNK);
    let before = rss_kib(kp.pid());

    let chunks = 1024; // 64 MiB
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");
    s.write_all(format!("GET /api/big?chunks={chunks} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("request");
    // Read nothing for 3 s while the upstream has 64 MiB to send.
    let mut peak = before;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(kp.pid()));
    }
    let growth_mib = (peak.saturating_sub(before)) as f64 / 1024.0;
    eprintln!("keyproxy RSS {before} KiB before, {peak} KiB peak while the app did not read: +{growth_mib:.1} MiB");
    assert!(
        growth_mib < 16.0,
        "keyproxy buffered {growth_mib:.1} MiB for a reader that reads nothing"
    );
    assert_eq!(
        up.outcomes(),
        vec![Sent::Complete],
        "only the warm-up finished: the 64 MiB upstream is held back"
    );

    // Then the app reads: everything arrives.
    let total = chunks * CHUNK;
    let mut got = 0usize;
    let mut head: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("data flows")
            .expect("read");
        assert!(n > 0, "early EOF after {got} body bytes");
        if head.is_empty() || !head.windows(4).any(|w| w == b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                got = head.len() - (i + 4);
            }
        } else {
            got += n;
        }
        if got >= total {
            break;
        }
        assert!(Instant::now() < deadline, "64 MiB not read in 30 s ({got})");
    }
    assert_eq!(got, total);
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
    drop(s);
    kp.wait_no_connections(Duration::from_secs(5)).await;
    kp.assert_nowhere(&["slowread-key"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_secret_values_are_refused_and_the_last_good_key_stays() {
    let moto = Moto::start();
    let sm = moto.client();
    create_secret(&sm, "api", r#"{"token":"good-key-1"}"#).await;
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &route(
            "api",
            "/api",
            &up.url(),
            "api",
            "secret_field = \"token\"\nrefresh_interval = \"1s\"",
        ),
        &aws_env(&moto),
    );
    kp.wait_ready(Duration::from_secs(20)).await;
    // (value put as AWSCURRENT, reason in /readyz, a part of the value that must appear nowhere;
    // the empty value has nothing to leak)
    let cases = [
        ("not-json-MARK1", "not JSON", "MARK1"),
        (r#"{"other":"MARK2-value"}"#, "missing", "MARK2"),
        (r#"{"token":"MARK3\r\nX-Evil: 1"}"#, "CR or LF", "MARK3"),
        (r#"{"token":""}"#, "empty", "good-key-1"),
        (r#"{"token":7}"#, "not a string", "\"token\":7"),
    ];
    for (value, reason, mark) in cases {
        let version = put_current(&sm, "api", value).await;
        let (status, s) = wait_secret(&kp, Duration::from_secs(10), reason, |s| {
            s["error"].as_str().is_some_and(|e| e.contains(reason))
        })
        .await;
        assert_eq!(status, 200, "{reason}: still ready with the last good key");
        assert_eq!(s["stale"], true);
        assert_eq!(s["error_kind"], "invalid_value");
        assert_ne!(
            s["version_id"],
            version.as_str(),
            "the refused version is not served"
        );
        let error = s["error"].as_str().expect("error");
        assert!(
            !error.contains(mark),
            "{reason}: the value is in /readyz: {error}"
        );
        let r = http::get(&kp.url("/api/x")).await.expect("request");
        assert_eq!(r.status, 200);
        assert_eq!(
            up.seen().last().and_then(|s| s.header("authorization")),
            Some("Bearer good-key-1"),
            "{reason}: requests still carry the last good key"
        );
        assert!(up.seen().iter().all(|s| !s.headers.contains_key("x-evil")));
        let logged = kp.log_lines("secret refresh failed; serving the last good value");
        assert!(
            logged.iter().any(|l| l["level"] == "WARN"
                && l["secret"] == "api"
                && l["error"].as_str().is_some_and(|e| e.contains(reason))),
            "{reason}: a warn line names the secret and the reason"
        );
        let metrics = kp.metrics().await;
        assert_eq!(
            sum_metric(&metrics, "keyproxy_secret_stale", &["secret=\"api\""]),
            1.0
        );
        assert!(
            sum_metric(
                &metrics,
                "keyproxy_secret_fetches_total",
                &["result=\"invalid_value\""]
            ) >= 1.0
        );
        assert!(!metrics.contains(mark));
        kp.assert_no_leak(&[mark, "good-key-1"]);
    }
    // A usable value again: taken at once.
    put_current(&sm, "api", r#"{"token":"good-key-2"}"#).await;
    wait_secret(&kp, Duration::from_secs(10), "recovered", |s| {
        s["stale"] == false
    })
    .await;
    http::get(&kp.url("/api/y")).await.expect("request");
    assert_eq!(
        up.seen().last().and_then(|s| s.header("authorization")),
        Some("Bearer good-key-2")
    );
    kp.assert_nowhere(&["good-key-1", "good-key-2", "MARK1", "MARK2", "MARK3"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cannot_reach_anything_but_the_routes_own_upstream() {
    let up = Upstream::echo().await;
    let other = Upstream::echo().await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "escape-key")])
            + &route("api", "/api", &up.url(), "api", "")
            + "[[route]]\nname = \"fwd\"\nhost = \"api.example.test\"\nupstream = \""
            + &up.url()
            + "\"\nsecret_id = \"api\"\n"),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let other_host = other.addr.to_string();

    // A Host header naming another host: still only the route's upstream, with its own Host.
    for host in [other_host.as_str(), "evil.example.test", "api.example.test"] {
        let r = raw(
            kp.addr,
            format!("GET /api/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "Host {host}: {r}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.header("host"), Some(up.addr.to_string().as_str()));
        assert_eq!(s.path, "/x");
    }

    // Absolute-form to a host no route has (including the other server's real address): 404.
    for target in [
        format!("http://{other_host}/steal"),
        format!("http://{other_host}/api/x"),
        "http://evil.example.test/api/x".to_owned(),
        "http://evil.example.test:80/".to_owned(),
        "https://evil.example.test/api/x".to_owned(),
    ] {
        let r = raw(
            kp.addr,
            format!("GET {target} HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 404"), "{target}: {r}");
        assert!(r.contains("x-keyproxy-error: no_route"), "{r}");
        assert!(!r.contains("escape-key"));
    }
    assert!(
        other.seen().is_empty(),
        "the other server got {:?}",
        other.seen()
    );
    assert_eq!(up.seen().len(), 3, "nothing more forwarded");
    kp.assert_nowhere(&["escape-key"]).await;
}
