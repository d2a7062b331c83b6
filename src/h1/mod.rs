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
//! The engine by job: `request` parses and plans the app's request and writes the upstream
//! head; `upstream` runs one exchange with the upstream (pool, body sent while watching for an
//! early answer, response head); `response` checks and rewrites the response head; `relay`
//! relays the body (`chunked` decodes and re-encodes chunked ones); `timer` is the one timer
//! per connection; `rewind` hands a connection to hyper. The connection loop is here. Each
//! request is planned against the route table in force when its head is complete (one atomic
//! load; see [`RouteTable`]), so a reload reaches a keep-alive connection's next request.
//!
//! Everything else is handed to hyper ([`crate::proxy`]) for the rest of the connection, with
//! the bytes read so far: HTTP/1.0, HTTP/2, `Transfer-Encoding` or `Expect` or `Upgrade` in the
//! request, a `Connection` header naming other headers, `CONNECT`, absolute-form targets, target
//! bytes outside RFC 3986's set, routes whose upstream may speak HTTP/2, and every request the
//! proxy answers itself before forwarding (no route, a bad path, a missing app token, no key
//! yet), so those answers come from one place. Both paths apply the same rules.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::drain::Drain;
use crate::limits::{BODY_TIMEOUT, HEAD_TIMEOUT, MAX_HEADER_BYTES};
use crate::listener::Stream;
use crate::routes::{RouteTable, Routes, TableCache};

mod chunked;
mod relay;
mod request;
mod response;
mod rewind;
mod timer;
mod upstream;

use request::{Parsed, Plan, ReqBody};
use response::Framing;
pub use rewind::Rewind;
use timer::{timed, Deadline};

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

/// How an app connection ended on the fast path.
#[derive(Debug)]
pub enum Served {
    /// Closed (by either side, or after an error that ends the connection).
    Closed,
    /// A request the fast path does not take: hyper serves the rest of the connection, starting
    /// with these bytes already read from it.
    Handoff(Stream, Bytes),
}

/// One app connection on the fast path.
struct Conn<'p> {
    /// The routes in force, checked again for each request (a reload swaps them).
    table: TableCache<'p>,
    /// The routes of the current request: the table's as its head was planned.
    routes: Arc<Routes>,
    app: Stream,
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

/// Serves `app` on the fast path until it closes or a request needs the general path. Each
/// request is planned against the routes in force when its head arrives.
pub async fn serve(table: &RouteTable, app: Stream, drain: &Drain) -> Served {
    let mut conn = Conn {
        table: table.cache(),
        routes: table.current(),
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

    /// Forwards one planned request and relays the answer.
    async fn exchange(&mut self, plan: Plan, drain: &Drain) -> Step {
        let routes = self.routes.clone();
        let route = &routes.list[plan.route];
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
                // A stalled body ends the connection (nothing was sent upstream yet).
                self.deadline.set(Instant::now() + BODY_TIMEOUT);
                match timed(&mut self.deadline, self.app.read_buf(&mut self.buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
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
                if let Some(fresh) = route.fresher(&loaded).await {
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
                self.relay(route, answer, close)
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
        if routes.access_log {
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
}
