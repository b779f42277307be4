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

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::checksum::internet as checksum;
use crate::family::{Family, PerFamily};

pub use crate::nft::NUDGE_MARK;

/// A TCP connection as seen on the LAN: `client` inside, `server` outside
/// (both of one family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conn {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// The 20-byte TCP header of a segment from `c.server` to `c.client`: ACK
/// flag, no data, sequence number `seq`, acknowledgment 0; its checksum
/// over `pseudo` (the family's pseudo-header) and itself.
fn tcp_header(c: &Conn, seq: u32, pseudo: &[u8]) -> [u8; 20] {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&c.server.port().to_be_bytes());
    t[2..4].copy_from_slice(&c.client.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4; // data offset: 20 bytes
    t[13] = 0x10; // ACK
    t[14..16].copy_from_slice(&1024u16.to_be_bytes()); // window
    let sum = checksum(&[pseudo, &t]);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    t
}

/// The IP + TCP segment from `c.server` to `c.client` (see
/// [`tcp_header`]): 40 bytes for IPv4, 60 for IPv6.
pub fn segment(c: &Conn, seq: u32) -> Vec<u8> {
    match (c.server.ip(), c.client.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64; // TTL
            ip[9] = 6; // TCP
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&dst.octets());
            let ip_sum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
            let mut pseudo = [0u8; 12];
            pseudo[0..4].copy_from_slice(&src.octets());
            pseudo[4..8].copy_from_slice(&dst.octets());
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
            [&ip[..], &tcp_header(c, seq, &pseudo)].concat()
        }
        (src, dst) => {
            let (src, dst) = (v6(src), v6(dst));
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes()); // payload length
            ip[6] = 6; // next header: TCP
            ip[7] = 64; // hop limit
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
            let mut pseudo = [0u8; 40];
            pseudo[0..16].copy_from_slice(&src.octets());
            pseudo[16..32].copy_from_slice(&dst.octets());
            pseudo[32..36].copy_from_slice(&20u32.to_be_bytes());
            pseudo[39] = 6;
            [&ip[..], &tcp_header(c, seq, &pseudo)].concat()
        }
    }
}

/// An address as IPv6 (an IPv4 one mapped: never mixed in practice).
fn v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

/// Sends each client two segments whose sequence numbers are 2^31 apart: a
/// TCP window is smaller than 2^31, so at least one is outside it. Returns
/// how many connections were nudged.
pub fn nudge(conns: &[Conn]) -> Result<usize> {
    let mut sockets: PerFamily<Option<Socket>> = PerFamily::default();
    let base: u32 = rand_u32();
    let mut sent = 0;
    for c in conns {
        let f = Family::of(&c.client.ip());
        let s = match &mut sockets[f] {
            Some(s) => s,
            slot => slot.insert(raw_socket(f)?),
        };
        let to = SockAddr::from(SocketAddr::new(c.client.ip(), 0));
        let mut ok = false;
        for seq in [base, base ^ 0x8000_0000] {
            ok |= s.send_to(&segment(c, seq), &to).is_ok();
        }
        sent += usize::from(ok);
    }
    Ok(sent)
}

/// A raw socket that sends whole IP packets (`IPPROTO_RAW`: the header is
/// ours, for IPv6 too) with [`NUDGE_MARK`].
fn raw_socket(f: Family) -> Result<Socket> {
    let domain = match f {
        Family::Ipv4 => Domain::IPV4,
        Family::Ipv6 => Domain::IPV6,
    };
    let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
        .context("opening a raw socket for nudges")?;
    s.set_mark(NUDGE_MARK).context("marking nudges")?;
    Ok(s)
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // getrandom(2) never fails for 4 bytes once the pool is ready.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u32::from_ne_bytes(b)
}

/// The client and server of a LAN-side TCP 5-tuple.
pub fn conn(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Conn {
    Conn {
        client: SocketAddr::new(src, sport),
        server: SocketAddr::new(dst, dport),
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

    #[test]
    fn ipv6_segment_has_a_valid_checksum() {
        let c = conn(
            "fd00:0:2::10".parse().unwrap(),
            40000,
            "2001:db8:ffff::10".parse().unwrap(),
            8082,
        );
        let p = segment(&c, 0x1234_5678);
        assert_eq!(p.len(), 60);
        assert_eq!((p[0] >> 4, p[6]), (6, 6), "IPv6, next header TCP");
        let mut pseudo = [0u8; 40];
        pseudo[0..32].copy_from_slice(&p[8..40]);
        pseudo[32..36].copy_from_slice(&20u32.to_be_bytes());
        pseudo[39] = 6;
        assert_eq!(checksum(&[&pseudo, &p[40..]]), 0);
        assert_eq!(
            &p[8..24],
            &"2001:db8:ffff::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(u16::from_be_bytes([p[42], p[43]]), 40000);
        assert_eq!(p[53], 0x10);
    }
}
