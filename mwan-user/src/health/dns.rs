//! DNS probes: a query for the root's NS records over UDP; any response
//! with our id counts, whatever its code.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use socket2::{Domain, Protocol, Type};
use tokio::net::UdpSocket;

use super::outcome::{random_u16, Outcome, NO_ANSWER};

/// Asks the resolver at `addr` with `mark` through `interface` only.
pub async fn probe(interface: &str, mark: u32, addr: SocketAddr, deadline: Instant) -> Outcome {
    let sock = socket(interface, mark, addr)
        .await
        .map_err(|e| format!("udp socket on {interface}: {e}"))?;
    let id = random_u16();
    let start = Instant::now();
    sock.send(&query(id))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let answer = async {
        let mut buf = [0u8; 512];
        loop {
            let len = sock.recv(&mut buf).await?;
            if is_response(&buf[..len], id) {
                return io::Result::Ok(start.elapsed());
            }
        }
    };
    match tokio::time::timeout_at(deadline.into(), answer).await {
        Ok(Ok(rtt)) => Ok(rtt),
        Ok(Err(e)) => Err(format!("recv: {e}")),
        Err(_) => Err(NO_ANSWER.to_string()),
    }
}

async fn socket(interface: &str, mark: u32, peer: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(Domain::for_address(peer), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_mark(mark)?;
    s.bind_device(Some(interface.as_bytes()))?;
    s.set_nonblocking(true)?;
    let any = if peer.is_ipv6() {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    };
    s.bind(&any.into())?;
    let sock = UdpSocket::from_std(s.into())?;
    sock.connect(peer).await?;
    Ok(sock)
}

/// A recursive query for `. IN NS`.
fn query(id: u16) -> [u8; 17] {
    let mut q = [0u8; 17];
    q[0..2].copy_from_slice(&id.to_be_bytes());
    q[2] = 0x01; // RD
    q[5] = 1; // QDCOUNT
    q[12] = 0; // QNAME: the root, a single empty label
    q[14] = 2; // QTYPE NS
    q[16] = 1; // QCLASS IN
    q
}

/// A DNS response (QR set) to query `id`.
fn is_response(msg: &[u8], id: u16) -> bool {
    msg.len() >= 12 && msg[0..2] == id.to_be_bytes() && msg[2] & 0x80 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_response_matching() {
        let q = query(0xabcd);
        assert_eq!(&q[..6], &[0xab, 0xcd, 0x01, 0, 0, 1]);
        assert_eq!(&q[12..], &[0, 0, 2, 0, 1]);
        // Our own query is not a response; the same with QR set is, with any rcode.
        assert!(!is_response(&q, 0xabcd));
        let mut r = q;
        r[2] |= 0x80;
        r[3] = 0x05; // REFUSED
        assert!(is_response(&r, 0xabcd));
        assert!(!is_response(&r, 0xabce));
        assert!(!is_response(&r[..11], 0xabcd));
    }
}
