//! Every setting's default, and the bounds validation holds values to, in one place: parsing and
//! validation read these constants, and the field docs of [`Config`](super::Config) and
//! [`RouteConfig`](super::RouteConfig) link here. The configuration reference in `README.md`
//! states the same values.

use std::time::Duration;

/// A duration setting: the value used when it is not set, and the shortest value accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationSetting {
    /// Used when the setting is absent (or invalid, while the other problems are collected).
    pub default: Duration,
    /// Anything shorter is refused.
    pub min: Duration,
}

/// The longest duration any setting takes: far beyond any sensible value, and small enough that
/// `Instant::now() + d` (idle timeouts) and the refresh jitter (`d * 1.1`) cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

// Listeners and the process.

/// App-facing listener (`listen`).
pub const LISTEN: &str = "127.0.0.1:8080";
/// Admin listener (`admin_listen`).
pub const ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// `listen_mode`: permission bits of a Unix listener's socket file (owner and group may connect).
pub const LISTEN_MODE: u32 = 0o660;
/// `drain_timeout`: time in-flight requests get after SIGTERM.
pub const DRAIN_TIMEOUT: DurationSetting = DurationSetting {
    default: Duration::from_secs(20),
    min: Duration::ZERO,
};
/// `connect_timeout`: TCP + TLS connect to an upstream.
pub const CONNECT_TIMEOUT: DurationSetting = DurationSetting {
    default: Duration::from_secs(5),
    min: Duration::from_millis(1),
};
/// `max_connections`: concurrent app connections, and requests in flight on the general engine.
pub const MAX_CONNECTIONS: usize = 4096;
/// `access_log`: one log line per request.
pub const ACCESS_LOG: bool = true;
/// The most `worker_threads` accepted (unset: one per CPU).
pub const MAX_WORKER_THREADS: u64 = 1024;

// Where secrets come from.

/// `source.type`.
pub const SOURCE: &str = "aws";
/// `session_name`: the STS role session name when a role is assumed (`role_arn`).
pub const SESSION_NAME: &str = "keyproxy";
/// `aws.timeout`: one attempt of a Secrets Manager call.
pub const AWS_TIMEOUT: DurationSetting = DurationSetting {
    default: Duration::from_secs(5),
    min: Duration::from_millis(10),
};
/// `aws.connect_timeout`.
pub const AWS_CONNECT_TIMEOUT: DurationSetting = DurationSetting {
    default: Duration::from_secs(3),
    min: Duration::from_millis(10),
};
/// `aws.max_attempts`: SDK attempts per call.
pub const AWS_MAX_ATTEMPTS: u32 = 2;
/// `aws.startup_jitter`: the longest random delay before a sidecar's first Secrets Manager call
/// (off by default: every start waits part of it).
pub const AWS_STARTUP_JITTER: DurationSetting = DurationSetting {
    default: Duration::ZERO,
    min: Duration::ZERO,
};
/// The longest `aws.startup_jitter` accepted: beyond it, orchestrators give up on a container
/// that is not ready (the Kubernetes example allows 2 minutes).
pub const MAX_AWS_STARTUP_JITTER: Duration = Duration::from_secs(300);

// The app-side token.

/// `app_auth.header`.
pub const APP_TOKEN_HEADER: &str = "x-keyproxy-token";
/// The shortest app token accepted, in characters.
pub const MIN_APP_TOKEN_LEN: usize = 16;

// Routes.

/// `KEYPROXY_ROUTE_NAME`: the name of the route built from the environment.
pub const ENV_ROUTE_NAME: &str = "default";
/// `KEYPROXY_PATH_PREFIX` when neither it nor `KEYPROXY_HOST` is set.
pub const ENV_PATH_PREFIX: &str = "/";
/// `version_stage`.
pub const VERSION_STAGE: &str = "AWSCURRENT";
/// The longest staging label accepted.
pub const MAX_VERSION_STAGE_LEN: usize = 256;
/// `header`, when the key goes in a header.
pub const HEADER: &str = "Authorization";
/// `value` for a header.
pub const HEADER_VALUE: &str = "Bearer {secret}";
/// `value` for a query parameter.
pub const QUERY_VALUE: &str = "{secret}";
/// `refresh_interval`: background refresh period (± jitter).
pub const REFRESH_INTERVAL: DurationSetting = DurationSetting {
    default: Duration::from_secs(300),
    min: Duration::from_secs(1),
};
/// `refresh_cooldown`: after a 401-forced fetch that found nothing newer, no other before this.
pub const REFRESH_COOLDOWN: DurationSetting = DurationSetting {
    default: Duration::from_secs(5),
    min: Duration::ZERO,
};
/// `timeout`: time for the upstream's response headers.
pub const TIMEOUT: DurationSetting = DurationSetting {
    default: Duration::from_secs(30),
    min: Duration::from_millis(1),
};
/// `idle_timeout`: longest gap between two chunks of the upstream's response body.
pub const IDLE_TIMEOUT: DurationSetting = DurationSetting {
    default: Duration::from_secs(120),
    min: Duration::from_millis(1),
};
/// `max_replay_body`, in bytes (256 KiB).
pub const MAX_REPLAY_BODY: u64 = 256 * 1024;
/// The largest `max_replay_body` accepted, in bytes (64 MiB): each replayable request holds its
/// body in memory.
pub const MAX_REPLAY_BODY_LIMIT: u64 = 64 * 1024 * 1024;
/// `pending_fallback`.
pub const PENDING_FALLBACK: bool = true;
/// `retry_on_401`.
pub const RETRY_ON_401: bool = true;
/// `http2`: HTTP/1.1 keep-alive to the upstream by default (the fast path: less CPU per
/// request than HTTP/2 in `benches/run`); `true` offers HTTP/2 by ALPN.
pub const HTTP2: bool = false;

// OAuth2 routes (`[route.oauth2]`).

/// `oauth2.client_auth`.
pub const OAUTH2_CLIENT_AUTH: &str = "basic";
/// `oauth2.client_id_field`.
pub const OAUTH2_CLIENT_ID_FIELD: &str = "client_id";
/// `oauth2.client_secret_field`.
pub const OAUTH2_CLIENT_SECRET_FIELD: &str = "client_secret";
/// `oauth2.refresh_ahead`: mint the next token this long before the current one expires (at
/// most half the token's lifetime).
pub const OAUTH2_REFRESH_AHEAD: DurationSetting = DurationSetting {
    default: Duration::from_secs(60),
    min: Duration::ZERO,
};
