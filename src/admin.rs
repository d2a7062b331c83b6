//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `POST /refresh`.
//!
//! - `/healthz`: 200 while the process serves.
//! - `/readyz`: 200 once every route has a key (an OAuth2 route: a token in force); 503 naming
//!   the routes still waiting and why, or while shutting down. The JSON body lists each
//!   secret's state and each OAuth2 token's (never a value), and the configuration in force: its
//!   file, the SHA-256 of the file's bytes, and when it was loaded.
//! - `/metrics`: Prometheus text.
//! - `POST /refresh` (`?secret=ID` for one secret id): re-fetches now, under the 401 path's
//!   rate limit ([`crate::cache::Entry::refresh_on_demand`]); JSON with each secret's version
//!   before and after. An unknown id: 404 naming it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::config::LoadedConfig;
use crate::credentials::Credentials;
use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    /// The secret cache and the OAuth2 tokens (a reload replaces both at once).
    pub credentials: ArcSwap<Credentials>,
    /// The configuration in force (a reload replaces it).
    pub config: ArcSwap<LoadedConfig>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Set once shutdown begins: `/readyz` answers 503.
    pub draining: AtomicBool,
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The readiness report: (ready, JSON body).
pub fn readiness(state: &AdminState) -> (bool, serde_json::Value) {
    let mut waiting = Vec::new();
    let credentials = state.credentials.load();
    let secrets: Vec<_> = credentials
        .secrets
        .entries()
        .iter()
        .map(|e| {
            let s = e.status();
            if !s.loaded {
                waiting.extend(s.routes.iter().cloned());
            }
            json!({
                "secret": s.secret_id,
                "stage": s.stage,
                "role": s.role_arn,
                "routes": s.routes,
                "loaded": s.loaded,
                "stale": s.loaded && s.error.is_some(),
                "version_id": s.version_id,
                "age_seconds": s.age.map(|a| a.as_secs()),
                "error": s.error.as_ref().map(|e| e.to_string()),
                "error_kind": s.error.as_ref().map(|e| e.kind()),
            })
        })
        .collect();
    let tokens: Vec<_> = credentials
        .tokens
        .list()
        .iter()
        .map(|t| {
            let s = t.status();
            if !s.ready && !waiting.contains(&s.route) {
                waiting.push(s.route.clone());
            }
            json!({
                "route": s.route,
                "token_url": s.token_url,
                "ready": s.ready,
                "minted_age_seconds": s.age.map(|a| a.as_secs()),
                "expires_in_seconds": s.expires_in.map(|e| e.as_secs()),
                "error": s.error.as_ref().map(|e| e.to_string()),
                "error_kind": s.error.as_ref().map(|e| e.kind()),
            })
        })
        .collect();
    let draining = state.draining.load(Ordering::Relaxed);
    let ready = waiting.is_empty() && !draining;
    let reason = if draining {
        Some("shutting down".to_string())
    } else if !waiting.is_empty() {
        Some(format!("no key yet for route(s): {}", waiting.join(", ")))
    } else {
        None
    };
    (
        ready,
        json!({
            "status": if ready { "ready" } else { "not_ready" },
            "reason": reason,
            "waiting": waiting,
            "secrets": secrets,
            "tokens": tokens,
            "config": state.config.load().summary(),
        }),
    )
}

/// The `secret` parameter of a query string, percent-decoded (`+` is a space).
fn secret_param(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let value = pair.strip_prefix("secret=")?.replace('+', " ");
        Some(
            percent_encoding::percent_decode_str(&value)
                .decode_utf8_lossy()
                .into_owned(),
        )
    })
}

/// `POST /refresh[?secret=ID]`.
async fn refresh(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let only = secret_param(query);
    let Some(done) = state
        .credentials
        .load()
        .refresh_on_demand(only.as_deref())
        .await
    else {
        let id = only.unwrap_or_default();
        let body = json!({
            "error": format!("no secret {id:?} in the configuration"),
            "secret": id,
        });
        return reply(
            StatusCode::NOT_FOUND,
            "application/json",
            body.to_string() + "\n",
        );
    };
    let secrets: Vec<_> = done
        .iter()
        .map(|r| {
            json!({
                "secret": r.secret_id,
                "stage": r.stage,
                "role": r.role_arn,
                "version_before": r.before,
                "version_after": r.after,
                "changed": r.changed,
                "rate_limited": r.rate_limited,
                "error": r.error.as_ref().map(|e| e.to_string()),
                "error_kind": r.error.as_ref().map(|e| e.kind()),
            })
        })
        .collect();
    let ok = done.iter().all(|r| r.error.is_none());
    let body = json!({ "ok": ok, "secrets": secrets });
    reply(StatusCode::OK, "application/json", body.to_string() + "\n")
}

/// Answers one admin request.
pub async fn handle<B>(state: &AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/refresh" {
        if req.method() != Method::POST {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "POST only\n".into(),
            );
        }
        return refresh(state, req.uri().query()).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => reply(
            StatusCode::OK,
            "application/json",
            "{\"status\":\"ok\"}\n".into(),
        ),
        "/readyz" => {
            let (ready, body) = readiness(state);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", body.to_string() + "\n")
        }
        "/metrics" => {
            state
                .credentials
                .load()
                .secrets
                .update_gauges(&state.metrics);
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /healthz, /readyz, /metrics or POST /refresh\n".into(),
        ),
    }
}
