//! HTTPS upstreams: rustls with a private CA (`ca_bundle`), HTTP/2 by ALPN, certificate failures.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio_rustls::rustls;

/// A private CA and a server certificate for localhost / 127.0.0.1 signed by it.
struct Pki {
    ca_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "keyproxy test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("ca key")).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    Pki {
        ca_pem: ca.pem(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    }
}

/// An HTTPS server offering `alpn`, answering with the HTTP version and the Authorization it saw.
async fn tls_upstream(
    pki: &Pki,
    alpn: &[&[u8]],
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![rustls::pki_types::CertificateDer::from(
            pki.cert_der.clone(),
        )],
        rustls::pki_types::PrivateKeyDer::Pkcs8(pki.key_der.clone().into()),
    )
    .expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let version = req.version();
                    let path = req.uri().path().to_owned();
                    let len = req
                        .into_body()
                        .collect()
                        .await
                        .map_or(0, |b| b.to_bytes().len());
                    let mut body = format!("{version:?} {path} {auth}");
                    if len > 0 {
                        body.push_str(&format!(" {len} bytes"));
                    }
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// The private CA's certificate in a scratch file, for `ca_bundle`.
fn ca_file(pki: &Pki) -> std::path::PathBuf {
    let ca = scratch("tls-ca").join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).expect("write ca");
    ca
}

fn config(upstream: &str, ca_bundle: Option<&std::path::Path>, extra: &str) -> String {
    let ca = ca_bundle
        .map(|p| format!("ca_bundle = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        "{ca}[source]\ntype = \"file\"\npath = \"{}\"\n[[route]]\nname = \"tls\"\npath_prefix = \"/tls\"\nupstream = \"{upstream}\"\nsecret_id = \"api\"\n{extra}\n",
        "SECRETS"
    )
}

fn start(upstream: &str, ca_bundle: Option<&std::path::Path>, extra: &str) -> KeyProxy {
    let dir = scratch("tls");
    let secrets = dir.join("secrets.json");
    std::fs::write(&secrets, r#"{"api": "tls-key-1"}"#).expect("write");
    KeyProxy::start(
        &config(upstream, ca_bundle, extra).replace("SECRETS", &secrets.display().to_string()),
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_private_ca_speaks_http2_when_offered() {
    let pki = pki();
    let ca = ca_file(&pki);
    let (addr, _task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let kp = start(
        &format!("https://localhost:{}", addr.port()),
        Some(&ca),
        "http2 = true",
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let r = http::get(&kp.url("/tls/v1/ping")).await.expect("get");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "HTTP/2.0 /v1/ping Bearer tls-key-1");
    // Several requests share the pooled connection.
    for _ in 0..5 {
        assert_eq!(http::get(&kp.url("/tls/x")).await.expect("get").status, 200);
    }
    kp.assert_no_leak(&["tls-key-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_offering_only_http1_gets_http1() {
    let pki = pki();
    let ca = ca_file(&pki);
    let (addr, _task) = tls_upstream(&pki, &[b"http/1.1"]).await;
    let kp = start(&format!("https://127.0.0.1:{}", addr.port()), Some(&ca), "");
    kp.wait_ready(Duration::from_secs(10)).await;
    let r = http::get(&kp.url("/tls/a")).await.expect("get");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "HTTP/1.1 /a Bearer tls-key-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_is_a_502_naming_the_cause() {
    let pki = pki();
    let (addr, _task) = tls_upstream(&pki, &[b"http/1.1"]).await;
    // No ca_bundle: the private CA is not trusted.
    let kp = start(&format!("https://localhost:{}", addr.port()), None, "");
    kp.wait_ready(Duration::from_secs(10)).await;
    let r = http::get(&kp.url("/tls/a")).await.expect("get");
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["x-keyproxy-error"], "upstream_unreachable");
    let msg = r.json()["message"]
        .as_str()
        .expect("message")
        .to_lowercase();
    assert!(msg.contains("certificate"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_false_speaks_http1_over_tls_on_the_fast_path() {
    let pki = pki();
    let ca = ca_file(&pki);
    // The upstream prefers HTTP/2; with `http2 = false` keyproxy offers only HTTP/1.1.
    let (addr, _task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let kp = start(
        &format!("https://localhost:{}", addr.port()),
        Some(&ca),
        "http2 = false",
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    for i in 0..5 {
        let r = http::get(&kp.url(&format!("/tls/v1/n{i}")))
            .await
            .expect("get");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("HTTP/1.1 /v1/n{i} Bearer tls-key-1"));
    }
    // Bodies of every size go through whole, the large one streamed after its head.
    for size in [10usize, 100_000, 3_000_000] {
        let r = http::send("POST", &kp.url("/tls/upload"), &[], "x".repeat(size))
            .await
            .expect("post");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.text(),
            format!("HTTP/1.1 /upload Bearer tls-key-1 {size} bytes")
        );
    }
    kp.assert_no_leak(&["tls-key-1"]);

    // Untrusted: the same 502 naming the certificate as on the general path.
    let kp = start(
        &format!("https://localhost:{}", addr.port()),
        None,
        "http2 = false",
    );
    kp.wait_ready(Duration::from_secs(10)).await;
    let r = http::get(&kp.url("/tls/a")).await.expect("get");
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["x-keyproxy-error"], "upstream_unreachable");
    let msg = r.json()["message"]
        .as_str()
        .expect("message")
        .to_lowercase();
    assert!(msg.contains("tls") && msg.contains("certificate"), "{msg}");
}
