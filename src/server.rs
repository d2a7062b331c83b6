//! Wiring: bind the listeners, start the credentials (secret cache, OAuth2 tokens), serve until
//! shutdown, drain.
//!
//! [`run`] builds everything from a validated configuration ([`LoadedConfig`]), binds both
//! listeners (the app's and the admin's; TCP or Unix sockets, see [`crate::listener`]), fetches
//! secrets (and mints OAuth2 tokens) in the background, starts the [`Reloader`] (SIGHUP and file
//! changes), and serves until `shutdown` resolves. Then it stops accepting (removing a socket
//! file), turns `/readyz` to 503, lets in-flight requests finish for up to `drain_timeout` (of
//! the configuration in force), and returns.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::admin::{self, AdminState};
use crate::assemble;
use crate::config::Listen;
use crate::config::{ConfigFile, LoadedConfig};
use crate::credentials::Credentials;
use crate::drain::Drain;
use crate::error::ProxyError;
use crate::forward;
use crate::h1::{self, Rewind, Served};
use crate::limits::{HEAD_TIMEOUT, MAX_HEADER_BYTES};
use crate::listener::{BindError, Listener};
use crate::metrics::Metrics;
use crate::proxy;
use crate::reload::Reloader;
use crate::routes::{RouteTable, Routes};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// `listen` or `admin_listen`.
        what: &'static str,
        /// The address.
        addr: Listen,
        /// What went wrong.
        source: BindError,
    },
    /// The upstream client could not be built.
    #[error(transparent)]
    Client(#[from] forward::ClientError),
}

/// Binds a listener and returns it with its address (the port the system picked for port 0).
async fn bind(
    what: &'static str,
    addr: &Listen,
    mode: u32,
) -> Result<(Listener, Listen), RunError> {
    let fail = |source| RunError::Bind {
        what,
        addr: addr.clone(),
        source,
    };
    let listener = Listener::bind(addr, mode).await.map_err(fail)?;
    let local = listener.local().map_err(|e| fail(e.into()))?;
    Ok((listener, local))
}

/// Runs the proxy with `loaded` (read from `from`, which a reload reads again) until `shutdown`
/// resolves, then drains.
pub async fn run(
    loaded: LoadedConfig,
    from: ConfigFile,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let config = loaded.config.clone();
    let metrics = Arc::new(Metrics::new());
    let tls = forward::tls_config(config.ca_bundle.as_deref())?;
    let (app_listener, app_addr) = bind("listen", &config.listen, config.listen_mode).await?;
    let (admin_listener, admin_addr) =
        bind("admin_listen", &config.admin_listen, config.listen_mode).await?;

    let sources = assemble::sources(&config).await;
    // OAuth2 routes: the token endpoint speaks HTTP/1.1 like any small API.
    let token_client = assemble::token_client(&config, &tls);
    let (mut credentials, slots) =
        Credentials::new(&config.routes, &sources, metrics.clone(), &token_client);
    credentials.start();
    let routes = Routes::from_config(&config, slots, metrics.clone(), &tls);
    let table = Arc::new(RouteTable::new(Arc::new(routes)));
    // The general engine, built once: its clones share the in-flight request limit.
    let general = proxy::stack(table.clone(), config.max_connections);
    let admin_state = Arc::new(AdminState {
        credentials: ArcSwap::from_pointee(credentials),
        config: ArcSwap::from_pointee(loaded),
        metrics: metrics.clone(),
        draining: AtomicBool::new(false),
    });
    let reloader = Reloader::new(
        from,
        table.clone(),
        admin_state.clone(),
        sources.clone(),
        tls,
        metrics.clone(),
    );

    // A Unix socket is guarded by its file's permissions instead.
    let exposed = app_addr.tcp().is_some_and(|a| !a.ip().is_loopback());
    if exposed && config.app_auth.is_none() {
        tracing::warn!(addr = %app_addr,
            "the app listener is not on loopback and no app token is required: anything that can reach this address can use the keys; set [app_auth] or listen on 127.0.0.1");
    }
    let anyone = app_addr.unix().is_some() && config.listen_mode & 0o002 != 0;
    if anyone && config.app_auth.is_none() {
        tracing::warn!(addr = %app_addr, mode = %format!("{:04o}", config.listen_mode),
            "listen_mode lets any local user connect to the app socket and no app token is required; use 0660 or set [app_auth]");
    }
    assemble::warn_plain_http(&config);
    tracing::info!(addr = %app_addr, "app listener ready");
    tracing::info!(addr = %admin_addr, "admin listener ready");
    tracing::info!(routes = config.routes.len(), source = sources.base().name(), config = %config.origin, "keyproxy started");

    let admin_task = tokio::spawn(serve_admin(admin_listener, admin_state.clone()));
    let reload_task = tokio::spawn(reloader.watch());

    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    http.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let drain = Arc::new(Drain::default());
    let limit = Arc::new(Semaphore::new(config.max_connections));

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = app_listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tracing::warn!(peer = %peer, max = config.max_connections, "connection refused: max_connections reached");
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    stream.write_all(&ProxyError::Overloaded.raw_http1()),
                )
                .await;
            });
            continue;
        };
        let general = general.clone();
        let table = table.clone();
        let drain = drain.clone();
        let http = http.clone();
        let gauge = metrics.connections.clone();
        gauge.inc();
        tokio::spawn(async move {
            // HTTP/1.1 to plain-http upstreams on the fast path; the rest of a connection goes
            // to hyper from the first request the fast path does not take.
            if let Served::Handoff(stream, read) = h1::serve(&table, stream, &drain).await {
                let svc = TowerToHyperService::new(general);
                let conn = http.serve_connection(TokioIo::new(Rewind::new(stream, read)), svc);
                let mut conn = std::pin::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    () = drain.wait() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(peer = %peer, error = %e, "app connection ended with an error");
                }
            }
            gauge.dec();
            drop(permit);
        });
    }

    admin_state.draining.store(true, Ordering::Relaxed);
    reload_task.abort();
    drop(app_listener);
    let drain_timeout = admin_state.config.load().config.drain_timeout;
    tracing::info!(drain_timeout = %humantime::format_duration(drain_timeout),
        "shutting down: no new connections; waiting for requests in flight");
    drain.start();
    // Every connection holds a permit until it ends: all of them back means all closed.
    let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = limit.acquire_many(all) => tracing::info!("all connections closed"),
        () = tokio::time::sleep(drain_timeout) => tracing::warn!("drain timeout reached; closing the remaining connections"),
    }
    admin_task.abort();
    // The admin listener (and a Unix socket file) is gone once the task is.
    let _ = admin_task.await;
    Ok(())
}

async fn serve_admin(listener: Listener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(admin::handle(&state, &req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
