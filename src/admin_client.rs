//! A minimal HTTP/1.1 client for `keyproxy health` (GET) and `keyproxy refresh` (POST), over TCP
//! or a Unix socket: the image has no curl or shell.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::config::Listen;
use crate::listener::Stream;

/// Why the check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection or protocol failure.
    #[error("{0}")]
    Failed(String),
}

/// GETs `path` from `addr` (`IP:port` or a Unix socket); returns the status and body.
/// `0.0.0.0` / `::` mean loopback.
pub async fn get(
    addr: &Listen,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), CheckError> {
    request(http::Method::GET, addr, path, timeout).await
}

/// POSTs an empty body to `path` on `addr`; returns the status and body.
pub async fn post(
    addr: &Listen,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), CheckError> {
    request(http::Method::POST, addr, path, timeout).await
}

/// Sends `method path` without a body to `addr`; returns the status and body.
async fn request(
    method: http::Method,
    addr: &Listen,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), CheckError> {
    let fut = async move {
        let fail = |e: &dyn std::fmt::Display| CheckError::Failed(format!("{addr}: {e}"));
        let (stream, host) = match addr {
            Listen::Tcp(a) => {
                let mut a = *a;
                if a.ip().is_unspecified() {
                    a.set_ip(if a.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                let s = tokio::net::TcpStream::connect(a)
                    .await
                    .map_err(|e| fail(&e))?;
                (Stream::Tcp(s), a.to_string())
            }
            Listen::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| fail(&e))?;
                (Stream::Unix(s), "localhost".to_owned())
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(&e))?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| fail(&e))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(&e))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| CheckError::Timeout(timeout))?
}
