//! Crafted frames: IPv4 packets with knobs to make them unusual or broken,
//! and a few frames that are not IPv4.

use std::net::Ipv4Addr;

use mwan::checksum;
use mwan_common::{FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

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
        let (sport, dport) = match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
            L4::Icmp { id, .. } => (id, 0),
            L4::Raw(_) => (0, 0),
        };
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
        let mut l4 = match self.l4 {
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
                h[4..6].copy_from_slice(&((8 + self.payload) as u16).to_be_bytes());
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
        };
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

/// What follows the Ethernet header.
#[derive(Clone, Debug)]
pub enum Body {
    Ip(Pkt),
    Other { ethertype: u16, bytes: Vec<u8> },
}

impl Body {
    /// For failure messages.
    pub fn describe(&self) -> String {
        match self {
            Body::Ip(p) => format!("{p:?}"),
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
            Body::Other { ethertype, bytes } => (*ethertype, bytes.clone()),
        };
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&bytes);
        f
    }
}

pub fn ipv6_tcp_syn() -> Body {
    let mut b = vec![0u8; 40 + 20];
    b[0] = 0x60;
    b[4..6].copy_from_slice(&20u16.to_be_bytes());
    b[6] = PROTO_TCP;
    b[7] = 64;
    b[8..10].copy_from_slice(&[0x20, 0x01]);
    b[10..12].copy_from_slice(&[0x0d, 0xb8]);
    b[23] = 0x10;
    b[24..26].copy_from_slice(&[0x20, 0x01]);
    b[26..28].copy_from_slice(&[0x0d, 0xb8]);
    b[39] = 0x20;
    b[40..42].copy_from_slice(&40000u16.to_be_bytes());
    b[42..44].copy_from_slice(&443u16.to_be_bytes());
    b[52] = 5 << 4;
    b[53] = SYN;
    Body::Other {
        ethertype: ETH_P_IPV6,
        bytes: b,
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
