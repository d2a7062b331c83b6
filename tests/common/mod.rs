//! End-to-end test harness: real processes on 127.0.0.1.
//!
//! - [`Moto`]: moto's server as Secrets Manager (`moto_server`, installed by `scripts/test`),
//!   one per test on a port it bound itself ([`Served`]), killed on drop; [`Moto::client`] is
//!   the real AWS SDK pointed at it.
//! - [`KeyProxy`]: the `keyproxy` binary, logging JSON at `trace` into memory, killed on drop;
//!   [`KeyProxy::assert_no_leak`] checks that no given secret value reached its logs.
//! - [`Upstream`]: a small HTTP API of the test's own (hyper), recording every request it gets.
//! - [`http`]: a plain HTTP/1.1 client for the app side.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A port on 127.0.0.1 where nothing listens now (bound, then released): for a server that is
/// down at first. Another process may take it meanwhile; servers the tests start bind their own
/// ([`Served`]).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "keyproxy-test-{name}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() % 1_000_000
}

/// A server process of the tests' own (moto, httpbin), killed on drop. It binds its port itself
/// and says which in its log: the test owns that port, with no bind-and-release race between
/// tests. Its stderr is kept (the last lines) and shown when it fails to start.
pub struct Served {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    /// Its last log lines.
    log: Arc<Mutex<Vec<String>>>,
}

impl Served {
    /// Starts `cmd`, a werkzeug server (moto, httpbin) told to bind 127.0.0.1 and `port` (0: a
    /// port the system picks), and waits for the line where it reports the bound address
    /// (` * Running on http://127.0.0.1:PORT`). The line comes from this child, so the server
    /// answering on that port is ours. Panics, with the server's log, if it exits first (the
    /// port is taken) or says nothing within 30 s.
    pub fn start(mut cmd: Command, what: &str, port: u16) -> Served {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {what} (run scripts/test, which installs it): {e}")
            });
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<u16>();
        let sink = log.clone();
        // Drained to the end, or the server would block on a full pipe (it logs every request).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(p) = reported_port(&line) {
                    let _ = tx.send(p);
                }
                let mut log = sink.lock().expect("log");
                if log.len() == 200 {
                    log.remove(0);
                }
                log.push(line);
            }
        });
        let mut served = Served {
            child,
            port: 0,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(p) if port == 0 || p == port => {
                    served.port = p;
                    return served;
                }
                Ok(p) => panic!("{what} reports port {p}, not {port}"),
                Err(_) => {}
            }
            let exited = served.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "{what} did not start on port {port} ({}); its log:\n{}",
                    exited.map_or("no answer within 30 s".into(), |s| s.to_string()),
                    served.log()
                );
            }
        }
    }

    /// Its log so far (the last 200 lines).
    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port in werkzeug's ` * Running on http://127.0.0.1:PORT` line.
fn reported_port(line: &str) -> Option<u16> {
    let rest = &line[line.find("Running on http://127.0.0.1:")? + 28..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// moto's Secrets Manager server.
pub struct Moto {
    server: Option<Served>,
    /// Its port.
    pub port: u16,
}

impl Moto {
    /// Starts moto on a port of its own.
    pub fn start() -> Moto {
        Moto::start_on(0)
    }

    /// Starts moto on `port` (0: one the system picks) and waits until it listens there.
    /// Panics if the port is taken: a test never shares a moto with another.
    pub fn start_on(port: u16) -> Moto {
        let bin = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let mut cmd = Command::new(&bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let server = Served::start(cmd, &format!("moto ({bin})"), port);
        Moto {
            port: server.port,
            server: Some(server),
        }
    }

    /// A handle for a port where no moto runs (yet): for outage tests.
    pub fn not_running(port: u16) -> Moto {
        Moto { server: None, port }
    }

    /// Its endpoint URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it (the port stays reserved only by chance: tests restart on the same port at once,
    /// and [`Moto::start_on`] fails loudly if another process took it meanwhile).
    pub fn stop(&mut self) {
        self.server = None;
    }

    /// The real SDK client pointed at this moto.
    pub fn client(&self) -> aws_sdk_secretsmanager::Client {
        sdk_client(&self.url())
    }
}

/// An SDK client for `endpoint` with dummy credentials.
pub fn sdk_client(endpoint: &str) -> aws_sdk_secretsmanager::Client {
    let conf = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .endpoint_url(endpoint)
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    aws_sdk_secretsmanager::Client::from_conf(conf)
}

/// Creates a secret with a string value; returns its version id.
pub async fn create_secret(c: &aws_sdk_secretsmanager::Client, id: &str, value: &str) -> String {
    c.create_secret()
        .name(id)
        .secret_string(value)
        .send()
        .await
        .expect("create_secret")
        .version_id
        .expect("version")
}

/// Puts a new AWSCURRENT version (what a finished rotation leaves behind).
pub async fn put_current(c: &aws_sdk_secretsmanager::Client, id: &str, value: &str) -> String {
    c.put_secret_value()
        .secret_id(id)
        .secret_string(value)
        .version_stages("AWSCURRENT")
        .send()
        .await
        .expect("put_secret_value")
        .version_id
        .expect("version")
}

/// Environment for a keyproxy process that talks to `moto`.
pub fn aws_env(moto: &Moto) -> Vec<(String, String)> {
    vec![
        ("AWS_ENDPOINT_URL_SECRETS_MANAGER".into(), moto.url()),
        ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ]
}

/// Environment for a process that must find no AWS credentials anywhere: no variables, an empty
/// home, no config or credentials file, and no instance metadata (which would find a role on an
/// EC2 runner). For a process started with an empty environment.
pub fn no_credentials_env(dir: &std::path::Path) -> Vec<(String, String)> {
    let missing = |f: &str| dir.join(f).display().to_string();
    vec![
        ("HOME".into(), dir.display().to_string()),
        ("AWS_CONFIG_FILE".into(), missing("no-aws-config")),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            missing("no-aws-credentials"),
        ),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ]
}

/// A running keyproxy process.
pub struct KeyProxy {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// Signalled when its stderr ends (every log line read).
    logs_end: std::sync::mpsc::Receiver<()>,
    /// App listener (`0.0.0.0:0` for a Unix socket: the test knows its path).
    pub addr: SocketAddr,
    /// Admin listener (likewise).
    pub admin: SocketAddr,
    /// Scratch dir holding the config.
    pub dir: PathBuf,
}

/// The keyproxy binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_keyproxy")
}

impl KeyProxy {
    /// Starts keyproxy with `config` (TOML; `listen`/`admin_listen` are set to free ports unless
    /// given) and extra environment; waits until both listeners are up (not until ready).
    pub fn start(config: &str, env: &[(String, String)]) -> KeyProxy {
        let (cmd, dir) = KeyProxy::command(config);
        KeyProxy::spawn(cmd, env, dir)
    }

    /// As [`KeyProxy::start`], with nothing of the test's environment but `PATH`: no AWS
    /// credentials, profile or home directory unless `env` gives them.
    pub fn start_isolated(config: &str, env: &[(String, String)]) -> KeyProxy {
        let (mut cmd, dir) = KeyProxy::command(config);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        KeyProxy::spawn(cmd, env, dir)
    }

    /// `keyproxy --config FILE` for `config` written into a scratch directory.
    fn command(config: &str) -> (Command, PathBuf) {
        let dir = scratch("kp");
        let mut text = String::new();
        if !config.contains("\nlisten") && !config.starts_with("listen") {
            text.push_str("listen = \"127.0.0.1:0\"\n");
        }
        if !config.contains("admin_listen") {
            text.push_str("admin_listen = \"127.0.0.1:0\"\n");
        }
        text.push_str(config);
        let path = dir.join("keyproxy.toml");
        std::fs::write(&path, text).expect("write config");
        let mut cmd = Command::new(binary());
        cmd.arg("--config").arg(&path);
        (cmd, dir)
    }

    /// Starts keyproxy configured only by environment variables.
    pub fn start_env(env: &[(String, String)]) -> KeyProxy {
        KeyProxy::spawn(Command::new(binary()), env, scratch("kp-env"))
    }

    fn spawn(mut cmd: Command, env: &[(String, String)], dir: PathBuf) -> KeyProxy {
        // Only what the test gives: no KEYPROXY_* or RUST_LOG from the caller's environment.
        for (k, _) in std::env::vars() {
            if k.starts_with("KEYPROXY_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.args(["--log-format", "json", "--log", "trace"])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn keyproxy");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<(String, SocketAddr)>();
        let sink = logs.clone();
        let (end_tx, logs_end) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let msg = v["message"].as_str().unwrap_or_default();
                    if msg == "app listener ready" || msg == "admin listener ready" {
                        if let Some(a) = v["addr"].as_str().and_then(listener_addr) {
                            let _ = tx.send((msg.to_owned(), a));
                        }
                    }
                }
                sink.lock().expect("logs").push(line);
            }
            let _ = end_tx.send(());
        });
        let mut addr = None;
        let mut admin = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while addr.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((m, a)) if m.starts_with("app") => addr = Some(a),
                Ok((_, a)) => admin = Some(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "keyproxy did not start; logs:\n{}",
                        logs.lock().expect("logs").join("\n")
                    );
                }
            }
        }
        KeyProxy {
            child,
            logs,
            logs_end,
            addr: addr.expect("addr"),
            admin: admin.expect("admin"),
            dir,
        }
    }

    /// `http://127.0.0.1:PORT` of the app listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = http::get(&format!("http://{}/readyz", self.admin)).await {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "keyproxy not ready in {within:?}; logs:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        http::get(&format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
    }

    /// Sum of a counter's samples whose line contains every one of `labels`.
    pub async fn counter(&self, name: &str, labels: &[&str]) -> f64 {
        sum_metric(&self.metrics().await, name, labels)
    }

    /// `GetSecretValue` calls made (every fetch result counted by keyproxy).
    pub async fn fetches(&self) -> f64 {
        self.counter("keyproxy_secret_fetches_total", &[]).await
    }

    /// The log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs").clone()
    }

    /// Log lines whose `message` is `msg`.
    pub fn log_lines(&self, msg: &str) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == msg)
            .collect()
    }

    /// Panics if any of `secrets` appears in the logs so far.
    pub fn assert_no_leak(&self, secrets: &[&str]) {
        let logs = self.logs();
        assert!(!logs.is_empty(), "no logs captured");
        for s in secrets {
            for l in &logs {
                assert!(!l.contains(s), "secret {s:?} leaked into a log line: {l}");
            }
        }
    }

    /// Panics if any of `secrets` is in `/metrics` or in the logs so far.
    pub async fn assert_nowhere(&self, secrets: &[&str]) {
        let metrics = self.metrics().await;
        for s in secrets {
            assert!(!metrics.contains(s), "secret {s:?} in /metrics");
        }
        self.assert_no_leak(secrets);
    }

    /// Polls until the `keyproxy_connections` gauge is 0.
    pub async fn wait_no_connections(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let n = sum_metric(&self.metrics().await, "keyproxy_connections", &[]);
            if n == 0.0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "keyproxy_connections is still {n} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal (`TERM`, `INT`, ...) without waiting.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGTERM and waits for the exit status (up to `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        self.wait_exit(within)
    }

    /// Waits for the process to exit (up to `within`), and for its last log lines to be read.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                let _ = self.logs_end.recv_timeout(Duration::from_secs(5));
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for KeyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A listener's address from its "ready" log line; a Unix socket (`unix:/path`) as `0.0.0.0:0`.
fn listener_addr(text: &str) -> Option<SocketAddr> {
    if text.starts_with("unix:") {
        return Some(SocketAddr::from(([0, 0, 0, 0], 0)));
    }
    text.parse().ok()
}

/// A `[[route]]` table.
pub fn route(name: &str, prefix: &str, upstream: &str, secret: &str, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\nsecret_id = \"{secret}\"\n{extra}\n"
    )
}

/// A config prefix for the `file` source holding `secrets` (id → value), in a scratch dir.
pub fn file_source(secrets: &[(&str, &str)]) -> String {
    let dir = scratch("file-src");
    let path = dir.join("secrets.json");
    let doc: serde_json::Map<String, serde_json::Value> = secrets
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String((*v).to_owned())))
        .collect();
    std::fs::write(&path, serde_json::Value::Object(doc).to_string()).expect("write secrets");
    format!("[source]\ntype = \"file\"\npath = \"{}\"\n", path.display())
}

/// Sends raw bytes and returns what came back (until close, or 2 s, or a pause after data).
pub async fn raw(addr: SocketAddr, request: impl AsRef<[u8]>) -> String {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The peer may answer and close before it read everything (431): a write error is fine.
    let _ = s.write_all(request.as_ref()).await;
    read_some(&mut s, Duration::from_secs(2)).await
}

/// Reads until close, `within`, or a 300 ms pause after some data.
pub async fn read_some(s: &mut tokio::net::TcpStream, within: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) if !out.is_empty() => break,
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 response (0 if none).
pub fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A process's resident memory, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Sums a metric's samples whose line contains every label fragment.
pub fn sum_metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
}

impl Seen {
    /// A header's value, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A handler's answer: status, headers, body chunks with the delay before each.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub chunks: Vec<(Duration, Bytes)>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, v: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            chunks: vec![(Duration::ZERO, Bytes::from(v.to_string()))],
        }
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A test upstream API on 127.0.0.1.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts an API that answers each request with `handler`.
    pub async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (handler, log) = (handler.clone(), log.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (handler, log) = (handler.clone(), log.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let seen = Seen {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_owned(),
                                query: parts.uri.query().map(str::to_owned),
                                headers: parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                        )
                                    })
                                    .collect(),
                                body,
                            };
                            let reply = handler(&seen);
                            log.lock().expect("seen").push(seen);
                            let (tx, rx) = tokio::sync::mpsc::channel::<
                                Result<hyper::body::Frame<Bytes>, Infallible>,
                            >(4);
                            tokio::spawn(async move {
                                for (delay, chunk) in reply.chunks {
                                    tokio::time::sleep(delay).await;
                                    if tx.send(Ok(hyper::body::Frame::data(chunk))).await.is_err() {
                                        return;
                                    }
                                }
                            });
                            let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
                            let mut resp = Response::new(body);
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(reply.status).expect("status");
                            for (k, v) in reply.headers {
                                resp.headers_mut().insert(
                                    hyper::header::HeaderName::from_bytes(k.as_bytes())
                                        .expect("name"),
                                    v.parse().expect("value"),
                                );
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, seen, task }
    }

    /// An API that echoes what it saw as JSON (method, path, query, headers, body).
    pub async fn echo() -> Upstream {
        Upstream::start(|s| {
            Reply::json(
                200,
                serde_json::json!({
                    "method": s.method, "path": s.path, "query": s.query,
                    "headers": s.headers, "body": String::from_utf8_lossy(&s.body),
                }),
            )
        })
        .await
    }

    /// An API that accepts only `Authorization: Bearer <k>` for `k` in `valid` (else 401).
    pub async fn keyed(valid: Arc<Mutex<Vec<String>>>) -> Upstream {
        Upstream::start(move |s| {
            let ok = s
                .header("authorization")
                .and_then(|h| h.strip_prefix("Bearer "))
                .is_some_and(|k| valid.lock().expect("valid").iter().any(|v| v == k));
            if ok {
                Reply::json(
                    200,
                    serde_json::json!({"ok": true, "body": String::from_utf8_lossy(&s.body)}),
                )
            } else {
                Reply::json(401, serde_json::json!({"error": "invalid api key"}))
            }
        })
        .await
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A plain HTTP/1.1 client for the app side.
pub mod http {
    use super::*;

    /// A collected response.
    #[derive(Debug)]
    pub struct Resp {
        pub status: u16,
        pub headers: hyper::HeaderMap,
        pub body: Bytes,
    }

    impl Resp {
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
        }
    }

    type Client = hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >;

    /// A pooled client.
    pub fn client() -> Client {
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
    }

    /// Sends a request and collects the response.
    pub async fn send(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Resp, String> {
        send_with(&client(), method, url, headers, body).await
    }

    /// Sends with a given client.
    pub async fn send_with(
        c: &Client,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Resp, String> {
        let mut b = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body.into())).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(30), c.request(req))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    /// GET.
    pub async fn get(url: &str) -> Result<Resp, String> {
        send("GET", url, &[], Bytes::new()).await
    }
}
