//! ICMP echo over a raw socket (`SOCK_RAW`, `IPPROTO_ICMP`; needs
//! `CAP_NET_RAW`, not `ping_group_range`).
//!
//! A raw socket bound to a device receives only that device's packets; a
//! filter (`ICMP_FILTER`) lets through echo replies only. Every prober uses
//! its own echo id, and replies are matched by id, sequence and source.

use std::future;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Instant;

use socket2::{Domain, Protocol, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `ICMP_FILTER` (linux/icmp.h): a socket option of `SOL_RAW` sockets; the
/// set bits of its 32-bit mask are the ICMP types *not* delivered.
const ICMP_FILTER: libc::c_int = 1;
const ECHO_REPLY: u8 = 0;
const ECHO_REQUEST: u8 = 8;
/// Payload of our echo requests (replies echo it back).
const PAYLOAD: &[u8; 8] = b"mwan-hc\0";

pub struct Socket(AsyncFd<socket2::Socket>);

/// The fields of an echo reply that identify its request.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub src: Ipv4Addr,
    pub id: u16,
    pub seq: u16,
}

impl Socket {
    /// A raw ICMP socket sending with `mark` through `interface` only.
    /// Must be called within a tokio runtime.
    pub fn open(interface: &str, mark: u32) -> io::Result<Socket> {
        let s = socket2::Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        s.set_mark(mark)?;
        s.bind_device(Some(interface.as_bytes()))?;
        let only_replies: u32 = !(1 << ECHO_REPLY);
        // SAFETY: a valid socket and a pointer to a live u32 of the given size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_RAW,
                ICMP_FILTER,
                (&only_replies as *const u32).cast(),
                size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        s.set_nonblocking(true)?;
        // SAFETY: the socket owns its descriptor, and the AsyncFd owns the
        // socket: the descriptor stays open and the same until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(s, Interest::READABLE)? };
        Ok(Socket(fd))
    }

    /// Sends an echo request; returns the time read immediately before.
    pub fn send_echo(&self, dst: Ipv4Addr, id: u16, seq: u16) -> io::Result<Instant> {
        let packet = echo_request(id, seq);
        let sent = Instant::now();
        self.0
            .get_ref()
            .send_to(&packet, &SocketAddrV4::new(dst, 0).into())?;
        Ok(sent)
    }

    /// Receives a packet (IPv4 header included) into `buf`; returns its
    /// length and the time it was read.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Instant)> {
        loop {
            let mut guard = self.0.readable().await?;
            if let Ok(r) = guard.try_io(|fd| fd.get_ref().read(buf)) {
                return r.map(|len| (len, Instant::now()));
            }
        }
    }
}

/// [`Socket::recv`] on the socket if there is one; never ready otherwise.
pub async fn recv(sock: Option<&Socket>, buf: &mut [u8]) -> io::Result<(usize, Instant)> {
    match sock {
        Some(s) => s.recv(buf).await,
        None => future::pending().await,
    }
}

fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = ECHO_REQUEST;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..].copy_from_slice(PAYLOAD);
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
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
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        id: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksums_to_zero() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum(&p), 0);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn parses_echo_replies_only() {
        let mut packet = vec![
            0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 192, 0, 2, 1, 198, 51, 100, 1,
        ];
        let mut icmp = echo_request(0xbeef, 3);
        icmp[0] = ECHO_REPLY;
        packet.extend_from_slice(&icmp);
        assert_eq!(
            parse_reply(&packet),
            Some(Reply {
                src: Ipv4Addr::new(192, 0, 2, 1),
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
}
