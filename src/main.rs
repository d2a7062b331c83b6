//! The `keyproxy` binary: parse arguments, set up logs, load the config, run (or check it, probe
//! the admin endpoint, rotate a secret, or serve the development echo API).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keyproxy::config::ConfigFile;
use keyproxy::config::{Config, Listen, DEFAULT_ADMIN_LISTEN};
use keyproxy::dev::{DevApi, Issuer};
use keyproxy::rotation::{self, RotateOptions};
use keyproxy::secrets::Secret;
use keyproxy::telemetry::{self, LogFormat};

/// EX_USAGE: the configuration is invalid.
const EXIT_CONFIG: u8 = 64;

/// A sidecar reverse proxy that injects API keys from AWS Secrets Manager.
#[derive(Debug, Parser)]
#[command(
    name = "keyproxy",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// What running the proxy takes (also the arguments of `keyproxy` alone).
#[derive(Debug, Args)]
struct RunArgs {
    /// Config file (TOML). Without one, a single route comes from KEYPROXY_* variables.
    #[arg(long, short, env = "KEYPROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    log: LogArgs,
}

/// Where log lines go and which.
#[derive(Debug, Args)]
struct LogArgs {
    /// Log format: text or json.
    #[arg(long, env = "KEYPROXY_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// Log filter, e.g. info, debug, keyproxy=trace (else RUST_LOG, else info).
    #[arg(long, env = "KEYPROXY_LOG")]
    log: Option<String>,
}

impl LogArgs {
    /// Sets up logging on stderr; exit 64 (naming `who`) for a filter that does not parse.
    fn init(&self, who: &str) -> Result<(), ExitCode> {
        let spec = self
            .log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".into());
        telemetry::init(&spec, self.log_format).map_err(|e| {
            eprintln!("{who}: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run(RunArgs),
    /// Validate the configuration: exit 0, or print every problem and exit 64.
    Check {
        /// Config file to check (TOML). Without one, the KEYPROXY_* variables are checked.
        #[arg(long, short, env = "KEYPROXY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check the local admin endpoint (container health check): exit 0 if healthy, else 1.
    Health {
        /// Check /readyz (every route has a key) instead of /healthz.
        #[arg(long)]
        ready: bool,
        /// Admin address, IP:port or unix:/path (else KEYPROXY_ADMIN_LISTEN, the config's
        /// admin_listen, or the default).
        #[arg(long)]
        admin: Option<Listen>,
        /// Config file whose admin_listen to check, when neither --admin nor
        /// KEYPROXY_ADMIN_LISTEN is given.
        #[arg(long, short, env = "KEYPROXY_CONFIG")]
        config: Option<PathBuf>,
        /// Time allowed for the answer.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Ask the running proxy to re-fetch its secrets now (POST /refresh on the admin listener),
    /// e.g. right after a rotation. Prints each secret's version before and after; exit 1 if a
    /// fetch failed or the proxy could not be reached.
    Refresh {
        /// Only this secret id (else every secret).
        #[arg(long)]
        secret: Option<String>,
        /// Admin address, IP:port or unix:/path (else KEYPROXY_ADMIN_LISTEN, the config's
        /// admin_listen, or the default).
        #[arg(long)]
        admin: Option<Listen>,
        /// Config file whose admin_listen to use, when neither --admin nor
        /// KEYPROXY_ADMIN_LISTEN is given.
        #[arg(long, short, env = "KEYPROXY_CONFIG")]
        config: Option<PathBuf>,
        /// Time allowed for the answer.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Rotate a secret now: createSecret, setSecret, testSecret, finishSecret, in order.
    /// Prints the new version id. See the Rotation section of README.md.
    Rotate {
        /// The secret to rotate (name or ARN).
        #[arg(long)]
        secret_id: String,
        /// The new version id (ClientRequestToken); a fresh UUID by default. Pass the id of a
        /// rotation that failed midway to resume it.
        #[arg(long)]
        token: Option<String>,
        /// Rotate even if rotation is not enabled for the secret (no schedule needed on demand).
        #[arg(long)]
        skip_rotation_enabled_check: bool,
        /// Config file whose [aws] section (region, endpoint_url, timeouts, attempts) and
        /// ca_bundle to use; the rest of the file is not read. Without one, the AWS SDK's
        /// defaults (AWS_REGION, AWS_ENDPOINT_URL_SECRETS_MANAGER, ...).
        #[arg(long, short, env = "KEYPROXY_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run the development echo API: a local upstream that answers every request with what
    /// arrived, keys shown as fingerprints. See the Quickstart in README.md.
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Also issue keys to this client at POST /oauth/token, and require a live key
        /// (Authorization: Bearer) on every other request: an API to rotate keys against.
        #[arg(long, requires = "client_secret")]
        client_id: Option<String>,
        /// The client secret that goes with --client-id (development only).
        #[arg(long, requires = "client_id")]
        client_secret: Option<String>,
        /// How long an older key keeps working once a newer one is issued.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        grace: Duration,
        #[command(flatten)]
        log: LogArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(config.as_deref()),
        Some(Command::Health {
            ready,
            admin,
            config,
            timeout,
        }) => health(ready, admin, config.as_deref(), timeout),
        Some(Command::Refresh {
            secret,
            admin,
            config,
            timeout,
        }) => refresh(secret.as_deref(), admin, config.as_deref(), timeout),
        Some(Command::Rotate {
            secret_id,
            token,
            skip_rotation_enabled_check,
            config,
            log,
        }) => rotate(
            &secret_id,
            RotateOptions {
                token,
                require_rotation_enabled: !skip_rotation_enabled_check,
            },
            config.as_deref(),
            &log,
        ),
        Some(Command::Echo {
            listen,
            client_id,
            client_secret,
            grace,
            log,
        }) => {
            let issuer = client_id
                .zip(client_secret)
                .map(|(client_id, secret)| Issuer {
                    client_id,
                    client_secret: Secret::new(secret),
                    grace,
                });
            echo(listen, issuer, &log)
        }
        Some(Command::Run(run)) => serve(&run),
        None => serve(&cli.run),
    }
}

/// The validated configuration from `config` (else the environment); exit 64 if invalid.
fn load(config: Option<&Path>) -> Result<Config, ExitCode> {
    let env: HashMap<String, String> = std::env::vars().collect();
    Config::load(config, &env).map_err(|e| {
        eprintln!("keyproxy: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `keyproxy check`: the routes of a valid configuration, or every problem.
fn check(config: Option<&Path>) -> ExitCode {
    let c = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let n = c.routes.len();
    let s = if n == 1 { "" } else { "s" };
    println!("{}: configuration is valid ({n} route{s})", c.origin);
    for r in &c.routes {
        println!(
            "  route {:?}: {}{} -> {} (secret {:?} {}{}, {})",
            r.name,
            r.path_prefix
                .as_deref()
                .map(|p| format!("path {p}"))
                .unwrap_or_default(),
            r.host
                .as_deref()
                .map(|h| format!(" host {h}"))
                .unwrap_or_default(),
            r.upstream,
            r.secret_id,
            r.version_stage,
            r.role
                .as_ref()
                .map(|role| format!(" as role {}", role.role_arn))
                .unwrap_or_default(),
            r.injection.describe()
        );
        if let Some(o) = &r.oauth2 {
            println!(
                "    OAuth2 access token minted at {} from the secret's {:?} and {:?}",
                keyproxy::oauth2::endpoint::shown(&o.token_url),
                o.client_id_field,
                o.client_secret_field
            );
        }
    }
    if let Some(addr) = c.dev_echo {
        println!("  development echo API on {addr}");
    }
    for (key, l) in [("listen", &c.listen), ("admin_listen", &c.admin_listen)] {
        if let Some(dir) = l.unix().and_then(Path::parent) {
            println!(
                "  {key} {l} (mode {:04o}; {} must exist where keyproxy runs)",
                c.listen_mode,
                dir.display()
            );
        }
    }
    ExitCode::SUCCESS
}

/// The admin address: `admin`, else `KEYPROXY_ADMIN_LISTEN`, else the config's, else the
/// default.
fn admin_address(admin: Option<Listen>, config: Option<&Path>) -> Option<Listen> {
    admin
        .or_else(|| {
            std::env::var("KEYPROXY_ADMIN_LISTEN")
                .ok()
                .and_then(|a| a.parse().ok())
        })
        .or_else(|| {
            config
                .and_then(|p| Config::from_file(p, &HashMap::new()).ok())
                .map(|c| c.admin_listen)
        })
        .or_else(|| DEFAULT_ADMIN_LISTEN.parse().ok())
}

/// `keyproxy refresh`: POST `/refresh` on the admin address; one line per secret.
fn refresh(
    secret: Option<&str>,
    admin: Option<Listen>,
    config: Option<&Path>,
    timeout: Duration,
) -> ExitCode {
    let Some(addr) = admin_address(admin, config) else {
        eprintln!("keyproxy refresh: no admin address");
        return ExitCode::FAILURE;
    };
    let path = match secret {
        Some(id) => format!(
            "/refresh?secret={}",
            percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
        ),
        None => "/refresh".to_owned(),
    };
    let answer = runtime(Some(1)).and_then(|rt| {
        rt.block_on(keyproxy::admin_client::post(&addr, &path, timeout))
            .map_err(|e| e.to_string())
    });
    let body = match answer {
        Ok((200, body)) => body,
        Ok((status, body)) => {
            eprintln!(
                "keyproxy refresh: {addr} answered {status}: {}",
                body.trim()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("keyproxy refresh: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(&body) else {
        eprintln!("keyproxy refresh: {addr} answered: {}", body.trim());
        return ExitCode::FAILURE;
    };
    let mut ok = true;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    for s in doc["secrets"].as_array().into_iter().flatten() {
        let what = if let Some(e) = s["error"].as_str() {
            ok = false;
            format!("fetch failed: {e}")
        } else if s["rate_limited"] == true {
            "rate limited (fetched less than refresh_cooldown ago): no fetch".to_owned()
        } else if s["changed"] == true {
            "new version".to_owned()
        } else {
            "unchanged".to_owned()
        };
        println!(
            "{} {}: {} -> {} ({what})",
            text(&s["secret"]),
            text(&s["stage"]),
            text(&s["version_before"]),
            text(&s["version_after"]),
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `keyproxy health`: GET `/healthz` (or `/readyz`) on the admin address.
fn health(
    ready: bool,
    admin: Option<Listen>,
    config: Option<&Path>,
    timeout: Duration,
) -> ExitCode {
    let Some(addr) = admin_address(admin, config) else {
        eprintln!("keyproxy health: no admin address");
        return ExitCode::FAILURE;
    };
    let path = if ready { "/readyz" } else { "/healthz" };
    match runtime(Some(1)).and_then(|rt| {
        rt.block_on(keyproxy::admin_client::get(&addr, path, timeout))
            .map_err(|e| e.to_string())
    }) {
        Ok((200, _)) => ExitCode::SUCCESS,
        Ok((status, body)) => {
            eprintln!("keyproxy health: {path} answered {status}: {}", body.trim());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("keyproxy health: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `keyproxy rotate`: the four steps now; the new version id on stdout.
fn rotate(
    secret_id: &str,
    options: RotateOptions,
    config: Option<&Path>,
    log: &LogArgs,
) -> ExitCode {
    if let Err(code) = log.init("keyproxy rotate") {
        return code;
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let settings = match rotation::Settings::load(config, &env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keyproxy rotate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = runtime(None).and_then(|rt| {
        rt.block_on(async {
            let rotator = rotation::Rotator::from_settings(&settings).await?;
            rotation::rotate_now(&rotator, secret_id, &options).await
        })
        .map_err(|e| e.to_string())
    });
    match result {
        Ok(rotated) => {
            println!("{}", rotated.version_id);
            eprintln!("keyproxy rotate: {}", rotation::refresh_hint(secret_id));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keyproxy rotate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `keyproxy echo`: the development echo API until SIGTERM or SIGINT.
fn echo(listen: SocketAddr, issuer: Option<Issuer>, log: &LogArgs) -> ExitCode {
    if let Err(code) = log.init("keyproxy echo") {
        return code;
    }
    let result = runtime(Some(1)).and_then(|rt| {
        rt.block_on(async {
            let api = DevApi::bind(listen, issuer)
                .await
                .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
            tokio::select! {
                () = api.serve() => {}
                () = keyproxy::shutdown_signal() => {}
            }
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyproxy echo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the proxy (and the development echo API, if `[dev] echo` asks) until SIGTERM or SIGINT;
/// SIGHUP or an edit of the config file reloads it.
fn serve(run: &RunArgs) -> ExitCode {
    if let Err(code) = run.log.init("keyproxy") {
        return code;
    }
    let from = ConfigFile::new(run.config.clone(), std::env::vars().collect());
    let loaded = match from.load() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("keyproxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match runtime(loaded.config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        if let Some(addr) = loaded.config.dev_echo {
            let api = DevApi::bind(addr, None)
                .await
                .map_err(|e| format!("cannot listen on {addr} ([dev] echo): {e}"))?;
            tokio::spawn(api.serve());
        }
        keyproxy::run(loaded, from, keyproxy::shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "keyproxy cannot run");
            eprintln!("keyproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime: `workers` threads (else one per CPU this process may use). With one, a
/// single-threaded runtime: the accept loop, the app connections and the upstream connections
/// take turns on one thread, with no work-stealing queues and no hand-over between threads. On
/// one CPU it serves ~10% more requests per CPU second than a one-worker multi-thread runtime, and
/// under hundreds of connections it keeps p99 near p50 (a multi-thread worker's local queue holds
/// 256 tasks; the overflow waits in the shared queue, polled only every few dozen tasks).
fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    b.enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}
