//! Configuration reload without a restart: on SIGHUP, and when the config file's bytes change.
//!
//! [`ConfigFile`] knows where the configuration comes from and reads it again; [`LoadedConfig`]
//! is a validated configuration with the SHA-256 of the file's bytes and the time it was loaded
//! (what `/readyz` shows). [`Reloader`] owns the watching: it polls the file every
//! [`POLL`] through its path (so a Kubernetes ConfigMap update, which swaps the `..data`
//! symlink, is seen like any edit or atomic rename) and compares checksums, and it listens for
//! SIGHUP. Unchanged bytes: nothing happens.
//!
//! A reload validates the whole file first, as `keyproxy check` does. Invalid: the running
//! configuration stays, one error line lists every problem, and
//! `keyproxy_config_reloads_total{result="error"}` counts it. Valid: the secret cache and the
//! OAuth2 tokens are renewed together ([`crate::credentials::Credentials::renew`]: secrets the
//! old routes already had are not fetched again, tokens minted and presented the same way are
//! carried over; new secrets are fetched before the new routes go live, for up to
//! [`WARM_WITHIN`]) and swapped in at once for the admin endpoints, the new route table
//! is swapped in ([`RouteTable::replace`]; a route whose upstream did not change keeps its
//! upstream connections, [`crate::routes::Routes::renew`]), and `result="ok"` counts it. Both engines read the
//! table once per request, so a keep-alive connection's next request uses the new routes;
//! requests in flight finish on the old ones, and no connection is closed.
//!
//! What a reload applies: routes (added, changed, removed), their secrets and settings,
//! `[app_auth]`, `access_log`, `connect_timeout`, `ca_bundle`, `drain_timeout`, and the secret
//! source (`[aws]` / `[source]`: a changed section builds a new source, and every secret is
//! fetched again from it). What needs a restart ([`RESTART_ONLY`]): the listeners and the mode
//! of their socket files, the connection limit, the worker threads, and the development echo API; a change to one is
//! logged as such and the running value stays.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::AdminState;
use crate::config::{sha256, Config, ConfigError, ConfigFile, LoadedConfig};
use crate::forward;
use crate::metrics::Metrics;
use crate::routes::RouteTable;
use crate::secrets::Sources;

/// How often the config file is read and its checksum compared.
pub const POLL: Duration = Duration::from_millis(500);
/// After a change is seen, the file is read again this much later and the change applied only
/// if both reads agree (a writer still writing in place is not caught half way).
const SETTLE: Duration = Duration::from_millis(100);
/// How long a reload waits for the secrets new to it before the new routes go live anyway
/// (those routes answer 503 `no_key` until their secret arrives).
pub const WARM_WITHIN: Duration = Duration::from_secs(5);

/// The settings a reload cannot apply: the config key, and what it takes.
pub const RESTART_ONLY: [&str; 6] = [
    "listen",
    "admin_listen",
    "max_connections",
    "worker_threads",
    "[dev] echo",
    "listen_mode",
];

/// What the poll compares: the SHA-256 of the file's bytes, or why it could not be read.
fn fingerprint(read: &std::io::Result<Vec<u8>>) -> String {
    match read {
        Ok(bytes) => sha256(bytes),
        Err(e) => format!("unreadable: {:?}", e.kind()),
    }
}

/// What a reload swaps, and what it needs to build the new parts. Owned by the one task that
/// watches ([`Reloader::watch`]), so reloads happen one at a time.
pub struct Reloader {
    /// Where the configuration comes from.
    from: ConfigFile,
    /// The route table both engines read.
    table: Arc<RouteTable>,
    /// The credentials and the configuration in force (for `/readyz`; a reload replaces both).
    admin: Arc<AdminState>,
    /// The secret sources in force (one per role).
    sources: Sources,
    /// The TLS settings for upstreams (from `ca_bundle`).
    tls: rustls::ClientConfig,
    /// The process's metrics.
    metrics: Arc<Metrics>,
    /// SIGHUP, registered when the reloader is made (before the listeners say they are ready,
    /// so an early SIGHUP never meets the default action, which ends the process).
    hangup: Option<tokio::signal::unix::Signal>,
    /// The [`fingerprint`] of the last read by the poll or SIGHUP, applied or not (an invalid
    /// or unreadable file is reported once, not at every poll).
    last_seen: String,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("from", &self.from.path())
            .finish_non_exhaustive()
    }
}

/// Why a valid configuration could not be applied.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    /// The CA bundle could not be loaded.
    #[error(transparent)]
    Tls(#[from] forward::ClientError),
}

impl Reloader {
    /// A reloader over the running parts; registers SIGHUP now. `tls` and `sources` are the ones
    /// the running configuration (in `admin.config`) was built with.
    pub fn new(
        from: ConfigFile,
        table: Arc<RouteTable>,
        admin: Arc<AdminState>,
        sources: Sources,
        tls: rustls::ClientConfig,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: reload by editing the file only");
                None
            }
        };
        let last_seen = admin.config.load().sha256.clone().unwrap_or_default();
        Reloader {
            from,
            table,
            admin,
            sources,
            tls,
            metrics,
            hangup,
            last_seen,
        }
    }

    /// Reloads on SIGHUP and when the file changes, until the task is aborted.
    pub async fn watch(mut self) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let polling = self.from.path().is_some();
        loop {
            let hangup = async {
                match self.hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(()) = hangup => self.on_hangup().await,
                _ = tick.tick(), if polling => self.on_tick().await,
            }
        }
    }

    /// SIGHUP: read the file now; reload unless its bytes are those in force.
    async fn on_hangup(&mut self) {
        let Some(path) = self.from.path().map(Path::to_path_buf) else {
            tracing::warn!("SIGHUP received: the configuration comes from environment variables, so there is no file to reload; restart to change it");
            return;
        };
        let bytes = tokio::fs::read(&path).await;
        let sum = fingerprint(&bytes);
        if Some(&sum) == self.admin.config.load().sha256.as_ref() {
            tracing::info!(config = %path.display(), "SIGHUP received: the configuration file is unchanged; nothing to reload");
            return;
        }
        self.last_seen = sum;
        self.reload(&path, bytes, "SIGHUP").await;
    }

    /// The poll: reload when the file's bytes differ from the last ones seen, and still do a
    /// moment later.
    async fn on_tick(&mut self) {
        let Some(path) = self.from.path().map(Path::to_path_buf) else {
            return;
        };
        let sum = fingerprint(&tokio::fs::read(&path).await);
        if sum == self.last_seen {
            return;
        }
        tokio::time::sleep(SETTLE).await;
        let bytes = tokio::fs::read(&path).await;
        if fingerprint(&bytes) != sum {
            return;
        }
        self.last_seen = sum;
        self.reload(&path, bytes, "file changed").await;
    }

    /// Validates `bytes` and applies them, or reports every problem and keeps what runs.
    async fn reload(&mut self, path: &Path, bytes: std::io::Result<Vec<u8>>, trigger: &str) {
        let loaded = match self.from.validate(path, bytes) {
            Ok(l) => l,
            Err(e) => {
                self.metrics.reloaded(false);
                tracing::error!(trigger, error = %one_line(&e),
                    "configuration reload refused: the running configuration stays");
                return;
            }
        };
        if let Err(e) = self.apply(loaded, trigger).await {
            self.metrics.reloaded(false);
            tracing::error!(trigger, error = %e,
                "configuration reload refused: the running configuration stays");
        }
    }

    /// Puts a validated configuration in force.
    async fn apply(&mut self, mut new: LoadedConfig, trigger: &str) -> Result<(), ApplyError> {
        let old = self.admin.config.load_full();
        let restart = keep_restart_only(&old.config, &mut new.config);
        if !restart.is_empty() {
            tracing::warn!(settings = %restart.join(", "),
                "configuration reload: these settings changed but need a restart to apply; the running values stay");
        }
        let tls = if new.config.ca_bundle == old.config.ca_bundle {
            self.tls.clone()
        } else {
            forward::tls_config(new.config.ca_bundle.as_deref())?
        };
        let same_source = new.config.source == old.config.source;
        if !same_source {
            tracing::info!("configuration reload: the secret source changed; every secret is fetched again from the new one");
            self.sources = crate::assemble::sources(&new.config).await;
        } else {
            // Roles new to the configuration get their client; the others keep theirs (and
            // their cached role credentials).
            crate::assemble::add_role_sources(&new.config, &mut self.sources).await;
        }

        let token_client = crate::assemble::token_client(&new.config, &tls);
        let (mut credentials, slots) = self.admin.credentials.load().renew(
            &new.config.routes,
            &self.sources,
            same_source,
            self.metrics.clone(),
            &token_client,
        );
        credentials.warm(WARM_WITHIN).await;
        credentials.start();
        let keep_connections = new.config.ca_bundle == old.config.ca_bundle
            && new.config.connect_timeout == old.config.connect_timeout;
        let routes = self.table.peek().renew(
            &new.config,
            slots,
            self.metrics.clone(),
            &tls,
            keep_connections,
        );
        let diff = RouteDiff::new(&old.config, &new.config);
        crate::assemble::warn_plain_http(&new.config);

        self.table.replace(Arc::new(routes));
        self.admin.credentials.store(Arc::new(credentials));
        self.tls = tls;
        self.metrics.reloaded(true);
        tracing::info!(trigger, config = %new.config.origin,
            sha256 = new.sha256.as_deref().unwrap_or("-"),
            routes = new.config.routes.len(),
            added = %diff.added.join(", "), changed = %diff.changed.join(", "),
            removed = %diff.removed.join(", "),
            restart_needed = %restart.join(", "),
            "configuration reloaded");
        self.admin.config.store(Arc::new(new));
        Ok(())
    }
}

/// `ConfigError`'s text (every problem, as `keyproxy check` prints them) on one line: the
/// problems separated by `; ` instead of line breaks.
fn one_line(e: &ConfigError) -> String {
    e.to_string().replace("\n  ", "; ")
}

/// Puts the running values of the settings a reload cannot apply back into `new`; returns the
/// keys that differed.
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if new.listen != old.listen {
        changed.push(RESTART_ONLY[0]);
        new.listen = old.listen.clone();
    }
    if new.admin_listen != old.admin_listen {
        changed.push(RESTART_ONLY[1]);
        new.admin_listen = old.admin_listen.clone();
    }
    if new.max_connections != old.max_connections {
        changed.push(RESTART_ONLY[2]);
        new.max_connections = old.max_connections;
    }
    if new.worker_threads != old.worker_threads {
        changed.push(RESTART_ONLY[3]);
        new.worker_threads = old.worker_threads;
    }
    if new.dev_echo != old.dev_echo {
        changed.push(RESTART_ONLY[4]);
        new.dev_echo = old.dev_echo;
    }
    if new.listen_mode != old.listen_mode {
        changed.push(RESTART_ONLY[5]);
        new.listen_mode = old.listen_mode;
    }
    changed
}

/// Route names a reload added, changed or removed (for its log line).
#[derive(Debug, Default, PartialEq)]
struct RouteDiff {
    added: Vec<String>,
    changed: Vec<String>,
    removed: Vec<String>,
}

impl RouteDiff {
    fn new(old: &Config, new: &Config) -> RouteDiff {
        // `Debug` of a route's settings holds no secret (templates show `{secret}`, not a key).
        let before: HashMap<&str, String> = old
            .routes
            .iter()
            .map(|r| (r.name.as_str(), format!("{r:?}")))
            .collect();
        let names: HashSet<&str> = new.routes.iter().map(|r| r.name.as_str()).collect();
        let mut diff = RouteDiff::default();
        for r in &new.routes {
            match before.get(r.name.as_str()) {
                None => diff.added.push(r.name.clone()),
                Some(b) if *b != format!("{r:?}") => diff.changed.push(r.name.clone()),
                Some(_) => {}
            }
        }
        diff.removed = old
            .routes
            .iter()
            .filter(|r| !names.contains(r.name.as_str()))
            .map(|r| r.name.clone())
            .collect();
        diff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text, "t.toml", Path::new("."), &HashMap::new()).expect("valid")
    }

    const A: &str = "[[route]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\nsecret_id = \"s\"\n";

    #[test]
    fn restart_only_settings_keep_their_running_values() {
        let old = config(&format!("listen = \"127.0.0.1:8080\"\n{A}"));
        let mut new = config(&format!(
            "listen = \"127.0.0.1:9090\"\nmax_connections = 7\naccess_log = false\n{A}"
        ));
        let changed = keep_restart_only(&old, &mut new);
        assert_eq!(changed, ["listen", "max_connections"]);
        assert_eq!(new.listen, old.listen);
        assert_eq!(new.max_connections, old.max_connections);
        assert!(!new.access_log, "a live setting is applied");
    }

    #[test]
    fn route_diff_names_added_changed_removed() {
        let b = A.replace("\"a\"", "\"b\"").replace("/a", "/b");
        let c = A.replace("\"a\"", "\"c\"").replace("/a", "/c");
        let old = config(&format!("{A}{b}"));
        let new = config(&format!("{}{c}", A.replace("127.0.0.1:1", "127.0.0.1:2")));
        let d = RouteDiff::new(&old, &new);
        assert_eq!(d.added, ["c"]);
        assert_eq!(d.changed, ["a"]);
        assert_eq!(d.removed, ["b"]);
    }

    #[test]
    fn checksum_is_sha256_hex() {
        assert_eq!(
            sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn an_unreadable_file_is_a_problem_naming_it() {
        let from = ConfigFile::new(Some("/nonexistent/k.toml".into()), HashMap::new());
        let e = from.load().expect_err("unreadable");
        assert!(e.to_string().contains("cannot read the file"), "{e}");
        assert!(e.to_string().contains("/nonexistent/k.toml"), "{e}");
    }
}
