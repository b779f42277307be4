//! The DNS relay for rules by domain name (UDP and TCP, IPv4 and IPv6).
//!
//! mwan's nftables table redirects the LAN's DNS queries (port 53, to any
//! address, over either family) to [`Relay`]'s UDP sockets and TCP
//! listeners (one of each per family, on the same ports; see
//! `nft::Divert`). The server is asked over the query's family.
//! For each UDP query
//! the relay learns the server the client addressed from the query's
//! conntrack entry (looked up by its reply direction: this socket's address
//! and the client's), asks that server itself, and when the answer comes:
//! parses it ([`parse_response`]), and if it is the answer to that query
//! (ID and question), writes the addresses of the names the rules list into
//! `DOMAIN_DST` — *then* sends the answer, unchanged, to the client from the
//! same socket; conntrack rewrites its source back to the server's. The
//! client cannot connect to an address before the datapath knows it: no
//! race. Over TCP the server is the accepted connection's original
//! destination, and each connection is relayed as a pair of streams (see
//! `relay_tcp`).
//!
//! Everything is bounded: [`MAX_IN_FLIGHT`] UDP queries at once (more are
//! dropped, as a full queue would drop them: the client retries),
//! [`UPSTREAM_TIMEOUT`] per query (then nothing is sent: the client's own
//! timeout and retry take over, as for a lost packet), messages of at most
//! [`MAX_UDP`] bytes. An answer that is malformed or belongs to another query
//! teaches nothing and is still relayed as it is; a server that cannot be
//! reached at all (a send error) gets the client a SERVFAIL. [`MAX_TCP`]
//! TCP connections at once, each closed after 30 s idle. Every failure is
//! logged.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::{debug, info, warn};

use super::learned::{AddressTable, Change};
use super::wire::parse_response;
use super::DomainMatcher;

/// Queries relayed at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long the server has to answer one query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest UDP message relayed (EDNS buffers rarely exceed 4096).
pub const MAX_UDP: usize = 65_535;
/// How often expired addresses are removed from `DOMAIN_DST`.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// The question of a query: what its answer must repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    pub name: String,
    pub qtype: u16,
}

/// The question of `query`, when it is a well-formed standard query with one
/// question (anything else is relayed without learning).
pub fn question(query: &[u8]) -> Option<Question> {
    let q = parse_response(query).ok()?;
    if q.header.response || q.header.opcode != 0 {
        return None;
    }
    let (name, qtype) = q.question?;
    Some(Question {
        id: q.header.id,
        name,
        qtype,
    })
}

/// The learning half of the relay, without sockets: answers in, map
/// changes out.
pub struct Learner {
    matcher: DomainMatcher,
    pub table: AddressTable,
}

impl Learner {
    pub fn new(matcher: DomainMatcher) -> Learner {
        Learner {
            matcher,
            table: AddressTable::new(),
        }
    }

    /// Learned addresses live `floor` at least, plus `grace`.
    pub fn with_lifetime(mut self, floor: Duration, grace: Duration) -> Learner {
        self.table = self.table.with_lifetime(floor, grace);
        self
    }

    /// What `answer` to the query `q` teaches at `now_ns`: the changes to
    /// write into `DOMAIN_DST` before the answer is released. Nothing when
    /// the answer is malformed or is not for `q` (ID, name, type).
    pub fn answer(&mut self, q: &Question, answer: &[u8], now_ns: u64) -> Vec<Change> {
        let Ok(resp) = parse_response(answer) else {
            return vec![];
        };
        let same = resp.header.id == q.id
            && resp
                .question
                .as_ref()
                .is_some_and(|(n, t)| n.eq_ignore_ascii_case(&q.name) && *t == q.qtype);
        if !same {
            return vec![];
        }
        let mut changes = Vec::new();
        for l in &resp.learned {
            let mask = self.matcher.chain_rules(&l.chain);
            let name = l.chain.first().map(String::as_str).unwrap_or("");
            if let Some(c) = self.table.learn(l.addr, mask, l.ttl, now_ns, name) {
                changes.push(c);
            }
        }
        changes
    }
}

/// A SERVFAIL answer to `query` (its header and question), or `None` when
/// the query is too short to answer.
pub fn servfail(query: &[u8], q: Option<&Question>) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // Header and question only: the question ends 4 bytes after its name.
    let qlen = q.map(|q| q.name.len() + 2 + 4).unwrap_or(0);
    let end = (12 + qlen).min(query.len());
    let mut a = query[..end].to_vec();
    a[2] = 0x80 | (query[2] & 0x79); // QR, opcode and RD kept
    a[3] = 0x80 | 2; // RA, SERVFAIL
    let qd: u16 = if qlen > 0 { 1 } else { 0 };
    a[4..6].copy_from_slice(&qd.to_be_bytes());
    a[6..12].fill(0);
    Some(a)
}

/// The running relay: its socket's port, and threads that stop when it is
/// dropped.
pub struct Relay {
    /// The UDP socket's port.
    pub port: u16,
    /// The TCP listener's port.
    pub tcp_port: u16,
    /// The clock of the learned table's expiry times.
    started: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    /// Shared with the threads, for `mwan domains`.
    pub learner: Arc<Mutex<Learner>>,
    shared: Arc<Shared>,
}

struct Shared {
    learner: Arc<Mutex<Learner>>,
    map: Mutex<crate::datapath::DomainMaps>,
    in_flight: AtomicUsize,
    tcp_connections: AtomicUsize,
    /// Set (under the `map` lock) when the relay is dropped: queries still
    /// in flight then write nothing, so the daemon can empty `DOMAIN_DST`
    /// knowing no entry without an owner appears after.
    retired: AtomicBool,
    started: Instant,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Learns from `answer` to `q` and writes the changes (before the
    /// caller releases the answer).
    fn learn(&self, q: &Question, answer: &[u8]) {
        let changes = {
            let mut l = self.learner.lock().expect("learner lock");
            l.answer(q, answer, self.now_ns())
        };
        if let Err(e) = self.write(&changes) {
            warn!(error = %format!("{e:#}"), "DNS relay: writing learned addresses");
        }
    }

    fn write(&self, changes: &[Change]) -> Result<()> {
        let mut map = self.map.lock().expect("map lock");
        if self.retired.load(Ordering::Acquire) {
            return Ok(());
        }
        map.write(changes)
    }
}

impl Relay {
    /// Opens the diverted socket (on a free port, see [`Relay::port`]) and
    /// starts relaying, writing into the `DOMAIN_DST` pinned in `pin_dir`.
    pub fn start(
        pin_dir: &Path,
        matcher: DomainMatcher,
        floor: Duration,
        grace: Duration,
    ) -> Result<Relay> {
        let map = crate::datapath::DomainMaps::open_pinned(pin_dir)?;
        let sockets = Sockets::open()?;
        let (port, tcp_port) = (sockets.port, sockets.tcp_port);
        let learner = Arc::new(Mutex::new(
            Learner::new(matcher).with_lifetime(floor, grace),
        ));
        let started = Instant::now();
        let shared = Arc::new(Shared {
            learner: learner.clone(),
            map: Mutex::new(map),
            in_flight: AtomicUsize::new(0),
            tcp_connections: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            started,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for sock in sockets.udp {
            let (shared, stop) = (shared.clone(), stop.clone());
            threads.push(
                thread::Builder::new()
                    .name("mwan-dns".into())
                    .spawn(move || receive_loop(sock, shared, stop))?,
            );
        }
        for listener in sockets.tcp {
            let (shared, stop) = (shared.clone(), stop.clone());
            threads.push(
                thread::Builder::new()
                    .name("mwan-dns-tcp".into())
                    .spawn(move || accept_loop(listener, shared, stop))?,
            );
        }
        {
            let (shared, stop) = (shared.clone(), stop.clone());
            threads.push(
                thread::Builder::new()
                    .name("mwan-dns-expiry".into())
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            thread::sleep(EXPIRY_TICK);
                            let changes = {
                                let mut l = shared.learner.lock().expect("learner lock");
                                l.table.expire(shared.now_ns())
                            };
                            if let Err(e) = shared.write(&changes) {
                                warn!(error = %format!("{e:#}"), "expiring learned addresses");
                            }
                        }
                    })?,
            );
        }
        info!(port, tcp_port, "DNS relay for rules by domain name started");
        Ok(Relay {
            port,
            tcp_port,
            started,
            stop,
            threads,
            learner,
            shared,
        })
    }
}

impl Relay {
    /// What is learned now, for `mwan domains`: `rule_names[i]` names rule
    /// *i*; only entries whose name is `under` or below it, if given.
    pub fn learned(&self, rule_names: &[String], under: Option<&str>) -> Vec<LearnedEntry> {
        let now = self.started.elapsed().as_nanos() as u64;
        let l = self.learner.lock().expect("learner lock");
        let mut out: Vec<LearnedEntry> = l
            .table
            .iter()
            .filter(|(_, name, _)| under.is_none_or(|u| is_under(name, u)))
            .map(|(addr, name, rules)| LearnedEntry {
                address: addr,
                name: name.to_string(),
                rules: rules
                    .iter()
                    .map(|(r, exp)| LearnedRule {
                        rule: rule_names
                            .get(*r as usize)
                            .cloned()
                            .unwrap_or_else(|| format!("rule {r}")),
                        expires_in_secs: exp.saturating_sub(now) as f64 / 1e9,
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.address.cmp(&b.address)));
        out
    }
}

/// Whether `name` is `domain` or a name under it (case-insensitive).
fn is_under(name: &str, domain: &str) -> bool {
    let (name, domain) = (
        name.to_ascii_lowercase(),
        domain.trim_end_matches('.').to_ascii_lowercase(),
    );
    name == domain || name.ends_with(&format!(".{domain}"))
}

/// One learned address (`mwan domains --json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearnedEntry {
    pub address: std::net::IpAddr,
    /// The name whose answer last taught it (the question's name).
    pub name: String,
    pub rules: Vec<LearnedRule>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearnedRule {
    pub rule: String,
    /// Seconds until it expires (TTL, floor and grace included).
    pub expires_in_secs: f64,
}

impl Drop for Relay {
    fn drop(&mut self) {
        {
            let _map = self.shared.map.lock().expect("map lock");
            self.shared.retired.store(true, Ordering::Release);
        }
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The relay's sockets: UDP and TCP, for IPv4 and IPv6 (IPv6-only
/// sockets), each family's on the same port, so one port pair names the
/// relay in the divert's rules of both families. IPv4's only on a kernel
/// without IPv6 (`ipv6.disable=1`).
struct Sockets {
    port: u16,
    tcp_port: u16,
    udp: Vec<UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

impl Sockets {
    /// Free ports for IPv4 (chosen by the kernel), then the same for IPv6;
    /// tried again (bounded) when IPv6 has one of them taken.
    fn open() -> Result<Sockets> {
        const TRIES: usize = 16;
        let any6 = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let mut last = None;
        for _ in 0..TRIES {
            let udp4 = relay_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
                .context("opening the DNS relay's socket")?;
            let tcp4 = tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
                .context("opening the DNS relay's TCP listener")?;
            let (port, tcp_port) = (udp4.local_addr()?.port(), tcp4.local_addr()?.port());
            match (relay_socket(any6(port)), tcp_listener(any6(tcp_port))) {
                (Ok(udp6), Ok(tcp6)) => {
                    return Ok(Sockets {
                        port,
                        tcp_port,
                        udp: vec![udp4, udp6],
                        tcp: vec![tcp4, tcp6],
                    })
                }
                (Err(e), _) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    warn!("no IPv6 in this kernel: the DNS relay serves IPv4 only");
                    return Ok(Sockets {
                        port,
                        tcp_port,
                        udp: vec![udp4],
                        tcp: vec![tcp4],
                    });
                }
                (Err(e), _) | (_, Err(e)) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
                (Err(e), _) | (_, Err(e)) => {
                    return Err(e).context("opening the DNS relay's IPv6 sockets")
                }
            }
        }
        Err(last.expect("tried")).context(format!(
            "no port free for the DNS relay on both IPv4 and IPv6 in {TRIES} tries"
        ))
    }
}

/// Sets the integer socket option `opt` of `level` to 1.
fn set_flag(s: &Socket, level: libc::c_int, opt: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` outlives the call and its length is passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `s` transparent (`IP_TRANSPARENT`/`IPV6_TRANSPARENT`, which need
/// `CAP_NET_ADMIN`): the divert's `tproxy` finds only transparent sockets,
/// so while this one exists, queries are diverted; once it is gone, they
/// pass (`nft::Divert`). An IPv6 socket is IPv6-only (IPv4 has its own).
fn family_options(s: &Socket, bind: SocketAddr) -> io::Result<()> {
    if bind.is_ipv6() {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)
    } else {
        s.set_ip_transparent_v4(true)
    }
}

/// The relay's UDP socket of `bind`'s family, on `bind`'s port of every
/// address, asking for each datagram's (post-NAT) destination: the address
/// the query was redirected to, which is the source of the query's
/// conntrack reply direction.
fn relay_socket(bind: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    if bind.is_ipv6() {
        set_flag(&s, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR)?;
    } else {
        set_flag(&s, libc::SOL_IP, libc::IP_RECVORIGDSTADDR)?;
    }
    family_options(&s, bind)?;
    s.bind(&SockAddr::from(bind))?;
    s.set_read_timeout(Some(Duration::from_millis(250)))?;
    Ok(s.into())
}

/// Receives one datagram with its source and original destination.
fn recv_orig(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
    let mut src: MaybeUninit<libc::sockaddr_storage> = MaybeUninit::zeroed();
    let mut cmsg = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: every pointer in `msg` points into a live buffer of the given
    // length for the duration of the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = src.as_mut_ptr().cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed, then filled by the kernel.
    let from = socket_addr(unsafe { &src.assume_init() })
        .ok_or_else(|| io::Error::other("a datagram from no IP address"))?;
    let mut orig = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of `cmsg`; the
    // original destination is a sockaddr_in (IPv4) or sockaddr_in6 (IPv6).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::SOL_IP && kind == libc::IP_ORIGDSTADDR {
                let sa = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::sockaddr_in);
                orig = Some(SocketAddr::V4(sockaddr_v4(&sa)));
            } else if level == libc::SOL_IPV6 && kind == libc::IPV6_ORIGDSTADDR {
                let sa = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::sockaddr_in6);
                orig = Some(SocketAddr::V6(sockaddr_v6(&sa)));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let orig = orig.ok_or_else(|| io::Error::other("no original destination"))?;
    Ok((n as usize, from, orig))
}

/// The IP socket address in `ss`, if it holds one.
fn socket_addr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is large and aligned enough for both, and
    // `ss_family` says which one it holds.
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => Some(SocketAddr::V4(sockaddr_v4(unsafe {
            &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
        }))),
        libc::AF_INET6 => Some(SocketAddr::V6(sockaddr_v6(unsafe {
            &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
        }))),
        _ => None,
    }
}

fn sockaddr_v4(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

fn sockaddr_v6(sa: &libc::sockaddr_in6) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::from(sa.sin6_addr.s6_addr),
        u16::from_be(sa.sin6_port),
        sa.sin6_flowinfo,
        sa.sin6_scope_id,
    )
}

/// A timeout or interruption of a blocking call that the loops poll with,
/// to see their stop flag: not an error.
fn is_poll_wakeup(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Takes one of the `max` places counted by `count`; false (and nothing
/// taken) when all are in use.
fn take_place(count: &AtomicUsize, max: usize) -> bool {
    if count.fetch_add(1, Ordering::AcqRel) >= max {
        count.fetch_sub(1, Ordering::AcqRel);
        return false;
    }
    true
}

fn receive_loop(sock: UdpSocket, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; MAX_UDP];
    while !stop.load(Ordering::Relaxed) {
        let (n, client, local) = match recv_orig(&sock, &mut buf) {
            Ok(r) => r,
            Err(e) if is_poll_wakeup(&e) => continue,
            Err(e) => {
                warn!(error = %e, "DNS relay: receiving a query");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !take_place(&shared.in_flight, MAX_IN_FLIGHT) {
            warn!(%client, "DNS relay: {MAX_IN_FLIGHT} queries in flight, query dropped");
            continue;
        }
        let query = buf[..n].to_vec();
        let s = shared.clone();
        let out = sock.clone();
        let spawned = thread::Builder::new()
            .name("mwan-dns-q".into())
            .spawn(move || {
                match server_of(client, local) {
                    Ok(Some(server)) => relay_one(&s, &out, &query, client, local, server),
                    Ok(None) => {
                        warn!(%client, "DNS relay: no conntrack entry for a redirected query, dropped")
                    }
                    Err(e) => warn!(%client, error = %format!("{e:#}"), "DNS relay: looking up a query's server, dropped"),
                }
                s.in_flight.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            warn!(error = %e, "DNS relay: starting a query thread, query dropped");
        }
    }
}

/// The server a query from `client` redirected to `local` was sent to.
fn server_of(client: SocketAddr, local: SocketAddr) -> Result<Option<SocketAddr>> {
    let reply = crate::conntrack::CtTuple {
        proto: 17,
        src: local.ip(),
        dst: client.ip(),
        sport: local.port(),
        dport: client.port(),
    };
    Ok(crate::conntrack::by_reply(&reply)?.map(|e| SocketAddr::new(e.orig.dst, e.orig.dport)))
}

/// Relays one query: ask, learn, write, answer.
fn relay_one(
    shared: &Shared,
    out: &UdpSocket,
    query: &[u8],
    client: SocketAddr,
    local: SocketAddr,
    server: SocketAddr,
) {
    let q = question(query);
    let answer = match ask(query, server, q.as_ref()) {
        Ok(Some(a)) => a,
        Ok(None) => {
            debug!(%client, %server, "DNS relay: no answer in time; the client will retry");
            return;
        }
        Err(e) => {
            warn!(%client, %server, error = %e, "DNS relay: the server cannot be asked; answering SERVFAIL");
            if let Some(a) = servfail(query, q.as_ref()) {
                reply(out, &a, client, local, server);
            }
            return;
        }
    };
    if let Some(q) = &q {
        shared.learn(q, &answer);
    }
    reply(out, &answer, client, local, server);
}

/// Sends `query` to `server` from the router and waits for its answer (one
/// whose ID is the query's; other datagrams are ignored).
fn ask(query: &[u8], server: SocketAddr, q: Option<&Question>) -> io::Result<Option<Vec<u8>>> {
    let any: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = UdpSocket::bind((any, 0))?;
    sock.connect(server)?;
    sock.send(query)?;
    let deadline = Instant::now() + UPSTREAM_TIMEOUT;
    let mut buf = vec![0u8; MAX_UDP];
    let id = q
        .map(|q| q.id)
        .or_else(|| (query.len() >= 2).then(|| u16::from_be_bytes([query[0], query[1]])));
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv(&mut buf) {
            Ok(n) if n >= 2 && Some(u16::from_be_bytes([buf[0], buf[1]])) == id => {
                return Ok(Some(buf[..n].to_vec()))
            }
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            // An ICMP port unreachable: nobody serves DNS there.
            Err(e) => return Err(e),
        }
    }
}

/// Sends `answer` to `client` from the relay's socket. Over IPv4 the
/// kernel picks the address of the client's interface, the one the query
/// was redirected to; over IPv6 an interface often has several (ULA and
/// global, link-local), so the answer is sent from `local`, the redirect's
/// address, explicitly (`IPV6_PKTINFO`). Conntrack turns it back into
/// `server`'s.
fn reply(
    out: &UdpSocket,
    answer: &[u8],
    client: SocketAddr,
    local: SocketAddr,
    server: SocketAddr,
) {
    let sent = match (client, local) {
        (SocketAddr::V6(c), SocketAddr::V6(l)) => send_from6(out, answer, c, *l.ip()),
        _ => out.send_to(answer, client).map(|_| ()),
    };
    if let Err(e) = sent {
        warn!(%client, %server, error = %e, "DNS relay: sending the answer");
    }
}

/// Sends `data` to `to` with source address `from` (`IPV6_PKTINFO`).
fn send_from6(sock: &UdpSocket, data: &[u8], to: SocketAddrV6, from: Ipv6Addr) -> io::Result<()> {
    let dst = SockAddr::from(to);
    let info = libc::in6_pktinfo {
        ipi6_addr: libc::in6_addr {
            s6_addr: from.octets(),
        },
        ipi6_ifindex: 0,
    };
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: every pointer in `msg` points into a live buffer of the given
    // length for the duration of the call; the control buffer holds one
    // `in6_pktinfo` message (CMSG_SPACE of it is well under 64 bytes).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = dst.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = dst.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen =
            libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_IPV6;
        (*c).cmsg_type = libc::IPV6_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in6_pktinfo, info);
        if libc::sendmsg(sock.as_raw_fd(), &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// TCP connections relayed at once; more are closed at once (the client
/// retries or falls back).
pub const MAX_TCP: usize = 64;
/// A TCP connection idle this long (either side) is closed.
const TCP_IDLE: Duration = Duration::from_secs(30);

/// The relay's TCP listener of `bind`'s family on `bind`'s port of every
/// address (a short accept timeout, to notice `stop`).
fn tcp_listener(bind: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(bind), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    family_options(&s, bind)?;
    s.bind(&SockAddr::from(bind))?;
    s.listen(128)?;
    s.set_read_timeout(Some(Duration::from_millis(250)))?;
    Ok(s.into())
}

fn accept_loop(listener: std::net::TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let (client, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if is_poll_wakeup(&e) => continue,
            Err(e) => {
                warn!(error = %e, "DNS relay: accepting a TCP connection");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !take_place(&shared.tcp_connections, MAX_TCP) {
            warn!(%peer, "DNS relay: {MAX_TCP} TCP connections open, connection closed");
            continue;
        }
        let s = shared.clone();
        let spawned = thread::Builder::new()
            .name("mwan-dns-conn".into())
            .spawn(move || {
                if let Err(e) = relay_tcp(&s, client) {
                    debug!(%peer, error = %format!("{e:#}"), "DNS relay: TCP connection ended");
                }
                s.tcp_connections.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            shared.tcp_connections.fetch_sub(1, Ordering::AcqRel);
            warn!(error = %e, "DNS relay: starting a TCP connection thread");
        }
    }
}

/// The destination a redirected TCP connection had (`SO_ORIGINAL_DST`,
/// `IP6T_SO_ORIGINAL_DST` over IPv6: the same number).
fn original_dst(s: &std::net::TcpStream) -> io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if s.local_addr()?.is_ipv6() {
        libc::SOL_IPV6
    } else {
        libc::SOL_IP
    };
    // SAFETY: `ss` and `len` outlive the call; `len` is its size.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    socket_addr(&ss).ok_or_else(|| io::Error::other("no original destination"))
}

/// Relays one TCP connection: queries from the client go to the server it
/// addressed as they come (pipelined, framed, `Deframer`); each answer is
/// learned from when it answers a pending query (ID and question), then
/// passed on. Either side closing or idling [`TCP_IDLE`] ends both.
fn relay_tcp(shared: &Shared, client: std::net::TcpStream) -> Result<()> {
    use std::io::{Read, Write};
    let server = original_dst(&client).context("reading the original destination")?;
    let upstream = std::net::TcpStream::connect_timeout(&server, UPSTREAM_TIMEOUT)
        .with_context(|| format!("connecting to {server}"))?;
    for s in [&client, &upstream] {
        s.set_read_timeout(Some(TCP_IDLE))?;
        s.set_nodelay(true)?;
    }
    let pending: Arc<Mutex<std::collections::HashMap<u16, Question>>> = Arc::default();
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let p = pending.clone();
    let up = thread::Builder::new()
        .name("mwan-dns-conn-q".into())
        .spawn(move || -> Result<()> {
            let mut d = super::Deframer::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = c_read.read(&mut buf)?;
                if n == 0 {
                    let _ = u_write.shutdown(std::net::Shutdown::Write);
                    return Ok(());
                }
                d.push(&buf[..n]);
                while let Some(msg) = d.next_message() {
                    if let Some(q) = question(msg) {
                        let mut p = p.lock().expect("pending lock");
                        // Bounded: a client cannot make mwan hold more.
                        if p.len() < MAX_IN_FLIGHT {
                            p.insert(q.id, q);
                        }
                    }
                    u_write.write_all(&super::frame(msg).expect("a deframed message fits"))?;
                }
            }
        })?;
    let (mut u_read, mut c_write) = (upstream, client);
    let mut d = super::Deframer::new();
    let mut buf = vec![0u8; 16 * 1024];
    let res = (|| -> Result<()> {
        loop {
            let n = u_read.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            d.push(&buf[..n]);
            while let Some(msg) = d.next_message() {
                if msg.len() >= 2 {
                    let id = u16::from_be_bytes([msg[0], msg[1]]);
                    let q = pending.lock().expect("pending lock").remove(&id);
                    if let Some(q) = q {
                        shared.learn(&q, msg);
                    }
                }
                c_write.write_all(&super::frame(msg).expect("a deframed message fits"))?;
            }
        }
    })();
    let _ = c_write.shutdown(std::net::Shutdown::Both);
    let _ = u_read.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher() -> DomainMatcher {
        let mut m = DomainMatcher::new();
        m.insert("gov.example", 0);
        m.insert("cdn.example", 1);
        m
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        query_type(id, name, 1)
    }

    fn query_type(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&id.to_be_bytes());
        a.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        push_name(&mut a, name);
        a.extend_from_slice(&qtype.to_be_bytes());
        a.extend_from_slice(&[0, 1]);
        a
    }

    /// The answer to an AAAA query for `chain[0]`: a CNAME from each name
    /// of `chain` to the next, then the last name's AAAA record `addr`.
    fn aaaa_answer(id: u16, chain: &[&str], addr: std::net::Ipv6Addr) -> Vec<u8> {
        let mut a = query_type(id, chain[0], 28);
        a[2..4].copy_from_slice(&[0x81, 0x80]);
        a[6..8].copy_from_slice(&(chain.len() as u16).to_be_bytes());
        for pair in chain.windows(2) {
            push_name(&mut a, pair[0]);
            a.extend_from_slice(&[0, 5, 0, 1, 0, 0, 1, 44]);
            let mut target = Vec::new();
            push_name(&mut target, pair[1]);
            a.extend_from_slice(&(target.len() as u16).to_be_bytes());
            a.extend_from_slice(&target);
        }
        push_name(&mut a, chain[chain.len() - 1]);
        a.extend_from_slice(&[0, 28, 0, 1, 0, 0, 1, 44, 0, 16]);
        a.extend_from_slice(&addr.octets());
        a
    }

    /// AAAA answers teach IPv6 addresses, directly and at the end of a
    /// CNAME chain whose later name is the listed one.
    #[test]
    fn aaaa_answers_teach_ipv6_addresses_through_cname_chains() {
        let mut l = Learner::new(matcher());
        let v6: std::net::Ipv6Addr = "2001:db8::5".parse().unwrap();
        let q = question(&query_type(3, "www.gov.example", 28)).unwrap();
        assert_eq!(q.qtype, 28);
        assert_eq!(
            l.answer(&q, &aaaa_answer(3, &["www.gov.example"], v6), 0),
            vec![(v6.into(), Some(0b1))]
        );
        // portal.example (not listed) -> www.portal.net -> edge.cdn.example.
        let cdn: std::net::Ipv6Addr = "2001:db8::20".parse().unwrap();
        let chain = ["portal.example", "www.portal.net", "edge.cdn.example"];
        let q = question(&query_type(4, chain[0], 28)).unwrap();
        assert_eq!(
            l.answer(&q, &aaaa_answer(4, &chain, cdn), 0),
            vec![(cdn.into(), Some(0b10))]
        );
        // The AAAA answer to an A question is another question: nothing.
        let q = question(&query(5, "www.gov.example")).unwrap();
        assert!(l
            .answer(&q, &aaaa_answer(5, &["www.gov.example"], v6), 0)
            .is_empty());
        // A chain to a name no rule lists teaches nothing.
        let q = question(&query_type(6, "a.example.org", 28)).unwrap();
        assert!(l
            .answer(
                &q,
                &aaaa_answer(6, &["a.example.org", "b.example.org"], v6),
                0
            )
            .is_empty());
        // `mwan domains` lists it with the question's name.
        let names: Vec<(std::net::IpAddr, String)> =
            l.table.iter().map(|(a, n, _)| (a, n.to_string())).collect();
        assert!(
            names.contains(&(cdn.into(), "portal.example".to_string())),
            "{names:?}"
        );
    }

    fn push_name(a: &mut Vec<u8>, name: &str) {
        for l in name.split('.') {
            a.push(l.len() as u8);
            a.extend_from_slice(l.as_bytes());
        }
        a.push(0);
    }

    #[test]
    fn an_answer_to_its_query_teaches_the_listed_names_only() {
        let mut l = Learner::new(matcher());
        let q = question(&query(7, "www.gov.example")).unwrap();
        assert_eq!(q.name, "www.gov.example");
        let changes = l.answer(
            &q,
            &simple_answer(7, "www.gov.example", [203, 0, 113, 5]),
            0,
        );
        assert_eq!(
            changes,
            vec![(Ipv4Addr::new(203, 0, 113, 5).into(), Some(0b1))]
        );
        // Another ID, another name: nothing.
        assert!(l
            .answer(
                &q,
                &simple_answer(8, "www.gov.example", [203, 0, 113, 6]),
                0
            )
            .is_empty());
        assert!(l
            .answer(
                &q,
                &simple_answer(7, "www.other.example", [203, 0, 113, 6]),
                0
            )
            .is_empty());
        // Malformed: nothing, no panic.
        assert!(l.answer(&q, &[0u8; 5], 0).is_empty());
        // A name no rule lists.
        let q2 = question(&query(9, "example.org")).unwrap();
        assert!(l
            .answer(&q2, &simple_answer(9, "example.org", [203, 0, 113, 7]), 0)
            .is_empty());
    }

    /// A response with one question and one A record for it.
    fn simple_answer(id: u16, name: &str, addr: [u8; 4]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&id.to_be_bytes());
        a.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
        push_name(&mut a, name);
        a.extend_from_slice(&[0, 1, 0, 1]);
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4]);
        a.extend_from_slice(&addr);
        a
    }

    #[test]
    fn servfail_keeps_id_and_question() {
        let q = query(0x1234, "www.gov.example");
        let s = servfail(&q, question(&q).as_ref()).unwrap();
        let r = parse_response(&s).unwrap();
        assert_eq!(r.header.id, 0x1234);
        assert!(r.header.response);
        assert_eq!(r.header.rcode, 2);
        assert_eq!(r.question, Some(("www.gov.example".to_string(), 1)));
        assert!(servfail(&[1, 2, 3], None).is_none());
    }
}
