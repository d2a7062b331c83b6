//! One exchange with the upstream: a pooled (or new) connection, the request head and body sent
//! while watching for an early answer, and the response head read (1xx skipped).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::request::{Plan, ReqBody};
use super::response::{response_head, RespHead};
use super::timer::timed;
use super::{Conn, COALESCE, KEEP_BUF, RELAY_CHUNK};
use crate::cache::Loaded;
use crate::drain::Drain;
use crate::error::ProxyError;
use crate::limits::MAX_HEADER_BYTES;
use crate::pool::Upstream;
use crate::routes::Route;

/// An upstream response whose head has been read.
pub(super) struct Answer {
    pub(super) conn: Upstream,
    pub(super) head: RespHead,
    /// The whole request body reached the upstream (else its connection cannot be reused).
    pub(super) body_sent: bool,
    /// The app is still sending a request body that was not forwarded.
    pub(super) app_unread: bool,
}

impl Conn<'_> {
    /// Sends the request (on a pooled connection, or a new one) and reads the response head.
    pub(super) async fn send(
        &mut self,
        route: &Route,
        plan: &Plan,
        loaded: &Loaded,
        body: &ReqBody,
        drain: &Drain,
    ) -> Result<Answer, ProxyError> {
        let pool = route
            .pool
            .as_ref()
            .ok_or_else(|| ProxyError::BadRequest("no plain-http pool for this route".into()))?;
        let cred = route
            .slot
            .credential(loaded)
            .ok_or_else(|| ProxyError::NoKey("no credential rendered for this route".into()))?;
        self.request_head(route, plan, cred, body);
        let timeout = route.config.timeout;
        let start = Instant::now();
        self.deadline.set(start + timeout);
        let mut fresh_only = false;
        // Whether a connection to the upstream was had: only then was the key sent.
        let mut connected = false;
        let result = loop {
            let pooled = if fresh_only { None } else { pool.checkout() };
            let (mut conn, reused) = match pooled {
                Some(c) => (c, true),
                None => match timed(
                    &mut self.deadline,
                    pool.connect(self.routes.connect_timeout),
                )
                .await
                {
                    Ok(Ok(c)) => (c, false),
                    Ok(Err(e)) => break Err(e),
                    Err(()) => break Err(timeout_error(timeout)),
                },
            };
            connected = true;
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
        if connected {
            route.metrics.injected.inc();
            route
                .metrics
                .upstream_seconds
                .observe(start.elapsed().as_secs_f64());
        }
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
        let timeout = self.routes.list[plan.route].config.timeout;
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
                sent = self
                    .send_body(conn, body, plan.head_method, timeout)
                    .await?;
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
        if sent == Sent::All && !matches!(body, ReqBody::Full(b) if b.len() <= COALESCE) {
            self.deadline.set(Instant::now() + timeout);
        }
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
        timeout: Duration,
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
                        deadline.set(Instant::now() + timeout);
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
                    // The route's timeout runs from the last progress while a body is sent, and
                    // from its end for the answer: a long upload is not cut off for its length.
                    deadline.set(Instant::now() + timeout);
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
