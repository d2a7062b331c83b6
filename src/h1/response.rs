//! The upstream's response head: parsed, checked, and rewritten into the app's head with framing
//! keyproxy writes (one `Content-Length`, or chunked, or until close; hop-by-hop headers dropped).

use std::mem::MaybeUninit;

use super::request::{parse_length, push_decimal};
use crate::error::ProxyError;
use crate::forward::is_hop_by_hop;
use crate::limits::MAX_HEADERS;

/// How the upstream's response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed upstream response head (the app's head is already in `out`).
pub(super) struct RespHead {
    pub(super) len: usize,
    pub(super) status: u16,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
}

/// Parses an upstream response head in `up` and writes the app's head into `out`.
/// `Ok(None)`: incomplete.
pub(super) fn response_head(
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
    // RFC 9110 §15: 100–599; a client treats anything else as a server error.
    if !(100..=599).contains(&status) {
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
    use crate::forward::is_hop_by_hop;

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
}
