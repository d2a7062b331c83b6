//! The secret cache: one entry per (role, secret id, stage), shared by the routes that use it.
//! The role is the IAM role the secret is read with (`role_arn`; none: the base credentials),
//! so the same secret id in two accounts is two entries, each read through its role's source.
//!
//! Each [`Entry`] holds an `ArcSwapOption<Loaded>`: the credentials of every route using the
//! secret, rendered when the secret changes. The request path does one atomic load
//! ([`Entry::current`]) and never any I/O. One background task per entry refreshes it every
//! `refresh_interval` ± 10% jitter; a failure keeps the last good value (stale-if-error) and
//! retries after a full-jitter backoff ([`crate::backoff`]); a throttle closes the process-wide
//! [`ThrottleGate`] for every entry. A value that cannot be used (bad JSON, missing field, bytes
//! that cannot go in a header) is refused, logged with the secret id and the reason, and the last
//! good value stays. With `[aws] startup_jitter`, the first fetch waits a random part of it.
//!
//! [`SecretCache::new`] gives each route a [`Binding`]: its entry, and where its credential is
//! in the entry's [`Loaded::creds`]. An OAuth2 route (`[route.oauth2]`) renders nothing from
//! the secret: its entry holds the client credentials, checked for the route's two fields
//! ([`ClientUse`]; a version without them is refused like any unusable value). The access
//! token minted from them ([`crate::oauth2::Token`]) lives above the cache, which knows
//! nothing of tokens.
//!
//! [`Entry::refresh_now`] is the 401 path: concurrent callers share one fetch (they queue on one
//! async mutex and find the new value when they get it). A forced fetch that finds nothing newer
//! starts the `refresh_cooldown`: until it ends, or until a newer value is in force, no other
//! forced fetch of that secret happens, except the `AWSPENDING` probes of the 2 s after the miss,
//! which 401s wait for rather than fail. A forced fetch that finds a newer key starts no
//! cooldown, so back-to-back rotations each get their fetch.
//!
//! [`Entry::refresh_on_demand`] is `POST /refresh` (after a rotation, so the next request has
//! the new key without meeting a 401): one fetch under the same lock, at most one forced fetch
//! per `refresh_cooldown` (a 401's counts), none while Secrets Manager is throttling.
//!
//! A configuration reload builds a new cache from the old one ([`SecretCache::renew`]): an entry
//! for a (secret id, stage) the old cache held, from the same source, starts with the old value
//! (its text is kept in [`Loaded::value`]), rendered for its new set of routes without a fetch,
//! and keeps the old refresh schedule; only secrets new to the cache are fetched. The old cache's
//! refresh tasks stop, so a secret no route uses any more is no longer fetched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwapOption;
use rand::Rng;
use tokio::task::JoinHandle;

use crate::backoff::{self, ThrottleGate};
use crate::config::RouteConfig;
use crate::inject::{Credential, InjectError, Injection, Values};
use crate::metrics::{Metrics, SecretLabel, SecretResult, SecretVersionLabel};
use crate::secrets::aws::AssumeRole;
use crate::secrets::{Secret, SecretSource, SecretVersion, SourceError, Sources};

/// The credentials rendered from one version of a secret.
#[derive(Debug)]
pub struct Loaded {
    /// The version they came from.
    pub version_id: Option<String>,
    /// The secret's text as fetched, kept so that a credential built from it later (a route
    /// added by a reload, an OAuth2 token minted from client credentials) needs no new fetch.
    pub value: Secret,
    /// One credential per consumer (route), indexed by the route's slot.
    pub creds: Vec<Credential>,
    /// Set when these credentials come from `AWSPENDING` (see [`Entry::refresh_now`]).
    pub pending: Option<PendingHold>,
}

/// Why `AWSPENDING` credentials are in force: the `AWSCURRENT` version the API refused.
#[derive(Debug, Clone)]
pub struct PendingHold {
    /// The `AWSCURRENT` version that got the 401. While Secrets Manager still returns it as
    /// current (the rotation has not reached finishSecret), the pending credentials stay.
    pub refused_version: Option<String>,
    /// When the pending credentials were installed.
    pub since: Instant,
}

/// How long pending credentials may stand in for a refused current version at most.
const PENDING_HOLD_MAX: Duration = Duration::from_secs(3600);

/// A route's use of an entry: what `{secret}` stands for, and what is injected how. Each
/// version renders one [`Credential`] per consumer, every header of it from that version.
#[derive(Debug, Clone)]
pub struct Consumer {
    /// Route name (for log lines).
    pub route: String,
    /// JSON field `{secret}` stands for, or `None`: the whole text. `{secret.FIELD}` reads
    /// fields of the whole text either way.
    pub field: Option<String>,
    /// The headers and query parameter it sets, and their templates.
    pub injection: Injection,
}

/// An OAuth2 route's use of an entry: the client credentials' JSON fields, checked on every
/// version (nothing is rendered from them).
#[derive(Debug, Clone)]
pub struct ClientUse {
    /// Route name.
    pub route: String,
    /// JSON field holding the client id.
    pub id_field: String,
    /// JSON field holding the client secret.
    pub secret_field: String,
}

/// The client id and secret in a version's text, read as every `{secret.FIELD}` is
/// ([`Values`]: one JSON parse for both); the error says what is wrong, never a value.
pub fn client_credentials(value: &Secret, use_: &ClientUse) -> Result<(Secret, Secret), String> {
    let values = Values::new(value.expose(), None);
    let field = |name: &str| match values.field(name) {
        Ok("") => Err(format!("JSON field {name:?} is empty")),
        Ok(s) => Ok(Secret::new(s)),
        Err(InjectError::NotJson(_)) => {
            Err("the value is not JSON with client credentials".to_owned())
        }
        Err(InjectError::NotObject(_)) => {
            Err("the value is not a JSON object with client credentials".to_owned())
        }
        Err(e) => Err(e.to_string()),
    };
    Ok((field(&use_.id_field)?, field(&use_.secret_field)?))
}

/// What the admin endpoints report about an entry.
#[derive(Debug, Clone, Default)]
struct Health {
    /// When the last successful fetch finished.
    last_success: Option<Instant>,
    /// The last fetch's error, while it is the latest result.
    last_error: Option<SourceError>,
    /// When the background task fetches next (kept across a reload).
    next_fetch: Option<Instant>,
}

/// A snapshot of an entry's state for `/readyz` and `/metrics`.
#[derive(Debug, Clone)]
pub struct EntryStatus {
    /// Secret id.
    pub secret_id: String,
    /// Staging label.
    pub stage: String,
    /// The ARN of the role it is read with; `None`: the base credentials.
    pub role_arn: Option<String>,
    /// Routes that use it.
    pub routes: Vec<String>,
    /// Whether a usable value is loaded.
    pub loaded: bool,
    /// Version id served.
    pub version_id: Option<String>,
    /// Time since the last successful fetch.
    pub age: Option<Duration>,
    /// The latest error, if the latest fetch failed (the value served, if any, is stale).
    pub error: Option<SourceError>,
}

/// What one entry's `POST /refresh` did.
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// Secret id.
    pub secret_id: String,
    /// Staging label.
    pub stage: String,
    /// The ARN of the role it is read with; `None`: the base credentials.
    pub role_arn: Option<String>,
    /// The version in force when the refresh was asked for.
    pub before: Option<String>,
    /// The version in force after it.
    pub after: Option<String>,
    /// Whether the version in force changed meanwhile.
    pub changed: bool,
    /// No fetch: another forced fetch happened within `refresh_cooldown`, or Secrets Manager
    /// is throttling this process.
    pub rate_limited: bool,
    /// The fetch's error (the version in force, if any, stays).
    pub error: Option<SourceError>,
}

/// State guarded by the fetch lock.
#[derive(Debug, Default)]
struct FetchState {
    /// The last forced (401) fetch that found nothing newer: when it started, and the value in
    /// force after it. The cooldown runs from then while that value stays in force: a newer
    /// value, however it arrived, lifts it.
    fruitless: Option<(Instant, Arc<Loaded>)>,
    /// Until when 401s wait for `AWSPENDING` probes inside the cooldown (after a miss).
    probe_until: Option<Instant>,
    /// When `AWSPENDING` was last read on the 401 path.
    last_probe: Option<Instant>,
    /// When the last forced fetch (a 401's, or `POST /refresh`'s) started: an on-demand
    /// refresh within `refresh_cooldown` of it is rate limited.
    last_forced: Option<Instant>,
}

/// After a 401 found neither a new `AWSCURRENT` nor an `AWSPENDING` version, a rotation may be
/// between its token endpoint issuing the new key (and revoking the old one) and
/// `PutSecretValue` storing it: for this long, further 401s wait for probes of `AWSPENDING`
/// (and of `AWSCURRENT` when there is no `AWSPENDING`: the rotation may have finished since)...
const PROBE_WINDOW: Duration = Duration::from_secs(2);
/// ...at most one per this gap: at most 4 probes of 2 reads, so with the forced fetch's 2 reads
/// at most 10 per `refresh_cooldown` for a key that no rotation replaces.
const PROBE_GAP: Duration = Duration::from_millis(500);

/// What reading `AWSPENDING` on the 401 path found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingRead {
    /// A version other than the refused one, now in force.
    Installed,
    /// No `AWSPENDING` version: no rotation in progress, or one that has not stored its key yet,
    /// or one that has finished.
    Absent,
    /// Nothing usable (the refused version itself, an unusable value, or an error).
    Nothing,
}

/// An entry's identity: (role, secret id, stage).
type EntryKey<'a> = (Option<&'a AssumeRole>, &'a str, &'a str);

/// One secret version stage, its rendered credentials, and its refresh machinery.
pub struct Entry {
    /// Secret id.
    pub secret_id: String,
    /// Staging label.
    pub stage: String,
    /// The role it is read with (`role_arn`); `None`: the base credentials.
    pub role: Option<AssumeRole>,
    consumers: Vec<Consumer>,
    /// OAuth2 routes whose client credentials this entry holds.
    clients: Vec<ClientUse>,
    state: ArcSwapOption<Loaded>,
    health: Mutex<Health>,
    /// Held during every fetch: the single-flight point.
    fetch_lock: tokio::sync::Mutex<FetchState>,
    interval: Duration,
    cooldown: Duration,
    /// Try `AWSPENDING` when a 401 persists with the current version (stage `AWSCURRENT` only).
    pending_fallback: bool,
    /// The process-wide pause after a throttle, shared by every entry.
    gate: Arc<ThrottleGate>,
    source: Arc<dyn SecretSource>,
    metrics: Arc<Metrics>,
    label: SecretLabel,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("secret_id", &self.secret_id)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

/// The key inside a secret's text: the JSON `field` of it, or the whole text. The error says
/// why the value cannot be used, never what it is.
pub fn extract(value: &Secret, field: Option<&str>) -> Result<Secret, String> {
    Values::new(value.expose(), field)
        .secret()
        .map(Secret::new)
        .map_err(|e| e.to_string())
}

impl Entry {
    /// The credentials in force, for the request path: one atomic load, no lock.
    #[inline]
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.state.load_full()
    }

    /// Whether Secrets Manager is throttling this process (no extra read should be made).
    pub fn throttled(&self) -> bool {
        self.gate.closed_for().is_some()
    }

    /// Whether a usable value is loaded.
    pub fn is_loaded(&self) -> bool {
        self.state.load().is_some()
    }

    /// Why [`Entry::current`] has nothing: the last error, or that it is still being fetched.
    pub fn missing(&self) -> String {
        let error = self.health.lock().ok().and_then(|h| h.last_error.clone());
        match error {
            Some(e) => e.to_string(),
            None => format!("secret {:?} is still being fetched", self.secret_id),
        }
    }

    /// The entry's state for the admin endpoints.
    pub fn status(&self) -> EntryStatus {
        let health = self.health.lock().map(|h| h.clone()).unwrap_or_default();
        let cur = self.current();
        EntryStatus {
            secret_id: self.secret_id.clone(),
            stage: self.stage.clone(),
            role_arn: self.role.as_ref().map(|r| r.role_arn.clone()),
            routes: self
                .consumers
                .iter()
                .map(|c| c.route.clone())
                .chain(self.clients.iter().map(|c| c.route.clone()))
                .collect(),
            loaded: cur.is_some(),
            version_id: cur.and_then(|c| c.version_id.clone()),
            age: health.last_success.map(|t| t.elapsed()),
            error: health.last_error,
        }
    }

    fn count(&self, result: &str) {
        self.metrics
            .fetches
            .get_or_create(&SecretResult {
                secret: self.secret_id.clone(),
                stage: self.stage.clone(),
                result: result.to_owned(),
            })
            .inc();
    }

    fn record_error(&self, err: SourceError) {
        self.count(err.kind());
        let stale = self.is_loaded();
        let error_kind = err.kind();
        if stale {
            tracing::warn!(secret = %self.secret_id, stage = %self.stage, error = %err, error_kind,
                "secret refresh failed; serving the last good value");
        } else {
            tracing::warn!(secret = %self.secret_id, stage = %self.stage, error = %err, error_kind,
                "secret fetch failed; routes using it answer 503 until it succeeds");
        }
        self.metrics
            .secret_stale
            .get_or_create(&self.label)
            .set(i64::from(stale));
        if let Ok(mut h) = self.health.lock() {
            h.last_error = Some(err);
        }
    }

    /// One read of `stage`, with the throttle gate's bookkeeping: a throttle closes the gate for
    /// every entry of the process; an answer from Secrets Manager opens it.
    async fn call(&self, stage: &str) -> Result<SecretVersion, SourceError> {
        let started = Instant::now();
        let result = self.source.fetch(&self.secret_id, stage).await;
        match &result {
            Err(SourceError::Throttled { .. }) => {
                let cap = backoff::cap(self.is_loaded(), self.interval);
                let wait = self.gate.throttled(started, cap);
                tracing::debug!(secret = %self.secret_id, stage, error_kind = "throttled",
                    streak = self.gate.streak(), wait_ms = wait.as_millis() as u64,
                    "Secrets Manager is throttling: no call from this process until the wait is over");
            }
            // No answer from Secrets Manager (STS refusing a role is not one either).
            Err(
                SourceError::Timeout { .. }
                | SourceError::Unreachable { .. }
                | SourceError::AssumeRole { .. }
                | SourceError::Other { .. },
            ) => {}
            Ok(_) | Err(_) => self.gate.answered(),
        }
        result
    }

    /// Fetches once and installs the value if usable. Callers hold `fetch_lock`.
    async fn fetch_locked(&self, reason: &'static str) -> Result<(), SourceError> {
        let fetched = match self.call(&self.stage).await {
            Ok(v) => v,
            Err(e) => {
                self.record_error(e.clone());
                return Err(e);
            }
        };
        let creds = self.render(&fetched.value)?;
        let current = self.current();
        if let Some(hold) = current.as_ref().and_then(|c| c.pending.as_ref()) {
            if fetched.version_id == hold.refused_version && hold.since.elapsed() < PENDING_HOLD_MAX
            {
                // The rotation has not finished: the refused version is still AWSCURRENT.
                self.count("unchanged");
                self.mark_success();
                return Ok(());
            }
        }
        // The text counts too: client credentials render nothing, and a source without
        // version ids (a file) changes only its text.
        let changed = current.as_ref().is_none_or(|c| {
            c.creds != creds
                || c.version_id != fetched.version_id
                || c.value != fetched.value
                || c.pending.is_some()
        });
        if changed {
            let old_version = current.as_ref().and_then(|c| c.version_id.clone());
            tracing::info!(secret = %self.secret_id, stage = %self.stage,
                version = fetched.version_id.as_deref().unwrap_or("-"),
                previous = old_version.as_deref().unwrap_or("-"), reason,
                "secret loaded");
            self.set_version_metric(old_version.as_deref(), fetched.version_id.as_deref());
            self.state.store(Some(Arc::new(Loaded {
                version_id: fetched.version_id,
                value: fetched.value,
                creds,
                pending: None,
            })));
        } else {
            tracing::debug!(secret = %self.secret_id, stage = %self.stage, reason, "secret unchanged");
        }
        self.count(if changed { "ok" } else { "unchanged" });
        self.mark_success();
        Ok(())
    }

    fn mark_success(&self) {
        self.metrics.secret_stale.get_or_create(&self.label).set(0);
        if let Ok(mut h) = self.health.lock() {
            h.last_success = Some(Instant::now());
            h.last_error = None;
        }
    }

    fn set_version_metric(&self, old: Option<&str>, new: Option<&str>) {
        if let Some(v) = old {
            self.metrics.secret_version.remove(&SecretVersionLabel {
                secret: self.secret_id.clone(),
                stage: self.stage.clone(),
                version_id: v.to_owned(),
            });
        }
        self.metrics
            .secret_version
            .get_or_create(&SecretVersionLabel {
                secret: self.secret_id.clone(),
                stage: self.stage.clone(),
                version_id: new.unwrap_or_default().to_owned(),
            })
            .set(1);
    }

    /// Renders every consumer's credential from `value` (one version: every header of a route
    /// from the same text), or refuses the value (recorded; the last good value stays).
    fn render(&self, value: &Secret) -> Result<Vec<Credential>, SourceError> {
        self.try_render(value)
            .inspect_err(|err| self.record_error(err.clone()))
    }

    /// Renders every consumer's credential from `value`, or says why it cannot be used.
    fn try_render(&self, value: &Secret) -> Result<Vec<Credential>, SourceError> {
        self.check_clients(value)?;
        let mut creds = Vec::with_capacity(self.consumers.len());
        for c in &self.consumers {
            let values = Values::new(value.expose(), c.field.as_deref());
            match c.injection.render_values(&values) {
                Ok(cred) => creds.push(cred),
                Err(e) => {
                    let err = SourceError::Invalid {
                        id: self.secret_id.clone(),
                        detail: format!("refused for route {:?}: {e}", c.route),
                    };
                    return Err(err);
                }
            }
        }
        Ok(creds)
    }

    /// Refuses `value` if an OAuth2 route cannot read its client credentials in it.
    fn check_clients(&self, value: &Secret) -> Result<(), SourceError> {
        for c in &self.clients {
            if let Err(detail) = client_credentials(value, c) {
                return Err(SourceError::Invalid {
                    id: self.secret_id.clone(),
                    detail: format!(
                        "refused for route {:?} (OAuth2 client credentials): {detail}",
                        c.route
                    ),
                });
            }
        }
        Ok(())
    }

    /// After a 401 that a fresh `AWSCURRENT` did not fix: installs the `AWSPENDING` version, if
    /// there is one that differs from `seen`. Callers hold `fetch_lock`.
    async fn try_pending_locked(&self, seen: &Arc<Loaded>) -> PendingRead {
        let result = self.call("AWSPENDING").await;
        let label = SecretResult {
            secret: self.secret_id.clone(),
            stage: "AWSPENDING".into(),
            result: match &result {
                Ok(_) => "ok".into(),
                Err(e) => e.kind().into(),
            },
        };
        self.metrics.fetches.get_or_create(&label).inc();
        let fetched = match result {
            Ok(v) => v,
            Err(SourceError::NotFound { .. }) => {
                tracing::debug!(secret = %self.secret_id, "no AWSPENDING version: no rotation in progress, or not stored yet, or finished");
                return PendingRead::Absent;
            }
            Err(e) => {
                tracing::warn!(secret = %self.secret_id, error = %e, error_kind = e.kind(),
                    "reading AWSPENDING after a 401 failed");
                return PendingRead::Nothing;
            }
        };
        if fetched.version_id == seen.version_id {
            return PendingRead::Nothing;
        }
        let Ok(creds) = self.render(&fetched.value) else {
            return PendingRead::Nothing;
        };
        if creds == seen.creds {
            return PendingRead::Nothing;
        }
        tracing::info!(secret = %self.secret_id,
            version = fetched.version_id.as_deref().unwrap_or("-"),
            refused = seen.version_id.as_deref().unwrap_or("-"),
            "the API refused the AWSCURRENT key and a rotation is in progress: using the AWSPENDING version until AWSCURRENT moves");
        self.set_version_metric(seen.version_id.as_deref(), fetched.version_id.as_deref());
        self.state.store(Some(Arc::new(Loaded {
            version_id: fetched.version_id,
            value: fetched.value,
            creds,
            pending: Some(PendingHold {
                refused_version: seen.version_id.clone(),
                since: Instant::now(),
            }),
        })));
        PendingRead::Installed
    }

    /// A probe inside the window after a miss: `AWSPENDING`, and `AWSCURRENT` when there is no
    /// `AWSPENDING` (the rotation may have finished since the last read). Callers hold
    /// `fetch_lock`.
    async fn probe_locked(&self, seen: &Arc<Loaded>) {
        if self.try_pending_locked(seen).await == PendingRead::Absent {
            let _ = self.fetch_locked("401").await;
        }
    }

    /// Fetches now (background refresh): waits for a fetch already running, then fetches.
    pub async fn refresh(&self) -> Result<(), SourceError> {
        let _guard = self.fetch_lock.lock().await;
        self.fetch_locked("refresh").await
    }

    /// The 401 path: the credentials in `seen` were refused upstream. Returns the credentials to
    /// use now, which are `seen` itself when nothing newer could be had: Secrets Manager still
    /// holds the same value and the cooldown of a fruitless fetch holds, or Secrets Manager is
    /// throttling this process. Right after a fruitless fetch, while a rotation may be about to
    /// store its key, the caller may wait up to `PROBE_WINDOW` (2 s) for the probes.
    pub async fn refresh_now(&self, seen: &Arc<Loaded>) -> Option<Arc<Loaded>> {
        // Newer means other credentials, not just another `Arc`: a pending value re-stored as
        // plain current (same key) must not count, or the AWSPENDING lookup would be skipped.
        let newer = |cur: &Option<Arc<Loaded>>| {
            cur.as_ref()
                .is_some_and(|c| !Arc::ptr_eq(c, seen) && c.creds != seen.creds)
        };
        let cur = self.current();
        if newer(&cur) {
            return cur;
        }
        loop {
            let mut guard = self.fetch_lock.lock().await;
            let cur = self.current();
            if newer(&cur) {
                return cur;
            }
            if self.gate.closed_for().is_some() {
                // Secrets Manager is throttling this process: the 401 path adds no call.
                return cur;
            }
            let now = Instant::now();
            let cooling = guard.fruitless.as_ref().is_some_and(|(t, v)| {
                now - *t < self.cooldown && cur.as_ref().is_some_and(|c| c.creds == v.creds)
            });
            if !cooling {
                guard.fruitless = None;
                guard.probe_until = None;
                guard.last_forced = Some(now);
                let _ = self.fetch_locked("401").await;
                let mut pending = PendingRead::Nothing;
                if self.pending_fallback && !newer(&self.current()) {
                    guard.last_probe = Some(Instant::now());
                    pending = self.try_pending_locked(seen).await;
                }
                let cur = self.current();
                if newer(&cur) {
                    // Found: no cooldown, so the next rotation's 401s get their fetch too.
                    return cur;
                }
                guard.fruitless = cur.clone().map(|c| (now, c));
                if !self.pending_fallback || pending == PendingRead::Installed {
                    return cur;
                }
                guard.probe_until = Some(Instant::now() + PROBE_WINDOW);
            }
            // Inside the cooldown: only the probes of the window after the miss read again, and
            // 401s wait for them rather than fail while a rotation may be storing its key.
            let now = Instant::now();
            let Some(until) = guard.probe_until.filter(|u| now < *u) else {
                return self.current();
            };
            let next = guard.last_probe.map_or(now, |t| t + PROBE_GAP);
            if now >= next {
                guard.last_probe = Some(now);
                self.probe_locked(seen).await;
                let cur = self.current();
                if newer(&cur) {
                    guard.fruitless = None;
                    guard.probe_until = None;
                    return cur;
                }
                continue;
            }
            drop(guard);
            tokio::time::sleep_until(next.min(until)).await;
        }
    }

    /// `POST /refresh`: fetches the entry's stage now, unless a forced fetch (this one's or a
    /// 401's) happened within `refresh_cooldown`, or Secrets Manager is throttling the process:
    /// then it answers with the version in force and says it was rate limited. Single flight
    /// with the 401 path and the background refresh (the same fetch lock).
    pub async fn refresh_on_demand(&self) -> Refreshed {
        let before = self.current().and_then(|c| c.version_id.clone());
        let mut guard = self.fetch_lock.lock().await;
        let now = Instant::now();
        let recent = guard.last_forced.is_some_and(|t| now - t < self.cooldown);
        let mut outcome = Refreshed {
            secret_id: self.secret_id.clone(),
            stage: self.stage.clone(),
            role_arn: self.role.as_ref().map(|r| r.role_arn.clone()),
            before,
            after: None,
            changed: false,
            rate_limited: false,
            error: None,
        };
        if recent || self.gate.closed_for().is_some() {
            tracing::info!(secret = %self.secret_id, stage = %self.stage,
                throttled = !recent, "refresh on demand rate limited: serving the version in force");
            outcome.rate_limited = true;
        } else {
            guard.last_forced = Some(now);
            if let Err(e) = self.fetch_locked("on demand").await {
                outcome.error = Some(e);
            }
        }
        drop(guard);
        outcome.after = self.current().and_then(|c| c.version_id.clone());
        outcome.changed = outcome.after != outcome.before;
        outcome
    }

    /// The background loop: wait `startup` (the start-up jitter), then fetch, and sleep
    /// `interval` ± 10% after a success, or a full-jitter backoff after a failure: the throttle
    /// gate's wait after a throttle, else a window from 1 s, doubling per failure in a row.
    async fn run(self: Arc<Self>, startup: Duration) {
        if !startup.is_zero() {
            tokio::time::sleep(startup).await;
        }
        let mut failures = 0u32;
        loop {
            // Another entry's call may have been throttled while this one slept.
            while let Some(wait) = self.gate.closed_for() {
                self.sleep(wait).await;
            }
            let wait = match self.refresh().await {
                Ok(()) => {
                    failures = 0;
                    jitter(self.interval)
                }
                Err(SourceError::Throttled { .. }) => {
                    failures = failures.saturating_add(1);
                    self.gate.closed_for().unwrap_or_default()
                }
                Err(_) => {
                    failures = failures.saturating_add(1);
                    let cap = backoff::cap(self.is_loaded(), self.interval);
                    backoff::full_jitter(backoff::AFTER_FAILURE.window(failures, cap))
                }
            };
            self.sleep(wait).await;
        }
    }

    /// The background task's sleep until its next fetch, noted for a reload to keep.
    async fn sleep(&self, wait: Duration) {
        if let Ok(mut h) = self.health.lock() {
            h.next_fetch = Some(Instant::now() + wait);
        }
        tokio::time::sleep(wait).await;
    }

    /// How long until the background task's next fetch, if it is sleeping.
    fn next_fetch_in(&self) -> Option<Duration> {
        let h = self.health.lock().ok()?;
        h.next_fetch
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// What identifies the entry across a reload: (role, secret id, stage).
    fn key(&self) -> EntryKey<'_> {
        (
            self.role.as_ref(),
            self.secret_id.as_str(),
            self.stage.as_str(),
        )
    }

    /// Starts this new entry from `old`'s value, rendered for this entry's routes, and `old`'s
    /// health. `false`: `old` has no value, or it cannot be used for these routes (recorded as
    /// a fetch would be), and this entry starts empty.
    fn seed_from(&self, old: &Entry) -> bool {
        let health = old.health.lock().map(|h| h.clone()).unwrap_or_default();
        if let Ok(mut h) = self.health.lock() {
            *h = health;
        }
        let Some(loaded) = old.current() else {
            return false;
        };
        let creds = match self.try_render(&loaded.value) {
            Ok(creds) => creds,
            Err(e) => {
                tracing::warn!(secret = %self.secret_id, stage = %self.stage, error = %e,
                    "the loaded value does not fit the reloaded routes; fetching it again");
                return false;
            }
        };
        self.state.store(Some(Arc::new(Loaded {
            version_id: loaded.version_id.clone(),
            value: loaded.value.clone(),
            creds,
            pending: loaded.pending.clone(),
        })));
        true
    }

    /// Drops this entry's gauges (a reload left no route using it).
    fn forget_metrics(&self) {
        self.metrics.secret_stale.remove(&self.label);
        self.metrics.secret_age.remove(&self.label);
        if let Some(v) = self.current().and_then(|c| c.version_id.clone()) {
            self.metrics.secret_version.remove(&SecretVersionLabel {
                secret: self.secret_id.clone(),
                stage: self.stage.clone(),
                version_id: v,
            });
        }
    }
}

/// `d` ± 10%.
fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::rng().random_range(0.9..=1.1);
    d.mul_f64(f)
}

/// A route's place in the cache: the entry it reads, and where its credential is in that
/// entry's [`Loaded::creds`].
#[derive(Debug, Clone)]
pub struct Binding {
    /// The shared entry: the key's secret, or an OAuth2 route's client credentials.
    pub entry: Arc<Entry>,
    /// Index into [`Loaded::creds`]; `None` for an OAuth2 route, which renders nothing from its
    /// entry (so it never reads another route's credential).
    pub index: Option<usize>,
}

impl Binding {
    /// The route's credential in `loaded` (`None` for an OAuth2 route).
    #[inline]
    pub fn credential<'a>(&self, loaded: &'a Loaded) -> Option<&'a Credential> {
        loaded.creds.get(self.index?)
    }
}

/// All entries, and the background tasks that refresh them (aborted on drop).
#[derive(Debug)]
pub struct SecretCache {
    entries: Vec<Arc<Entry>>,
    /// Per entry, the wait before its task's first fetch when it has one already (an entry
    /// carried over by a reload, or fetched by [`SecretCache::warm`]); `None`: fetch at start.
    first_fetch: Vec<Option<Duration>>,
    tasks: Vec<JoinHandle<()>>,
    /// The longest random delay before the first fetch (the source's start-up jitter).
    startup_jitter: Duration,
    /// The pause after a throttle, shared by every entry (and kept by a reload).
    gate: Arc<ThrottleGate>,
}

impl Drop for SecretCache {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SecretCache {
    /// Builds one entry per (role, secret id, stage) over `routes`, each reading from its role's
    /// source in `sources`, returning the cache and each route's binding (in route order). Nothing
    /// is fetched until [`SecretCache::start`].
    pub fn new(
        routes: &[RouteConfig],
        sources: &Sources,
        metrics: Arc<Metrics>,
    ) -> (SecretCache, Vec<Binding>) {
        SecretCache::build(routes, sources, metrics, Arc::default())
    }

    /// The cache for a reloaded configuration, built from this one: each entry this cache also
    /// has (same role, secret id and stage) starts with its value, rendered for the entry's new routes
    /// without a fetch, and its refresh schedule, when `same_source` (else every secret is
    /// fetched anew from `source`). This cache's refresh tasks stop now; its entries keep
    /// serving the requests still in flight on the old routes. Start the new cache with
    /// [`SecretCache::start`] (after [`SecretCache::warm`], to have the new secrets first).
    pub fn renew(
        &self,
        routes: &[RouteConfig],
        sources: &Sources,
        same_source: bool,
        metrics: Arc<Metrics>,
    ) -> (SecretCache, Vec<Binding>) {
        for t in &self.tasks {
            t.abort();
        }
        let gate = if same_source {
            self.gate.clone()
        } else {
            Arc::default()
        };
        let (mut cache, bindings) = SecretCache::build(routes, sources, metrics, gate);
        cache.startup_jitter = Duration::ZERO;
        let old: HashMap<EntryKey<'_>, &Arc<Entry>> =
            self.entries.iter().map(|e| (e.key(), e)).collect();
        let mut kept = std::collections::HashSet::new();
        for (e, first) in cache.entries.iter().zip(cache.first_fetch.iter_mut()) {
            let key = e.key();
            let Some(prev) = old.get(&key).filter(|_| same_source) else {
                continue;
            };
            kept.insert(key);
            if e.seed_from(prev) {
                // The old schedule, or the new interval if that is shorter.
                let next = prev.next_fetch_in().unwrap_or(Duration::ZERO);
                *first = Some(next.min(e.interval));
            }
        }
        for e in &self.entries {
            if !kept.contains(&e.key()) {
                e.forget_metrics();
            }
        }
        (cache, bindings)
    }

    /// Fetches, once and together, every entry that has no value to start from (a secret new
    /// to the cache), waiting at most `within`; the entries fetched start their refresh
    /// schedule from now. The others are fetched by their task once started.
    pub async fn warm(&mut self, within: Duration) {
        let todo: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.first_fetch[i].is_none())
            .collect();
        let fetches = todo.iter().map(|&i| {
            let e = self.entries[i].clone();
            async move { e.refresh().await.is_ok() }
        });
        let Ok(done) = tokio::time::timeout(within, futures_util::future::join_all(fetches)).await
        else {
            return;
        };
        for (i, ok) in todo.into_iter().zip(done) {
            if ok {
                self.first_fetch[i] = Some(jitter(self.entries[i].interval));
            }
        }
    }

    fn build(
        routes: &[RouteConfig],
        sources: &Sources,
        metrics: Arc<Metrics>,
        gate: Arc<ThrottleGate>,
    ) -> (SecretCache, Vec<Binding>) {
        type Key = (Option<AssumeRole>, String, String);
        let mut groups: Vec<(Key, Vec<usize>)> = Vec::new();
        let mut index: HashMap<Key, usize> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            let key = (r.role.clone(), r.secret_id.clone(), r.version_stage.clone());
            let g = *index.entry(key.clone()).or_insert_with(|| {
                groups.push((key, Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i);
        }
        let mut bindings: Vec<Option<Binding>> = vec![None; routes.len()];
        let mut entries = Vec::new();
        for ((role, secret_id, stage), members) in groups {
            let source = sources.get(role.as_ref());
            let (clients, renders): (Vec<usize>, Vec<usize>) =
                members.iter().partition(|&&i| routes[i].oauth2.is_some());
            let clients_of = clients;
            let clients = clients_of
                .iter()
                .filter_map(|&i| {
                    let o = routes[i].oauth2.as_ref()?;
                    Some(ClientUse {
                        route: routes[i].name.clone(),
                        id_field: o.client_id_field.clone(),
                        secret_field: o.client_secret_field.clone(),
                    })
                })
                .collect();
            let consumers = renders
                .iter()
                .map(|&i| Consumer {
                    route: routes[i].name.clone(),
                    field: routes[i].secret_field.clone(),
                    injection: routes[i].injection.clone(),
                })
                .collect();
            let mut interval = members
                .iter()
                .map(|&i| routes[i].refresh_interval)
                .min()
                .unwrap_or(Duration::from_secs(300));
            if let Some(p) = source.poll_interval() {
                interval = interval.min(p);
            }
            let cooldown = members
                .iter()
                .map(|&i| routes[i].refresh_cooldown)
                .min()
                .unwrap_or_default();
            let pending_fallback =
                stage == "AWSCURRENT" && members.iter().any(|&i| routes[i].pending_fallback);
            let label = SecretLabel {
                secret: secret_id.clone(),
                stage: stage.clone(),
            };
            let entry = Arc::new(Entry {
                secret_id,
                stage,
                role,
                consumers,
                clients,
                state: ArcSwapOption::empty(),
                health: Mutex::new(Health::default()),
                fetch_lock: tokio::sync::Mutex::new(FetchState::default()),
                interval,
                cooldown,
                pending_fallback,
                gate: gate.clone(),
                source: source.clone(),
                metrics: metrics.clone(),
                label,
            });
            for (index, &i) in renders.iter().enumerate() {
                bindings[i] = Some(Binding {
                    entry: entry.clone(),
                    index: Some(index),
                });
            }
            for &i in &clients_of {
                bindings[i] = Some(Binding {
                    entry: entry.clone(),
                    index: None,
                });
            }
            entries.push(entry);
        }
        let bindings = bindings.into_iter().flatten().collect();
        (
            SecretCache {
                first_fetch: vec![None; entries.len()],
                entries,
                tasks: Vec::new(),
                startup_jitter: sources.base().startup_jitter(),
                gate,
            },
            bindings,
        )
    }

    /// Starts one background refresh task per entry. The first fetch begins at once, or, with a
    /// start-up jitter, after a delay drawn once for the process from `[0, startup_jitter]`; an
    /// entry that has a value already (see [`SecretCache::renew`]) keeps its schedule.
    pub fn start(&mut self) {
        let delay = backoff::full_jitter(self.startup_jitter);
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                startup_jitter_ms = self.startup_jitter.as_millis() as u64,
                "start-up jitter: the first Secrets Manager call waits"
            );
        }
        for (e, first) in self.entries.iter().zip(&self.first_fetch) {
            let wait = first.unwrap_or(delay);
            if let Ok(mut h) = e.health.lock() {
                h.next_fetch = Some(Instant::now() + wait);
            }
            self.tasks.push(tokio::spawn(e.clone().run(wait)));
        }
    }

    /// The entries.
    pub fn entries(&self) -> &[Arc<Entry>] {
        &self.entries
    }

    /// Whether every entry has a usable value.
    pub fn ready(&self) -> bool {
        self.entries.iter().all(|e| e.is_loaded())
    }

    /// `POST /refresh`: every entry (or those of secret id `only`) refreshed on demand, at
    /// once. `None`: no entry has that secret id.
    pub async fn refresh_on_demand(&self, only: Option<&str>) -> Option<Vec<Refreshed>> {
        let chosen: Vec<_> = self
            .entries
            .iter()
            .filter(|e| only.is_none_or(|id| e.secret_id == id))
            .collect();
        if chosen.is_empty() && only.is_some() {
            return None;
        }
        Some(futures_util::future::join_all(chosen.iter().map(|e| e.refresh_on_demand())).await)
    }

    /// Updates the scrape-time gauges (age of each secret).
    pub fn update_gauges(&self, metrics: &Metrics) {
        for e in &self.entries {
            let s = e.status();
            if let Some(age) = s.age {
                metrics
                    .secret_age
                    .get_or_create(&e.label)
                    .set(age.as_secs_f64());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_upstream;
    use crate::inject::Template;
    use futures_util::future::BoxFuture;
    use http::header::HeaderName;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A source whose value and failure the test sets, counting fetches.
    struct FakeSource {
        value: Mutex<Result<(String, String), SourceError>>,
        pending: Mutex<Option<(String, String)>>,
        fetches: AtomicUsize,
        /// When each fetch started.
        starts: Mutex<Vec<Instant>>,
        delay: Duration,
        startup_jitter: Duration,
    }

    impl FakeSource {
        fn new(v: &str) -> Arc<FakeSource> {
            Self::with_startup_jitter(v, Duration::ZERO)
        }
        fn with_startup_jitter(v: &str, startup_jitter: Duration) -> Arc<FakeSource> {
            Arc::new(FakeSource {
                value: Mutex::new(Ok((v.to_owned(), "v1".to_owned()))),
                pending: Mutex::new(None),
                fetches: AtomicUsize::new(0),
                starts: Mutex::new(Vec::new()),
                delay: Duration::from_millis(50),
                startup_jitter,
            })
        }
        fn set(&self, v: &str, version: &str) {
            *self.value.lock().expect("lock") = Ok((v.to_owned(), version.to_owned()));
        }
        fn fail(&self) {
            self.fail_with(SourceError::Throttled {
                id: "s".into(),
                detail: "ThrottlingException".into(),
            });
        }
        fn fail_with(&self, e: SourceError) {
            *self.value.lock().expect("lock") = Err(e);
        }
        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    impl SecretSource for FakeSource {
        fn fetch<'a>(
            &'a self,
            _id: &'a str,
            stage: &'a str,
        ) -> BoxFuture<'a, Result<SecretVersion, SourceError>> {
            Box::pin(async move {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                self.starts.lock().expect("lock").push(Instant::now());
                tokio::time::sleep(self.delay).await;
                let v = if stage == "AWSPENDING" {
                    self.pending
                        .lock()
                        .expect("lock")
                        .clone()
                        .ok_or(SourceError::NotFound {
                            id: "s".into(),
                            detail: "no AWSPENDING".into(),
                        })
                } else {
                    self.value.lock().expect("lock").clone()
                };
                v.map(|(value, version)| SecretVersion {
                    version_id: Some(version),
                    value: Secret::new(value),
                })
            })
        }
        fn startup_jitter(&self) -> Duration {
            self.startup_jitter
        }
        fn name(&self) -> &'static str {
            "fake"
        }
    }

    fn route(name: &str, field: Option<&str>) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            path_prefix: Some(format!("/{name}")),
            host: None,
            upstream: parse_upstream("http://127.0.0.1:1").expect("upstream"),
            secret_id: "s".into(),
            version_stage: "AWSCURRENT".into(),
            secret_field: field.map(str::to_owned),
            injection: Injection::header(
                HeaderName::from_static("authorization"),
                Template::parse("Bearer {secret}").expect("t"),
            ),
            allow: None,
            refresh_interval: Duration::from_secs(60),
            refresh_cooldown: Duration::from_secs(5),
            pending_fallback: true,
            retry_on_401: true,
            http2: true,
            max_replay_body: 1024,
            timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            oauth2: None,
            role: None,
        }
    }

    /// A cache over one route, with `value` loaded: (source, cache, entry, loaded value).
    async fn loaded(value: &str) -> (Arc<FakeSource>, SecretCache, Arc<Entry>, Arc<Loaded>) {
        let src = FakeSource::new(value);
        let (cache, slots) = SecretCache::new(
            &[route("a", None)],
            &Sources::single(src.clone()),
            Arc::new(Metrics::new()),
        );
        let e = slots[0].entry.clone();
        e.refresh().await.expect("first");
        let seen = e.current().expect("loaded");
        (src, cache, e, seen)
    }

    fn header(l: &Loaded, i: usize) -> String {
        let c = &l.creds[i];
        match c.headers().first() {
            Some((_, v)) => v.to_str().expect("ascii").to_owned(),
            None => c
                .query()
                .map(|(_, pair)| pair.to_owned())
                .unwrap_or_default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn routes_share_one_entry_and_render_their_field() {
        let src = FakeSource::new(r#"{"token":"t1","other":"o1"}"#);
        let (cache, slots) = SecretCache::new(
            &[route("a", Some("token")), route("b", Some("other"))],
            &Sources::single(src.clone()),
            Arc::new(Metrics::new()),
        );
        assert_eq!(cache.entries().len(), 1);
        let e = &slots[0].entry;
        e.refresh().await.expect("fetch");
        let l = e.current().expect("loaded");
        assert_eq!(header(&l, slots[0].index.expect("key route")), "Bearer t1");
        assert_eq!(header(&l, slots[1].index.expect("key route")), "Bearer o1");
        assert!(cache.ready());
    }

    #[tokio::test(start_paused = true)]
    async fn unusable_values_keep_the_last_good_one() {
        let src = FakeSource::new(r#"{"token":"good"}"#);
        let (_cache, slots) = SecretCache::new(
            &[route("a", Some("token"))],
            &Sources::single(src.clone()),
            Arc::new(Metrics::new()),
        );
        let e = &slots[0].entry;
        e.refresh().await.expect("first");
        for (bad, why) in [
            ("not json", "not JSON"),
            (r#"{"other":"x"}"#, "missing"),
            (r#"{"token":5}"#, "not a string"),
            (r#"{"token":"a\r\nX-Evil: 1"}"#, "CR or LF"),
            (r#"{"token":""}"#, "empty"),
        ] {
            src.set(bad, "v2");
            let err = e.refresh().await.expect_err("refused");
            assert!(err.to_string().contains(why), "{bad}: {err}");
            assert!(!err.to_string().contains("Evil"));
            assert_eq!(header(&e.current().expect("kept"), 0), "Bearer good");
            assert!(e.status().error.is_some());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_oauth2_route_needs_its_client_credentials_and_renders_nothing() {
        let mut oauth = route("crm", None);
        oauth.oauth2 = Some(crate::config::OAuth2Config {
            token_url: "https://auth.example/token".parse().expect("uri"),
            scope: None,
            audience: None,
            client_auth: crate::config::ClientAuth::Basic,
            client_id_field: "client_id".into(),
            client_secret_field: "client_secret".into(),
            refresh_ahead: Duration::from_secs(60),
        });
        let src = FakeSource::new(r#"{"client_id":"i","client_secret":"cs_1"}"#);
        let (_c, slots) = SecretCache::new(
            &[route("a", Some("client_id")), oauth],
            &Sources::single(src.clone()),
            Arc::new(Metrics::new()),
        );
        let e = &slots[1].entry;
        assert!(Arc::ptr_eq(e, &slots[0].entry), "one entry for the secret");
        e.refresh().await.expect("first");
        let l = e.current().expect("loaded");
        assert_eq!(l.creds.len(), 1, "only the key route renders");
        assert_eq!(header(&l, slots[0].index.expect("key route")), "Bearer i");
        // The OAuth2 route has no credential in the entry, never the other route's.
        assert!(slots[1].index.is_none());
        assert!(slots[1].credential(&l).is_none());
        assert_eq!(e.status().routes, vec!["a", "crm"]);
        for (bad, why) in [
            (r#"{"client_id":"i"}"#, "\"client_secret\" is missing"),
            (r#"{"client_id":"i","client_secret":7}"#, "not a string"),
            (r#"{"client_id":"i","client_secret":""}"#, "is empty"),
            ("cs_plain", "not JSON with client credentials"),
            ("[1]", "not a JSON object"),
        ] {
            src.set(bad, "v2");
            let err = e.refresh().await.expect_err("refused").to_string();
            assert!(err.contains(why) && err.contains("crm"), "{bad}: {err}");
            assert!(!err.contains("cs_plain"), "{err}");
            assert!(Arc::ptr_eq(&e.current().expect("kept"), &l));
        }
        // A new client secret under the same version id (a file source) is still taken.
        src.set(r#"{"client_id":"i","client_secret":"cs_2"}"#, "v1");
        e.refresh().await.expect("new text");
        assert!(e.current().expect("l").value.expose().contains("cs_2"));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_serve_stale_and_recover() {
        let src = FakeSource::new("k1");
        let (_c, slots) = SecretCache::new(
            &[route("a", None)],
            &Sources::single(src.clone()),
            Arc::new(Metrics::new()),
        );
        let e = &slots[0].entry;
        e.refresh().await.expect("first");
        src.fail();
        assert_eq!(e.refresh().await.expect_err("fail").kind(), "throttled");
        assert_eq!(header(&e.current().expect("stale"), 0), "Bearer k1");
        src.set("k2", "v2");
        e.refresh().await.expect("recovered");
        assert_eq!(header(&e.current().expect("new"), 0), "Bearer k2");
        assert!(e.status().error.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_401s_share_one_fetch() {
        let (src, _c, e, seen) = loaded("k1").await;
        src.set("k2", "v2");
        let before = src.fetches();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (e, seen) = (e.clone(), seen.clone());
            tasks.push(tokio::spawn(async move { e.refresh_now(&seen).await }));
        }
        for t in tasks {
            let got = t.await.expect("join").expect("loaded");
            assert_eq!(header(&got, 0), "Bearer k2");
        }
        assert_eq!(src.fetches() - before, 1);
        // A late 401 with the old key: the new one, without a fetch.
        let got = e.refresh_now(&seen).await.expect("loaded");
        assert_eq!(header(&got, 0), "Bearer k2");
        assert_eq!(src.fetches() - before, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_fruitless_fetch_starts_the_cooldown() {
        let (src, _c, e, seen) = loaded("k1").await;
        src.set("k2", "v2");
        let before = src.fetches();
        let k2 = e.refresh_now(&seen).await.expect("loaded");
        assert_eq!(header(&k2, 0), "Bearer k2");
        // The fetch found k2: no cooldown, so a 401 for k2 right away fetches again (another
        // rotation may have happened), finds nothing (AWSCURRENT and AWSPENDING: 2 reads) and
        // waits for the probes of the window (AWSPENDING absent, then AWSCURRENT: 2 reads each).
        let start = Instant::now();
        let got = e.refresh_now(&k2).await.expect("loaded");
        assert!(Arc::ptr_eq(&got, &k2));
        assert!(start.elapsed() <= PROBE_WINDOW + Duration::from_millis(500));
        let after_miss = src.fetches() - before;
        assert!(
            (1 + 2 + 2..=1 + 2 + 8).contains(&after_miss),
            "{after_miss}"
        );
        // That miss started the cooldown: no fetch and no wait until it ends.
        let got = e.refresh_now(&k2).await.expect("loaded");
        assert!(Arc::ptr_eq(&got, &k2));
        assert_eq!(src.fetches() - before, after_miss);
        // A newer key in force lifts the cooldown at once (here by the background refresh).
        src.set("k3", "v3");
        e.refresh().await.expect("refresh");
        let k3 = e.current().expect("k3");
        src.set("k4", "v4");
        let got = e.refresh_now(&k3).await.expect("loaded");
        assert_eq!(header(&got, 0), "Bearer k4");
    }

    #[tokio::test(start_paused = true)]
    async fn back_to_back_rotations_each_get_their_fetch_under_the_default_cooldown() {
        let (src, _c, e, mut seen) = loaded("k0").await;
        let before = src.fetches();
        for n in 1..=20 {
            // A rotation every 0.3 s; the API refuses the key keyproxy holds.
            tokio::time::advance(Duration::from_millis(300)).await;
            src.set(&format!("k{n}"), &format!("v{n}"));
            let got = e.refresh_now(&seen).await.expect("loaded");
            assert_eq!(header(&got, 0), format!("Bearer k{n}"));
            seen = got;
        }
        assert_eq!(src.fetches() - before, 20, "one fetch per rotation");
    }

    #[tokio::test(start_paused = true)]
    async fn pending_version_stands_in_until_awscurrent_moves() {
        let (src, _c, e, seen) = loaded("k1").await;
        // No rotation in progress: a 401 fetches AWSCURRENT and AWSPENDING, then the probes of
        // the window find nothing newer either.
        let got = e.refresh_now(&seen).await.expect("loaded");
        assert!(Arc::ptr_eq(&got, &seen));
        // createSecret done (API revoked k1 on issue), finishSecret not yet.
        *src.pending.lock().expect("lock") = Some(("k2".into(), "v2".into()));
        tokio::time::advance(Duration::from_secs(6)).await;
        let got = e.refresh_now(&seen).await.expect("loaded");
        assert_eq!(header(&got, 0), "Bearer k2");
        assert!(got.pending.is_some());
        // Background refresh while AWSCURRENT is still the refused v1: k2 stays.
        e.refresh().await.expect("refresh");
        assert_eq!(header(&e.current().expect("l"), 0), "Bearer k2");
        // finishSecret: AWSCURRENT moves to v2; the entry becomes a plain current one.
        src.set("k2", "v2");
        e.refresh().await.expect("refresh");
        let l = e.current().expect("l");
        assert_eq!(header(&l, 0), "Bearer k2");
        assert!(l.pending.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_before_the_pending_key_is_stored_waits_for_it() {
        let (src, _c, e, seen) = loaded("k1").await;
        // The token endpoint issued k2 (and revoked k1); PutSecretValue has not happened yet.
        let before = src.fetches();
        let first = {
            let (e, seen) = (e.clone(), seen.clone());
            tokio::spawn(async move { e.refresh_now(&seen).await })
        };
        // More 401s meanwhile: they wait too, and read nothing themselves.
        let others: Vec<_> = (0..10)
            .map(|_| {
                let (e, seen) = (e.clone(), seen.clone());
                tokio::spawn(async move { e.refresh_now(&seen).await })
            })
            .collect();
        // The put lands 300 ms later; the probe at 500 ms finds it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(src.fetches() - before, 2, "AWSCURRENT + AWSPENDING");
        *src.pending.lock().expect("lock") = Some(("k2".into(), "v2".into()));
        for t in std::iter::once(first).chain(others) {
            let got = t.await.expect("join").expect("l");
            assert_eq!(header(&got, 0), "Bearer k2");
        }
        assert_eq!(src.fetches() - before, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_finds_a_rotation_that_finished_in_between() {
        let (src, _c, e, seen) = loaded("k1").await;
        let waiting = {
            let (e, seen) = (e.clone(), seen.clone());
            tokio::spawn(async move { e.refresh_now(&seen).await })
        };
        // Put, test and finish all happen before the first probe: AWSPENDING is gone again and
        // AWSCURRENT holds the new key.
        tokio::time::sleep(Duration::from_millis(300)).await;
        src.set("k2", "v2");
        let got = waiting.await.expect("join").expect("l");
        assert_eq!(header(&got, 0), "Bearer k2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lasting_401_costs_a_bounded_number_of_fetches() {
        let (src, _c, e, seen) = loaded("k1").await;
        let before = src.fetches();
        // A 401 every 10 ms for three cooldowns (5 s each): per cooldown, the forced fetch and
        // its AWSPENDING read, then at most 4 probes of 2 reads.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(4900) {
            e.refresh_now(&seen).await;
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let n = src.fetches() - before;
        assert!((2..=10).contains(&n), "{n} fetches in the first cooldown");
        while start.elapsed() < Duration::from_millis(14900) {
            e.refresh_now(&seen).await;
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let n = src.fetches() - before;
        assert!((6..=30).contains(&n), "{n} fetches in three cooldowns");
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_on_demand_is_single_flight_and_shares_the_401_cooldown() {
        let (src, _c, e, _) = loaded("k1").await;
        src.set("k2", "v2");
        let before = src.fetches();
        let calls: Vec<_> = (0..5)
            .map(|_| {
                let e = e.clone();
                tokio::spawn(async move { e.refresh_on_demand().await })
            })
            .collect();
        let mut limited = 0;
        for c in calls {
            let r = c.await.expect("join");
            assert_eq!(r.after.as_deref(), Some("v2"));
            assert!(r.error.is_none());
            limited += usize::from(r.rate_limited);
        }
        assert_eq!(
            limited, 4,
            "one fetch, the others wait for it and are rate limited"
        );
        assert_eq!(src.fetches() - before, 1);
        // After the cooldown: a 401's forced fetch starts it again for on-demand refreshes.
        tokio::time::advance(Duration::from_secs(6)).await;
        src.set("k3", "v3");
        let k2 = e.current().expect("k2");
        let got = e.refresh_now(&k2).await.expect("l");
        assert_eq!(header(&got, 0), "Bearer k3");
        let n = src.fetches();
        let r = e.refresh_on_demand().await;
        assert!(r.rate_limited && !r.changed);
        assert_eq!(src.fetches(), n);
        // A throttled process makes no on-demand call either.
        tokio::time::advance(Duration::from_secs(6)).await;
        src.fail();
        e.refresh().await.expect_err("throttled");
        let n = src.fetches();
        assert!(e.refresh_on_demand().await.rate_limited);
        assert_eq!(src.fetches(), n);
    }

    /// Entries over one route each (secret ids `a` and `b`); the fake ignores the id.
    fn two_secrets(src: Arc<FakeSource>) -> (SecretCache, Vec<Binding>) {
        let mut b = route("b", None);
        b.secret_id = "b".into();
        SecretCache::new(
            &[route("a", None), b],
            &Sources::single(src),
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn background_task_backs_off_with_full_jitter() {
        let src = FakeSource::new("k1");
        src.fail_with(SourceError::Unreachable {
            id: "s".into(),
            detail: "connection refused".into(),
        });
        let (mut cache, slots) = SecretCache::new(
            &[route("a", None)],
            &Sources::single(src.clone()),
            Arc::new(Metrics::new()),
        );
        cache.start();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!cache.ready());
        // Windows 1, 2, 4, 8, then 10 s without a value: each wait is at most its window, so at
        // least 8 attempts in 60 s; full jitter averages half a window, so about 14.
        let n = src.fetches();
        assert!((8..=40).contains(&n), "{n} fetches in 60 s");
        src.set("k1", "v1");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(cache.ready());
        src.set("k2", "v2");
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert_eq!(
            header(&slots[0].entry.current().expect("l"), 0),
            "Bearer k2"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_pauses_every_entry_of_the_process_in_rounds() {
        let src = FakeSource::new("k1");
        src.fail();
        let (mut cache, slots) = two_secrets(src.clone());
        cache.start();
        let gate = slots[0].entry.gate.clone();
        assert!(Arc::ptr_eq(&gate, &slots[1].entry.gate));
        // A minute of throttling: windows of 6, 9, then 10 s; the two entries call together, and
        // each round (both calls in flight together) counts once.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let starts = src.starts.lock().expect("lock").clone();
        assert!((2 * 7..=2 * 30).contains(&starts.len()), "{starts:?}");
        for pair in starts.chunks(2) {
            assert_eq!(pair.len(), 2);
            assert_eq!(pair[0], pair[1], "one round for both entries: {starts:?}");
        }
        let rounds = starts.len() / 2;
        assert!(
            (rounds - 1..=rounds).contains(&(gate.streak() as usize)),
            "{} rounds, streak {}",
            rounds,
            gate.streak()
        );
        src.set("k2", "v2");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(cache.ready());
        assert!(gate.closed_for().is_none());
        assert_eq!(gate.streak(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_401_path_adds_no_call_while_throttled() {
        let (src, _c, e, seen) = loaded("k1").await;
        src.fail();
        e.refresh().await.expect_err("throttled");
        assert!(e.gate.closed_for().is_some());
        let n = src.fetches();
        let got = e.refresh_now(&seen).await.expect("l");
        assert!(Arc::ptr_eq(&got, &seen));
        assert_eq!(src.fetches(), n);
        // Once the gate opens, a 401 fetches again.
        tokio::time::sleep(e.gate.closed_for().unwrap_or_default()).await;
        src.set("k2", "v2");
        let got = e.refresh_now(&seen).await.expect("l");
        assert_eq!(header(&got, 0), "Bearer k2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_cache_reuses_values_and_schedules_and_fetches_only_new_secrets() {
        let src = FakeSource::new(r#"{"token":"t1","other":"o1"}"#);
        let metrics = Arc::new(Metrics::new());
        let (mut old, old_slots) = SecretCache::new(
            &[route("a", Some("token"))],
            &Sources::single(src.clone()),
            metrics.clone(),
        );
        old.start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(old.ready());
        let fetched = src.fetches();
        // 20 s into a 60 s interval: `a` changes, `b` reads another field of the same secret,
        // `c` is a new secret.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let mut a = route("a", Some("other"));
        a.injection = Injection::header(
            HeaderName::from_static("x-key"),
            Template::parse("K {secret}").expect("t"),
        );
        let mut c = route("c", None);
        c.secret_id = "c".into();
        let routes = [a, route("b", Some("token")), c];
        let (mut new, slots) = old.renew(
            &routes,
            &Sources::single(src.clone()),
            true,
            metrics.clone(),
        );
        let kept = slots[0].entry.current().expect("seeded, no fetch");
        assert_eq!(header(&kept, slots[0].index.expect("key route")), "K o1");
        assert_eq!(
            header(&kept, slots[1].index.expect("key route")),
            "Bearer t1"
        );
        assert!(slots[2].entry.current().is_none());
        assert_eq!(
            src.fetches(),
            fetched,
            "nothing fetched for the kept secret"
        );
        new.warm(Duration::from_secs(5)).await;
        assert_eq!(src.fetches(), fetched + 1, "the new secret, once");
        assert!(new.ready());
        new.start();
        // The old task stopped; the kept entry's next fetch is where the old schedule put it
        // (54..66 s after its first fetch at 0 s: 33..45 s from the renewal at 21 s), not a
        // fresh interval (54..66 s from the renewal).
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(src.fetches(), fetched + 1);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(
            src.fetches(),
            fetched + 2,
            "one fetch for the kept secret, none by the old task"
        );
        assert!(
            old_slots[0].entry.current().is_some(),
            "old routes still served"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_cache_with_another_source_fetches_everything() {
        let src = FakeSource::new("k1");
        let metrics = Arc::new(Metrics::new());
        let (mut old, _slots) = SecretCache::new(
            &[route("a", None)],
            &Sources::single(src.clone()),
            metrics.clone(),
        );
        old.start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let other = FakeSource::new("k2");
        let (mut new, slots) = old.renew(
            &[route("a", None)],
            &Sources::single(other.clone()),
            false,
            metrics,
        );
        assert!(slots[0].entry.current().is_none());
        new.warm(Duration::from_secs(5)).await;
        assert_eq!(
            header(&slots[0].entry.current().expect("l"), 0),
            "Bearer k2"
        );
        assert_eq!(other.fetches(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn startup_jitter_delays_the_first_fetch_once_for_the_process() {
        let src = FakeSource::with_startup_jitter("k1", Duration::from_secs(10));
        let (mut cache, _slots) = two_secrets(src.clone());
        let start = Instant::now();
        cache.start();
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(cache.ready());
        let starts = src.starts.lock().expect("lock").clone();
        assert_eq!(starts.len(), 2);
        assert!(starts[0] - start <= Duration::from_secs(10));
        assert_eq!(starts[0], starts[1], "one delay for the process");
    }
}
