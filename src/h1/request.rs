//! The app's request: its head parsed in place and checked, the plan for forwarding it, and the
//! upstream request head written into one buffer.

use std::mem::MaybeUninit;
use std::sync::Arc;

use bytes::Bytes;

use super::Conn;
use crate::cache::Loaded;
use crate::forward::is_hop_by_hop;
use crate::inject::{write_target, Credential};
use crate::limits::MAX_HEADERS;
use crate::route::{allowed, app_token_ok, check_path, host_rule, host_value_ok, uri_byte};
use crate::routes::Route;

/// What the parsed head of an app request says to do.
pub(super) enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// Not for the fast path.
    Handoff,
    /// Forward it.
    Forward(Plan),
}

/// A request the fast path forwards.
pub(super) struct Plan {
    pub(super) head_len: usize,
    pub(super) route: usize,
    pub(super) loaded: Arc<Loaded>,
    /// Declared body length (0: none).
    pub(super) length: u64,
    pub(super) has_length: bool,
    pub(super) close: bool,
    pub(super) head_method: bool,
    pub(super) idempotent: bool,
}

/// The request body as the fast path sends it.
pub(super) enum ReqBody {
    /// All of it, in memory (sendable twice).
    Full(Bytes),
    /// What was read so far, and how many more bytes the app still sends.
    Streamed(Bytes, u64),
}

impl Conn<'_> {
    /// Parses the buffered head and decides whether and how the fast path forwards it.
    pub(super) fn plan(&mut self) -> Parsed {
        // The routes in force now: one relaxed load, and a new reference only after a reload.
        let now = self.table.load();
        if !Arc::ptr_eq(now, &self.routes) {
            self.routes = now.clone();
        }
        let routes = &self.routes;
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
        let Some(m) = routes.router.by_path(path) else {
            return Parsed::Handoff;
        };
        let strip = path.len() - m.rest.len();
        let route = &routes.list[m.route];
        // A refused path or method: the general path answers (400, 403).
        if route.pool.is_none()
            || check_path(path).is_err()
            || !allowed(&route.config, method, m.rest)
        {
            return Parsed::Handoff;
        }
        let Some(loaded) = route.slot.current() else {
            return Parsed::Handoff;
        };
        if route.slot.credential(&loaded).is_none() {
            return Parsed::Handoff;
        }
        let injection = &route.config.injection;
        let app_auth = routes.app_auth.as_ref();
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
                        token_ok = app_token_ok(auth, Some(h.value));
                    }
                    continue;
                }
            }
            match request_header(name) {
                Header::Forward => {}
                Header::Host => {
                    // An invalid value counts as one too many: the general path answers 400.
                    hosts += if host_value_ok(h.value) { 1 } else { 2 };
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
            if injection.sets_header(name) {
                continue;
            }
            self.hdrs.extend_from_slice(name.as_bytes());
            self.hdrs.extend_from_slice(b": ");
            self.hdrs.extend_from_slice(h.value);
            self.hdrs.extend_from_slice(b"\r\n");
        }
        // No `Host`, or several: the general path answers 400.
        if !token_ok || host_rule(true, hosts).is_err() {
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

    /// Writes the upstream request head for `cred` into `out`.
    pub(super) fn request_head(
        &mut self,
        route: &Route,
        plan: &Plan,
        cred: &Credential,
        body: &ReqBody,
    ) {
        let up = &route.config.upstream;
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(&self.method);
        out.push(b' ');
        // The target is ASCII (checked byte by byte when the head was planned).
        let query = self
            .query
            .as_deref()
            .map(|q| std::str::from_utf8(q).unwrap_or(""));
        write_target(out, &up.base_path, &self.path[self.strip..], query, cred);
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
        out.extend_from_slice(cred.header_lines());
        out.extend_from_slice(b"\r\n");
    }
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
    uri_byte(b) || matches!(b, b':' | b'@' | b'/' | b'?')
}

/// A `Content-Length` value: digits only, no sign, no overflow.
pub(super) fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

pub(super) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
