//! Waking up LAN clients whose TCP connections died with their WAN.
//!
//! When a WAN goes down mwan deletes the conntrack entries of its
//! connections and the datapath moves their pins; a client that sends
//! anything is then answered with a reset by the server (its packets now
//! arrive from another address) and reconnects. A client that only waits
//! (a download on a dead link) would hang until its own timeouts. mwan
//! therefore sends it, in the server's name, a segment with a sequence
//! number outside its window: TCP answers such a segment with an ACK, that
//! ACK leaves through the new WAN, and the server's reset ends the dead
//! connection at once. The segments carry [`NUDGE_MARK`], which mwan's
//! nftables table exempts from conntrack.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::checksum::internet as checksum;

pub use crate::nft::NUDGE_MARK;

/// A TCP connection as seen on the LAN: `client` inside, `server` outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conn {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
}

/// An IPv4 + TCP segment from `c.server` to `c.client`: ACK flag, no data,
/// sequence number `seq`, acknowledgment 0.
pub fn segment(c: &Conn, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    // IPv4 header.
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&c.server.ip().octets());
    p[16..20].copy_from_slice(&c.client.ip().octets());
    let ip_sum = checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    // TCP header.
    p[20..22].copy_from_slice(&c.server.port().to_be_bytes());
    p[22..24].copy_from_slice(&c.client.port().to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[32] = 5 << 4; // data offset: 20 bytes
    p[33] = 0x10; // ACK
    p[34..36].copy_from_slice(&1024u16.to_be_bytes()); // window
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&p[12..16]);
    pseudo[4..8].copy_from_slice(&p[16..20]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_sum = checksum(&[&pseudo, &p[20..40]]);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// Sends each client two segments whose sequence numbers are 2^31 apart: a
/// TCP window is smaller than 2^31, so at least one is outside it. Returns
/// how many connections were nudged.
pub fn nudge(conns: &[Conn]) -> Result<usize> {
    if conns.is_empty() {
        return Ok(0);
    }
    let s = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("opening a raw socket for nudges")?;
    s.set_mark(NUDGE_MARK).context("marking nudges")?;
    let base: u32 = rand_u32();
    let mut sent = 0;
    for c in conns {
        let to = SockAddr::from(SocketAddrV4::new(*c.client.ip(), 0));
        let mut ok = false;
        for seq in [base, base ^ 0x8000_0000] {
            ok |= s.send_to(&segment(c, seq), &to).is_ok();
        }
        sent += usize::from(ok);
    }
    Ok(sent)
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // getrandom(2) never fails for 4 bytes once the pool is ready.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u32::from_ne_bytes(b)
}

/// The client and server of a LAN-side TCP 5-tuple.
pub fn conn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Conn {
    Conn {
        client: SocketAddrV4::new(src, sport),
        server: SocketAddrV4::new(dst, dport),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_has_valid_checksums() {
        let c = conn(
            "192.0.2.10".parse().unwrap(),
            40000,
            "198.51.100.10".parse().unwrap(),
            8082,
        );
        let p = segment(&c, 0x1234_5678);
        // A correct header sums to zero (0xffff before the final inversion).
        assert_eq!(checksum(&[&p[..20]]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&p[12..16]);
        pseudo[4..8].copy_from_slice(&p[16..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0);
        assert_eq!(&p[12..16], &[198, 51, 100, 10]);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 40000);
        assert_eq!(
            u32::from_be_bytes([p[24], p[25], p[26], p[27]]),
            0x1234_5678
        );
        assert_eq!(p[33], 0x10);
    }
}
