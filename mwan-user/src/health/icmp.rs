//! ICMP and ICMPv6 echo over a raw socket (`SOCK_RAW`, `IPPROTO_ICMP` or
//! `IPPROTO_ICMPV6`; needs `CAP_NET_RAW`, not `ping_group_range`).
//!
//! A raw socket bound to a device receives only that device's packets; a
//! filter (`ICMP_FILTER`, `ICMP6_FILTER`) lets through echo replies only.
//! Every prober uses its own echo id, and replies are matched by id,
//! sequence and source. An IPv4 raw socket delivers the IP header with the
//! message; an ICMPv6 one delivers the message alone (the source comes from
//! `recvfrom`), and the kernel fills in the ICMPv6 checksum on sending.

use std::future;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Instant;

use socket2::{Domain, Protocol, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `ICMP_FILTER` (linux/icmp.h): a socket option of `SOL_RAW` sockets; the
/// set bits of its 32-bit mask are the ICMP types *not* delivered.
const ICMP_FILTER: libc::c_int = 1;
/// `ICMP6_FILTER` (linux/icmpv6.h): an option of `IPPROTO_ICMPV6` raw
/// sockets; a 256-bit mask whose set bits are the types *not* delivered.
const ICMP6_FILTER: libc::c_int = 1;
const ECHO_REPLY: u8 = 0;
const ECHO_REQUEST: u8 = 8;
const ECHO6_REQUEST: u8 = 128;
const ECHO6_REPLY: u8 = 129;
/// Payload of our echo requests (replies echo it back).
const PAYLOAD: &[u8; 8] = b"mwan-hc\0";

pub struct Socket {
    fd: AsyncFd<socket2::Socket>,
    v6: bool,
}

/// The fields of an echo reply that identify its request.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub src: IpAddr,
    pub id: u16,
    pub seq: u16,
}

impl Socket {
    /// A raw ICMP (ICMPv6 when `v6`) socket sending with `mark` through
    /// `interface` only. Must be called within a tokio runtime.
    pub fn open(interface: &str, mark: u32, v6: bool) -> io::Result<Socket> {
        let s = if v6 {
            socket2::Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?
        } else {
            socket2::Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?
        };
        s.set_mark(mark)?;
        s.bind_device(Some(interface.as_bytes()))?;
        if v6 {
            let mut only_replies = [u32::MAX; 8];
            only_replies[usize::from(ECHO6_REPLY) / 32] &= !(1 << (ECHO6_REPLY % 32));
            setsockopt(&s, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &only_replies)?;
        } else {
            let only_replies: u32 = !(1 << ECHO_REPLY);
            setsockopt(&s, libc::SOL_RAW, ICMP_FILTER, &only_replies)?;
        }
        s.set_nonblocking(true)?;
        // SAFETY: the socket owns its descriptor, and the AsyncFd owns the
        // socket: the descriptor stays open and the same until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(s, Interest::READABLE)? };
        Ok(Socket { fd, v6 })
    }

    /// Sends an echo request; returns the time read immediately before.
    pub fn send_echo(&self, dst: IpAddr, id: u16, seq: u16) -> io::Result<Instant> {
        let packet = echo_request(id, seq, self.v6);
        let sent = Instant::now();
        self.fd
            .get_ref()
            .send_to(&packet, &SocketAddr::new(dst, 0).into())?;
        Ok(sent)
    }

    /// Receives an echo reply: the fields that identify its request and
    /// the time it was read; `None` for anything else received.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<(Option<Reply>, Instant)> {
        loop {
            let mut guard = self.fd.readable().await?;
            let got = guard.try_io(|fd| {
                // SAFETY: `recv_from` only writes initialised bytes into
                // the buffer, and we read back only the `len` it returns.
                let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
                fd.get_ref().recv_from(uninit)
            });
            if let Ok(r) = got {
                let (len, from) = r?;
                let at = Instant::now();
                let reply = if self.v6 {
                    from.as_socket()
                        .and_then(|from| parse_reply6(&buf[..len], from.ip()))
                } else {
                    parse_reply(&buf[..len])
                };
                return Ok((reply, at));
            }
        }
    }
}

fn setsockopt<T>(
    s: &socket2::Socket,
    level: libc::c_int,
    name: libc::c_int,
    v: &T,
) -> io::Result<()> {
    // SAFETY: a valid socket and a pointer to a live value of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`Socket::recv`] on the socket if there is one; never ready otherwise.
pub async fn recv(sock: Option<&Socket>, buf: &mut [u8]) -> io::Result<(Option<Reply>, Instant)> {
    match sock {
        Some(s) => s.recv(buf).await,
        None => future::pending().await,
    }
}

/// An echo request; ICMPv6's checksum (over a pseudo-header with the
/// addresses) is left to the kernel.
fn echo_request(id: u16, seq: u16, v6: bool) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = if v6 { ECHO6_REQUEST } else { ECHO_REQUEST };
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..].copy_from_slice(PAYLOAD);
    if !v6 {
        let sum = checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

fn checksum(data: &[u8]) -> u16 {
    crate::checksum::internet(&[data])
}

/// Parses an IPv4 packet as received on a raw socket: an echo reply's
/// source, id and sequence, or `None` for anything else.
pub fn parse_reply(packet: &[u8]) -> Option<Reply> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || ihl < 20 || packet.get(9) != Some(&1) {
        return None;
    }
    let icmp = packet.get(ihl..ihl + 8)?;
    if icmp[0] != ECHO_REPLY || icmp[1] != 0 {
        return None;
    }
    Some(Reply {
        src: IpAddr::from([packet[12], packet[13], packet[14], packet[15]]),
        id: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
    })
}

/// Parses an ICMPv6 message as received on a raw socket (no IP header)
/// from `src`: an echo reply's id and sequence, or `None`.
pub fn parse_reply6(message: &[u8], src: IpAddr) -> Option<Reply> {
    let icmp = message.get(..8)?;
    if icmp[0] != ECHO6_REPLY || icmp[1] != 0 {
        return None;
    }
    Some(Reply {
        src,
        id: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksums_to_zero() {
        let p = echo_request(0x1234, 7, false);
        assert_eq!(checksum(&p), 0);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn parses_echo_replies_only() {
        let mut packet = vec![
            0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 192, 0, 2, 1, 198, 51, 100, 1,
        ];
        let mut icmp = echo_request(0xbeef, 3, false);
        icmp[0] = ECHO_REPLY;
        packet.extend_from_slice(&icmp);
        assert_eq!(
            parse_reply(&packet),
            Some(Reply {
                src: "192.0.2.1".parse().unwrap(),
                id: 0xbeef,
                seq: 3
            })
        );
        let mut request = packet.clone();
        request[20] = ECHO_REQUEST;
        assert_eq!(parse_reply(&request), None);
        let mut udp = packet.clone();
        udp[9] = 17;
        assert_eq!(parse_reply(&udp), None);
        assert_eq!(parse_reply(&packet[..25]), None);
        assert_eq!(parse_reply(&[]), None);
    }

    #[test]
    fn parses_icmpv6_echo_replies_only() {
        let src: IpAddr = "2001:db8::1".parse().unwrap();
        let mut reply = echo_request(0xbeef, 3, true);
        assert_eq!(reply[0], ECHO6_REQUEST);
        assert_eq!(&reply[2..4], &[0, 0], "the kernel fills in the checksum");
        assert_eq!(parse_reply6(&reply, src), None);
        reply[0] = ECHO6_REPLY;
        assert_eq!(
            parse_reply6(&reply, src),
            Some(Reply {
                src,
                id: 0xbeef,
                seq: 3
            })
        );
        assert_eq!(parse_reply6(&reply[..7], src), None);
    }
}
