//! Idle keep-alive HTTP/1.1 connections to one route's upstream, for the HTTP/1.1 engine.
//!
//! A route owns its pool ([`crate::routes::Route`]); the HTTP/1.1 engine checks connections out
//! and back in. LIFO, so the warmest connection is reused and idle ones age out; a connection the
//! upstream closed while idle is noticed from the reactor's readiness, at no syscall.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::RouteConfig;
use crate::error::ProxyError;
use crate::limits::POOL_IDLE;

/// Most idle upstream connections kept per route.
const POOL_MAX: usize = 1024;

/// A connection to an upstream: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Upstream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Upstream::Plain(s) => s,
            Upstream::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether an idle connection is still usable: nothing readable (no close, no stray bytes,
    /// no TLS alert). Uses the readiness the reactor already has, so a quiet connection costs no
    /// syscall.
    fn still_open(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.tcp().poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Anything arriving on an idle TLS connection ends it (close_notify, or junk).
            Poll::Ready(Ok(())) if matches!(self, Upstream::Tls(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.tcp().try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

impl tokio::io::AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Idle keep-alive HTTP/1.1 connections to one route's upstream.
#[derive(Debug)]
pub struct Pool {
    /// `host:port`, as `TcpStream::connect` takes it.
    addr: String,
    /// For `https://`: the connector (ALPN `http/1.1` only) and the name to verify.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    idle: Mutex<Vec<(Upstream, Instant)>>,
}

impl Pool {
    /// The fast path's pool for a route, if the route takes the fast path: a plain-http upstream,
    /// or an https one with `http2 = false`. `tls` offers only HTTP/1.1 by ALPN.
    pub fn for_route(route: &RouteConfig, tls: &Arc<rustls::ClientConfig>) -> Option<Pool> {
        let up = &route.upstream;
        let host = up.authority.host();
        let (tls, default_port) = if up.scheme == http::uri::Scheme::HTTP {
            (None, 80)
        } else if up.scheme == http::uri::Scheme::HTTPS && !route.http2 {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(bare.to_owned()).ok()?;
            (Some((tls.clone(), name)), 443)
        } else {
            return None;
        };
        let addr = match up.authority.port_u16() {
            Some(_) => up.authority.as_str().to_owned(),
            None => format!("{host}:{default_port}"),
        };
        Some(Pool {
            addr,
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The newest idle connection that is still open.
    pub fn checkout(&self) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < POOL_IDLE && conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request; drops the oldest one if it has idled too long.
    pub fn checkin(&self, conn: Upstream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle
            .first()
            .is_some_and(|(_, since)| since.elapsed() >= POOL_IDLE)
        {
            idle.remove(0);
        }
        if idle.len() < POOL_MAX {
            idle.push((conn, Instant::now()));
        }
    }

    /// A new connection (TCP, then TLS for https), within `timeout` in all.
    pub async fn connect(&self, timeout: Duration) -> Result<Upstream, ProxyError> {
        let connect = async {
            let tcp = TcpStream::connect(&self.addr).await.map_err(|e| {
                ProxyError::Unreachable(format!("cannot connect to {}: {e}", self.addr))
            })?;
            let _ = tcp.set_nodelay(true);
            let Some((config, name)) = &self.tls else {
                return Ok(Upstream::Plain(tcp));
            };
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
                ProxyError::Unreachable(crate::error::with_causes(
                    format!("TLS handshake with the upstream {} failed", self.addr),
                    Some(&e),
                ))
            })?;
            Ok(Upstream::Tls(Box::new(tls)))
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Unreachable(format!(
                "cannot connect to {}: no answer within {}",
                self.addr,
                humantime::format_duration(timeout)
            ))),
        }
    }
}
