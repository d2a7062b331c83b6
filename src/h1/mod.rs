//! The HTTP/1.1 fast path: keep-alive requests relayed as bytes.
//!
//! The common request (HTTP/1.1, origin-form, a `Content-Length` body or none) to a route whose
//! upstream speaks HTTP/1.1 (`http://`, or `https://` with `http2 = false`) is served here
//! without building a `Request`, a `HeaderMap` or a body type: the head is parsed in place with
//! `httparse`, rewritten into the upstream head in one buffer (hop-by-hop headers dropped,
//! `Host` set, the key added), and the answer is relayed with its own framing
//! (`Content-Length`, chunked, or until close) through one reusable buffer. Upstream connections
//! come from a per-route pool. The result is about half the CPU per request of the general
//! path, and a bounded buffer per connection whatever the response size.
//!
//! Everything else is handed to hyper ([`crate::proxy`]) for the rest of the connection, with
//! the bytes read so far: HTTP/1.0, HTTP/2, `Transfer-Encoding` or `Expect` or `Upgrade` in the
//! request, a `Connection` header naming other headers, `CONNECT`, absolute-form targets, target
//! bytes outside RFC 3986's set, routes whose upstream may speak HTTP/2, and every request the
//! proxy answers itself before forwarding (no route, a bad path, a missing app token, no key
//! yet), so those answers come from one place. Both paths apply the same rules.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Sleep;

use rustls::pki_types::ServerName;

use crate::cache::Loaded;
use crate::config::RouteConfig;
use crate::error::ProxyError;
use crate::forward::is_hop_by_hop;
use crate::inject::{set_query, Credential, Injection};
use crate::proxy::{Proxy, Route};
use crate::route::check_path;

mod chunked;
use crate::limits::{HEAD_TIMEOUT, LINGER, LINGER_BYTES, MAX_HEADERS, MAX_HEADER_BYTES, POOL_IDLE};

/// Most idle upstream connections kept per route.
const POOL_MAX: usize = 1024;
/// Request bodies up to this size are read before sending even without `retry_on_401`.
const SMALL_BODY: u64 = 64 * 1024;
/// Bytes read at a time while relaying a body: the upstream buffer grows to this once and is
/// kept. 512 connections relaying 1 MiB responses peaked at 65 MiB RSS with 64 KiB buffers
/// released after each response, 50 MiB with 32 KiB ones kept, 44 MiB with the head copy
/// below capped at 4 KiB.
const RELAY_CHUNK: usize = 32 * 1024;
/// The first size of the upstream buffer, and the most an idle connection keeps of the app one.
const KEEP_BUF: usize = 16 * 1024;
/// A body copied behind its head, for one `write`, when at most this long (the head buffer is
/// kept per connection, so it stays small).
const COALESCE: usize = 4 * 1024;

/// The shutdown signal shared by every app connection.
#[derive(Debug, Default)]
pub struct Drain {
    started: AtomicBool,
    notify: Notify,
}

impl Drain {
    /// Starts draining: idle connections close now, busy ones after their current response.
    pub fn start(&self) {
        self.started.store(true, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    /// Whether draining has started.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// Resolves once draining starts (immediately if it has).
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        if self.started() {
            return;
        }
        notified.await;
    }
}

/// A connection to an upstream: plain TCP, or TLS over it.
#[derive(Debug)]
enum Upstream {
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
    fn checkout(&self) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < POOL_IDLE && conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request; drops the oldest one if it has idled too long.
    fn checkin(&self, conn: Upstream) {
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
    async fn connect(&self, timeout: Duration) -> Result<Upstream, ProxyError> {
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

/// How an app connection ended on the fast path.
#[derive(Debug)]
pub enum Served {
    /// Closed (by either side, or after an error that ends the connection).
    Closed,
    /// A request the fast path does not take: hyper serves the rest of the connection, starting
    /// with these bytes already read from it.
    Handoff(TcpStream, Bytes),
}

/// An app connection handed to hyper: the bytes the fast path already read come first.
#[derive(Debug)]
pub struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl Rewind {
    /// `inner`, with `prefix` read before anything still in the socket.
    pub fn new(inner: TcpStream, prefix: Bytes) -> Rewind {
        Rewind { prefix, inner }
    }
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A deadline that costs a timer-wheel update only when it fires or moves earlier; moving it
/// later (once per request) just stores an `Instant`.
struct Deadline {
    sleep: Option<Pin<Box<Sleep>>>,
    at: Instant,
}

impl Deadline {
    fn new() -> Deadline {
        Deadline {
            sleep: None,
            at: Instant::now(),
        }
    }

    fn set(&mut self, at: Instant) {
        self.at = at;
        if let Some(s) = &mut self.sleep {
            if s.deadline().into_std() > at {
                s.as_mut().reset(at.into());
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(self.at.into());
        }
    }
}

/// `fut`, or `Err(())` once `deadline` passes.
async fn timed<F: Future>(deadline: &mut Deadline, fut: F) -> Result<F::Output, ()> {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        deadline.poll(cx).map(|()| Err(()))
    })
    .await
}

/// What the parsed head of an app request says to do.
enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// Not for the fast path.
    Handoff,
    /// Forward it.
    Forward(Plan),
}

/// A request the fast path forwards.
struct Plan {
    head_len: usize,
    route: usize,
    loaded: Arc<Loaded>,
    /// Declared body length (0: none).
    length: u64,
    has_length: bool,
    close: bool,
    head_method: bool,
    idempotent: bool,
}

/// How the upstream's response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed upstream response head (the app's head is already in `out`).
struct RespHead {
    len: usize,
    status: u16,
    framing: Framing,
    keep_alive: bool,
}

/// An upstream response whose head has been read.
struct Answer {
    conn: Upstream,
    head: RespHead,
    /// The whole request body reached the upstream (else its connection cannot be reused).
    body_sent: bool,
    /// The app is still sending a request body that was not forwarded.
    app_unread: bool,
}

/// The request body as the fast path sends it.
enum ReqBody {
    /// All of it, in memory (sendable twice).
    Full(Bytes),
    /// What was read so far, and how many more bytes the app still sends.
    Streamed(Bytes, u64),
}

/// One app connection on the fast path.
struct Conn<'p> {
    proxy: &'p Proxy,
    app: TcpStream,
    /// Bytes read from the app and not yet used.
    buf: BytesMut,
    /// Bytes read from the upstream.
    up: BytesMut,
    /// The head being written (upstream request or app response).
    out: Vec<u8>,
    /// The app's end-to-end headers, as forwarded.
    hdrs: Vec<u8>,
    method: Vec<u8>,
    /// The request path (for the upstream: from `strip` on).
    path: Vec<u8>,
    strip: usize,
    /// The query string without `?`, if the target had one.
    query: Option<Vec<u8>>,
    deadline: Deadline,
}

/// Serves `app` on the fast path until it closes or a request needs the general path.
pub async fn serve(proxy: &Proxy, app: TcpStream, drain: &Drain) -> Served {
    let mut conn = Conn {
        proxy,
        app,
        buf: BytesMut::new(),
        up: BytesMut::new(),
        out: Vec::with_capacity(1024),
        hdrs: Vec::with_capacity(512),
        method: Vec::with_capacity(16),
        path: Vec::with_capacity(128),
        strip: 0,
        query: None,
        deadline: Deadline::new(),
    };
    let mut drained = pin!(drain.wait());
    loop {
        let plan = match conn.next_request(drain, drained.as_mut()).await {
            Ok(plan) => plan,
            Err(Step::Handoff) => return Served::Handoff(conn.app, conn.buf.freeze()),
            Err(Step::Close | Step::Next | Step::Linger) => return Served::Closed,
        };
        match conn.exchange(plan, drain).await {
            Step::Next => {}
            Step::Close => return Served::Closed,
            Step::Linger => {
                conn.linger().await;
                return Served::Closed;
            }
            Step::Handoff => return Served::Handoff(conn.app, conn.buf.freeze()),
        }
    }
}

/// What to do after a request.
enum Step {
    Next,
    Close,
    /// Close once the app's unread request body has been drained for a while.
    Linger,
    Handoff,
}

impl Conn<'_> {
    /// Reads until a whole request head is buffered and planned.
    async fn next_request(
        &mut self,
        drain: &Drain,
        mut drained: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Plan, Step> {
        let mut waiting = false;
        loop {
            if !self.buf.is_empty() {
                match self.plan() {
                    Parsed::Forward(plan) => return Ok(plan),
                    Parsed::Handoff => return Err(Step::Handoff),
                    Parsed::Partial if self.buf.len() >= MAX_HEADER_BYTES => {
                        return Err(Step::Handoff)
                    }
                    Parsed::Partial => {}
                }
            } else if drain.started() {
                return Err(Step::Close);
            }
            if !waiting {
                waiting = true;
                self.deadline.set(Instant::now() + HEAD_TIMEOUT);
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(8 * 1024);
            }
            let idle = self.buf.is_empty();
            let (app, buf, deadline) = (&mut self.app, &mut self.buf, &mut self.deadline);
            let mut read = pin!(app.read_buf(buf));
            let got = poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(r.ok());
                }
                if idle && drained.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                deadline.poll(cx).map(|()| None)
            })
            .await;
            match got {
                Some(n) if n > 0 => {}
                // EOF, a read error, the head timeout, or draining while idle.
                _ => return Err(Step::Close),
            }
        }
    }

    /// Parses the buffered head and decides whether and how the fast path forwards it.
    fn plan(&mut self) -> Parsed {
        let proxy = self.proxy;
        let mut storage = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(&self.buf, &mut storage) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Handoff,
        };
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return Parsed::Handoff;
        };
        if method == "CONNECT" || !target.starts_with('/') || !target.bytes().all(target_byte) {
            return Parsed::Handoff;
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let Some(m) = proxy.router.by_path(path) else {
            return Parsed::Handoff;
        };
        let strip = path.len() - m.rest.len();
        let route = &proxy.routes[m.route];
        if proxy.pools[m.route].is_none() || check_path(path).is_err() {
            return Parsed::Handoff;
        }
        let Some(loaded) = route.slot.entry.current() else {
            return Parsed::Handoff;
        };
        if route.slot.credential(&loaded).is_none() {
            return Parsed::Handoff;
        }
        let injected = match &route.config.injection {
            Injection::Header { name, .. } => Some(name.as_str()),
            Injection::Query { .. } => None,
        };
        let app_auth = proxy.app_auth.as_ref();
        let mut token_ok = app_auth.is_none();
        let mut token_seen = false;
        let mut length: Option<u64> = None;
        let mut close = false;
        let mut hosts = 0;
        self.hdrs.clear();
        for h in req.headers.iter() {
            let name = h.name;
            if let Some(auth) = app_auth {
                if name.eq_ignore_ascii_case(auth.header.as_str()) {
                    if !token_seen {
                        token_seen = true;
                        token_ok = bool::from(h.value.ct_eq(auth.token.expose().as_bytes()));
                    }
                    continue;
                }
            }
            match request_header(name) {
                Header::Forward => {}
                Header::Host => {
                    hosts += 1;
                    continue;
                }
                Header::Drop => continue,
                Header::Refuse => return Parsed::Handoff,
                Header::ContentLength => {
                    match (length, parse_length(h.value)) {
                        (None, Some(n)) => length = Some(n),
                        _ => return Parsed::Handoff,
                    }
                    continue;
                }
                Header::Connection => {
                    for token in h.value.split(|&b| b == b',') {
                        let token = token.trim_ascii();
                        if token.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                            // It names headers to drop: the general path handles that.
                            return Parsed::Handoff;
                        }
                    }
                    continue;
                }
            }
            if injected.is_some_and(|inj| name.eq_ignore_ascii_case(inj)) {
                continue;
            }
            self.hdrs.extend_from_slice(name.as_bytes());
            self.hdrs.extend_from_slice(b": ");
            self.hdrs.extend_from_slice(h.value);
            self.hdrs.extend_from_slice(b"\r\n");
        }
        // No `Host`, or several: the general path answers 400 (RFC 9112 §3.2).
        if !token_ok || hosts != 1 {
            return Parsed::Handoff;
        }
        self.method.clear();
        self.method.extend_from_slice(method.as_bytes());
        self.path.clear();
        self.path.extend_from_slice(path.as_bytes());
        self.strip = strip;
        match query {
            Some(q) => {
                let mut v = self.query.take().unwrap_or_default();
                v.clear();
                v.extend_from_slice(q.as_bytes());
                self.query = Some(v);
            }
            None => self.query = None,
        }
        Parsed::Forward(Plan {
            head_len,
            route: m.route,
            loaded,
            length: length.unwrap_or(0),
            has_length: length.is_some(),
            close,
            head_method: method == "HEAD",
            idempotent: matches!(
                method,
                "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
            ),
        })
    }

    /// Forwards one planned request and relays the answer.
    async fn exchange(&mut self, plan: Plan, drain: &Drain) -> Step {
        let proxy = self.proxy;
        let route = &proxy.routes[plan.route];
        let start = Instant::now();
        self.buf.advance(plan.head_len);

        // The body: in memory when small or replayable, else streamed after the head.
        let replay_cap = if route.config.retry_on_401 {
            route.config.max_replay_body.max(SMALL_BODY)
        } else {
            SMALL_BODY
        };
        let body = if plan.length == 0 {
            ReqBody::Full(Bytes::new())
        } else if plan.length <= replay_cap {
            let want = plan.length as usize;
            if self.buf.len() < want {
                self.buf.reserve(want - self.buf.len());
            }
            while self.buf.len() < want {
                match self.app.read_buf(&mut self.buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return Step::Close,
                }
            }
            ReqBody::Full(self.buf.split_to(want).freeze())
        } else {
            let have = self.buf.len().min(plan.length as usize);
            let prefix = self.buf.split_to(have).freeze();
            ReqBody::Streamed(prefix, plan.length - have as u64)
        };
        let replayable = route.config.retry_on_401
            && plan.length <= route.config.max_replay_body
            && matches!(body, ReqBody::Full(_));

        let mut replayed = false;
        let mut loaded = plan.loaded.clone();
        let result = loop {
            let answer = match self.send(route, &plan, &loaded, &body, drain).await {
                Ok(a) => a,
                Err(e) => break Err(e),
            };
            if answer.head.status == 401 && replayable && !replayed {
                if let Some(fresh) = proxy.fresher(route, &loaded).await {
                    // The 401's connection is dropped with its unread body.
                    drop(answer);
                    self.up.clear();
                    replayed = true;
                    route.metrics.replays_attempted.inc();
                    loaded = fresh;
                    continue;
                }
            }
            if replayed && answer.head.status != 401 {
                route.metrics.replays_succeeded.inc();
            }
            break Ok(answer);
        };

        let relayed = match result {
            Ok(answer) => {
                let status = answer.head.status;
                let close = plan.close
                    || drain.started()
                    || answer.head.framing == Framing::UntilClose
                    || answer.app_unread;
                self.relay(plan.route, answer, close)
                    .await
                    .map(|step| (status, step))
            }
            Err(e) => Err(e),
        };
        let (status, step) = match relayed {
            Ok(done) => done,
            Err(e) => {
                route.metrics.error(e.kind());
                tracing::warn!(route = route.config.name.as_str(),
                    method = %String::from_utf8_lossy(&self.method),
                    path = %String::from_utf8_lossy(&self.path),
                    kind = e.kind(), error = %e, "request failed");
                // A request body the app is still sending cannot be skipped: close after.
                let unread = matches!(body, ReqBody::Streamed(_, left) if left > 0);
                let close = plan.close || drain.started() || unread;
                let bytes = e.http1(Some(&route.config.name), close);
                let step = match self.app.write_all(&bytes).await {
                    Ok(()) if !close => Step::Next,
                    Ok(()) if unread => Step::Linger,
                    _ => Step::Close,
                };
                (e.status().as_u16(), step)
            }
        };
        route.metrics.answered(status);
        if proxy.access_log {
            tracing::info!(target: "keyproxy::access", route = route.config.name.as_str(),
                method = %String::from_utf8_lossy(&self.method),
                path = %String::from_utf8_lossy(&self.path), status,
                latency_ms = start.elapsed().as_secs_f64() * 1000.0, replayed);
        }
        if self.buf.capacity() > KEEP_BUF && self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        // Re-encoded chunked bodies pass through `out`: keep only a head's worth of it.
        if self.out.capacity() > 2 * COALESCE {
            self.out = Vec::with_capacity(1024);
        }
        step
    }

    /// Sends the request (on a pooled connection, or a new one) and reads the response head.
    async fn send(
        &mut self,
        route: &Route,
        plan: &Plan,
        loaded: &Loaded,
        body: &ReqBody,
        drain: &Drain,
    ) -> Result<Answer, ProxyError> {
        let pool = self.proxy.pools[plan.route]
            .as_ref()
            .ok_or_else(|| ProxyError::BadRequest("no plain-http pool for this route".into()))?;
        let cred = route
            .slot
            .credential(loaded)
            .ok_or_else(|| ProxyError::NoKey("no credential rendered for this route".into()))?;
        self.request_head(route, plan, cred, body);
        route.metrics.injected.inc();
        let timeout = route.config.timeout;
        let start = Instant::now();
        self.deadline.set(start + timeout);
        let mut fresh_only = false;
        let result = loop {
            let pooled = if fresh_only { None } else { pool.checkout() };
            let (mut conn, reused) = match pooled {
                Some(c) => (c, true),
                None => match timed(&mut self.deadline, pool.connect(self.proxy.connect_timeout))
                    .await
                {
                    Ok(Ok(c)) => (c, false),
                    Ok(Err(e)) => break Err(e),
                    Err(()) => break Err(timeout_error(timeout)),
                },
            };
            self.up.clear();
            match self.round_trip(&mut conn, plan, body, drain).await {
                Ok((head, sent)) => {
                    break Ok(Answer {
                        conn,
                        head,
                        body_sent: sent == Sent::All,
                        app_unread: matches!(sent, Sent::Early { app_unread: true }),
                    })
                }
                // A pooled connection the upstream closed before answering: once more on a new
                // one, when the request can be sent again and is safe to repeat.
                Err(Failure::Io(_))
                    if reused
                        && self.up.is_empty()
                        && plan.idempotent
                        && matches!(body, ReqBody::Full(_)) =>
                {
                    fresh_only = true;
                }
                Err(Failure::Io(e)) => {
                    break Err(ProxyError::Unreachable(format!(
                        "the connection failed: {e}"
                    )))
                }
                Err(Failure::Timeout) => break Err(timeout_error(timeout)),
                Err(Failure::Proxy(e)) => break Err(e),
            }
        };
        route
            .metrics
            .upstream_seconds
            .observe(start.elapsed().as_secs_f64());
        result
    }

    /// Writes the upstream request head (in `out`) and body, then reads the response head.
    async fn round_trip(
        &mut self,
        conn: &mut Upstream,
        plan: &Plan,
        body: &ReqBody,
        drain: &Drain,
    ) -> Result<(RespHead, Sent), Failure> {
        let head_len = self.out.len();
        let mut sent = Sent::All;
        match body {
            ReqBody::Full(b) if b.len() <= COALESCE => {
                self.out.extend_from_slice(b);
                let r = timed(&mut self.deadline, conn.write_all(&self.out)).await;
                self.out.truncate(head_len);
                r.map_err(|()| Failure::Timeout)??;
            }
            _ => {
                timed(&mut self.deadline, conn.write_all(&self.out))
                    .await
                    .map_err(|()| Failure::Timeout)??;
                sent = self.send_body(conn, body, plan.head_method).await?;
            }
        }
        if let Sent::WriteFailed(e, app_unread) = sent {
            // The upstream stopped taking the body: it may have answered (413, 401) and closed.
            return match self.read_head(conn, plan, drain, app_unread).await {
                Ok(head) => Ok((head, Sent::Early { app_unread })),
                Err(Failure::Io(_)) => Err(Failure::Io(e)),
                Err(other) => Err(other),
            };
        }
        if sent == Sent::All {
            // TLS may hold the last records back until flushed (plain TCP: nothing to do).
            timed(&mut self.deadline, conn.flush())
                .await
                .map_err(|()| Failure::Timeout)??;
        }
        let app_unread = matches!(sent, Sent::Early { app_unread: true });
        let head = self.read_head(conn, plan, drain, app_unread).await?;
        Ok((head, sent))
    }

    /// Sends a request body that does not go out with its head, watching the upstream all the
    /// while: an upstream may answer before it has the whole body (401, 413), and then may stop
    /// reading. Its answer ends the sending at once (nginx and Pingora do the same), instead of a
    /// write that blocks until the timeout or fails on a closed connection.
    async fn send_body(
        &mut self,
        conn: &mut Upstream,
        body: &ReqBody,
        head_method: bool,
    ) -> Result<Sent, Failure> {
        let (mut mem, mut left): (&[u8], u64) = match body {
            ReqBody::Full(b) => (b, 0),
            ReqBody::Streamed(prefix, left) => (prefix, *left),
        };
        let (app, buf, up, out, deadline) = (
            &mut self.app,
            &mut self.buf,
            &mut self.up,
            &mut self.out,
            &mut self.deadline,
        );
        // Bytes at the front of `buf` that belong to the body and are not sent yet.
        let mut pending = 0usize;
        poll_fn(|cx| loop {
            if up.capacity() - up.len() < 2048 {
                up.reserve(KEEP_BUF);
            }
            match pin!(conn.read_buf(up)).poll(cx) {
                // The upstream closed: the head reader tells what it sent, if anything.
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Ok(Sent::Early {
                        app_unread: left > 0,
                    }))
                }
                Poll::Ready(Ok(_)) => match final_head_ready(up, out, head_method) {
                    Ok(true) => {
                        return Poll::Ready(Ok(Sent::Early {
                            app_unread: left > 0,
                        }))
                    }
                    Ok(false) => continue,
                    Err(e) => return Poll::Ready(Err(Failure::Proxy(e))),
                },
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Io(e))),
                Poll::Pending => {}
            }
            let chunk: &[u8] = if !mem.is_empty() {
                mem
            } else if pending > 0 {
                &buf[..pending]
            } else if left > 0 {
                if buf.capacity() - buf.len() < RELAY_CHUNK / 2 {
                    buf.reserve(RELAY_CHUNK);
                }
                match pin!(app.read_buf(buf)).poll(cx) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        pending = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                        continue;
                    }
                    Poll::Ready(_) => {
                        return Poll::Ready(Err(Failure::Proxy(ProxyError::BadRequest(
                            "the app closed the connection before the end of the request body"
                                .into(),
                        ))))
                    }
                    Poll::Pending => return deadline.poll(cx).map(|()| Err(Failure::Timeout)),
                }
            } else {
                return Poll::Ready(Ok(Sent::All));
            };
            match pin!(conn.write(chunk)).poll(cx) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    if !mem.is_empty() {
                        mem = &mem[n..];
                    } else {
                        buf.advance(n);
                        pending -= n;
                        left -= n as u64;
                    }
                }
                Poll::Ready(Ok(_)) => {
                    return Poll::Ready(Ok(Sent::WriteFailed(
                        io::ErrorKind::WriteZero.into(),
                        left > 0,
                    )))
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Ok(Sent::WriteFailed(e, left > 0))),
                Poll::Pending => return deadline.poll(cx).map(|()| Err(Failure::Timeout)),
            }
        })
        .await
    }

    /// Reads the upstream's response head (after any 1xx) into `up`, and writes the app's head
    /// into `out`. `app_unread`: the app is still sending a body that was not forwarded, so its
    /// connection closes after the answer.
    async fn read_head(
        &mut self,
        conn: &mut Upstream,
        plan: &Plan,
        drain: &Drain,
        app_unread: bool,
    ) -> Result<RespHead, Failure> {
        loop {
            let close = plan.close || drain.started() || app_unread;
            while !self.up.is_empty() {
                match response_head(&self.up, &mut self.out, plan.head_method, close)
                    .map_err(Failure::Proxy)?
                {
                    None if self.up.len() >= MAX_HEADER_BYTES => {
                        return Err(Failure::Proxy(ProxyError::Unreachable(
                            "the upstream's response head is too large".into(),
                        )))
                    }
                    None => break,
                    // 1xx (other than 101): informational, not relayed.
                    Some(h) if (100..200).contains(&h.status) && h.status != 101 => {
                        self.up.advance(h.len);
                    }
                    Some(h) if h.status == 101 => {
                        return Err(Failure::Proxy(ProxyError::Unreachable(
                            "the upstream switched protocols without being asked".into(),
                        )))
                    }
                    Some(h) => return Ok(h),
                }
            }
            if self.up.capacity() - self.up.len() < 2048 {
                self.up.reserve(KEEP_BUF);
            }
            let n = timed(&mut self.deadline, conn.read_buf(&mut self.up))
                .await
                .map_err(|()| Failure::Timeout)??;
            if n == 0 {
                return Err(Failure::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before answering",
                )));
            }
        }
    }

    /// Writes the upstream request head for `cred` into `out`.
    fn request_head(&mut self, route: &Route, plan: &Plan, cred: &Credential, body: &ReqBody) {
        let up = &route.config.upstream;
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(&self.method);
        out.push(b' ');
        let rest = &self.path[self.strip..];
        out.extend_from_slice(up.base_path.as_bytes());
        out.extend_from_slice(rest);
        if up.base_path.is_empty() && rest.is_empty() {
            out.push(b'/');
        }
        match (cred, &route.config.injection) {
            (Credential::Query(pair), Injection::Query { param, .. }) => {
                let query = self
                    .query
                    .as_deref()
                    .map(|q| std::str::from_utf8(q).unwrap_or(""));
                out.push(b'?');
                out.extend_from_slice(set_query(query, param, pair).as_bytes());
            }
            _ => {
                if let Some(q) = &self.query {
                    out.push(b'?');
                    out.extend_from_slice(q);
                }
            }
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(up.host_header.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.hdrs);
        let length = match body {
            ReqBody::Full(b) => b.len() as u64,
            ReqBody::Streamed(prefix, left) => prefix.len() as u64 + left,
        };
        if plan.has_length || length > 0 {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, length);
            out.extend_from_slice(b"\r\n");
        }
        if let (Credential::Header(v), Injection::Header { name, .. }) =
            (cred, &route.config.injection)
        {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Relays the response (head in `out`, first bytes in `up`) to the app; pools the upstream
    /// connection when the response ended cleanly on it. `Err`: nothing was sent to the app yet,
    /// and the response is unusable.
    async fn relay(
        &mut self,
        route_index: usize,
        answer: Answer,
        close: bool,
    ) -> Result<Step, ProxyError> {
        let Answer {
            mut conn,
            head,
            body_sent,
            app_unread,
        } = answer;
        let route = &self.proxy.routes[route_index];
        self.up.advance(head.len);
        let idle = route.config.idle_timeout;
        let reusable = match head.framing {
            Framing::Empty => {
                if self.app.write_all(&self.out).await.is_err() {
                    return Ok(Step::Close);
                }
                self.up.is_empty()
            }
            Framing::Length(n) => {
                let take = self.up.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                if take <= COALESCE {
                    self.out.extend_from_slice(&self.up[..take]);
                    if self.app.write_all(&self.out).await.is_err() {
                        return Ok(Step::Close);
                    }
                } else if self.app.write_all(&self.out).await.is_err()
                    || self.app.write_all(&self.up[..take]).await.is_err()
                {
                    return Ok(Step::Close);
                }
                self.up.advance(take);
                let mut left = n - take as u64;
                let mut clean = self.up.is_empty();
                while left > 0 {
                    let Some(got) = self.read_body(&mut conn, idle).await else {
                        return Ok(Step::Close);
                    };
                    let take = got.min(usize::try_from(left).unwrap_or(usize::MAX));
                    if self.app.write_all(&self.up[..take]).await.is_err() {
                        return Ok(Step::Close);
                    }
                    clean = got == take;
                    left -= take as u64;
                }
                clean
            }
            Framing::Chunked => {
                // Decoded and written anew: the app never receives the upstream's framing.
                let mut decoder = chunked::Decoder::default();
                let mut first = true;
                loop {
                    if !first {
                        self.out.clear();
                    }
                    let at = chunked::begin_chunk(&mut self.out);
                    let end = match decoder.decode(&self.up, &mut self.out) {
                        Ok(end) => end,
                        Err(e) if first => {
                            return Err(ProxyError::Unreachable(format!(
                                "the upstream sent a malformed chunked body: {e}"
                            )))
                        }
                        Err(e) => {
                            // The app has part of the body: it must not see an end.
                            tracing::warn!(route = route.config.name.as_str(), error = %e,
                                "the upstream sent a malformed chunked body; closing the connection");
                            return Ok(Step::Close);
                        }
                    };
                    chunked::end_chunk(&mut self.out, at, end.is_some());
                    first = false;
                    if self.app.write_all(&self.out).await.is_err() {
                        return Ok(Step::Close);
                    }
                    if let Some(end) = end {
                        break end == self.up.len();
                    }
                    if self.read_body(&mut conn, idle).await.is_none() {
                        return Ok(Step::Close);
                    }
                }
            }
            Framing::UntilClose => {
                if self.app.write_all(&self.out).await.is_err()
                    || self.app.write_all(&self.up).await.is_err()
                {
                    return Ok(Step::Close);
                }
                while let Some(got) = self.read_body(&mut conn, idle).await {
                    if self.app.write_all(&self.up[..got]).await.is_err() {
                        return Ok(Step::Close);
                    }
                }
                false
            }
        };
        self.up.clear();
        if reusable && body_sent && head.keep_alive {
            if let Some(pool) = &self.proxy.pools[route_index] {
                pool.checkin(conn);
            }
        }
        if app_unread {
            Ok(Step::Linger)
        } else if close {
            let _ = self.app.shutdown().await;
            Ok(Step::Close)
        } else {
            Ok(Step::Next)
        }
    }

    /// Closes an app connection whose request body was not all read: ends the sending side, then
    /// reads and discards what the app still sends for a while, so that it reads the answer
    /// rather than a reset (closing with unread bytes makes the kernel send RST at once).
    async fn linger(&mut self) {
        let _ = self.app.shutdown().await;
        let until = tokio::time::Instant::now() + LINGER;
        let mut discarded = 0u64;
        while discarded < LINGER_BYTES {
            self.buf.clear();
            self.buf.reserve(RELAY_CHUNK);
            match tokio::time::timeout_at(until, self.app.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => discarded += n as u64,
                _ => break,
            }
        }
        self.buf.clear();
    }

    /// Reads the next piece of a response body into `up` (replacing what was there): its length,
    /// or `None` at the end of the connection, on an error, or after `idle` without a byte.
    async fn read_body(&mut self, conn: &mut Upstream, idle: Duration) -> Option<usize> {
        self.up.clear();
        if self.up.capacity() < RELAY_CHUNK {
            self.up.reserve(RELAY_CHUNK);
        }
        self.deadline.set(Instant::now() + idle);
        match timed(&mut self.deadline, conn.read_buf(&mut self.up)).await {
            Ok(Ok(n)) if n > 0 => Some(n),
            _ => None,
        }
    }
}

/// How much of a request body reached the upstream.
#[derive(Debug)]
enum Sent {
    /// All of it.
    All,
    /// The upstream answered (or closed) first; with `app_unread`, the app is still sending it.
    Early { app_unread: bool },
    /// A write failed: the upstream may have answered and closed; with `app_unread` as above.
    WriteFailed(io::Error, bool),
}

impl PartialEq for Sent {
    fn eq(&self, other: &Sent) -> bool {
        matches!((self, other), (Sent::All, Sent::All))
    }
}

/// Drops complete 1xx heads at the front of `up`; whether a final response head is complete.
fn final_head_ready(
    up: &mut BytesMut,
    out: &mut Vec<u8>,
    head_method: bool,
) -> Result<bool, ProxyError> {
    loop {
        match response_head(up, out, head_method, true)? {
            None if up.len() >= MAX_HEADER_BYTES => {
                return Err(ProxyError::Unreachable(
                    "the upstream's response head is too large".into(),
                ))
            }
            None => return Ok(false),
            Some(h) if (100..200).contains(&h.status) && h.status != 101 => up.advance(h.len),
            Some(_) => return Ok(true),
        }
    }
}

/// Why a round trip failed.
enum Failure {
    Io(io::Error),
    Timeout,
    Proxy(ProxyError),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

fn timeout_error(timeout: Duration) -> ProxyError {
    ProxyError::Timeout(humantime::format_duration(timeout).to_string())
}

/// What the fast path does with a request header.
enum Header {
    Forward,
    Host,
    Drop,
    Refuse,
    ContentLength,
    Connection,
}

fn request_header(name: &str) -> Header {
    // Most names are none of these: a length check rules them out without comparing.
    match name.len() {
        4 if name.eq_ignore_ascii_case("host") => Header::Host,
        6 if name.eq_ignore_ascii_case("expect") => Header::Refuse,
        7 if name.eq_ignore_ascii_case("upgrade") => Header::Refuse,
        10 if name.eq_ignore_ascii_case("connection") => Header::Connection,
        14 if name.eq_ignore_ascii_case("content-length") => Header::ContentLength,
        17 if name.eq_ignore_ascii_case("transfer-encoding") => Header::Refuse,
        _ if is_hop_by_hop(name) => Header::Drop,
        _ => Header::Forward,
    }
}

/// Bytes the fast path takes in a request target: RFC 3986's, without `#`.
fn target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
                | b'?'
        )
}

/// A `Content-Length` value: digits only, no sign, no overflow.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Parses an upstream response head in `up` and writes the app's head into `out`.
/// `Ok(None)`: incomplete.
fn response_head(
    up: &[u8],
    out: &mut Vec<u8>,
    head_method: bool,
    close: bool,
) -> Result<Option<RespHead>, ProxyError> {
    let mut storage = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        up,
        &mut storage,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(ProxyError::Unreachable(format!(
                "the upstream sent an invalid response head: {e}"
            )))
        }
    };
    let bad = |what: &str| ProxyError::Unreachable(format!("the upstream sent {what}"));
    let status = resp.code.ok_or_else(|| bad("no status code"))?;
    if status < 100 {
        return Err(bad(&format!("an invalid status code {status:03}")));
    }
    let mut keep_alive = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut transfer = false;
    let mut named = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value.trim_ascii())
                .ok_or_else(|| bad("an invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked`, once: another coding could not be removed here, and would reach
            // the app undeclared (nginx refuses these too).
            if transfer || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(bad("a Transfer-Encoding other than chunked"));
            }
            transfer = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    named = true;
                }
            }
        }
    }
    let framing = if head_method || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if transfer {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        if is_hop_by_hop(h.name) || (named && named_by_connection(resp.headers, h.name)) {
            continue;
        }
        // The length is written once below, from the parsed value, whatever the upstream sent.
        if h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    match (length, framing) {
        // The body is re-framed as chunked (or ends at the close).
        (_, Framing::Chunked | Framing::UntilClose) => {}
        // No body and no length may be stated (RFC 9110 §8.6).
        _ if (100..200).contains(&status) || status == 204 => {}
        // HEAD and 304 keep the length the upstream stated for the representation.
        (Some(n), _) if !transfer => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close || framing == Framing::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(RespHead {
        len,
        status,
        framing,
        keep_alive: keep_alive && framing != Framing::UntilClose,
    }))
}

/// Whether a `Connection` header in `headers` lists `name`.
fn named_by_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_are_framed_and_cleaned() {
        let mut out = Vec::new();
        let up = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nx-kept: 2\r\n\r\nabc";
        let h = response_head(up, &mut out, false, false)
            .expect("ok")
            .expect("complete");
        assert_eq!(h.framing, Framing::Length(3));
        assert!(h.keep_alive);
        assert_eq!(&up[h.len..], b"abc");
        let text = String::from_utf8(out.clone()).expect("ascii");
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nx-kept: 2\r\ncontent-length: 3\r\n\r\n"
        );

        let up = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n";
        let h = response_head(up, &mut out, false, true)
            .expect("ok")
            .expect("complete");
        assert_eq!(h.framing, Framing::Chunked);
        let text = String::from_utf8(out.clone()).expect("ascii");
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );

        let up = b"HTTP/1.0 200 OK\r\n\r\nrest";
        let h = response_head(up, &mut out, false, false)
            .expect("ok")
            .expect("complete");
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);

        let up = b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n";
        let h = response_head(up, &mut out, false, false)
            .expect("ok")
            .expect("complete");
        assert_eq!(h.framing, Framing::Empty);
        let h = response_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
            &mut out,
            true,
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(h.framing, Framing::Empty);

        // Repeated equal lengths: one line, written by keyproxy.
        let up = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok";
        let h = response_head(up, &mut out, false, false)
            .expect("ok")
            .expect("complete");
        assert_eq!(h.framing, Framing::Length(2));
        assert_eq!(
            String::from_utf8(out.clone()).expect("ascii"),
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        );
        // 204: no length stated; HEAD: the representation's length kept.
        let h = response_head(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            &mut out,
            false,
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(h.framing, Framing::Empty);
        assert!(!String::from_utf8_lossy(&out).contains("content-length"));
        response_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
            &mut out,
            true,
            false,
        )
        .expect("ok")
        .expect("complete");
        assert!(String::from_utf8_lossy(&out).contains("content-length: 99\r\n"));

        assert!(
            response_head(b"HTTP/1.1 200 OK\r\nContent-Le", &mut out, false, false)
                .expect("ok")
                .is_none()
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/9 200 OK\r\n\r\n",
            b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(response_head(bad, &mut out, false, false).is_err());
        }
    }

    #[test]
    fn lengths_and_targets() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"1048576"), Some(1_048_576));
        for bad in [&b""[..], b"+1", b"1 ", b"0x10", b"99999999999999999999"] {
            assert_eq!(parse_length(bad), None);
        }
        let mut out = Vec::new();
        push_decimal(&mut out, 0);
        push_decimal(&mut out, 18_446_744_073_709_551_615);
        assert_eq!(out, b"018446744073709551615");
        assert!("/v1/x?a=b&c=%20".bytes().all(target_byte));
        for bad in ["/a b", "/a#b", "/a\"b", "/a{b", "/a\\b", "/a\x7fb"] {
            assert!(!bad.bytes().all(target_byte), "{bad:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Response heads with any mix of framing and hop-by-hop headers: no panic; a head that
        /// parses is rewritten well-formed, without hop-by-hop headers (bar the framing's own).
        #[test]
        fn response_heads_with_any_headers(
            headers in proptest::collection::vec((
                proptest::prop_oneof![
                    proptest::strategy::Just("Connection".to_owned()),
                    proptest::strategy::Just("Keep-Alive".to_owned()),
                    proptest::strategy::Just("Transfer-Encoding".to_owned()),
                    proptest::strategy::Just("Content-Length".to_owned()),
                    proptest::strategy::Just("TE".to_owned()),
                    proptest::strategy::Just("Trailer".to_owned()),
                    proptest::strategy::Just("Upgrade".to_owned()),
                    proptest::strategy::Just("Proxy-Authenticate".to_owned()),
                    "[a-zA-Z][a-zA-Z-]{0,11}",
                ],
                proptest::prop_oneof![
                    proptest::strategy::Just("chunked".to_owned()),
                    proptest::strategy::Just("gzip, chunked".to_owned()),
                    proptest::strategy::Just("close".to_owned()),
                    proptest::strategy::Just("keep-alive, x-a".to_owned()),
                    "[0-9]{1,5}",
                    "[ -~]{0,20}",
                ],
            ), 0..8),
            status in 100u16..600,
            head in proptest::bool::ANY,
            close in proptest::bool::ANY,
        ) {
            let mut input = format!("HTTP/1.1 {status} Reason\r\n").into_bytes();
            for (n, v) in &headers {
                input.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            input.extend_from_slice(b"\r\n");
            let mut out = Vec::new();
            if let Ok(Some(h)) = response_head(&input, &mut out, head, close) {
                proptest::prop_assert_eq!(h.len, input.len());
                proptest::prop_assert_eq!(h.status, status);
                proptest::prop_assert!(out.ends_with(b"\r\n\r\n"));
                let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
                let lines: Vec<&str> = text.trim_end().split("\r\n").skip(1).collect();
                for line in &lines {
                    let name = line.split(':').next().unwrap_or("");
                    let allowed = (*line == "transfer-encoding: chunked"
                        && h.framing == Framing::Chunked)
                        || *line == "connection: close";
                    proptest::prop_assert!(!is_hop_by_hop(name) || allowed, "{}", line);
                }
                let closes = lines.iter().filter(|l| **l == "connection: close").count();
                proptest::prop_assert_eq!(closes, usize::from(close || h.framing == Framing::UntilClose));
                if h.framing == Framing::UntilClose {
                    proptest::prop_assert!(!h.keep_alive);
                }
            }
        }
    }

    #[test]
    fn hop_by_hop_names() {
        for n in [
            "Connection",
            "keep-alive",
            "TE",
            "Trailer",
            "Upgrade",
            "Transfer-Encoding",
            "Proxy-Authenticate",
            "proxy-authorization",
            "Proxy-Connection",
        ] {
            assert!(is_hop_by_hop(n), "{n}");
        }
        for n in [
            "content-length",
            "x-te",
            "authorization",
            "upgrade-insecure",
        ] {
            assert!(!is_hop_by_hop(n), "{n}");
        }
    }
}
