//! Connections held through the router for the busy-router section
//! ([`super::busy`]): UDP flows answered by an echo server in the internet
//! (every one a conntrack entry that has seen its reply), and TCP
//! connections opened and left idle, both ends kept open (the servers'
//! in their listeners' accept queues). Every loop is
//! bounded in count and time and stops on Ctrl-C.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lab::Netns;
use socket2::{Domain, Protocol, Socket, Type};

use super::sig;

/// The source ports a LAN host's UDP flows are bound to, one flow per port
/// and destination.
const UDP_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;
/// UDP flows (or TCP connections) of one host in flight at once.
const IN_FLIGHT: usize = 256;
/// How long a UDP flow waits for its echo before it is sent again, and
/// how often.
const ECHO_WAIT: Duration = Duration::from_millis(500);
const ECHO_TRIES: usize = 4;
/// How long a TCP connection may take to be established.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

/// Raises the limit of open files of this process (and of what it starts)
/// to at least `n` (the clients' ends of the held TCP connections are
/// sockets of this process), within the hard limit.
pub fn allow_open_files(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain syscall writing into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur >= n {
        return Ok(());
    }
    ensure!(
        lim.rlim_max >= n,
        "{n} open files needed, and the hard limit (RLIMIT_NOFILE) is {}: hold fewer TCP connections",
        lim.rlim_max
    );
    lim.rlim_cur = n;
    // SAFETY: a plain syscall reading `lim`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error()).context(format!("raising RLIMIT_NOFILE to {n}"));
    }
    Ok(())
}

/// A UDP echo server in a namespace: every datagram goes back to its
/// sender. Stops when dropped.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(ns: &Netns, addrs: &[SocketAddrV4]) -> Result<UdpEcho> {
        let sockets = ns
            .run(|| -> io::Result<Vec<UdpSocket>> {
                addrs
                    .iter()
                    .map(|a| {
                        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                        s.set_recv_buffer_size(4 << 20)?;
                        s.bind(&SocketAddr::from(*a).into())?;
                        s.set_nonblocking(true)?;
                        Ok(s.into())
                    })
                    .collect()
            })
            .with_context(|| format!("UDP echo on {addrs:?} in {}", ns.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new().name("udp-echo".into()).spawn({
            let stop = stop.clone();
            move || echo(&sockets, &stop)
        })?;
        Ok(UdpEcho {
            stop,
            thread: Some(thread),
        })
    }
}

fn echo(sockets: &[UdpSocket], stop: &AtomicBool) {
    let mut fds = pollfds(sockets.iter().map(|s| s.as_raw_fd()), libc::POLLIN);
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of its length.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 50) } <= 0 {
            continue;
        }
        for (s, fd) in sockets.iter().zip(&mut fds) {
            fd.revents = 0;
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pollfds(fds: impl Iterator<Item = i32>, events: i16) -> Vec<libc::pollfd> {
    fds.map(|fd| libc::pollfd {
        fd,
        events,
        revents: 0,
    })
    .collect()
}

/// Opens `count` UDP flows from `ns` (source address `src`) to `dsts` in
/// turn, each from its own source port for its destination, sending a
/// datagram until its echo comes back. (Behind the router's masquerade all
/// LAN hosts share one address: a destination takes fewer than 64,512
/// flows from all of them together.) Its socket is closed once answered: the router's conntrack entry
/// stays (for the UDP timeout). Returns the flows answered.
pub fn udp_flows(ns: &Netns, src: Ipv4Addr, dsts: &[SocketAddrV4], count: usize) -> Result<usize> {
    let per_dst = UDP_PORTS.len();
    ensure!(
        count <= per_dst * dsts.len(),
        "{count} UDP flows from one host need more than {} destinations",
        dsts.len()
    );
    ns.run(|| {
        let mut answered = 0;
        let mut k = 0;
        while k < count {
            sig::check()?;
            let n = IN_FLIGHT.min(count - k);
            let batch = (k..k + n)
                .map(|j| {
                    let port = UDP_PORTS.start() + (j / dsts.len()) as u16;
                    udp_flow(SocketAddrV4::new(src, port), dsts[j % dsts.len()])
                })
                .collect::<Result<Vec<_>>>()?;
            answered += await_echoes(&batch)?;
            k += n;
        }
        Ok(answered)
    })
}

fn udp_flow(src: SocketAddrV4, dst: SocketAddrV4) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(src).into())
        .with_context(|| format!("binding a UDP flow to {src}"))?;
    s.connect(&SocketAddr::from(dst).into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Sends a datagram on each socket and waits for the echoes, sending again
/// to those not answered; returns how many were answered.
fn await_echoes(sockets: &[UdpSocket]) -> Result<usize> {
    let mut answered = vec![false; sockets.len()];
    let mut buf = [0u8; 64];
    for _ in 0..ECHO_TRIES {
        for (s, _) in sockets.iter().zip(&answered).filter(|(_, a)| !**a) {
            let _ = s.send(b"held");
        }
        let deadline = Instant::now() + ECHO_WAIT;
        while answered.iter().any(|a| !a) && Instant::now() < deadline {
            sig::check()?;
            let mut fds = pollfds(sockets.iter().map(|s| s.as_raw_fd()), libc::POLLIN);
            // SAFETY: `fds` is a valid array of its length.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 20) };
            for ((s, fd), a) in sockets.iter().zip(&fds).zip(&mut answered) {
                if fd.revents != 0 && s.recv(&mut buf).is_ok() {
                    *a = true;
                }
            }
        }
        if answered.iter().all(|a| *a) {
            break;
        }
    }
    Ok(answered.iter().filter(|a| **a).count())
}

/// TCP listeners in a namespace that never accept: the connections made
/// to them are established by the kernel and wait, idle, in the accept
/// queue (no file descriptor each, so many more fit under the limit of
/// open files). Closing the listeners (drop) resets them.
pub struct TcpBacklog {
    listeners: Vec<Socket>,
}

/// The accept queue of each listener (`net.core.somaxconn` is raised to
/// it in the namespace).
const BACKLOG: i32 = 65_535;

impl TcpBacklog {
    pub fn listen(ns: &Netns, addrs: &[SocketAddrV4]) -> Result<TcpBacklog> {
        ns.sysctls(&[("net.core.somaxconn", &BACKLOG.to_string())])?;
        let listeners = ns
            .run(|| -> io::Result<Vec<Socket>> {
                addrs
                    .iter()
                    .map(|a| {
                        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                        s.set_reuse_address(true)?;
                        s.bind(&SocketAddr::from(*a).into())?;
                        s.listen(BACKLOG)?;
                        Ok(s)
                    })
                    .collect()
            })
            .with_context(|| format!("TCP listen on {addrs:?} in {}", ns.name()))?;
        Ok(TcpBacklog { listeners })
    }

    /// Connections established and waiting in the accept queues.
    pub fn queued(&self) -> Result<usize> {
        let mut n = 0;
        for l in &self.listeners {
            // SAFETY: tcp_info is plain data; the kernel fills at most `len`.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let r = unsafe {
                libc::getsockopt(
                    l.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&mut info as *mut libc::tcp_info).cast(),
                    &mut len,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error()).context("TCP_INFO of a listener");
            }
            // For a listener, `tcpi_unacked` is its accept queue's length.
            n += info.tcpi_unacked as usize;
        }
        Ok(n)
    }
}

/// TCP connections held open from a LAN host by child processes (this
/// program run again with [`CHILD_ARG`]): each process has its own table
/// of open files, so together they hold more connections than the limit
/// of one. Dropped, the children reset their connections and exit.
pub struct TcpClients {
    children: Vec<Child>,
    pub open: usize,
    pub failed: usize,
}

/// The first argument of a child of [`TcpClients`].
pub const CHILD_ARG: &str = "--hold-tcp-child";
/// Connections one child holds at most.
pub const PER_CHILD: usize = 15_000;

impl TcpClients {
    /// `count` connections from `ns` to `dsts` in turn (see [`connect_many`]).
    pub fn open(ns: &Netns, dsts: &[SocketAddrV4], count: usize) -> Result<TcpClients> {
        let exe = std::env::current_exe().context("the bench's own executable")?;
        let dsts: Vec<String> = dsts.iter().map(|d| d.to_string()).collect();
        let mut held = TcpClients {
            children: Vec::new(),
            open: 0,
            failed: 0,
        };
        let mut left = count;
        while left > 0 {
            let n = left.min(PER_CHILD);
            let child = Command::new(&exe)
                .arg(CHILD_ARG)
                .arg(ns.path())
                .arg(n.to_string())
                .args(&dsts)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a process to hold TCP connections")?;
            held.children.push(child);
            left -= n;
        }
        for c in &mut held.children {
            let mut line = String::new();
            BufReader::new(c.stdout.as_mut().expect("piped")).read_line(&mut line)?;
            let mut w = line.split_whitespace().map(|w| w.parse::<usize>());
            match (w.next(), w.next()) {
                (Some(Ok(open)), Some(Ok(failed))) => {
                    held.open += open;
                    held.failed += failed;
                }
                _ => bail!("a process holding TCP connections said {line:?}"),
            }
        }
        Ok(held)
    }
}

impl Drop for TcpClients {
    fn drop(&mut self) {
        for c in &mut self.children {
            // Its stdin closed, a child resets its connections and exits.
            drop(c.stdin.take());
        }
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A child of [`TcpClients`] (`CHILD_ARG NETNS COUNT DST...`): enters the
/// namespace, opens the connections, prints how many are open and how
/// many failed, and holds them until its stdin closes; then resets them.
pub fn child_main(args: &[String]) -> Result<()> {
    let [path, count, dsts @ ..] = args else {
        bail!("usage: {CHILD_ARG} NETNS COUNT DST...");
    };
    let count: usize = count.parse().context("COUNT")?;
    let dsts = dsts
        .iter()
        .map(|d| d.parse().with_context(|| format!("DST {d}")))
        .collect::<Result<Vec<SocketAddrV4>>>()?;
    ensure!(!dsts.is_empty(), "no DST");
    let ns = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a plain syscall on an open descriptor; this process has one thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context(format!("setns into {path}"));
    }
    allow_open_files(count as u64 + 256)?;
    let (open, failed) = connect_many(&dsts, count)?;
    let mut out = io::stdout();
    writeln!(out, "{} {failed}", open.len())?;
    out.flush()?;
    let mut rest = Vec::new();
    let _ = io::stdin().read_to_end(&mut rest);
    for s in &open {
        let _ = s.set_linger(Some(Duration::ZERO));
    }
    Ok(())
}

/// Opens `count` TCP connections from the calling thread's namespace to
/// `dsts` in turn, up to [`IN_FLIGHT`] being established at once; returns
/// those established (left open and idle: the caller holds them) and the
/// number that failed.
fn connect_many(dsts: &[SocketAddrV4], count: usize) -> Result<(Vec<Socket>, usize)> {
    let (mut open, mut failed) = (Vec::with_capacity(count), 0);
    let mut pending: Vec<(Socket, Instant)> = Vec::new();
    let mut started = 0;
    while open.len() + failed < count {
        sig::check()?;
        while pending.len() < IN_FLIGHT && started < count {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            s.set_nonblocking(true)?;
            match s.connect(&SocketAddr::from(dsts[started % dsts.len()]).into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(anyhow::anyhow!(e).context("connect")),
            }
            pending.push((s, Instant::now()));
            started += 1;
        }
        let mut fds = pollfds(pending.iter().map(|(s, _)| s.as_raw_fd()), libc::POLLOUT);
        // SAFETY: `fds` is a valid array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 20) };
        let mut still = Vec::with_capacity(pending.len());
        for ((s, at), fd) in pending.into_iter().zip(&fds) {
            if fd.revents != 0 {
                match s.take_error() {
                    Ok(None) => open.push(s),
                    _ => failed += 1,
                }
            } else if at.elapsed() > CONNECT_TIMEOUT {
                failed += 1;
            } else {
                still.push((s, at));
            }
        }
        pending = still;
    }
    Ok((open, failed))
}
