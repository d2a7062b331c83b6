//! Request and response bodies without boxing: an app body streams through untouched, or is held
//! in memory (small enough to replay after a 401), or both (a prefix read while deciding, then
//! the rest streamed).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// The body error type: the peer's error, or an idle timeout.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A body that stalled: no data for longer than the route's `idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent no data for {0:?} (idle_timeout); the response was cut off")]
pub struct IdleTimeout(pub Duration);

/// A body sent upstream, or answered to the app.
#[derive(Debug)]
pub enum ProxyBody {
    /// Fully in memory (`None` once sent, or empty).
    Full(Option<Bytes>),
    /// Streamed from the peer.
    Stream(Incoming),
    /// Some bytes already read, then the rest of the stream.
    Prefixed {
        /// Bytes read before streaming began.
        prefix: Option<Bytes>,
        /// The rest.
        rest: Incoming,
    },
    /// A request body streamed upstream that says when it ended: an answer that arrives before
    /// then is an early one (the app is still sending).
    Watched {
        /// The body; taken (and so dropped) by [`Watch::abandon`].
        body: Arc<Mutex<Option<ProxyBody>>>,
        /// Set once the body has ended.
        done: Arc<AtomicBool>,
    },
    /// Streamed from the upstream, cut off when no frame arrives for `idle`.
    Idle {
        /// The upstream's body.
        body: Incoming,
        /// The longest allowed gap between two frames.
        idle: Duration,
        /// When the last frame arrived (or the body began).
        last: Instant,
        /// Armed at the first wait for data, for `last + idle`. Not reset on every frame: when
        /// it fires early (frames came meanwhile) it is moved to the new `last + idle`.
        timer: Option<Pin<Box<Sleep>>>,
    },
}

/// A watched body was abandoned: the upstream answered before it was all sent.
#[derive(Debug, thiserror::Error)]
#[error("the upstream answered before the request body was sent; the rest is not forwarded")]
pub struct Abandoned;

/// The other end of a [`ProxyBody::Watched`] body.
#[derive(Debug)]
pub struct Watch {
    body: Arc<Mutex<Option<ProxyBody>>>,
    done: Arc<AtomicBool>,
}

impl Watch {
    /// Whether the body has ended (all of it went out).
    pub fn ended(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    /// Drops the body now: the app's connection stops being read for it, and the client gets
    /// an error if it asks for more.
    pub fn abandon(&self) {
        drop(self.body.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// The request body type sent upstream.
pub type ReqBody = ProxyBody;
/// The response body type answered to the app.
pub type RespBody = ProxyBody;

impl ProxyBody {
    /// A body of `bytes`.
    pub fn full(bytes: Bytes) -> ProxyBody {
        if bytes.is_empty() {
            ProxyBody::Full(None)
        } else {
            ProxyBody::Full(Some(bytes))
        }
    }

    /// Streams `body`, failing if it stalls for longer than `idle`.
    pub fn idle(body: Incoming, idle: Duration) -> ProxyBody {
        ProxyBody::Idle {
            body,
            idle,
            last: Instant::now(),
            timer: None,
        }
    }

    /// `body`, and a [`Watch`] on it.
    pub fn watched(body: ProxyBody) -> (ProxyBody, Watch) {
        let watch = Watch {
            body: Arc::new(Mutex::new(Some(body))),
            done: Arc::new(AtomicBool::new(false)),
        };
        let watched = ProxyBody::Watched {
            body: watch.body.clone(),
            done: watch.done.clone(),
        };
        (watched, watch)
    }

    /// An empty body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(s) => Pin::new(s).poll_frame(cx).map_err(Into::into),
            ProxyBody::Prefixed { prefix, rest } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => Pin::new(rest).poll_frame(cx).map_err(Into::into),
            },
            ProxyBody::Watched { body, done } => {
                let mut body = body.lock().unwrap_or_else(|p| p.into_inner());
                let Some(inner) = body.as_mut() else {
                    return Poll::Ready(Some(Err(Box::new(Abandoned))));
                };
                let frame = Pin::new(&mut *inner).poll_frame(cx);
                // A client may stop asking once the body says it has ended (a known length).
                if matches!(frame, Poll::Ready(None)) || inner.is_end_stream() {
                    done.store(true, Ordering::Relaxed);
                }
                frame
            }
            ProxyBody::Idle {
                body,
                idle,
                last,
                timer,
            } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(frame) => {
                    *last = Instant::now();
                    Poll::Ready(frame.map(|f| f.map_err(Into::into)))
                }
                Poll::Pending => {
                    let timer = timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*last + *idle)));
                    loop {
                        match timer.as_mut().poll(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(()) => {
                                let deadline = *last + *idle;
                                if deadline <= Instant::now() {
                                    return Poll::Ready(Some(Err(Box::new(IdleTimeout(*idle)))));
                                }
                                timer.as_mut().reset(deadline);
                            }
                        }
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Stream(s) => s.is_end_stream(),
            ProxyBody::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            ProxyBody::Watched { body, done } => {
                let ended = body
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .is_none_or(Body::is_end_stream);
                if ended {
                    done.store(true, Ordering::Relaxed);
                }
                ended
            }
            ProxyBody::Idle { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Stream(s) | ProxyBody::Idle { body: s, .. } => s.size_hint(),
            ProxyBody::Watched { body, .. } => body
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint),
            ProxyBody::Prefixed { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    h.set_upper(u + p);
                }
                h
            }
        }
    }
}
