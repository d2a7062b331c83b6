//! OAuth2 routes (`[route.oauth2]`): the key injected is an access token that keyproxy mints
//! from client credentials (RFC 6749 §4.4, the client credentials grant), and keeps fresh.
//!
//! A route's [`Token`] holds the token in force in an `ArcSwapOption`, rendered through the
//! route's `header`/`value` like a key, so the request path is the same one atomic load
//! ([`crate::credentials::Slot::current`]) with an expiry check, and no I/O. The client id and
//! secret live in the shared secret cache ([`crate::cache::Entry`], refreshed and checked there)
//! and are read from the entry's text at each mint, so a rotated client secret is used by the
//! next one. [`Tokens`] holds a configuration's tokens and their background tasks; a reload
//! carries a token over when nothing about how it is minted changed ([`Tokens::keep`]).
//!
//! - One background task per token mints the first one (once the client credentials are
//!   loaded), then the next one `refresh_ahead` (at most half the lifetime) before `expires_in`
//!   runs out, and never sooner than 1 s after the last. A token without `expires_in` is kept
//!   until the upstream refuses it.
//! - Every mint holds one async lock: concurrent needs (the task, 401s) share one.
//! - A 401 from the upstream mints once ([`Token::refresh_now`]), at most once per
//!   `refresh_cooldown`, and the request is replayed with the new token.
//! - The token endpoint refusing the client (401, or `invalid_client`) makes keyproxy re-read
//!   the secret and try once more: the client secret may have rotated since the last read (at
//!   most one re-read per `refresh_cooldown`, none while Secrets Manager throttles).
//! - A failing endpoint: the token in force is served until it expires, then the route answers
//!   `503 no_key` naming the cause; the task retries after a full-jitter backoff
//!   ([`crate::backoff`]).
//! - Neither the token nor the client secret reaches a log line, an error, a metric or
//!   `/readyz`; of an error answer only its `error` code and a sanitised, capped
//!   `error_description` are kept ([`endpoint::error_summary`]).
//!
//! [`endpoint`] is the HTTP side, shared with the rotation function.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::BoxFuture;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff;
use crate::body::ProxyBody;
use crate::cache::{client_credentials, Binding, ClientUse, Entry, Loaded};
use crate::config::defaults::MAX_DURATION;
use crate::config::{ClientAuth, OAuth2Config, RouteConfig};
use crate::forward::UpstreamClient;
use crate::inject::Injection;
use crate::metrics::{Metrics, RouteResult};
use crate::secrets::Secret;

pub mod endpoint;

use endpoint::{Answer, CallError};

/// Time allowed for one call to the token endpoint, answer included.
pub const MINT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the task looks whether the client credentials are loaded, before the first mint.
const CREDENTIALS_POLL: Duration = Duration::from_millis(200);
/// The longest the background task sleeps at a time (a token without `expires_in`).
const IDLE: Duration = Duration::from_secs(3600);
/// The shortest time between two background mints, whatever the lifetime: an endpoint that
/// issues tokens of a few milliseconds does not make a hot loop.
const MIN_RENEW: Duration = Duration::from_secs(1);
/// The largest retry window while a token is in force (else [`backoff::UNLOADED_CAP`]).
const RETRY_CAP: Duration = Duration::from_secs(60);

/// Sends one request to the token endpoint and reads the answer: the pooled HTTP client in the
/// proxy ([`endpoint::call`], within [`MINT_TIMEOUT`]), a fake in the unit tests.
pub trait Exchange: Send + Sync + 'static {
    /// Sends `req`; the answer, read whole (bounded).
    fn exchange(&self, req: Request<ProxyBody>) -> BoxFuture<'_, Result<Answer, CallError>>;
}

impl Exchange for UpstreamClient {
    fn exchange(&self, req: Request<ProxyBody>) -> BoxFuture<'_, Result<Answer, CallError>> {
        Box::pin(endpoint::call(self, MINT_TIMEOUT, req))
    }
}

/// Why a mint failed. Messages name the endpoint (scheme, host, port, path) and the cause, never
/// a token or a client secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MintError {
    /// The client credentials are not loaded, or the version lacks them.
    #[error("no client credentials: {0}")]
    Credentials(String),
    /// No connection, TLS failure, reset.
    #[error("token endpoint {url} unreachable: {detail}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// What failed.
        detail: String,
    },
    /// No answer in time.
    #[error("token endpoint {url} did not answer within {}", humantime::format_duration(*.timeout))]
    Timeout {
        /// The endpoint.
        url: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The endpoint refused the client (401, or `invalid_client`).
    #[error("token endpoint {url} refused the client credentials: answered {status}{summary}")]
    Refused {
        /// The endpoint.
        url: String,
        /// The status.
        status: u16,
        /// ` (error "...")`, or empty.
        summary: String,
    },
    /// Another non-2xx answer.
    #[error("token endpoint {url} answered {status}{summary}")]
    Status {
        /// The endpoint.
        url: String,
        /// The status.
        status: u16,
        /// ` (error "...")`, or empty.
        summary: String,
    },
    /// A 2xx answer that holds no usable token.
    #[error("token endpoint {url}: {detail}")]
    Answer {
        /// The endpoint.
        url: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl MintError {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MintError::Credentials(_) => "no_credentials",
            MintError::Unreachable { .. } => "unreachable",
            MintError::Timeout { .. } => "timeout",
            MintError::Refused { .. } => "invalid_client",
            MintError::Status { .. } => "error_status",
            MintError::Answer { .. } => "bad_answer",
        }
    }
}

/// A token in force.
#[derive(Debug)]
struct Minted {
    /// The rendered credential (`creds[0]`) and the token (`value`).
    loaded: Arc<Loaded>,
    /// When it was minted.
    at: Instant,
    /// When it expires (`expires_in`), if the endpoint said.
    expires: Option<Instant>,
    /// When the next one is minted.
    renew: Option<Instant>,
}

impl Minted {
    fn valid(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| now < e)
    }
}

/// What the admin endpoints report about a token.
#[derive(Debug, Clone)]
pub struct TokenStatus {
    /// The route.
    pub route: String,
    /// The token endpoint (no query, no user info).
    pub token_url: String,
    /// Whether a valid token is in force.
    pub ready: bool,
    /// Time since the token in force was minted.
    pub age: Option<Duration>,
    /// Time until it expires (`None`: no `expires_in`, or no token).
    pub expires_in: Option<Duration>,
    /// The last mint's error, while it is the latest result.
    pub error: Option<MintError>,
}

/// State guarded by the mint lock.
#[derive(Debug, Default)]
struct MintState {
    /// When the last 401 caused a mint.
    last_forced: Option<Instant>,
    /// When the endpoint's refusal last made keyproxy re-read the secret (at most once per
    /// `refresh_cooldown`).
    last_reread: Option<Instant>,
}

/// An OAuth2 route's access token, and how to mint it.
pub struct Token {
    route: String,
    settings: OAuth2Config,
    /// `token_url` as shown in logs and errors.
    url: String,
    /// How the token is presented upstream (`Authorization: Bearer {secret}` by default).
    injection: Injection,
    /// Where the client credentials are.
    entry: Arc<Entry>,
    /// The fields of them.
    fields: ClientUse,
    state: ArcSwapOption<Minted>,
    /// Held during every mint: the single-flight point.
    mint_lock: tokio::sync::Mutex<MintState>,
    /// The last mint's error.
    last_error: Mutex<Option<MintError>>,
    /// At most one 401-forced mint per this.
    cooldown: Duration,
    client: Arc<dyn Exchange>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("route", &self.route)
            .field("token_url", &self.url)
            .finish_non_exhaustive()
    }
}

/// What a 2xx answer held.
#[derive(Debug)]
struct Issued {
    token: Secret,
    lifetime: Option<Duration>,
}

/// A mint's result: the token, and when its request was sent (its lifetime counts from then, so
/// keyproxy never holds a token longer than the endpoint does).
struct Fresh {
    issued: Issued,
    loaded: Arc<Loaded>,
    sent: Instant,
}

impl Token {
    /// The token of `route`, minted from the client credentials in `entry` through `client`.
    pub fn new(
        route: &RouteConfig,
        settings: OAuth2Config,
        entry: Arc<Entry>,
        client: Arc<dyn Exchange>,
        metrics: Arc<Metrics>,
    ) -> Token {
        Token {
            route: route.name.clone(),
            url: endpoint::shown(&settings.token_url),
            fields: ClientUse {
                route: route.name.clone(),
                id_field: settings.client_id_field.clone(),
                secret_field: settings.client_secret_field.clone(),
            },
            settings,
            injection: route.injection.clone(),
            entry,
            state: ArcSwapOption::empty(),
            mint_lock: tokio::sync::Mutex::new(MintState::default()),
            last_error: Mutex::new(None),
            cooldown: route.refresh_cooldown,
            client,
            metrics,
        }
    }

    /// Starts this token (of a reloaded configuration) with `old`'s, when both belong to the same
    /// route, mint the same way, present the token the same way and read the same client
    /// credentials: a reload re-mints nothing it need not.
    pub fn seed_from(&self, old: &Token) -> bool {
        let same = self.route == old.route
            && self.settings == old.settings
            && self.injection == old.injection
            && self.entry.secret_id == old.entry.secret_id
            && self.entry.stage == old.entry.stage
            && self.entry.role == old.entry.role;
        if same {
            self.state.store(old.state.load_full());
        }
        same
    }

    /// The route this token is for.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The token in force, for the request path: one atomic load and a clock read, no lock, no
    /// I/O. `None` before the first mint and once the token has expired.
    #[inline]
    pub fn current(&self) -> Option<Arc<Loaded>> {
        let guard = self.state.load();
        let m = guard.as_ref()?;
        m.valid(Instant::now()).then(|| m.loaded.clone())
    }

    /// Why there is no token: the last mint's error, or that the first is still being minted.
    pub fn missing(&self) -> String {
        let expired = self.state.load().is_some();
        let error = self.last_error.lock().ok().and_then(|e| e.clone());
        match (error, expired) {
            (Some(e), true) => {
                format!("the OAuth2 access token expired and no new one could be minted: {e}")
            }
            (Some(e), false) => format!("no OAuth2 access token yet: {e}"),
            (None, true) => "the OAuth2 access token expired; a new one is being minted".into(),
            (None, false) => format!(
                "the OAuth2 access token is still being minted (secret {:?}, token endpoint {})",
                self.entry.secret_id, self.url
            ),
        }
    }

    /// The token's state for `/readyz` (never the token).
    pub fn status(&self) -> TokenStatus {
        let now = Instant::now();
        let guard = self.state.load();
        let m = guard.as_ref();
        TokenStatus {
            route: self.route.clone(),
            token_url: self.url.clone(),
            ready: m.is_some_and(|m| m.valid(now)),
            age: m.map(|m| now - m.at),
            expires_in: m
                .and_then(|m| m.expires)
                .map(|e| e.saturating_duration_since(now)),
            error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    /// The 401 path: the token in `seen` was refused upstream. Returns the token to use now: a
    /// newer one if another mint got in first, else a new mint's, at most one per
    /// `refresh_cooldown` (within it, the token in force, which may be `seen` itself).
    pub async fn refresh_now(&self, seen: &Arc<Loaded>) -> Option<Arc<Loaded>> {
        let newer = |cur: &Option<Arc<Loaded>>| cur.as_ref().is_some_and(|c| !Arc::ptr_eq(c, seen));
        let cur = self.current();
        if newer(&cur) {
            return cur;
        }
        let mut guard = self.mint_lock.lock().await;
        let cur = self.current();
        if newer(&cur) {
            return cur;
        }
        let now = Instant::now();
        if guard.last_forced.is_some_and(|t| now - t < self.cooldown) {
            return cur;
        }
        guard.last_forced = Some(now);
        let _ = self.mint_locked(&mut guard, "401").await;
        self.current()
    }

    /// Mints now unless a mint since `seen` (the state the caller planned from) already
    /// replaced it: concurrent callers share one mint.
    async fn mint_after(&self, seen: &Option<Arc<Minted>>) -> Result<(), MintError> {
        let mut guard = self.mint_lock.lock().await;
        let cur = self.state.load_full();
        let same = match (&cur, seen) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            return Ok(());
        }
        self.mint_locked(&mut guard, "refresh").await
    }

    /// One mint, and once more after re-reading the secret if the endpoint refused the client.
    /// Installs the token, or records the error. Callers hold `mint_lock`.
    async fn mint_locked(
        &self,
        state: &mut MintState,
        reason: &'static str,
    ) -> Result<(), MintError> {
        let mut result = self.mint_once().await;
        let now = Instant::now();
        let may_reread =
            state.last_reread.is_none_or(|t| now - t >= self.cooldown) && !self.entry.throttled();
        if matches!(result, Err(MintError::Refused { .. })) && may_reread {
            tracing::info!(route = %self.route, secret = %self.entry.secret_id,
                "the token endpoint refused the client credentials; reading the secret again");
            state.last_reread = Some(now);
            let _ = self.entry.refresh().await;
            result = self.mint_once().await;
        }
        let label = RouteResult {
            route: self.route.clone(),
            result: match &result {
                Ok(_) => "ok".into(),
                Err(e) => e.kind().into(),
            },
        };
        self.metrics.oauth2_mints.get_or_create(&label).inc();
        match result {
            Ok(Fresh {
                issued,
                loaded,
                sent: now,
            }) => {
                let expires = issued.lifetime.map(|l| now + l);
                let renew = issued.lifetime.map(|l| {
                    let ahead = self.settings.refresh_ahead.min(l / 2);
                    now + (l - ahead).max(MIN_RENEW)
                });
                tracing::info!(route = %self.route, token_url = %self.url, reason,
                    expires_in_s = issued.lifetime.map(|l| l.as_secs()),
                    "OAuth2 access token minted");
                self.state.store(Some(Arc::new(Minted {
                    loaded,
                    at: now,
                    expires,
                    renew,
                })));
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                Ok(())
            }
            Err(e) => {
                let serving = self.current().is_some();
                tracing::warn!(route = %self.route, error = %e, error_kind = e.kind(), reason,
                    serving_current_token = serving, "OAuth2 token mint failed");
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e.clone());
                }
                Err(e)
            }
        }
    }

    /// One call to the token endpoint with the client credentials in force.
    async fn mint_once(&self) -> Result<Fresh, MintError> {
        let secret = self.entry.current().ok_or_else(|| {
            MintError::Credentials(format!("secret {:?} is not loaded", self.entry.secret_id))
        })?;
        let (id, client_secret) = client_credentials(&secret.value, &self.fields).map_err(|d| {
            MintError::Credentials(format!("secret {:?}: {d}", self.entry.secret_id))
        })?;
        let s = &self.settings;
        let mut fields: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &s.scope {
            fields.push(("scope", scope));
        }
        if let Some(audience) = &s.audience {
            fields.push(("audience", audience));
        }
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(s.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("keyproxy/", env!("CARGO_PKG_VERSION")));
        match s.client_auth {
            ClientAuth::Basic => {
                let mut v = http::HeaderValue::from_str(&endpoint::basic_auth(
                    id.expose(),
                    client_secret.expose(),
                ))
                .map_err(|_| {
                    MintError::Credentials("the client id or secret cannot be sent".into())
                })?;
                v.set_sensitive(true);
                req = req.header(AUTHORIZATION, v);
            }
            ClientAuth::Post => {
                fields.push(("client_id", id.expose()));
                fields.push(("client_secret", client_secret.expose()));
            }
        }
        let req = req
            .body(ProxyBody::full(endpoint::form_encode(&fields)))
            .map_err(|_| self.bad_answer("cannot build the request".into()))?;
        let sent = Instant::now();
        let answer = self.client.exchange(req).await.map_err(|e| match e {
            CallError::Timeout(timeout) => MintError::Timeout {
                url: self.url.clone(),
                timeout,
            },
            CallError::Failed(detail) => MintError::Unreachable {
                url: self.url.clone(),
                detail,
            },
        })?;
        if !(200..300).contains(&answer.status) {
            let hidden = [client_secret.expose(), id.expose()];
            let summary = endpoint::error_summary(&answer.body, &hidden)
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            let refused = answer.status == 401
                || endpoint::error_code(&answer.body).as_deref() == Some("invalid_client");
            let (url, status) = (self.url.clone(), answer.status);
            return Err(if refused {
                MintError::Refused {
                    url,
                    status,
                    summary,
                }
            } else {
                MintError::Status {
                    url,
                    status,
                    summary,
                }
            });
        }
        let issued = parse(&answer.body).map_err(|d| self.bad_answer(d))?;
        let cred = self
            .injection
            .render(&issued.token)
            .map_err(|e| self.bad_answer(format!("the access_token cannot be used: {e}")))?;
        let loaded = Arc::new(Loaded {
            version_id: secret.version_id.clone(),
            value: issued.token.clone(),
            creds: vec![cred],
            pending: None,
        });
        Ok(Fresh {
            issued,
            loaded,
            sent,
        })
    }

    fn bad_answer(&self, detail: String) -> MintError {
        MintError::Answer {
            url: self.url.clone(),
            detail,
        }
    }

    /// The background loop: the first mint once the client credentials are loaded, then each
    /// next one when due; after a failure, a full-jitter backoff (windows from 1 s, doubling, at
    /// most 10 s without a token in force, else at most half its time left, up to 60 s).
    pub async fn run(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            if self.entry.current().is_none() {
                // The entry's own task fetches it.
                tokio::time::sleep(CREDENTIALS_POLL).await;
                continue;
            }
            let now = Instant::now();
            let cur = self.state.load_full();
            if let Some(m) = cur.as_ref() {
                let due = m.renew.unwrap_or(now + IDLE);
                if m.valid(now) && due > now {
                    // A token in force and not due: it may have come from a 401 meanwhile.
                    failures = 0;
                    tokio::time::sleep_until(due.min(now + IDLE)).await;
                    continue;
                }
            }
            let wait = match self.mint_after(&cur).await {
                Ok(()) => {
                    failures = 0;
                    continue;
                }
                Err(_) => {
                    failures = failures.saturating_add(1);
                    let now = Instant::now();
                    let left = self
                        .state
                        .load()
                        .as_ref()
                        .filter(|m| m.valid(now))
                        .map(|m| {
                            m.expires
                                .map_or(RETRY_CAP, |e| e.saturating_duration_since(now))
                        });
                    let cap = match left {
                        Some(left) => (left / 2).clamp(Duration::from_secs(1), RETRY_CAP),
                        None => backoff::UNLOADED_CAP,
                    };
                    backoff::full_jitter(backoff::AFTER_FAILURE.window(failures, cap))
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A configuration's OAuth2 tokens, and their background tasks (aborted on drop, or by
/// [`Tokens::stop`]).
#[derive(Debug, Default)]
pub struct Tokens {
    list: Vec<Arc<Token>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Tokens {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Tokens {
    /// One token per OAuth2 route of `routes`, minted through `client` from the client
    /// credentials in the entry of the route's binding (`bindings`, in route order). Returns
    /// the tokens and each route's (`None`: not an OAuth2 route), in route order. Nothing is
    /// minted until [`Tokens::start`].
    pub fn new(
        routes: &[RouteConfig],
        bindings: &[Binding],
        client: &Arc<dyn Exchange>,
        metrics: &Arc<Metrics>,
    ) -> (Tokens, Vec<Option<Arc<Token>>>) {
        let mut tokens = Tokens::default();
        let each = routes
            .iter()
            .zip(bindings)
            .map(|(r, b)| {
                let settings = r.oauth2.as_ref()?;
                let token = Arc::new(Token::new(
                    r,
                    settings.clone(),
                    b.entry.clone(),
                    client.clone(),
                    metrics.clone(),
                ));
                tokens.list.push(token.clone());
                Some(token)
            })
            .collect();
        (tokens, each)
    }

    /// Starts each token of these (of a reloaded configuration) from `old`'s token for the same
    /// route, when nothing about how it is minted or presented changed ([`Token::seed_from`]).
    /// Call before [`Tokens::start`].
    pub fn keep(&self, old: &Tokens) {
        for t in &self.list {
            if let Some(prev) = old.list.iter().find(|p| p.route() == t.route()) {
                t.seed_from(prev);
            }
        }
    }

    /// Starts one background task per token.
    pub fn start(&mut self) {
        for t in &self.list {
            self.tasks.push(tokio::spawn(t.clone().run()));
        }
    }

    /// Stops the background tasks (a reload's new tokens take over); the tokens keep serving
    /// the requests still in flight.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// The tokens.
    pub fn list(&self) -> &[Arc<Token>] {
        &self.list
    }

    /// Whether every token is in force.
    pub fn ready(&self) -> bool {
        self.list.iter().all(|t| t.current().is_some())
    }
}

/// The token and its lifetime from a 2xx answer (RFC 6749 §5.1). The error says what is wrong,
/// never a value (a `token_type` is shown only as its letters, at most 32).
fn parse(body: &[u8]) -> Result<Issued, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| "the answer is not JSON")?;
    let Value::Object(obj) = doc else {
        return Err("the answer is not a JSON object".into());
    };
    let token = match obj.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => Secret::new(s.clone()),
        Some(_) => return Err("access_token is not a non-empty string".into()),
        None => return Err("the answer has no access_token".into()),
    };
    match obj.get("token_type") {
        None => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(t)) => {
            let shown: String = t
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_".contains(*c))
                .take(32)
                .collect();
            return Err(format!(
                "token_type {shown:?} is not Bearer (keyproxy injects bearer tokens only)"
            ));
        }
        Some(_) => return Err("token_type is not a string".into()),
    }
    let seconds = match obj.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => Some(
            s.trim()
                .parse::<f64>()
                .map_err(|_| "expires_in is not a number")?,
        ),
        Some(_) => return Err("expires_in is not a number".into()),
    };
    match seconds {
        None => Ok(Issued {
            token,
            lifetime: None,
        }),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Issued {
            token,
            lifetime: Some(Duration::from_secs_f64(s.min(MAX_DURATION.as_secs_f64()))),
        }),
        Some(_) => Err("expires_in is not a positive number".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::SecretCache;
    use crate::config::Config;
    use crate::secrets::file::FileSource;
    use base64::Engine;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A token endpoint: checks Basic client authentication, counts calls, answers after 50 ms.
    struct FakeEndpoint {
        calls: AtomicUsize,
        mints: AtomicUsize,
        lifetime_s: u64,
        /// `Some(status)`: every call fails with it.
        failing: Mutex<Option<u16>>,
        /// The client secret accepted.
        secret: Mutex<String>,
    }

    impl Exchange for FakeEndpoint {
        fn exchange(&self, req: Request<ProxyBody>) -> BoxFuture<'_, Result<Answer, CallError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                let answer = |status: u16, v: Value| {
                    Ok(Answer {
                        status,
                        body: v.to_string().into(),
                    })
                };
                if let Some(status) = *self.failing.lock().expect("lock") {
                    return answer(status, serde_json::json!({"error": "server_error"}));
                }
                let want = format!("i:{}", self.secret.lock().expect("lock"));
                let got = req
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()?.strip_prefix("Basic ").map(str::to_owned))
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
                if got.as_deref() != Some(want.as_bytes()) {
                    return answer(401, serde_json::json!({"error": "invalid_client"}));
                }
                let n = self.mints.fetch_add(1, Ordering::SeqCst) + 1;
                answer(
                    200,
                    serde_json::json!({"access_token": format!("t{n}"), "token_type": "bearer",
                        "expires_in": self.lifetime_s}),
                )
            })
        }
    }

    /// A started cache and tokens over one OAuth2 route (file source, secret `s`), and its token.
    fn setup(
        lifetime_s: u64,
        refresh_ahead: &str,
    ) -> (
        (SecretCache, Tokens),
        Arc<Token>,
        Arc<FakeEndpoint>,
        Scratch,
    ) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keyproxy-oauth2-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("secrets.json");
        write_client_secret(&file, "cs1");
        let text = format!(
            r#"[source]
type = "file"
path = "{}"
[[route]]
name = "crm"
path_prefix = "/crm"
upstream = "https://api.example.com"
secret_id = "s"
[route.oauth2]
token_url = "https://auth.example.com/token"
refresh_ahead = "{refresh_ahead}"
"#,
            file.display()
        );
        let config = Config::from_toml(&text, "t.toml", &dir, &HashMap::new()).expect("config");
        let metrics = Arc::new(Metrics::new());
        let source = Arc::new(FileSource::new(file.clone()));
        let (mut cache, bindings) = SecretCache::new(
            &config.routes,
            &crate::secrets::Sources::single(source),
            metrics.clone(),
        );
        let fake = Arc::new(FakeEndpoint {
            calls: AtomicUsize::new(0),
            mints: AtomicUsize::new(0),
            lifetime_s,
            failing: Mutex::new(None),
            secret: Mutex::new("cs1".into()),
        });
        let client: Arc<dyn Exchange> = fake.clone();
        let (mut tokens, each) = Tokens::new(&config.routes, &bindings, &client, &metrics);
        let token = each[0].clone().expect("token");
        cache.start();
        tokens.start();
        ((cache, tokens), token, fake, Scratch(file))
    }

    /// The secrets file, its folder removed on drop.
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn write_client_secret(file: &std::path::Path, secret: &str) {
        let value = serde_json::json!({"client_id": "i", "client_secret": secret}).to_string();
        std::fs::write(file, serde_json::json!({ "s": value }).to_string()).expect("write");
    }

    fn calls(f: &FakeEndpoint) -> usize {
        f.calls.load(Ordering::SeqCst)
    }

    fn token_of(l: &Loaded) -> &str {
        l.value.expose()
    }

    #[tokio::test(start_paused = true)]
    async fn one_mint_per_renewal_and_never_a_gap() {
        // 10 s tokens, refresh_ahead 60 s: capped at half the lifetime, so one mint per 5 s.
        let (_cache, token, fake, _f) = setup(10, "60s");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(token_of(&token.current().expect("first")), "t1");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            assert!(
                token.current().is_some(),
                "no token at {:?}",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let n = calls(&fake);
        assert!((12..=13).contains(&n), "{n} mints in 60.5 s");
        let st = token.status();
        assert!(st.ready && st.error.is_none());
        assert!(st.expires_in.is_some_and(|e| e <= Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_401s_share_one_mint_and_the_cooldown_holds() {
        let (_cache, token, fake, _f) = setup(3600, "60s");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let seen = token.current().expect("t1");
        assert_eq!(calls(&fake), 1);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (t, seen) = (token.clone(), seen.clone());
                tokio::spawn(async move { t.refresh_now(&seen).await })
            })
            .collect();
        for t in tasks {
            let got = t.await.expect("join").expect("token");
            assert_eq!(token_of(&got), "t2");
        }
        assert_eq!(calls(&fake), 2, "one mint for 100 401s");
        // The API refuses t2 too, at once: within refresh_cooldown (5 s) no other mint.
        let t2 = token.current().expect("t2");
        let got = token.refresh_now(&t2).await.expect("token");
        assert!(Arc::ptr_eq(&got, &t2));
        assert_eq!(calls(&fake), 2);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let got = token.refresh_now(&t2).await.expect("token");
        assert_eq!(token_of(&got), "t3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_backs_off_and_the_token_expires() {
        let (_cache, token, fake, _f) = setup(10, "60s");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(token.current().is_some());
        *fake.failing.lock().expect("lock") = Some(503);
        // The renewal at 5 s fails; the token is served until 10 s, then none.
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(token.current().is_some(), "served until it expires");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(token.current().is_none());
        let why = token.missing();
        assert!(
            why.contains("expired") && why.contains("https://auth.example.com/token answered 503"),
            "{why}"
        );
        assert_eq!(token.status().error.map(|e| e.kind()), Some("error_status"));
        // A minute of failures: windows of 1, 2, 4, 8, then 10 s; full jitter.
        let before = calls(&fake);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let n = calls(&fake) - before;
        assert!((5..=30).contains(&n), "{n} calls in 60 s");
        *fake.failing.lock().expect("lock") = None;
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(token.current().is_some(), "recovered");
        assert!(token.status().error.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_client_rereads_the_secret_and_mints_with_the_new_one() {
        let (_cache, token, fake, file) = setup(3600, "60s");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t1 = token.current().expect("t1");
        // The client secret rotates, and the endpoint takes only the new one. The file source
        // polls every second; the 401 comes first.
        write_client_secret(&file.0, "cs2");
        *fake.secret.lock().expect("lock") = "cs2".into();
        let got = token.refresh_now(&t1).await.expect("token");
        assert_eq!(token_of(&got), "t2");
        assert_eq!(calls(&fake), 3, "t1, the refused mint, the retry");
    }

    #[test]
    fn answers_are_parsed_by_rfc_6749() {
        let ok = |b: &str| parse(b.as_bytes()).expect(b);
        let t = ok(r#"{"access_token":"at1","token_type":"bearer","expires_in":3600}"#);
        assert_eq!(t.token.expose(), "at1");
        assert_eq!(t.lifetime, Some(Duration::from_secs(3600)));
        let t = ok(r#"{"access_token":"at1","token_type":"Bearer","expires_in":"2.5"}"#);
        assert_eq!(t.lifetime, Some(Duration::from_millis(2500)));
        assert_eq!(ok(r#"{"access_token":"at1"}"#).lifetime, None);
        for (body, why) in [
            ("nope", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"token":"x"}"#, "no access_token"),
            (r#"{"access_token":5}"#, "not a non-empty string"),
            (
                r#"{"access_token":"x","token_type":"mac"}"#,
                "\"mac\" is not Bearer",
            ),
            (
                r#"{"access_token":"x","expires_in":"soon"}"#,
                "not a number",
            ),
            (r#"{"access_token":"x","expires_in":0}"#, "not a positive"),
            (r#"{"access_token":"x","expires_in":[1]}"#, "not a number"),
        ] {
            let e = parse(body.as_bytes()).expect_err(body);
            assert!(e.contains(why), "{body}: {e}");
            assert!(!e.contains("\"x\""), "{e}");
        }
    }
}
