//! The global settings: listeners, connection and thread limits, the CA bundle, the development
//! echo API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{resolve, socket_addr};
use crate::config::listen::parse_mode;
use crate::config::{defaults, Listen, Problems};

/// `listen` and `admin_listen` (`IP:port` or `unix:/path`), which must differ (unless a port is
/// 0: the system picks).
pub(super) fn listeners(
    listen: Option<&str>,
    admin_listen: Option<&str>,
    g: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> (Listen, Listen) {
    let listen = listener(problems, g("listen"), listen, defaults::LISTEN);
    let admin_listen = listener(
        problems,
        g("admin_listen"),
        admin_listen,
        defaults::ADMIN_LISTEN,
    );
    let system_picks = listen.tcp().is_some_and(|a| a.port() == 0);
    if listen == admin_listen && !system_picks {
        problems.add(g("admin_listen"), "must differ from listen");
    }
    (listen, admin_listen)
}

/// One listener address; a problem (and a stand-in) when it is neither form.
fn listener(problems: &mut Problems, key: String, v: Option<&str>, default: &str) -> Listen {
    match v.unwrap_or(default).parse() {
        Ok(l) => l,
        Err(e) => {
            problems.add(key, e.to_string());
            Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
        }
    }
}

/// `listen_mode`: the socket files' permission bits, in octal.
pub(super) fn listen_mode(v: Option<&str>, key: String, problems: &mut Problems) -> u32 {
    let Some(v) = v else {
        return defaults::LISTEN_MODE;
    };
    parse_mode(v).unwrap_or_else(|e| {
        problems.add(key, e);
        defaults::LISTEN_MODE
    })
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
    listeners: (&Listen, &Listen),
    key: String,
    problems: &mut Problems,
) -> Option<SocketAddr> {
    let addr = socket_addr(problems, key.clone(), Some(v?), "");
    let taken = [listeners.0.tcp(), listeners.1.tcp()].contains(&Some(addr));
    if addr.port() != 0 && taken {
        problems.add(key, "must differ from listen and admin_listen");
    }
    Some(addr)
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{keys, toml, MINIMAL};
    use crate::config::Listen;

    #[test]
    fn unix_listeners_and_their_mode() {
        let c = toml(&format!(
            "listen = \"unix:/run/kp/app.sock\"\nadmin_listen = \"unix:/run/kp/admin.sock\"\nlisten_mode = \"0600\"\n{MINIMAL}"
        ))
        .expect("valid");
        assert_eq!(c.listen, Listen::Unix("/run/kp/app.sock".into()));
        assert_eq!(c.admin_listen.to_string(), "unix:/run/kp/admin.sock");
        assert_eq!(c.listen_mode, 0o600);
        assert_eq!(toml(MINIMAL).expect("valid").listen_mode, 0o660);
        let long = "a".repeat(120);
        let e = toml(&format!(
            "listen = \"unix:run/app.sock\"\nadmin_listen = \"unix:/{long}\"\nlisten_mode = \"0868\"\n{MINIMAL}"
        ))
        .expect_err("invalid");
        assert_eq!(keys(&e), vec!["listen", "admin_listen", "listen_mode"]);
        let text = e.to_string();
        assert!(text.contains("must be absolute"), "{text}");
        assert!(text.contains("at most 107"), "{text}");
        let e = toml(&format!(
            "listen = \"unix:\"\nadmin_listen = \"unix:/a.sock\"\n{MINIMAL}"
        ))
        .expect_err("empty");
        assert_eq!(keys(&e), vec!["listen"]);
        let e = toml(&format!(
            "listen = \"unix:/a.sock\"\nadmin_listen = \"unix:/a.sock\"\n{MINIMAL}"
        ))
        .expect_err("same");
        assert_eq!(keys(&e), vec!["admin_listen"]);
    }

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
