//! The global settings: listeners, connection and thread limits, the CA bundle, the development
//! echo API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{resolve, socket_addr};
use crate::config::{defaults, Problems};

/// `listen` and `admin_listen`, which must differ (unless a port is 0: the system picks).
pub(super) fn listeners(
    listen: Option<&str>,
    admin_listen: Option<&str>,
    g: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> (SocketAddr, SocketAddr) {
    let listen = socket_addr(problems, g("listen"), listen, defaults::LISTEN);
    let admin_listen = socket_addr(
        problems,
        g("admin_listen"),
        admin_listen,
        defaults::ADMIN_LISTEN,
    );
    if listen == admin_listen && listen.port() != 0 {
        problems.add(g("admin_listen"), "must differ from listen");
    }
    (listen, admin_listen)
}

/// `max_connections`: at least 1.
pub(super) fn max_connections(v: Option<u64>, key: String, problems: &mut Problems) -> usize {
    match v {
        Some(0) => {
            problems.add(key, "must be at least 1");
            1
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => defaults::MAX_CONNECTIONS,
    }
}

/// `worker_threads`: 1 to [`defaults::MAX_WORKER_THREADS`]; unset, one per CPU.
pub(super) fn worker_threads(
    v: Option<u64>,
    key: String,
    problems: &mut Problems,
) -> Option<usize> {
    match v {
        Some(0) => {
            problems.add(key, "must be at least 1");
            None
        }
        Some(n) if n > defaults::MAX_WORKER_THREADS => {
            problems.add(key, format!("at most {}", defaults::MAX_WORKER_THREADS));
            None
        }
        Some(n) => usize::try_from(n).ok(),
        None => None,
    }
}

/// `ca_bundle`: a readable file holding at least one PEM certificate, and nothing invalid.
pub(super) fn ca_bundle(
    v: Option<&str>,
    base: &Path,
    key: String,
    problems: &mut Problems,
) -> Option<PathBuf> {
    let path = resolve(base, v?);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice()).collect();
            if certs.is_empty() || certs.iter().any(Result::is_err) {
                problems.add(
                    key,
                    format!("{} holds no valid PEM certificate", path.display()),
                );
            }
        }
        Err(e) => problems.add(key, format!("cannot read {}: {e}", path.display())),
    }
    Some(path)
}

/// `dev.echo`: an `IP:port` for the development echo API, not one of the proxy's listeners.
pub(super) fn dev_echo(
    v: Option<&str>,
    listeners: (SocketAddr, SocketAddr),
    key: String,
    problems: &mut Problems,
) -> Option<SocketAddr> {
    let addr = socket_addr(problems, key.clone(), Some(v?), "");
    if addr.port() != 0 && (addr == listeners.0 || addr == listeners.1) {
        problems.add(key, "must differ from listen and admin_listen");
    }
    Some(addr)
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{keys, toml, MINIMAL};

    #[test]
    fn dev_echo_is_an_address_apart_from_the_listeners() {
        let c = toml(&format!("[dev]\necho = \"127.0.0.1:8081\"\n{MINIMAL}")).expect("valid");
        assert_eq!(c.dev_echo.map(|a| a.port()), Some(8081));
        assert_eq!(toml(MINIMAL).expect("valid").dev_echo, None);
        let e = toml(&format!(
            "listen = \"127.0.0.1:8080\"\n[dev]\necho = \"127.0.0.1:8080\"\n{MINIMAL}"
        ))
        .expect_err("same as listen");
        assert_eq!(keys(&e), vec!["dev.echo"]);
        let e =
            toml(&format!("[dev]\necho = \"localhost\"\nehco = 1\n{MINIMAL}")).expect_err("bad");
        assert_eq!(keys(&e), vec!["dev.echo", "dev.ehco"]);
    }
}
