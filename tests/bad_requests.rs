//! Bad input, end to end, over raw TCP: malformed or hostile requests (oversized heads, invalid
//! bytes, request-smuggling framing, CONNECT, path escapes), the connection limit, the app token,
//! a non-loopback listener, absurd durations in a config, and many idle keep-alive connections
//! held with bounded memory. Each asserts the status and that the upstream saw nothing it should
//! not have, then that no secret value reached a log line, an error body or `/metrics`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A bad request: its bytes, the statuses allowed, and the `x-keyproxy-error` it must carry
/// (`None` where the HTTP parser itself refuses it, before keyproxy sees a request).
struct Bad {
    what: &'static str,
    bytes: Vec<u8>,
    status: &'static [u16],
    marker: Option<&'static str>,
}

fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").into_bytes()
}

fn bad_requests() -> Vec<Bad> {
    let big = "a".repeat(70 * 1024);
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let mut v = vec![
        Bad {
            what: "oversized header",
            bytes: get("/api/x", &format!("x-big: {big}\r\n")),
            status: &[431],
            marker: None,
        },
        Bad {
            what: "too many headers",
            bytes: get("/api/x", &many),
            status: &[431],
            marker: None,
        },
        Bad {
            what: "oversized URI",
            bytes: get(&format!("/api/{big}"), ""),
            status: &[431, 414],
            marker: None,
        },
        Bad {
            what: "NUL in a header value",
            bytes: get("/api/x", "x-bad: a\0b\r\n"),
            status: &[400],
            marker: None,
        },
        Bad {
            what: "bare CR in a header value",
            bytes: get("/api/x", "x-bad: a\rb\r\n"),
            status: &[400],
            marker: None,
        },
        Bad {
            what: "space in a header name",
            bytes: get("/api/x", "bad name: x\r\n"),
            status: &[400],
            marker: None,
        },
        Bad {
            what: "obsolete line folding",
            bytes: get("/api/x", "x-fold: a\r\n b\r\n"),
            status: &[400],
            marker: None,
        },
        Bad {
            what: "non-chunked Transfer-Encoding",
            bytes: b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            status: &[400],
            marker: None,
        },
        Bad {
            what: "duplicate differing Content-Length",
            bytes: b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
                .to_vec(),
            status: &[400],
            marker: None,
        },
        Bad {
            what: "CONNECT",
            bytes: b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n"
                .to_vec(),
            status: &[405],
            marker: Some("connect_not_supported"),
        },
        Bad {
            what: "absolute-form to a host no route has",
            bytes: b"GET http://evil.example.test/api/x HTTP/1.1\r\nHost: evil.example.test\r\n\r\n"
                .to_vec(),
            status: &[404],
            marker: Some("no_route"),
        },
    ];
    for path in [
        "/api/../admin",
        "/api/x/..",
        "/api/./x",
        "/api/%2e%2e/admin",
        "/api/%2E%2e/admin",
        "/api/.%2e/admin",
        "/api/%2e./admin",
        "/api/%252e%252e/admin",
        "/api/..%2fadmin",
        "/api/..%2Fadmin",
        "/api/%2e%2e%2fadmin",
        "/api/..\\admin",
        "/api/x\\..\\..\\admin",
        "/api/%5c..%5cadmin",
        "/api/..%5cadmin",
        "/api/%255c..%255cadmin",
        "/api/a%00b",
    ] {
        v.push(Bad {
            what: Box::leak(format!("path escape {path}").into_boxed_str()),
            bytes: get(path, ""),
            status: &[400],
            marker: Some("bad_request"),
        });
    }
    v
}

/// `Content-Length` with `Transfer-Encoding` (the request-smuggling shape): the body is read by
/// its chunked framing only, `Content-Length` is dropped, the upstream gets a request framed
/// anew, and the app connection is closed after the answer (RFC 9112 §6.3), so nothing that
/// follows on that connection can be read as another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_reframed_and_the_connection_closed() {
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "cl-te-key")]) + &route("api", "/api", &up.url(), "api", "")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    for order in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 5",
    ] {
        let before = up.seen().len();
        // A second, smuggled request follows the chunked body on the same connection.
        let bytes = format!(
            "POST /api/x HTTP/1.1\r\nHost: x\r\n{order}\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let r = raw(kp.addr, bytes.as_bytes()).await;
        assert_eq!(status_of(&r), 200, "{order}: {r}");
        assert!(
            r.to_ascii_lowercase().contains("connection: close"),
            "{order}: {r}"
        );
        let seen = &up.seen()[before..];
        assert_eq!(
            seen.len(),
            1,
            "{order}: the smuggled request was not forwarded: {seen:?}"
        );
        assert_eq!(seen[0].path, "/x");
        assert_eq!(&seen[0].body[..], b"hello");
        assert_eq!(
            seen[0].header("content-length"),
            Some("5"),
            "framed anew, exact length"
        );
        assert_eq!(seen[0].header("transfer-encoding"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_hostile_requests_are_refused_and_nothing_is_forwarded() {
    // Not an echo: a forwarded request must show up in `seen`, not as the key reflected back.
    let up = Upstream::start(|_| Reply::json(200, serde_json::json!({"upstream": true}))).await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "bad-req-key")]) + &route("api", "/api", &up.url(), "api", "")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let mut failures = Vec::new();
    for bad in bad_requests() {
        let forwarded_before = up.seen().len();
        let r = raw(kp.addr, &bad.bytes).await;
        let status = status_of(&r);
        let head = r.split("\r\n\r\n").next().unwrap_or_default().to_owned();
        if !bad.status.contains(&status) {
            failures.push(format!(
                "{}: expected {:?}, got {status}: {head}",
                bad.what, bad.status
            ));
        } else if let Some(m) = bad.marker {
            if !r.contains(&format!("x-keyproxy-error: {m}")) {
                failures.push(format!("{}: no x-keyproxy-error: {m}: {head}", bad.what));
            }
        }
        assert!(
            !r.contains("bad-req-key"),
            "{}: the key is in the answer",
            bad.what
        );
        for s in &up.seen()[forwarded_before..] {
            failures.push(format!(
                "{}: forwarded upstream as {} {} (body {:?})",
                bad.what,
                s.method,
                s.path,
                String::from_utf8_lossy(&s.body)
            ));
        }
    }
    // After all that, a good request works.
    let r = http::get(&kp.url("/api/ok")).await.expect("good request");
    assert_eq!(r.status, 200);
    kp.assert_nowhere(&["bad-req-key"]).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_connections_gets_503_overloaded_and_works_again_once_others_close() {
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &(String::from("max_connections = 4\n")
            + &file_source(&[("api", "limit-key")])
            + &route("api", "/api", &up.url(), "api", "")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let request = b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(kp.addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let r = read_some(&mut s, Duration::from_secs(5)).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        held.push(s); // kept alive
    }
    // The 5th: answered 503 overloaded without reading, then closed.
    let mut fifth = TcpStream::connect(kp.addr).await.expect("connect");
    let r = read_some(&mut fifth, Duration::from_secs(5)).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("x-keyproxy-error: overloaded"), "{r}");
    assert!(r.contains("connection: close"), "{r}");
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the refused connection is closed"
    );
    assert_eq!(up.seen().len(), 4);
    assert!(kp.counter("keyproxy_connections_refused_total", &[]).await >= 1.0);
    // The held connections still work.
    held[0].write_all(request).await.expect("write");
    assert!(read_some(&mut held[0], Duration::from_secs(5))
        .await
        .starts_with("HTTP/1.1 200"));

    // One closes: a new connection is served again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = sum_metric(&kp.metrics().await, "keyproxy_connections", &[]);
        if n <= 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection is still counted ({n})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = raw(kp.addr, request).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    drop(held);
    kp.assert_nowhere(&["limit-key"]).await;
}

const APP_TOKEN: &str = "app-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_token_is_required_compared_exactly_and_never_forwarded() {
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &(file_source(&[("api", "token-route-key")])
            + "[app_auth]\ntoken_env = \"TEST_APP_TOKEN\"\n"
            + &route("api", "/api", &up.url(), "api", "")),
        &[("TEST_APP_TOKEN".into(), APP_TOKEN.into())],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let wrong = [
        None,
        Some(""),
        Some("app-token-0123456789abcdeF"),
        Some("app-token-0123456789abcde"),
        Some("app-token-0123456789abcdef0"),
        Some("APP-TOKEN-0123456789ABCDEF"),
    ];
    for token in wrong {
        let headers: Vec<(&str, &str)> =
            token.map(|t| ("x-keyproxy-token", t)).into_iter().collect();
        let r = http::send("GET", &kp.url("/api/x"), &headers, "")
            .await
            .expect("request");
        assert_eq!(r.status, 403, "token {token:?}: {}", r.text());
        assert_eq!(r.headers["x-keyproxy-error"], "app_token");
        assert_eq!(r.json()["error"], "app_token");
        assert!(!r.text().contains(APP_TOKEN) && !r.text().contains("token-route-key"));
    }
    // The token under another header name does not count either.
    let r = http::send(
        "GET",
        &kp.url("/api/x"),
        &[("authorization", APP_TOKEN)],
        "",
    )
    .await
    .expect("request");
    assert_eq!(r.status, 403);
    assert!(up.seen().is_empty(), "nothing forwarded without the token");

    let r = http::send(
        "POST",
        &kp.url("/api/x"),
        &[("x-keyproxy-token", APP_TOKEN)],
        "body",
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &up.seen()[0];
    assert_eq!(
        seen.header("x-keyproxy-token"),
        None,
        "the app token is not forwarded"
    );
    assert!(
        seen.headers.values().all(|v| !v.contains(APP_TOKEN)),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.header("authorization"), Some("Bearer token-route-key"));
    kp.assert_nowhere(&[APP_TOKEN, "token-route-key"]).await;
}

const NOT_LOOPBACK_WARNING: &str = "the app listener is not on loopback";

fn warned_not_loopback(kp: &KeyProxy) -> bool {
    kp.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(NOT_LOOPBACK_WARNING))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_listener_warns_unless_an_app_token_is_required() {
    let up = Upstream::echo().await;
    let open = KeyProxy::start(
        &(String::from("listen = \"0.0.0.0:0\"\n")
            + &file_source(&[("api", "wide-key")])
            + &route("api", "/api", &up.url(), "api", "")),
        &[],
    );
    open.wait_ready(Duration::from_secs(10)).await;
    assert!(
        warned_not_loopback(&open),
        "no warning for 0.0.0.0 without [app_auth]"
    );
    // It serves (reached over loopback only).
    let local = format!("http://127.0.0.1:{}/api/x", open.addr.port());
    assert_eq!(http::get(&local).await.expect("request").status, 200);
    open.assert_nowhere(&["wide-key"]).await;

    let guarded = KeyProxy::start(
        &(String::from("listen = \"0.0.0.0:0\"\n")
            + &file_source(&[("api", "wide-key")])
            + "[app_auth]\ntoken_env = \"TEST_APP_TOKEN\"\n"
            + &route("api", "/api", &up.url(), "api", "")),
        &[("TEST_APP_TOKEN".into(), APP_TOKEN.into())],
    );
    guarded.wait_ready(Duration::from_secs(10)).await;
    assert!(
        !warned_not_loopback(&guarded),
        "warned although a token is required"
    );
    let local = format!("http://127.0.0.1:{}/api/x", guarded.addr.port());
    assert_eq!(http::get(&local).await.expect("request").status, 403);

    let quiet = KeyProxy::start(
        &(file_source(&[("api", "wide-key")]) + &route("api", "/api", &up.url(), "api", "")),
        &[],
    );
    quiet.wait_ready(Duration::from_secs(10)).await;
    assert!(!warned_not_loopback(&quiet), "warned for 127.0.0.1");
    guarded.assert_nowhere(&["wide-key", APP_TOKEN]).await;
    quiet.assert_nowhere(&["wide-key"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_durations_are_refused_by_check_or_work_without_panicking() {
    let up = Upstream::echo().await;
    let config = file_source(&[("api", "duration-key")])
        + &route(
            "api",
            "/api",
            &up.url(),
            "api",
            "idle_timeout = \"300000000000years\"\ntimeout = \"300000000000years\"\nrefresh_interval = \"584000000000years\"",
        );
    let dir = scratch("durations");
    let path = dir.join("keyproxy.toml");
    std::fs::write(&path, &config).expect("write");
    let check = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("keyproxy check");
    if check.status.code() == Some(64) {
        let out = String::from_utf8_lossy(&check.stdout).into_owned()
            + &String::from_utf8_lossy(&check.stderr);
        assert!(
            out.contains("idle_timeout"),
            "refused, naming the key: {out}"
        );
        return;
    }
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    // Accepted: then it must run with them.
    let kp = KeyProxy::start(&config, &[]);
    kp.wait_ready(Duration::from_secs(10)).await;
    let r = http::get(&kp.url("/api/x")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let panics: Vec<String> = kp
        .logs()
        .into_iter()
        .filter(|l| l.contains("panicked"))
        .collect();
    assert!(panics.is_empty(), "keyproxy panicked: {panics:?}");
    let r = r.expect("a complete response");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/x");
    kp.assert_nowhere(&["duration-key"]).await;
}

/// Opens `n` keep-alive connections to keyproxy, sends one request on each, holds them all
/// open, and returns keyproxy's RSS growth in KiB (all open, against a warmed-up baseline).
async fn hold_keepalive_connections(n: usize) -> u64 {
    let need = (n as u64) * 2 + 1024;
    let limit = rlimit::increase_nofile_limit(need).expect("raise RLIMIT_NOFILE");
    assert!(
        limit >= need,
        "RLIMIT_NOFILE is {limit}, {need} needed (the hard limit is too low: raise it with ulimit -Hn)"
    );
    let up = Upstream::start(|_| Reply::json(200, serde_json::json!({"ok": true}))).await;
    let kp = KeyProxy::start(
        &(format!("max_connections = {}\naccess_log = false\n", n + 64)
            + &file_source(&[("api", "load-key")])
            + &route("api", "/api", &up.url(), "api", "")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    for _ in 0..20 {
        assert_eq!(
            http::get(&kp.url("/api/warm")).await.expect("warm").status,
            200
        );
    }
    let before = rss_kib(kp.pid());
    let start = Instant::now();
    let mut held: Vec<TcpStream> = Vec::with_capacity(n);
    // In batches of 100 concurrent requests, each on its own connection, kept open.
    while held.len() < n {
        let batch = (n - held.len()).min(100);
        let conns = (0..batch).map(|_| async {
            let mut s = TcpStream::connect(kp.addr).await.expect("connect");
            s.write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            let deadline = Instant::now() + Duration::from_secs(20);
            // Content-Length or chunked: the body, then the end of the message.
            let done = |g: &[u8]| {
                g.ends_with(b"{\"ok\":true}")
                    || (g.windows(11).any(|w| w == b"{\"ok\":true}") && g.ends_with(b"0\r\n\r\n"))
            };
            while !done(&got) {
                let left = deadline.saturating_duration_since(Instant::now());
                let n = tokio::time::timeout(left, s.read(&mut buf))
                    .await
                    .expect("answer within 20 s")
                    .expect("read");
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got.starts_with(b"HTTP/1.1 200"));
            s
        });
        held.extend(futures_util::future::join_all(conns).await);
        assert!(start.elapsed() < Duration::from_secs(120), "too slow");
    }
    let opened = start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gauge = sum_metric(&kp.metrics().await, "keyproxy_connections", &[]);
    let during = rss_kib(kp.pid());
    assert_eq!(gauge as usize, n, "every connection is open and counted");
    let growth = during.saturating_sub(before);
    eprintln!(
        "{n} keep-alive connections opened in {opened:?}: keyproxy RSS {before} KiB -> {during} KiB (+{growth} KiB, {:.1} KiB per connection)",
        growth as f64 / n as f64
    );
    // Still serving new work while they are held.
    held.truncate(n - 1);
    assert_eq!(
        http::get(&kp.url("/api/more")).await.expect("more").status,
        200
    );
    drop(held);
    kp.wait_no_connections(Duration::from_secs(20)).await;
    eprintln!("all closed: keyproxy RSS {} KiB", rss_kib(kp.pid()));
    kp.assert_nowhere(&["load-key"]).await;
    growth
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_500_keepalive_connections_with_bounded_memory() {
    let growth = hold_keepalive_connections(500).await;
    // About 20-40 KiB per idle HTTP/1.1 connection (buffers, task, socket state); bound at 64.
    assert!(
        growth < 500 * 64,
        "keyproxy grew by {growth} KiB for 500 idle connections"
    );
}

/// By hand: `cargo test --test bad_requests -- --ignored --nocapture holds_5000`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load test, run by hand (see the Reliability section of README.md)"]
async fn holds_5000_keepalive_connections_with_bounded_memory() {
    let growth = hold_keepalive_connections(5000).await;
    assert!(
        growth < 5000 * 64,
        "keyproxy grew by {growth} KiB for 5000 idle connections"
    );
}
