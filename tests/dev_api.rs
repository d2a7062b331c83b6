//! The development echo API (`keyproxy echo`, `[dev] echo`) and the README's Quickstart on it:
//! `config/local.toml` through keyproxy, with no network and no AWS, answers 200 with what
//! arrived, each key a fingerprint.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// `keyproxy echo` on a port of its own, killed on drop.
struct DevEcho {
    child: Child,
    addr: SocketAddr,
}

impl DevEcho {
    fn start(args: &[&str]) -> DevEcho {
        let mut child = Command::new(binary())
            .args(["echo", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env_remove("KEYPROXY_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keyproxy echo");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if let Some(addr) = v["addr"].as_str().and_then(|a| a.parse().ok()) {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("keyproxy echo reports its address");
        DevEcho { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for DevEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config/local.toml` (and its secrets file) in a scratch directory, its listeners on ports of
/// their own and its routes pointed at `echo` instead of the `[dev] echo` it runs itself.
fn local_toml_for(echo: &DevEcho) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/config/local.toml")).expect("local.toml");
    let dir = scratch("quickstart");
    std::fs::copy(
        format!("{root}/config/local-secrets.json"),
        dir.join("local-secrets.json"),
    )
    .expect("copy secrets");
    let mut out = String::new();
    let mut in_dev = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_dev = line == "[dev]";
        }
        if in_dev {
            continue;
        }
        let line = match line.split_once(" = ") {
            Some(("listen" | "admin_listen", _)) => line.replace("8080", "0").replace("9901", "0"),
            Some(("path", _)) => format!("path = \"{}\"", dir.join("local-secrets.json").display()),
            _ => line.replace("127.0.0.1:8081", &echo.addr.to_string()),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_requests_answer_200_with_the_keys_as_fingerprints() {
    let echo = DevEcho::start(&[]);
    let kp = KeyProxy::start(&local_toml_for(&echo), &[]);
    kp.wait_ready(Duration::from_secs(10)).await;

    // README: curl http://127.0.0.1:8080/payments/charges
    let r = http::get(&kp.url("/payments/charges")).await.expect("get");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["path"], "/v1/charges");
    // printf %s dev-key-123 | sha256sum | cut -c1-4
    assert_eq!(v["headers"]["authorization"], "Bearer sha256:0f11");
    // README: curl 'http://127.0.0.1:8080/maps/geocode?q=paris'
    let r = http::get(&kp.url("/maps/geocode?q=paris"))
        .await
        .expect("get");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["query"], "q=paris&api_key=sha256:e316");
    // README: a POST with a JSON body.
    let r = http::send(
        "POST",
        &kp.url("/payments/charges"),
        &[("content-type", "application/json")],
        "{\"amount\": 1000}",
    )
    .await
    .expect("post");
    assert_eq!(r.json()["body"], "{\"amount\": 1000}");
    // The app's own credential is replaced, never passed on.
    let r = http::send(
        "GET",
        &kp.url("/payments/charges"),
        &[("authorization", "Bearer app-own-key")],
        "",
    )
    .await
    .expect("get");
    assert_eq!(r.json()["headers"]["authorization"], "Bearer sha256:0f11");
    assert!(!r.text().contains("dev-key-123") && !r.text().contains("app-own-key"));
    kp.assert_nowhere(&["dev-key-123", "dev-query-key"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_echo_in_the_config_runs_beside_the_proxy() {
    let config = file_source(&[("api", "beside-key")])
        + "[dev]\necho = \"127.0.0.1:0\"\n"
        + &route("api", "/api", "http://127.0.0.1:9", "api", "");
    let kp = KeyProxy::start(&config, &[]);
    let line = kp
        .log_lines("development echo API ready (for development only)")
        .pop()
        .expect("the echo API starts before the listeners are ready");
    let addr = line["addr"].as_str().expect("addr");
    let r = http::send(
        "PUT",
        &format!("http://{addr}/x/y?token=abc&q=1"),
        &[("x-api-key", "abc")],
        "hello",
    )
    .await
    .expect("echo");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/x/y");
    // printf %s abc | sha256sum | cut -c1-4
    assert_eq!(v["query"], "token=sha256:ba78&q=1");
    assert_eq!(v["headers"]["x-api-key"], "sha256:ba78");
    assert_eq!(v["body"], "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_credentials_it_issues_keys_and_refuses_replaced_ones() {
    let echo = DevEcho::start(&[
        "--client-id",
        "demo",
        "--client-secret",
        "demo-secret",
        "--grace",
        "500ms",
    ]);
    let token = |secret: &'static str| {
        let url = echo.url("/oauth/token");
        async move {
            http::send(
                "POST",
                &url,
                &[("content-type", "application/x-www-form-urlencoded")],
                format!("grant_type=client_credentials&client_id=demo&client_secret={secret}"),
            )
            .await
            .expect("token")
        }
    };
    let get = |key: String| {
        let url = echo.url("/v1/ping");
        async move {
            let auth = format!("Bearer {key}");
            http::send("GET", &url, &[("authorization", &auth)], "")
                .await
                .expect("get")
        }
    };
    assert_eq!(token("wrong").await.status, 401);
    let r = get("nothing-issued".into()).await;
    assert_eq!(r.status, 401);
    let k1 = token("demo-secret").await.json()["access_token"]
        .as_str()
        .expect("key")
        .to_owned();
    let r = get(k1.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["key_number"], 1);
    let k2 = token("demo-secret").await.json()["access_token"]
        .as_str()
        .expect("key")
        .to_owned();
    assert_ne!(k1, k2);
    assert_eq!(get(k1.clone()).await.status, 200, "within the grace period");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = get(k1.clone()).await;
    assert_eq!(r.status, 401);
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("replaced by key #2") && !m.contains(&k1)),
        "{}",
        r.text()
    );
    assert_eq!(get(k2).await.json()["key_number"], 2);
}
