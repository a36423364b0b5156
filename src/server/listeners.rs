//! The gateway's listening sockets: one per worker on a shared port (`SO_REUSEPORT`, so the
//! kernel spreads connections across the workers), and only this process's: a port another
//! process listens on is refused, not joined.

use std::net::SocketAddr;

use super::ServeError;
use crate::config;

/// The gateway's bound listening sockets.
#[derive(Debug)]
pub struct Listeners {
    /// HTTPS (the pipeline): one socket per worker, all on one port.
    pub https: Vec<std::net::TcpListener>,
    /// Plain HTTP (redirects to HTTPS, or serves the pipeline: `server.http_mode`): one socket
    /// per worker, or none.
    pub http: Vec<std::net::TcpListener>,
    /// Admin (metrics, health, readiness).
    pub admin: Option<std::net::TcpListener>,
}

/// One listening socket; with `SO_REUSEPORT` so several can share a port.
fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A socket bound to `addr` without `SO_REUSEPORT`, never listening: the bind fails while any
/// other socket listens on `addr`, a group sharing it through `SO_REUSEPORT` included.
fn probe(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn bind_error(what: &'static str, addr: SocketAddr, source: std::io::Error) -> ServeError {
    if source.kind() == std::io::ErrorKind::AddrInUse {
        ServeError::Taken { what, addr }
    } else {
        ServeError::Bind { what, addr, source }
    }
}

/// Held while a process checks that a port is free and binds its group there, so that two
/// gateways starting at once cannot both find it free. An abstract Unix socket named after the
/// address: per network namespace like the port itself, and gone with the process.
#[cfg(target_os = "linux")]
struct PortLock {
    _socket: std::os::unix::net::UnixDatagram,
}

#[cfg(target_os = "linux")]
impl PortLock {
    fn take(what: &'static str, addr: SocketAddr) -> Result<Self, ServeError> {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("keygate/listen/{addr}");
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|lock| std::os::unix::net::UnixDatagram::bind_addr(&lock))
            .map(|socket| Self { _socket: socket })
            .map_err(|e| bind_error(what, addr, e))
    }
}

/// Elsewhere the probe alone guards the port.
#[cfg(not(target_os = "linux"))]
struct PortLock;

#[cfg(not(target_os = "linux"))]
impl PortLock {
    fn take(_what: &'static str, _addr: SocketAddr) -> Result<Self, ServeError> {
        Ok(Self)
    }
}

/// `n` sockets on `addr` (one port, also when `addr` asks for port 0), on a port no other
/// process listens on.
///
/// The workers share the port through `SO_REUSEPORT`, which would also let another process of
/// the same user join in and take a share of the connections (a second gateway started by
/// mistake answers some requests, or 502s them). So the group is bound only after a plain bind
/// of the address (the [`probe`]) succeeded, under a [`PortLock`] that keeps another gateway
/// from probing between this probe and this group's binds. Once the group listens, every later
/// probe fails. One socket on its own needs no `SO_REUSEPORT`, and its bind alone is exclusive.
fn listen_group(
    what: &'static str,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, ServeError> {
    if n <= 1 {
        return Ok(vec![
            listen(addr, false).map_err(|e| bind_error(what, addr, e))?,
        ]);
    }
    let bound_by = |probe: &socket2::Socket| {
        probe
            .local_addr()
            .and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| std::io::Error::other("not an IP socket"))
            })
            .map_err(|e| bind_error(what, addr, e))
    };
    // For port 0 the probe picks the port; the lock is then taken for it.
    let (probe, _lock) = if addr.port() == 0 {
        let probe = probe(addr).map_err(|e| bind_error(what, addr, e))?;
        let lock = PortLock::take(what, bound_by(&probe)?)?;
        (probe, lock)
    } else {
        let lock = PortLock::take(what, addr)?;
        (probe(addr).map_err(|e| bind_error(what, addr, e))?, lock)
    };
    let bound = bound_by(&probe)?;
    drop(probe);
    (0..n)
        .map(|_| listen(bound, true).map_err(|e| bind_error(what, bound, e)))
        .collect()
}

impl Listeners {
    /// Binds the listeners `[server]` names: `server.workers` sockets each for HTTPS and HTTP.
    pub fn bind(cfg: &config::Server) -> Result<Self, ServeError> {
        let workers = cfg.workers.max(1);
        Ok(Self {
            https: listen_group("https", cfg.https_listen, workers)?,
            http: match cfg.http_listen {
                Some(a) => listen_group("http", a, workers)?,
                None => Vec::new(),
            },
            admin: match cfg.admin_listen {
                Some(a) => Some(listen_group("admin", a, 1)?.remove(0)),
                None => None,
            },
        })
    }

    /// The HTTPS listener's address.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.first().and_then(|l| l.local_addr().ok())
    }

    /// The HTTP listener's address, if there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.first().and_then(|l| l.local_addr().ok())
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}
