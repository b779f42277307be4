//! Traffic for the benchmarks: sinks in the internet namespace and bounded
//! generators in LAN hosts. Every loop ends at its deadline, on its stop
//! flag or on Ctrl-C.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lab::Netns;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::sig;

/// A bounded measurement: `warmup`, then counters are read over `measure`.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
}

/// Sleeps through `w`, calling `sample` after the warmup and at the end;
/// returns (value at end − value after warmup) per second.
fn sample_rate(w: Window, mut sample: impl FnMut() -> Result<u64>) -> Result<f64> {
    sig::sleep(w.warmup)?;
    let (v0, t0) = (sample()?, Instant::now());
    sig::sleep(w.measure)?;
    let (v1, t1) = (sample()?, Instant::now());
    Ok(v1.saturating_sub(v0) as f64 / (t1 - t0).as_secs_f64())
}

/// Listens in `ns`; accepts connections and reads them to the end,
/// counting bytes. Stops when dropped.
pub struct TcpSink {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpSink {
    pub fn start(ns: &Netns, addr: impl Into<SocketAddr>) -> Result<TcpSink> {
        let (listener, _) = ns.bind_tcp(addr)?;
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let acceptor = thread::Builder::new().name("tcp-sink".into()).spawn({
            let (stop, bytes) = (stop.clone(), bytes.clone());
            move || {
                let mut readers: Vec<JoinHandle<()>> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (stop, bytes) = (stop.clone(), bytes.clone());
                            readers.retain(|r| !r.is_finished());
                            readers.push(thread::spawn(move || drain(conn, &stop, &bytes)));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
                for r in readers {
                    let _ = r.join();
                }
            }
        })?;
        Ok(TcpSink {
            stop,
            bytes,
            acceptor: Some(acceptor),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn drain(mut conn: TcpStream, stop: &AtomicBool, bytes: &AtomicU64) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
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

/// TCP bulk upload: `streams` connections from `hosts` (round robin) to
/// `sink`, each writing as fast as it can. Returns bits per second received.
pub fn tcp_bulk(
    hosts: &[&Netns],
    sink: &TcpSink,
    addr: impl Into<SocketAddr>,
    streams: usize,
    w: Window,
) -> Result<f64> {
    let addr: SocketAddr = addr.into();
    let conns = (0..streams)
        .map(|i| {
            hosts[i % hosts.len()]
                .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
                .with_context(|| format!("connecting to {addr}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + w.warmup + w.measure + Duration::from_secs(2);
    thread::scope(|s| {
        for mut c in conns {
            let stop = &stop;
            s.spawn(move || {
                let _ = c.set_write_timeout(Some(Duration::from_millis(100)));
                let buf = vec![0x5au8; 128 * 1024];
                while !stop.load(Ordering::Relaxed) && !sig::stopped() && Instant::now() < deadline
                {
                    match c.write(&buf) {
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
            });
        }
        let r = sample_rate(w, || Ok(sink.bytes()));
        stop.store(true, Ordering::Relaxed);
        r.map(|bytes_per_s| bytes_per_s * 8.0)
    })
}

/// An nftables counter in `ns` (table `ip bench`, or `ip6 bench`) that
/// counts and drops UDP packets to `port` before conntrack: the sink of
/// the packet-rate tests, cheap enough never to be the bottleneck.
pub struct UdpCounter<'n> {
    ns: &'n Netns,
    family: &'static str,
}

impl<'n> UdpCounter<'n> {
    /// The IPv4 counter.
    pub fn install(ns: &'n Netns, port: u16) -> Result<UdpCounter<'n>> {
        Self::install_family(ns, port, "ip")
    }

    /// The IPv6 counter (table `ip6 bench`).
    pub fn install6(ns: &'n Netns, port: u16) -> Result<UdpCounter<'n>> {
        Self::install_family(ns, port, "ip6")
    }

    fn install_family(ns: &'n Netns, port: u16, family: &'static str) -> Result<UdpCounter<'n>> {
        let script = format!(
            "table {family} bench {{}}\ndelete table {family} bench\ntable {family} bench {{\n counter sink {{}}\n \
             chain pre {{\n  type filter hook prerouting priority -300; policy accept;\n  \
             udp dport {port} counter name \"sink\" drop\n }}\n}}\n"
        );
        ns.exec_input(&["nft", "-f", "-"], Some(&script))?;
        Ok(UdpCounter { ns, family })
    }

    /// Packets counted so far.
    pub fn packets(&self) -> Result<u64> {
        let out = self
            .ns
            .exec(&["nft", "list", "counter", self.family, "bench", "sink"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        while let Some(w) = words.next() {
            if w == "packets" {
                if let Some(n) = words.next().and_then(|n| n.parse().ok()) {
                    return Ok(n);
                }
            }
        }
        bail!("no packet count in {text:?}")
    }
}

impl Drop for UdpCounter<'_> {
    fn drop(&mut self) {
        let family = self.family;
        let _ = self.ns.exec_input(
            &["nft", "-f", "-"],
            Some(&format!(
                "table {family} bench {{}}\ndelete table {family} bench\n"
            )),
        );
    }
}

/// Packet rate of one UDP flood.
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpRate {
    /// Packets per second the senders handed to the kernel.
    pub sent: f64,
    /// Packets per second that reached the counter in the internet.
    pub received: f64,
}

/// Payload bytes of the small UDP packets: 18 bytes make a 60-byte frame
/// (the Ethernet minimum without FCS).
pub const SMALL_PAYLOAD: usize = 18;

/// UDP flood of small packets: `flows` sockets (spread over `hosts`, one
/// sending thread per host), each connected to one of `dsts`, sending in
/// batches with `sendmmsg`. Counts what arrives at `counter`.
pub fn udp_flood(
    hosts: &[&Netns],
    dsts: &[SocketAddr],
    flows: usize,
    counter: &UdpCounter,
    w: Window,
) -> Result<UdpRate> {
    let per_host = flows.div_ceil(hosts.len());
    let mut groups = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        let sockets = host.run(|| -> io::Result<Vec<UdpSocket>> {
            (0..per_host)
                .map(|i| {
                    let dst = dsts[(h * per_host + i) % dsts.len()];
                    let any: SocketAddr = match dst {
                        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
                    };
                    let s = UdpSocket::bind(any)?;
                    s.connect(dst)?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
                .collect()
        })?;
        groups.push(sockets);
    }
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let deadline = Instant::now() + w.warmup + w.measure + Duration::from_secs(2);
    thread::scope(|s| {
        for sockets in &groups {
            let (stop, sent) = (&stop, &sent);
            s.spawn(move || send_batches(sockets, stop, sent, deadline));
        }
        let r = (|| -> Result<UdpRate> {
            sig::sleep(w.warmup)?;
            let (c0, s0, t0) = (
                counter.packets()?,
                sent.load(Ordering::Relaxed),
                Instant::now(),
            );
            sig::sleep(w.measure)?;
            let (c1, s1, t1) = (
                counter.packets()?,
                sent.load(Ordering::Relaxed),
                Instant::now(),
            );
            let secs = (t1 - t0).as_secs_f64();
            Ok(UdpRate {
                sent: s1.saturating_sub(s0) as f64 / secs,
                received: c1.saturating_sub(c0) as f64 / secs,
            })
        })();
        stop.store(true, Ordering::Relaxed);
        r
    })
}

fn send_batches(sockets: &[UdpSocket], stop: &AtomicBool, sent: &AtomicU64, deadline: Instant) {
    const BATCH: usize = 32;
    let payload = [0x42u8; SMALL_PAYLOAD];
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|i| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iov[i] as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    loop {
        let mut n = 0u64;
        for s in sockets {
            let r = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if r > 0 {
                n += r as u64;
            }
        }
        sent.fetch_add(n, Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) || sig::stopped() || Instant::now() >= deadline {
            break;
        }
    }
}

/// Accepts TCP connections on several ports and resets them at once
/// (SO_LINGER 0: no TIME_WAIT on either side). Stops when dropped.
pub struct CpsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub addrs: Vec<SocketAddrV4>,
}

impl CpsServer {
    pub fn start(ns: &Netns, ips: &[Ipv4Addr], ports: std::ops::Range<u16>) -> Result<CpsServer> {
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for ip in ips {
            for port in ports.clone() {
                let addr = SocketAddrV4::new(*ip, port);
                listeners.push(ns.bind_tcp(addr)?.0);
                addrs.push(addr);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new().name("cps-server".into()).spawn({
            let stop = stop.clone();
            move || {
                let mut fds: Vec<libc::pollfd> = listeners
                    .iter()
                    .map(|l| libc::pollfd {
                        fd: l.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 50) };
                    if r <= 0 {
                        continue;
                    }
                    for (i, fd) in fds.iter_mut().enumerate() {
                        if fd.revents != 0 {
                            fd.revents = 0;
                            while let Ok((conn, _)) = listeners[i].accept() {
                                let _ = SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                            }
                        }
                    }
                }
            }
        })?;
        Ok(CpsServer {
            stop,
            thread: Some(thread),
            addrs,
        })
    }
}

impl Drop for CpsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Result of one new-connection test.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cps {
    /// Established connections per second (measured window).
    pub rate: f64,
    /// Established connections over the whole test (warm-up included).
    pub total: u64,
    pub failed: u64,
}

/// New connections per second: `threads` clients per host, each opening
/// connections one after the other (to the server's ports in turn) and
/// resetting them once established.
pub fn cps(hosts: &[&Netns], server: &CpsServer, threads: usize, w: Window) -> Result<Cps> {
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + w.warmup + w.measure + Duration::from_secs(2);
    thread::scope(|s| {
        for (h, host) in hosts.iter().enumerate() {
            for t in 0..threads {
                let (ok, failed, stop) = (&ok, &failed, &stop);
                let addrs = &server.addrs;
                s.spawn(move || {
                    host.run(|| {
                        let mut i = h * threads + t;
                        while !stop.load(Ordering::Relaxed)
                            && !sig::stopped()
                            && Instant::now() < deadline
                        {
                            i += 1;
                            let addr = addrs[i % addrs.len()];
                            match connect_reset(addr) {
                                Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    })
                });
            }
        }
        let r = sample_rate(w, || Ok(ok.load(Ordering::Relaxed)));
        stop.store(true, Ordering::Relaxed);
        r
    })
    .map(|rate| Cps {
        rate,
        total: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
    })
}

fn connect_reset(addr: SocketAddrV4) -> io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_linger(Some(Duration::ZERO))?;
    match s.connect_timeout(&addr.into(), Duration::from_secs(1)) {
        // The server accepts and resets at once; its reset can beat this
        // thread to the check of the completed connect. A reset is only
        // reported as ECONNRESET once the connection was established (in
        // SYN_SENT it would be ECONNREFUSED): the handshake succeeded.
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(()),
        r => r,
    }
}

/// Opens a new TCP connection to the whoami server `server` from `ns`
/// every `every` (each attempt abandoned after `attempt_timeout`) until
/// one is answered with a source address for which `want` holds. Returns
/// the time of that answer and the address, or `None` after `limit`.
pub fn first_success(
    ns: &Netns,
    server: SocketAddrV4,
    every: Duration,
    attempt_timeout: Duration,
    limit: Duration,
    want: &(dyn Fn(Ipv4Addr) -> bool + Sync),
) -> Result<Option<(Instant, SocketAddrV4)>> {
    ns.run(|| {
        let start = Instant::now();
        let mut pending: Vec<(Socket, Instant)> = Vec::new();
        let mut next = start;
        loop {
            sig::check()?;
            let now = Instant::now();
            if now >= start + limit {
                return Ok(None);
            }
            if now >= next && pending.len() < 256 {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                s.set_nonblocking(true)?;
                s.set_linger(Some(Duration::ZERO))?;
                match s.connect(&server.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => return Err(anyhow!(e).context("connect")),
                }
                pending.push((s, now));
                next += every;
                if next < now {
                    next = now + every;
                }
            }
            let mut fds: Vec<libc::pollfd> = pending
                .iter()
                .map(|(s, _)| libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                })
                .collect();
            let wait = next.saturating_duration_since(Instant::now());
            let ms = wait.as_millis().clamp(0, 5) as i32;
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, ms) };
            let mut keep = Vec::with_capacity(pending.len());
            for ((s, started), fd) in pending.into_iter().zip(&fds) {
                if fd.revents != 0 {
                    if matches!(s.take_error(), Ok(None)) {
                        if let Ok(seen) = read_whoami(s) {
                            if want(*seen.ip()) {
                                return Ok(Some((Instant::now(), seen)));
                            }
                        }
                    }
                    continue;
                }
                if started.elapsed() < attempt_timeout {
                    keep.push((s, started));
                }
            }
            pending = keep;
        }
    })
}

fn read_whoami(s: Socket) -> Result<SocketAddrV4> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut conn: TcpStream = s.into();
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    match answer.trim().parse::<SocketAddr>()? {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => bail!("unexpected {a}"),
    }
}

/// What one flow-filling run sent.
pub struct FillStats {
    pub sent: u64,
    pub secs: f64,
}

/// Sends `count` UDP packets with distinct 5-tuples from `ns` (interface
/// `eth0`) to the router (MAC `router_mac`) with an AF_PACKET socket:
/// source port 1..=65535 cycling, destination address counting up from
/// `first_dst` every 65535 packets, destination port `dport`. Paced at
/// about `pps`.
#[allow(clippy::too_many_arguments)]
pub fn fill_flows(
    ns: &Netns,
    src_mac: [u8; 6],
    router_mac: [u8; 6],
    src: Ipv4Addr,
    first_dst: Ipv4Addr,
    dport: u16,
    count: u64,
    pps: u64,
) -> Result<FillStats> {
    ns.run(|| {
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(anyhow!(io::Error::last_os_error()).context("AF_PACKET socket"));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        if ifindex == 0 {
            bail!("no eth0 in {}", ns.name());
        }
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(anyhow!(io::Error::last_os_error()).context("binding AF_PACKET socket"));
        }
        const BATCH: usize = 64;
        const FRAME: usize = 60;
        let mut frames = vec![[0u8; FRAME]; BATCH];
        let mut iov: Vec<libc::iovec> = frames
            .iter_mut()
            .map(|f| libc::iovec {
                iov_base: f.as_mut_ptr() as *mut libc::c_void,
                iov_len: FRAME,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = v as *mut libc::iovec;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let start = Instant::now();
        let mut sent = 0u64;
        let mut i = 0u64;
        while i < count {
            sig::check()?;
            let n = BATCH.min((count - i) as usize);
            for (k, f) in frames.iter_mut().take(n).enumerate() {
                let j = i + k as u64;
                let sport = (j % 65535 + 1) as u16;
                let dst = Ipv4Addr::from(u32::from(first_dst) + (j / 65535) as u32);
                write_frame(f, src_mac, router_mac, src, dst, sport, dport);
            }
            let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
            if r > 0 {
                sent += r as u64;
                i += r as u64;
            } else {
                // ENOBUFS and the like: give the stack a moment.
                thread::sleep(Duration::from_micros(200));
            }
            // Pace: never more than `pps` on average.
            let due = Duration::from_secs_f64(i as f64 / pps as f64);
            let el = start.elapsed();
            if due > el {
                thread::sleep(due - el);
            }
        }
        Ok(FillStats {
            sent,
            secs: start.elapsed().as_secs_f64(),
        })
    })
}

fn write_frame(
    f: &mut [u8; 60],
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) {
    f.fill(0);
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    let total_len = (20 + 8 + SMALL_PAYLOAD) as u16;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let mut sum = 0u32;
    for c in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + SMALL_PAYLOAD) as u16).to_be_bytes());
    // UDP checksum 0: none (allowed for IPv4).
}

/// A MAC address as `ip` prints it ("aa:bb:…").
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    v.try_into().map_err(|_| anyhow!("bad MAC {s:?}"))
}
