//! The relay's sockets and the system calls tokio has no word for: the
//! original destination of a datagram (`IP_ORIGDSTADDR`), the source
//! address of an answer (`IPV6_PKTINFO`), a connection's destination before
//! NAT (`SO_ORIGINAL_DST`), the ICMP errors of an unconnected socket
//! (`IP_RECVERR`).

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tracing::warn;

/// The relay's sockets: UDP and TCP, for IPv4 and IPv6 (IPv6-only
/// sockets), each family's on the same port, so one port pair names the
/// relay in the divert's rules of both families. IPv4's only on a kernel
/// without IPv6 (`ipv6.disable=1`).
pub(super) struct Sockets {
    pub port: u16,
    pub tcp_port: u16,
    pub udp: Vec<UdpSocket>,
    pub tcp: Vec<TcpListener>,
}

impl Sockets {
    /// Free ports for IPv4 (chosen by the kernel), then the same for IPv6;
    /// tried again (bounded) when IPv6 has one of them taken. Within a
    /// tokio runtime.
    pub fn open() -> Result<Sockets> {
        const TRIES: usize = 16;
        let any6 = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let mut last = None;
        for _ in 0..TRIES {
            let udp4 = relay_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
                .context("opening the DNS relay's socket")?;
            let tcp4 = tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
                .context("opening the DNS relay's TCP listener")?;
            let (port, tcp_port) = (udp4.local_addr()?.port(), tcp4.local_addr()?.port());
            let (udp, tcp) = match (relay_socket(any6(port)), tcp_listener(any6(tcp_port))) {
                (Ok(udp6), Ok(tcp6)) => (vec![udp4, udp6], vec![tcp4, tcp6]),
                (Err(e), _) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    warn!("no IPv6 in this kernel: the DNS relay serves IPv4 only");
                    (vec![udp4], vec![tcp4])
                }
                (Err(e), _) | (_, Err(e)) if e.kind() == io::ErrorKind::AddrInUse => {
                    last = Some(e);
                    continue;
                }
                (Err(e), _) | (_, Err(e)) => {
                    return Err(e).context("opening the DNS relay's IPv6 sockets")
                }
            };
            return Ok(Sockets {
                port,
                tcp_port,
                udp: udp
                    .into_iter()
                    .map(UdpSocket::from_std)
                    .collect::<io::Result<_>>()?,
                tcp: tcp
                    .into_iter()
                    .map(TcpListener::from_std)
                    .collect::<io::Result<_>>()?,
            });
        }
        Err(last.expect("tried")).context(format!(
            "no port free for the DNS relay on both IPv4 and IPv6 in {TRIES} tries"
        ))
    }
}

/// Sets the integer socket option `opt` of `level` to `value`.
fn set_int(
    s: &impl AsRawFd,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its length is passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&value as *const libc::c_int).cast(),
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

/// Receive buffer of the relay's UDP sockets: room for a burst of queries
/// (some 2,000 small ones) while the relay is busy.
const UDP_RCVBUF: usize = 1 << 20;

/// The relay's UDP socket of `bind`'s family, on `bind`'s port of every
/// address, asking for each datagram's (post-NAT) destination: the address
/// the query was redirected to, which is the source of the query's
/// conntrack reply direction.
fn relay_socket(bind: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    if bind.is_ipv6() {
        set_int(&s, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)?;
    } else {
        set_int(&s, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1)?;
    }
    family_options(&s, bind)?;
    crate::netlink::force_rcvbuf(s.as_raw_fd(), UDP_RCVBUF)?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(bind))?;
    Ok(s.into())
}

/// The relay's TCP listener of `bind`'s family on `bind`'s port of every
/// address.
fn tcp_listener(bind: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(bind), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    family_options(&s, bind)?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(bind))?;
    s.listen(128)?;
    Ok(s.into())
}

/// One `recvmsg` of `sock` with `flags`: the datagram's bytes go to `buf`,
/// each control message to `each` (level, type, a pointer to its data).
/// Returns the length and the message's address (the source of a
/// datagram, the destination of a queued error), if it is an IP one.
fn recvmsg_with(
    sock: &impl AsRawFd,
    buf: &mut [u8],
    flags: libc::c_int,
    mut each: impl FnMut(libc::c_int, libc::c_int, *const u8),
) -> io::Result<(usize, Option<SocketAddr>)> {
    let mut name: MaybeUninit<libc::sockaddr_storage> = MaybeUninit::zeroed();
    let mut cmsg = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: every pointer in `msg` points into a live buffer of the given
    // length for the duration of the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `msg_controllen` bytes of `cmsg`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            each((*c).cmsg_level, (*c).cmsg_type, libc::CMSG_DATA(c));
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // SAFETY: zeroed, then filled by the kernel.
    Ok((n as usize, socket_addr(unsafe { &name.assume_init() })))
}

/// Receives one datagram with its source and original destination
/// (non-blocking: `WouldBlock` when none is queued).
pub(super) fn recv_orig(
    sock: &impl AsRawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, SocketAddr)> {
    let mut orig = None;
    let (n, from) = recvmsg_with(sock, buf, libc::MSG_DONTWAIT, |level, kind, data| {
        // SAFETY: the original destination is a sockaddr_in (IPv4) or
        // sockaddr_in6 (IPv6).
        unsafe {
            if level == libc::SOL_IP && kind == libc::IP_ORIGDSTADDR {
                let sa = std::ptr::read_unaligned(data as *const libc::sockaddr_in);
                orig = Some(SocketAddr::V4(sockaddr_v4(&sa)));
            } else if level == libc::SOL_IPV6 && kind == libc::IPV6_ORIGDSTADDR {
                let sa = std::ptr::read_unaligned(data as *const libc::sockaddr_in6);
                orig = Some(SocketAddr::V6(sockaddr_v6(&sa)));
            }
        }
    })?;
    let from = from.ok_or_else(|| io::Error::other("a datagram from no IP address"))?;
    let orig = orig.ok_or_else(|| io::Error::other("no original destination"))?;
    Ok((n, from, orig))
}

/// Sends `data` to `to` with source address `from` (`IPV6_PKTINFO`),
/// non-blocking.
pub(super) fn send_from6(
    sock: &impl AsRawFd,
    data: &[u8],
    to: SocketAddrV6,
    from: Ipv6Addr,
) -> io::Result<()> {
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
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An upstream socket of `bind`'s family (IPv6-only for IPv6), bound to
/// `bind` (port 0: a free port the kernel picks at random), non-blocking,
/// with ICMP errors queued for [`recv_err`] (`IP_RECVERR`,
/// `IPV6_RECVERR`): an unconnected socket hears of them no other way.
pub(super) fn upstream_socket(bind: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let kind = Type::DGRAM.nonblocking().cloexec();
    let s = Socket::new(Domain::for_address(bind), kind, Some(Protocol::UDP))?;
    if bind.is_ipv6() {
        s.set_only_v6(true)?;
        set_int(&s, libc::SOL_IPV6, libc::IPV6_RECVERR, 1)?;
    } else {
        set_int(&s, libc::SOL_IP, libc::IP_RECVERR, 1)?;
    }
    s.bind(&SockAddr::from(bind))?;
    Ok(s.into())
}

/// An ICMP error about a datagram this socket sent: where that datagram
/// went, what the error says, and how many bytes of the datagram's
/// payload the ICMP message carried (copied into the caller's buffer).
pub(super) struct IcmpError {
    pub to: SocketAddr,
    pub error: io::Error,
    pub len: usize,
}

/// Takes one error from the error queue of `sock` (non-blocking:
/// `WouldBlock` when it is empty); `None` for an error that is not an ICMP
/// message's (a local one, such as a send's `EMSGSIZE`).
pub(super) fn recv_err(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Option<IcmpError>> {
    let mut errno = None;
    let flags = libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT;
    let (len, to) = recvmsg_with(sock, buf, flags, |level, kind, data| {
        if (level == libc::SOL_IP && kind == libc::IP_RECVERR)
            || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR)
        {
            // SAFETY: an IP_RECVERR/IPV6_RECVERR message starts with a
            // sock_extended_err.
            let e = unsafe { std::ptr::read_unaligned(data as *const libc::sock_extended_err) };
            if e.ee_origin == libc::SO_EE_ORIGIN_ICMP || e.ee_origin == libc::SO_EE_ORIGIN_ICMP6 {
                errno = Some(e.ee_errno as i32);
            }
        }
    })?;
    Ok(errno.zip(to).map(|(errno, to)| IcmpError {
        to,
        error: io::Error::from_raw_os_error(errno),
        len,
    }))
}

/// The destination a redirected TCP connection had (`SO_ORIGINAL_DST`,
/// `IP6T_SO_ORIGINAL_DST` over IPv6: the same number).
pub(super) fn original_dst(s: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
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
