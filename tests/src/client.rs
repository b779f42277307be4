//! Client helpers run from inside a namespace. Every call is bounded by
//! [`CLIENT_TIMEOUT`].

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream,
    UdpSocket,
};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use socket2::{Domain, Socket, Type};

use crate::dns::{self, DnsReply};
use crate::lock;
use crate::ns::Netns;
use crate::stop::Stopper;

/// An identifier (DNS id, ICMP echo id) unlikely to be used twice at once
/// on this machine.
pub(crate) fn unique_id() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    (std::process::id() as u16)
        .wrapping_mul(7919)
        .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A server address of either family for the client helpers: they answer
/// with the same type (an IPv4 server's whoami reports a
/// [`SocketAddrV4`], an IPv6 one's a [`SocketAddrV6`], a [`SocketAddr`]'s
/// either).
pub trait Endpoint:
    Copy + Into<SocketAddr> + fmt::Display + fmt::Debug + Send + Sync + 'static
{
    /// `addr` as this type, if it is of its family.
    fn from_socket_addr(addr: SocketAddr) -> Option<Self>;
}

impl Endpoint for SocketAddrV4 {
    fn from_socket_addr(addr: SocketAddr) -> Option<Self> {
        match addr {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        }
    }
}

impl Endpoint for SocketAddrV6 {
    fn from_socket_addr(addr: SocketAddr) -> Option<Self> {
        match addr {
            SocketAddr::V6(a) => Some(a),
            SocketAddr::V4(_) => None,
        }
    }
}

impl Endpoint for SocketAddr {
    fn from_socket_addr(addr: SocketAddr) -> Option<Self> {
        Some(addr)
    }
}

/// The unspecified address of `server`'s family, port 0 (a client's bind).
fn any_of(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Bound of each connect, read or exchange made by the client helpers.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// UDP exchanges are tried this many times, each waiting a third of
/// [`CLIENT_TIMEOUT`].
const UDP_TRIES: u32 = 3;

impl Netns {
    /// Connects to a TCP whoami server and returns the source address it
    /// saw (after any NAT).
    pub fn tcp_whoami<A: Endpoint>(&self, server: A) -> Result<A> {
        self.tcp_whoami_within(server, CLIENT_TIMEOUT)
    }

    /// [`Netns::tcp_whoami`] with connect and read each bounded by
    /// `timeout` (short ones make expected failures quick).
    pub fn tcp_whoami_within<A: Endpoint>(&self, server: A, timeout: Duration) -> Result<A> {
        self.run(|| tcp_whoami_here(server, None, timeout))
    }

    /// [`Netns::tcp_whoami`] from source address `source` (one of this
    /// namespace's addresses, e.g. a host's extra IPv6 address).
    pub fn tcp_whoami_from<A: Endpoint>(&self, server: A, source: IpAddr) -> Result<A> {
        self.run(|| tcp_whoami_here(server, Some(source), CLIENT_TIMEOUT))
    }

    /// Asks a UDP whoami server which source address it saw.
    pub fn udp_whoami<A: Endpoint>(&self, server: A) -> Result<A> {
        self.udp_whoami_sized(server, 0)
    }

    /// [`Netns::udp_whoami`] from source address `source`.
    pub fn udp_whoami_from<A: Endpoint>(&self, server: A, source: IpAddr) -> Result<A> {
        let answer = self.run(|| {
            let socket = UdpSocket::bind(SocketAddr::new(source, 0))?;
            socket.connect(server.into())?;
            udp_exchange_on(&socket, b"whoami")
        })?;
        parse_whoami(&String::from_utf8_lossy(&answer))
    }

    /// [`Netns::udp_whoami`] with the request padded to `len` bytes: beyond
    /// the path MTU the host sends it in fragments.
    pub fn udp_whoami_sized<A: Endpoint>(&self, server: A, len: usize) -> Result<A> {
        let mut request = b"whoami".to_vec();
        request.resize(len.max(request.len()), b'.');
        let answer = self.udp_exchange(server.into(), &request)?;
        parse_whoami(&String::from_utf8_lossy(&answer))
    }

    /// Sends a DNS query for `name` and returns the parsed response.
    pub fn dns_query(&self, server: impl Into<SocketAddr>, name: &str) -> Result<DnsReply> {
        let server = server.into();
        let id = unique_id();
        let answer = self.udp_exchange(server, &dns::query(id, name))?;
        let reply = dns::parse_reply(&answer)
            .ok_or_else(|| anyhow!("malformed DNS reply from {server}"))?;
        if reply.id != id {
            bail!("DNS reply id {} does not match query id {id}", reply.id);
        }
        Ok(reply)
    }

    /// Resolves `name` (type A) with `server`: the addresses of the answer,
    /// CNAME chains followed by the server. An answer without addresses or
    /// with another ID is an error.
    pub fn dns_lookup(&self, server: impl Into<SocketAddr>, name: &str) -> Result<Vec<Ipv4Addr>> {
        self.dns_lookup_of(server.into(), name)
    }

    /// [`Netns::dns_lookup`] of type AAAA (over either family, as `server`
    /// is): the IPv6 addresses of the answer.
    pub fn dns_lookup6(&self, server: impl Into<SocketAddr>, name: &str) -> Result<Vec<Ipv6Addr>> {
        self.dns_lookup_of(server.into(), name)
    }

    fn dns_lookup_of<R: DnsRecord>(&self, server: SocketAddr, name: &str) -> Result<Vec<R>> {
        let id = unique_id();
        let answer = self.udp_exchange(server, &dns::query_type(id, name, R::QTYPE))?;
        answer_addresses(&answer, id, server, name)
    }

    /// [`Netns::dns_lookup`] over TCP (one query on a new connection).
    pub fn dns_lookup_tcp(
        &self,
        server: impl Into<SocketAddr>,
        name: &str,
    ) -> Result<Vec<Ipv4Addr>> {
        let server = server.into();
        let id = unique_id();
        let query = dns::query(id, name);
        let answer = self.run(|| -> Result<Vec<u8>> {
            let mut conn = TcpStream::connect_timeout(&server, CLIENT_TIMEOUT)
                .with_context(|| format!("connecting to {server}"))?;
            conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&query);
            conn.write_all(&framed)?;
            let mut len = [0u8; 2];
            conn.read_exact(&mut len)
                .with_context(|| format!("reading the answer's length from {server}"))?;
            let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
            conn.read_exact(&mut answer)
                .with_context(|| format!("reading the answer from {server}"))?;
            Ok(answer)
        })?;
        answer_addresses(&answer, id, server, name)
    }

    /// Opens a connection to a stream server; a thread keeps reading it.
    pub fn open_stream<A: Endpoint>(&self, server: A) -> Result<Stream<A>> {
        self.open_stream_from(server, None)
    }

    /// [`Netns::open_stream`] from source address `source` if given.
    pub fn open_stream_from<A: Endpoint>(
        &self,
        server: A,
        source: Option<IpAddr>,
    ) -> Result<Stream<A>> {
        let (conn, source, early) = self.run(|| -> Result<_> {
            let mut conn = connect_from(server.into(), source, CLIENT_TIMEOUT)?;
            conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
            let mut header = Vec::new();
            let mut buf = [0u8; 4096];
            let newline = loop {
                let n = conn
                    .read(&mut buf)
                    .with_context(|| format!("reading header from {server}"))?;
                if n == 0 {
                    bail!("{server} closed before sending its header");
                }
                header.extend_from_slice(&buf[..n]);
                if let Some(i) = header.iter().position(|&b| b == b'\n') {
                    break i;
                }
            };
            let source: A = parse_whoami(&String::from_utf8_lossy(&header[..newline]))?;
            Ok((conn, source, (header.len() - newline - 1) as u64))
        })?;
        let stop = self.ctx.stopper()?;
        let state = Arc::new(Mutex::new(StreamState {
            bytes: early,
            last_read: Instant::now(),
            max_gap: Duration::ZERO,
            end: None,
        }));
        let local = conn.local_addr()?;
        let local = A::from_socket_addr(local)
            .ok_or_else(|| anyhow!("stream from {local}: not the server's family"))?;
        let reader = conn.try_clone()?;
        let thread = thread::Builder::new()
            .name(format!("stream-{source}"))
            .spawn({
                let (state, stop) = (state.clone(), stop.clone());
                move || read_stream(reader, &state, &stop)
            })?;
        Ok(Stream {
            source,
            local,
            conn,
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// One datagram out, one back, retried [`UDP_TRIES`] times.
    fn udp_exchange(&self, server: SocketAddr, request: &[u8]) -> Result<Vec<u8>> {
        self.run(|| {
            let socket = UdpSocket::bind(any_of(server))?;
            socket.connect(server)?;
            udp_exchange_on(&socket, request)
        })
    }

    /// A UDP "connection": one socket (one source port) in this namespace
    /// talking to a UDP whoami (or DNS) server, for as long as the value
    /// lives.
    pub fn udp_flow<A: Endpoint>(&self, server: A) -> Result<UdpFlow<A>> {
        let socket = self.run(|| -> Result<UdpSocket> {
            let socket = UdpSocket::bind(any_of(server.into()))?;
            socket.connect(server.into())?;
            Ok(socket)
        })?;
        Ok(UdpFlow { socket, server })
    }
}

/// An address a DNS record gives: A (IPv4) or AAAA (IPv6).
trait DnsRecord: Sized {
    const QTYPE: u16;
    fn of(ip: IpAddr) -> Option<Self>;
}

impl DnsRecord for Ipv4Addr {
    const QTYPE: u16 = 1;
    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
}

impl DnsRecord for Ipv6Addr {
    const QTYPE: u16 = 28;
    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }
    }
}

/// The addresses (of `R`'s type) of a DNS answer to query `id` for `name`
/// from `server`: an error if it is malformed, answers another query or
/// has none.
fn answer_addresses<R: DnsRecord>(
    answer: &[u8],
    id: u16,
    server: SocketAddr,
    name: &str,
) -> Result<Vec<R>> {
    let reply =
        dns::parse_reply(answer).ok_or_else(|| anyhow!("malformed DNS reply from {server}"))?;
    if reply.id != id {
        bail!("DNS reply id {} does not match query id {id}", reply.id);
    }
    let addrs: Vec<R> = dns::addresses(answer)
        .ok_or_else(|| anyhow!("malformed answer section from {server} for {name}"))?
        .into_iter()
        .filter_map(R::of)
        .collect();
    if addrs.is_empty() {
        bail!(
            "{server} gave no address for {name} (rcode {})",
            reply.rcode
        );
    }
    Ok(addrs)
}

/// Sends `request` on a connected socket and returns the answer, trying
/// [`UDP_TRIES`] times within [`CLIENT_TIMEOUT`].
fn udp_exchange_on(socket: &UdpSocket, request: &[u8]) -> Result<Vec<u8>> {
    discard_late_answers(socket)?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT / UDP_TRIES))?;
    let mut buf = [0u8; 2048];
    let mut last_err = None;
    for _ in 0..UDP_TRIES {
        socket
            .send(request)
            .with_context(|| format!("sending to {:?}", socket.peer_addr()))?;
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(buf[..n].to_vec()),
            Err(e) => last_err = Some(e),
        }
    }
    Err(anyhow!(last_err.expect("at least one try"))
        .context(format!("no answer from {:?}", socket.peer_addr())))
}

/// Drops the datagrams waiting on a reused socket: late answers to an
/// earlier exchange's retried request (a busy machine delays one past the
/// read timeout, the retry's answer is read, the first one stays queued),
/// which would otherwise pass for the answer to the next request.
pub fn discard_late_answers(socket: &UdpSocket) -> Result<()> {
    socket.set_nonblocking(true)?;
    let mut buf = [0u8; 2048];
    let drained = loop {
        match socket.recv(&mut buf) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    socket.set_nonblocking(false)?;
    Ok(drained?)
}

/// A UDP flow of [`Netns::udp_flow`]: every exchange uses the same 5-tuple.
pub struct UdpFlow<A: Endpoint = SocketAddrV4> {
    socket: UdpSocket,
    server: A,
}

impl<A: Endpoint> UdpFlow<A> {
    /// The source address the whoami server saw for this exchange.
    pub fn whoami(&self) -> Result<A> {
        let answer = udp_exchange_on(&self.socket, b"whoami")
            .with_context(|| format!("UDP flow to {}", self.server))?;
        parse_whoami(&String::from_utf8_lossy(&answer))
    }

    /// [`Netns::dns_lookup`] on this flow (a client that always asks from
    /// the same source port; the flow's server is a DNS server).
    pub fn dns_lookup(&self, name: &str) -> Result<Vec<Ipv4Addr>> {
        let id = unique_id();
        let answer = udp_exchange_on(&self.socket, &dns::query(id, name))
            .with_context(|| format!("UDP flow to {}", self.server))?;
        answer_addresses(&answer, id, self.server.into(), name)
    }
}

/// [`Netns::tcp_whoami`] `n` times with `concurrency` connections at a
/// time; results in order.
pub fn many_tcp_whoami<A: Endpoint>(
    host: &Netns,
    server: A,
    n: usize,
    concurrency: usize,
) -> Vec<Result<A>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<A>>>> = Mutex::new((0..n).map(|_| None).collect());
    thread::scope(|s| {
        for _ in 0..concurrency.clamp(1, n.max(1)) {
            s.spawn(|| {
                let entered = host.enter();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let result = match &entered {
                        Ok(()) => tcp_whoami_here(server, None, CLIENT_TIMEOUT),
                        Err(e) => Err(anyhow!("{e:#}")),
                    };
                    lock(&results)[i] = Some(result);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every index done"))
        .collect()
}

fn tcp_whoami_here<A: Endpoint>(server: A, source: Option<IpAddr>, timeout: Duration) -> Result<A> {
    let mut conn = connect_from(server.into(), source, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .with_context(|| format!("reading from {server}"))?;
    parse_whoami(&answer)
}

/// A TCP connection to `server` (from `source` if given) within `timeout`,
/// made in the calling thread's namespace.
fn connect_from(
    server: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect_timeout(&server, timeout)
            .with_context(|| format!("connecting to {server}"));
    };
    let socket = Socket::new(Domain::for_address(server), Type::STREAM, None)?;
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .with_context(|| format!("binding to {source}"))?;
    socket
        .connect_timeout(&server.into(), timeout)
        .with_context(|| format!("connecting to {server} from {source}"))?;
    Ok(socket.into())
}

fn parse_whoami<A: Endpoint>(answer: &str) -> Result<A> {
    let addr: SocketAddr = answer
        .trim()
        .parse()
        .with_context(|| format!("bad whoami answer {answer:?}"))?;
    A::from_socket_addr(addr)
        .ok_or_else(|| anyhow!("whoami answer {addr}: not the server's family"))
}

/// A connection to a stream server, read continuously by its own thread.
/// Closed when dropped.
pub struct Stream<A: Endpoint = SocketAddrV4> {
    source: A,
    local: A,
    conn: TcpStream,
    state: Arc<Mutex<StreamState>>,
    stop: Arc<Stopper>,
    thread: Option<JoinHandle<()>>,
}

struct StreamState {
    bytes: u64,
    last_read: Instant,
    max_gap: Duration,
    end: Option<StreamEnd>,
}

/// How a stream ended by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// The server closed the connection.
    Eof,
    /// A read failed (reset, timeout of the connection, …).
    Error(io::ErrorKind, String),
}

/// Final numbers of a stream, from [`Stream::close`].
#[derive(Debug, Clone)]
pub struct StreamReport<A = SocketAddrV4> {
    pub source: A,
    pub bytes: u64,
    /// Longest time without data, including the time since the last read.
    pub max_gap: Duration,
    /// `None` if the stream was still healthy when closed.
    pub end: Option<StreamEnd>,
}

impl<A: Endpoint> Stream<A> {
    /// The source address the server reported (after any NAT).
    pub fn source(&self) -> A {
        self.source
    }

    /// The client's own address and port (the LAN side of the flow).
    pub fn local(&self) -> A {
        self.local
    }

    /// Bytes received so far (after the whoami line).
    pub fn bytes(&self) -> u64 {
        lock(&self.state).bytes
    }

    /// Longest time without data so far, including the current wait.
    pub fn max_gap(&self) -> Duration {
        let state = lock(&self.state);
        let current = if state.end.is_none() {
            state.last_read.elapsed()
        } else {
            Duration::ZERO
        };
        state.max_gap.max(current)
    }

    /// Forgets the gaps seen so far, e.g. to measure only after a change.
    pub fn reset_max_gap(&self) {
        let mut state = lock(&self.state);
        state.max_gap = Duration::ZERO;
        state.last_read = Instant::now();
    }

    /// How the stream ended, if it did (EOF or error).
    pub fn end(&self) -> Option<StreamEnd> {
        lock(&self.state).end.clone()
    }

    /// Waits up to `within` for the stream to be reset by its peer (what
    /// a client of a dead WAN sees once mwan has nudged it); an error says
    /// what happened instead.
    pub fn wait_reset(&self, within: Duration) -> Result<()> {
        if !crate::wait_until(within, || self.end().is_some()) {
            bail!("the stream still runs {within:?} later");
        }
        match self.end() {
            Some(StreamEnd::Error(std::io::ErrorKind::ConnectionReset, _)) => Ok(()),
            other => bail!("the stream ended with {other:?}, not a reset"),
        }
    }

    /// Closes the connection and returns the final numbers.
    pub fn close(mut self) -> StreamReport<A> {
        self.shut();
        StreamReport {
            source: self.source,
            bytes: self.bytes(),
            max_gap: self.max_gap(),
            end: self.end(),
        }
    }

    fn shut(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Record the current stall before stopping the reader.
            let gap = self.max_gap();
            lock(&self.state).max_gap = gap;
            self.stop.stop();
            let _ = self.conn.shutdown(Shutdown::Both);
            let _ = thread.join();
        }
    }
}

impl<A: Endpoint> Drop for Stream<A> {
    fn drop(&mut self) {
        self.shut();
    }
}

fn read_stream(mut conn: TcpStream, state: &Mutex<StreamState>, stop: &Stopper) {
    // Short read timeouts so that `stop` is noticed.
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.is_stopped() {
        let result = conn.read(&mut buf);
        if stop.is_stopped() {
            break;
        }
        let mut state = lock(state);
        match result {
            Ok(0) => {
                state.end = Some(StreamEnd::Eof);
                break;
            }
            Ok(n) => {
                let now = Instant::now();
                state.max_gap = state.max_gap.max(now - state.last_read);
                state.last_read = now;
                state.bytes += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                state.end = Some(StreamEnd::Error(e.kind(), e.to_string()));
                break;
            }
        }
    }
}
