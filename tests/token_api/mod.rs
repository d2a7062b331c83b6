//! A token API of the tests' own, on 127.0.0.1: it issues API keys for client credentials and
//! accepts only keys it issued and has not revoked.
//!
//! - `POST /tokens` (form or JSON body with `client_id`, `client_secret`): a fresh key as
//!   `{"access_token": "...", "token_type": "Bearer"}`; other credentials → 401.
//! - any other path: needs `Authorization: Bearer <key>` with a live key (else 401). `GET /ping`
//!   answers `{"ok": true}` (the cheap `test_url`); every other path echoes the request as JSON
//!   (method, path, body, and the serial number of the key used).
//! - [`Revocation`]: when older keys stop working.
//! - Faults: `/tokens` can answer 500, hang, or answer late after issuing (a crash window); `/ping`
//!   can answer any status.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

/// When the API stops accepting older keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Never: every issued key stays valid.
    Never,
    /// The moment a new key is issued, every older key is revoked.
    OnIssue,
    /// When a newer key is used for the first time (by anyone), every older key is revoked.
    OnFirstUseOfNewer,
    /// Only the newest this many keys are valid: issuing one revokes the oldest still valid.
    KeepNewest(usize),
}

/// How `POST /tokens` behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFault {
    /// Issue keys normally.
    None,
    /// Answer 500 without issuing.
    Fail,
    /// Never answer (and issue nothing).
    Hang,
    /// Issue the key, then wait this long before answering.
    AnswerLate(Duration),
}

#[derive(Debug)]
struct Key {
    key: String,
    revoked: bool,
    /// Authenticated requests made with it, all paths.
    uses: u64,
    /// Authenticated requests made with it on paths other than `/ping`.
    data_uses: u64,
}

#[derive(Debug)]
struct State {
    client_id: String,
    client_secret: String,
    revocation: Revocation,
    keys: Vec<Key>,
    by_key: HashMap<String, usize>,
    fault: TokenFault,
    ping_status: u16,
    answer_field: String,
    /// 401s answered on authenticated paths.
    unauthorized: u64,
    /// `/tokens` calls refused for bad credentials.
    bad_credentials: u64,
    /// `/tokens` calls, by body format (`form` / `json`).
    token_requests: HashMap<&'static str, u64>,
    requests: u64,
}

/// A running token API.
pub struct TokenApi {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn decode_form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let d = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

fn reply(status: u16, v: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

impl TokenApi {
    /// Starts an API issuing keys to `client_id` / `client_secret`.
    pub async fn start(client_id: &str, client_secret: &str, revocation: Revocation) -> TokenApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            revocation,
            keys: Vec::new(),
            by_key: HashMap::new(),
            fault: TokenFault::None,
            ping_status: 200,
            answer_field: "access_token".into(),
            unauthorized: 0,
            bad_credentials: 0,
            token_requests: HashMap::new(),
            requests: 0,
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TokenApi { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/tokens", self.url())
    }

    /// The cheap authenticated GET.
    pub fn ping_url(&self) -> String {
        format!("{}/ping", self.url())
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("token api state"))
    }

    /// Sets how `/tokens` behaves from now on.
    pub fn set_fault(&self, fault: TokenFault) {
        self.with(|s| s.fault = fault);
    }

    /// Sets the status `/ping` answers to a live key.
    pub fn set_ping_status(&self, status: u16) {
        self.with(|s| s.ping_status = status);
    }

    /// Sets the field of the `/tokens` answer that carries the key (default `access_token`).
    pub fn set_answer_field(&self, field: &str) {
        self.with(|s| s.answer_field = field.to_owned());
    }

    /// Keys issued so far, oldest first.
    pub fn issued(&self) -> Vec<String> {
        self.with(|s| s.keys.iter().map(|k| k.key.clone()).collect())
    }

    /// Number of keys issued.
    pub fn issued_count(&self) -> usize {
        self.with(|s| s.keys.len())
    }

    /// Whether `key` was issued and is not revoked.
    pub fn is_live(&self, key: &str) -> bool {
        self.with(|s| s.by_key.get(key).is_some_and(|&i| !s.keys[i].revoked))
    }

    /// Authenticated requests made with `key` (all paths, and paths other than `/ping`).
    pub fn uses(&self, key: &str) -> (u64, u64) {
        self.with(|s| {
            s.by_key
                .get(key)
                .map_or((0, 0), |&i| (s.keys[i].uses, s.keys[i].data_uses))
        })
    }

    /// 401s answered on authenticated paths.
    pub fn unauthorized(&self) -> u64 {
        self.with(|s| s.unauthorized)
    }

    /// `/tokens` calls refused for bad credentials.
    pub fn bad_credentials(&self) -> u64 {
        self.with(|s| s.bad_credentials)
    }

    /// `/tokens` calls seen with a form body and with a JSON body.
    pub fn token_requests(&self) -> (u64, u64) {
        self.with(|s| {
            (
                s.token_requests.get("form").copied().unwrap_or(0),
                s.token_requests.get("json").copied().unwrap_or(0),
            )
        })
    }

    /// Requests seen, all paths.
    pub fn requests(&self) -> u64 {
        self.with(|s| s.requests)
    }
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let lock = || state.lock().expect("token api state");
    lock().requests += 1;

    if path == "/tokens" && parts.method == hyper::Method::POST {
        let is_json = parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let fields: HashMap<String, String> = if is_json {
            serde_json::from_slice::<HashMap<String, Value>>(&body)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_owned())))
                .collect()
        } else {
            decode_form(&body)
        };
        let (fault, issued) = {
            let mut s = lock();
            *s.token_requests
                .entry(if is_json { "json" } else { "form" })
                .or_default() += 1;
            let fault = s.fault;
            match fault {
                TokenFault::Fail => return reply(500, json!({"error": "server_error"})),
                TokenFault::Hang => (fault, None),
                _ => {
                    let ok = fields.get("client_id") == Some(&s.client_id)
                        && fields.get("client_secret") == Some(&s.client_secret);
                    if !ok {
                        s.bad_credentials += 1;
                        return reply(401, json!({"error": "invalid_client"}));
                    }
                    let serial = s.keys.len();
                    let key = format!("tk-{serial}-{:016x}", rand::random::<u64>());
                    match s.revocation {
                        Revocation::OnIssue => {
                            for k in &mut s.keys {
                                k.revoked = true;
                            }
                        }
                        Revocation::KeepNewest(n) => {
                            // With the key being issued, the newest n.
                            let keep = n.saturating_sub(1);
                            let old = s.keys.len().saturating_sub(keep);
                            for k in &mut s.keys[..old] {
                                k.revoked = true;
                            }
                        }
                        Revocation::Never | Revocation::OnFirstUseOfNewer => {}
                    }
                    s.keys.push(Key {
                        key: key.clone(),
                        revoked: false,
                        uses: 0,
                        data_uses: 0,
                    });
                    s.by_key.insert(key.clone(), serial);
                    let field = s.answer_field.clone();
                    (fault, Some((field, key)))
                }
            }
        };
        match fault {
            TokenFault::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return reply(504, json!({"error": "hung"}));
            }
            TokenFault::AnswerLate(d) => tokio::time::sleep(d).await,
            _ => {}
        }
        let Some((field, key)) = issued else {
            return reply(500, json!({"error": "server_error"}));
        };
        let mut answer = json!({"token_type": "Bearer", "expires_in": 3600});
        answer[field] = Value::String(key);
        return reply(200, answer);
    }

    let key = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let mut s = lock();
    let live = key
        .as_deref()
        .and_then(|k| s.by_key.get(k).copied())
        .filter(|&i| !s.keys[i].revoked);
    let Some(serial) = live else {
        s.unauthorized += 1;
        return reply(401, json!({"error": "invalid api key"}));
    };
    let first_use = s.keys[serial].uses == 0;
    s.keys[serial].uses += 1;
    if path != "/ping" {
        s.keys[serial].data_uses += 1;
    }
    if first_use && s.revocation == Revocation::OnFirstUseOfNewer {
        for k in &mut s.keys[..serial] {
            k.revoked = true;
        }
    }
    if path == "/ping" {
        let status = s.ping_status;
        return reply(status, json!({"ok": (200..300).contains(&status)}));
    }
    reply(
        200,
        json!({
            "method": parts.method.as_str(),
            "path": path,
            "body": String::from_utf8_lossy(&body),
            "key_serial": serial,
        }),
    )
}
