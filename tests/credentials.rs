//! Credentials beyond a single key, end to end through the real binary: `headers` from several
//! JSON fields and `basic_auth`, as the upstream received them byte for byte on both engines;
//! a rotation while requests flow, where every request's headers come from one version; and
//! the per-route `allow` list (403 `not_allowed`, nothing forwarded).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{raw, read_some, scratch, status_of, KeyProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Request heads (exact bytes) and decoded bodies, in the order read.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A raw HTTP/1.1 upstream that records each request head exactly as it arrived and answers
/// `200 ok`.
struct Recorder {
    addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some((head, body)) = read_request(&mut s, &mut buf).await {
                        log.lock().expect("seen").push((head, body));
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Recorder { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        let seen = self.seen.lock().expect("seen");
        seen.iter().map(|(h, _)| h.clone()).collect()
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads more of `s` into `buf`; `None` when the connection ends.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    let n = s.read(&mut chunk).await.ok()?;
    if n == 0 {
        return None;
    }
    buf.extend_from_slice(&chunk[..n]);
    Some(())
}

/// Reads one request: its head (exact bytes) and its body (Content-Length or chunked, decoded).
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("\r\ntransfer-encoding: chunked\r\n") {
        loop {
            let line = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(s, buf).await?;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line]).ok()?, 16).ok()?;
            buf.drain(..line + 2);
            while buf.len() < size + 2 {
                fill(s, buf).await?;
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                return Some((head, body));
            }
        }
    }
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < length {
        fill(s, buf).await?;
    }
    body.extend(buf.drain(..length));
    Some((head, body))
}

/// A secrets file for the `file` source, rewritten atomically by [`Secrets::write`].
struct Secrets {
    path: PathBuf,
}

impl Secrets {
    fn new(secrets: &[(&str, serde_json::Value)]) -> Secrets {
        let path = scratch("cred-src").join("secrets.json");
        let s = Secrets { path };
        s.write(secrets);
        s
    }

    /// Writes every secret (id → JSON value, stored as its text) in one rename, so a reader
    /// sees the old file or the new one.
    fn write(&self, secrets: &[(&str, serde_json::Value)]) {
        let doc: serde_json::Map<String, serde_json::Value> = secrets
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.to_string())))
            .collect();
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::Value::Object(doc).to_string()).expect("write");
        std::fs::rename(&tmp, &self.path).expect("rename");
    }

    fn source(&self) -> String {
        source_at(&self.path)
    }
}

fn source_at(path: &Path) -> String {
    format!("[source]\ntype = \"file\"\npath = \"{}\"\n", path.display())
}

const ADS_ID: &str = "AKIA-ads-7";
const ADS_SECRET: &str = "s3cr3t/ads+=";
const USER: &str = "legacy-bot";
const PASS: &str = "p@ss w:rd";

fn ads(up: &str) -> String {
    format!(
        r#"[[route]]
name = "ads"
path_prefix = "/ads"
upstream = "{up}/api"
secret_id = "prod/ads/key"
headers = {{ "X-Api-Key" = "{{secret.key_id}}", "X-Api-Secret" = "{{secret.key_secret}}" }}
"#
    )
}

fn legacy(up: &str, allow: &str) -> String {
    format!(
        r#"[[route]]
name = "legacy"
path_prefix = "/legacy"
upstream = "{up}"
secret_id = "prod/legacy/login"
basic_auth = {{ username = "{{secret.user}}", password = "{{secret.pass}}" }}
{allow}
"#
    )
}

fn both_secrets() -> Secrets {
    Secrets::new(&[
        (
            "prod/ads/key",
            serde_json::json!({"key_id": ADS_ID, "key_secret": ADS_SECRET}),
        ),
        (
            "prod/legacy/login",
            serde_json::json!({"user": USER, "pass": PASS}),
        ),
    ])
}

/// `Basic base64(USER:PASS)`, computed independently of keyproxy.
fn expected_basic() -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"))
    )
}

/// One raw request to keyproxy on a new connection: the response's status.
async fn send(kp: &KeyProxy, request: &str) -> (u16, String) {
    let text = raw(kp.addr, request).await;
    (status_of(&text), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_basic_auth_reach_the_upstream_byte_for_byte_on_both_engines() {
    let up = Recorder::start().await;
    let secrets = both_secrets();
    let kp = KeyProxy::start(
        &(secrets.source() + &ads(&up.url()) + &legacy(&up.url(), "")),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let host = up.addr.to_string();

    // Fast path (a Content-Length body): the app's own copies of the injected headers go, in
    // any case; the credential lines follow the app's headers.
    let (status, text) = send(
        &kp,
        "POST /ads/v1/items?x=1 HTTP/1.1\r\nHost: app\r\nX-API-KEY: app-own\r\nx-api-secret: app-own\r\nX-App: 1\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = send(
        &kp,
        "GET /legacy/reports/1 HTTP/1.1\r\nHost: app\r\nAuthorization: Bearer app-own\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // General path (a chunked body): hyper writes the head, with the same credential.
    let (status, text) = send(
        &kp,
        "POST /ads/v1/items HTTP/1.1\r\nHost: app\r\nX-Api-Key: app-own\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = send(
        &kp,
        "POST /legacy/reports/2 HTTP/1.1\r\nHost: app\r\nauthorization: Basic YXBwOm93bg==\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");

    let basic = expected_basic();
    let heads = up.heads();
    assert_eq!(
        heads,
        vec![
            format!("POST /api/v1/items?x=1 HTTP/1.1\r\nhost: {host}\r\nX-App: 1\r\ncontent-length: 5\r\nx-api-key: {ADS_ID}\r\nx-api-secret: {ADS_SECRET}\r\n\r\n"),
            format!("GET /reports/1 HTTP/1.1\r\nhost: {host}\r\nauthorization: {basic}\r\n\r\n"),
            // The general path keeps a body this small for a 401 replay, and sends its length.
            format!("POST /api/v1/items HTTP/1.1\r\nx-api-key: {ADS_ID}\r\nx-api-secret: {ADS_SECRET}\r\nhost: {host}\r\ncontent-length: 5\r\n\r\n"),
            format!("POST /reports/2 HTTP/1.1\r\nauthorization: {basic}\r\nhost: {host}\r\ncontent-length: 2\r\n\r\n"),
        ],
        "{heads:#?}"
    );
    let bodies: Vec<Vec<u8>> = up
        .seen
        .lock()
        .expect("seen")
        .iter()
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(
        bodies,
        vec![b"hello".to_vec(), vec![], b"hello".to_vec(), b"hi".to_vec()]
    );
    kp.assert_no_leak(&[ADS_SECRET, PASS, &basic["Basic ".len()..]]);
    kp.assert_nowhere(&[ADS_SECRET, PASS, &basic["Basic ".len()..]])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_missing_a_field_is_refused_and_the_last_good_one_stays() {
    let up = Recorder::start().await;
    let secrets = both_secrets();
    let kp = KeyProxy::start(&(secrets.source() + &ads(&up.url())), &[]);
    kp.wait_ready(Duration::from_secs(10)).await;
    secrets.write(&[
        (
            "prod/ads/key",
            serde_json::json!({"key_id": "AKIA-new", "other": "sec-new"}),
        ),
        ("prod/legacy/login", serde_json::json!({})),
    ]);
    // The file source polls every second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while kp
        .log_lines("secret refresh failed; serving the last good value")
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", kp.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = &kp.log_lines("secret refresh failed; serving the last good value")[0];
    let error = line["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("prod/ads/key")
            && error.contains("header x-api-secret: JSON field \"key_secret\" is missing"),
        "{line}"
    );
    let (status, text) = send(&kp, "GET /ads/x HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert_eq!(status, 200, "{text}");
    let head = up.heads().pop().expect("head");
    assert!(
        head.contains(&format!(
            "x-api-key: {ADS_ID}\r\nx-api-secret: {ADS_SECRET}\r\n"
        )),
        "{head}"
    );
    kp.assert_no_leak(&[ADS_SECRET, "sec-new"]);
}

/// The `N` of `idN`/`secN` values in a request head: (from the key id, from the secret).
fn versions(head: &str) -> (Option<u32>, Option<u32>) {
    let value = |name: &str, prefix: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.strip_prefix(prefix))
            .and_then(|n| n.parse().ok())
    };
    (value("x-api-key: ", "id"), value("x-api-secret: ", "sec"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_while_requests_flow_never_mixes_two_versions() {
    let up = Recorder::start().await;
    let secrets = Secrets::new(&[(
        "prod/ads/key",
        serde_json::json!({"key_id": "id0", "key_secret": "sec0"}),
    )]);
    let kp = KeyProxy::start(&(secrets.source() + &ads(&up.url())), &[]);
    kp.wait_ready(Duration::from_secs(10)).await;
    let addr = kp.addr;
    // A rotation every 400 ms (the file source polls every second ± 10%).
    let done = Arc::new(AtomicBool::new(false));
    let rotator = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) && n < 50 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                n += 1;
                secrets.write(&[(
                    "prod/ads/key",
                    serde_json::json!({"key_id": format!("id{n}"), "key_secret": format!("sec{n}")}),
                )]);
            }
            n
        })
    };
    // Four clients, each on one keep-alive connection, for about 4 s: two on the fast path
    // (Content-Length bodies), two on the general path (chunked bodies: the fast path hands the
    // connection over at the first one).
    let start = tokio::time::Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let mut sent = 0;
                while start.elapsed() < Duration::from_secs(4) && sent < 2000 {
                    let req = if c < 2 {
                        format!("POST /ads/c{c}/{sent} HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\nhi")
                    } else {
                        format!("POST /ads/c{c}/{sent} HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
                    };
                    s.write_all(req.as_bytes()).await.expect("write");
                    let mut got = Vec::new();
                    while !got.ends_with(b"\r\n\r\nok") {
                        let mut chunk = [0u8; 4096];
                        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
                            .await
                            .expect("answer in time")
                            .expect("read");
                        if n == 0 {
                            // The general path may close after a chunked upload: reconnect.
                            break;
                        }
                        got.extend_from_slice(&chunk[..n]);
                    }
                    assert!(got.starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&got));
                    if !got.ends_with(b"\r\n\r\nok") || String::from_utf8_lossy(&got).to_ascii_lowercase().contains("connection: close") {
                        s = TcpStream::connect(addr).await.expect("reconnect");
                    }
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut total = 0;
    for c in clients {
        total += c.await.expect("client");
    }
    done.store(true, Ordering::Relaxed);
    let rotations = rotator.await.expect("rotator");
    let heads = up.heads();
    assert_eq!(
        heads.len(),
        total,
        "every request reached the upstream once"
    );
    assert!(total >= 300, "only {total} requests");
    let mut mixes = 0;
    let mut seen_versions = std::collections::BTreeSet::new();
    // The fast path writes `host` first; hyper writes the credential first.
    let fast = heads
        .iter()
        .filter(|h| {
            h.split("\r\n")
                .nth(1)
                .is_some_and(|l| l.starts_with("host: "))
        })
        .count();
    // Versions seen by each engine.
    let mut by_engine = [
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    ];
    for h in &heads {
        let engine = usize::from(
            !h.split("\r\n")
                .nth(1)
                .is_some_and(|l| l.starts_with("host: ")),
        );
        match versions(h) {
            (Some(a), Some(b)) if a == b => {
                seen_versions.insert(a);
                by_engine[engine].insert(a);
            }
            _ => mixes += 1,
        }
    }
    println!(
        "{total} requests ({fast} on the fast path, {} on the general path), {rotations} rotations written, {} versions seen ({seen_versions:?}), {mixes} mixes",
        total - fast,
        seen_versions.len()
    );
    assert!(
        fast >= 100 && total - fast >= 100,
        "both engines: {fast} of {total}"
    );
    assert_eq!(mixes, 0, "{heads:#?}");
    assert!(
        by_engine.iter().all(|v| v.len() >= 2),
        "each engine saw a rotation: {by_engine:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_refuses_with_403_and_forwards_nothing() {
    let up = Recorder::start().await;
    let secrets = both_secrets();
    let allow =
        r#"allow = ["GET /reports/*", "POST /reports/*/run", "GET /status", "* /files/**"]"#;
    let forward = format!(
        "[[route]]\nname = \"fwd\"\nhost = \"legacy.test\"\nupstream = \"{}\"\nsecret_id = \"prod/legacy/login\"\nbasic_auth = {{ username = \"{{secret.user}}\", password = \"{{secret.pass}}\" }}\nallow = [\"GET /status\"]\n",
        up.url()
    );
    let kp = KeyProxy::start(
        &(secrets.source() + &legacy(&up.url(), allow) + &forward),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;

    let get = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: app\r\n\r\n");
    let with_method = |m: &str, target: &str| {
        format!("{m} {target} HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\nhi")
    };
    let chunked = |m: &str, target: &str| {
        format!("{m} {target} HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    };
    let allowed = [
        get("/legacy/reports/1"),
        get("/legacy/reports/q?x=/admin"),
        with_method("POST", "/legacy/reports/7/run"),
        chunked("POST", "/legacy/reports/7/run"),
        get("/legacy/status"),
        get("/legacy/status?../admin"),
        get("/legacy/files"),
        get("/legacy/files/a/b/c.txt"),
        with_method("DELETE", "/legacy/files/x"),
        chunked("PUT", "/legacy/files/x/y"),
        "GET http://legacy.test/status HTTP/1.1\r\nHost: legacy.test\r\n\r\n".to_owned(),
    ];
    let refused = [
        get("/legacy/reports"),
        get("/legacy/reports/1/2"),
        get("/legacy/reports/"),
        with_method("POST", "/legacy/reports/7"),
        chunked("POST", "/legacy/reports/7/run/now"),
        with_method("DELETE", "/legacy/reports/1"),
        get("/legacy/admin?/status"),
        get("/legacy/reports/a%2Fb"),
        get("/legacy/reports/a%2fb"),
        get("/legacy/reports/a%5Cb"),
        get("/legacy/reports/a%252Fb"),
        get("/legacy/reports/a%%32%46b"),
        get("/legacy/files//etc"),
        get("/legacy//status"),
        get("/legacy/Status"),
        with_method("HEAD", "/legacy/status"),
        get("/legacy"),
        "GET http://legacy.test/admin HTTP/1.1\r\nHost: legacy.test\r\n\r\n".to_owned(),
        "POST http://legacy.test/status HTTP/1.1\r\nHost: legacy.test\r\nContent-Length: 0\r\n\r\n"
            .to_owned(),
    ];
    for req in &allowed {
        let (status, text) = send(&kp, req).await;
        assert_eq!(status, 200, "{req:?}: {text}");
    }
    assert_eq!(up.count(), allowed.len());
    for req in &refused {
        let (status, text) = send(&kp, req).await;
        assert_eq!(status, 403, "{req:?}: {text}");
        let lower = text.to_ascii_lowercase();
        assert!(
            lower.contains("\r\nx-keyproxy-error: not_allowed\r\n"),
            "{text}"
        );
        if req.starts_with("HEAD ") {
            continue;
        }
        let body = &text[text.find("\r\n\r\n").expect("head") + 4..];
        let v: serde_json::Value = serde_json::from_str(body).expect("json body");
        assert_eq!(v["error"], "not_allowed", "{body}");
        let route = if req.contains("legacy.test") {
            "fwd"
        } else {
            "legacy"
        };
        assert_eq!(v["route"], route, "{body}");
        let msg = v["message"].as_str().unwrap_or_default();
        let method = req.split(' ').next().unwrap_or_default();
        assert!(msg.contains(&format!("{method} /")), "{msg}");
        assert!(!msg.contains("Host") && !msg.contains('?'), "{msg}");
    }
    // Nothing of the refused requests reached the upstream.
    assert_eq!(up.count(), allowed.len(), "{:#?}", up.heads());
    let refused_count = kp
        .counter(
            "keyproxy_proxy_errors_total",
            &["route=\"legacy\"", "kind=\"not_allowed\""],
        )
        .await
        + kp.counter(
            "keyproxy_proxy_errors_total",
            &["route=\"fwd\"", "kind=\"not_allowed\""],
        )
        .await;
    assert_eq!(refused_count as usize, refused.len());

    // A keep-alive connection goes on after a refusal (fast path handing it over).
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");
    s.write_all(format!("{}{}", get("/legacy/admin"), get("/legacy/status")).as_bytes())
        .await
        .expect("write");
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !(text.contains(" 403 ") && text.ends_with("ok"))
        && tokio::time::Instant::now() < deadline
    {
        text.push_str(&read_some(&mut s, Duration::from_secs(1)).await);
    }
    assert!(text.starts_with("HTTP/1.1 403 "), "{text}");
    assert!(
        text.contains("HTTP/1.1 200 OK") && text.ends_with("ok"),
        "{text}"
    );
    assert_eq!(up.count(), allowed.len() + 1);
}
