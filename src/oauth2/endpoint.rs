//! The HTTP side of a token endpoint, shared by the proxy's OAuth2 routes ([`super`]) and the
//! rotation function ([`crate::rotation::token`]): form encoding, `client_secret_basic`, one
//! bounded, timed call over the proxy's own pooled rustls client (which never follows
//! redirects), and what of an error answer may be logged.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Limited};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

use crate::body::ProxyBody;
use crate::forward::UpstreamClient;
pub use crate::uri::{is_loopback, secure_url, shown, UrlProblem};

/// The largest answer read from a token endpoint (or the rotation's test URL).
pub const MAX_ANSWER: usize = 64 * 1024;
/// The longest `error_description` kept from an error answer, in characters.
const MAX_DESCRIPTION: usize = 120;

/// Characters left as they are in a form value; everything else is percent-encoded.
const FORM_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'*');

/// One form value, `application/x-www-form-urlencoded` (spaces as `%20`, which every decoder
/// accepts).
pub fn form_value(v: &str) -> String {
    utf8_percent_encode(v, FORM_ENCODE).to_string()
}

/// `application/x-www-form-urlencoded` fields.
pub fn form_encode(fields: &[(&str, &str)]) -> Bytes {
    let text = fields
        .iter()
        .map(|(k, v)| format!("{}={}", form_value(k), form_value(v)))
        .collect::<Vec<_>>()
        .join("&");
    Bytes::from(text)
}

/// The `Authorization` value of `client_secret_basic` (RFC 6749 §2.3.1): the id and the secret
/// each form-encoded, then `id:secret` in Base64.
pub fn basic_auth(client_id: &str, client_secret: &str) -> String {
    let pair = format!("{}:{}", form_value(client_id), form_value(client_secret));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// What one call returned.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The body, at most [`MAX_ANSWER`] bytes.
    pub body: Bytes,
}

/// Why one call failed.
#[derive(Debug, Clone)]
pub enum CallError {
    /// No answer within the time allowed.
    Timeout(Duration),
    /// Connection, TLS or protocol failure, or an answer over [`MAX_ANSWER`].
    Failed(String),
}

/// Sends `req` and reads the answer (up to [`MAX_ANSWER`]) within `timeout`. A redirect is an
/// answer like any other: the client never follows one.
pub async fn call(
    client: &UpstreamClient,
    timeout: Duration,
    req: Request<ProxyBody>,
) -> Result<Answer, CallError> {
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| CallError::Failed(crate::secrets::aws::error_chain(&e)))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| CallError::Failed(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok(Answer { status, body })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(CallError::Timeout(timeout)))
}

/// Whether `s` is a plain OAuth-style code (`invalid_client`): short, letters, digits, `_-.`.
fn plain_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// An OAuth-style `error` code from an error answer, if it is short and plain enough to log.
pub fn error_code(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let code = v.get("error")?.as_str()?;
    plain_code(code).then(|| code.to_owned())
}

/// What of an error answer may be logged: its `error` code (if plain) and its
/// `error_description`, printable ASCII only, at most 120 characters, with every occurrence of
/// the `hidden` values (the client secret) replaced by `***`. The rest of the body is never
/// shown: a token endpoint may echo what it was sent.
pub fn error_summary(body: &[u8], hidden: &[&str]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let code = v
        .get("error")
        .and_then(Value::as_str)
        .filter(|c| plain_code(c));
    let description = v
        .get("error_description")
        .and_then(Value::as_str)
        .map(|d| {
            let mut d = d.to_owned();
            for h in hidden.iter().filter(|h| h.len() >= 4) {
                d = d.replace(h, "***");
            }
            let clean: String = d
                .chars()
                .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
                .take(MAX_DESCRIPTION)
                .collect();
            clean
        })
        .filter(|d| !d.trim().is_empty());
    match (code, description) {
        (Some(c), Some(d)) => Some(format!("error {c:?}: {d:?}")),
        (Some(c), None) => Some(format!("error {c:?}")),
        (None, Some(d)) => Some(format!("error_description {d:?}")),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_escapes() {
        assert_eq!(
            form_encode(&[("a", "x y&z=1+2/é")]),
            "a=x%20y%26z%3D1%2B2%2F%C3%A9"
        );
    }

    #[test]
    fn basic_auth_form_encodes_before_base64() {
        // RFC 6749 §2.3.1: "a:b c" / "p%w" → "a%3Ab%20c:p%25w".
        let v = basic_auth("a:b c", "p%w");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v.trim_start_matches("Basic "))
            .expect("b64");
        assert_eq!(raw, b"a%3Ab%20c:p%25w");
    }

    #[test]
    fn oauth_error_codes_are_kept_only_when_plain() {
        assert_eq!(
            error_code(br#"{"error":"invalid_client"}"#).as_deref(),
            Some("invalid_client")
        );
        assert_eq!(error_code(br#"{"error":"secret abc: bad"}"#), None);
        assert_eq!(error_code(b"nope"), None);
    }

    #[test]
    fn error_summaries_hide_the_secret_and_are_capped() {
        let body = br#"{"error":"invalid_client","error_description":"secret cs_0123 is wrong\n"}"#;
        let s = error_summary(body, &["cs_0123"]).expect("summary");
        assert_eq!(s, r#"error "invalid_client": "secret *** is wrong?""#);
        let long = format!(r#"{{"error_description":"{}"}}"#, "x".repeat(500));
        let s = error_summary(long.as_bytes(), &[]).expect("summary");
        assert!(s.len() < 160, "{s}");
        assert_eq!(error_summary(br#"{"error":"a b"}"#, &[]), None);
        assert_eq!(error_summary(b"<html>", &[]), None);
    }
}
