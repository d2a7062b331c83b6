//! Configuration reload, end to end: the real binary, moto as Secrets Manager, test upstreams,
//! and app clients that each keep one connection for the whole test.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{aws_env, create_secret, file_source, http, route, KeyProxy, Moto};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Infallible>;

/// One app connection, HTTP/1.1 or HTTP/2 (h2c), that never reconnects: if keyproxy closed it,
/// every later request fails and `conn` has finished.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

struct Client {
    conn: Conn,
    addr: SocketAddr,
    /// The connection's task: finished means the connection is gone.
    task: JoinHandle<()>,
}

impl Client {
    async fn h1(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Client {
            conn: Conn::H1(send),
            addr,
            task,
        }
    }

    async fn h2c(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .expect("h2c handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Client {
            conn: Conn::H2(send),
            addr,
            task,
        }
    }

    /// Sends `method path` with `body`; (status, error kind header, JSON body or null).
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Body,
    ) -> Result<(u16, String, Value), String> {
        let uri = match self.conn {
            Conn::H1(_) => path.to_owned(),
            Conn::H2(_) => format!("http://{}{path}", self.addr),
        };
        let mut b = Request::builder().method(method).uri(uri);
        if let Conn::H1(_) = self.conn {
            b = b.header("host", self.addr.to_string());
        }
        let req = b.body(body).map_err(|e| e.to_string())?;
        let fut = async {
            match &mut self.conn {
                Conn::H1(s) => {
                    s.ready().await.map_err(|e| format!("not ready: {e}"))?;
                    s.send_request(req).await.map_err(|e| format!("{e:?}"))
                }
                Conn::H2(s) => {
                    s.ready().await.map_err(|e| format!("not ready: {e}"))?;
                    s.send_request(req).await.map_err(|e| format!("{e:?}"))
                }
            }
        };
        let resp = tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .map_err(|_| "timeout".to_string())??;
        let status = resp.status().as_u16();
        let kind = resp
            .headers()
            .get("x-keyproxy-error")
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .unwrap_or_default();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, kind, json))
    }

    async fn get(&mut self, path: &str) -> Result<(u16, String, Value), String> {
        self.send("GET", path, Full::new(Bytes::new()).boxed())
            .await
    }

    fn alive(&self) -> bool {
        !self.task.is_finished()
    }
}

/// A body of unknown length: sent chunked, which the fast path hands to the general engine.
fn chunked(parts: &[&'static str]) -> Body {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

/// An upstream that answers with its tag, the path, the headers and the body it got, in one
/// write (`TCP_NODELAY`, a whole body): a round trip costs no Nagle delay, so the clients put
/// the proxy under real load.
struct Tagged {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Tagged {
    async fn start(tag: &'static str) -> Tagged {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let svc = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let headers: serde_json::Map<String, Value> = parts
                            .headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), Value::from(v.to_str().unwrap_or("?"))))
                            .collect();
                        let v = serde_json::json!({"up": tag, "path": parts.uri.path(),
                        "headers": headers, "body": String::from_utf8_lossy(&body)});
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                            v.to_string(),
                        ))))
                    },
                );
                tokio::spawn(
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .into_owned(),
                );
            }
        });
        Tagged {
            addr,
            accepted,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Tagged {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Tallies of a client that sends requests in a loop until stopped.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: Mutex<Vec<String>>,
}

/// Runs `client` on `check`-ed requests until `stop`; returns the client for the final checks.
fn run_loop(
    mut client: Client,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    chunked_post: bool,
    path: &'static str,
    key: &'static str,
) -> JoinHandle<Client> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let r = if chunked_post {
                client
                    .send("POST", path, chunked(&["hello ", "world"]))
                    .await
            } else {
                client.get(path).await
            };
            let good = match &r {
                Ok((200, _, v)) => {
                    v["headers"]["authorization"] == key
                        && (!chunked_post || v["body"] == "hello world")
                }
                _ => false,
            };
            if good {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            } else {
                tally
                    .failed
                    .lock()
                    .expect("tally")
                    .push(format!("{path}: {r:?}"));
            }
            tokio::task::yield_now().await;
        }
        client
    })
}

/// How the test changes the config file.
#[derive(Debug, Clone, Copy)]
enum Write {
    /// Truncate and write in place.
    InPlace,
    /// Write a temporary file and rename it over the config.
    Rename,
    /// As Kubernetes updates a ConfigMap volume: the config is a symlink through `..data`, which
    /// is swapped to a new directory.
    Symlink,
}

struct ConfigDir {
    path: PathBuf,
    dir: PathBuf,
    generation: u32,
}

impl ConfigDir {
    fn write(&mut self, how: Write, text: &str) {
        self.generation += 1;
        match how {
            Write::InPlace => std::fs::write(&self.path, text).expect("write"),
            Write::Rename => {
                let tmp = self.dir.join(format!(".tmp-{}", self.generation));
                std::fs::write(&tmp, text).expect("write");
                std::fs::rename(&tmp, &self.path).expect("rename");
            }
            Write::Symlink => {
                let cm = self.dir.join("cm");
                let gen = cm.join(format!("..gen_{}", self.generation));
                std::fs::create_dir_all(&gen).expect("mkdir");
                std::fs::write(gen.join("keyproxy.toml"), text).expect("write");
                let tmp = cm.join("..data_tmp");
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(format!("..gen_{}", self.generation), &tmp)
                    .expect("symlink");
                std::fs::rename(&tmp, cm.join("..data")).expect("swap ..data");
                // The config path itself: a symlink through ..data (made once, atomically).
                if !std::fs::symlink_metadata(&self.path)
                    .expect("stat")
                    .file_type()
                    .is_symlink()
                {
                    let link = self.dir.join(".link_tmp");
                    std::os::unix::fs::symlink("cm/..data/keyproxy.toml", &link).expect("symlink");
                    std::fs::rename(&link, &self.path).expect("rename link");
                }
            }
        }
    }
}

async fn reloads(kp: &KeyProxy, result: &str) -> f64 {
    kp.counter(
        "keyproxy_config_reloads_total",
        &[&format!("result=\"{result}\"")],
    )
    .await
}

async fn readyz(kp: &KeyProxy) -> Value {
    http::get(&format!("http://{}/readyz", kp.admin))
        .await
        .expect("readyz")
        .json()
}

/// Polls `probe` until it answers `status` (within `within`); the time it took.
async fn until_status(probe: &mut Client, path: &str, status: u16, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = probe.get(path).await.map(|r| r.0);
        if got == Ok(status) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{path}: still {got:?} after {within:?}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The config of one step: which optional routes exist, and the `chg` route's settings.
struct Step {
    new1: bool,
    new2: bool,
    old: bool,
    /// `chg` on upstream B with `Token {secret}` (else A with `Bearer {secret}`).
    chg_b: bool,
}

/// A step of the test: what changes, how the file is written, and whether SIGHUP follows.
type Change = (fn(&mut Step), Write, bool);

fn config(env_prefix: &str, a: &str, b: &str, s: &Step) -> String {
    let long = "refresh_interval = \"1h\"";
    let mut text = String::from(env_prefix);
    text.push_str(&route(
        "fast",
        "/fast",
        a,
        "s1",
        &format!("secret_field = \"token\"\n{long}"),
    ));
    text.push_str(&route(
        "gen",
        "/gen",
        a,
        "s1",
        &format!("secret_field = \"token\"\n{long}"),
    ));
    let (up, value) = if s.chg_b {
        (b, "Token {secret}")
    } else {
        (a, "Bearer {secret}")
    };
    text.push_str(&route(
        "chg",
        "/chg",
        up,
        "s2",
        &format!("value = \"{value}\"\n{long}"),
    ));
    if s.old {
        text.push_str(&route("old", "/old", a, "s2", long));
    }
    if s.new1 {
        // Shares s1 with `fast` and `gen`: no fetch.
        text.push_str(&route(
            "new1",
            "/new1",
            a,
            "s1",
            &format!("secret_field = \"other\"\n{long}"),
        ));
    }
    if s.new2 {
        // A secret new to the cache: one fetch.
        text.push_str(&route("new2", "/new2", a, "s3", long));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn ten_reloads_under_load_drop_nothing_and_fetch_only_new_secrets() {
    let moto = Moto::start();
    let sm = moto.client();
    create_secret(&sm, "s1", r#"{"token":"k1","other":"o1"}"#).await;
    create_secret(&sm, "s2", "k2").await;
    create_secret(&sm, "s3", "k3").await;
    let (up_a, up_b) = (Tagged::start("A").await, Tagged::start("B").await);
    let (a, b) = (up_a.url(), up_b.url());
    let globals = "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n";
    let mut step = Step {
        new1: false,
        new2: false,
        old: true,
        chg_b: false,
    };
    let kp = KeyProxy::start(&config(globals, &a, &b, &step), &aws_env(&moto));
    kp.wait_ready(Duration::from_secs(30)).await;
    let fetches_at_start = kp.fetches().await;
    assert_eq!(fetches_at_start, 2.0, "s1 and s2");
    let mut dir = ConfigDir {
        path: kp.dir.join("keyproxy.toml"),
        dir: kp.dir.clone(),
        generation: 0,
    };

    // Five app connections for the whole test: three free-running (fast path; general path with
    // chunked bodies; general path over h2c) and two the test drives (HTTP/1.1 on the fast path,
    // h2c), plus a probe.
    let stop = Arc::new(AtomicBool::new(false));
    let (fast_tally, gen_tally) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let fast = run_loop(
        Client::h1(kp.addr).await,
        stop.clone(),
        fast_tally.clone(),
        false,
        "/fast/x",
        "Bearer k1",
    );
    let h2_tally = Arc::new(Tally::default());
    let h2_loop = run_loop(
        Client::h2c(kp.addr).await,
        stop.clone(),
        h2_tally.clone(),
        false,
        "/gen/h2",
        "Bearer k1",
    );
    let gen = run_loop(
        Client::h1(kp.addr).await,
        stop.clone(),
        gen_tally.clone(),
        true,
        "/gen/y",
        "Bearer k1",
    );
    let mut h1 = Client::h1(kp.addr).await;
    let mut h2 = Client::h2c(kp.addr).await;
    let mut probe = Client::h1(kp.addr).await;

    // Each step: the change, how the file is written, and whether SIGHUP follows.
    let plan: [Change; 10] = [
        (|s| s.new1 = true, Write::InPlace, false),
        (|s| s.chg_b = true, Write::InPlace, true),
        (|s| s.old = false, Write::Rename, false),
        (|s| s.new2 = true, Write::Rename, true),
        (|s| s.chg_b = false, Write::Symlink, false),
        (|s| s.new1 = false, Write::Symlink, true),
        (|s| s.new1 = true, Write::Symlink, false),
        (|s| s.chg_b = true, Write::Symlink, true),
        (|s| s.new2 = false, Write::Symlink, false),
        (|s| s.old = true, Write::Symlink, true),
    ];
    let mut slowest = Duration::ZERO;
    for (n, (change, how, hup)) in plan.into_iter().enumerate() {
        let before = (step.new1, step.new2, step.old);
        change(&mut step);
        let started = Instant::now();
        dir.write(how, &config(globals, &a, &b, &step));
        if hup {
            kp.signal("HUP");
        }
        let want = (n + 1) as f64;
        while reloads(&kp, "ok").await < want {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "reload {} ({how:?}, SIGHUP {hup}) not applied; logs:\n{}",
                n + 1,
                kp.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Added routes answer within 1 s of the write; removed ones are 404 no_route.
        for (name, was, is) in [
            ("new1", before.0, step.new1),
            ("new2", before.1, step.new2),
            ("old", before.2, step.old),
        ] {
            let path = format!("/{name}/z");
            if is && !was {
                let took = until_status(&mut probe, &path, 200, Duration::from_secs(1)).await;
                let live = started.elapsed().max(took);
                assert!(
                    live < Duration::from_secs(1),
                    "{path} live {live:?} after the write ({how:?})"
                );
                slowest = slowest.max(live);
            }
            if !is {
                let (status, kind, _) = probe.get(&path).await.expect("probe");
                assert_eq!(
                    (status, kind.as_str()),
                    (404, "no_route"),
                    "{path} after reload {}",
                    n + 1
                );
            }
        }
        // The changed route: the next request on each kept connection uses its new settings.
        let (tag, auth) = if step.chg_b {
            ("B", "Token k2")
        } else {
            ("A", "Bearer k2")
        };
        for c in [&mut h1, &mut h2] {
            let (status, _, v) = c.get("/chg/c").await.expect("chg");
            assert_eq!(status, 200, "{v}");
            assert_eq!(
                (v["up"].as_str(), v["headers"]["authorization"].as_str()),
                (Some(tag), Some(auth)),
                "reload {}",
                n + 1
            );
        }
        if n == 0 {
            assert_eq!(
                kp.fetches().await,
                fetches_at_start,
                "new1 shares s1: no fetch"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let fast = fast.await.expect("fast client");
    let gen = gen.await.expect("general client");
    let h2_loop = h2_loop.await.expect("h2c client");

    // Only s3 was fetched by a reload, once; s1 and s2 were kept through all ten.
    assert_eq!(kp.fetches().await, fetches_at_start + 1.0);
    assert_eq!(reloads(&kp, "ok").await, 10.0);
    assert_eq!(reloads(&kp, "error").await, 0.0);
    for (name, t) in [
        ("fast path", &fast_tally),
        ("general path, chunked", &gen_tally),
        ("general path, h2c", &h2_tally),
    ] {
        let failed = t.failed.lock().expect("tally");
        assert!(
            failed.is_empty(),
            "{name}: {} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(
            t.ok.load(Ordering::Relaxed) > 50,
            "{name}: too few requests"
        );
    }
    // Every connection is the one it started with.
    for c in [&fast, &gen, &h2_loop, &h1, &h2, &probe] {
        assert!(c.alive(), "a connection was closed");
    }
    let open = common::sum_metric(&kp.metrics().await, "keyproxy_connections", &[]);
    assert_eq!(open, 6.0, "one connection per client");
    let hups = kp
        .log_lines("configuration reloaded")
        .iter()
        .filter(|l| l["trigger"] == "SIGHUP")
        .count();
    assert!(hups >= 1, "no reload by SIGHUP");
    println!(
        "reload: fast path {} requests, general path {} chunked + {} h2c, 0 failed; slowest new route live {:?} after the write",
        fast_tally.ok.load(Ordering::Relaxed),
        gen_tally.ok.load(Ordering::Relaxed),
        h2_tally.ok.load(Ordering::Relaxed),
        slowest
    );
    // Routes whose upstream stayed kept their upstream connections through the reloads: a few
    // per route and engine in all, not a new set per reload (about 40 more).
    let upstream_conns = up_a.accepted.load(Ordering::Relaxed);
    println!("reload: {upstream_conns} connections to upstream A over the test");
    assert!(
        upstream_conns <= 16,
        "{upstream_conns} upstream connections"
    );
    kp.assert_no_leak(&["k1", "k2", "k3", "o1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_changes_nothing_and_a_listen_change_needs_a_restart() {
    let up = Tagged::start("A").await;
    let source = file_source(&[("s", "key-1")]);
    let globals = format!("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{source}");
    let good = format!("{globals}{}", route("api", "/api", &up.url(), "s", ""));
    let kp = KeyProxy::start(&good, &[]);
    kp.wait_ready(Duration::from_secs(10)).await;
    let path = kp.dir.join("keyproxy.toml");
    let first = readyz(&kp).await["config"].clone();
    assert_eq!(first["sha256"].as_str().map(str::len), Some(64), "{first}");
    assert_eq!(first["origin"], path.display().to_string());
    let mut app = Client::h1(kp.addr).await;
    assert_eq!(app.get("/api/x").await.expect("api").0, 200);

    // Three problems at once: an unknown key, a bad upstream, a route without a secret.
    let bad = format!(
        "{globals}bogus = 1\n{}[[route]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"http://127.0.0.1:1\"\n",
        route("api", "/api", "ftp://nowhere", "s", "")
    );
    std::fs::write(&path, &bad).expect("write");
    let start = Instant::now();
    while reloads(&kp, "error").await < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(3), "no reload error");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines = kp.log_lines("configuration reload refused: the running configuration stays");
    assert_eq!(lines.len(), 1);
    let error = lines[0]["error"].as_str().expect("error field").to_owned();
    assert!(error.contains("3 problems"), "{error}");
    for key in ["bogus", "upstream", "secret_id"] {
        assert!(error.contains(key), "{key} missing from: {error}");
    }
    assert!(!error.contains('\n'), "one line: {error}");
    // Nothing changed: the same route, the same config in /readyz, and the error not repeated
    // by the next polls.
    assert_eq!(app.get("/api/x").await.expect("api").0, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(reloads(&kp, "error").await, 1.0);
    assert_eq!(reloads(&kp, "ok").await, 0.0);
    assert_eq!(readyz(&kp).await["config"], first);

    // A valid file that also moves the listener: applied, except the listener.
    let moved = format!(
        "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:0\"\n{source}{}",
        route("api", "/v2", &up.url(), "s", "")
    );
    std::fs::write(&path, &moved).expect("write");
    kp.signal("HUP");
    let start = Instant::now();
    while reloads(&kp, "ok").await < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(3), "not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restart = kp.log_lines(
        "configuration reload: these settings changed but need a restart to apply; the running values stay",
    );
    assert_eq!(restart.len(), 1);
    assert_eq!(restart[0]["settings"], "listen");
    assert_eq!(
        app.get("/v2/x").await.expect("v2").0,
        200,
        "same connection, new route"
    );
    assert_eq!(app.get("/api/x").await.expect("api").0, 404);
    assert!(app.alive());
    let second = readyz(&kp).await["config"].clone();
    assert_ne!(second["sha256"], first["sha256"]);
    assert!(
        second["loaded_at"].as_str() > first["loaded_at"].as_str(),
        "{first} {second}"
    );
    assert_eq!(
        second["sha256"].as_str(),
        Some(sha256_hex(&std::fs::read(&path).expect("read")).as_str())
    );

    // SIGHUP with the file unchanged: nothing to do.
    kp.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reloads(&kp, "ok").await, 1.0);
    assert_eq!(
        kp.log_lines("SIGHUP received: the configuration file is unchanged; nothing to reload")
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_a_file_says_there_is_nothing_to_reload() {
    let dir = common::scratch("reload-env");
    let secrets = dir.join("secrets.json");
    std::fs::write(&secrets, r#"{"s": "key-1"}"#).expect("write");
    let env: Vec<(String, String)> = [
        ("KEYPROXY_UPSTREAM", "http://127.0.0.1:1"),
        ("KEYPROXY_SECRET_ID", "s"),
        ("KEYPROXY_SOURCE", "file"),
        ("KEYPROXY_SECRETS_FILE", secrets.to_str().expect("utf-8")),
        ("KEYPROXY_LISTEN", "127.0.0.1:0"),
        ("KEYPROXY_ADMIN_LISTEN", "127.0.0.1:0"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let kp = KeyProxy::start_env(&env);
    kp.wait_ready(Duration::from_secs(10)).await;
    kp.signal("HUP");
    let start = Instant::now();
    while kp
        .log_lines("SIGHUP received: the configuration comes from environment variables, so there is no file to reload; restart to change it")
        .is_empty()
    {
        assert!(start.elapsed() < Duration::from_secs(3), "no log line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config = readyz(&kp).await["config"].clone();
    assert_eq!(config["origin"], "environment");
    assert_eq!(config["sha256"], Value::Null);
    // Still running.
    assert_eq!(readyz(&kp).await["status"], "ready");
}

/// SHA-256 in hex, as /readyz shows it.
fn sha256_hex(bytes: &[u8]) -> String {
    keyproxy::config::sha256(bytes)
}
