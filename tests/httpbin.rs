//! keyproxy in front of a real third-party HTTP server: httpbin (installed by `scripts/test`).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;

/// httpbin on 127.0.0.1, on a port it bound itself; killed on drop.
struct Httpbin(Served);

impl Httpbin {
    fn start() -> Httpbin {
        let python = std::env::var("HTTPBIN_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "httpbin.core", "--host", "127.0.0.1", "--port", "0"]);
        Httpbin(Served::start(cmd, &format!("httpbin ({python})"), 0))
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.0.port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpbin_sees_the_key_in_header_and_query_and_streams_flow() {
    let hb = Httpbin::start();
    let config = file_source(&[("hb", "httpbin-key-7"), ("hq", "query-key-8")])
        + &route("hb", "/hb", &hb.url(), "hb", "")
        + &route("hq", "/hq", &hb.url(), "hq", "query_param = \"api_key\"");
    let kp = KeyProxy::start(&config, &[]);
    kp.wait_ready(Duration::from_secs(10)).await;

    // /bearer: httpbin checks the bearer token.
    let r = http::get(&kp.url("/hb/bearer")).await.expect("bearer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["authenticated"], true);
    assert_eq!(r.json()["token"], "httpbin-key-7");

    // /headers: the app's own Authorization is replaced; Host is httpbin's.
    let r = http::send(
        "GET",
        &kp.url("/hb/headers"),
        &[("authorization", "Bearer app-own")],
        "",
    )
    .await
    .expect("headers");
    let h = &r.json()["headers"];
    assert_eq!(h["Authorization"], "Bearer httpbin-key-7");
    assert_eq!(h["Host"], format!("127.0.0.1:{}", hb.0.port));

    // /get with a query key: the app's own api_key is replaced.
    let r = http::get(&kp.url("/hq/get?x=1&api_key=app-own"))
        .await
        .expect("get");
    assert_eq!(r.json()["args"]["x"], "1");
    assert_eq!(r.json()["args"]["api_key"], "query-key-8");

    // POST body arrives intact.
    let r = http::send(
        "POST",
        &kp.url("/hb/post"),
        &[("content-type", "application/json")],
        r#"{"a":[1,2,3]}"#,
    )
    .await
    .expect("post");
    assert_eq!(r.json()["json"]["a"][2], 3);

    // /status/401: the API's own 401 passes through (no newer key to replay with).
    let r = http::get(&kp.url("/hb/status/401")).await.expect("401");
    assert_eq!(r.status, 401);
    assert!(r.headers.get("x-keyproxy-error").is_none());

    // /stream/5: five JSON lines.
    let r = http::get(&kp.url("/hb/stream/5")).await.expect("stream");
    assert_eq!(r.text().lines().count(), 5);

    // /drip: 4 bytes over ~1.2 s arrive as they are sent, not all at the end.
    let req = hyper::Request::get(kp.url("/hb/drip?duration=1.2&numbytes=4&delay=0"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("req");
    let start = Instant::now();
    let resp = http::client().request(req).await.expect("drip");
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.expect("frame").into_data() {
            arrivals.push((start.elapsed(), d.len()));
        }
    }
    assert_eq!(arrivals.iter().map(|a| a.1).sum::<usize>(), 4);
    assert!(arrivals.len() >= 3, "drip was buffered: {arrivals:?}");
    assert!(arrivals[0].0 < Duration::from_millis(700), "{arrivals:?}");
    kp.assert_no_leak(&["httpbin-key-7", "query-key-8"]);
}
