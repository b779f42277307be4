//! mwan datapath: a tc classifier on each LAN-facing interface (ingress, so
//! before the routing decision) that pins every new IPv4 and IPv6 flow to
//! one WAN and sets `skb->mark` to that WAN's mark; fwmark rules installed
//! by userspace send each mark to the WAN's routing table (of the packet's
//! family).
//!
//! The two families share the classification logic ([`classify_flow`],
//! generic over [`Family`]); each has its own flow, WAN, policy, address
//! rule, bypass and learned-destination maps. Host pins (`HOST_PINS`)
//! serve both families. The maps are mwan-common's registry
//! (`for_each_map!`): this file names none of them itself.
//!
//! Per packet: parse, look the flow up in the LRU flow map, and on a hit whose
//! WAN is still alive, count and mark. Everything else (rule matching, the
//! weighted choice, host stickiness) only runs for the first packet of a flow
//! or when its WAN died.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use mwan_common::*;

/// The maps of the registry ([`for_each_map!`]): a `#[map]` static for
/// each (named as it is pinned), and [`FamilyMaps`], each family's own.
macro_rules! ebpf_maps {
    (
        shared { $(
            $(#[$sattr:meta])*
            $sfield:ident: $sname:ident = $skind:ident<$($sp:ty),+> [$scap:expr]
                $(sized by $ssz:ident)? since $ssince:ident;
        )* }
        per_family { $(
            $(#[$attr:meta])*
            $field:ident: $name4:ident, $name6:ident = $kind:ident<$($p:ty),+> [$cap:expr]
                $(sized by $sz:ident)? since $since:ident;
        )* }
    ) => {
        // Capacities sized by the config are the loader's to set; the
        // registry's are the defaults.
        $( $(#[$sattr])* #[map] static $sname: $skind<$($sp),+> = $skind::pinned($scap, 0); )*

        /// The type of each per-family map, for family `F`.
        #[allow(non_camel_case_types)]
        trait MapTypes {
            $( type $field; )*
        }

        impl<F: FamilyKeys> MapTypes for F {
            $( type $field = $kind<$($p),+>; )*
        }

        $(
            $(#[$attr])* #[map] static $name4: <V4 as MapTypes>::$field = $kind::pinned($cap, 0);
            $(#[$attr])* #[map] static $name6: <V6 as MapTypes>::$field = $kind::pinned($cap, 0);
        )*

        /// A family's own maps (`FLOWS` or `FLOWS6`, …).
        trait FamilyMaps: FamilyKeys {
            $( fn $field() -> &'static <Self as MapTypes>::$field; )*
        }

        impl FamilyMaps for V4 {
            $(
                #[inline(always)]
                fn $field() -> &'static <Self as MapTypes>::$field {
                    &$name4
                }
            )*
        }

        impl FamilyMaps for V6 {
            $(
                #[inline(always)]
                fn $field() -> &'static <Self as MapTypes>::$field {
                    &$name6
                }
            )*
        }
    };
}

for_each_map!(ebpf_maps);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO: u8 = 8;
const ICMPV6_ECHO: u8 = 128;
/// Minimum header lengths: a shorter L4 header makes the packet malformed.
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
/// The longest IPv4 header (IHL 15).
const MAX_IP_HLEN: usize = 60;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers the walk steps over.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// The L4 header of an IPv6 packet must start within this many bytes of
/// the IPv6 header (its 40 bytes and the extension headers): beyond it the
/// packet is not mwan's business. It bounds the walk's offsets for the
/// verifier and what a pull copies.
const MAX_IPV6_HDRS: usize = 512;
/// Refresh a host pin's activity time at most this often.
const HOST_REFRESH_NS: u64 = 1_000_000_000;
/// A non-TCP flow idle this long has lost its conntrack entry (and NAT
/// binding; conntrack's UDP stream timeout is 120 s): the next packet is a
/// new connection.
const STALE_NS: u64 = 180_000_000_000;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
/// `bpf_ct_opts::netns_id`: the packet's own network namespace.
const BPF_F_CURRENT_NETNS: i32 = -1;
/// The size of `struct bpf_ct_opts` every kernel with the kfuncs accepts.
const CT_OPTS_SZ: u32 = 12;

/// `struct bpf_ct_opts` (its first 12 bytes).
#[repr(C)]
struct CtOpts {
    netns_id: i32,
    error: i32,
    l4proto: u8,
    dir: u8,
    reserved: [u8; 2],
}

// The kernel's conntrack lookup for tc programs (kfuncs, Linux 5.18 and
// later). Their calls are compiled as calls of undefined functions; the
// build marks them as kfunc calls and the loader writes in the running
// kernel's BTF ids, or, on a kernel without them, turns each call into
// `r0 = 0` (no entry found): see mwan-user's `datapath::kfunc`.
extern "C" {
    fn bpf_skb_ct_lookup(
        skb: *mut aya_ebpf::bindings::__sk_buff,
        tuple: *mut u8,
        tuple_sz: u32,
        opts: *mut CtOpts,
        opts_sz: u32,
    ) -> *mut u8;
    fn bpf_ct_release(ct: *mut u8);
}

// Both programs return TC_ACT_UNSPEC: the packet continues to any later tc
// filter (a shaper's classifier, say) and then up the stack unchanged apart
// from its mark.

#[classifier]
pub fn mwan_lan_eth(ctx: TcContext) -> i32 {
    classify::<ETH_HLEN>(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn mwan_lan_l3(ctx: TcContext) -> i32 {
    classify::<0>(&ctx);
    TC_ACT_UNSPEC
}

/// On the WAN interfaces' ingress: every packet arriving on a WAN gets the
/// WAN's mark (within the mark mask). The reverse-path check of a reply
/// then looks the route back up in the WAN's own table (`src_valid_mark`):
/// a router without a default route in its main table would drop it
/// otherwise. The first packet of an inbound connection carries its WAN
/// too, which nftables records in its conntrack entry.
#[classifier]
pub fn mwan_wan(ctx: TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let (Some(w), Some(settings)) = (WAN_IFACES.get_ptr(&ifindex), SETTINGS.get(0)) {
        set_mark(&ctx, settings, unsafe { (*w).mark });
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = GLOBAL_STATS.get_ptr_mut(idx) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
}

struct Packet<K> {
    key: K,
    tcp_flags: u8,
    ifindex: u32,
    len: u32,
}

/// Why [`parse4`] or [`parse6`] yields no flow.
enum Skip {
    /// Not mwan's business, left as it is: ICMP or
    /// ICMPv6 other than an echo request (errors follow the connection they
    /// belong to; Neighbour Discovery and MLD are the link's own), an IPv6
    /// next header other than TCP, UDP and ICMPv6 (ESP, AH, no next header,
    /// unknown, more than `MAX_IPV6_EXT_HEADERS` extension headers).
    NotOurs,
    /// A non-first fragment: it has no L4 header, so it cannot name its
    /// flow. Conntrack's defragmentation in prerouting reassembles it with
    /// the first fragment, whose mark the datagram then carries.
    Fragment,
    /// A frame the kernel drops later (IPv4 version not 4, header shorter
    /// than 20 bytes, total length shorter than the header or longer than the
    /// frame; IPv6 version not 6, payload beyond the frame, an extension
    /// header cut short; an L4 header cut short): it must not create a pin.
    Malformed,
    /// The headers are in the packet but not all in its linear area.
    Nonlinear,
}

/// Bounds-checked pointer into the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Reads `N` bytes at `off` after a single bounds check (the verifier only
/// accepts packet reads it has seen checked).
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    let p = ptr_at::<[u8; N]>(ctx, off)?;
    Some(unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn be16(b: &[u8], i: usize) -> u16 {
    ((b[i] as u16) << 8) | b[i + 1] as u16
}

/// A 16-bit field as stored in the packet (network byte order), the form
/// `FlowKey` keeps ports in.
#[inline(always)]
fn raw16(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

/// `Nonlinear` when the packet holds `need` bytes beyond its linear area,
/// `Malformed` when it is shorter than that.
#[inline(always)]
fn short(ctx: &TcContext, need: usize) -> Skip {
    if (ctx.len() as usize) < need {
        Skip::Malformed
    } else {
        Skip::Nonlinear
    }
}

/// The L4 fields a flow key takes: ports (or the echo identifier as
/// `sport`) and the TCP flags.
struct L4 {
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

/// Reads the L4 header at `l4` of a datagram ending at `end` (which lies
/// within the frame: a failed read then means paged data, not a short
/// packet). `icmp` is the family's ICMP protocol and `echo` its echo
/// request type; `others` says whether other protocols are flows without
/// ports (IPv4) or not mwan's business (IPv6).
#[inline(always)]
fn parse_l4(
    ctx: &TcContext,
    proto: u8,
    l4: usize,
    end: usize,
    icmp: u8,
    echo: u8,
    others: bool,
) -> Result<L4, Skip> {
    let mut r = L4 {
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    if proto == PROTO_TCP {
        if l4 + TCP_HLEN > end {
            return Err(Skip::Malformed);
        }
        let h = bytes_at::<14>(ctx, l4).ok_or(Skip::Nonlinear)?;
        r.sport = raw16(&h, 0);
        r.dport = raw16(&h, 2);
        r.tcp_flags = h[13];
    } else if proto == PROTO_UDP {
        if l4 + UDP_HLEN > end {
            return Err(Skip::Malformed);
        }
        let h = bytes_at::<4>(ctx, l4).ok_or(Skip::Nonlinear)?;
        r.sport = raw16(&h, 0);
        r.dport = raw16(&h, 2);
    } else if proto == icmp {
        if l4 + ICMP_HLEN > end {
            return Err(Skip::Malformed);
        }
        // Echo requests are flows keyed by their identifier; errors and
        // other ICMP follow the main table.
        let h = bytes_at::<6>(ctx, l4).ok_or(Skip::Nonlinear)?;
        if h[0] != echo {
            return Err(Skip::NotOurs);
        }
        r.sport = raw16(&h, 4);
    } else if !others {
        return Err(Skip::NotOurs);
    }
    Ok(r)
}

/// Reads the headers of a packet whose IPv4 header starts at `L3` (14 after
/// an Ethernet header, 0 on a point-to-point LAN). The checks a normal
/// packet passes are compares on header bytes already read: a few
/// instructions, no helper call, no pull.
#[inline(always)]
fn parse4<const L3: usize>(ctx: &TcContext) -> Result<Packet<FlowKey>, Skip> {
    let ip = match bytes_at::<20>(ctx, L3) {
        Some(b) => b,
        None => return Err(short(ctx, L3 + 20)),
    };
    let len = ctx.len() as usize;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let mut tot_len = be16(&ip, 2) as usize;
    if tot_len == 0 && len > L3 + 0xffff {
        // IPv4 BIG TCP: a GRO packet beyond 64 KiB has total length 0 and
        // spans the rest of the skb.
        tot_len = len - L3;
    }
    if ip[0] >> 4 != 4 || ihl < 20 || tot_len < ihl || L3 + tot_len > len {
        return Err(Skip::Malformed);
    }
    // Only the first fragment carries the L4 header.
    if be16(&ip, 6) & 0x1fff != 0 {
        return Err(Skip::Fragment);
    }
    let proto = ip[9];
    let l4 = parse_l4(
        ctx,
        proto,
        L3 + ihl,
        L3 + tot_len,
        PROTO_ICMP,
        ICMP_ECHO,
        true,
    )?;
    Ok(Packet {
        key: FlowKey {
            saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
            daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
            sport: l4.sport,
            dport: l4.dport,
            proto,
            _pad: [0; 3],
        },
        tcp_flags: l4.tcp_flags,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        len: len as u32,
    })
}

/// Reads the headers of a packet whose IPv6 header starts at `L3`: the
/// fixed header, then at most `MAX_IPV6_EXT_HEADERS` extension headers
/// (hop-by-hop, routing, destination options, fragment), then TCP, UDP or
/// an ICMPv6 echo request.
#[inline(always)]
fn parse6<const L3: usize>(ctx: &TcContext) -> Result<Packet<FlowKey6>, Skip> {
    let ip = match bytes_at::<IPV6_HLEN>(ctx, L3) {
        Some(b) => b,
        None => return Err(short(ctx, L3 + IPV6_HLEN)),
    };
    let len = ctx.len() as usize;
    let mut end = L3 + IPV6_HLEN + be16(&ip, 4) as usize;
    if end == L3 + IPV6_HLEN && len > L3 + IPV6_HLEN + 0xffff {
        // IPv6 BIG TCP: a GRO packet beyond 64 KiB has payload length 0
        // and spans the rest of the skb.
        end = len;
    }
    if ip[0] >> 4 != 6 || end > len {
        return Err(Skip::Malformed);
    }
    let mut next = ip[6];
    let mut off = L3 + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let ext = next == NEXTHDR_HOP
            || next == NEXTHDR_ROUTING
            || next == NEXTHDR_DEST
            || next == NEXTHDR_FRAGMENT;
        if !ext {
            break;
        }
        // Every extension header is at least 8 bytes; its first two are
        // the next header and (but for the fragment header) the length in
        // 8-byte units beyond the first 8.
        if off + 8 > end {
            return Err(Skip::Malformed);
        }
        if off > L3 + MAX_IPV6_HDRS {
            return Err(Skip::NotOurs);
        }
        let h = bytes_at::<4>(ctx, off).ok_or(Skip::Nonlinear)?;
        if next == NEXTHDR_FRAGMENT {
            // Only the first fragment (offset 0) carries the L4 header.
            if be16(&h, 2) & 0xfff8 != 0 {
                return Err(Skip::Fragment);
            }
            off += 8;
        } else {
            off += (h[1] as usize + 1) * 8;
        }
        next = h[0];
    }
    if off > L3 + MAX_IPV6_HDRS {
        return Err(Skip::NotOurs);
    }
    let l4 = parse_l4(ctx, next, off, end, PROTO_ICMPV6, ICMPV6_ECHO, false)?;
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    saddr.copy_from_slice(&ip[8..24]);
    daddr.copy_from_slice(&ip[24..40]);
    Ok(Packet {
        key: FlowKey6 {
            saddr,
            daddr,
            sport: l4.sport,
            dport: l4.dport,
            proto: next,
            _pad: [0; 3],
        },
        tcp_flags: l4.tcp_flags,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        len: len as u32,
    })
}

/// Dispatches on the packet's L3 protocol (ethertype): from the Ethernet
/// header at `L3 == ETH_HLEN`, from `skb->protocol` on a point-to-point
/// LAN.
#[inline(always)]
fn classify<const L3: usize>(ctx: &TcContext) {
    let skb = ctx.skb.skb;
    let proto = if L3 == ETH_HLEN {
        // tc ingress sees a VLAN tag already moved from the frame into the
        // skb; the frame is then delivered to the VLAN interface.
        if unsafe { (*skb).vlan_present } != 0 {
            count(GS_PASS);
            return;
        }
        match bytes_at::<ETH_HLEN>(ctx, 0) {
            Some(eth) => be16(&eth, 12),
            None => {
                // The kernel keeps the Ethernet header linear: a frame
                // shorter than it.
                count(GS_MALFORMED);
                return;
            }
        }
    } else {
        u16::from_be(unsafe { (*skb).protocol } as u16)
    };
    if proto == ETH_P_IP {
        classify_family::<L3, V4>(ctx);
    } else if proto == ETH_P_IPV6 {
        classify_family::<L3, V6>(ctx);
    } else {
        count(GS_PASS);
    }
}

#[inline(always)]
fn classify_family<const L3: usize, F: Family>(ctx: &TcContext) {
    match parse_pulled::<L3, F>(ctx) {
        Ok(pkt) => classify_flow::<L3, F>(ctx, &pkt),
        Err(Skip::NotOurs | Skip::Nonlinear) => count(GS_PASS),
        Err(Skip::Fragment) => count(GS_FRAGMENTS),
        Err(Skip::Malformed) => count(GS_MALFORMED),
    }
}

/// Parses a packet of family `F`; when the headers are in the packet but
/// partly in paged data, pulls them into the linear area (which may copy a
/// cloned skb) once and parses again. Only such packets pay for it.
#[inline(always)]
fn parse_pulled<const L3: usize, F: Family>(ctx: &TcContext) -> Result<Packet<F::FlowKey>, Skip> {
    match F::parse::<L3>(ctx) {
        Err(Skip::Nonlinear) => {
            let want = (L3 + F::MAX_HDRS + TCP_HLEN).min(ctx.len() as usize) as u32;
            if ctx.pull_data(want).is_err() {
                return Err(Skip::Nonlinear);
            }
            F::parse::<L3>(ctx)
        }
        r => r,
    }
}

/// What differs between IPv4 and IPv6 for classification: the key types
/// and the maps of each family ([`FamilyMaps`]), and how packets and keys
/// are read.
trait Family: FamilyMaps {
    /// The most the L3 headers take (what a pull copies beyond `L3`).
    const MAX_HDRS: usize;
    fn parse<const L3: usize>(ctx: &TcContext) -> Result<Packet<Self::FlowKey>, Skip>;
    /// The other family's WANs (a host pin stays on a WAN alive there).
    fn other_wans() -> &'static Array<WanEntry>;
    fn proto(k: &Self::FlowKey) -> u8;
    fn sport(k: &Self::FlowKey) -> u16;
    fn dport(k: &Self::FlowKey) -> u16;
    fn bypassed(k: &Self::FlowKey) -> bool;
    /// The rules whose `src` allows the source.
    fn src_rules(k: &Self::FlowKey) -> u64;
    /// The rules whose `dst` allows the destination, or whose domains
    /// resolved to it.
    fn dst_rules(k: &Self::FlowKey) -> u64;
    /// The host by address: its IPv4 address or IPv6 /64.
    fn host_by_address(k: &Self::FlowKey) -> HostKey;
    /// The destination address folded to 32 bits ([`dst_bit`]).
    fn dst_fold(k: &Self::FlowKey) -> u32;
    /// The packet's connection as conntrack keeps it: `ct_lookup(tuple,
    /// its size)` with `struct bpf_sock_tuple`'s member of the family.
    fn ct_mark(ctx: &TcContext, k: &Self::FlowKey) -> Option<u32>;
}

impl Family for V4 {
    const MAX_HDRS: usize = MAX_IP_HLEN;
    #[inline(always)]
    fn parse<const L3: usize>(ctx: &TcContext) -> Result<Packet<FlowKey>, Skip> {
        parse4::<L3>(ctx)
    }
    #[inline(always)]
    fn other_wans() -> &'static Array<WanEntry> {
        V6::wans()
    }
    #[inline(always)]
    fn proto(k: &FlowKey) -> u8 {
        k.proto
    }
    #[inline(always)]
    fn sport(k: &FlowKey) -> u16 {
        k.sport
    }
    #[inline(always)]
    fn dport(k: &FlowKey) -> u16 {
        k.dport
    }
    #[inline(always)]
    fn bypassed(k: &FlowKey) -> bool {
        Self::bypass()
            .get(Key::new(32, k.daddr.to_ne_bytes()))
            .is_some()
    }
    #[inline(always)]
    fn src_rules(k: &FlowKey) -> u64 {
        match Self::rule_src().get(Key::new(32, k.saddr.to_ne_bytes())) {
            Some(v) => *v,
            None => 0,
        }
    }
    #[inline(always)]
    fn dst_rules(k: &FlowKey) -> u64 {
        let learned = match Self::domain_dst().get_ptr(&k.daddr) {
            Some(v) => unsafe { *v },
            None => 0,
        };
        learned
            | match Self::rule_dst().get(Key::new(32, k.daddr.to_ne_bytes())) {
                Some(v) => *v,
                None => 0,
            }
    }
    #[inline(always)]
    fn host_by_address(k: &FlowKey) -> HostKey {
        let mut h = HostKey {
            kind: HOST_KEY_IPV4,
            _pad: [0; 3],
            bytes: [0; 16],
        };
        h.bytes[..4].copy_from_slice(&k.saddr.to_ne_bytes());
        h
    }
    #[inline(always)]
    fn dst_fold(k: &FlowKey) -> u32 {
        k.daddr
    }
    #[inline(always)]
    fn ct_mark(ctx: &TcContext, k: &FlowKey) -> Option<u32> {
        // `bpf_sock_tuple.ipv4`: addresses and ports in network order, as
        // the key holds them.
        let mut t = [0u8; 12];
        t[0..4].copy_from_slice(&k.saddr.to_ne_bytes());
        t[4..8].copy_from_slice(&k.daddr.to_ne_bytes());
        t[8..10].copy_from_slice(&k.sport.to_ne_bytes());
        t[10..12].copy_from_slice(&k.dport.to_ne_bytes());
        ct_lookup(ctx, &mut t, k.proto)
    }
}

impl Family for V6 {
    const MAX_HDRS: usize = MAX_IPV6_HDRS;
    #[inline(always)]
    fn parse<const L3: usize>(ctx: &TcContext) -> Result<Packet<FlowKey6>, Skip> {
        parse6::<L3>(ctx)
    }
    #[inline(always)]
    fn other_wans() -> &'static Array<WanEntry> {
        V4::wans()
    }
    #[inline(always)]
    fn proto(k: &FlowKey6) -> u8 {
        k.proto
    }
    #[inline(always)]
    fn sport(k: &FlowKey6) -> u16 {
        k.sport
    }
    #[inline(always)]
    fn dport(k: &FlowKey6) -> u16 {
        k.dport
    }
    #[inline(always)]
    fn bypassed(k: &FlowKey6) -> bool {
        Self::bypass().get(Key::new(128, k.daddr)).is_some()
    }
    #[inline(always)]
    fn src_rules(k: &FlowKey6) -> u64 {
        match Self::rule_src().get(Key::new(128, k.saddr)) {
            Some(v) => *v,
            None => 0,
        }
    }
    #[inline(always)]
    fn dst_rules(k: &FlowKey6) -> u64 {
        let learned = match Self::domain_dst().get_ptr(&k.daddr) {
            Some(v) => unsafe { *v },
            None => 0,
        };
        learned
            | match Self::rule_dst().get(Key::new(128, k.daddr)) {
                Some(v) => *v,
                None => 0,
            }
    }
    #[inline(always)]
    fn host_by_address(k: &FlowKey6) -> HostKey {
        let mut h = HostKey {
            kind: HOST_KEY_IPV6,
            _pad: [0; 3],
            bytes: [0; 16],
        };
        h.bytes[..8].copy_from_slice(&k.saddr[..8]);
        h
    }
    #[inline(always)]
    fn dst_fold(k: &FlowKey6) -> u32 {
        let d = &k.daddr;
        let w = |i: usize| u32::from_ne_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
        w(0) ^ w(4) ^ w(8) ^ w(12)
    }
    #[inline(always)]
    fn ct_mark(ctx: &TcContext, k: &FlowKey6) -> Option<u32> {
        // `bpf_sock_tuple.ipv6`.
        let mut t = [0u8; 36];
        t[0..16].copy_from_slice(&k.saddr);
        t[16..32].copy_from_slice(&k.daddr);
        t[32..34].copy_from_slice(&k.sport.to_ne_bytes());
        t[34..36].copy_from_slice(&k.dport.to_ne_bytes());
        ct_lookup(ctx, &mut t, k.proto)
    }
}

/// The mark of the conntrack entry of a TCP or UDP connection, if
/// conntrack has one (the kfuncs only look these two protocols up).
#[inline(always)]
fn ct_lookup<const N: usize>(ctx: &TcContext, tuple: &mut [u8; N], proto: u8) -> Option<u32> {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let mut opts = CtOpts {
        netns_id: BPF_F_CURRENT_NETNS,
        error: 0,
        l4proto: proto,
        dir: 0,
        reserved: [0; 2],
    };
    let ct = unsafe {
        bpf_skb_ct_lookup(
            ctx.skb.skb,
            tuple.as_mut_ptr(),
            N as u32,
            &mut opts,
            CT_OPTS_SZ,
        )
    };
    if ct.is_null() {
        return None;
    }
    // `ct->mark`, at the offset the loader writes in for this kernel.
    let mark =
        unsafe { core::ptr::read_volatile(ct.offset(CT_MARK_OFFSET_MARKER as isize) as *const u32) };
    unsafe { bpf_ct_release(ct) };
    Some(mark)
}

/// The host a packet comes from (`sticky = "host"`): its source MAC on an
/// Ethernet LAN with `sticky_key = "mac"`, otherwise its address (IPv4) or
/// /64 (IPv6). Only read when host pins are on.
#[inline(always)]
fn host_key<const L3: usize, F: Family>(
    ctx: &TcContext,
    k: &F::FlowKey,
    settings: &Settings,
) -> HostKey {
    if L3 == ETH_HLEN && settings.sticky_host == STICKY_MAC {
        if let Some(mac) = bytes_at::<6>(ctx, 6) {
            let mut h = HostKey {
                kind: HOST_KEY_MAC,
                _pad: [0; 3],
                bytes: [0; 16],
            };
            h.bytes[..6].copy_from_slice(&mac);
            return h;
        }
    }
    F::host_by_address(k)
}

/// Per packet of a flow of family `F`: follow its pin, or place it.
#[inline(always)]
fn classify_flow<const L3: usize, F: Family>(ctx: &TcContext, pkt: &Packet<F::FlowKey>) {
    let settings = match SETTINGS.get(0) {
        Some(s) => s,
        None => return,
    };
    // A packet whose mark already names a WAN was steered before us: with
    // br_netfilter, nftables prerouting (which gives every packet of an
    // established connection the mark recorded in its conntrack entry)
    // runs at the bridge port, before tc ingress of the bridge. Respect
    // it; a pinned flow's packets are still counted.
    let premarked = unsafe { (*ctx.skb.skb).mark } & settings.mark_mask != 0;
    // The coarse clock (CLOCK_MONOTONIC at tick resolution) is enough for
    // idle times and host TTLs, and cheaper per packet.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let proto = F::proto(&pkt.key);
    let opening = proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

    if let Some(flow) = F::flows().get_ptr_mut(&pkt.key) {
        let flow = unsafe { &mut *flow };
        if premarked || !starts_anew::<F>(flow, proto == PROTO_TCP, opening, now) {
            // Plain adds: a flow's packets are normally handled by one CPU
            // (RSS), so lost updates are rare; the counters are statistics.
            flow.last_seen_ns = now;
            flow.packets += 1;
            flow.bytes += pkt.len as u64;
            // Passive health: the one byte the established path reads more.
            if flow.flags & (FLOW_SYN | FLOW_ANSWERED) == FLOW_SYN {
                handshake::<F>(flow, &pkt.key, pkt.tcp_flags);
            }
            if flow.wan == WAN_NONE {
                return;
            }
            if premarked {
                account(flow.wan, pkt.len, false);
                return;
            }
            if let Some(wan) = alive_wan(F::wans(), flow.wan) {
                if settings.sticky_host != STICKY_OFF {
                    refresh_host(&host_key::<L3, F>(ctx, &pkt.key, settings), flow.wan, now);
                }
                account(flow.wan, pkt.len, false);
                set_mark(ctx, settings, wan.mark);
                return;
            }
            // The WAN died: choose again with the policy that chose it.
            let old = flow.wan;
            let new = choose::<L3, F>(ctx, &pkt.key, flow.policy as u32, settings, now);
            if new == WAN_NONE {
                count(GS_NO_WAN);
                return;
            }
            count(GS_REPINS);
            flow.wan = new;
            if flow.moved_from == WAN_NONE {
                flow.moved_from = old;
            }
            // An unanswered handshake is no longer timed: its time on the
            // new WAN would include the wait on the dead one.
            flow.flags &= !FLOW_SYN;
            if let Some(wan) = alive_wan(F::wans(), new) {
                account(new, pkt.len, true);
                set_mark(ctx, settings, wan.mark);
            }
            return;
        }
        // A new connection reusing the 5-tuple of a finished one: it is
        // placed afresh below (and overwrites the old pin).
    }

    if premarked {
        count(GS_PREMARKED);
        return;
    }
    // First packet of a flow (as far as the map knows).
    if F::bypassed(&pkt.key) {
        count(GS_BYPASS);
        return;
    }
    let policy = if settings.rule_count == 0 {
        DEFAULT_POLICY
    } else {
        match_rules::<F>(pkt, settings)
    };
    // The flow may be older than its pin (evicted, deleted, older than
    // mwan, replicated to this router by an HA pair): conntrack's record
    // of its connection names the WAN it keeps.
    let recorded = match F::ct_mark(ctx, &pkt.key) {
        Some(mark) => recorded_wan::<F>(mark, settings),
        None => Recorded::Nothing,
    };
    let wan = match recorded {
        Recorded::Wan(id) if !opening || offers::<F>(policy, id) => {
            count(GS_CT_PINS);
            id
        }
        Recorded::Main if !opening => {
            // A connection of the main table (a `main = true` rule, older
            // than mwan): it stays there.
            count(GS_CT_PINS);
            WAN_NONE
        }
        _ if proto == PROTO_TCP && !opening => {
            // Not a connection opening, and no WAN to keep: a connection
            // older than mwan, or one whose WAN died (its entry is being
            // deleted). Leave it to the routing tables.
            count(GS_MIDSTREAM);
            return;
        }
        _ => {
            let wan = choose::<L3, F>(ctx, &pkt.key, policy, settings, now);
            if wan == WAN_NONE && !is_main_policy::<F>(policy) {
                count(GS_NO_WAN);
                return;
            }
            count(GS_NEW_FLOWS);
            wan
        }
    };
    // A handshake through a WAN is timed from its SYN (passive health), by
    // the precise clock.
    let syn = opening && wan != WAN_NONE;
    let value = FlowValue {
        first_seen_ns: if syn { unsafe { bpf_ktime_get_ns() } } else { now },
        last_seen_ns: now,
        packets: 1,
        bytes: pkt.len as u64,
        wan,
        policy: policy as u8,
        moved_from: WAN_NONE,
        flags: if syn { FLOW_SYN } else { 0 },
        _pad: [0; 4],
    };
    if F::flows().insert(&pkt.key, &value, 0).is_err() {
        count(GS_INSERT_ERRORS);
    } else if syn {
        count_syn::<F>(wan, &pkt.key);
    }
    if wan == WAN_NONE {
        return;
    }
    if let Some(entry) = F::wans().get(wan as u32) {
        account(wan, pkt.len, true);
        set_mark(ctx, settings, entry.mark);
    }
}

/// A packet of a flow pinned by a SYN whose handshake is not answered
/// yet: another SYN is a retransmission; the client's first ACK says the
/// SYN-ACK reached it (the classifier sees only the LAN's side).
#[inline(always)]
fn handshake<F: Family>(flow: &mut FlowValue, k: &F::FlowKey, tcp_flags: u8) {
    let Some(c) = PASSIVE.get_ptr_mut(passive_index(flow.wan as u32, F::IPV6)) else {
        return;
    };
    // Per-CPU slot: no other writer.
    let c = unsafe { &mut *c };
    if tcp_flags & TCP_SYN != 0 {
        c.retransmits += 1;
        flow.flags |= FLOW_RETRIED;
    } else if tcp_flags & TCP_ACK != 0 {
        flow.flags |= FLOW_ANSWERED;
        c.answered += 1;
        c.answered_dsts |= dst_bit(F::dst_fold(k));
        if flow.flags & FLOW_RETRIED == 0 {
            c.timed += 1;
            c.handshake_ns += unsafe { bpf_ktime_get_ns() }.wrapping_sub(flow.first_seen_ns);
        }
    }
}

/// A connection through `wan` opened by a SYN (passive health).
#[inline(always)]
fn count_syn<F: Family>(wan: u8, k: &F::FlowKey) {
    if let Some(c) = PASSIVE.get_ptr_mut(passive_index(wan as u32, F::IPV6)) {
        let c = unsafe { &mut *c };
        c.syns += 1;
        c.syn_dsts |= dst_bit(F::dst_fold(k));
    }
}

/// What conntrack recorded of a connection's WAN.
enum Recorded {
    /// Its ct mark names a WAN alive in the packet's family.
    Wan(u8),
    /// No WAN in its ct mark: the main table's.
    Main,
    /// No entry, or a WAN that is not alive.
    Nothing,
}

/// The WAN a ct mark names: mark(i) = (i + 1) << shift within the mask.
#[inline(always)]
fn recorded_wan<F: Family>(mark: u32, settings: &Settings) -> Recorded {
    let bits = mark & settings.mark_mask;
    if bits == 0 {
        return Recorded::Main;
    }
    let shift = lowest_bit(settings.mark_mask as u64);
    let id = (bits >> shift).wrapping_sub(1);
    if id >= MAX_WANS {
        return Recorded::Nothing;
    }
    match F::wans().get(id) {
        Some(w) if w.alive != 0 && w.mark & settings.mark_mask == bits => Recorded::Wan(id as u8),
        _ => Recorded::Nothing,
    }
}

/// Whether `policy` (or the default it falls back to) gives new flows to
/// WAN `id`.
#[inline(always)]
fn offers<F: Family>(policy: u32, id: u8) -> bool {
    match F::policies().get(policy) {
        Some(p) => p.wan_mask & (1u64 << (id & 63)) != 0,
        None => false,
    }
}

/// Whether the packet that hit `flow` really starts a new connection that
/// should be placed by today's policy rather than follow an old pin: a
/// non-TCP flow idle longer than conntrack keeps its NAT binding, or a TCP
/// SYN whose pinned WAN its policy no longer offers (drained, a better tier
/// back, rules changed). A retransmitted SYN keeps its WAN otherwise.
#[inline(always)]
fn starts_anew<F: Family>(flow: &FlowValue, tcp: bool, opening: bool, now: u64) -> bool {
    if !opening {
        return !tcp && now.wrapping_sub(flow.last_seen_ns) > STALE_NS;
    }
    if flow.wan == WAN_NONE {
        return true;
    }
    match F::policies().get(flow.policy as u32) {
        Some(p) => p.kind == POLICY_MAIN || p.wan_mask & (1u64 << (flow.wan & 63)) == 0,
        None => true,
    }
}

#[inline(always)]
fn is_main_policy<F: Family>(policy: u32) -> bool {
    match F::policies().get(policy) {
        Some(p) => p.kind == POLICY_MAIN,
        None => false,
    }
}

#[inline(always)]
fn alive_wan(wans: &'static Array<WanEntry>, id: u8) -> Option<&'static WanEntry> {
    match wans.get(id as u32) {
        Some(w) if w.alive != 0 => Some(w),
        _ => None,
    }
}

#[inline(always)]
fn set_mark(ctx: &TcContext, settings: &Settings, mark: u32) {
    let old = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark((old & !settings.mark_mask) | (mark & settings.mark_mask));
}

#[inline(always)]
fn account(wan: u8, len: u32, new_flow: bool) {
    if let Some(c) = WAN_STATS.get_ptr_mut(wan as u32) {
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += len as u64;
        if new_flow {
            c.flows += 1;
        }
    }
}

#[inline(always)]
fn refresh_host(host: &HostKey, wan: u8, now: u64) {
    if let Some(h) = HOST_PINS.get_ptr_mut(host) {
        let h = unsafe { &mut *h };
        if h.wan == wan && now.wrapping_sub(h.last_seen_ns) > HOST_REFRESH_NS {
            h.last_seen_ns = now;
        }
    }
}

/// Picks a WAN of family `F` for a new flow under `policy_id`. Returns
/// `WAN_NONE` for a main-table policy or when nothing is eligible.
///
/// Host pins (`sticky = "host"`, balance policies) serve both families: a
/// pin's WAN is used when it is alive in this family and in this policy's
/// slots. A fresh pin whose WAN is down in this family only (its IPv6
/// broken, say, while its IPv4 works) stays where it is, for the host's
/// flows of the other family; this flow is placed by the slots alone.
/// Otherwise (expired, its WAN down in both families or no longer offered)
/// the pin moves to the WAN chosen now.
#[inline(always)]
fn choose<const L3: usize, F: Family>(
    ctx: &TcContext,
    k: &F::FlowKey,
    policy_id: u32,
    settings: &Settings,
    now: u64,
) -> u8 {
    let policies = F::policies();
    let mut policy = match policies.get(policy_id) {
        Some(p) => p,
        None => return WAN_NONE,
    };
    if policy.kind == POLICY_MAIN {
        return WAN_NONE;
    }
    if policy.active == 0 {
        // A rule whose WANs are all out falls back to the default policy.
        policy = match policies.get(DEFAULT_POLICY) {
            Some(p) if p.active != 0 && p.kind != POLICY_MAIN => p,
            _ => return WAN_NONE,
        };
    }
    if settings.sticky_host == STICKY_OFF || policy.kind != POLICY_BALANCE {
        return pick(policy);
    }
    let host = host_key::<L3, F>(ctx, k, settings);
    let mut stale_pin = false;
    if let Some(h) = HOST_PINS.get_ptr_mut(&host) {
        let h = unsafe { &mut *h };
        match host_pin::<F>(h, policy, settings, now) {
            PinUse::Use => {
                h.last_seen_ns = now;
                count(GS_HOST_HITS);
                return h.wan;
            }
            PinUse::Keep => return pick(policy),
            PinUse::Replace => stale_pin = true,
        }
    }
    let wan = pick(policy);
    if wan != WAN_NONE {
        let h = HostValue {
            last_seen_ns: now,
            wan,
            _pad: [0; 7],
        };
        // A host's first connections often start together on several CPUs
        // (a browser opening a page): only the first creates the pin, the
        // others adopt it.
        let flags = if stale_pin { BPF_ANY } else { BPF_NOEXIST };
        if HOST_PINS.insert(&host, &h, flags).is_err() {
            if let Some(h) = HOST_PINS.get_ptr_mut(&host) {
                let h = unsafe { &*h };
                if let PinUse::Use = host_pin::<F>(h, policy, settings, now) {
                    count(GS_HOST_HITS);
                    return h.wan;
                }
            }
        }
    }
    wan
}

/// A random slot's WAN: the weighted choice.
#[inline(always)]
fn pick(policy: &Policy) -> u8 {
    let slot = (unsafe { bpf_get_prandom_u32() } as usize) & (SLOTS - 1);
    policy.slots[slot]
}

/// What a new flow of family `F` does with its host's pin.
enum PinUse {
    /// Take its WAN.
    Use,
    /// Leave it (its WAN is down in this family only) and choose alone.
    Keep,
    /// Move it to the WAN chosen now.
    Replace,
}

#[inline(always)]
fn host_pin<F: Family>(h: &HostValue, policy: &Policy, settings: &Settings, now: u64) -> PinUse {
    let fresh = now.wrapping_sub(h.last_seen_ns) < settings.host_ttl_ns;
    if !fresh || h.wan as u32 >= 64 {
        return PinUse::Replace;
    }
    if alive_wan(F::wans(), h.wan).is_none() {
        return match alive_wan(F::other_wans(), h.wan) {
            Some(_) => PinUse::Keep,
            None => PinUse::Replace,
        };
    }
    if policy.wan_mask & (1u64 << h.wan) != 0 {
        PinUse::Use
    } else {
        PinUse::Replace
    }
}

/// First-match rule evaluation with one bit per rule: each dimension yields
/// the set of rules it allows, the lowest set bit of their intersection is
/// the first matching rule.
#[inline(always)]
fn match_rules<F: Family>(pkt: &Packet<F::FlowKey>, settings: &Settings) -> u32 {
    let k = &pkt.key;
    let proto = F::proto(k);
    let mut m = match RULE_PROTO.get(proto as u32) {
        Some(v) => *v,
        None => 0,
    };
    if m == 0 {
        return DEFAULT_POLICY;
    }
    m &= match RULE_IFACE.get_ptr(&pkt.ifindex) {
        Some(v) => unsafe { *v },
        None => settings.rule_any_iface,
    };
    if m == 0 {
        return DEFAULT_POLICY;
    }
    m &= F::src_rules(k);
    if m == 0 {
        return DEFAULT_POLICY;
    }
    // The destination dimension: the rules whose `dst` CIDRs (or no `dst`
    // and no `domains`) allow the address, plus the rules by domain name
    // whose names resolved to it (learned from DNS answers). A rule with
    // both `dst` and `domains` allows the union.
    m &= F::dst_rules(k);
    if m == 0 {
        return DEFAULT_POLICY;
    }
    if proto == PROTO_TCP || proto == PROTO_UDP {
        m &= match RULE_SPORT.get(u16::from_be(F::sport(k)) as u32) {
            Some(v) => *v,
            None => 0,
        };
        m &= match RULE_DPORT.get(u16::from_be(F::dport(k)) as u32) {
            Some(v) => *v,
            None => 0,
        };
    } else {
        m &= settings.rule_any_sport & settings.rule_any_dport;
    }
    if m == 0 {
        return DEFAULT_POLICY;
    }
    let rule = lowest_bit(m);
    match RULE_ACTION.get(rule) {
        Some(p) if *p < MAX_POLICIES => *p,
        _ => DEFAULT_POLICY,
    }
}

/// Index of the lowest set bit of a non-zero mask, without relying on a ctz
/// instruction (BPF has none).
#[inline(always)]
fn lowest_bit(m: u64) -> u32 {
    let b = m & m.wrapping_neg();
    let mut i = 0;
    if b & 0xffff_ffff_0000_0000 != 0 {
        i += 32;
    }
    if b & 0xffff_0000_ffff_0000 != 0 {
        i += 16;
    }
    if b & 0xff00_ff00_ff00_ff00 != 0 {
        i += 8;
    }
    if b & 0xf0f0_f0f0_f0f0_f0f0 != 0 {
        i += 4;
    }
    if b & 0xcccc_cccc_cccc_cccc != 0 {
        i += 2;
    }
    if b & 0xaaaa_aaaa_aaaa_aaaa != 0 {
        i += 1;
    }
    i
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
