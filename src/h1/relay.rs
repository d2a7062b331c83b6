//! The response body relayed to the app: by length, decoded and re-chunked, or until close;
//! the upstream connection pooled when the response ended cleanly on it.

use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::chunked;
use super::response::Framing;
use super::timer::timed;
use super::upstream::Answer;
use super::{Conn, Step, COALESCE, RELAY_CHUNK};
use crate::error::ProxyError;
use crate::limits::{LINGER, LINGER_BYTES};
use crate::pool::Upstream;
use crate::routes::Route;

impl Conn<'_> {
    /// Relays the response (head in `out`, first bytes in `up`) to the app; pools the upstream
    /// connection when the response ended cleanly on it. `Err`: nothing was sent to the app yet,
    /// and the response is unusable.
    pub(super) async fn relay(
        &mut self,
        route: &Route,
        answer: Answer,
        close: bool,
    ) -> Result<Step, ProxyError> {
        let Answer {
            mut conn,
            head,
            body_sent,
            app_unread,
        } = answer;
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
            if let Some(pool) = &route.pool {
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
    pub(super) async fn linger(&mut self) {
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
