//! Keeping a request body for a replay after 401, within a cap.
//!
//! A body whose `Content-Length` is within `max_replay_body` (or that ends before the cap when
//! its length is unknown) is read into memory, so the request can be sent twice. A larger body
//! streams through as it comes and is never replayed: the app gets the API's 401 unchanged.

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::ReqBody;

/// A request body ready to send, and a copy for a replay when it fit the cap.
#[derive(Debug)]
pub struct Prepared {
    /// What to send first.
    pub body: ReqBody,
    /// What to send again on a replay; `None`: not replayable.
    pub replay: Option<Bytes>,
}

/// Reads `body` into memory if it fits `cap`; else streams it (with what was read so far).
pub async fn prepare(body: Incoming, cap: u64) -> Result<Prepared, hyper::Error> {
    if body.is_end_stream() {
        return Ok(Prepared {
            body: ReqBody::empty(),
            replay: Some(Bytes::new()),
        });
    }
    let hint = body.size_hint();
    if hint.lower() > cap {
        return Ok(Prepared {
            body: ReqBody::Stream(body),
            replay: None,
        });
    }
    let mut body = body;
    let mut buf = BytesMut::with_capacity(hint.exact().unwrap_or(0).min(cap) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() as u64 > cap {
                return Ok(Prepared {
                    body: ReqBody::Prefixed {
                        prefix: Some(buf.freeze()),
                        rest: body,
                    },
                    replay: None,
                });
            }
        }
        // Request trailers are rare and not replayed; they end the body here.
    }
    let bytes = buf.freeze();
    Ok(Prepared {
        body: ReqBody::full(bytes.clone()),
        replay: Some(bytes),
    })
}
