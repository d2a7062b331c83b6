//! The app and admin listeners on Unix domain sockets, end to end with the real binary: curl
//! (`--unix-socket`) and Python's `http.client` through the socket on both engines (the fast
//! path takes plain GET/POST with a `Content-Length`; a chunked request body and h2c go to the
//! general path, by design), `keyproxy health` over an admin socket, the socket files' mode,
//! a stale file replaced, a live socket and a foreign file refused, the files removed after
//! SIGTERM, and `keyproxy check` naming the key of each bad setting.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{binary, file_source, route, scratch, KeyProxy, Reply, Upstream};

const KEY: &str = "unix-socket-key";

/// `status`, `body` of a curl request through the socket at `sock` (`extra`: more curl args).
async fn curl(sock: &Path, path: &str, extra: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .arg("--unix-socket")
        .arg(sock)
        .args(extra)
        .arg(format!("http://localhost{path}"))
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = tail
        .split(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let version = tail.split(' ').nth(1).unwrap_or_default();
    (status, format!("{body}\nHTTP/{version}"))
}

/// A GET, a `Content-Length` POST and a chunked POST on one keep-alive connection from Python's
/// `http.client` over `AF_UNIX`; the statuses and bodies as JSON.
const PYTHON_CLIENT: &str = r#"
import http.client, json, socket, sys
class Unix(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=5)
        self.unix_path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.unix_path)
c = Unix(sys.argv[1])
out = []
for method, path, body, chunked in [("GET", "/api/py-get", None, False),
        ("POST", "/api/py-post", b"python-length", False),
        ("POST", "/api/py-chunked", iter([b"python-", b"chunked"]), True)]:
    c.request(method, path, body=body, encode_chunked=chunked)
    r = c.getresponse()
    out.append([r.status, r.read().decode()])
print(json.dumps(out))
"#;

async fn python(sock: &Path) -> serde_json::Value {
    let python = std::env::var("HTTPBIN_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(PYTHON_CLIENT)
        .arg(sock)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "python client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python output")
}

/// `keyproxy health` with `args`: exit success, and stderr.
async fn health(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(binary())
        .arg("health")
        .args(args)
        .env_remove("KEYPROXY_ADMIN_LISTEN")
        .env_remove("KEYPROXY_CONFIG")
        .output()
        .await
        .expect("run keyproxy health");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn unix(p: &Path) -> String {
    format!("unix:{}", p.display())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .expect("socket file")
        .permissions()
        .mode()
        & 0o777
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Runs keyproxy with `config`, expecting it to exit with an error within 10 s; its stderr.
async fn fails(config: &str) -> String {
    let dir = scratch("unix-fail");
    let path = dir.join("keyproxy.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = tokio::process::Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYPROXY_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--config").arg(&path).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("keyproxy exits")
        .expect("run keyproxy");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "keyproxy started with {config}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn wait_ready(admin: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let arg = unix(admin);
    loop {
        let (ok, err) = health(&["--ready", "--admin", &arg]).await;
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "not ready: {err}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_a_unix_socket_on_both_engines() {
    // The echo API, with `/slow` answering its body 600 ms late (a request in flight at SIGTERM).
    let api = Upstream::start(|s| {
        let mut reply = Reply::json(
            200,
            serde_json::json!({"method": s.method, "path": s.path, "body": String::from_utf8_lossy(&s.body)}),
        );
        if s.path == "/slow" {
            reply.chunks[0].0 = Duration::from_millis(600);
        }
        reply
    })
    .await;
    let dir = scratch("unix");
    let (app, admin) = (dir.join("app.sock"), dir.join("admin.sock"));
    let mut kp = KeyProxy::start(
        &format!(
            "listen = \"{}\"\nadmin_listen = \"{}\"\n{}{}",
            unix(&app),
            unix(&admin),
            file_source(&[("k", KEY)]),
            route("api", "/api", &api.url(), "k", "")
        ),
        &[],
    );
    wait_ready(&admin).await;
    assert_eq!((mode(&app), mode(&admin)), (0o660, 0o660));
    let config = kp.dir.join("keyproxy.toml");
    let (ok, err) = health(&["--config", &config.display().to_string()]).await;
    assert!(ok, "health from the config's admin_listen: {err}");

    // Fast path: plain GET and Content-Length POST. General path: a chunked body, and h2c.
    let (s, body) = curl(&app, "/api/get", &[]).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = curl(&app, "/api/post", &["--data-binary", "curl-length"]).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("curl-length"), "{body}");
    let chunked = [
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "curl-chunked",
    ];
    let (s, body) = curl(&app, "/api/chunked", &chunked).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("curl-chunked"), "{body}");
    let (s, body) = curl(&app, "/api/h2c", &["--http2-prior-knowledge"]).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.ends_with("HTTP/2"), "{body}");
    let (s, body) = curl(&app, "/nowhere", &[]).await;
    assert_eq!(s, 404, "the proxy's own answer over the socket: {body}");

    let py = python(&app).await;
    let expect = ["", "python-length", "python-chunked"];
    for (answer, body) in py.as_array().expect("list").iter().zip(expect) {
        assert_eq!(answer[0], 200, "{py}");
        assert!(answer[1].as_str().is_some_and(|t| t.contains(body)), "{py}");
    }

    let seen = api.seen();
    assert_eq!(seen.len(), 7, "every request but the 404 reached the API");
    let bearer = format!("Bearer {KEY}");
    assert!(seen
        .iter()
        .all(|s| s.header("authorization") == Some(bearer.as_str())));
    assert!(
        !kp.logs()
            .iter()
            .any(|l| l.contains("not on loopback") || l.contains("any local user")),
        "no exposure warning for a socket file"
    );

    // SIGTERM with a request in flight: the app socket goes at once, the request finishes.
    let slow = tokio::spawn({
        let app = app.clone();
        async move { curl(&app, "/api/slow", &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    kp.signal("TERM");
    let gone = Instant::now() + Duration::from_secs(2);
    while app.exists() && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !app.exists(),
        "the app socket is removed when draining starts"
    );
    let (s, body) = slow.await.expect("slow request");
    assert_eq!(s, 200, "the request in flight finishes: {body}");
    let status = kp.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success());
    assert!(!admin.exists(), "the admin socket is removed on exit");
    let (ok, _) = health(&["--admin", &unix(&admin)]).await;
    assert!(!ok, "health fails once keyproxy is gone");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_live_and_foreign_files() {
    let api = Upstream::echo().await;
    let dir = scratch("unix-files");
    let app = dir.join("app.sock");
    let config = |listen: &Path, mode: &str| {
        format!(
            "listen = \"{}\"\nlisten_mode = \"{mode}\"\nadmin_listen = \"127.0.0.1:0\"\n{}{}",
            unix(listen),
            file_source(&[("k", KEY)]),
            route("api", "/api", &api.url(), "k", "")
        )
    };
    let first = KeyProxy::start(&config(&app, "0600"), &[]);
    assert_eq!(mode(&app), 0o600, "listen_mode");
    let (s, _) = curl(&app, "/api/one", &[]).await;
    assert_eq!(s, 200);

    // A live socket is not taken over.
    let err = fails(&config(&app, "0600")).await;
    assert!(
        err.contains("(listen)") && err.contains("another process is listening"),
        "{err}"
    );
    let (s, _) = curl(&app, "/api/still", &[]).await;
    assert_eq!(s, 200, "the first keyproxy still serves");

    // A crash (SIGKILL) leaves the file; the next start replaces it.
    drop(first);
    assert!(is_socket(&app), "a crash leaves the socket file");
    let second = KeyProxy::start(&config(&app, "0666"), &[]);
    assert_eq!(
        second
            .log_lines("replacing a stale socket file (nothing listens on it)")
            .len(),
        1
    );
    assert_eq!(mode(&app), 0o666);
    assert!(
        second.logs().iter().any(|l| l.contains("any local user")),
        "a socket anyone may use, without an app token, is warned of"
    );
    let (s, _) = curl(&app, "/api/two", &[]).await;
    assert_eq!(s, 200);
    drop(second);

    // Not a socket: refused, and left as it was.
    let file = dir.join("data.sock");
    std::fs::write(&file, "keep me").expect("write");
    let err = fails(&config(&file, "0600")).await;
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), "keep me");

    // The directory must exist.
    let missing = dir.join("no-such-dir");
    let err = fails(&config(&missing.join("app.sock"), "0600")).await;
    assert!(
        err.contains("(listen)") && err.contains(&format!("{} does not exist", missing.display())),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn check_names_the_key() {
    let dir = scratch("unix-check");
    let check = |file: Option<PathBuf>, env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(binary());
        for (k, _) in std::env::vars() {
            if k.starts_with("KEYPROXY_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("check").envs(env.iter().copied());
        if let Some(f) = file {
            cmd.arg("--config").arg(f);
        }
        let out = cmd.output().expect("run keyproxy check");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stderr), text(&out.stdout))
    };
    let routes = format!(
        "{}{}",
        file_source(&[("k", KEY)]),
        route("api", "/api", "http://127.0.0.1:1", "k", "")
    );
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    };

    // The Kubernetes variant's config (a ConfigMap's `config.toml`).
    let cm = std::fs::read_to_string(format!(
        "{}/deploy/kubernetes/unix-socket/configmap.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("configmap");
    let deployed: String = cm
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("config.toml: |"))
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l).to_owned() + "\n")
        .collect();
    assert!(deployed.contains("listen = \"unix:/"), "{deployed}");
    let deployed = write("deployed.toml", &deployed);
    let (code, err, out) = check(Some(deployed), &[]);
    assert_eq!(code, Some(0), "deploy/kubernetes/unix-socket: {err}");
    assert!(
        out.contains("listen unix:/run/keyproxy/app.sock (mode 0660; /run/keyproxy must exist"),
        "{out}"
    );

    let good = write(
        "good.toml",
        &format!("listen = \"unix:/run/keyproxy/app.sock\"\nadmin_listen = \"unix:/run/keyproxy/admin.sock\"\nlisten_mode = \"0666\"\n{routes}"),
    );
    assert_eq!(
        check(Some(good), &[]).0,
        Some(0),
        "the directory need not exist to check"
    );

    let long = format!("/{}", "s".repeat(110));
    let bad = write(
        "bad.toml",
        &format!("listen = \"unix:run/app.sock\"\nadmin_listen = \"unix:{long}\"\nlisten_mode = \"rw-rw----\"\n{routes}"),
    );
    let (code, err, _) = check(Some(bad), &[]);
    assert_eq!(code, Some(64), "{err}");
    for needle in [
        "listen: \"unix:run/app.sock\": the socket path must be absolute",
        "admin_listen: ",
        "takes at most 107",
        "listen_mode: \"rw-rw----\" is not an octal file mode",
    ] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }

    let (code, err, _) = check(
        None,
        &[
            ("KEYPROXY_UPSTREAM", "http://127.0.0.1:1"),
            ("KEYPROXY_SECRET_ID", "k"),
            ("KEYPROXY_LISTEN", "unix:"),
            ("KEYPROXY_LISTEN_MODE", "1777"),
        ],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("KEYPROXY_LISTEN: \"unix:\" needs a socket path"),
        "{err}"
    );
    assert!(
        err.contains("KEYPROXY_LISTEN_MODE: \"1777\" is not a permission mode"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
