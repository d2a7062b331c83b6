//! Where a listener listens: `IP:port`, or `unix:/absolute/path` for a Unix domain socket.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The longest socket path the kernel takes: `sun_path` is 108 bytes on Linux, one of them the
/// terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// The prefix that marks a Unix socket path in `listen`, `admin_listen` and `--admin`.
const UNIX_PREFIX: &str = "unix:";

/// A listener's address (`listen`, `admin_listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket: an absolute path of at most [`MAX_SOCKET_PATH`] bytes.
    Unix(PathBuf),
}

impl Listen {
    /// The TCP address, if this is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Listen::Tcp(a) => Some(*a),
            Listen::Unix(_) => None,
        }
    }

    /// The socket path, if this is a Unix socket.
    pub fn unix(&self) -> Option<&Path> {
        match self {
            Listen::Tcp(_) => None,
            Listen::Unix(p) => Some(p),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => a.fmt(f),
            Listen::Unix(p) => write!(f, "{UNIX_PREFIX}{}", p.display()),
        }
    }
}

/// Why a listener address was refused (the message after the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// Neither `IP:port` nor `unix:PATH`.
    #[error("{0:?} is not an IP:port such as \"127.0.0.1:8080\" or a Unix socket such as \"unix:/run/keyproxy/app.sock\"")]
    NotAnAddress(String),
    /// `unix:` with nothing after it.
    #[error("\"unix:\" needs a socket path, such as \"unix:/run/keyproxy/app.sock\"")]
    EmptyPath,
    /// A relative socket path (it would depend on the working directory).
    #[error("{0:?}: the socket path must be absolute")]
    RelativePath(String),
    /// Longer than `sun_path` takes.
    #[error("{text:?}: the socket path is {len} bytes; a Unix socket path takes at most {MAX_SOCKET_PATH}")]
    TooLong {
        /// The value as written.
        text: String,
        /// The path's length in bytes.
        len: usize,
    },
}

impl FromStr for Listen {
    type Err = ListenError;

    fn from_str(text: &str) -> Result<Listen, ListenError> {
        let text = text.trim();
        let Some(path) = text.strip_prefix(UNIX_PREFIX) else {
            return SocketAddr::from_str(text)
                .map(Listen::Tcp)
                .map_err(|_| ListenError::NotAnAddress(text.to_owned()));
        };
        if path.is_empty() {
            return Err(ListenError::EmptyPath);
        }
        if !path.starts_with('/') {
            return Err(ListenError::RelativePath(text.to_owned()));
        }
        if path.len() > MAX_SOCKET_PATH {
            return Err(ListenError::TooLong {
                text: text.to_owned(),
                len: path.len(),
            });
        }
        Ok(Listen::Unix(PathBuf::from(path)))
    }
}

/// Parses a socket file mode written in octal (`"0660"`, `"660"`): permission bits only.
pub(super) fn parse_mode(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && m <= 0o777 => Ok(m),
        Ok(_) => Err(format!(
            "{text:?} is not a permission mode: at most \"0777\" (no setuid, setgid or sticky bits)"
        )),
        Err(_) => Err(format!(
            "{text:?} is not an octal file mode such as \"0660\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_and_unix_forms() {
        assert_eq!(
            "127.0.0.1:8080".parse(),
            Ok(Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 8080))))
        );
        let l: Listen = "unix:/run/keyproxy/app.sock".parse().expect("unix");
        assert_eq!(l, Listen::Unix("/run/keyproxy/app.sock".into()));
        assert_eq!(l.to_string(), "unix:/run/keyproxy/app.sock");
        assert_eq!("unix:".parse::<Listen>(), Err(ListenError::EmptyPath));
        assert!(matches!(
            "unix:run/app.sock".parse::<Listen>(),
            Err(ListenError::RelativePath(_))
        ));
        assert!(matches!(
            "localhost:80".parse::<Listen>(),
            Err(ListenError::NotAnAddress(_))
        ));
        let long = format!("unix:/{}", "a".repeat(MAX_SOCKET_PATH));
        assert!(matches!(
            long.parse::<Listen>(),
            Err(ListenError::TooLong { len: 108, .. })
        ));
        let fits = format!("unix:/{}", "a".repeat(MAX_SOCKET_PATH - 1));
        assert!(fits.parse::<Listen>().is_ok());
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0o666"), Ok(0o666));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("4777").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("rw-rw----").is_err());
    }
}
