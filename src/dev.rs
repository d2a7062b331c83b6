//! The development API: a local stand-in for the API keyproxy fronts, so that keyproxy can be
//! tried with no network and no account: `keyproxy echo`, or `[dev] echo` in a config file (then
//! the proxy process runs it beside its own listeners).
//!
//! Every request is answered 200 with a JSON account of what arrived: method, path, query,
//! headers and body, each credential replaced by a fingerprint (`sha256:1a2b`: the first four hex
//! digits of its SHA-256), so that one sees which key keyproxy added without the key itself.
//! Credentials are the values of headers and query parameters whose name says so (`auth`, `key`,
//! `token`, `secret`, `cookie`, `signature`, `password`); a scheme word such as `Bearer` is kept.
//!
//! Given client credentials ([`Issuer`]), it is also an API that issues its own keys, as the
//! rotation function expects one to: `POST /oauth/token` with those credentials (a form or JSON,
//! `client_id` and `client_secret`) mints a key, and every other request must carry a live key as
//! `Authorization: Bearer` or is answered 401. A key is live until a newer one has been issued
//! for longer than the grace period. That is enough to rotate a key on a laptop and watch keyproxy
//! replay the first request the old key fails.
//!
//! For development only: it holds nothing secret (the keys it issues are test keys), but it
//! answers anyone who can reach its address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use crate::secrets::Secret;

/// The token endpoint's path, when keys are issued.
pub const TOKEN_PATH: &str = "/oauth/token";
/// The largest request body read; larger ones are answered 413.
const MAX_BODY: usize = 1024 * 1024;
/// The most body text shown in an echo.
const MAX_SHOWN_BODY: usize = 64 * 1024;
/// Parts of a header or query parameter name that mark its value as a credential.
const CREDENTIAL_NAMES: [&str; 7] = [
    "auth",
    "key",
    "token",
    "secret",
    "cookie",
    "signature",
    "password",
];

/// `sha256:` and the first four hex digits of the SHA-256 of `value`: enough to tell keys apart,
/// nothing to use one. `printf %s KEY | sha256sum | cut -c1-4` gives the same digits.
pub fn fingerprint(value: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    let hex: String = digest.as_ref()[..2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// Whether a header or query parameter named `name` carries a credential.
fn is_credential(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    CREDENTIAL_NAMES.iter().any(|c| name.contains(c))
}

/// A credential as shown: its scheme word kept (`Bearer sha256:1a2b`), the rest fingerprinted.
fn redact(value: &str) -> String {
    match value.split_once(' ') {
        Some((scheme, rest)) if !scheme.is_empty() && scheme.chars().all(char::is_alphabetic) => {
            format!("{scheme} {}", fingerprint(rest.trim()))
        }
        _ => fingerprint(value),
    }
}

/// A query string with each credential parameter's value fingerprinted.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if is_credential(name) => {
                let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
                format!("{name}={}", fingerprint(&value))
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The echo: what arrived, credentials fingerprinted.
fn echo(method: &Method, uri: &http::Uri, headers: &HeaderMap, body: &[u8]) -> Value {
    let mut shown = Map::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|v| {
                let text = String::from_utf8_lossy(v.as_bytes());
                if is_credential(name.as_str()) {
                    redact(&text)
                } else {
                    text.into_owned()
                }
            })
            .collect();
        shown.insert(name.to_string(), values.join(", ").into());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_SHOWN_BODY)]);
    json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query().map(redact_query),
        "headers": shown,
        "body": text,
        "body_bytes": body.len(),
    })
}

/// The client credentials the development API issues keys for, and how long an older key keeps
/// working once a newer one is issued.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// `client_id` expected at the token endpoint.
    pub client_id: String,
    /// `client_secret` expected at the token endpoint.
    pub client_secret: Secret,
    /// How long a key stays live after a newer one is issued.
    pub grace: Duration,
}

/// The keys issued so far, oldest first, with when each was issued.
#[derive(Debug, Default)]
struct Keys(Vec<(Secret, Instant)>);

impl Keys {
    /// `Ok(n)` (the key's number, from 1) if `key` is live; else why not.
    fn check(&self, key: &str, grace: Duration) -> Result<usize, String> {
        let Some(i) = self.0.iter().position(|(k, _)| k.expose() == key) else {
            return Err(format!(
                "key {} was not issued here (POST {TOKEN_PATH} issues one)",
                fingerprint(key)
            ));
        };
        match self.0.get(i + 1) {
            Some((_, newer)) if newer.elapsed() >= grace => Err(format!(
                "key #{} ({}) was replaced by key #{} more than {} ago",
                i + 1,
                fingerprint(key),
                i + 2,
                humantime::format_duration(grace)
            )),
            _ => Ok(i + 1),
        }
    }
}

/// The development API's state.
#[derive(Debug)]
struct State {
    /// Set when keys are issued and required.
    issuer: Option<Issuer>,
    /// The keys issued.
    keys: Mutex<Keys>,
}

/// A JSON answer.
fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The fields of a token request: a form, or a JSON object.
fn token_fields(headers: &HeaderMap, body: &[u8]) -> Map<String, Value> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        return serde_json::from_slice(body).unwrap_or_default();
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), Value::String(decode(v)))
        })
        .collect()
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let body = json!({"error": "request_body", "message": e.to_string()});
                return reply(StatusCode::PAYLOAD_TOO_LARGE, &body);
            }
        };
        let Some(issuer) = &self.issuer else {
            let shown = echo(&parts.method, &parts.uri, &parts.headers, &body);
            return reply(StatusCode::OK, &shown);
        };
        if parts.uri.path() == TOKEN_PATH && parts.method == Method::POST {
            return self.issue(issuer, &token_fields(&parts.headers, &body));
        }
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let checked = match key {
            Some(key) => self.keys.lock().expect("keys").check(key, issuer.grace),
            None => Err("no Authorization: Bearer key".to_owned()),
        };
        match checked {
            Ok(n) => {
                let mut shown = echo(&parts.method, &parts.uri, &parts.headers, &body);
                shown["key_number"] = n.into();
                reply(StatusCode::OK, &shown)
            }
            Err(why) => {
                tracing::info!(path = parts.uri.path(), reason = %why, "request refused: 401");
                reply(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": "invalid_key", "message": why}),
                )
            }
        }
    }

    /// `POST /oauth/token`: a new key for the right client credentials.
    fn issue(&self, issuer: &Issuer, fields: &Map<String, Value>) -> Response<Full<Bytes>> {
        let field = |k: &str| fields.get(k).and_then(Value::as_str).unwrap_or_default();
        if field("client_id") != issuer.client_id
            || field("client_secret") != issuer.client_secret.expose()
        {
            tracing::info!(
                client_id = field("client_id"),
                "token request refused: wrong client credentials"
            );
            return reply(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "invalid_client"}),
            );
        }
        let mut keys = self.keys.lock().expect("keys");
        let n = keys.0.len() + 1;
        let key = format!("dev_{n}_{:016x}", rand::random::<u64>());
        tracing::info!(
            number = n,
            key = %fingerprint(&key),
            "key issued; older keys stop working after the grace period"
        );
        let body = json!({"access_token": key, "token_type": "Bearer"});
        keys.0.push((Secret::new(key), Instant::now()));
        reply(StatusCode::OK, &body)
    }
}

/// The development API on a bound listener.
#[derive(Debug)]
pub struct DevApi {
    listener: TcpListener,
    state: Arc<State>,
}

impl DevApi {
    /// Binds `addr`. With an `issuer`, keys are issued and required (see the module docs).
    pub async fn bind(addr: SocketAddr, issuer: Option<Issuer>) -> std::io::Result<DevApi> {
        let listener = TcpListener::bind(addr).await?;
        let state = Arc::new(State {
            issuer,
            keys: Mutex::default(),
        });
        Ok(DevApi { listener, state })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves forever.
    pub async fn serve(self) {
        if let Ok(addr) = self.local_addr() {
            tracing::info!(%addr, issues_keys = self.state.issuer.is_some(),
                "development echo API ready (for development only)");
        }
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                continue;
            };
            let state = self.state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(state.handle(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_fingerprinted_and_the_rest_shown() {
        // printf %s dev-key-123 | sha256sum
        assert_eq!(fingerprint("dev-key-123"), "sha256:0f11");
        assert_eq!(redact("Bearer dev-key-123"), "Bearer sha256:0f11");
        assert_eq!(redact("dev-key-123"), "sha256:0f11");
        assert_eq!(
            redact_query("q=paris&api_key=dev-key-123&x"),
            "q=paris&api_key=sha256:0f11&x"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_static("Bearer dev-key-123"),
        );
        headers.insert("x-api-key", HeaderValue::from_static("dev-key-123"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        let uri: http::Uri = "/v1/charges?api_key=dev-key-123".parse().expect("uri");
        let v = echo(&Method::POST, &uri, &headers, b"{\"amount\": 1}");
        assert_eq!(v["headers"]["authorization"], "Bearer sha256:0f11");
        assert_eq!(v["headers"]["x-api-key"], "sha256:0f11");
        assert_eq!(v["headers"]["accept"], "*/*");
        assert_eq!(v["query"], "api_key=sha256:0f11");
        assert_eq!(v["path"], "/v1/charges");
        assert_eq!(v["body"], "{\"amount\": 1}");
        assert!(!v.to_string().contains("dev-key-123"));
    }

    #[test]
    fn an_older_key_works_until_the_grace_period_after_a_newer_one() {
        let grace = Duration::from_millis(50);
        let mut keys = Keys::default();
        keys.0.push((Secret::new("k1"), Instant::now()));
        assert_eq!(keys.check("k1", grace), Ok(1));
        keys.0.push((Secret::new("k2"), Instant::now()));
        assert_eq!(keys.check("k1", grace), Ok(1));
        std::thread::sleep(grace);
        let e = keys.check("k1", grace).expect_err("replaced");
        assert!(
            e.contains("key #1") && e.contains("replaced by key #2"),
            "{e}"
        );
        assert!(!e.contains("k1"), "{e}");
        assert_eq!(keys.check("k2", grace), Ok(2));
        assert!(keys.check("other", grace).is_err());
    }

    #[test]
    fn token_requests_are_read_as_form_or_json() {
        let mut h = HeaderMap::new();
        let f = token_fields(
            &h,
            b"grant_type=client_credentials&client_id=a+b&client_secret=s%26t",
        );
        assert_eq!(f["client_id"], "a b");
        assert_eq!(f["client_secret"], "s&t");
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let f = token_fields(&h, br#"{"client_id": "a", "client_secret": "s"}"#);
        assert_eq!(f["client_secret"], "s");
    }
}
