//! A bounded ICMP / ICMPv6 echo client on a raw socket (no `ping` binary
//! needed).

use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::client::unique_id;
use crate::ns::Netns;

/// Result of [`ping`].
#[derive(Debug, Clone, Default)]
pub struct PingStats {
    pub sent: u32,
    pub received: u32,
    /// Round-trip time of each answered request, in sending order.
    pub rtts: Vec<Duration>,
}

impl PingStats {
    /// Percentage of requests without an answer.
    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        100.0 * f64::from(self.sent - self.received) / f64::from(self.sent)
    }

    pub fn median_rtt(&self) -> Option<Duration> {
        let mut rtts = self.rtts.clone();
        rtts.sort();
        rtts.get(rtts.len() / 2).copied()
    }
}

/// Sends `count` echo requests to `target` (IPv4 or IPv6) from namespace
/// `ns`, one every `interval`, and collects replies until `timeout` after
/// the last request. Takes at most `count × interval + timeout`.
pub fn ping(
    ns: &Netns,
    target: impl Into<IpAddr>,
    count: u32,
    interval: Duration,
    timeout: Duration,
) -> Result<PingStats> {
    let target = target.into();
    ns.run(|| {
        let (domain, protocol) = match target {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
        };
        // The kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets.
        let socket = Socket::new(domain, Type::RAW, Some(protocol))
            .with_context(|| format!("raw ICMP socket in {}", ns.name()))?;
        let dest = SocketAddr::new(target, 0).into();
        let id = unique_id();
        let start = Instant::now();
        let deadline = start + interval * count.saturating_sub(1) + timeout;
        let mut sent_at: Vec<Option<Instant>> = vec![None; count as usize];
        let mut rtts: Vec<Option<Duration>> = vec![None; count as usize];
        let mut next: u32 = 0;
        let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
        loop {
            let now = Instant::now();
            if next < count && now >= start + interval * next {
                // A failed send (no route, …) counts as a lost request.
                let _ = socket.send_to(&echo_request(target.is_ipv6(), id, next as u16), &dest);
                sent_at[next as usize] = Some(now);
                next += 1;
                continue;
            }
            if now >= deadline || (next == count && rtts.iter().all(Option::is_some)) {
                break;
            }
            let wake = if next < count {
                start + interval * next
            } else {
                deadline
            };
            socket.set_read_timeout(Some(
                (wake.min(deadline) - now).max(Duration::from_micros(100)),
            ))?;
            let Ok((len, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let received = Instant::now();
            // SAFETY: recv_from initialised the first `len` bytes.
            let packet: &[u8] =
                unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len) };
            let seq = match target {
                IpAddr::V4(v4) => echo_reply_seq(packet, v4, id),
                // Raw ICMPv6 sockets deliver no IPv6 header: the sender is
                // the socket address.
                IpAddr::V6(_) => (from.as_socket().map(|a| a.ip()) == Some(target))
                    .then(|| echo6_reply_seq(packet, id))
                    .flatten(),
            };
            if let Some(seq) = seq {
                if let (Some(sent), Some(slot)) = (
                    sent_at.get(seq as usize).copied().flatten(),
                    rtts.get_mut(seq as usize),
                ) {
                    slot.get_or_insert(received - sent);
                }
            }
        }
        let rtts: Vec<Duration> = rtts.into_iter().flatten().collect();
        Ok(PingStats {
            sent: next,
            received: rtts.len() as u32,
            rtts,
        })
    })
}

/// An ICMP (or ICMPv6, checksum left to the kernel) echo request with a
/// 48-byte payload.
fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut packet = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend((0..48u8).map(|i| i.wrapping_add(0x20)));
    if !v6 {
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    packet
}

/// The sequence number of ICMPv6 message `icmp` if it is an echo reply
/// with identifier `id`.
fn echo6_reply_seq(icmp: &[u8], id: u16) -> Option<u16> {
    let icmp = icmp.get(..8)?;
    (icmp[0] == 129 && u16::from_be_bytes([icmp[4], icmp[5]]) == id)
        .then(|| u16::from_be_bytes([icmp[6], icmp[7]]))
}

/// The sequence number of `packet` (IPv4 header + ICMP) if it is an echo
/// reply from `from` with identifier `id`.
fn echo_reply_seq(packet: &[u8], from: Ipv4Addr, id: u16) -> Option<u16> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let src = Ipv4Addr::new(*packet.get(12)?, packet[13], packet[14], packet[15]);
    let icmp = packet.get(ihl..ihl + 8)?;
    (src == from && icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == id)
        .then(|| u16::from_be_bytes([icmp[6], icmp[7]]))
}

fn checksum(data: &[u8]) -> u16 {
    mwan::checksum::internet(&[data])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_checksum_verifies() {
        let packet = echo_request(false, 0xbeef, 7);
        assert_eq!(checksum(&packet), 0);
    }

    #[test]
    fn reply_is_matched_on_source_and_id() {
        let mut packet = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 198, 51, 100, 1, 192, 0, 2, 10,
        ];
        packet.extend_from_slice(&[0, 0, 0, 0, 0xbe, 0xef, 0, 7]);
        let from = Ipv4Addr::new(198, 51, 100, 1);
        assert_eq!(echo_reply_seq(&packet, from, 0xbeef), Some(7));
        assert_eq!(echo_reply_seq(&packet, from, 0xbeee), None);
        assert_eq!(
            echo_reply_seq(&packet, Ipv4Addr::new(198, 51, 100, 2), 0xbeef),
            None
        );
    }
}
