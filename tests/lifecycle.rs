//! Production behaviour of the binary: graceful shutdown, `keyproxy health`, metrics, logs.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn route(upstream: &str, extra: &str) -> String {
    format!("[[route]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"{upstream}\"\nsecret_id = \"api\"\n{extra}\n")
}

/// An upstream whose body arrives `delay` after the headers.
async fn slow_upstream(delay: Duration) -> Upstream {
    Upstream::start(move |_| Reply {
        status: 200,
        headers: vec![],
        chunks: vec![(Duration::ZERO, "start ".into()), (delay, "done".into())],
    })
    .await
}

/// Waits until `up` has a request (in flight through keyproxy), not a fixed time: on a loaded
/// machine the request may take longer than any sleep to get there.
async fn wait_seen(up: &Upstream) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.seen().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let moto = Moto::start();
    create_secret(&moto.client(), "api", "key-1").await;
    let up = slow_upstream(Duration::from_millis(1500)).await;
    let mut kp = KeyProxy::start(
        &format!("drain_timeout = \"10s\"\n{}", route(&up.url(), "")),
        &aws_env(&moto),
    );
    kp.wait_ready(Duration::from_secs(20)).await;

    let url = kp.url("/api/slow");
    let in_flight = tokio::spawn(async move { http::get(&url).await });
    wait_seen(&up).await;
    kp.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Draining: readiness is 503, no new connections are accepted.
    let r = http::get(&format!("http://{}/readyz", kp.admin))
        .await
        .expect("readyz");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["reason"], "shutting down");
    assert!(
        tokio::net::TcpStream::connect(kp.addr).await.is_err(),
        "the app listener is closed"
    );

    // The request in flight completes.
    let r = in_flight.await.expect("join").expect("in-flight request");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "start done");
    let status = kp.wait_exit(Duration::from_secs(10)).expect("exited");
    assert_eq!(status.code(), Some(0));
    assert!(!kp.log_lines("all connections closed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_bounds_shutdown() {
    let moto = Moto::start();
    create_secret(&moto.client(), "api", "key-1").await;
    let up = slow_upstream(Duration::from_secs(30)).await;
    let mut kp = KeyProxy::start(
        &format!("drain_timeout = \"500ms\"\n{}", route(&up.url(), "")),
        &aws_env(&moto),
    );
    kp.wait_ready(Duration::from_secs(20)).await;
    let url = kp.url("/api/stuck");
    let stuck = tokio::spawn(async move { http::get(&url).await });
    wait_seen(&up).await;
    let start = Instant::now();
    let status = kp.terminate(Duration::from_secs(10)).expect("exited");
    assert_eq!(status.code(), Some(0));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        stuck.await.expect("join").is_err(),
        "the stuck request was cut off"
    );
    assert!(!kp
        .log_lines("drain timeout reached; closing the remaining connections")
        .is_empty());
}

fn health(args: &[&str]) -> (i32, String) {
    let out = Command::new(binary())
        .arg("health")
        .args(args)
        .env_remove("KEYPROXY_ADMIN_LISTEN")
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_command_checks_liveness_and_readiness() {
    let port = free_port();
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(&route(&up.url(), ""), &aws_env(&Moto::not_running(port)));
    let admin = kp.admin.to_string();
    // Alive but not ready: Secrets Manager is down.
    assert_eq!(health(&["--admin", &admin]).0, 0);
    let (code, err) = health(&["--ready", "--admin", &admin]);
    assert_eq!(code, 1);
    assert!(err.contains("503"), "{err}");
    let moto = Moto::start_on(port);
    create_secret(&moto.client(), "api", "key-1").await;
    kp.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(health(&["--ready", "--admin", &admin]).0, 0);
    // Through the environment variable, as the container health check runs it.
    let out = Command::new(binary())
        .arg("health")
        .env("KEYPROXY_ADMIN_LISTEN", &admin)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_access_log_describe_traffic_without_values() {
    let moto = Moto::start();
    let sm = moto.client();
    let v1 = create_secret(&sm, "api", "metric-key-1").await;
    let valid = std::sync::Arc::new(std::sync::Mutex::new(vec!["metric-key-1".to_string()]));
    let up = Upstream::keyed(valid.clone()).await;
    let kp = KeyProxy::start(
        &route(&up.url(), "refresh_interval = \"1h\""),
        &aws_env(&moto),
    );
    kp.wait_ready(Duration::from_secs(20)).await;
    for _ in 0..3 {
        assert_eq!(
            http::get(&kp.url("/api/x?token=app-query"))
                .await
                .expect("get")
                .status,
            200
        );
    }
    let m = kp.metrics().await;
    assert!(
        m.contains(&format!(
            "keyproxy_secret_version{{secret=\"api\",stage=\"AWSCURRENT\",version_id=\"{v1}\"}} 1"
        )),
        "{m}"
    );
    let v2 = put_current(&sm, "api", "metric-key-2").await;
    *valid.lock().expect("valid") = vec!["metric-key-2".into()];
    assert_eq!(http::get(&kp.url("/api/y")).await.expect("get").status, 200);
    http::get(&kp.url("/nowhere")).await.expect("404");

    let m = kp.metrics().await;
    assert_eq!(
        sum_metric(&m, "keyproxy_requests_total", &["route=\"api\"", "2xx"]),
        4.0,
        "{m}"
    );
    assert_eq!(
        sum_metric(&m, "keyproxy_requests_total", &["route=\"none\"", "4xx"]),
        1.0
    );
    assert_eq!(
        sum_metric(&m, "keyproxy_keys_injected_total", &["api"]),
        5.0,
        "4 requests + 1 replay"
    );
    assert_eq!(
        sum_metric(&m, "keyproxy_replays_attempted_total", &["api"]),
        1.0
    );
    assert_eq!(
        sum_metric(&m, "keyproxy_replays_succeeded_total", &["api"]),
        1.0
    );
    assert_eq!(
        sum_metric(&m, "keyproxy_upstream_duration_seconds_count", &["api"]),
        5.0
    );
    assert_eq!(
        sum_metric(&m, "keyproxy_secret_fetches_total", &["result=\"ok\""]),
        2.0
    );
    assert_eq!(sum_metric(&m, "keyproxy_secret_stale", &["api"]), 0.0);
    assert!(m.contains("keyproxy_secret_age_seconds{secret=\"api\",stage=\"AWSCURRENT\"}"));
    assert!(
        m.contains(&format!("version_id=\"{v2}\"")) && !m.contains(&format!("version_id=\"{v1}\""))
    );
    assert!(!m.contains("metric-key"), "a value in the metrics");

    let access: Vec<_> = kp
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "keyproxy::access")
        .collect();
    assert_eq!(access.len(), 5, "one access line per request");
    let replayed = access
        .iter()
        .find(|v| v["path"] == "/api/y")
        .expect("line for /api/y");
    assert_eq!(replayed["status"], 200);
    assert_eq!(replayed["replayed"], true);
    assert_eq!(replayed["route"], "api");
    assert!(replayed["latency_ms"].as_f64().is_some());
    assert!(
        !kp.logs().iter().any(|l| l.contains("app-query")),
        "the query string is not logged"
    );
    kp.assert_no_leak(&["metric-key-1", "metric-key-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_can_be_turned_off() {
    let moto = Moto::start();
    create_secret(&moto.client(), "api", "key-1").await;
    let up = Upstream::echo().await;
    let kp = KeyProxy::start(
        &format!("access_log = false\n{}", route(&up.url(), "")),
        &aws_env(&moto),
    );
    kp.wait_ready(Duration::from_secs(20)).await;
    http::get(&kp.url("/api/x")).await.expect("get");
    assert!(!kp.logs().iter().any(|l| l.contains("keyproxy::access")));
}
