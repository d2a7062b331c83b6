//! Limits and timeouts that both engines apply, in one place.

use std::time::Duration;

/// Largest message head accepted from or sent to a peer, on either engine and in either HTTP
/// version: the request or status line and headers (HTTP/1.1), or the decoded header list
/// (HTTP/2, RFC 9113 §6.5.2 `SETTINGS_MAX_HEADER_LIST_SIZE`). Larger: 431 to the app, 502 for
/// an upstream's answer.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Most header lines in one message (hyper's default too).
pub const MAX_HEADERS: usize = 100;

/// How long an app connection may take to send a complete request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an upstream connection stays in a pool unused.
pub const POOL_IDLE: Duration = Duration::from_secs(90);

/// After an early answer (the upstream answered before the app finished sending its body), how
/// long the app's remaining body is read and discarded before the connection is closed, so the
/// app reads the answer instead of a reset (nginx's `lingering_time`).
pub const LINGER: Duration = Duration::from_secs(2);

/// The most bytes read and discarded while lingering.
pub const LINGER_BYTES: u64 = 16 * 1024 * 1024;
