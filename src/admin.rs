//! The admin listener: `/healthz`, `/readyz`, `/metrics`.
//!
//! - `/healthz`: 200 while the process serves.
//! - `/readyz`: 200 once every route has a key; 503 naming the routes still waiting and why,
//!   or while shutting down. The JSON body lists each secret's state (never its value), and the
//!   configuration in force: its file, the SHA-256 of the file's bytes, and when it was loaded.
//! - `/metrics`: Prometheus text.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::cache::SecretCache;
use crate::metrics::Metrics;
use crate::reload::LoadedConfig;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    /// The secret cache (a reload replaces it).
    pub cache: ArcSwap<SecretCache>,
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
    let cache = state.cache.load();
    let secrets: Vec<_> = cache
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
            "config": state.config.load().summary(),
        }),
    )
}

/// Answers one admin request.
pub fn handle<B>(state: &AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
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
            state.cache.load().update_gauges(&state.metrics);
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}
