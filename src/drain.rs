//! The shutdown signal: the server starts it on SIGTERM, and every app connection, on either
//! engine, watches it (idle connections close at once, busy ones after their response).

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// The shutdown signal shared by every app connection.
#[derive(Debug, Default)]
pub struct Drain {
    started: AtomicBool,
    notify: Notify,
}

impl Drain {
    /// Starts draining: idle connections close now, busy ones after their current response.
    pub fn start(&self) {
        self.started.store(true, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    /// Whether draining has started.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// Resolves once draining starts (immediately if it has).
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        if self.started() {
            return;
        }
        notified.await;
    }
}
