//! Crafted frames: IPv4 and IPv6 packets with knobs to make them unusual
//! or broken, and a few frames that are not IP.

use std::net::{Ipv4Addr, Ipv6Addr};

use mwan::checksum;
use mwan::datapath::AnyFlowKey;
use mwan_common::{FlowKey, FlowKey6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;
/// IPv4 "more fragments" flag.
const MF: u16 = 0x2000;

pub const HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const HOST_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// A host on `lan1`.
pub const LAN1_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 140);
/// The LAN's IPv6 prefix (bypassed: the router's connected subnet).
pub const LAN6: &str = "2001:db8:1::/64";
/// Two (temporary) addresses of one LAN host, and another host's.
pub const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
pub const HOST6_TMP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0x5e1f, 0x77a0, 0x9c2d, 0x4b11);
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);
pub const SERVER6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xfe, 0, 0, 0, 0, 0x10);
/// IPv6 extension header numbers.
pub const HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST: u8 = 60;
pub const NO_NEXT: u8 = 59;

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        ty: u8,
        id: u16,
    },
    /// No L4 header the classifier reads (other protocols, later fragments).
    Raw(u8),
}

/// An IPv4 packet, with knobs to make it unusual or broken.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub l4: L4,
    pub payload: usize,
    /// 4-byte words of IPv4 options (IHL = 5 + this).
    pub options: u8,
    /// The flags and fragment offset field.
    pub frag: u16,
    pub version: u8,
    pub ihl: Option<u8>,
    pub tot_len: Option<u16>,
    /// Keep only this many bytes of the L4 header (the total length agrees).
    pub l4_len: Option<usize>,
    /// Zero bytes after the datagram (Ethernet padding).
    pub padding: usize,
}

impl Pkt {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Pkt {
        Pkt {
            src,
            dst,
            l4,
            payload: 0,
            options: 0,
            frag: 0,
            version: 4,
            ihl: None,
            tot_len: None,
            l4_len: None,
            padding: 0,
        }
    }

    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Pkt {
        Pkt::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Pkt {
        Pkt::new(src, dst, L4::Udp { sport, dport }).payload(32)
    }

    pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Pkt {
        Pkt::new(src, dst, L4::Icmp { ty: 8, id }).payload(56)
    }

    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, ty: u8) -> Pkt {
        Pkt::new(src, dst, L4::Icmp { ty, id: 0 }).payload(28)
    }

    pub fn payload(mut self, n: usize) -> Pkt {
        self.payload = n;
        self
    }
    pub fn options(mut self, words: u8) -> Pkt {
        self.options = words;
        self
    }
    pub fn frag(mut self, more: bool, offset_8: u16) -> Pkt {
        self.frag = if more { MF } else { 0 } | offset_8;
        self
    }
    pub fn version(mut self, v: u8) -> Pkt {
        self.version = v;
        self
    }
    pub fn ihl(mut self, words: u8) -> Pkt {
        self.ihl = Some(words);
        self
    }
    pub fn tot_len(mut self, n: u16) -> Pkt {
        self.tot_len = Some(n);
        self
    }
    pub fn l4_len(mut self, n: usize) -> Pkt {
        self.l4_len = Some(n);
        self
    }
    pub fn padding(mut self, n: usize) -> Pkt {
        self.padding = n;
        self
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Icmp { .. } => PROTO_ICMP,
            L4::Raw(p) => p,
        }
    }

    /// The key the datapath must file this packet's flow under.
    pub fn key(&self) -> FlowKey {
        let (sport, dport) = self.l4.ports();
        FlowKey {
            saddr: u32::from_ne_bytes(self.src.octets()),
            daddr: u32::from_ne_bytes(self.dst.octets()),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto: self.proto(),
            _pad: [0; 3],
        }
    }

    /// The datagram's bytes, checksums filled in (the classifier ignores
    /// them; the packets are as a host would send them unless broken on
    /// purpose).
    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = self.l4.header(self.payload);
        l4.resize(l4.len() + self.payload, 0xa5);
        if let L4::Icmp { .. } = self.l4 {
            let c = checksum::internet(&[&l4]);
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
        if let Some(n) = self.l4_len {
            l4.truncate(n);
        }
        let hlen = 20 + 4 * self.options as usize;
        let mut ip = vec![0u8; hlen];
        ip[0] = (self.version << 4) | self.ihl.unwrap_or(5 + self.options);
        let tot = self.tot_len.unwrap_or((hlen + l4.len()) as u16);
        ip[2..4].copy_from_slice(&tot.to_be_bytes());
        ip[4..6].copy_from_slice(&0x4d57u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.proto();
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        // Options: NOPs.
        ip[20..].fill(1);
        let c = checksum::internet(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip.resize(ip.len() + self.padding, 0);
        ip
    }
}

/// An IPv6 packet, with extension headers and knobs to break it.
#[derive(Clone, Debug)]
pub struct Pkt6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub l4: L4,
    pub payload: usize,
    /// Extension headers in order: (kind, 8-byte units beyond the first 8;
    /// for a fragment header, its offset in 8-byte units).
    pub exts: Vec<(u8, u16)>,
    pub version: u8,
    pub payload_len: Option<u16>,
    /// Keep only this many bytes after the fixed header (the payload
    /// length agrees unless set).
    pub cut: Option<usize>,
}

impl Pkt6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, l4: L4) -> Pkt6 {
        Pkt6 {
            src,
            dst,
            l4,
            payload: 0,
            exts: vec![],
            version: 6,
            payload_len: None,
            cut: None,
        }
    }
    pub fn tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Pkt6 {
        Pkt6::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }
    pub fn udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Pkt6 {
        Pkt6::new(src, dst, L4::Udp { sport, dport }).payload(32)
    }
    pub fn echo(src: Ipv6Addr, dst: Ipv6Addr, id: u16) -> Pkt6 {
        Pkt6::new(src, dst, L4::Icmp { ty: 128, id }).payload(56)
    }
    pub fn icmp(src: Ipv6Addr, dst: Ipv6Addr, ty: u8) -> Pkt6 {
        Pkt6::new(src, dst, L4::Icmp { ty, id: 0 }).payload(24)
    }
    pub fn payload(mut self, n: usize) -> Pkt6 {
        self.payload = n;
        self
    }
    /// Adds an extension header of `kind` (`FRAGMENT`: `units` is the
    /// offset in 8-byte units, the "more fragments" flag set).
    pub fn ext(mut self, kind: u8, units: u16) -> Pkt6 {
        self.exts.push((kind, units));
        self
    }
    pub fn version(mut self, v: u8) -> Pkt6 {
        self.version = v;
        self
    }
    pub fn payload_len(mut self, n: u16) -> Pkt6 {
        self.payload_len = Some(n);
        self
    }
    pub fn cut(mut self, n: usize) -> Pkt6 {
        self.cut = Some(n);
        self
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Icmp { .. } => PROTO_ICMPV6,
            _ => Pkt::new(
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                self.l4.clone(),
            )
            .proto(),
        }
    }

    /// The key the datapath must file this packet's flow under.
    pub fn key(&self) -> FlowKey6 {
        let (sport, dport) = self.l4.ports();
        FlowKey6 {
            saddr: self.src.octets(),
            daddr: self.dst.octets(),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto: self.proto(),
            _pad: [0; 3],
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = self.l4.header(self.payload);
        l4.resize(l4.len() + self.payload, 0xa5);
        if let L4::Icmp { .. } = self.l4 {
            // The ICMPv6 checksum covers a pseudo-header.
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&self.src.octets());
            pseudo.extend_from_slice(&self.dst.octets());
            pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, PROTO_ICMPV6]);
            let c = checksum::internet(&[&pseudo, &l4]);
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
        let last = self.proto();
        let mut after = Vec::new();
        for (i, (kind, units)) in self.exts.iter().enumerate() {
            let next = self.exts.get(i + 1).map(|e| e.0).unwrap_or(last);
            let mut h = if *kind == FRAGMENT {
                let mut h = vec![0u8; 8];
                h[2..4].copy_from_slice(&((units << 3) | 1).to_be_bytes());
                h[4..8].copy_from_slice(&0x4d57u32.to_be_bytes());
                h
            } else {
                let mut h = vec![0u8; 8 + 8 * *units as usize];
                h[1] = *units as u8;
                // PadN over the rest.
                h[2] = 1;
                h[3] = (h.len() - 4) as u8;
                h
            };
            h[0] = next;
            after.extend_from_slice(&h);
        }
        after.extend_from_slice(&l4);
        if let Some(n) = self.cut {
            after.truncate(n);
        }
        let mut ip = vec![0u8; 40];
        ip[0] = self.version << 4;
        let plen = self.payload_len.unwrap_or(after.len() as u16);
        ip[4..6].copy_from_slice(&plen.to_be_bytes());
        ip[6] = self.exts.first().map(|e| e.0).unwrap_or(last);
        ip[7] = 64;
        ip[8..24].copy_from_slice(&self.src.octets());
        ip[24..40].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&after);
        ip
    }
}

impl L4 {
    fn ports(&self) -> (u16, u16) {
        match *self {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
            L4::Icmp { id, .. } => (id, 0),
            L4::Raw(_) => (0, 0),
        }
    }

    /// The L4 header (checksum left 0).
    fn header(&self, payload: usize) -> Vec<u8> {
        match *self {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..8].copy_from_slice(&1000u32.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            L4::Udp { sport, dport } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
                h
            }
            L4::Icmp { ty, id } => {
                let mut h = vec![0u8; 8];
                h[0] = ty;
                h[4..6].copy_from_slice(&id.to_be_bytes());
                h[6..8].copy_from_slice(&1u16.to_be_bytes());
                h
            }
            L4::Raw(_) => Vec::new(),
        }
    }
}

/// What follows the Ethernet header.
#[derive(Clone, Debug)]
pub enum Body {
    Ip(Pkt),
    Ip6(Pkt6),
    Other { ethertype: u16, bytes: Vec<u8> },
}

impl Body {
    /// For failure messages.
    pub fn describe(&self) -> String {
        match self {
            Body::Ip(p) => format!("{p:?}"),
            Body::Ip6(p) => format!("{p:?}"),
            Body::Other { ethertype, bytes } => {
                format!("ethertype {ethertype:#06x}, {} bytes", bytes.len())
            }
        }
    }

    /// The frame with made-up MAC addresses (BPF_PROG_TEST_RUN).
    pub fn frame(&self) -> Vec<u8> {
        self.frame_between([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 0x0a])
    }

    /// The frame from MAC `src` to MAC `dst`.
    pub fn frame_between(&self, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let (ethertype, bytes) = match self {
            Body::Ip(p) => (ETH_P_IP, p.bytes()),
            Body::Ip6(p) => (ETH_P_IPV6, p.bytes()),
            Body::Other { ethertype, bytes } => (*ethertype, bytes.clone()),
        };
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&bytes);
        f
    }
}

impl Body {
    /// The key of the packet's flow, if it is an IP packet.
    pub fn key(&self) -> Option<AnyFlowKey> {
        match self {
            Body::Ip(p) => Some(AnyFlowKey::V4(p.key())),
            Body::Ip6(p) => Some(AnyFlowKey::V6(p.key())),
            Body::Other { .. } => None,
        }
    }
}

impl From<Pkt> for Body {
    fn from(p: Pkt) -> Body {
        Body::Ip(p)
    }
}

impl From<Pkt6> for Body {
    fn from(p: Pkt6) -> Body {
        Body::Ip6(p)
    }
}

pub fn arp_request() -> Body {
    let mut b = vec![0u8; 28];
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    b[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    b[4] = 6;
    b[5] = 4;
    b[6..8].copy_from_slice(&1u16.to_be_bytes());
    b[14..18].copy_from_slice(&HOST.octets());
    b[24..28].copy_from_slice(&[192, 0, 2, 1]);
    Body::Other {
        ethertype: ETH_P_ARP,
        bytes: b,
    }
}

/// `p` inside an 802.1Q tag (VLAN 10).
pub fn vlan_tagged(p: Pkt) -> Body {
    let mut b = vec![0, 10];
    b.extend_from_slice(&ETH_P_IP.to_be_bytes());
    b.extend_from_slice(&p.bytes());
    Body::Other {
        ethertype: ETH_P_8021Q,
        bytes: b,
    }
}
