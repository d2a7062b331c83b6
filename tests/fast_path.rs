//! The HTTP/1.1 fast path against an upstream that answers with exact bytes: every response
//! framing, informational responses, hop-by-hop headers, broken answers, pooled connections
//! the upstream closed, and connections handed to the general path part-way.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{file_source, read_some, route, status_of, KeyProxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "fast-path-key";

/// What the scripted upstream does with one request on a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Act {
    /// Write the response bytes, keep the connection.
    Answer,
    /// Write the response bytes, then close.
    AnswerClose,
    /// Read the request, close without answering.
    Drop,
    /// Write the first n bytes, pause, write the rest, close.
    Split(usize),
}

/// Request heads and bodies, in the order read.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

type Script = Arc<dyn Fn(usize, usize, &str) -> (Act, Vec<u8>) + Send + Sync>;

/// A raw HTTP/1.1 upstream: `script(connection number, request number on it, request head)`
/// gives the bytes to answer. Records every request head and body it reads.
struct Raw {
    addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Raw {
    async fn start(
        script: impl Fn(usize, usize, &str) -> (Act, Vec<u8>) + Send + Sync + 'static,
    ) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(script);
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut conn_no = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let (script, log) = (script.clone(), log.clone());
                let this = conn_no;
                conn_no += 1;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut n = 0;
                    loop {
                        let Some((head, body)) = read_request(&mut s, &mut buf).await else {
                            return;
                        };
                        log.lock().expect("seen").push((head.clone(), body));
                        let (act, bytes) = script(this, n, &head);
                        n += 1;
                        if act == Act::Drop {
                            return;
                        }
                        if let Act::Split(k) = act {
                            let _ = s.write_all(&bytes[..k]).await;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let _ = s.write_all(&bytes[k..]).await;
                            return;
                        }
                        if s.write_all(&bytes).await.is_err() || act == Act::AnswerClose {
                            return;
                        }
                    }
                });
            }
        });
        Raw { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("seen")
            .iter()
            .map(|(h, _)| h.clone())
            .collect()
    }

    fn bodies(&self) -> Vec<Vec<u8>> {
        self.seen
            .lock()
            .expect("seen")
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head, and a Content-Length or chunked body, decoded) from `s`.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf.drain(..length).collect();
    Some((head, body))
}

async fn proxy_to(up: &str, extra: &str) -> KeyProxy {
    let kp = KeyProxy::start(
        &(file_source(&[("api", KEY)]) + &route("api", "/api", up, "api", extra)),
        &[],
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    kp
}

/// Reads what `s` has next into `buf`, by `deadline`; the connection must stay open.
async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>, deadline: tokio::time::Instant) {
    let mut chunk = [0u8; 8192];
    let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
        .await
        .expect("response in time")
        .expect("read");
    assert!(
        n > 0,
        "closed early; got {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// Reads one response with a known body length from `s`: (head, body).
async fn read_response(s: &mut TcpStream, body_len: usize) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if buf.len() >= i + 4 + body_len {
                let head = String::from_utf8_lossy(&buf[..i + 4]).into_owned();
                return (head, buf[i + 4..].to_vec());
            }
        }
        read_more(s, &mut buf, deadline).await;
    }
}

/// Reads one chunked response from `s`: (head, decoded body). The framing must be canonical:
/// hex sizes without extensions, CRLF everywhere, no trailers.
async fn read_chunked_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !(buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"\r\n0\r\n\r\n")) {
        read_more(s, &mut buf, deadline).await;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut rest = &buf[end..];
    let mut body = Vec::new();
    loop {
        let line = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("size line");
        let size_text = std::str::from_utf8(&rest[..line]).expect("ascii size");
        let size = usize::from_str_radix(size_text, 16).expect("bare hex size");
        rest = &rest[line + 2..];
        if size == 0 {
            assert_eq!(rest, b"\r\n", "no trailers, nothing after the body");
            return (head, body);
        }
        body.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n");
        rest = &rest[size + 2..];
    }
}

/// The request target of a request head.
fn target(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

fn ok(body: &str) -> (Act, Vec<u8>) {
    (
        Act::Answer,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

#[tokio::test]
async fn every_response_framing_is_relayed_intact() {
    let up = Raw::start(|_, _, head| {
        match target(head) {
            "/chunked" => (
                Act::Answer,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
            ),
            "/until-close" => (
                Act::AnswerClose,
                b"HTTP/1.0 200 OK\r\nx-kind: close\r\n\r\nuntil the end".to_vec(),
            ),
            "/early" => (
                Act::Answer,
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly".to_vec(),
            ),
            "/head" => (Act::Answer, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec()),
            "/no-content" => (Act::Answer, b"HTTP/1.1 204 No Content\r\nx-n: 1\r\n\r\n".to_vec()),
            "/hop" => (
                Act::Answer,
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nx-hop: private\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nx-kept: yes\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            ),
            _ => ok("plain"),
        }
    })
    .await;
    let kp = proxy_to(&up.url(), "").await;
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");

    // Chunked: decoded and framed anew (extensions and trailers dropped), the connection kept.
    s.write_all(b"GET /api/chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("w");
    let (head, body) = read_chunked_response(&mut s).await;
    assert_eq!(status_of(&head), 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert_eq!(body, b"hello world");

    // 103 is not relayed; the final answer is.
    s.write_all(b"GET /api/early HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("w");
    let (head, body) = read_response(&mut s, 5).await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(body, b"early");

    // HEAD: the length is kept, no body waited for.
    s.write_all(b"HEAD /api/head HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("w");
    let (head, body) = read_response(&mut s, 0).await;
    assert!(
        head.to_ascii_lowercase().contains("content-length: 100"),
        "{head}"
    );
    assert!(body.is_empty());

    // 204: no body, and the connection goes on.
    s.write_all(b"GET /api/no-content HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("w");
    let (head, _) = read_response(&mut s, 0).await;
    assert_eq!(status_of(&head), 204);

    // Hop-by-hop headers of the response, and those its Connection names, are dropped.
    s.write_all(b"GET /api/hop HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("w");
    let (head, body) = read_response(&mut s, 2).await;
    assert_eq!(body, b"ok");
    let lower = head.to_ascii_lowercase();
    for gone in ["x-hop", "keep-alive", "proxy-authenticate", "connection"] {
        assert!(!lower.contains(gone), "{gone} relayed: {head}");
    }
    assert!(lower.contains("x-kept: yes"));

    // Two requests in one write (pipelined): two answers, in order.
    s.write_all(b"GET /api/p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /api/p2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("w");
    let text = read_some(&mut s, Duration::from_secs(3)).await;
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");

    // Until close: the app gets the whole body and then the end of the connection.
    s.write_all(b"GET /api/until-close HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("w");
    let text = read_some(&mut s, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nuntil the end"), "{text}");
    let mut rest = [0u8; 16];
    assert_eq!(
        s.read(&mut rest).await.expect("eof"),
        0,
        "closed after a close-delimited body"
    );

    // Every request reached the upstream with the key, the upstream's host, and no app Host.
    for head in up.heads() {
        assert!(
            head.contains(&format!("authorization: Bearer {KEY}\r\n")),
            "{head}"
        );
        assert!(head.contains(&format!("host: {}\r\n", up.addr)), "{head}");
        assert!(!head.contains("Host: x"), "{head}");
    }
    kp.assert_no_leak(&[KEY]);
}

#[tokio::test]
async fn broken_upstream_answers_are_502_naming_the_cause() {
    let up = Raw::start(|_, _, head| match target(head) {
        "/two-lengths" => (
            Act::Answer,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok".to_vec(),
        ),
        "/garbage" => (Act::AnswerClose, b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()),
        "/silent-close" => (Act::Drop, Vec::new()),
        "/bad-chunk" => (
            Act::AnswerClose,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        ),
        "/bad-chunk-later" => (
            Act::Split(57),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n".to_vec(),
        ),
        _ => ok("fine"),
    })
    .await;
    let kp = proxy_to(&up.url(), "").await;
    for (path, cause) in [
        ("/api/two-lengths", "conflicting Content-Length"),
        ("/api/garbage", "invalid response head"),
        (
            "/api/silent-close",
            "closed the connection before answering",
        ),
        ("/api/bad-chunk", "malformed chunked body"),
    ] {
        let mut s = TcpStream::connect(kp.addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("w");
        let text = read_some(&mut s, Duration::from_secs(3)).await;
        assert_eq!(status_of(&text), 502, "{path}: {text}");
        assert!(
            text.contains("x-keyproxy-error: upstream_unreachable"),
            "{text}"
        );
        assert!(text.contains(cause), "{path}: {text}");
        // The proxy's own answer keeps the app connection usable.
        s.write_all(b"GET /api/fine HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("w");
        let (head, body) = read_response(&mut s, 4).await;
        assert_eq!(status_of(&head), 200, "after {path}");
        assert_eq!(body, b"fine");
    }
    // A malformed chunked body after the head was sent: the app connection is cut.
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");
    s.write_all(b"GET /api/bad-chunk-later HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("w");
    let text = read_some(&mut s, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.ends_with("5\r\nhello\r\n"), "{text}");
    let mut rest = [0u8; 16];
    assert_eq!(
        s.read(&mut rest).await.unwrap_or(0),
        0,
        "cut after a malformed body"
    );
    kp.assert_no_leak(&[KEY]);
}

#[tokio::test]
async fn pooled_connections_the_upstream_closed_are_not_a_failure() {
    // Connection 0 answers its first request, then reads the next and closes without an answer
    // (the upstream's idle timeout racing the proxy's reuse). Later connections answer everything;
    // connection 1 closes right after its first answer, as an upstream with a short keep-alive.
    let up = Raw::start(|conn, n, _| match (conn, n) {
        (0, 0) => ok("first"),
        (0, _) => (Act::Drop, Vec::new()),
        (1, _) => {
            let (_, bytes) = ok("closing");
            (Act::AnswerClose, bytes)
        }
        _ => ok("fresh"),
    })
    .await;
    let kp = proxy_to(&up.url(), "").await;
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();

    s.write_all(&get("/api/1")).await.expect("w");
    assert_eq!(read_response(&mut s, 5).await.1, b"first");
    // A GET on the connection that drops it: sent again on a new connection.
    s.write_all(&get("/api/2")).await.expect("w");
    assert_eq!(read_response(&mut s, 7).await.1, b"closing");
    // The connection that closed after answering is seen closed in the pool and not used: even
    // a POST, which is never sent twice, goes through.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"POST /api/3 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n3")
        .await
        .expect("w");
    assert_eq!(read_response(&mut s, 5).await.1, b"fresh");
    let heads = up.heads();
    assert_eq!(heads.len(), 4, "1, 2 (dropped), 2 again, 3: {heads:?}");

    // A POST is not sent twice: the app gets a 502 when its pooled connection drops it.
    let up = Raw::start(|conn, n, _| match (conn, n) {
        (0, 0) => ok("first"),
        (0, _) => (Act::Drop, Vec::new()),
        _ => ok("fresh"),
    })
    .await;
    let kp = proxy_to(&up.url(), "").await;
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");
    s.write_all(&get("/api/1")).await.expect("w");
    assert_eq!(read_response(&mut s, 5).await.1, b"first");
    s.write_all(b"POST /api/charge HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        .await
        .expect("w");
    let text = read_some(&mut s, Duration::from_secs(3)).await;
    assert_eq!(status_of(&text), 502, "{text}");
    assert_eq!(
        up.bodies()
            .iter()
            .filter(|b| b.as_slice() == b"abc")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_connection_moves_to_the_general_path_mid_way_without_losing_a_byte() {
    let up = Upstream::echo().await;
    let kp = proxy_to(&up.url(), "").await;
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");
    // 1: fast path.
    s.write_all(b"GET /api/one HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("w");
    let text = read_some(&mut s, Duration::from_secs(3)).await;
    assert_eq!(status_of(&text), 200, "{text}");
    // 2: a chunked request body (the general path), pipelined with 3 in the same write.
    s.write_all(
        b"POST /api/two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /api/three HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .expect("w");
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while text.matches("HTTP/1.1 200 OK").count() < 2 && tokio::time::Instant::now() < deadline {
        text.push_str(&read_some(&mut s, Duration::from_secs(1)).await);
    }
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].path, "/two");
    assert_eq!(seen[1].body.as_ref(), b"hello");
    assert_eq!(seen[2].path, "/three");
    for s in &seen {
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
    }
}

#[tokio::test]
async fn connection_close_and_request_bodies() {
    let up = Raw::start(|_, _, _| ok("done")).await;
    let kp = proxy_to(&up.url(), "max_replay_body = \"1KiB\"").await;

    // `Connection: close` from the app: answered with it, then closed; not forwarded.
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");
    s.write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("w");
    let text = read_some(&mut s, Duration::from_secs(3)).await;
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(text.ends_with("done"), "{text}");

    // Bodies below, at and far above the replay cap arrive whole, each with its exact length.
    let mut s = TcpStream::connect(kp.addr).await.expect("connect");
    for size in [1usize, 1024, 300_000] {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut req =
            format!("PUT /api/blob HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n")
                .into_bytes();
        req.extend_from_slice(&body);
        s.write_all(&req).await.expect("w");
        assert_eq!(read_response(&mut s, 4).await.1, b"done", "size {size}");
        let got = up.bodies().pop().expect("seen");
        assert_eq!(got.len(), size);
        assert!(got == body, "body of {size} bytes changed");
        let head = up.heads().pop().expect("head");
        assert!(
            head.contains(&format!("content-length: {size}\r\n")),
            "{head}"
        );
        assert!(!head.to_ascii_lowercase().contains("connection:"), "{head}");
    }
}
