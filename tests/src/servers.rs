//! Servers that run as threads of the test process with their sockets in
//! a namespace. Each stops when its handle or the lab is dropped.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};

use crate::dns;
use crate::ns::Netns;
use crate::stop::{Stopper, Wake};

/// A running server. Dropping it stops the server and joins its threads.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<Stopper>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on (with the real port if bound to 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Netns {
    /// TCP whoami: writes `"<peer ip>:<peer port>\n"` (`"[<ip>]:<port>"`
    /// for IPv6) to every connection
    /// and closes it.
    pub fn tcp_whoami_server(&self, bind: impl Into<SocketAddr>) -> Result<ServerHandle> {
        let (listener, addr) = self.bind_tcp(bind)?;
        self.start_server("tcp-whoami", addr, move |stop| {
            serve_tcp(&listener, &stop, |mut conn, peer| {
                let _ = conn.write_all(format!("{peer}\n").as_bytes());
            })
        })
    }

    /// Plain TCP listener (a TCP probe target): accepts and closes.
    pub fn tcp_probe_server(&self, bind: impl Into<SocketAddr>) -> Result<ServerHandle> {
        let (listener, addr) = self.bind_tcp(bind)?;
        self.start_server("tcp-probe", addr, move |stop| {
            serve_tcp(&listener, &stop, |_, _| {})
        })
    }

    /// Stream server: writes `"<peer ip>:<peer port>\n"`, then data until
    /// the client closes, at most `pace` bytes per second if given.
    pub fn stream_server(
        &self,
        bind: impl Into<SocketAddr>,
        pace: Option<u64>,
    ) -> Result<ServerHandle> {
        let (listener, addr) = self.bind_tcp(bind)?;
        self.start_server("stream", addr, move |stop| {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            serve_tcp(&listener, &stop, |conn, peer| {
                conns.retain(|c| !c.is_finished());
                let stop = stop.clone();
                conns.push(thread::spawn(move || stream_to(conn, peer, pace, &stop)));
            });
            for conn in conns {
                let _ = conn.join();
            }
        })
    }

    /// UDP whoami: answers every datagram with `"<peer ip>:<peer port>"`.
    pub fn udp_whoami_server(&self, bind: impl Into<SocketAddr>) -> Result<ServerHandle> {
        let (socket, addr) = self.bind_udp(bind)?;
        self.start_server("udp-whoami", addr, move |stop| {
            serve_udp(&socket, &stop, |_, peer| {
                Some(peer.to_string().into_bytes())
            })
        })
    }

    /// DNS responder: answers every query with NOERROR, the query's id and
    /// question, and no records.
    pub fn dns_server(&self, bind: impl Into<SocketAddr>) -> Result<ServerHandle> {
        let (socket, addr) = self.bind_udp(bind)?;
        self.start_server("dns", addr, move |stop| {
            serve_udp(&socket, &stop, |query, _| dns::respond(query))
        })
    }

    /// A nonblocking TCP listener on `bind` in this namespace (address
    /// reuse on, backlog 1024, an IPv6 socket for IPv6 only), with the
    /// address it got.
    pub fn bind_tcp(&self, bind: impl Into<SocketAddr>) -> Result<(TcpListener, SocketAddr)> {
        let bind = bind.into();
        let listener: TcpListener = self
            .run(|| -> io::Result<TcpListener> {
                until_address_usable(|| {
                    let socket = Socket::new(Domain::for_address(bind), Type::STREAM, None)?;
                    if bind.is_ipv6() {
                        socket.set_only_v6(true)?;
                    }
                    socket.set_reuse_address(true)?;
                    socket.bind(&bind.into())?;
                    socket.listen(1024)?;
                    socket.set_nonblocking(true)?;
                    Ok(socket.into())
                })
            })
            .with_context(|| format!("TCP listen on {bind} in {}", self.name()))?;
        let addr = listener.local_addr()?;
        Ok((listener, addr))
    }

    fn bind_udp(&self, bind: impl Into<SocketAddr>) -> Result<(UdpSocket, SocketAddr)> {
        let bind = bind.into();
        let socket = self
            .run(|| -> io::Result<UdpSocket> {
                until_address_usable(|| {
                    let socket = UdpSocket::bind(bind)?;
                    socket.set_nonblocking(true)?;
                    Ok(socket)
                })
            })
            .with_context(|| format!("UDP bind on {bind} in {}", self.name()))?;
        let addr = socket.local_addr()?;
        Ok((socket, addr))
    }

    fn start_server(
        &self,
        kind: &str,
        addr: SocketAddr,
        serve: impl FnOnce(Arc<Stopper>) + Send + 'static,
    ) -> Result<ServerHandle> {
        let stop = self.ctx.stopper()?;
        let thread = thread::Builder::new()
            .name(format!("{kind}-{addr}"))
            .spawn({
                let stop = stop.clone();
                move || serve(stop)
            })?;
        Ok(ServerHandle {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

/// Accepts connections until `stop` fires, handing each to `on_conn`.
fn serve_tcp(
    listener: &TcpListener,
    stop: &Stopper,
    mut on_conn: impl FnMut(TcpStream, SocketAddr),
) {
    while let Ok(Wake::Readable) = stop.wait_readable(listener.as_raw_fd(), None) {
        // Accepted sockets are blocking on Linux (flags are not inherited).
        while let Ok((conn, peer)) = listener.accept() {
            on_conn(conn, peer);
        }
    }
}

/// Answers datagrams with `reply` until `stop` fires.
fn serve_udp(
    socket: &UdpSocket,
    stop: &Stopper,
    reply: impl Fn(&[u8], SocketAddr) -> Option<Vec<u8>>,
) {
    let mut buf = [0u8; 2048];
    while let Ok(Wake::Readable) = stop.wait_readable(socket.as_raw_fd(), None) {
        while let Ok((len, peer)) = socket.recv_from(&mut buf) {
            if let Some(answer) = reply(&buf[..len], peer) {
                let _ = socket.send_to(&answer, peer);
            }
        }
    }
}

/// Longest burst a paced stream sends to catch up after a stall.
const PACE_CATCH_UP: Duration = Duration::from_millis(100);

/// One stream connection: the whoami line, then data until the client
/// goes away or `stop` fires.
fn stream_to(mut conn: TcpStream, peer: SocketAddr, pace: Option<u64>, stop: &Stopper) {
    // Bounded writes, so a stalled connection still notices `stop`.
    let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
    if conn.write_all(format!("{peer}\n").as_bytes()).is_err() {
        return;
    }
    let chunk = [0x5a_u8; 16 * 1024];
    let mut next_send = Instant::now();
    while !stop.is_stopped() {
        if pace.is_some() {
            let now = Instant::now();
            if next_send > now {
                thread::sleep((next_send - now).min(Duration::from_millis(50)));
                continue;
            }
            next_send = next_send.max(now.checked_sub(PACE_CATCH_UP).unwrap_or(now));
        }
        match conn.write(&chunk) {
            Ok(n) => {
                if let Some(rate) = pace {
                    next_send += Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Runs `bind` again while it fails with EADDRNOTAVAIL, for at most 2 s:
/// an address the lab has just added (in the same `ip` batch that enabled
/// the interface) is now and then not yet usable by the time the servers
/// start.
fn until_address_usable<T>(mut bind: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match bind() {
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                    && std::time::Instant::now() < deadline =>
            {
                thread::sleep(std::time::Duration::from_millis(5))
            }
            r => return r,
        }
    }
}
