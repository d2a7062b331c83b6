//! The listeners and the app connection type: TCP, or a Unix domain socket file.
//!
//! A Unix listener's file is created with `listen_mode`, and removed when the listener is
//! dropped (clean exit, or a start that failed later). A socket file left by a crash is
//! replaced; one a live process answers on is refused, and a path that is not a socket is never
//! touched. [`Stream`] is what both engines serve: one variant per kind, so the HTTP/1.1 engine
//! keeps a single (not generic) code path and TCP pays one branch per read or write.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::Listen;

/// How long a process on an existing socket file has to accept before the file counts as live
/// anyway (a full backlog): keyproxy refuses rather than steal it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The socket's directory is missing.
    #[error("the directory {} does not exist (keyproxy creates the socket, not its directory)", .0.display())]
    NoDirectory(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket; keyproxy leaves it alone: remove it or choose another path", .0.display())]
    NotASocket(PathBuf),
    /// A running process accepts connections on the socket.
    #[error("another process is listening on {}; stop it or choose another path", .0.display())]
    InUse(PathBuf),
    /// The OS refused.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket, and its file (removed on drop).
    Unix(UnixListener, SocketFile),
}

/// An accepted app or admin connection.
#[derive(Debug)]
pub enum Stream {
    /// Over TCP (`TCP_NODELAY` set on accept).
    Tcp(TcpStream),
    /// Over a Unix domain socket.
    Unix(UnixStream),
}

/// Who connected, for log lines: the TCP peer, or `unix` (a Unix peer has no address).
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    /// The TCP peer's address.
    Tcp(SocketAddr),
    /// A process on the same host, through the socket file.
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

impl Listener {
    /// Binds `addr`; a Unix socket file gets the permission bits `mode`.
    pub async fn bind(addr: &Listen, mode: u32) -> Result<Listener, BindError> {
        match addr {
            Listen::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            Listen::Unix(path) => {
                clear_stale(path).await?;
                let listener = UnixListener::bind(path)?;
                // From here on the file is ours: removed on drop, even if what follows fails.
                let file = SocketFile::new(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                Ok(Listener::Unix(listener, file))
            }
        }
    }

    /// Where it listens (with the port the system picked for port 0).
    pub fn local(&self) -> io::Result<Listen> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Listen::Tcp),
            Listener::Unix(_, file) => Ok(Listen::Unix(file.path.clone())),
        }
    }

    /// The next connection.
    pub async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Peer::Tcp(peer)))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), Peer::Unix))
            }
        }
    }
}

/// Makes way for a new socket at `path`: its directory must exist; a socket file nobody answers
/// on (left by a crash) is removed; a live socket, or anything else at the path, is an error.
async fn clear_stale(path: &Path) -> Result<(), BindError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.is_dir() {
        return Err(BindError::NoDirectory(dir.to_owned()));
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket(path.to_owned()));
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Err(_) | Ok(Ok(_)) => Err(BindError::InUse(path.to_owned())),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale socket file (nothing listens on it)");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// A socket file this process created: removed on drop, unless another file has taken its place.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device and inode at creation, to tell our file from a newer one at the same path.
    id: (u64, u64),
}

impl SocketFile {
    fn new(path: &Path) -> io::Result<SocketFile> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_owned(),
            id: (m.dev(), m.ino()),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket file");
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kp-listener-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[tokio::test]
    async fn unix_socket_file_lifecycle() {
        let d = dir("life");
        let path = d.join("app.sock");
        let addr = Listen::Unix(path.clone());
        let l = Listener::bind(&addr, 0o600).await.expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(l.local().expect("local"), addr);
        // Live: refused, and the file stays.
        assert!(matches!(
            Listener::bind(&addr, 0o660).await,
            Err(BindError::InUse(_))
        ));
        assert!(path.exists());
        drop(l);
        assert!(!path.exists(), "removed on drop");

        // Stale (bound, never removed): replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).expect("stale");
        drop(stale);
        assert!(path.exists());
        let l = Listener::bind(&addr, 0o660)
            .await
            .expect("replaces a stale file");
        drop(l);

        // Not a socket: refused and left intact.
        std::fs::write(&path, "data").expect("file");
        assert!(matches!(
            Listener::bind(&addr, 0o660).await,
            Err(BindError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).expect("kept"), "data");

        let missing = Listen::Unix(d.join("nope").join("app.sock"));
        let e = Listener::bind(&missing, 0o660).await.expect_err("no dir");
        assert!(matches!(e, BindError::NoDirectory(_)), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
